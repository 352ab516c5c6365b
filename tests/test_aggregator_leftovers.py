"""Aggregator leftovers from review: overlapping stored marks, clock memory, late devices.

Each test's docstring names the bug it guards against. No Ray: the aggregator
is the plain class, the store a directory under ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
import pytest

from cluster.aggregator import Aggregator, ClockOffsets, align
from conftest import at
from estimators.energy import epoch_energy
from estimators.step import OnlineStep
from profiler.errors import BadInputError
from profiler.store import Store
from tests.test_aggregator import marks, samples


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def seconds(a: int, b: int) -> list[float]:
    """Whole seconds ``a, a + 1, ..., b - 1``."""
    return [float(t) for t in range(a, b)]


def us(t: float) -> int:
    """``at(t)`` as µs since the Unix epoch (the aggregator's clock unit)."""
    return int(at(t).timestamp() * 1_000_000)


# ------------------------------------------------------------- 1: overlapping stored marks

OVERLAP = [(0, 0.0, 10.0), (1, 5.0, 15.0)]  # epoch 1 starts 5 s before epoch 0 ends


def check_ended_despite_overlap(
    store: Store, summary: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    row = store.run("a")
    assert row["status"] == "finished"
    assert row["end"] == at(20.0)
    assert row["duration_s"] == pytest.approx(20.0)
    # First to last sample: 100 W x 20 s, by hand (the marks are not trusted).
    assert row["energy_j"] == pytest.approx(2000.0)
    assert row["trained_epochs"] is None  # unknown while the marks overlap
    warning = str(summary["warning"])
    for text in (
        "run 'a'",
        "epoch 1 (2024-01-01T00:00:05+00:00 to 2024-01-01T00:00:15+00:00)",
        "epoch 0 (2024-01-01T00:00:00+00:00 to 2024-01-01T00:00:10+00:00)",
        "first sample to its last",
        "wattwise energy --run a",
    ):
        assert text in warning
    assert warning in caplog.text
    # Nothing stored was removed: both marks and every sample are still there.
    assert store.epochs("a").select("epoch").to_series().to_list() == [0, 1]
    assert store.samples("a").height == 22


def test_overlapping_marks_written_around_the_aggregator_do_not_keep_a_run_running(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: marks that overlap, written straight to the store (an older tool, an
    import), made every ``finish_run`` raise (``run_total_j`` refuses them): the run stayed
    in memory and its runs row ``running`` forever."""
    agg = Aggregator(store)
    agg.start_run({"run_id": "a", "planned_epochs": 2})
    store.write_epochs(marks("a", OVERLAP))
    agg.ingest_samples(samples("a", seconds(0, 21), [100.0] * 21))
    agg.ingest_samples(samples("a", [2.5], [100.0]))
    with caplog.at_level(logging.WARNING, logger="cluster.aggregator"):
        summary = agg.finish_run("a")
    assert agg.running() == []
    assert summary["status"] == "finished"
    assert summary["measured_energy_j"] == pytest.approx(2000.0)
    check_ended_despite_overlap(store, summary, caplog)


def test_overlapping_marks_replayed_after_a_restart_do_not_keep_a_run_running(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Same bug after a restart: the rebuild replays the stored marks (both epochs finish
    live, 5 s counted twice), and a late sample makes ``finish_run`` recompute from the
    store, where ``epoch_energy`` refused the marks too."""
    first = Aggregator(store)
    first.start_run({"run_id": "a", "planned_epochs": 2})
    first.ingest_samples(samples("a", seconds(0, 21), [100.0] * 21))
    first.flush()
    store.write_epochs(marks("a", OVERLAP))
    agg = Aggregator.rebuild(store, max_lag_s=1.0)
    assert agg.running() == ["a"]
    agg.ingest_samples(samples("a", [2.5], [100.0]))  # before the finished epochs' end
    assert agg.status("a")["late_samples"] == 1
    with caplog.at_level(logging.WARNING, logger="cluster.aggregator"):
        summary = agg.finish_run("a")
    assert agg.running() == []
    check_ended_despite_overlap(store, summary, caplog)


def test_marks_stored_overlapping_do_not_refuse_new_marks_that_overlap_nothing(
    store: Store,
) -> None:
    """Regression: with two stored marks overlapping (written around the aggregator), every
    new mark of the run was refused ("new mark(s): epoch []"), even one overlapping nothing;
    one that overlaps a mark, stored or new, is still refused."""
    agg = Aggregator(store)
    agg.start_run({"run_id": "a", "planned_epochs": 4})
    store.write_epochs(marks("a", OVERLAP))
    agg.ingest_epochs(marks("a", [(2, 20.0, 30.0)]))
    assert store.epochs("a").select("epoch").to_series().to_list() == [0, 1, 2]
    with pytest.raises(BadInputError, match=r"epoch 3 .* starts before epoch 2 .*epoch \[3\]"):
        agg.ingest_epochs(marks("a", [(3, 25.0, 35.0)]))
    with pytest.raises(BadInputError, match=r"epoch 3 .* starts before epoch 1 .*epoch \[3\]"):
        agg.ingest_epochs(marks("a", [(3, 12.0, 18.0)]))
    # Nested inside the mark ending last (epoch 1), not next to it in start order.
    with pytest.raises(BadInputError, match=r"epoch \[3\]"):
        agg.ingest_epochs(marks("a", [(3, 6.0, 7.0)]))
    assert store.epochs("a").select("epoch").to_series().to_list() == [0, 1, 2]


def test_a_run_whose_marks_do_not_overlap_has_no_warning(store: Store) -> None:
    agg = Aggregator(store)
    agg.start_run({"run_id": "a", "planned_epochs": 2})
    agg.ingest_epochs(marks("a", [(0, 0.0, 10.0), (1, 10.0, 20.0)]))
    agg.ingest_samples(samples("a", seconds(0, 21), [100.0] * 21))
    summary = agg.finish_run("a")
    assert "warning" not in summary
    assert store.run("a")["trained_epochs"] == 2


# ------------------------------------------------------------- 2: clock offsets' memory


def test_clock_offsets_keep_at_most_max_nodes_the_most_recent() -> None:
    """Regression: ``ClockOffsets`` kept a deque of 256 observations for every node it had
    ever seen, forever (an autoscaled cluster's pods: one more per pod)."""
    offsets = ClockOffsets(window=8, max_nodes=100)
    for i in range(1000):
        for rep in range(20):  # 20 deliveries each, a second apart
            offsets.observe(f"pod-{i:04d}", 1_000_000 * (20 * i + rep), 0)
    assert offsets.nodes() == [f"pod-{i:04d}" for i in range(900, 1000)]
    assert sum(len(offsets._obs[n]) for n in offsets.nodes()) == 100 * 8


def test_clock_offsets_forget_nodes_not_heard_from_for_an_hour() -> None:
    offsets = ClockOffsets()
    for i in range(600):  # one new node a minute for 10 hours
        offsets.observe(f"pod-{i:03d}", i * 60_000_000, 0)
    # Kept: those heard from in the last hour, 539 .. 599 (599 - 60 = 539 is exactly 1 h).
    assert offsets.nodes() == [f"pod-{i:03d}" for i in range(539, 600)]


def test_a_node_back_after_an_hour_gets_a_fresh_clock_estimate(store: Store) -> None:
    """A node silent for over an hour comes back (a rebooted host, a new pod with the
    same name) with its clock 5 s later: its estimate starts anew (its old minimum would
    have shifted a new run's samples by -3 s instead of +2 s). A node that kept reporting
    keeps its estimate, and a running run's alignment never changes."""
    now = [us(0)]
    agg = Aggregator(store, clock=lambda: now[0])
    home = json.dumps({"clock_home": "a"})

    def deliver(run_id: str | None, node: str, offset_s: float, t: float) -> None:
        """A batch of ``node`` stamped ``t`` on its clock, sent ``offset_s`` before now."""
        batch = samples(run_id, [t], [100.0], node=node)
        agg.ingest_samples(batch, sent_at=at((now[0] - us(0)) / 1e6 - offset_s))

    agg.start_run({"run_id": "r1", "config": home})
    deliver("r1", "a", 0.0, 0.0)
    deliver("r1", "b", -3.0, 3.0)  # b's clock is 3 s ahead: offset -3 s
    deliver(None, "c", -3.0, 3.0)
    for k in range(1, 13):  # two hours: a and b report every 10 minutes, c is silent
        now[0] = us(600.0 * k)
        deliver("r1", "a", 0.0, 600.0 * k)
        deliver("r1", "b", 1.0, 600.0 * k - 1.0)
    offsets = agg.stats()["clock_offset_s"]
    assert offsets == {"a": 0.0, "b": -3.0}  # b's minimum kept; c forgotten
    config = json.loads(store.run("r1")["config"])
    assert config["clock"]["shift_s"] == {"b": -3.0}  # r1's alignment unchanged
    # c comes back with a clock 2 s behind: a new run aligns it on the fresh estimate.
    agg.start_run({"run_id": "r2", "config": home})
    deliver("r2", "a", 0.0, 7200.0)
    deliver("r2", "c", 2.0, 7198.0)
    assert agg.stats()["clock_offset_s"]["c"] == pytest.approx(2.0)
    assert json.loads(store.run("r2")["config"])["clock"]["shift_s"] == {"c": 2.0}
    assert json.loads(store.run("r1")["config"])["clock"]["shift_s"] == {"b": -3.0}


# ------------------------------------------------------------- 3: a device that joins late


def truth(store: Store, run_id: str) -> pl.DataFrame:
    """``wattwise energy --run`` on the store: per-epoch energy of the stored samples."""
    s, m = align(store.samples(run_id), store.epochs(run_id), store.run(run_id))
    return epoch_energy(s, m, gap_threshold_s=5.0).sort("epoch")


def late_device_run(store: Store, first: int) -> Aggregator:
    """Epochs 0-10, 10-20, 20-30 s; device 0 at 100 W from 0 s, device 1 at 50 W from
    ``first`` s, both at 1 Hz, sent in 5 s batches in time order until 65 s."""
    agg = Aggregator(store)  # gap threshold 5 s, max_lag_s 30 s
    agg.start_run({"run_id": "j", "planned_epochs": 3})
    agg.ingest_epochs(marks("j", [(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 20.0, 30.0)]))
    for a in range(0, 65, 5):
        agg.ingest_samples(samples("j", seconds(a, a + 5), [100.0] * 5, device="0"))
        if a + 5 > first:
            times = seconds(max(a, first), a + 5)
            agg.ingest_samples(samples("j", times, [50.0] * len(times), device="1"))
    return agg


@pytest.mark.parametrize(
    ("first", "energy", "gap"),
    [
        # Device 1 from 3 s: its 50 W held back 3 s to epoch 0's start (1,500 J each).
        (3, [1500.0, 1500.0, 1500.0], [0.0, 0.0, 0.0]),
        # From 13 s, after epoch 0 closed on device 0 alone: its 50 W is held back 5 s
        # (the gap threshold), 8-13 s, so 2 s of it (100 J) fall in epoch 0, and 0-8 s are
        # a gap of device 1 there.
        (13, [1100.0, 1500.0, 1500.0], [8.0, 0.0, 0.0]),
        # From 17 s: held back 12-17 s, inside epoch 1 (50 W x 8 s); epoch 0 is all gap
        # for device 1, and 10-12 s of epoch 1.
        (17, [1000.0, 1400.0, 1500.0], [10.0, 2.0, 0.0]),
    ],
)
def test_the_live_epochs_of_a_device_that_joins_late_match_the_stored_ones(
    store: Store, first: int, energy: list[float], gap: list[float]
) -> None:
    """Regression: device 1's first samples (13 s) came after epoch 0 (0-10 s) had closed on
    device 0 alone; ``wattwise energy`` holds device 1's first power back 5 s, 2 s of it
    into epoch 0 (1,100 J), and counts 0-8 s as its gap, while the live epoch and STEP kept
    1,000 J without a gap. Epochs finished before a stream's first sample are now rebuilt
    from the store when it appears (as for a node whose first batch is late)."""
    agg = late_device_run(store, first)
    live = agg.epochs("j")
    assert live["energy_j"].to_list() == pytest.approx(energy)
    assert live["gap_s"].to_list() == pytest.approx(gap)
    agg.flush()
    stored = truth(store, "j")
    assert live["energy_j"].to_list() == pytest.approx(stored["energy_j"].to_list())
    assert live["gap_s"].to_list() == pytest.approx(stored["gap_s"].to_list())
    # The live projection is STEP fed the stored epochs.
    step = OnlineStep(planned_epochs=3)
    for r in stored.iter_rows(named=True):
        want = step.update(r["energy_j"], r["duration_s"], between_j=0.0, gap_s=r["gap_s"])
    proj = agg.projection("j")
    assert (proj["energy_j"], proj["measured_j"]) == pytest.approx((want.energy_j, want.measured_j))
    agg.finish_run("j")
    final = Aggregator(store).epochs("j")
    assert final["energy_j"].to_list() == pytest.approx(energy)
