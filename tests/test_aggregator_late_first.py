"""Aggregator: a stream's first batches that come after its later ones; samples after a run ended.

Each test's docstring names the bug it guards against. No Ray: the aggregator
is the plain class (behind the real HTTP API where the bug was seen there), the
store a directory under ``tmp_path``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.aggregator import Aggregator, align
from cluster.api import serve
from cluster.metrics import registry_for
from estimators.energy import epoch_energy, run_total_j
from estimators.step import OnlineStep
from profiler.schema import UTC_US
from profiler.store import Store
from tests.test_aggregator import marks, samples


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def seconds(a: int, b: int) -> list[float]:
    """Whole seconds ``a, a + 1, ..., b - 1``."""
    return [float(t) for t in range(a, b)]


def truth(store: Store, run_id: str, gap_threshold_s: float = 5.0) -> pl.DataFrame:
    """``wattwise energy --run`` on the store: per-epoch energy of the stored samples."""
    s, m = align(store.samples(run_id), store.epochs(run_id), store.run(run_id))
    return epoch_energy(s, m, gap_threshold_s=gap_threshold_s).sort("epoch")


def stored_total(store: Store, run_id: str) -> float:
    """``wattwise energy --run``'s run total on the store."""
    s, m = align(store.samples(run_id), store.epochs(run_id), store.run(run_id))
    return run_total_j(s, m, gap_threshold_s=5.0)


# ------------------------------------------------------------- 1: first batches resent late


def test_a_known_streams_samples_older_than_its_first_are_put_into_the_closed_epochs(
    store: Store,
) -> None:
    """Regression: a sidecar's first batches (0-8 s) failed and were resent after its later
    ones had closed epoch 0 (0-10 s): they counted only as ``late``, and the live epoch kept
    700 J (8-10 s measured, 3-8 s its first power held back, 0-3 s a gap) until the run
    ended. Now each resent batch older than the stream's first sample seen live rebuilds
    the run from the store, also the second of two resent in order (older than the first
    sample seen live, not older than the first held after the first rebuild)."""
    agg = Aggregator(store, max_lag_s=1.0)  # gap threshold 5 s
    agg.start_run({"run_id": "b", "planned_epochs": 3})
    agg.ingest_epochs(marks("b", [(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 20.0, 30.0)]))
    agg.ingest_samples(samples("b", seconds(8, 41), [100.0] * 33))
    assert agg.epochs("b")["energy_j"].to_list() == pytest.approx([700.0, 1000.0, 1000.0])
    assert agg.epochs("b")["gap_s"].to_list() == pytest.approx([3.0, 0.0, 0.0])

    agg.ingest_samples(samples("b", seconds(0, 3), [100.0] * 3))  # resent first batch
    agg.flush()
    live = agg.epochs("b")
    assert live["energy_j"].to_list() == pytest.approx(truth(store, "b")["energy_j"].to_list())
    assert live["gap_s"].to_list() == pytest.approx(truth(store, "b")["gap_s"].to_list())
    assert agg.stats()["recomputed_runs"] == 1

    agg.ingest_samples(samples("b", seconds(3, 8), [100.0] * 5))  # resent second batch
    # 100 W throughout, nothing missing: 1,000 J per epoch, by hand.
    live = agg.epochs("b")
    assert live["energy_j"].to_list() == pytest.approx([1000.0, 1000.0, 1000.0])
    assert live["gap_s"].to_list() == pytest.approx([0.0, 0.0, 0.0])
    assert agg.stats()["recomputed_runs"] == 2
    # Once per batch, not per sample; a copy of a batch already taken rebuilds nothing.
    agg.ingest_samples(samples("b", seconds(3, 8), [100.0] * 5))
    assert agg.stats()["recomputed_runs"] == 2
    assert (agg.stats()["late"], agg.status("b")["late_samples"]) == (0, 0)
    # STEP was fed the corrected epochs: 3,000 J at 100 W, nothing left to project.
    proj = agg.projection("b")
    assert (proj["measured_j"], proj["stable_power_w"]) == pytest.approx((3000.0, 100.0))
    agg.finish_run("b")
    assert store.run("b")["energy_j"] == pytest.approx(4000.0)  # 0-40 s at 100 W


