"""Spill journal: sample batches the receiver could not take, kept on local disk in order.

One parquet file per batch, ``batch-<seq>.parquet`` with a 12-digit sequence
number that only grows (it continues from the files already there after a
restart). Files are written atomically (hidden temporary, fsync, rename), so
a crash leaves either the whole batch or nothing. Batches are replayed in
sequence order and removed only after the receiver accepted them; a crash
between the two resends a batch, which the store's idempotent writes absorb.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import polars as pl

from profiler.errors import BadInputError, StoreError
from profiler.store import atomic_write_parquet

log = logging.getLogger(__name__)
_BATCH_RE = re.compile(r"^batch-(\d{12})\.parquet$")


def default_journal_dir() -> Path:
    """``$WATTWISE_JOURNAL``, else ``$XDG_STATE_HOME/wattwise/journal`` (``~/.local/state``)."""
    env = os.environ.get("WATTWISE_JOURNAL")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "wattwise" / "journal"


def _row_count(path: Path) -> int:
    """Rows of a batch file from its parquet footer; 0 (and a warning) when unreadable.

    An unreadable file is counted, not refused, so that the journal opens and
    :meth:`Journal.read` reports the file to whoever replays it.
    """
    import pyarrow.parquet as pq

    try:
        return int(pq.read_metadata(path).num_rows)
    except (Exception, pl.exceptions.PanicException) as err:
        log.warning("journal batch %s is unreadable (%s); counted as 0 rows", path, err)
        return 0


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
            self._rows[seq] = _row_count(path)
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
            StoreError: The disk write failed or the journal is full. When only
                the directory sync after the rename failed, the batch file is
                in place and counted as waiting (its number is not reused).

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
        path = self.directory / f"batch-{seq:012d}.parquet"
        try:
            atomic_write_parquet(batch, path)
        finally:
            # Renamed into place even if the directory sync then failed: it waits like any
            # batch (and is resent at the next start), so its number is not reused.
            if path.exists():
                self._next = max(self._next, seq + 1)
                self._rows[seq] = batch.height
        return seq

    def read(self, path: Path) -> pl.DataFrame:
        """One spilled batch.

        Raises:
            BadInputError: The file is not a whole parquet file (cut short or
                corrupt); the message names it.

        """
        import pyarrow.parquet as pq

        # pyarrow, not polars, decodes it: polars' reader can panic (and abort the process)
        # on a corrupt page, where pyarrow raises a Python error.
        try:
            df = pl.from_arrow(pq.read_table(path))
        except (Exception, pl.exceptions.PanicException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadInputError(
                f"{path}: expected a parquet batch written by the journal; it is unreadable "
                f"({first[:200]})"
            ) from err
        assert isinstance(df, pl.DataFrame)
        return df

    def remove(self, seq: int) -> None:
        """Drop a batch once the receiver accepted it."""
        (self.directory / f"batch-{seq:012d}.parquet").unlink(missing_ok=True)
        self._rows.pop(seq, None)
