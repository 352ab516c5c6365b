"""Spill journal: sample batches the receiver could not take, kept on local disk in order.

One parquet file per batch, ``batch-<seq>.parquet`` with a 12-digit sequence
number that only grows (it continues from the files already there after a
restart). Files are written atomically (hidden temporary, fsync, rename), so
a crash leaves either the whole batch or nothing. Batches are replayed in
sequence order and removed only after the receiver accepted them; a crash
between the two resends a batch, which the store's idempotent writes absorb.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import polars as pl

from profiler.errors import StoreError
from profiler.store import atomic_write_parquet

_BATCH_RE = re.compile(r"^batch-(\d{12})\.parquet$")


def default_journal_dir() -> Path:
    """``$WATTWISE_JOURNAL``, else ``$XDG_STATE_HOME/wattwise/journal`` (``~/.local/state``)."""
    env = os.environ.get("WATTWISE_JOURNAL")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "wattwise" / "journal"


class Journal:
    """An ordered directory of spilled batches.

    Args:
        directory: Where batch files live (created on first spill).
        max_rows: Refuse new batches once this many rows wait (disk bound);
            ``None`` for no bound.

    Attributes:
        directory: The journal directory.

    """

    def __init__(self, directory: str | Path, *, max_rows: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_rows = max_rows
        self._rows: dict[int, int] = {}  # seq -> rows, for files this process knows
        for seq, path in self.pending():
            self._rows[seq] = pl.scan_parquet(path).select(pl.len()).collect().item()
        self._next = max(self._rows, default=0) + 1

    def pending(self) -> list[tuple[int, Path]]:
        """Waiting batches as (sequence number, path), oldest first."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _BATCH_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    @property
    def rows(self) -> int:
        """Rows waiting in the journal."""
        return sum(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, batch: pl.DataFrame, *, seq: int | None = None) -> int:
        """Write a batch as the newest file; returns its sequence number.

        Args:
            batch: Rows to keep.
            seq: Sequence number to use (the caller's batch number, which fixes
                its place in the resend order); it must not be in use. Default: the
                next one after every number used so far.

        Raises:
            StoreError: The disk write failed or the journal is full.

        """
        if self.max_rows is not None and self.rows + batch.height > self.max_rows:
            raise StoreError(
                f"journal {self.directory} is full: {self.rows} rows wait and the bound is "
                f"{self.max_rows}; the batch of {batch.height} rows cannot be kept"
            )
        if seq is None:
            seq = self._next
        elif seq in self._rows:
            raise StoreError(
                f"journal {self.directory}: batch number {seq} is already waiting there; "
                "each batch is spilled once"
            )
        atomic_write_parquet(batch, self.directory / f"batch-{seq:012d}.parquet")
        self._next = max(self._next, seq + 1)
        self._rows[seq] = batch.height
        return seq

    def read(self, path: Path) -> pl.DataFrame:
        """One spilled batch."""
        return pl.read_parquet(path)

    def remove(self, seq: int) -> None:
        """Drop a batch once the receiver accepted it."""
        (self.directory / f"batch-{seq:012d}.parquet").unlink(missing_ok=True)
        self._rows.pop(seq, None)
