"""Edge cases of the aggregator and the store found in review: conflicts, reused ids, races.

Each test's docstring names the bug it guards against. No Ray: the aggregator
is the plain class, the store a directory under ``tmp_path``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path

import polars as pl
import pytest

import profiler.store as store_mod
from cluster.aggregator import Aggregator
from cluster.cli import main
from conftest import at
from estimators.energy import run_energy
from profiler.errors import BadInputError, SchemaError, StoreError
from profiler.journal import Journal
from profiler.schema import schema
from profiler.store import Store
from tests.test_aggregator import marks
from tests.test_aggregator import samples as base_samples


def samples(
    run_id: str | None,
    times: list[float],
    power: list[float | None],
    *,
    node: str = "n1",
    device: str = "0",
) -> pl.DataFrame:
    """A batch in the full ``samples`` schema (the sidecar's shape: the aggregator's fast path)."""
    df = base_samples(run_id, times, power, node=node, device=device)
    full = schema("samples")
    out = df.select(
        pl.col(c) if c in df.columns else pl.lit(None, dtype).alias(c) for c, dtype in full.items()
    )
    assert out.schema == full
    return out


def stored_energy(store: Store, run_id: str) -> float:
    return float(run_energy(store.samples(run_id))["energy_j"][0])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


# ------------------------------------------------------------- 1: conflicting samples


def test_a_resent_sample_with_another_value_keeps_the_first_everywhere(store: Store) -> None:
    """Regression: one sample resent with another value made the flush drop its whole batch
    (101 rows acknowledged, counted, then lost): memory said 11,000 J, the store and every
    restart 1,000 J."""
    agg = Aggregator(store)
    agg.start_run({"run_id": "r1", "planned_epochs": 2})
    agg.ingest_samples(samples("r1", [float(t) for t in range(11)], [100.0] * 11))
    agg.flush()
    # t = 10 again, now 150 W; then 100 s more at 100 W.
    agg.ingest_samples(
        samples("r1", [10.0] + [float(t) for t in range(11, 111)], [150.0] + [100.0] * 100)
    )
    agg.flush()
    got = store.samples("r1")
    assert got.height == 111  # only the conflicting row is skipped
    assert got.filter(pl.col("timestamp") == at(10))["power_w"].to_list() == [100.0]
    assert agg.stats()["rejected"] == 1
    # 110 s at 100 W, by hand; memory, store and a restart agree.
    assert agg.status("r1")["measured_energy_j"] == pytest.approx(11_000.0)
    assert stored_energy(store, "r1") == pytest.approx(11_000.0)
    again = Aggregator.rebuild(store)
    assert again.status("r1")["measured_energy_j"] == pytest.approx(11_000.0)


def test_two_queued_batches_with_two_values_of_one_sample_store_the_first(
    store: Store,
) -> None:
    """Regression: batches flushed together were written as one; a conflict between them made
    the per-batch fallback drop the later batch whole."""
    agg = Aggregator(store, flush_rows=10**9, flush_interval_s=1e9)
    agg.start_run({"run_id": "r1"})
    agg.ingest_samples(samples("r1", [0.0, 1.0, 2.0], [100.0, 100.0, 100.0]))
    agg.ingest_samples(samples("r1", [2.0, 3.0, 4.0], [400.0, 100.0, 100.0]))
    assert store.samples("r1").height == 0  # both still queued
    assert agg.flush() == 5
    assert store.samples("r1")["power_w"].to_list() == [100.0] * 5
    assert agg.stats()["rejected"] == 1
    assert agg.status("r1")["measured_energy_j"] == pytest.approx(400.0)  # 4 s at 100 W
    assert stored_energy(store, "r1") == pytest.approx(400.0)


def test_a_batch_with_two_values_for_one_sample_is_refused_at_ingest(
    store: Store, tmp_path: Path
) -> None:
    """Regression: the fast path (full schema, as sidecars send) skipped the duplicate-key
    check, took such a batch, and the flush then dropped it whole."""
    agg = Aggregator(store, wal=tmp_path / "wal", flush_rows=10**9, flush_interval_s=1e9)
    agg.start_run({"run_id": "r1"})
    clash = samples("r1", [0.0, 1.0, 1.0, 2.0], [100.0, 100.0, 150.0, 100.0])
    with pytest.raises(SchemaError, match="two different rows share the key"):
        agg.ingest_samples(clash)
    assert agg.stats()["samples"] == 0
    assert list((tmp_path / "wal").glob("batch-*.parquet")) == []  # nothing journalled
    # Exact duplicates inside one batch are harmless: taken, counted once.
    twice = samples("r1", [0.0, 1.0, 1.0, 2.0], [100.0] * 4)
    assert agg.ingest_samples(twice) == 4
    assert agg.flush() == 3
    assert agg.status("r1")["measured_energy_j"] == pytest.approx(200.0)


def test_a_journal_batch_that_conflicts_is_stored_without_the_conflicting_row(
    store: Store, tmp_path: Path
) -> None:
    """Regression: at restart a journal batch with one conflicting sample was set aside whole,
    losing its other (acknowledged) rows."""
    agg = Aggregator(store, wal=tmp_path / "wal", flush_rows=10**9, flush_interval_s=1e9)
    agg.start_run({"run_id": "r1"})
    agg.ingest_samples(samples("r1", [0.0, 1.0, 2.0], [100.0] * 3))
    agg.flush()
    agg.ingest_samples(samples("r1", [2.0, 3.0, 4.0], [100.0] * 3))  # acknowledged, journalled
    del agg  # the process dies before the flush
    # An older version journalled a resend with another value for t = 2.
    Journal(tmp_path / "wal").append(samples("r1", [2.0, 5.0], [900.0, 100.0]))
    again = Aggregator.rebuild(store, wal=tmp_path / "wal")
    assert list((tmp_path / "wal").glob("*.parquet")) == []  # nothing set aside
    assert store.samples("r1")["power_w"].to_list() == [100.0] * 6
    assert again.stats()["rejected"] == 1
    assert again.status("r1")["measured_energy_j"] == pytest.approx(500.0)
    assert stored_energy(store, "r1") == pytest.approx(500.0)


def test_keep_stored_skips_and_reports_conflicts_and_writes_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's ``keep_stored`` mode: stored values win, the first of a batch wins, and the
    skipped rows are counted and logged with the first of them."""
    s = Store(tmp_path)
    s.write_samples(samples("r1", [0.0, 1.0], [100.0, 100.0]))
    seen: list[tuple[int, str]] = []
    batch = samples("r1", [1.0, 2.0, 2.0, 3.0], [5.0, 100.0, 7.0, 100.0])
    with caplog.at_level(logging.WARNING, logger="profiler.store"):
        n = s.write_samples(
            batch, conflicts="keep_stored", on_conflict=lambda k, msg: seen.append((k, msg))
        )
    assert n == 2  # t = 2 (first value) and t = 3
    assert s.samples("r1")["power_w"].to_list() == [100.0] * 4
    assert [k for k, _ in seen] == [2]
    assert "comes twice in the batch, first with power_w=100.0" in seen[0][1]
    assert "2 samples not stored" in caplog.text
    # The default still refuses, and leaves the store unchanged.
    with pytest.raises(SchemaError, match="already in the store"):
        s.write_samples(samples("r1", [3.0, 4.0], [1.0, 100.0]))
    assert s.samples("r1").height == 4


