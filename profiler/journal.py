"""Spill journal: sample batches the receiver could not take, kept on local disk in order.

One parquet file per batch, ``batch-<seq>.parquet`` with a 12-digit sequence
number that only grows (it continues from the files already there after a
restart). Files are written atomically (hidden temporary, fsync, rename), so
a crash leaves either the whole batch or nothing. Batches are replayed in
sequence order and removed only after the receiver accepted them; a crash
between the two resends a batch, which the store's idempotent writes absorb.

**Destination.** A journal opened with a ``destination`` (where its batches
go: ``store <resolved root>`` for a store, the receiver's class otherwise)
records it in ``destination.txt`` beside its batches while any wait, and
removes it once the last one is delivered. Batches waiting for another
destination are never taken: such a journal opens in the subdirectory
``for-<hash of the destination>`` instead (a warning names both), which holds
this destination's own spills until they are delivered, so a node's sidecars
writing to different stores share the default journal directory safely.
Batches of a journal without a record (written before it was kept, or with
no destination given) are replayed by whoever opens it, as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import polars as pl

from profiler.errors import BadInputError, StoreError
from profiler.store import atomic_write_parquet

log = logging.getLogger(__name__)
_BATCH_RE = re.compile(r"^batch-(\d{12})\.parquet$")
#: Where the batches of a journal directory go (one line), while any wait.
DESTINATION_FILE = "destination.txt"


def default_journal_dir() -> Path:
    """``$WATTWISE_JOURNAL``, else ``$XDG_STATE_HOME/wattwise/journal`` (``~/.local/state``)."""
    env = os.environ.get("WATTWISE_JOURNAL")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "wattwise" / "journal"


def recorded_destination(directory: Path) -> str | None:
    """Where the batches waiting in ``directory`` go, as recorded; ``None`` if not recorded.

    A record that cannot be read is returned as a description of the error, which
    matches no destination (so the batches are left alone, never sent astray).
    """
    path = directory / DESTINATION_FILE
    try:
        return path.read_text(encoding="utf-8").rstrip("\n")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        return f"<unreadable {path}: {err}>"


def _pending(directory: Path) -> list[tuple[int, Path]]:
    """Batch files in ``directory`` as (sequence number, path), oldest first."""
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _BATCH_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


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
        destination: Where the batches go (see the module's *Destination*);
            ``None``: unknown, nothing is recorded or checked.

    Attributes:
        directory: The journal directory: ``directory``, or its ``for-<hash>``
            subdirectory where ``directory`` holds batches for another destination.
        destination: Where its batches go, as given.

    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_rows: int | None = None,
        destination: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.max_rows = max_rows
        self.destination = destination
        if destination is not None:
            self.directory = self._directory_for(destination)
        self._rows: dict[int, int] = {}  # seq -> rows, for files this process knows
        for seq, path in self.pending():
            self._rows[seq] = _row_count(path)
        self._next = max(self._rows, default=0) + 1

    def _own_directory(self, base: Path) -> Path:
        """The subdirectory of ``base`` for this journal's destination while ``base`` is taken."""
        assert self.destination is not None
        digest = hashlib.sha256(self.destination.encode()).hexdigest()[:16]
        return base / f"for-{digest}"

    def _directory_for(self, destination: str) -> Path:
        """The directory this destination's batches use: the given one unless it is taken.

        Taken: it records another destination and batches wait in it. The
        ``for-<hash>`` subdirectory is used while batches of this destination wait
        there (spilled while the directory was taken), else whenever it is taken.
        """
        own = self._own_directory(self.directory)
        if _pending(own):
            return own
        held = recorded_destination(self.directory)
        waiting = _pending(self.directory)
        if held is None or held == destination or not waiting:
            return self.directory
        self._warn_taken(self.directory, held, len(waiting), own)
        return own

    def _warn_taken(self, base: Path, held: str, waiting: int, own: Path) -> None:
        log.warning(
            "journal %s holds %d batch(es) waiting for %s; they are left there for a sidecar "
            "writing to it (not sent to %s); this journal, for %s, uses %s",
            base,
            waiting,
            held,
            self.destination,
            self.destination,
            own,
        )

    def _claim(self) -> None:
        """Record the destination beside the batches before the first one is written.

        Where another destination's batches were spilled into the directory since
        this journal opened (a second sidecar on the node), this journal moves to
        its own subdirectory first.

        Raises:
            StoreError: The record could not be written.

        """
        assert self.destination is not None
        held = recorded_destination(self.directory)
        if held == self.destination:
            return
        if held is not None and not self._rows and (waiting := _pending(self.directory)):
            own = self._own_directory(self.directory)
            self._warn_taken(self.directory, held, len(waiting), own)
            self.directory = own
            if recorded_destination(own) == self.destination:
                return
        path = self.directory / DESTINATION_FILE
        tmp = path.with_name(f".tmp-{DESTINATION_FILE}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(self.destination + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(
                f"could not write {path} (where the journal's batches go): {err}; the batch "
                "is not kept"
            ) from err

    def pending(self) -> list[tuple[int, Path]]:
        """Waiting batches as (sequence number, path), oldest first."""
        return _pending(self.directory)

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
        if self.destination is not None:
            self._claim()  # may move the journal to its own subdirectory
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
        if self.destination is not None and not self._rows and not self.pending():
            # Nothing waits: the directory is free for any destination again.
            (self.directory / DESTINATION_FILE).unlink(missing_ok=True)