def test_without_a_store_a_backfill_older_than_the_window_counts_as_late() -> None:
    """With no store to rebuild from, resent first samples older than the window are not
    dropped silently: they count as late, as before."""
    agg = Aggregator(None, max_lag_s=1.0, retain_s=0.0)
    agg.ingest_epochs(marks("n", [(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 20.0, 30.0)]))
    agg.ingest_samples(samples("n", seconds(8, 41), [100.0] * 33))
    agg.ingest_samples(samples("n", seconds(0, 3), [100.0] * 3))
    assert (agg.status("n")["late_samples"], agg.stats()["late"]) == (3, 3)
    assert agg.stats()["recomputed_runs"] == 0


def test_a_known_streams_lagging_batch_inside_its_span_still_counts_as_late(
    store: Store,
) -> None:
    """The backfill rebuild is only for samples older than the stream's first: a lagging
    sample after it stays a (cheap) late sample, as before."""
    agg = Aggregator(store, max_lag_s=1.0)
    agg.start_run({"run_id": "k", "planned_epochs": 3})
    agg.ingest_epochs(marks("k", [(0, 0.0, 10.0), (1, 10.0, 20.0)]))
    agg.ingest_samples(samples("k", [t for t in seconds(0, 31) if t != 4.0], [100.0] * 30))
    agg.ingest_samples(samples("k", [4.0], [100.0]))
    assert agg.status("k")["late_samples"] == 1
    assert agg.stats()["recomputed_runs"] == 0


def test_the_seaa_runs_first_40_s_resent_after_110_s_give_the_stored_epochs_live(
    store: Store, shared_data: Path
) -> None:
    """Regression (review, ``first_batch_late.py``): the first 40 s of a real run's samples
    arrived after the samples of 40-110 s had closed epochs 0-3; they counted only as late,
    those epochs read 0 J live (a full-epoch gap) until the run ended, and the live STEP
    projection was 6 % low, outside both bands of the offline estimate."""
    run_id = "local-v2-mobilenet_v2-33"
    meta = pl.read_parquet(shared_data / "runs.parquet").filter(pl.col("run_id") == run_id)
    n = int(meta["trained_epochs"][0])
    tr = (
        pl.read_parquet(shared_data / "traces.parquet")
        .filter(pl.col("run_id") == run_id)
        .sort("timestamp")
        .drop_nulls("power_w")
        .with_columns(pl.col("timestamp").dt.replace_time_zone("UTC").dt.cast_time_unit("us"))
    )
    t0, t1 = tr["timestamp"][0], tr["timestamp"][-1]
    step = (t1 - t0) / n
    frame = tr.select(
        run_id=pl.lit(run_id),
        node=pl.lit("n1"),
        device=pl.lit("0"),
        timestamp=pl.col("timestamp"),
        power_w=pl.col("power_w").cast(pl.Float64),
        energy_j=pl.lit(None, dtype=pl.Float64),
        source=pl.lit("nvidia-smi"),
    )
    rel = (frame["timestamp"] - t0).dt.total_microseconds().to_numpy() / 1e6
    ends = [((e + 1) * step).total_seconds() for e in range(n)]
    all_marks = pl.DataFrame(
        {
            "run_id": [run_id] * n,
            "epoch": list(range(n)),
            "start": [t0 + e * step for e in range(n)],
            "end": [t0 + (e + 1) * step for e in range(n)],
        },
        schema_overrides={"start": UTC_US, "end": UTC_US},
    )
    agg = Aggregator(store)
    agg.start_run({"run_id": run_id, "planned_epochs": n})
    sent = 0

    def send(part: pl.DataFrame, upto_s: float) -> None:
        nonlocal sent
        agg.ingest_samples(part)
        new = sum(e <= upto_s for e in ends)
        if new > sent:
            agg.ingest_epochs(all_marks.slice(sent, new - sent))
            sent = new

    idx_mid = [i for i, s in enumerate(rel) if 40.0 <= s < 110.0]
    idx_rest = [i for i, s in enumerate(rel) if s >= 110.0][:200]
    for i in range(0, len(idx_mid), 10):
        part = idx_mid[i : i + 10]
        send(frame[part], float(rel[part[-1]]))
    early = frame[[i for i, s in enumerate(rel) if s < 40.0]]
    assert early.height == 40
    agg.ingest_samples(early)  # the first batches, resent
    for i in range(0, len(idx_rest), 10):
        part = idx_rest[i : i + 10]
        send(frame[part], float(rel[part[-1]]))
    live = agg.epochs(run_id).sort("epoch")
    agg.flush()
    want = truth(store, run_id).head(live.height)
    assert live.height >= 25
    assert live["energy_j"].to_list() == pytest.approx(want["energy_j"].to_list())
    assert live["gap_s"].to_list() == pytest.approx(want["gap_s"].to_list(), abs=1e-9)
    assert live["energy_j"][0] > 400.0  # 421.8 J stored; 0 J live before the fix
    assert (agg.stats()["late"], agg.stats()["recomputed_runs"]) == (0, 1)
    # The live projection is STEP fed the stored epochs (it was 6 % low).
    online = OnlineStep(planned_epochs=n)
    for r in want.iter_rows(named=True):
        expect = online.update(r["energy_j"], r["duration_s"], between_j=0.0, gap_s=r["gap_s"])
    proj = agg.projection(run_id)
    assert proj["energy_j"] == pytest.approx(expect.energy_j, rel=1e-9)


