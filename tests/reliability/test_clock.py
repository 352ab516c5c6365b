"""Two nodes whose clocks are 5 s apart: every sample stored once, epochs aligned on one clock.

Node ``a`` runs 5 s ahead of true time, node ``b`` is right; the hooks run on
``a`` (the run's home node). Batches arrive late, out of order, twice, and
one only after its epoch has finished; the aggregator restarts in between.
Times are faked (clock functions), nothing else is.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from cluster.aggregator import Aggregator
from estimators.energy import epoch_energy
from profiler.errors import BadInputError
from profiler.hooks import EpochHooks
from profiler.sidecar import Sidecar
from profiler.sources.base import PowerSample
from profiler.store import Store

TRUE0 = datetime(2024, 1, 1, tzinfo=UTC)
SKEW_S = {"a": 5.0, "b": 0.0}  # node clock - true time
SECONDS = 40  # samples at true 0..39 s on each node
RUN = "clock-run"


def node_time(node: str, tau: float) -> datetime:
    """What node's clock reads at true time ``tau`` s."""
    return TRUE0 + timedelta(seconds=tau + SKEW_S[node])


def power(node: str, tau: int) -> float:
    """Both nodes step up at true 20 s: a 100 -> 300 W, b 50 -> 250 W."""
    low, high = (100.0, 300.0) if node == "a" else (50.0, 250.0)
    return low if tau < 20 else high


def batch(node: str, taus: list[int], run_id: str | None = RUN) -> pl.DataFrame:
    from profiler.sources.base import samples_frame

    samples = [
        PowerSample("0", None, node_time(node, t), power(node, t), source="replay") for t in taus
    ]
    return samples_frame(samples, node=node, run_id=run_id)


