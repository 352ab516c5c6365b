"""Store integrity: writers killed mid-write, two writers at once, a full disk.

Every writer here is a real separate process (``python -c``) killed with
SIGKILL, so nothing in this process can tidy up after it; the checks then read
the store as a new process would.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from profiler import store as store_mod
from profiler.errors import StoreError
from profiler.store import Store

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 1, 1, tzinfo=UTC)
ROWS = 40  # samples per batch: batch i holds seconds [i * ROWS, (i + 1) * ROWS)

#: A writer process: writes batches FIRST..LAST-1 of run RUN, printing each index once the
#: write returned (acknowledged). PAUSE = "before-part:N" stops inside the N-th rename of a
#: part file (temporary written and fsynced, not yet renamed); "after-base:N" stops right
#: after the N-th compaction base is renamed in, before the parts it replaces are removed.
#: GO (a path) makes it wait for that file first, so two writers start together.
WRITER = r"""
import os, sys, time
from datetime import UTC, datetime, timedelta
import polars as pl
from profiler import store as sm

root, run, first, last, rows, compact, pause, go, step, runs_prefix = sys.argv[1:11]
first, last, rows, compact, step = int(first), int(last), int(rows), int(compact), int(step)
sm.COMPACT_AFTER = compact
T0 = datetime(2024, 1, 1, tzinfo=UTC)

if pause != "-":
    kind, n = pause.split(":")
    n = int(n)
    seen = {"count": 0}
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        name = os.path.basename(str(dst))
        if kind == "before-part" and name.startswith("part-"):
            seen["count"] += 1
            if seen["count"] == n:
                print("PAUSED", flush=True)
                time.sleep(3600)
        real_replace(src, dst, *a, **k)
        if kind == "after-base" and name.startswith("base-"):
            seen["count"] += 1
            if seen["count"] == n:
                print("PAUSED", flush=True)
                time.sleep(3600)

    os.replace = replace

if go != "-":
    while not os.path.exists(go):
        time.sleep(0.005)

store = sm.Store(root)
for i in range(first, last, step):
    # Batch i covers seconds [i*rows, i*rows + 2*rows): consecutive batches overlap by half.
    span = 2 * rows if runs_prefix != "-" else rows
    t = [T0 + timedelta(seconds=i * rows + k) for k in range(span)]
    store.write_samples(
        pl.DataFrame(
            {
                "run_id": run,
                "node": "n1",
                "device": "0",
                "timestamp": t,
                "power_w": [float(i * rows + k) for k in range(span)],
                "source": "replay",
            }
        )
    )
    if runs_prefix != "-":
        store.write_runs(pl.DataFrame({"run_id": [f"{runs_prefix}-{i}"], "status": ["running"]}))
    print(i, flush=True)