# ------------------------------------------------------------- 2: samples after the end


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as f:
        return int(f.status), json.loads(f.read())


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as f:
        return json.loads(f.read())


def _row(i: int, device: str = "0") -> dict[str, Any]:
    return {
        "run_id": "r1",
        "node": "n1",
        "device": device,
        "timestamp": f"2024-01-01T00:00:{i:02d}+00:00",
        "power_w": 100.0,
        "source": "nvml",
    }


def ended_run(store: Store, **kwargs: Any) -> Aggregator:
    """Run r1: device 0 at 100 W for 0-40 s, epochs 0-20 s and 20-40 s, finished (4,000 J)."""
    agg = Aggregator(store, flush_interval_s=3600.0, **kwargs)
    agg.start_run({"run_id": "r1", "planned_epochs": 2})
    agg.ingest_samples(samples("r1", seconds(0, 41), [100.0] * 41))
    agg.ingest_epochs(marks("r1", [(0, 0.0, 20.0), (1, 20.0, 40.0)]))
    assert agg.finish_run("r1")["measured_energy_j"] == pytest.approx(4000.0)
    return agg


def test_samples_after_a_run_ended_update_its_stored_energy_and_summary(store: Store) -> None:
    """Regression (review, ``after_finish.py``): a lagging second GPU's batch (device 1,
    inside the run's span) posted after the run ended was stored (200), so ``wattwise
    energy --run`` gave 8,000 J, while the run's stored ``energy_j`` and ``GET /runs/r1``
    kept 4,000 J."""
    agg = ended_run(store)
    api = serve(agg)
    try:
        late = [_row(i, device="1") for i in range(41)]
        assert _post(api.url + "/samples", {"samples": late[:20]}) == (200, {"accepted": 20})
        assert _post(api.url + "/samples", {"samples": late[20:]}) == (200, {"accepted": 21})
        # Debounced to the flush: not per batch.
        assert store.run("r1")["energy_j"] == pytest.approx(4000.0)
        agg.flush()
        summary = _get(api.url + "/runs/r1")
        epochs = _get(api.url + "/runs/r1/epochs")
    finally:
        api.close()
    total = stored_total(store, "r1")
    assert total == pytest.approx(8000.0)  # two devices at 100 W for 40 s, by hand
    row = store.run("r1")
    assert (row["energy_j"], row["status"], row["energy_source"]) == (
        pytest.approx(total),
        "finished",
        "measured",
    )
    assert row["duration_s"] == pytest.approx(40.0)
    assert summary["measured_energy_j"] == pytest.approx(total)
    assert summary["projection"]["energy_j"] == pytest.approx(total)
    assert sum(e["energy_j"] for e in epochs) == pytest.approx(total)
    assert agg.stats()["after_finish"] == 41
    # Exported to Prometheus as an aggregator counter.
    text = generate_latest(registry_for(agg)).decode()
    got = {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if not s.labels
    }
    assert got["wattwise_aggregator_after_finish_samples_total"] == 41.0


def test_samples_of_an_ended_run_in_the_journal_update_its_energy_on_restart(
    store: Store, tmp_path: Path
) -> None:
    """The same after a restart: samples of an ended run acknowledged from the write-ahead
    journal but not yet stored when the process died are stored by the rebuild, and the
    run's stored energy is brought up to date with them."""
    agg = ended_run(store, wal=tmp_path / "wal")
    agg.ingest_samples(samples("r1", seconds(0, 41), [50.0] * 41, device="1"))
    # The process dies here: the batch is in the journal only.
    assert store.samples("r1").height == 41
    again = Aggregator.rebuild(store, wal=tmp_path / "wal")
    assert store.samples("r1").height == 82
    assert store.run("r1")["energy_j"] == pytest.approx(6000.0)  # + 50 W x 40 s
    assert again.status("r1")["measured_energy_j"] == pytest.approx(6000.0)
