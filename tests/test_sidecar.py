"""The sidecar and its spill journal: exact counts through outages, bad sources, real time."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from profiler.errors import BadInputError, StoreError
from profiler.journal import Journal
from profiler.sidecar import Sidecar, StoreReceiver
from profiler.sources.base import PowerSample, utc_now
from profiler.sources.replay import ReplaySource, load_trace
from profiler.store import Store

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seaa2023"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


class StepClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def trace(devices: int = 2, seconds: int = 200) -> pl.DataFrame:
    """1 Hz, power of device d at second i is 100 + d + (i % 7) W."""
    rows = [
        (str(d), T0 + timedelta(seconds=i), 100.0 + d + (i % 7))
        for d in range(devices)
        for i in range(seconds)
    ]
    return pl.DataFrame(rows, schema=["device", "timestamp", "power_w"], orient="row")


class FlakyStore:
    """A store receiver that can be switched off; records the batches it accepted."""

    def __init__(self, root: Path) -> None:
        self.inner = StoreReceiver(Store(root))
        self.down = False
        self.accepted: list[pl.DataFrame] = []

    def send(self, batch: pl.DataFrame) -> None:
        if self.down:
            raise ConnectionError("aggregator unreachable")
        self.inner.send(batch)
        self.accepted.append(batch)


def stepper(tmp_path: Path, **kw: object) -> tuple[Sidecar, StepClock, FlakyStore]:
    clock = StepClock()
    src = ReplaySource(trace(), clock=clock, speed=1.0)
    recv = FlakyStore(tmp_path / "store")
    side = Sidecar(
        [src], node="n1", run_id="r-1", receiver=recv, journal=tmp_path / "journal", **kw
    )  # type: ignore[arg-type]
    return side, clock, recv


def ticks(side: Sidecar, clock: StepClock, n: int) -> None:
    for _ in range(n):
        side.tick()
        clock.t += 1.0


def test_spill_and_resend_with_an_interrupted_receiver(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    side, clock, recv = stepper(tmp_path)
    ticks(side, clock, 10)  # 2 devices x 10 ticks = 20 samples
    assert side.cut() == 20 and side.ship()
    recv.down = True
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # three batches of 8 during the outage
            ticks(side, clock, 4)
            side.cut()
            assert side.ship() is False
    assert [w.getMessage().count("refused batch") for w in caplog.records] == [1]  # once
    assert side.stats.spilled == 24 and side.stats.sent == 20
    assert len(side.journal) == 3 and side.pending_rows == 24
    ticks(side, clock, 5)  # 10 more samples while still down...
    side.cut()  # ...go straight to the journal
    assert side.stats.spilled == 34
    recv.down = False
    assert side.ship()
    s = side.stats
    assert (s.samples, s.sent, s.spilled, s.lost) == (54, 54, 34, 0)
    assert side.pending_rows == 0 and list((tmp_path / "journal").iterdir()) == []
    stored = Store(tmp_path / "store").samples("r-1")
    assert stored.height == 54
    assert stored.select("device", "timestamp").is_unique().all()
    # Batches arrived in the order they were cut.
    firsts = [b["timestamp"].min() for b in recv.accepted]
    assert firsts == sorted(firsts) and len(recv.accepted) == 5


def test_memory_is_bounded_and_order_kept_across_memory_and_journal(tmp_path: Path) -> None:
    side, clock, recv = stepper(tmp_path, max_memory_rows=10)
    for _ in range(5):  # five batches of 4 rows, nothing shipped yet
        ticks(side, clock, 2)
        side.cut()
    # 4 + 4 fit in memory (8 <= 10), the next three go to disk.
    assert len(side._queue) == 2 and len(side.journal) == 3
    assert side.stats.spilled == 12
    assert side.ship()
    assert [b.height for b in recv.accepted] == [4] * 5
    firsts = [b["timestamp"].min() for b in recv.accepted]
    assert firsts == sorted(firsts)
    assert side.stats.sent == 20


def test_journal_left_by_a_dead_sidecar_is_resent_by_the_next(tmp_path: Path) -> None:
    side, clock, recv = stepper(tmp_path)
    recv.down = True
    ticks(side, clock, 6)
    side.cut()
    side.ship()
    ticks(side, clock, 3)
    side.stop()  # cuts and tries once more: still down, so both batches stay on disk
    assert len(Journal(tmp_path / "journal")) == 2
    assert Journal(tmp_path / "journal").rows == 18
    # A new process: the journal directory is all it has.
    recv2 = FlakyStore(tmp_path / "store")
    src = ReplaySource(trace(), clock=StepClock())
    side2 = Sidecar([src], node="n1", receiver=recv2, journal=tmp_path / "journal")
    assert side2.ship()
    assert side2.stats.sent == 18
    # Resending a batch a second time (a crash between send and delete) stores nothing new.
    again = recv2.accepted[0]
    assert Store(tmp_path / "store").write_samples(again) == 0
    assert Store(tmp_path / "store").samples("r-1").height == 18


def _to_store(root: Path, run: str, clock: StepClock, journal: Path) -> Sidecar:
    """A sidecar writing run ``run`` to the store at ``root`` through ``journal``."""
    src = ReplaySource(trace(), clock=clock, speed=1.0)
    recv = StoreReceiver(Store(root))
    return Sidecar([src], node="n1", run_id=run, receiver=recv, journal=journal)


def test_batches_spilled_for_one_store_are_never_delivered_to_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: ``wattwise sample --store A`` spilled to the node's default journal while A
    could not be written; the next ``sample --store B`` on the node wrote them into B."""
    journal = tmp_path / "journal"
    a, b = tmp_path / "A", tmp_path / "B"
    for root in (a, b):
        (root / ".lock").mkdir(parents=True)  # the lock cannot be opened: no write works
    clock = StepClock()
    side_a = _to_store(a, "jA", clock, journal)
    ticks(side_a, clock, 4)
    side_a.stop()  # store A is down: its 8 samples wait in the journal
    assert side_a.stats.spilled == 8 and Journal(journal).rows == 8
    # B is down too: its sidecar leaves A's batches alone and spills to a journal of its own.
    clock = StepClock()
    with caplog.at_level(logging.WARNING):
        side_b = _to_store(b, "jB", clock, journal)
    said = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(said) == 1 and f"store {a}" in said[0] and f"store {b}" in said[0]
    assert side_b.journal.directory.parent == journal
    ticks(side_b, clock, 3)
    side_b.stop()
    assert side_b.stats.spilled == 6 and side_b.stats.sent == 0
    assert Journal(journal).rows == 8  # A's batches, untouched
    (b / ".lock").rmdir()
    side_b = _to_store(b, "jB", StepClock(), journal)  # B is back: only its own 6 go there
    assert side_b.ship() and side_b.stats.sent == 6
    assert Store(b).samples().get_column("run_id").unique().to_list() == ["jB"]
    assert Journal(journal).rows == 8
    (a / ".lock").rmdir()
    side_a = _to_store(a, "jA", StepClock(), journal)  # A is back: its 8 go there
    assert side_a.ship() and side_a.stats.sent == 8
    assert Store(a).samples().get_column("run_id").unique().to_list() == ["jA"]
    assert Store(a).samples("jA").height == 8 and Store(b).samples("jB").height == 6
    # Nothing waits any more: no record is left, the directory is free for any store.
    assert not [p for p in journal.rglob("*") if p.is_file()]


