"""Aggregator bugs found in review: epoch marks, streams across an epoch's end, memory.

Each test's docstring names the bug it guards against. No Ray: the aggregator
is the plain class, the store a directory under ``tmp_path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import cluster.aggregator as aggregator_mod
from cluster.aggregator import Aggregator, align
from cluster.cli import main
from conftest import at
from estimators.energy import epoch_energy, run_total_j
from profiler.errors import BadInputError, SchemaError
from profiler.store import Store
from tests.test_aggregator import _http, marks, samples


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def seconds(t: float) -> list[float]:
    return [float(x) for x in range(int(t) + 1)]


def stored_epochs(store: Store, run_id: str) -> list[tuple[int, float, float]]:
    t0 = at(0)
    return [
        (e, (s - t0).total_seconds(), (t - t0).total_seconds())
        for e, s, t in store.epochs(run_id).select("epoch", "start", "end").iter_rows()
    ]


def truth(store: Store, run_id: str) -> pl.DataFrame:
    """``wattwise energy --run`` on the store: per-epoch energy of the stored samples."""
    s, m = align(store.samples(run_id), store.epochs(run_id), store.run(run_id))
    return epoch_energy(s, m, gap_threshold_s=5.0).sort("epoch")


# ------------------------------------------------------------- 1: epoch marks


def test_an_overlapping_mark_is_refused_before_anything_is_written(store: Store) -> None:
    """Regression: epoch 1 (5-15 s) overlapping epoch 0 (0-10 s) was stored and answered
    200, counted 5 s twice live, and then every ``finish_run`` raised (the marks overlap),
    so the run stayed ``running`` in the store forever."""
    from cluster.api import serve

    agg = Aggregator(store)
    agg.start_run({"run_id": "a", "planned_epochs": 2})
    agg.ingest_samples(samples("a", seconds(20), [100.0] * 21))
    agg.ingest_epochs(marks("a", [(0, 0.0, 10.0)]))
    with pytest.raises(BadInputError, match=r"epoch 1 .* starts before epoch 0 .* overlap"):
        agg.ingest_epochs(marks("a", [(1, 5.0, 15.0)]))
    # Two marks of one batch that overlap each other: neither is taken.
    with pytest.raises(BadInputError, match="overlap"):
        agg.ingest_epochs(marks("a", [(1, 10.0, 15.0), (2, 14.0, 20.0)]))
    api = serve(agg)
    try:
        mark = {"run_id": "a", "epoch": 1, "start": at(5).isoformat(), "end": at(15).isoformat()}
        code, ans = _http("POST", api.url + "/epochs", {"epochs": [mark]})
        assert code == 400 and "do not overlap" in ans["error"]
    finally:
        api.close()
    assert stored_epochs(store, "a") == [(0, 0.0, 10.0)]
    assert agg.epochs("a")["energy_j"].to_list() == pytest.approx([1000.0])
    assert agg.stats()["epochs"] == 1
    agg.finish_run("a")
    assert store.run("a")["status"] == "finished"
    assert store.run("a")["energy_j"] == pytest.approx(2000.0)


def test_overlapping_marks_are_refused_without_a_store_too() -> None:
    agg = Aggregator(None)
    agg.start_run({"run_id": "a", "planned_epochs": 2})
    agg.ingest_samples(samples("a", seconds(20), [100.0] * 21))
    agg.ingest_epochs(marks("a", [(0, 0.0, 10.0)]))
    with pytest.raises(BadInputError, match="overlap"):
        agg.ingest_epochs(marks("a", [(1, 5.0, 15.0)]))
    agg.ingest_epochs(marks("a", [(1, 10.0, 15.0)]))
    assert agg.epochs("a")["energy_j"].to_list() == pytest.approx([1000.0, 500.0])


def test_a_mark_for_a_run_that_has_ended_is_refused(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: a mark sent after the run ended was stored over its marks (epoch 1 moved
    to overlap epoch 0), and ``GET /runs/b/epochs`` and ``wattwise energy --run b`` failed
    from then on."""
    agg = Aggregator(store)
    agg.start_run({"run_id": "b", "planned_epochs": 2})
    agg.ingest_samples(samples("b", seconds(20), [100.0] * 21))
    agg.ingest_epochs(marks("b", [(0, 0.0, 10.0), (1, 10.0, 20.0)]))
    agg.finish_run("b")
    with pytest.raises(BadInputError, match=r"run 'b' has ended: .* as 'finished'"):
        agg.ingest_epochs(marks("b", [(1, 5.0, 15.0)]))
    # A new epoch number after the end: refused as well (the run's marks are final).
    with pytest.raises(BadInputError, match="has ended"):
        agg.ingest_epochs(marks("b", [(2, 20.0, 30.0)]))
    # Another aggregator on the same store (a restart) refuses them from the store's record.
    with pytest.raises(BadInputError, match="has ended"):
        Aggregator(store).ingest_epochs(marks("b", [(1, 5.0, 15.0)]))
    assert stored_epochs(store, "b") == [(0, 0.0, 10.0), (1, 10.0, 20.0)]
    assert Aggregator(store).epochs("b")["energy_j"].to_list() == pytest.approx([1000.0] * 2)
    assert main(["energy", "--run", "b", "--store", str(store.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["energy_j"] for r in rows] == pytest.approx([1000.0, 1000.0])


def test_a_mark_sent_again_or_grown_is_taken_and_a_new_start_is_refused(store: Store) -> None:
    """The check must keep what is legitimate: the same mark again (a resend), a mark whose
    end grew (Ray Train's repeated reports of one epoch), a 0 s epoch on another's end."""
    agg = Aggregator(store)
    agg.start_run({"run_id": "g", "planned_epochs": 4})
    agg.ingest_samples(samples("g", seconds(30), [100.0] * 31))
    agg.ingest_epochs(marks("g", [(0, 0.0, 10.0)]))
    agg.ingest_epochs(marks("g", [(0, 0.0, 10.0)]))  # resent: no change
    assert agg.epochs("g")["energy_j"].to_list() == pytest.approx([1000.0])
    agg.ingest_epochs(marks("g", [(0, 0.0, 12.0)]))  # reported again at 12 s: it grew
    assert agg.epochs("g")["energy_j"].to_list() == pytest.approx([1200.0])
    agg.ingest_epochs(marks("g", [(1, 12.0, 20.0), (2, 20.0, 20.0)]))
    with pytest.raises(BadInputError, match=r"epoch 1 is marked already .* same start"):
        agg.ingest_epochs(marks("g", [(1, 13.0, 20.0)]))
    with pytest.raises(BadInputError, match="overlap"):
        agg.ingest_epochs(marks("g", [(0, 0.0, 15.0)]))  # grown into epoch 1
    with pytest.raises(SchemaError, match="end >= start"):
        agg.ingest_epochs(marks("g", [(3, 25.0, 21.0)]))
    assert stored_epochs(store, "g") == [(0, 0.0, 12.0), (1, 12.0, 20.0), (2, 20.0, 20.0)]
    agg.finish_run("g")
    assert store.run("g")["status"] == "finished"
    final = Aggregator(store).epochs("g")["energy_j"].to_list()
    assert final == pytest.approx([1200.0, 800.0, 0.0])


# ------------------------------------------------------------- 2: across an epoch's end


def batch(run_id: str, t0: float, t1: float, silent: tuple[float, float]) -> pl.DataFrame:
    """Device 0 at 100 W and device 1 at 300 W every 0.5 s; device 1 quiet inside ``silent``."""
    ts = [t0 + 0.5 * i for i in range(int((t1 - t0) / 0.5))]
    quiet = [t for t in ts if not silent[0] < t < silent[1]]
    return pl.concat(
        [
            samples(run_id, ts, [100.0] * len(ts), device="0"),
            samples(run_id, quiet, [300.0] * len(quiet), device="1"),
        ]
    )


def test_a_device_silent_across_an_epoch_end_is_corrected_when_it_resumes(
    store: Store,
) -> None:
    """Regression: device 1 fell silent at 15.5 s, epoch 0 (0-20 s) closed 30 s after its
    end with device 1's 300 W held up to the 5 s gap threshold (8,000 J), and device 1's
    next sample (60 s) was neither late nor flagged: the live epoch stayed 8,000 J while
    ``wattwise energy`` gives 6,650 J (15.5-20 s is a gap)."""
    agg = Aggregator(store)  # max_lag_s 30 s, gap threshold 5 s
    agg.start_run({"run_id": "r1", "planned_epochs": 3})
    agg.ingest_epochs(marks("r1", [(0, 0.0, 20.0), (1, 20.0, 80.0)]))
    for t0 in range(0, 90, 10):  # one batch every 10 s, in order, nothing lost
        agg.ingest_samples(batch("r1", t0, t0 + 10, silent=(15.5, 60.0)))
    live = agg.epochs("r1")
    # By hand: 100 W x 20 s + 300 W x 15.5 s; 4.5 s of gap.
    assert live["energy_j"].to_list() == pytest.approx([2000.0 + 4650.0])
    assert live["gap_s"].to_list() == pytest.approx([4.5])
    assert agg.stats()["recomputed_runs"] == 1
    assert agg.status("r1")["late_samples"] == 0
    agg.flush()
    assert live["energy_j"].to_list() == pytest.approx(truth(store, "r1")["energy_j"][:1])
    agg.finish_run("r1")
    final = Aggregator(store).epochs("r1")
    assert final["energy_j"].to_list() == pytest.approx(truth(store, "r1")["energy_j"])
    s, m = align(store.samples("r1"), store.epochs("r1"), store.run("r1"))
    assert store.run("r1")["energy_j"] == pytest.approx(run_total_j(s, m, gap_threshold_s=5.0))


def test_a_hole_an_epoch_closed_over_is_corrected_when_it_is_filled(store: Store) -> None:
    """Found with the review's fuzzer (seed 355): epoch 0 (0-12 s) closed by ``max_lag_s``
    over a hole 11-17 s (a gap: 0 J for 11-12 s); the hole's samples at 12-16 s came next,
    at or after the epoch's end, so nothing was flagged and the live epoch kept 1,100 J for
    1,200 J.

    A run with no pending mark merges new batches when they are next needed: a status
    query (each Prometheus scrape) or the next epoch's check; the rebuild follows with
    the next batch or mark.
    """
    agg = Aggregator(store, max_lag_s=5.0)
    agg.start_run({"run_id": "h", "planned_epochs": 3})
    agg.ingest_epochs(marks("h", [(0, 0.0, 12.0)]))
    agg.ingest_samples(samples("h", [*seconds(11), 17.0, 18.0], [100.0] * 14))
    assert agg.epochs("h")["energy_j"].to_list() == pytest.approx([1100.0])
    agg.ingest_samples(samples("h", [12.0, 13.0, 14.0, 15.0, 16.0], [100.0] * 5))
    agg.status("h")
    agg.ingest_samples(samples("h", [19.0], [100.0]))
    assert agg.epochs("h")["energy_j"].to_list() == pytest.approx([1200.0])
    assert agg.epochs("h")["gap_s"].to_list() == pytest.approx([0.0])
    assert agg.stats()["recomputed_runs"] == 1


def test_a_sample_that_only_changes_the_interpolation_counts_as_late(store: Store) -> None:
    """A device's last sample before the end (9 s) held its power to the end when the epoch
    closed; its next sample (11 s, 2 s later: no gap) makes ``wattwise energy`` interpolate
    instead. Not worth a rebuild: it counts as late and the final epochs are recomputed."""
    agg = Aggregator(store, max_lag_s=1.0)
    agg.start_run({"run_id": "i", "planned_epochs": 3})
    agg.ingest_epochs(marks("i", [(0, 0.0, 10.0)]))
    agg.ingest_samples(samples("i", seconds(9), [100.0] * 10, device="0"))
    agg.ingest_samples(samples("i", seconds(12), [50.0] * 13, device="1"))
    # Device 0 held at 100 W for 9-10 s.
    assert agg.epochs("i")["energy_j"].to_list() == pytest.approx([1000.0 + 500.0])
    agg.ingest_samples(samples("i", [11.0, 12.0], [300.0, 300.0], device="0"))
    assert agg.status("i")["late_samples"] == 1
    agg.finish_run("i")
    # 9-10 s interpolated from 100 W to 300 W (at 11 s): 150 J, by hand.
    final = Aggregator(store).epochs("i")["energy_j"].to_list()
    assert final == pytest.approx([900.0 + 150.0 + 500.0])
    assert final == pytest.approx(truth(store, "i")["energy_j"].to_list())


# ------------------------------------------------------------- 3: memory


def test_nothing_keeps_the_ids_of_runs_that_left_the_summary_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: ``_valid_ids`` kept every run id ever seen (3,000 runs: 3,000 ids after
    the summaries of all but the last 1,024 were dropped)."""
    monkeypatch.setattr(aggregator_mod, "_FINISHED_CACHE", 3)
    agg = Aggregator(None)
    for i in range(10):
        rid = f"run-{i:03d}"
        agg.start_run({"run_id": rid})
        agg.ingest_epochs(marks(rid, [(0, 0.0, 1.0)]))
        agg.ingest_samples(samples(rid, [0.0, 1.0], [1.0, 1.0], node=f"node-{i}"))
        # A node's first batch after epoch 0 closed: the run is reopened (no store to
        # rebuild it from here).
        agg.ingest_samples(samples(rid, [0.5, 1.5], [1.0, 1.0], node=f"late-{i}"))
        agg.finish_run(rid)
    held = [
        name
        for name, value in vars(agg).items()
        if isinstance(value, dict | set) and "run-000" in value
    ]
    assert held == []
    assert [s["run_id"] for s in agg.status()] == ["run-007", "run-008", "run-009"]
    # What the id check was for still holds: a bad run id is refused, never a directory.
    with pytest.raises(SchemaError, match="run_id must match"):
        agg.ingest_samples(samples("../x", [0.0], [1.0]))


def test_the_arrival_lag_of_a_node_gone_for_ten_minutes_is_dropped() -> None:
    """Regression: ``node_lag_s`` (one Prometheus series per node) kept every node ever
    seen with its last value: autoscaled pods piled up series frozen forever."""
    now = [int(at(100).timestamp() * 1e6)]
    agg = Aggregator(None, clock=lambda: now[0])
    agg.ingest_samples(samples("r1", [99.0], [1.0], node="old"))
    assert agg.stats()["node_lag_s"] == {"old": pytest.approx(1.0)}
    now[0] += 9 * 60_000_000
    agg.ingest_samples(samples("r1", [640.0], [1.0], node="new"))
    assert set(agg.stats()["node_lag_s"]) == {"old", "new"}  # 9 min: still listed
    now[0] += 2 * 60_000_000
    assert agg.stats()["node_lag_s"] == {"new": pytest.approx(0.0)}  # as it arrived
    now[0] += 11 * 60_000_000
    agg.ingest_samples(samples("r1", [1300.0], [1.0], node="new2"))
    assert set(agg.node_lag_s) == {"new2"}  # ingest forgets them too, not only stats()


def test_a_run_without_marks_keeps_a_bounded_window_and_its_first_mark_is_exact(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a run with no epoch mark never pruned its window (288,000 rows after
    an hour of 8 GPUs at 10 Hz). Now it keeps 1-2x ``_UNMARKED_KEEP_US`` (here 20 s; 5 min
    in service); a first mark starting before that is computed from the store."""
    monkeypatch.setattr(aggregator_mod, "_UNMARKED_KEEP_US", 20_000_000, raising=False)
    agg = Aggregator(store)
    agg.start_run({"run_id": "u", "planned_epochs": 4})
    for t0 in range(0, 300, 10):
        ts = [t0 + 0.5 * i for i in range(20)]
        agg.ingest_samples(samples("u", ts, [100.0] * 20))
        state = agg._runs["u"]
        held = (state.window.height if state.window is not None else 0) + sum(
            c.height for c in state.chunks
        )
        assert held <= 2 * 20 * 2 + 20 + 1  # 40 s at 2 Hz, a batch, one sample before
    status = agg.status("u")
    assert (status["samples"], status["measured_energy_j"]) == (600, pytest.approx(29_950.0))
    agg.ingest_epochs(marks("u", [(0, 0.0, 250.0)]))  # epoch 0's start is long folded
    assert agg.epochs("u")["energy_j"].to_list() == pytest.approx([25_000.0])
    assert agg.stats()["epochs"] == 1
    agg.ingest_epochs(marks("u", [(1, 250.0, 290.0)]))
    assert agg.epochs("u")["energy_j"].to_list() == pytest.approx([25_000.0, 4_000.0])
    # A sample older than the samples held: late, stored, in the final figures.
    agg.ingest_samples(samples("u", [100.25], [500.0]))
    assert agg.status("u")["late_samples"] == 1
    agg.finish_run("u")
    final = Aggregator(store).epochs("u")["energy_j"].to_list()
    assert final == pytest.approx(truth(store, "u")["energy_j"].to_list())
    # The late 500 W sample adds 400 W x 0.25 s / 2 on each side of it.
    assert final[0] == pytest.approx(25_000.0 + 100.0)
