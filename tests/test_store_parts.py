"""Store writes that stay fast under load: range pruning, staggered compaction, off-lock flushes.

Regression tests for the load benchmark's slow projections (p95 2.96 s): each
store write read every part file of a run, all runs compacted in the same
write, and the aggregator wrote to the store while holding the lock that
ingest and queries wait for.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from cluster.aggregator import Aggregator
from conftest import at
from profiler import store as store_mod
from profiler.errors import SchemaError, StoreError
from profiler.journal import Journal
from profiler.schema import conform
from profiler.store import Store, atomic_write_parquet


def batch(start: int, n: int, run: str = "r1", power: float = 100.0) -> pl.DataFrame:
    """``n`` samples of run ``run`` at seconds ``start``.., power ``power + second``."""
    return pl.DataFrame(
        {
            "run_id": run,
            "node": "n1",
            "device": "0",
            "timestamp": [at(start + i) for i in range(n)],
            "power_w": [power + start + i for i in range(n)],
            "source": "replay",
        }
    )


def parts(root: Path, run: str = "r1") -> list[str]:
    return sorted(p.name for p in (root / "samples" / run).iterdir() if not p.name.startswith("."))


def spoil_data_pages(path: Path) -> None:
    """Overwrite a parquet file's data pages; its footer (with the statistics) stays whole."""
    raw = bytearray(path.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little")  # parquet: ... footer, its length, "PAR1"
    end = len(raw) - 8 - footer
    raw[4:end] = b"\xff" * (end - 4)
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------ pruning
def test_a_write_reads_only_the_files_its_time_range_overlaps(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for k in range(3):  # parts at seconds 0-9, 100-109, 200-209
        s.write_samples(batch(100 * k, 10))
    first = tmp_path / "samples" / "r1" / "part-000000000000.parquet"
    spoil_data_pages(first)
    fresh = Store(tmp_path)  # knows no range yet: reads them from the footers
    assert fresh.write_samples(batch(205, 10)) == 5  # overlaps only the third part
    assert fresh.write_samples(batch(300, 3)) == 3  # overlaps none
    # The spoiled part is read as soon as new rows fall in its range.
    with pytest.raises(StoreError, match="part-000000000000.parquet: expected a parquet file"):
        fresh.write_samples(batch(5, 2))


def test_duplicates_and_conflicts_are_found_in_the_overlapping_file(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for k in range(5):
        s.write_samples(batch(10 * k, 10))
    assert s.write_samples(batch(15, 10)) == 0  # spans two parts, all stored
    with pytest.raises(SchemaError, match=r"already in the store .* power_w=123.0"):
        s.write_samples(batch(23, 1, power=1.0))
    assert s.samples("r1").height == 50


def test_a_file_without_statistics_is_read_whole(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.write_samples(batch(0, 3))
    run_dir = tmp_path / "samples" / "r1"
    stored = pl.read_parquet(run_dir / "part-000000000000.parquet")
    # Another writer's part with a sample at second 50 and no parquet statistics.
    later = stored.with_columns(pl.lit(at(50)).alias("timestamp")).head(1)
    later.write_parquet(run_dir / "part-000000000001.parquet", statistics=False)
    with pytest.raises(SchemaError, match="already in the store"):
        s.write_samples(batch(50, 1, power=7.0))
    assert s.write_samples(batch(50, 1, power=later["power_w"][0] - 50)) == 0


def test_a_file_replaced_under_the_same_name_is_looked_at_again(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.write_samples(batch(0, 3))  # s now knows part 0 spans seconds 0-2
    part = tmp_path / "samples" / "r1" / "part-000000000000.parquet"
    atomic_write_parquet(conform(batch(500, 3), "samples"), part)  # another process rewrote it
    with pytest.raises(SchemaError, match="already in the store"):
        s.write_samples(batch(501, 1, power=0.0))
    assert s.write_samples(batch(500, 3)) == 0


# ------------------------------------------------------------------------------ compaction
def test_runs_that_grow_in_step_compact_one_per_write(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 4)
    s = Store(tmp_path)
    runs = ["a", "b", "c"]

    def write(k: int) -> None:
        s.write_samples(pl.concat([batch(10 * k, 10, run=r) for r in runs]))

    def compacted() -> list[str]:
        return [r for r in runs if any(n.startswith("base-") for n in parts(tmp_path, r))]

    for k in range(4):  # every run reaches 4 parts in the 4th write
        write(k)
    assert compacted() == ["a"]
    write(4)
    assert compacted() == ["a", "b"]
    assert len(parts(tmp_path, "c")) == 5
    for k in range(5, 8):  # "c" reaches 8 = 2 x 4 parts: compacted whatever else is due
        write(k)
    assert all(len(parts(tmp_path, r)) < 8 for r in runs)
    got = s.samples()
    assert got.height == 3 * 80
    assert got.select(pl.struct("run_id", "timestamp").is_duplicated().any()).item() is False
    assert s.write_samples(pl.concat([batch(0, 80, run=r) for r in runs])) == 0


# ------------------------------------------------------------------------------ aggregator
class SlowStore(Store):
    """A real store whose sample writes wait for ``go`` (and fail while ``fail`` is set)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.go = threading.Event()
        self.go.set()
        self.writing = threading.Event()
        self.fail = False

    def write_samples(self, df: pl.DataFrame, **kwargs: object) -> int:  # type: ignore[override]
        self.writing.set()
        self.go.wait(30)
        if self.fail:
            raise StoreError("could not write: the disk is full; the store is unchanged")
        return super().write_samples(df, **kwargs)  # type: ignore[arg-type]


def journal_files(wal: Path) -> int:
    return len(list(wal.glob("batch-*.parquet")))


def test_ingest_and_queries_go_on_while_a_flush_writes(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "store")
    wal = tmp_path / "wal"
    agg = Aggregator(store, wal=wal, flush_rows=10**9, flush_interval_s=1e9)
    agg.start_run({"run_id": "r1", "planned_epochs": 4})
    agg.ingest_samples(batch(0, 10))
    store.go.clear()
    flusher = threading.Thread(target=agg.flush)
    flusher.start()
    assert store.writing.wait(10)
    t = time.monotonic()
    assert agg.ingest_samples(batch(10, 10)) == 10
    assert agg.status("r1")["samples"] == 20
    assert agg.maybe_flush() == 0  # another flush runs: it does not wait for it
    assert time.monotonic() - t < 1.0
    assert agg.stats()["pending_rows"] == 20  # 10 being written, 10 queued
    store.go.set()
    flusher.join(10)
    # The written batch left the journal; the one that came during the write did not.
    assert store.samples("r1").height == 10
    assert journal_files(wal) == 1
    assert agg.flush() == 10
    assert journal_files(wal) == 0
    assert agg.stats()["pending_rows"] == 0
    assert store.samples("r1")["timestamp"].n_unique() == 20


def test_a_failed_write_keeps_rows_and_journal_for_the_next_flush(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "store")
    wal = tmp_path / "wal"
    agg = Aggregator(store, wal=wal, flush_rows=10**9, flush_interval_s=1e9)
    agg.start_run({"run_id": "r1", "planned_epochs": 4})
    agg.ingest_samples(batch(0, 10))
    agg.ingest_samples(batch(10, 5))
    store.fail = True
    assert agg.maybe_flush(force=True) == 0  # logged, kept
    with pytest.raises(StoreError, match="disk is full"):
        agg.flush()
    assert agg.stats()["pending_rows"] == 15
    assert journal_files(wal) == 2
    store.fail = False
    assert agg.flush() == 15
    assert journal_files(wal) == 0
    assert agg.stats()["flushed"] == 15


def test_a_crash_during_a_flush_loses_nothing(tmp_path: Path) -> None:
    """The journal entry of a batch being written stays until the write returned."""
    store = SlowStore(tmp_path / "store")
    wal = tmp_path / "wal"
    agg = Aggregator(store, wal=wal, flush_rows=10**9, flush_interval_s=1e9)
    agg.start_run({"run_id": "r1", "planned_epochs": 4})
    agg.ingest_samples(batch(0, 10))
    store.go.clear()
    threading.Thread(target=agg.flush, daemon=True).start()
    assert store.writing.wait(10)
    agg.ingest_samples(batch(10, 10))
    # The process dies here, mid-write: both batches are still in the journal.
    assert [seq for seq, _ in Journal(wal).pending()] == [1, 2]
    again = Aggregator.rebuild(Store(tmp_path / "store"), wal=wal)
    assert again.status("r1")["samples"] == 20
    assert journal_files(wal) == 0
    store.go.set()  # the dead process's write lands late: still stored once
    time.sleep(0.2)
    assert Store(tmp_path / "store").samples("r1")["timestamp"].n_unique() == 20
    assert Store(tmp_path / "store").samples("r1").height == 20


def test_ingest_leaves_an_interval_old_flush_to_the_periodic_one(tmp_path: Path) -> None:
    now = [0]
    store = Store(tmp_path / "store")
    agg = Aggregator(store, flush_interval_s=2.0, clock=lambda: now[0])
    agg.start_run({"run_id": "r1", "planned_epochs": 4})
    agg.ingest_samples(batch(0, 10))
    now[0] = 3_000_000  # 3 s: due for maybe_flush, not yet for an ingest call
    agg.ingest_samples(batch(10, 10))
    assert store.samples("r1").height == 0
    assert agg.maybe_flush() == 20
    agg.ingest_samples(batch(20, 10))
    now[0] = 7_000_000  # 4 s after that batch: twice the interval, the ingest call flushes
    agg.ingest_samples(batch(30, 10))
    assert store.samples("r1").height == 40