print("DONE", flush=True)
"""


def _start(
    root: Path,
    *,
    first: int = 0,
    last: int = 100_000,
    run: str = "r1",
    compact: int = 8,
    pause: str = "-",
    go: Path | None = None,
    step: int = 1,
    runs_prefix: str = "-",
) -> subprocess.Popen[str]:
    args = [root, run, first, last, ROWS, compact, pause, go or "-", step, runs_prefix]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], stop: object, timeout_s: float = 60.0) -> list[int]:
    """Batch indices ``proc`` acknowledged, read until it prints ``stop`` (a line or a count)."""
    assert proc.stdout is not None
    acked: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if not line:
            proc.poll()
            raise AssertionError(f"writer ended early: {proc.stderr.read() if proc.stderr else ''}")
        if line == stop:
            return acked
        if line.isdigit():
            acked.append(int(line))
            if isinstance(stop, int) and len(acked) >= stop:
                return acked
    raise AssertionError(f"writer printed no {stop!r} within {timeout_s} s")


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def assert_consistent(root: Path, acked: set[int], run: str = "r1") -> set[int]:
    """The store reads, each stored batch is whole, each sample is there once, ``acked`` are in.

    Returns:
        The batch indices stored.

    """
    for p in _visible_files(root):
        assert p.name == ".lock" or store_mod._PART_RE.match(p.name) or p.parent == root, p
    df = Store(root).samples(run)
    assert df.select(pl.struct("node", "device", "timestamp").is_duplicated().any()).item() is False
    sec = ((df["timestamp"] - T0).dt.total_seconds()).cast(pl.Int64)
    assert (df["power_w"] == sec.cast(pl.Float64)).all()  # every value is the one written
    per_batch = (sec // ROWS).value_counts()
    counts = dict(per_batch.iter_rows())
    assert all(c == ROWS for c in counts.values()), f"half batches: {counts}"
    stored = set(counts)
    assert acked <= stored, f"acknowledged but lost: {sorted(acked - stored)}"
    return stored


# ------------------------------------------------------------------------------ killed writers
def test_writers_killed_at_random_times_leave_a_consistent_store(tmp_path: Path) -> None:
    """Three writer processes, each SIGKILLed at a random moment while writing batches.

    Compaction runs every 8 parts, so kills land in part writes, compactions
    and the removal of compacted parts alike.
    """
    root = tmp_path / "store"
    rng = random.Random(8)
    acked: set[int] = set()
    first = 0
    for _ in range(3):
        proc = _start(root, first=first)
        acked |= set(_read_until(proc, rng.randint(5, 25)))
        time.sleep(rng.uniform(0.0, 0.05))
        _kill(proc)
        stored = assert_consistent(root, acked)
        first = max(stored) + 1
    # A later writer works and sweeps whatever temporaries the kills left.
    store = Store(root)
    extra = pl.DataFrame(
        {
            "run_id": "r1",
            "node": "n1",
            "device": "0",
            "timestamp": [T0 + timedelta(seconds=first * ROWS + k) for k in range(ROWS)],
            "power_w": [float(first * ROWS + k) for k in range(ROWS)],
            "source": "replay",
        }
    )
    assert store.write_samples(extra) == ROWS
    assert _temporaries(root) == []
    assert first in assert_consistent(root, acked | {first})


def test_writer_killed_between_temporary_and_rename_leaves_only_a_swept_temporary(
    tmp_path: Path,
) -> None:
    """SIGKILL exactly inside a part write: the half-done batch is invisible, then swept."""
    root = tmp_path / "store"
    proc = _start(root, pause="before-part:4", compact=1000)
    acked = _read_until(proc, "PAUSED")
    _kill(proc)
    assert acked == [0, 1, 2]
    assert len(_temporaries(root)) == 1  # the kill really landed mid-write
    assert assert_consistent(root, set(acked)) == {0, 1, 2}
    # The next writer sweeps the temporary; writing the lost batch again stores it once.
    proc = _start(root, first=3, last=5, compact=1000)
    assert _read_until(proc, "DONE") == [3, 4]
    proc.wait(timeout=30)
    assert _temporaries(root) == []
    assert assert_consistent(root, {0, 1, 2, 3, 4}) == {0, 1, 2, 3, 4}


def test_writer_killed_inside_compaction_stores_every_sample_once(tmp_path: Path) -> None:
    """SIGKILL after a compaction base is renamed in but before its parts are removed."""
    root = tmp_path / "store"
    proc = _start(root, pause="after-base:1", compact=4)
    acked = _read_until(proc, "PAUSED")
    _kill(proc)
    run_dir = root / "samples" / "r1"
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    assert (
        any(n.startswith("base-") for n in names) and sum(n.startswith("part-") for n in names) == 4
    )
    stored = assert_consistent(root, set(acked))
    assert stored == {0, 1, 2, 3}  # batch 3 was written; the kill hit its compaction
    proc = _start(root, first=4, last=12, compact=4)
    assert _read_until(proc, "DONE") == list(range(4, 12))
    proc.wait(timeout=30)
    assert assert_consistent(root, set(range(12))) == set(range(12))


# ------------------------------------------------------------------------------ two writers
def test_two_writers_at_once_store_every_sample_exactly_once(tmp_path: Path) -> None:
    """Two processes write overlapping batches (and upsert runs) at the same time.

    Writer A writes batches 0, 1, 2, ... and writer B the same batches from
    the end; every batch also overlaps the next by half, so almost every
    sample is sent three or four times. Each writer also adds one run row per
    batch, so a lost read-modify-write of runs.parquet would lose rows.
    """
    root = tmp_path / "store"
    go = tmp_path / "go"
    n = 40
    a = _start(root, first=0, last=n, go=go, runs_prefix="a")
    b = _start(root, first=n - 1, last=-1, step=-1, go=go, runs_prefix="b")
    time.sleep(0.5)
    go.touch()
    for proc in (a, b):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.split()[-1] == "DONE"
    df = Store(root).samples("r1")
    # Batch i covers [i*ROWS, i*ROWS + 2*ROWS): the union is [0, (n + 1) * ROWS).
    assert df.height == (n + 1) * ROWS
    assert df["timestamp"].n_unique() == df.height
    sec = ((df["timestamp"] - T0).dt.total_seconds()).cast(pl.Float64)
    assert (df["power_w"] == sec).all()
    runs = Store(root).runs()["run_id"].to_list()
    assert sorted(runs) == sorted([f"a-{i}" for i in range(n)] + [f"b-{i}" for i in range(n)])
    assert _temporaries(root) == []


# ------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB tmpfs; skipped when mounting is not permitted (needs CAP_SYS_ADMIN)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs to fill ({res.stderr.strip() or res.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _noise_batch(i: int, rows: int = 4000, run: str = "r1") -> pl.DataFrame:
    rng = random.Random(i)
    return pl.DataFrame(
        {
            "run_id": run,
            "node": "n1",
            "device": "0",
            "timestamp": [T0 + timedelta(seconds=i * rows + k) for k in range(rows)],
            "power_w": [rng.random() * 300 for _ in range(rows)],  # incompressible
            "source": "replay",
        }
    )


def test_full_disk_is_a_store_error_and_leaves_nothing_half_written(small_disk: Path) -> None:
    """A real full disk (1 MiB tmpfs): StoreError saying so, no temporary left, data intact.

    Not simulated: the store fills a real tmpfs until the kernel answers ENOSPC.
    """
    root = small_disk / "store"
    store = Store(root)
    acked: dict[int, pl.DataFrame] = {}
    err: StoreError | None = None
    for i in range(200):
        batch = _noise_batch(i)
        try:
            store.write_samples(batch)
        except StoreError as e:
            err, failed = e, i
            break
        acked[i] = batch
    assert err is not None, "the 1 MiB disk never filled"
    assert "the disk is full" in str(err) and "store is unchanged" in str(err)
    assert _temporaries(root) == []
    expect = pl.concat(acked.values()).sort("timestamp")
    got = store.samples("r1").select(expect.columns)
    assert got.equals(expect)  # every acknowledged batch whole, the failed one absent
    # Other writes on the full disk fail the same way and leave nothing behind.
    with pytest.raises(StoreError, match="disk is full"):
        store.write_samples(_noise_batch(failed, run="r2"))
    with pytest.raises(StoreError, match="disk is full"):
        store.write_runs(
            pl.DataFrame({"run_id": [f"r-{k}" for k in range(20_000)], "status": "running"})
        )
    assert _temporaries(root) == []
    assert store.runs().height == 0
    # Once space is freed (three stored batches dropped on purpose), the failed batch goes in
    # once, and two of the dropped ones can be sent again.
    victims = sorted((root / "samples" / "r1").glob("part-*.parquet"))[:3]
    lost = pl.concat([pl.read_parquet(v) for v in victims[:2]])
    for v in victims:
        v.unlink()
    assert store.write_samples(_noise_batch(failed)) == 4000
    assert store.write_samples(_noise_batch(failed)) == 0
    assert store.write_samples(lost) == lost.height == 8000
    assert store.samples("r1").height == len(acked) * 4000
    assert _temporaries(root) == []


def test_full_disk_during_compaction_keeps_the_acknowledged_write(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real full disk hit while merging a run's files: the write that triggered it stands.

    Merging needs room for a copy of the run, so on a filling disk it fails
    before the small part writes do. The rows are already stored then: the
    write returns, a warning says the merge was postponed, and nothing is lost.
    """
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 4)
    root = small_disk / "store"
    store = Store(root)
    acked: list[pl.DataFrame] = []
    err: StoreError | None = None
    with caplog.at_level("WARNING", logger="profiler.store"):
        for i in range(200):
            b = _noise_batch(i)
            try:
                assert store.write_samples(b) == b.height
            except StoreError as e:
                err = e
                break
            acked.append(b)
    assert err is not None, "the 1 MiB disk never filled"
    postponed = [r for r in caplog.records if "merging the" in r.getMessage()]
    assert postponed, "no merge ran into the full disk"
    assert "the disk is full" in postponed[0].getMessage()
    assert "the disk is full" in str(err)
    assert _temporaries(root) == []
    expect = pl.concat(acked).sort("timestamp")
    assert store.samples("r1").select(expect.columns).equals(expect)
