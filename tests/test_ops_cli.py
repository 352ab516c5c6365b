"""``wattwise retrain --if-new-runs`` (the nightly job) on a young store of real runs."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cluster.cli import main
from profiler.importers.seaa2023 import import_seaa2023
from profiler.store import Store


def _young_store(shared_data: Path, root: Path, finished: int) -> Store:
    """The real SEAA 2023 runs with only the first ``finished`` of them finished."""
    store = Store(root)
    import_seaa2023(store, shared_data, progress=False)
    later = store.runs()["run_id"].to_list()[finished:]
    store.write_runs(pl.DataFrame({"run_id": later, "status": ["running"] * len(later)}))
    return store


@pytest.mark.shared_data
@pytest.mark.parametrize("finished", [0, 3, 9])
def test_the_nightly_retrain_waits_quietly_for_enough_runs(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], finished: int
) -> None:
    """Bug: with 1-9 usable finished runs, ``retrain --if-new-runs`` (the CronJob and the
    systemd unit) failed with exit 2 ("PRE needs at least 10 finished runs to train; found
    3"), so a new deployment got a failed Job every night until it had 10 runs."""
    store = _young_store(shared_data, tmp_path / "store", finished)
    assert main(["retrain", "--if-new-runs", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"{finished} usable finished runs; PRE needs at least 10: nothing to do" in out
    assert not list((store.root / "models").glob("pre-v*.json"))


@pytest.mark.shared_data
def test_an_explicit_retrain_still_refuses_too_few_runs(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _young_store(shared_data, tmp_path / "store", 3)
    assert main(["retrain", "--store", str(store.root)]) == 2
    assert "PRE needs at least 10 finished runs to train; found 3" in capsys.readouterr().err


@pytest.mark.shared_data
def test_the_nightly_retrain_replaces_a_model_it_cannot_load(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug: with no new finished runs, ``retrain --if-new-runs`` kept a model that
    :func:`cluster.retrain.latest_model` refuses (an older format version), so placement fell
    back to the default node type and ``recommend`` failed until some new run finished."""
    import json

    from cluster.retrain import latest_model
    from estimators.pre import FORMAT_VERSION, card_path

    store = _young_store(shared_data, tmp_path / "store", 12)
    folder = store.root / "models"
    assert main(["retrain", "--store", str(store.root)]) == 0
    # v1 as an older wattwise wrote it: same runs, an older format version.
    card = card_path(folder / "pre-v1.json")
    old = {**json.loads(card.read_text()), "format_version": FORMAT_VERSION - 1}
    card.write_text(json.dumps(old))
    capsys.readouterr()
    assert main(["retrain", "--if-new-runs", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "no new finished runs since v1, but the current model cannot be loaded (" in out
    assert f"version {FORMAT_VERSION - 1}" in out and "); retraining" in out
    assert "v2 accepted (current was v1): " in out and "runs added: 0; trained on 12" in out
    assert latest_model(folder).n_rows_ == 12
    # and with the loadable v2 the next night has nothing to do
    assert main(["retrain", "--if-new-runs", "--store", str(store.root)]) == 0
    again = capsys.readouterr().out
    assert again.startswith("no new finished runs since v2 (") and "nothing to do" in again