class Network:
    """Deliveries to the aggregator at true receive times (its clock is true time)."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.now_us = 0

    def clock(self) -> int:
        return self.now_us

    def deliver(self, at_tau: float, fn: object, *args: object, **kw: object) -> None:
        self.now_us = int((TRUE0 + timedelta(seconds=at_tau)).timestamp() * 1e6)
        fn(*args, **kw)  # type: ignore[operator]


def test_two_nodes_5_s_apart_are_stored_once_and_aligned(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = Store(tmp_path / "store")
    net = Network(None)  # type: ignore[arg-type]
    opts = {"retain_s": 2.0, "max_lag_s": 5.0, "flush_interval_s": 0.0, "clock": net.clock}
    agg = Aggregator(store, **opts)  # type: ignore[arg-type]
    net.agg = agg
    # Sidecars run before the job: unassigned batches give first offset estimates.
    for node in ("a", "b"):
        for k, latency in enumerate((0.4, 0.02, 0.1)):
            sent = -10.0 + 2 * k
            b = batch(node, [int(sent) - 1], run_id=None)
            net.deliver(sent + latency, agg.ingest_samples, b, sent_at=node_time(node, sent))
    agg.start_run({"run_id": RUN, "planned_epochs": 2, "config": '{"clock_home": "a"}'})
    # The training code on node a marks its epochs with a's clock.
    tau = {"t": 0.0}
    marks: list[pl.DataFrame] = []
    hooks = EpochHooks(RUN, sink=marks.append, clock=lambda: node_time("a", tau["t"]))
    hooks.epoch_start()
    tau["t"] = 20.0
    hooks.epoch_end()
    hooks.epoch_start()
    tau["t"] = 39.0
    hooks.epoch_end()
    # Two-sample batches, sent 0.1 s after their last sample, 0.03-3 s on the way.
    events: list[tuple[float, str, object]] = []
    late = ("b", (10, 11))  # arrives only at the very end
    for node in ("a", "b"):
        for t0 in range(0, SECONDS, 2):
            sent = t0 + 1.1
            latency = 0.03 if t0 == 0 else rng.uniform(0.03, 3.0)
            item = (node, (t0, t0 + 1))
            at = 60.0 if item == late else sent + latency
            events.append((at, "samples", (node, [t0, t0 + 1], sent)))
            if rng.random() < 0.2:  # resent later: a duplicate with a new send time
                events.append((sent + 4.0, "samples", (node, [t0, t0 + 1], sent + 3.9)))
    events.append((20.15, "marks", (marks[0], 20.1)))
    events.append((39.2, "marks", (marks[1], 39.1)))
    events.sort(key=lambda e: e[0])
    restarted = False
    first_stats = None
    for at, kind, payload in events:
        if at > 30.0 and not restarted:  # the aggregator restarts from the store
            first_stats = agg.stats()
            agg.flush()
            agg = Aggregator.rebuild(store, **opts)  # type: ignore[arg-type]
            net.agg = agg
            restarted = True
        if kind == "samples":
            node, taus, sent = payload  # type: ignore[misc]
            net.deliver(at, agg.ingest_samples, batch(node, taus), sent_at=node_time(node, sent))
        else:
            frame, sent = payload  # type: ignore[misc]
            net.deliver(at, agg.ingest_epochs, frame, node="a", sent_at=node_time("a", sent))
    summary = agg.finish_run(RUN)

    # Stored once, with the timestamps the nodes gave them.
    stored = store.samples(RUN)
    assert stored.height == 2 * SECONDS == summary["samples"]
    assert stored.filter(pl.col("node") == "a")["timestamp"].min() == node_time("a", 0)
    assert stored.filter(pl.col("node") == "b")["timestamp"].min() == node_time("b", 0)
    assert summary["late_samples"] > 0  # the withheld batch took the late path
    # Offsets as estimated before the restart: aggregator minus node clock, plus the
    # least one-way delay (0.02 s here).
    assert first_stats is not None
    assert first_stats["clock_offset_s"]["a"] == pytest.approx(-5.0 + 0.02, abs=1e-6)
    assert first_stats["clock_offset_s"]["b"] == pytest.approx(0.02, abs=1e-6)
    # The run is aligned on a's clock: b's samples are shifted by +5 s, and that
    # shift is in the run's config (the restart applied the same one).
    import json

    clock = json.loads(str(store.run(RUN)["config"]))["clock"]
    assert clock["home"] == "a"
    assert clock["shift_s"]["b"] == pytest.approx(5.0, abs=1e-6)
    # By hand, on true time: epoch 0 = a 19x100 + (100+300)/2 and b 19x50 + (50+250)/2
    # = 2100 + 1100 J; epoch 1 = a 19x300 + b 19x250 = 5700 + 4750 J.
    per_epoch = agg.epochs(RUN).sort("epoch")
    assert per_epoch["energy_j"].to_list() == pytest.approx([3200.0, 10450.0], abs=1e-6)
    assert summary["measured_energy_j"] == pytest.approx(3200.0 + 10450.0, abs=1e-6)
    # Without the shift the 5 s skew would move 1000 J between the epochs.
    raw = epoch_energy(stored, store.epochs(RUN))
    assert raw["energy_j"][0] == pytest.approx(3200.0 + 1000.0, abs=1e-6)


def test_the_sidecar_stamps_each_delivery_with_its_own_clock(tmp_path: Path) -> None:
    """A +5 s sidecar clock shows up as a -5 s offset (plus the delay) at the aggregator."""
    store = Store(tmp_path / "store")
    agg = Aggregator(store, flush_interval_s=0.0)
    received: list[datetime] = []

    class Receiver:
        def send_at(self, frame: pl.DataFrame, sent_at: datetime) -> None:
            received.append(sent_at)
            agg.ingest_samples(frame, sent_at=sent_at)

    from profiler.sources.base import utc_now
    from profiler.sources.replay import ReplaySource

    trace = pl.DataFrame(
        {"device": ["0"] * 3, "timestamp": [TRUE0 + timedelta(seconds=i) for i in range(3)],
         "power_w": [1.0, 2.0, 3.0]}
    )  # fmt: skip
    ahead = timedelta(seconds=5)
    side = Sidecar(
        [ReplaySource(trace, speed=1e6, anchor=utc_now() + ahead)],
        node="ahead",
        receiver=Receiver(),
        journal=tmp_path / "j",
        clock=lambda: utc_now() + ahead,
    )
    side.tick()
    side.cut()
    side.tick()  # nothing new: the replay is over
    assert side.ship() and len(received) == 1
    offset = agg.stats()["clock_offset_s"]["ahead"]
    assert -5.0 < offset < -5.0 + 1.0  # the delay here is well under a second
    with pytest.raises(BadInputError, match="sent_at must be timezone-aware UTC; found naive"):
        agg.ingest_samples(batch("a", [0]), sent_at=datetime(2024, 1, 1))  # noqa: DTZ001