def test_two_journals_opened_together_on_one_directory_keep_their_batches_apart(
    tmp_path: Path,
) -> None:
    """Two sidecars of one node (stores A and B) open the empty default journal at once: the
    second to spill moves to a directory of its own instead of mixing its batches in."""
    df = pl.DataFrame({"x": [1, 2, 3]})
    ja, jb = (Journal(tmp_path, destination=d) for d in ("store /a", "store /b"))
    assert ja.directory == jb.directory == tmp_path
    ja.append(df, seq=1)
    jb.append(df.head(2), seq=1)
    assert jb.directory.parent == tmp_path and jb.directory != tmp_path
    assert (ja.rows, jb.rows) == (3, 2)
    assert (tmp_path / "destination.txt").read_text() == "store /a\n"
    again = Journal(tmp_path, destination="store /b")  # a restart finds B's own batches
    assert again.directory == jb.directory and again.rows == 2
    assert Journal(tmp_path, destination="store /a").rows == 3
    again.remove(1)
    assert not (jb.directory / "destination.txt").exists()  # nothing waits: no record


def test_full_journal_counts_lost_rows(tmp_path: Path) -> None:
    clock = StepClock()
    recv = FlakyStore(tmp_path / "store")
    recv.down = True
    side = Sidecar(
        [ReplaySource(trace(), clock=clock)],
        node="n",
        receiver=recv,
        journal=Journal(tmp_path / "j", max_rows=10),
    )
    for _ in range(3):
        ticks(side, clock, 3)  # 6 rows a batch
        side.cut()
        side.ship()
    # The journal took one batch; the two it refused wait in memory (there is room).
    assert (side.stats.spilled, side.stats.lost, side.pending_rows) == (6, 0, 18)


