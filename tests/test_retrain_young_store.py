"""``wattwise retrain --if-new-runs`` (the nightly job) on a young store it cannot train on yet."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cluster.cli import main
from profiler.importers.seaa2023 import import_seaa2023
from profiler.store import Store

UNKNOWN_GPU = "NVIDIA RTX A6000"  # not in estimators/gpus.py's table


def young_store(shared_data: Path, tmp_path: Path, n: int) -> Store:
    """A store holding the first ``n`` SEAA vgg16 runs on the RTX 3090, all finished."""
    runs = pl.read_parquet(shared_data / "runs.parquet")
    runs = runs.filter(
        (pl.col("architecture") == "vgg16") & (pl.col("gpu_model") == "NVIDIA GeForce RTX 3090")
    ).head(n)
    traces = pl.read_parquet(shared_data / "traces.parquet").filter(
        pl.col("run_id").is_in(runs["run_id"].implode())
    )
    folder = tmp_path / "data"
    folder.mkdir()
    runs.write_parquet(folder / "runs.parquet")
    traces.write_parquet(folder / "traces.parquet")
    store = Store(tmp_path / "store")
    import_seaa2023(store, folder, progress=False)
    assert store.runs()["status"].to_list() == ["finished"] * n
    return store


@pytest.mark.shared_data
def test_all_runs_on_an_unknown_gpu_is_nothing_to_do(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: runs all on a GPU PRE does not know made the nightly job exit 2.

    training_rows() raised ("unknown GPU model") before the "fewer than 10 usable
    runs: nothing to do" check, so a young A6000 cluster's CronJob failed every night.
    """
    store = young_store(shared_data, tmp_path, 3)
    ids = store.runs()["run_id"].sort().to_list()
    store.write_runs(store.runs().with_columns(pl.lit(UNKNOWN_GPU).alias("gpu_model")))

    assert main(["retrain", "--if-new-runs", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "0 usable finished runs; PRE needs at least 10: nothing to do" in out
    assert "3 finished run(s) left out" in out
    for run_id in ids:
        assert f"{run_id}: unknown GPU model '{UNKNOWN_GPU}'" in out
    assert not (store.root / "models").exists()  # nothing trained, nothing written


@pytest.mark.shared_data
def test_a_young_store_says_which_runs_it_cannot_use(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Usable runs are counted apart from those on an unknown GPU, which are named."""
    store = young_store(shared_data, tmp_path, 3)
    odd = store.runs()["run_id"].sort().to_list()[0]
    store.write_runs(
        store.runs()
        .filter(pl.col("run_id") == odd)
        .with_columns(pl.lit(UNKNOWN_GPU).alias("gpu_model"))
    )

    assert main(["retrain", "--if-new-runs", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "2 usable finished runs; PRE needs at least 10: nothing to do" in out
    assert "1 finished run(s) left out" in out
    assert f"{odd}: unknown GPU model '{UNKNOWN_GPU}'" in out
