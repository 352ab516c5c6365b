"""``wattwise bench pre`` on runs files: duplicates, truth columns, runs without an interval.

Found in review: a file holding a run twice was taken (it counted twice in the
fit and the scores); a test file with ``energy_j`` (the store's name) instead of
``gpu_energy_j`` was scored as having no truth; one whose truth columns are all
null (planned jobs) was refused; runs without an interval counted as misses
in the coverage; a file mixing planned and measured runs was refused; and
``--out x.csv`` wrote Parquet under a .csv name.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cluster.cli import main


@pytest.fixture
def runs(shared_data: Path) -> pl.DataFrame:
    return pl.read_parquet(shared_data / "runs.parquet")


def bench(tmp_path: Path, train: pl.DataFrame, test: pl.DataFrame) -> list[str]:
    train.write_parquet(tmp_path / "train.parquet")
    test.write_parquet(tmp_path / "test.parquet")
    return [
        "bench", "pre", "--train", str(tmp_path / "train.parquet"),
        "--test", str(tmp_path / "test.parquet"), "--out", str(tmp_path / "pred.parquet"),
    ]  # fmt: skip


def test_a_run_twice_in_a_runs_file_is_refused(
    tmp_path: Path, runs: pl.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    train = pl.concat([runs.head(150), runs.slice(10, 1)])
    assert main(bench(tmp_path, train, runs.tail(99))) == 2
    err = capsys.readouterr().err
    assert "train.parquet: expected each run once" in err and runs["run_id"][10] in err
    assert not (tmp_path / "pred.parquet").exists()


def test_truth_from_energy_j_and_a_file_of_planned_jobs(
    tmp_path: Path, runs: pl.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    perm = runs.sample(fraction=1.0, shuffle=True, seed=1)
    train, test = perm.head(175), perm.tail(74)
    assert main(bench(tmp_path, train, test.rename({"gpu_energy_j": "energy_j"}))) == 0
    scored = capsys.readouterr().out
    assert "MAPE" in scored and "coverage" in scored
    planned = test.with_columns(
        pl.lit(None, pl.Float64).alias(c) for c in ("gpu_energy_j", "trained_epochs", "duration_s")
    ).with_columns(planned_epochs=pl.lit(60))
    assert main(bench(tmp_path, train, planned)) == 0
    out = capsys.readouterr().out
    assert "wrote 74 predictions" in out and "MAPE" not in out
    pred = pl.read_parquet(tmp_path / "pred.parquet")
    assert pred["predicted_epoch_energy_j"].null_count() == 0 and pred["seen_gpu"].all()


def test_runs_without_an_interval_are_not_counted_as_misses(
    tmp_path: Path, runs: pl.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trained on one architecture, a new one has no interval (nothing to calibrate it on)."""
    train = runs.filter(pl.col("architecture") == "vgg16")
    test = pl.concat([runs.filter(pl.col("architecture") == "mobilenet_v2"), train.head(10)])
    assert main(bench(tmp_path, train, test)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "97 of 107 runs without an interval: not counted" in out
    assert "coverage" in out


def test_planned_and_measured_runs_in_one_test_file(
    tmp_path: Path, runs: pl.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    perm = runs.sample(fraction=1.0, shuffle=True, seed=2)
    train, test = perm.head(175), perm.tail(74)
    truth = ("gpu_energy_j", "trained_epochs", "duration_s")
    planned = pl.int_range(pl.len()) < 4  # the first 4 rows: jobs not yet run
    mixed = test.with_columns(
        pl.when(planned).then(None).otherwise(pl.col(c)).alias(c) for c in truth
    ).with_columns(planned_epochs=pl.lit(60))
    assert main([*bench(tmp_path, train, mixed), "--plot", str(tmp_path / "p.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "wrote 74 predictions" in out
    assert "MAPE" in out and "over the 70 measured runs (4 planned: not scored)" in out
    pred = pl.read_parquet(tmp_path / "pred.parquet")
    assert pred["run_id"].to_list() == test["run_id"].to_list()
    assert pred["predicted_epoch_energy_j"].null_count() == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    # scored over the measured runs alone: the same MAPE as a file without the planned ones
    assert main(bench(tmp_path, train, test.slice(4))) == 0
    alone = capsys.readouterr().out
    assert alone.split("MAPE ")[1].split(" %")[0] == out.split("MAPE ")[1].split(" %")[0]
    # a run with only some truth columns null is still refused, naming the row and column
    half = test.with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("duration_s"))
        .alias("duration_s")
    )  # fmt: skip
    assert main(bench(tmp_path, train, half)) == 2
    err = capsys.readouterr().err
    assert "row 6" in err and "duration_s" in err


def test_out_csv_is_csv_and_other_names_are_refused(
    tmp_path: Path, runs: pl.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    args = bench(tmp_path, runs.head(175), runs.tail(74))
    args[-1] = str(tmp_path / "pred.csv")
    assert main(args) == 0
    pred = pl.read_csv(tmp_path / "pred.csv")
    assert pred.height == 74 and "predicted_epoch_energy_j" in pred.columns
    args[-1] = str(tmp_path / "pred.txt")
    assert main(args) == 2
    assert "--out must name a .parquet or .csv file" in capsys.readouterr().err
    assert not (tmp_path / "pred.txt").exists()