def test_journal_files_are_ordered_and_atomic(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    df = pl.DataFrame({"x": [1, 2]})
    assert j.append(df) == 1 and j.append(df, seq=5) == 5 and j.append(df) == 6
    assert j.append(df, seq=3) == 3
    assert [s for s, _ in j.pending()] == [1, 3, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "batch-000000000001.parquet"
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(StoreError, match="batch number 5 is already waiting"):
        j.append(df, seq=5)
    assert Journal(tmp_path).rows == 8  # a new process sees what is there


class Broken:
    """A source that raises on its second and third reads."""

    name = "nvml"

    def __init__(self) -> None:
        self.n = 0

    def read(self) -> list[PowerSample]:
        self.n += 1
        if self.n in (2, 3):
            raise OSError("GPU fell off the bus")
        return [PowerSample("0", "X", utc_now(), 50.0, source="nvml")]

    def close(self) -> None:
        pass


class Hangs:
    """A source whose second read hangs until released."""

    name = "rapl"

    def __init__(self) -> None:
        self.n = 0
        self.release = threading.Event()

    def read(self) -> list[PowerSample]:
        self.n += 1
        if self.n == 2:
            self.release.wait(10)
        return [PowerSample("package-0", None, utc_now(), 30.0, source="rapl")]

    def close(self) -> None:
        self.release.set()


class Nonsense:
    name = "dcgm"

    def read(self) -> list[PowerSample]:
        return [PowerSample("0", None, utc_now(), -3.0, source="dcgm")]

    def close(self) -> None:
        pass


def test_bad_sources_are_marked_and_others_continue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = StepClock()
    good = ReplaySource(trace(devices=1), clock=clock)
    broken, hangs = Broken(), Hangs()
    got: list[pl.DataFrame] = []
    side = Sidecar(
        [good, broken, hangs, Nonsense()],
        node="n",
        receiver=got.append,
        journal=tmp_path / "j",
        interval_s=0.1,
        read_timeout_s=0.05,
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            side.tick()
            clock.t += 1.0
        hangs.release.set()
        time.sleep(0.05)
        side.tick()
    side.cut()
    side.ship()
    df = pl.concat(got)
    by = {s: df.filter(pl.col("source") == s) for s in ("replay", "nvml", "rapl", "dcgm")}
    assert by["replay"]["power_w"].to_list() == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert by["nvml"]["power_w"].to_list() == [50.0, None, None, 50.0, 50.0]
    # Hung from tick 2 to tick 4: marked three times, fine again on tick 5, where the hung
    # read's own sample (it returned late) is kept as well as the new read's.
    assert by["rapl"]["power_w"].to_list() == [30.0, None, None, None, 30.0, 30.0]
    assert by["dcgm"]["power_w"].to_list() == [None] * 5
    assert side.stats.bad_reads == 3  # two errors and one timeout (the hang is one read)
    assert side.stats.marked == 2 + 3 + 5
    text = caplog.text
    assert text.count("GPU fell off the bus") == 1
    assert text.count("did not return within 0.05 s") == 1
    assert text.count("expected a finite power >= 0 W; got -3.0") == 1
    side.close()


class SlowButFine:
    """Every read takes a little longer than the sidecar's read timeout (a slow Prometheus)."""

    name = "dcgm"

    def __init__(self) -> None:
        self.returned: list[datetime] = []

    def read(self) -> list[PowerSample]:
        ts = utc_now()
        time.sleep(0.15)
        self.returned.append(ts)
        return [PowerSample("GPU-1", "H100", ts, 300.0, source="dcgm")]

    def close(self) -> None:
        pass


def test_reads_that_return_late_are_kept(tmp_path: Path) -> None:
    src = SlowButFine()
    got: list[pl.DataFrame] = []
    side = Sidecar(
        [src],
        node="n",
        run_id="r",
        receiver=got.append,
        journal=tmp_path / "j",
        interval_s=0.1,
        read_timeout_s=0.1,
    )
    for _ in range(8):
        side.tick()
        time.sleep(0.1)
    side.close()  # a last read of the source; any read still out is collected or marked
    df = pl.concat(got)
    real = df.filter(pl.col("power_w").is_not_null())
    # Every reading the source returned is shipped once, none dropped for being late.
    assert sorted(real["timestamp"].to_list()) == sorted(src.returned)
    assert len(src.returned) >= 4
    # The ticks it missed are marked (null power), not left out.
    assert df.filter(pl.col("power_w").is_null()).height >= 1


def test_interval_is_checked() -> None:
    with pytest.raises(BadInputError, match=r"between 0.1 s and 3600 s; found 0.01 s"):
        Sidecar([Nonsense()], interval_s=0.01)


@pytest.mark.shared_data
def test_realtime_replay_at_100x_into_the_store_keeps_energy(tmp_path: Path) -> None:
    """Threads and real time: 3 runs x 300 s of the shared traces at 100x, 10 Hz ticks."""
    from estimators.energy import run_energy

    traces = SHARED / "traces.parquet"
    if not traces.is_file():
        pytest.skip(f"shared dataset absent: {traces}")
    runs = ["cloud-vgg16-00", "local-v2-nasnet_mobile-17", "cloud-mobilenet_v2-00"]
    full = load_trace(traces, run_ids=runs)
    part = full.filter(
        pl.col("timestamp") < pl.col("timestamp").min().over("device") + timedelta(seconds=300)
    )
    src = ReplaySource(part, speed=100.0)
    store = Store(tmp_path / "store")
    side = Sidecar(
        [src],
        node="n",
        run_id="replay-1",
        interval_s=0.1,
        batch_interval_s=0.5,
        receiver=StoreReceiver(store),
        journal=tmp_path / "j",
    )
    t = time.monotonic()
    side.start()
    while not src.exhausted and time.monotonic() - t < 10:
        time.sleep(0.05)
    stats = side.stop()
    wall = time.monotonic() - t
    assert src.exhausted and wall < 6
    assert stats.sent == part.height == stats.samples and stats.lost == 0
    assert stats.ticks >= 0.9 * (wall - 0.2) / 0.1  # no drift, no stalls
    got = store.samples("replay-1").with_columns(run_id=pl.col("device"))
    want = part.with_columns(run_id=pl.col("device"), node=pl.lit("n"), source=pl.lit("replay"))
    e_got, e_want = run_energy(got).sort("run_id"), run_energy(want).sort("run_id")
    assert e_got.height == 3
    for a, b in zip(e_got["energy_j"], e_want["energy_j"], strict=True):
        assert a == pytest.approx(b, rel=1e-3)


def test_a_corrupt_journal_batch_is_set_aside_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    side, clock, recv = stepper(tmp_path)
    recv.down = True
    for _ in range(3):  # three batches of 6 rows go to the journal
        ticks(side, clock, 3)
        side.cut()
        side.ship()
    first = side.journal.pending()[0][1]
    first.write_bytes(first.read_bytes()[:50])  # torn by a disk error
    recv.down = False
    with caplog.at_level(logging.WARNING):
        assert side.ship()  # the other batches go; nothing raises
        ticks(side, clock, 2)
        side.cut()
        assert side.ship()
    assert side.stats.sent == 12 + 4 and side.stats.rejected_batches == 1
    assert side.stats.rejected_rows == 6  # the journal counted them when it spilled them
    assert side._outage is False and len(side.journal) == 0
    # The file is kept beside the journal, out of the resend order, and named once in the log.
    kept = tmp_path / "journal" / f"rejected-{first.name}"
    assert kept.is_file() and not first.exists()
    said = [r.getMessage() for r in caplog.records if first.name in r.getMessage()]
    assert len(said) == 1 and "unreadable" in said[0] and "6 samples" in said[0]
    assert Journal(tmp_path / "journal").pending() == []
    side.close()  # does not raise


def test_a_corrupt_batch_left_by_a_dead_sidecar_does_not_stop_stop(tmp_path: Path) -> None:
    side, clock, recv = stepper(tmp_path)
    recv.down = True
    ticks(side, clock, 4)
    side.cut()
    side.ship()
    side.stop()
    path = side.journal.pending()[0][1]
    path.write_bytes(b"PAR1 not really")
    recv2 = FlakyStore(tmp_path / "store")
    side2 = Sidecar(
        [ReplaySource(trace(), clock=StepClock())],
        node="n1",
        receiver=recv2,
        journal=tmp_path / "journal",
    )
    side2.stop()  # no raise: the unreadable batch is set aside, its size unknown
    assert side2.stats.rejected_batches == 1 and side2.stats.rejected_rows == 0
    assert (tmp_path / "journal" / f"rejected-{path.name}").is_file()


def test_a_send_failure_with_a_journal_that_takes_nothing_does_not_stick(
    tmp_path: Path,
) -> None:
    clock = StepClock()
    recv = FlakyStore(tmp_path / "store")
    side = Sidecar(
        [ReplaySource(trace(), clock=clock)],
        node="n",
        receiver=recv,
        journal=Journal(tmp_path / "j", max_rows=0),  # full disk: the journal takes nothing
    )
    ticks(side, clock, 5)
    side.cut()
    assert side.ship()
    recv.down = True  # a short blip: one refused batch
    ticks(side, clock, 5)
    side.cut()
    assert side.ship() is False
    assert side.stats.lost == 0 and side.pending_rows == 10  # kept in memory, not dropped
    recv.down = False
    for _ in range(4):
        ticks(side, clock, 5)
        side.cut()
        assert side.ship()
    s = side.stats
    assert (s.samples, s.sent, s.lost, side._outage) == (60, 60, 0, False)
    firsts = [b["timestamp"].min() for b in recv.accepted]
    assert firsts == sorted(firsts)


def test_when_memory_and_journal_are_both_full_rows_are_counted_lost(tmp_path: Path) -> None:
    clock = StepClock()
    recv = FlakyStore(tmp_path / "store")
    recv.down = True
    side = Sidecar(
        [ReplaySource(trace(), clock=clock)],
        node="n",
        receiver=recv,
        journal=Journal(tmp_path / "j", max_rows=0),
        max_memory_rows=10,
    )
    for _ in range(3):
        ticks(side, clock, 2)  # 4 rows a batch
        side.cut()
        side.ship()
    assert (side.stats.lost, side.pending_rows) == (4, 8)
    recv.down = False
    assert side.ship() and side.stats.sent == 8


def _seconds(frames: list[pl.DataFrame], anchor: datetime, run: str | None) -> list[int]:
    df = pl.concat(frames).filter(
        pl.col("run_id").is_null() if run is None else pl.col("run_id") == run
    )
    return sorted(int((t - anchor).total_seconds()) for t in df["timestamp"])


def test_samples_go_to_the_run_that_held_the_device_when_they_were_taken(
    tmp_path: Path,
) -> None:
    """Reads every 5 s return 1 Hz samples stamped before the read; attach at 7 s, detach at 17."""
    clock = StepClock()
    src = ReplaySource(trace(devices=1), clock=clock, speed=1.0)
    frames: list[pl.DataFrame] = []
    side = Sidecar(
        [src],
        node="n1",
        receiver=frames.append,
        journal=tmp_path / "j",
        interval_s=5,
        clock=lambda: src.anchor + timedelta(seconds=clock.t),  # the sources' time line
    )

    def tick_at(t: float) -> None:
        clock.t = t
        side.tick()

    tick_at(0)
    tick_at(5)
    clock.t = 7.0
    side.attach("r-A", ["0"])
    tick_at(10)
    tick_at(15)
    clock.t = 17.0
    assert side.detach("r-A") == 0  # no source of its own; the device is read once more
    side.cut()
    side.ship()
    # The final read at detach delivered the run's last samples (16, 17) at once.
    assert _seconds(frames, src.anchor, "r-A") == list(range(8, 18))
    tick_at(20)
    tick_at(25)
    side.cut()
    side.ship()
    assert _seconds(frames, src.anchor, "r-A") == list(range(8, 18))  # (7, 17]
    assert _seconds(frames, src.anchor, None) == [*range(0, 8), *range(18, 26)]
    assert side.owners() == {"*": None} and side._dev_hist == {}  # history pruned


def test_a_node_shared_by_runs_goes_back_to_the_one_still_running(tmp_path: Path) -> None:
    clock = StepClock()
    frames: list[pl.DataFrame] = []
    side = Sidecar(
        [ReplaySource(trace(devices=1), clock=clock)],
        node="n1",
        run_id="base",
        receiver=frames.append,
        journal=tmp_path / "j",
    )
    ticks(side, clock, 2)
    assert side.attach_job("r-A") == {"mode": "node"}
    ticks(side, clock, 2)
    assert side.attach_job("r-B") == {"mode": "node"}
    ticks(side, clock, 2)
    side.detach("r-B")  # B ends; A still runs on the node
    assert side.run_id == "r-A" and side.node_runs == ["base", "r-A", "r-B"][:2]
    ticks(side, clock, 2)
    side.detach("r-A")
    ticks(side, clock, 2)
    side.cut()
    side.ship()
    got = pl.concat(frames).sort("timestamp")["run_id"].to_list()
    assert got == ["base"] * 2 + ["r-A"] * 2 + ["r-B"] * 2 + ["r-A"] * 2 + ["base"] * 2
    assert side.owners() == {"*": "base"} and side.node_runs == ["base"]


def test_a_restarted_sidecar_actor_keeps_the_order_of_runs_sharing_its_node(
    tmp_path: Path,
) -> None:
    """No Ray: the actor's class runs here, with the aggregator's answers given."""
    from cluster.actors import _SidecarActorImpl

    class Actor(_SidecarActorImpl):
        @staticmethod
        def _still_running(run_id: str) -> bool | None:
            return True  # the aggregator says every run still runs

    got: list[pl.DataFrame] = []

    def actor() -> _SidecarActorImpl:
        a = Actor(
            "n1",
            [("replay", {"trace": trace(devices=1)})],  # sources that cannot tell runs apart
            batch_interval_s=60.0,
            journal_dir=str(tmp_path / "journal"),
        )
        a.sidecar.receiver = got.append  # type: ignore[assignment]  # no aggregator here
        return a

    first = actor()
    try:
        for rid in ("r-A", "r-B", "r-A"):  # A attached again (a retried call): A holds it
            assert first.attach_job(rid) == {"mode": "node"}
        assert first.owners()["*"] == "r-A"
    finally:
        first.stop()
    second = actor()  # the actor restarted: the same runs, in the same order
    try:
        assert second.sidecar.node_runs == ["r-B", "r-A"] and second.owners()["*"] == "r-A"
        second.detach("r-A")
        assert second.owners()["*"] == "r-B"  # B still runs: the node goes back to it
    finally:
        second.stop()


class ClosedRuns(FlakyStore):
    """A store receiver that refuses batches of closed runs as bad input (a permanent no)."""

    def __init__(self, root: Path, closed: set[str]) -> None:
        super().__init__(root)
        self.closed = closed

    def send(self, batch: pl.DataFrame) -> None:
        runs = set(batch["run_id"].drop_nulls().to_list())
        if not self.down and runs & self.closed:
            raise BadInputError(
                f"samples of run(s) {sorted(runs & self.closed)}, which are closed; expected "
                "samples of open runs"
            )
        super().send(batch)


@pytest.mark.parametrize("refusal", ["conflict", "closed run"])
@pytest.mark.parametrize("spilled", [False, True])
def test_a_batch_the_receiver_refuses_as_bad_input_is_set_aside_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refusal: str, spilled: bool
) -> None:
    """Regression: a SchemaError (a conflict with a stored sample) was taken for an outage
    and the batch retried for ever, holding back every later batch."""
    clock = StepClock()
    recv = (
        FlakyStore(tmp_path / "store")
        if refusal == "conflict"
        else ClosedRuns(tmp_path / "store", {"r-1"})
    )
    side = Sidecar(
        [ReplaySource(trace(), clock=clock, speed=1.0)],
        node="n1",
        run_id="r-1",
        receiver=recv,
        journal=tmp_path / "journal",
    )
    recv.down = spilled
    ticks(side, clock, 3)
    assert side.cut() == 6
    first = side._queue[0].frame if side._queue else side.journal.read(side.journal.pending()[0][1])
    assert first is not None
    if refusal == "conflict":  # another writer stored another value of its first sample
        Store(tmp_path / "store").write_samples(first.head(1).with_columns(power_w=pl.lit(1.0)))
    assert side.ship() is not spilled  # spilled: the receiver is down, the batch waits on disk
    assert len(side.journal) == int(spilled)
    recv.down = False
    side.set_run("r-2")
    ticks(side, clock, 2)
    side.cut()
    with caplog.at_level(logging.WARNING):
        assert side.ship()  # batch 1 set aside, batch 2 delivered
    st = side.stats
    assert (st.sent, st.batches_sent, st.rejected_batches, st.rejected_rows) == (4, 1, 1, 6)
    assert st.lost == 0 and len(side.journal) == 0 and side._outage is False
    kept = tmp_path / "journal" / "rejected-batch-000000000001.parquet"
    assert pl.read_parquet(kept).equals(first)
    # Why it was set aside is kept next to it, not only in the log.
    why = (tmp_path / "journal" / "rejected-batch-000000000001.reason.txt").read_text()
    assert "refused batch 1 as bad input" in why and "rows: 6" in why
    said = [
        r.getMessage() for r in caplog.records if "refused batch 1 as bad input" in r.getMessage()
    ]
    reason = "is already in the store" if refusal == "conflict" else "which are closed"
    assert len(said) == 1 and reason in said[0] and str(kept) in said[0] and "6 samples" in said[0]
    stored = Store(tmp_path / "store").samples()
    assert stored.filter(pl.col("run_id") == "r-2").height == 4
    assert stored.filter(pl.col("run_id") == "r-1").height == int(refusal == "conflict")
    assert Journal(tmp_path / "journal").pending() == []


def test_a_batch_set_aside_after_a_restart_keeps_the_earlier_one(tmp_path: Path) -> None:
    """Batch numbers start again at 1 after a restart with an empty journal: the second
    refused batch 1 must not overwrite the first one set aside."""
    kept: list[pl.DataFrame | None] = []
    for _ in range(2):
        clock = StepClock()
        side = Sidecar(
            [ReplaySource(trace(), clock=clock, speed=1.0)],
            node="n1",
            run_id="r-1",
            receiver=ClosedRuns(tmp_path / "store", {"r-1"}),
            journal=tmp_path / "journal",
        )
        ticks(side, clock, 2)
        side.cut()
        kept.append(side._queue[0].frame)
        assert side.ship() and side.stats.rejected_batches == 1
        side.close()
    journal = tmp_path / "journal"
    assert sorted(p.name for p in journal.glob("rejected-*")) == [
        "rejected-batch-000000000001-1.parquet",
        "rejected-batch-000000000001-1.reason.txt",
        "rejected-batch-000000000001.parquet",
        "rejected-batch-000000000001.reason.txt",
    ]
    assert pl.read_parquet(journal / "rejected-batch-000000000001.parquet").equals(kept[0])
    assert pl.read_parquet(journal / "rejected-batch-000000000001-1.parquet").equals(kept[1])