# ------------------------------------------------------------- 2: reused run ids


def test_start_run_refuses_the_id_of_an_ended_run(store: Store) -> None:
    """Regression: a finished run's id was accepted again; its record became ``running`` with
    the old end and energy (end before start), and every later restart crashed."""
    agg = Aggregator(store)
    agg.start_run({"run_id": "old", "planned_epochs": 2})
    agg.ingest_samples(samples("old", [0.0, 1.0, 2.0], [100.0] * 3))
    agg.finish_run("old")
    record = store.run("old")
    with pytest.raises(BadInputError, match=r"run 'old' already ended.*'finished'.*another id"):
        agg.start_run({"run_id": "old", "planned_epochs": 3})
    # A new process on the same store refuses it too; the record is unchanged.
    with pytest.raises(BadInputError, match="already ended"):
        Aggregator(store).start_run({"run_id": "old"})
    assert store.run("old") == record
    Aggregator.rebuild(store)  # and restarts work


def test_rebuild_skips_a_run_it_cannot_rebuild_and_restores_the_others(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: one bad running record (a reused id: end before start) made rebuild raise,
    so the aggregator actor restarted forever."""
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    store.write_runs(
        pl.DataFrame(
            [{"run_id": "bad", "status": "finished", "start": t0, "end": t0 + dt.timedelta(1)}]
        )
    )
    # What reusing the id did: a partial update keeps the old end, so end < start.
    store.write_runs(
        pl.DataFrame([{"run_id": "bad", "status": "running", "start": t0 + dt.timedelta(2)}])
    )
    agg = Aggregator(store)
    agg.start_run({"run_id": "good"})
    agg.ingest_samples(samples("good", [0.0, 1.0, 2.0], [100.0] * 3))
    agg.flush()
    with caplog.at_level(logging.ERROR, logger="cluster.aggregator"):
        again = Aggregator.rebuild(store)
    assert again.running() == ["good"]
    assert again.status("good")["measured_energy_j"] == pytest.approx(200.0)
    assert "run bad could not be rebuilt" in caplog.text
    assert "not rebuilt after a restart" in again.status("bad")["projection"]["reason"]
    # Its later samples are still stored, not measured live.
    again.ingest_samples(samples("bad", [0.0, 1.0], [50.0, 50.0]))
    again.flush()
    assert store.samples("bad").height == 2


def test_wattwise_run_refuses_an_ended_run_id_with_exit_status_2(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: ``wattwise run --run-id X`` accepted the id of a finished run.

    Only the connection to a Ray cluster is replaced (the tests start none): the id is
    checked before the runner uses Ray.
    """
    import cluster.runner as runner

    agg = Aggregator(store)
    agg.start_run({"run_id": "old"})
    agg.finish_run("old", "failed")
    monkeypatch.setattr(runner, "connect", lambda address=None: None)
    argv = ["run", "--node-type", "cpu", "--run-id", "old", "--store", str(store.root)]
    assert main([*argv, "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "already has this run as 'failed' (ended at" in err
    assert "Choose another id" in err
    with pytest.raises(BadInputError, match="'failed'"):
        runner.run_job(["true"], node_type="cpu", run_id="old", store_root=store.root)


# ------------------------------------------------------------- 3: readers and compaction


def test_a_reader_during_compactions_never_sees_a_false_corrupt_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a reader that listed a run's files just before a writer compacted them
    opened a removed file and reported it as corrupt ("move it out of the store")."""
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 4)
    writer, reader = Store(tmp_path), Store(tmp_path)
    n = 200
    done = threading.Event()
    errors: list[BaseException] = []
    heights: list[int] = []

    def write() -> None:
        try:
            for i in range(n):
                writer.write_samples(samples("r", [float(i)], [100.0]))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    try:
        while not done.is_set():
            try:
                got = reader.samples("r")
            except StoreError as err:
                errors.append(err)
                continue
            # Every read is whole: a prefix of the batches, in order, without holes.
            assert got["timestamp"].to_list() == [at(i) for i in range(got.height)]
            heights.append(got.height)
    finally:
        t.join()
    assert errors == []
    assert len(heights) > 10
    assert heights == sorted(heights)
    assert reader.samples("r").height == n


def test_a_really_corrupt_file_is_still_reported_as_corrupt(tmp_path: Path) -> None:
    """The retry on a vanished file must not hide a corrupt one."""
    s = Store(tmp_path)
    s.write_samples(samples("r", [0.0, 1.0], [100.0, 100.0]))
    (tmp_path / "samples" / "r" / "part-000000000007.parquet").write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="unreadable.*Move it out of the store"):
        s.samples("r")


# ------------------------------------------------------------- 4, 6: wattwise energy --run


def test_energy_run_applies_the_runs_clock_alignment(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: ``wattwise energy --run`` integrated raw node timestamps, ignoring the
    clock shifts the aggregator applies (here 4,200 J instead of 3,200 J for epoch 0)."""
    agg = Aggregator(store)
    clock = {"home": "a", "marks_node": None, "shift_s": {"b": 5.0}}  # b is 5 s behind
    agg.start_run({"run_id": "r", "planned_epochs": 2, "config": json.dumps({"clock": clock})})
    a_t = [float(t) for t in range(5, 46)]
    b_t = [float(t) for t in range(0, 41)]
    agg.ingest_samples(samples("r", a_t, [100.0 if t < 25 else 300.0 for t in a_t], node="a"))
    agg.ingest_samples(samples("r", b_t, [50.0 if t < 20 else 250.0 for t in b_t], node="b"))
    agg.ingest_epochs(marks("r", [(0, 5.0, 25.0), (1, 25.0, 44.0)]))
    agg.finish_run("r")
    assert main(["energy", "--run", "r", "--store", str(store.root), "--json"]) == 0
    cli = [row["energy_j"] for row in json.loads(capsys.readouterr().out)["rows"]]
    # Epoch 0 on a's clock, by hand: a 19 s at 100 W + (100+300)/2 J; b (t+5) 19 s at
    # 50 W + (50+250)/2 J.
    assert cli[0] == pytest.approx(19 * 100 + 200 + 19 * 50 + 150)
    assert cli == pytest.approx(agg.epochs("r")["energy_j"].to_list())


def test_energy_run_on_samples_without_values_says_so(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: a run whose samples have neither power nor counter crashed the command with
    a TypeError traceback (float(None))."""
    store.write_samples(samples("r", [0.0, 1.0, 2.0], [None, None, None]))
    store.write_runs(pl.DataFrame([{"run_id": "r", "status": "finished"}]))
    for extra in ([], ["--json"]):
        assert main(["energy", "--run", "r", "--store", str(store.root), *extra]) == 2
        err = capsys.readouterr().err
        assert "has 3 samples" in err and "none with power_w or energy_j" in err


# ------------------------------------------------------------- live STEP and gaps


def test_a_mostly_uncovered_epoch_is_left_out_of_the_live_projection(store: Store) -> None:
    """Regression: the aggregator fed STEP an epoch whose samples stopped after 4 of its 20 s
    as if its low energy were measured; now the gap goes with it and STEP leaves it out."""
    # A hole keeps an epoch open until the run's newest sample is max_lag_s past its end.
    agg = Aggregator(store, max_lag_s=10.0)
    agg.start_run({"run_id": "g", "planned_epochs": 10})
    times = [float(t) for t in range(0, 100) if not (64 <= t < 80)]  # epoch 3: 60-80 s
    agg.ingest_epochs(marks("g", [(e, 20.0 * e, 20.0 * e + 20.0) for e in range(5)]))
    agg.ingest_samples(samples("g", times, [100.0] * len(times)))
    ep = agg.epochs("g")
    assert ep.filter(pl.col("epoch") == 3)["gap_s"][0] > 10
    proj = agg.projection("g")
    assert "epoch 3 left out of the stable mean" in proj["reason"]
    # The other epochs hold 2,000 J each: the projection does not drag toward the short one.
    remaining = 10 - ep.height
    assert proj["energy_j"] == pytest.approx(ep["energy_j"].sum() + remaining * 2000.0, rel=0.02)


# ------------------------------------------------------------- samples for closed epochs


def test_a_node_whose_first_batch_comes_after_an_epoch_closed_is_counted_in_it(
    store: Store,
) -> None:
    """Regression: node b's first batch arrived just after node a's had closed epoch 0; b's
    samples of epoch 0 went into the window but not into the finished epoch, so the live
    epoch (and STEP) kept node a's 400 J of 600 J and ``late_samples`` stayed 0."""
    agg = Aggregator(store)
    agg.start_run({"run_id": "mn", "planned_epochs": 10})
    agg.ingest_epochs(marks("mn", [(0, 0.0, 4.0), (1, 4.0, 10.0)]))
    times = [float(t) for t in range(11)]
    agg.ingest_samples(samples("mn", times, [100.0] * 11, node="a"))
    assert agg.epochs("mn")["energy_j"].to_list() == pytest.approx([400.0, 600.0])
    agg.ingest_samples(samples("mn", times, [50.0] * 11, node="b"))
    # Both epochs are recomputed from the store with node b's samples in them.
    assert agg.epochs("mn")["energy_j"].to_list() == pytest.approx([600.0, 900.0])
    assert agg.stats()["recomputed_runs"] == 1
    # STEP was fed again: 1,500 J measured, 150 W (it had 1,000 J at 100 W).
    proj = agg.projection("mn")
    assert (proj["measured_j"], proj["stable_power_w"]) == pytest.approx((1500.0, 150.0))
    # Epoch 2 goes on from the recomputed state: both nodes count in it.
    later = [float(t) for t in range(11, 21)]
    agg.ingest_samples(samples("mn", later, [100.0] * 10, node="a"))
    agg.ingest_samples(samples("mn", later, [50.0] * 10, node="b"))
    agg.ingest_epochs(marks("mn", [(2, 10.0, 16.0)]))
    assert agg.epochs("mn")["energy_j"].to_list() == pytest.approx([600.0, 900.0, 900.0])
    agg.finish_run("mn")
    stored = Aggregator(store).epochs("mn")["energy_j"].to_list()
    assert stored == pytest.approx([600.0, 900.0, 900.0])


def two_node_run(store: Store, **kwargs: object) -> Aggregator:
    """Run ``mn`` with epochs 0-4 s and 4-10 s, both finished on node a's 100 W alone."""
    agg = Aggregator(store, **kwargs)  # type: ignore[arg-type]
    agg.start_run({"run_id": "mn", "planned_epochs": 10})
    agg.ingest_epochs(marks("mn", [(0, 0.0, 4.0), (1, 4.0, 10.0)]))
    agg.ingest_samples(samples("mn", [float(t) for t in range(11)], [100.0] * 11, node="a"))
    assert agg.epochs("mn")["energy_j"].to_list() == pytest.approx([400.0, 600.0])
    return agg


def test_a_node_starting_inside_a_closed_epoch_does_not_unfinish_it(store: Store) -> None:
    """Found in review: after the rebuild, node b's first sample 2 s into epoch 0 looked like
    a hole, so both finished epochs went back to pending and the projection disappeared."""
    agg = two_node_run(store)
    agg.ingest_samples(samples("mn", [float(t) for t in range(2, 11)], [50.0] * 9, node="b"))
    # Node b adds 50 W x 4 s to epoch 0: 2-4 s measured, 0-2 s its first power held (up
    # to the 5 s gap threshold, as estimators.energy does).
    assert agg.epochs("mn")["energy_j"].to_list() == pytest.approx([600.0, 900.0])
    assert agg.status("mn")["epochs_pending"] == 0
    assert agg.projection("mn")["energy_j"] is not None


def test_a_failed_rebuild_keeps_the_live_state_and_ingest_goes_on(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a store read failing during the rebuild left the run empty (and its
    wrong total was stored at the end), and a store outage made every later batch fail."""
    now = [0]
    agg = two_node_run(store, clock=lambda: now[0])
    real = store.samples
    broken = [True]

    def samples_or_fail(run_id: str) -> pl.DataFrame:
        if broken[0]:
            raise StoreError("store unreadable")
        return real(run_id)

    monkeypatch.setattr(store, "samples", samples_or_fail)
    times = [float(t) for t in range(11)]
    agg.ingest_samples(samples("mn", times, [50.0] * 11, node="b"))  # does not raise
    assert agg.epochs("mn")["energy_j"].to_list() == pytest.approx([400.0, 600.0])
    assert agg.status("mn")["devices"] == 2
    agg.ingest_samples(samples("other", [100.0], [10.0], node="z"))  # other runs go on too
    broken[0] = False
    agg.ingest_samples(samples("other", [101.0], [10.0], node="z"))
    assert agg.stats()["recomputed_runs"] == 0  # not before the retry time
    now[0] += 6_000_000
    agg.ingest_samples(samples("other", [102.0], [10.0], node="z"))
    assert agg.epochs("mn")["energy_j"].to_list() == pytest.approx([600.0, 900.0])
    assert agg.stats()["recomputed_runs"] == 1


def test_a_rebuild_keeps_the_counters(store: Store) -> None:
    """Found in review: each rebuild counted the run's epoch marks again, and reset its
    late samples to 0."""
    agg = two_node_run(store, max_lag_s=1.0)
    late = samples("mn", [2.5], [100.0], node="a")
    agg.ingest_samples(late)
    assert agg.status("mn")["late_samples"] == 1
    agg.ingest_samples(samples("mn", [float(t) for t in range(11)], [50.0] * 11, node="b"))
    assert agg.stats()["recomputed_runs"] == 1
    assert agg.stats()["epochs"] == 2
    assert agg.status("mn")["late_samples"] == 1


def test_new_samples_of_a_known_stream_for_a_closed_epoch_count_as_late(store: Store) -> None:
    """Regression: a sample of a known stream arriving after its epoch closed but inside the
    retain window was absorbed silently: the live epoch missed it and ``late_samples`` (and
    the aggregator's ``late`` counter, always 0) did not say so. The final totals are
    recomputed from the store."""
    agg = Aggregator(store, max_lag_s=1.0)
    agg.start_run({"run_id": "lk", "planned_epochs": 2})
    agg.ingest_epochs(marks("lk", [(0, 0.0, 4.0), (1, 4.0, 10.0)]))
    times = [float(t) for t in range(11)]
    power = [100.0] * 11
    power[2] = 300.0
    full = samples("lk", times, power)
    agg.ingest_samples(full.filter(pl.col("timestamp") != at(2)))
    assert agg.status("lk")["epochs_done"] == 2  # closed over the hole after max_lag_s
    agg.ingest_samples(full.filter(pl.col("timestamp") == at(2)))
    assert agg.status("lk")["late_samples"] == 1
    assert agg.stats()["late"] == 1
    agg.finish_run("lk")
    assert Aggregator(store).epochs("lk")["energy_j"].to_list() == pytest.approx([600.0, 600.0])


def test_a_gpu_described_by_its_numbers_gives_step_its_power_cap() -> None:
    """Found in review: a node type described by numbers (the demo's modelled CPUs, an
    inventory spec) had no power cap, so the not-stable band's top was 2 x the largest
    epoch instead of board power x time."""
    from cluster.aggregator import _new_projector

    spec = {"name": "cpu-eco (modelled CPU)", "kind": "cpu", "gpu_board_power_w": 35.0}
    row = {
        "run_id": "s",
        "planned_epochs": 10,
        "gpu_model": "cpu-eco (modelled CPU)",
        "gpu_count": 2,
        "config": json.dumps({"gpu_spec": spec}),
    }
    assert _new_projector(row).power_cap_w == pytest.approx(70.0)
    named = {"run_id": "n", "planned_epochs": 10, "gpu_model": "NVIDIA GeForce RTX 3090"}
    assert _new_projector(named).power_cap_w == pytest.approx(350.0)
    assert _new_projector({"run_id": "u", "planned_epochs": 10}).power_cap_w is None
