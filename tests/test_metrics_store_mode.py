"""``wattwise metrics`` without ``--ray``: ended runs stay served from the store, no false zeros."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.aggregator import Aggregator
from cluster.cli import main
from cluster.commands.ops_cmds import _Rebuilding
from cluster.metrics import registry_for
from profiler.schema import UTC_US
from profiler.store import Store
from tests.conftest import at

#: Counters only a live aggregator knows (received, late, flushed, marks taken...).
LIVE_ONLY = (
    "wattwise_aggregator_samples_total",
    "wattwise_aggregator_late_samples_total",
    "wattwise_aggregator_flushed_samples_total",
    "wattwise_aggregator_rejected_samples_total",
    "wattwise_aggregator_epochs_total",
    "wattwise_aggregator_recomputed_runs_total",
    "wattwise_aggregator_pending_samples",  # a gauge, but also unknown without the aggregator
)


def _series(text: str) -> dict[tuple[str, str], float]:
    """(metric name, run_id label or '') -> value."""
    return {
        (s.name, s.labels.get("run_id", "")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _statuses(text: str) -> dict[str, str]:
    """run_id -> the status label of ``wattwise_job_info``."""
    return {
        s.labels["run_id"]: s.labels["status"]
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "wattwise_job_info"
    }


def _run(agg: Aggregator, run_id: str) -> None:
    """A run of two 10 s epochs at 100 W (21 samples, 1 s apart): 1000 J per epoch."""
    agg.start_run({"run_id": run_id, "planned_epochs": 2, "node_type": "a100"})
    agg.ingest_samples(
        pl.DataFrame(
            {
                "run_id": [run_id] * 21,
                "node": ["n1"] * 21,
                "device": ["0"] * 21,
                "timestamp": [at(i) for i in range(21)],
                "power_w": [100.0] * 21,
                "source": ["nvml"] * 21,
            },
            schema_overrides={"timestamp": UTC_US},
        )
    )
    agg.ingest_epochs(
        pl.DataFrame(
            {
                "run_id": [run_id] * 2,
                "epoch": [0, 1],
                "start": [at(0), at(10)],
                "end": [at(10), at(20)],
            }
        )
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_a_run_that_ends_stays_served_with_its_stored_figures(store: Store) -> None:
    """Regression: a run that ended vanished at the next rebuild from the store (the README
    says its last-epoch metrics show its final epoch as stored)."""
    agg = Aggregator(store)
    _run(agg, "done")
    _run(agg, "live")
    agg.flush()
    registry = registry_for(_Rebuilding(store, refresh_s=1e-6), store_root=store.root)
    before = generate_latest(registry).decode()
    assert _statuses(before) == {"done": "running", "live": "running"}

    agg.finish_run("done")
    after = generate_latest(registry).decode()
    m = _series(after)
    assert _statuses(after) == {"done": "finished", "live": "running"}
    assert m[("wattwise_job_energy_joules_total", "done")] == pytest.approx(2000.0)  # 20 s x 100 W
    assert m[("wattwise_job_last_epoch_energy_joules", "done")] == pytest.approx(1000.0)
    assert m[("wattwise_job_last_epoch_duration_seconds", "done")] == pytest.approx(10.0)
    assert m[("wattwise_job_last_epoch", "done")] == 1.0
    assert m[("wattwise_job_epochs_done", "done")] == 2.0
    assert m[("wattwise_job_power_watts", "done")] == 0.0  # ended
    # STEP's final figure is the measured total, with a band of zero width.
    assert m[("wattwise_job_projected_energy_joules", "done")] == pytest.approx(2000.0)
    assert m[("wattwise_job_projected_energy_lower_joules", "done")] == pytest.approx(2000.0)
    assert m[("wattwise_job_projected_energy_upper_joules", "done")] == pytest.approx(2000.0)
    assert m[("wattwise_job_stable", "done")] == 1.0
    assert m[("wattwise_job_energy_joules_total", "live")] == pytest.approx(2000.0)
    assert m[("wattwise_jobs_running", "")] == 1.0


def test_counters_are_the_store_s_or_left_out(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: every wattwise_aggregator_* counter read 0 (finished_runs_total 0 with a
    run finished, samples_total 0 for 42 samples)."""
    agg = Aggregator(store)
    for run_id in ("done", "broke", "live"):
        _run(agg, run_id)
    agg.finish_run("done")
    agg.finish_run("broke", status="failed")
    agg.flush()
    assert main(["metrics", "--once", "--store", str(store.root)]) == 0
    text = capsys.readouterr().out
    m = _series(text)
    assert m[("wattwise_aggregator_finished_runs_total", "")] == 2.0  # finished or failed
    assert [name for name in LIVE_ONLY if (name, "") in m] == []
    assert _statuses(text) == {"done": "finished", "broke": "failed", "live": "running"}


def _record(run_id: str, end: dt.datetime, energy_j: float) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "status": "finished",
        "start": end - dt.timedelta(hours=1),
        "end": end,
        "energy_j": energy_j,
        "planned_epochs": 3,
        "trained_epochs": 3,
        "duration_s": 3600.0,
    }


def test_runs_ended_more_than_a_day_before_the_newest_are_left_out(store: Store) -> None:
    newest = at(0)
    store.write_runs(
        pl.DataFrame(
            [
                _record("new", newest, 5000.0),
                _record("day-old", newest - dt.timedelta(hours=23), 4000.0),
                _record("older", newest - dt.timedelta(hours=25), 3000.0),
            ],
            schema_overrides={"start": UTC_US, "end": UTC_US},
        )
    )
    source = _Rebuilding(store, refresh_s=15.0)
    got = {s["run_id"]: s for s in source.status()}
    assert sorted(got) == ["day-old", "new"]
    assert got["new"]["measured_energy_j"] == 5000.0
    assert got["new"]["status"] == "finished"
    assert got["new"]["projection"]["energy_j"] == 5000.0
    assert source.running() == []
    assert source.stats() == {"finished_runs": 3}  # counted, even when no longer served

    # A run that began 2 h after the newest end moves the window: "day-old" is now 25 h old.
    store.write_runs(
        pl.DataFrame(
            [{"run_id": "next", "status": "running", "start": newest + dt.timedelta(hours=2)}],
            schema_overrides={"start": UTC_US},
        )
    )
    source = _Rebuilding(store, refresh_s=15.0)
    assert sorted(s["run_id"] for s in source.status()) == ["new", "next"]
    assert source.running() == ["next"]
