"""The run store: three parquet tables in one directory, written atomically and idempotently.

Layout under the store root::

    runs.parquet                     one row per run (upserted by run_id)
    epochs.parquet                   one row per (run_id, epoch) (upserted, or inserted only)
    samples/<run_id>/part-<seq>.parquet   appended batches of one run
    samples/<run_id>/base-<seq>.parquet   compaction of every part up to <seq>
    samples/_unassigned/...          samples not yet tied to a run
    .lock                            writers hold an exclusive flock

Every file is written to a hidden temporary name in its final directory,
fsynced, then renamed into place, so a reader never sees half a file and a
crash leaves at most a hidden temporary that the next writer removes. Writers
serialise on ``.lock``; readers take no lock. A sample's identity is
(run_id, node, device, timestamp): writing it again is a no-op, writing a
different value for it is refused (or, with ``conflicts="keep_stored"``, skipped
and reported: the stored value wins). A sample without a measurement (power_w
and energy_j null: a placeholder, such as an nvidia-smi ``[N/A]`` cell) is no
conflict: a copy with a value fills it, and a placeholder copy of a valued
sample is a plain duplicate. Filling stored rows writes the run's files anew as
one base file in one rename, as a compaction does; fills are logged. A reader
that lists a run's files while a writer compacts them lists them again (see
:meth:`Store.samples`).

New rows are compared only with the files of their run whose time range
overlaps theirs: a file's range (first and last timestamp) comes from its
parquet statistics, read once per file and kept in memory by file identity
(inode, size, mtime), so a write reads the footers of unknown files and the
whole of only the few files it can collide with. A run is compacted once it
holds ``COMPACT_AFTER`` files, at most one run per write (the one with most
files) unless a run reaches twice that, so runs that grow in step do not all
compact in the same write.

Paths never leave the root: run ids must match ``RUN_ID_RE`` in full (see
:func:`safe_run_id`), a run directory that is a symlink is neither read nor
written, the sweep of temporaries skips symlinked directories, and the lock
file is opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import polars as pl

from profiler.errors import BadInputError, SchemaError, StoreError, where
from profiler.schema import (
    KEYS,
    RUN_ID_RE,
    SAMPLE_VALUES,
    UTC_US,
    check_run_id,
    conform,
    drop_filled_placeholders,
    empty,
    is_placeholder,
    schema,
)

log = logging.getLogger(__name__)

UNASSIGNED = "_unassigned"
_PART_RE = re.compile(r"^(part|base)-(\d{12})\.parquet$")
#: Compact a run's sample directory once it holds this many part files.
COMPACT_AFTER = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
#: How many times a reader lists a run's files again when one vanished (a compaction).
READ_RETRIES = 5
_SAMPLE_KEY = ["node", "device", "timestamp"]
_VALUES = list(SAMPLE_VALUES)
#: Ends the message of a write that failed before anything was renamed into place.
UNCHANGED = "the store is unchanged"
#: In the message of a write whose file was renamed into place but whose directory sync failed.
NOT_DURABLE = "but may not be durable"


def default_root() -> Path:
    """The store directory: ``$WATTWISE_STORE``, else the per-user data directory."""
    env = os.environ.get("WATTWISE_STORE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "wattwise" / "store"


def safe_run_id(run_id: str) -> str:
    """``run_id`` if it is a safe run id in full, else :class:`SchemaError`.

    Stricter than :func:`profiler.schema.check_run_id`, whose ``re.match``
    with ``$`` lets one trailing line break through.
    """
    check_run_id(run_id)
    if not RUN_ID_RE.fullmatch(run_id):
        raise SchemaError(
            f"run_id must match {RUN_ID_RE.pattern} in full (no line breaks); found {run_id!r}"
        )
    return run_id


def _check_frame_ids(df: pl.DataFrame) -> None:
    if "run_id" in df.columns:
        for rid in df["run_id"].drop_nulls().unique().to_list():
            safe_run_id(str(rid))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it: racy in threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def file_mode(path: Path) -> int:
    """Permission bits a file replacing ``path`` should get.

    Those of the file it replaces, else what ``open`` would create
    (``0o666`` less the umask). A temporary from :func:`tempfile.mkstemp`
    is ``0o600``: renamed over a shared report or store file, it made that
    file unreadable to everyone else.
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_parquet(df: pl.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` so that readers see either the old file or the whole new one.

    Raises:
        StoreError: The write failed (for example the disk is full). If it
            failed before the rename, the temporary file is removed, ``path``
            is untouched and the message says the store is unchanged; if only
            the directory sync after the rename failed, ``path`` holds the new
            file and the message says (``NOT_DURABLE``) it may not survive a
            crash.

    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    except OSError as err:
        why = "the disk is full" if err.errno == errno.ENOSPC else str(err)
        raise StoreError(f"could not write {path}: {why}; {UNCHANGED}") from err
    tmp = Path(tmp_name)
    replaced = False
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), file_mode(path))
            df.write_parquet(fh, compression="zstd", statistics=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        replaced = True
        _fsync_dir(path.parent)
    except BaseException as err:
        if not replaced:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        # polars reports a failed write (ENOSPC included) as ComputeError, not OSError.
        if isinstance(err, OSError | pl.exceptions.PolarsError):
            full = getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in str(err)
            why = "the disk is full" if full else str(err)
            if replaced:
                raise StoreError(
                    f"could not sync the directory of {path} after writing it: {why}; {path} "
                    f"was replaced {NOT_DURABLE} (a crash could undo the write)"
                ) from err
            raise StoreError(f"could not write {path}: {why}; {UNCHANGED}") from err
        raise


def atomic_write_bytes(data: bytes, path: Path, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary and a rename.

    Missing folders above ``path`` are created. The file gets permission bits
    ``mode`` (default :func:`file_mode`: those of the file it replaces).

    Raises:
        BadInputError: A file stands where a folder of ``path`` should be (or
            ``path`` is a folder); nothing was written.
        StoreError: The write failed otherwise (no permission, disk full...);
            ``path`` is untouched.

    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        # Checked here, not only by callers: a file where the folder should be.
        raise BadInputError(
            f"{path}: could not create its folder {path.parent}: a file of that name (or "
            f"above it) is in the way ({err}); give a path in a folder"
        ) from err
    except OSError as err:
        raise StoreError(f"{path}: could not create its folder {path.parent} ({err})") from err
    if os.path.isdir(path):  # not Path.is_dir: a name too long is reported by the write
        raise BadInputError(f"{path}: is a folder; expected a file name to write to")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    except OSError as err:
        raise StoreError(f"{path}: could not write ({err})") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), file_mode(path) if mode is None else mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise StoreError(f"{path}: could not write ({err})") from err
    try:
        _fsync_dir(path.parent)
    except OSError as err:
        raise StoreError(
            f"could not sync the directory of {path} after writing it: {err}; {path} was "
            f"replaced {NOT_DURABLE} (a crash could undo the write)"
        ) from err


def read_store_files(
    files: list[Path], table: str, columns: list[str] | None = None
) -> pl.DataFrame:
    """Read store files of one table, refusing any that is not a whole file of that table.

    Args:
        files: Parquet files of ``table``.
        table: ``runs``, ``samples`` or ``epochs``.
        columns: Read only these columns.

    Returns:
        Their rows in the table's schema (only ``columns`` if given).

    Raises:
        StoreError: A file is not parquet, is cut short or corrupt, or holds
            other columns or types than the table's; the message names it.

    """
    import pyarrow.parquet as pq

    want = schema(table)
    if columns:
        want = pl.Schema({c: want[c] for c in columns})
    frames = []
    for f in files:
        # pyarrow, not polars, decodes the file: on a corrupt data page polars' reader can
        # panic twice and abort the whole process, where pyarrow raises a Python error.
        try:
            df = pl.from_arrow(pq.read_table(f, columns=columns))
        # pyarrow raises OSError, ArrowInvalid and more; polars panics (a BaseException) on
        # metadata that is not UTF-8.
        except (Exception, pl.exceptions.PanicException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StoreError(
                f"{f}: expected a parquet file of the store's {table!r} table; it is unreadable "
                f"({first[:200]}). Move it out of the store (or restore it from a backup) and "
                "retry"
            ) from err
        assert isinstance(df, pl.DataFrame)
        if df.schema != want:
            raise StoreError(
                f"{f}: expected a parquet file of the store's {table!r} table with columns "
                f"{dict(want)}; found other columns {dict(df.schema)}. Move it out of the store "
                "(or restore it from a backup) and retry"
            )
        frames.append(df)
    return pl.concat(frames) if frames else pl.DataFrame(schema=want)


def _conformed_keys(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Sample keys (run_id, node, device, timestamp) of ``frames`` in storage types, once each.

    For keys taken from a frame before :func:`conform` accepted it (so their
    columns are of types it can convert).
    """
    key = ["run_id", *_SAMPLE_KEY]
    out = []
    for f in frames:
        if f.height == 0 or not set(key) <= set(f.columns):
            continue
        ts = pl.col("timestamp")
        if isinstance(f.schema["timestamp"], pl.Datetime):
            ts = ts.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        out.append(f.select(*(pl.col(c).cast(pl.String) for c in key[:-1]), ts.cast(UTC_US)))
    if not out:
        return pl.DataFrame(schema={c: schema("samples")[c] for c in key})
    return pl.concat(out).unique()


def _time_range(df: pl.DataFrame) -> tuple[int, int]:
    """First and last ``timestamp`` of a non-empty samples frame, in µs since the epoch."""
    us = df.get_column("timestamp").to_physical()  # µs: conform() casts to UTC_US
    lo, hi = us.min(), us.max()
    assert isinstance(lo, int) and isinstance(hi, int)
    return lo, hi


def _parquet_time_range(path: Path) -> tuple[int, int] | None:
    """First and last timestamp (µs) of a samples file from its parquet footer alone.

    ``None`` when the footer cannot be read, the file is not in the samples
    schema, or a row group lacks min/max statistics.
    """
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        head = pl.from_arrow(meta.schema.to_arrow_schema().empty_table())
        if not isinstance(head, pl.DataFrame) or head.schema != schema("samples"):
            return None
        col = meta.schema.names.index("timestamp")
        lo = hi = None
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(col).statistics
            if st is None or not st.has_min_max:
                return None
            a, b = st.min, st.max
            if not isinstance(a, datetime) or not isinstance(b, datetime):
                return None
            a_us, b_us = (a - _EPOCH) // _US, (b - _EPOCH) // _US
            lo = a_us if lo is None else min(lo, a_us)
            hi = b_us if hi is None else max(hi, b_us)
    except (Exception, pl.exceptions.PanicException):
        return None
    if lo is None or hi is None:
        return None
    return lo, hi


@contextlib.contextmanager
def _reading(root: Path, path: Path) -> Iterator[None]:
    """Turn an OS error while looking at ``path`` (say, permission denied) into a StoreError."""
    try:
        yield
    except OSError as err:
        if isinstance(err, StoreError):
            raise
        why = err.strerror or str(err)
        raise StoreError(
            f"cannot read {path} in the store at {root}: {why}; expected a store this user "
            "can read (check the permissions of the store directory and its files)"
        ) from err


class Store:
    """A run store rooted at a directory.

    Args:
        root: Store directory; ``None`` means :func:`default_root`.

    Attributes:
        root: The store directory (created on first write).

    Raises:
        BadInputError: ``root`` exists and is not a directory (say, a parquet file
            given as the store).

    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        try:
            st = self.root.stat()
        except OSError:
            st = None  # not there yet (created on first write), or not reachable: said on use
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise BadInputError(
                f"{self.root}: expected a store directory; found a file (give the directory "
                "that holds runs.parquet, or a new path for a new store)"
            )
        # Time range (µs) of each samples file seen, by path, with the file's identity.
        self._ranges: dict[str, tuple[tuple[int, int, int], tuple[int, int]]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- locking -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted at .lock must not make a writer create or lock a
            # file outside the store.
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            fh = os.fdopen(fd, "a+b")
        except OSError as err:
            raise StoreError(f"cannot open the store at {self.root}: {err}") from err
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            with _reading(self.root, self.root):
                self._sweep_temporaries()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def _sweep_temporaries(self) -> None:
        """Remove hidden temporaries left by a writer that died (we hold the lock)."""
        for tmp in self.root.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        samples = self.root / "samples"
        if samples.is_dir():
            for d in samples.iterdir():
                if d.is_symlink() or not d.is_dir():  # never delete outside the store
                    continue
                for tmp in d.glob(".tmp-*"):
                    tmp.unlink(missing_ok=True)

    # -- paths -------------------------------------------------------------------------------
    def _run_dir(self, run_id: str | None) -> Path:
        name = UNASSIGNED if run_id is None else safe_run_id(run_id)
        path = (self.root / "samples" / name).resolve()
        # check_run_id forbids separators and leading dots; resolving also catches a run
        # directory that is a symlink out of the store.
        if path.parent != (self.root / "samples").resolve() or path.name != name:
            raise SchemaError(f"run_id {run_id!r} would leave the store at {self.root}")
        return path

    def _live_parts(self, run_dir: Path) -> tuple[list[Path], int]:
        """Files of a run that hold its samples, and the highest sequence number in use.

        Raises:
            StoreError: The run directory cannot be listed (say, permission denied).

        """
        parts: list[tuple[int, str, Path]] = []
        with _reading(self.root, run_dir):
            names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
        for name in names:
            m = _PART_RE.match(name)
            if m:
                parts.append((int(m.group(2)), m.group(1), run_dir / name))
        bases = [seq for seq, kind, _ in parts if kind == "base"]
        base_seq = max(bases) if bases else -1
        live = [
            p
            for seq, kind, p in sorted(parts)
            if (kind == "base" and seq == base_seq) or (kind == "part" and seq > base_seq)
        ]
        top = max((seq for seq, _, _ in parts), default=-1)
        return live, top

    # -- samples -----------------------------------------------------------------------------
    def write_samples(
        self,
        df: pl.DataFrame,
        *,
        file: str | None = None,
        on_run: Callable[[str | None, int], None] | None = None,
        conflicts: Literal["raise", "keep_stored"] = "raise",
        on_conflict: Callable[[int, str], None] | None = None,
        on_fill: Callable[[int, str], None] | None = None,
    ) -> int:
        """Append samples; rows already stored are skipped.

        With ``conflicts="raise"`` the batch is all or nothing for conflicts:
        every run is checked before any is written. With ``"keep_stored"`` a
        row whose key is already stored with other values (power_w, energy_j)
        is skipped and the stored value kept, and of rows sharing a key inside
        the batch the first is kept (the aggregator's rule: the first value of
        a sample wins); the rest of the batch is written. Skipped rows are
        logged as a warning with the first of them and passed to
        ``on_conflict``.

        A sample without a measurement (power_w and energy_j null: a
        placeholder, such as an nvidia-smi ``[N/A]`` cell) is no conflict, in
        either mode: a valued copy *fills* it, whether it is stored or earlier
        or later in the batch, and a placeholder copy of a valued sample is a
        plain duplicate (not written). Filling stored rows writes the run's
        files anew as one base file, with this batch's new rows, in one rename
        (as a compaction does), so a crash leaves either the old files or the
        new one live. Fills are logged as a warning naming each run and passed
        to ``on_fill``.

        Args:
            df: Rows in the ``samples`` schema (missing optional columns allowed).
            file: Where the rows came from, for messages.
            on_run: Called with (run_id, new rows) after each run of the
                batch is written, e.g. to advance a progress bar; filled rows
                are not new rows.
            conflicts: ``raise`` (refuse the batch) or ``keep_stored`` (skip
                the conflicting rows) on a key stored with other values.
            on_conflict: With ``keep_stored``, called once after the write with
                (rows skipped, description of the first) when any was skipped.
            on_fill: Called once after the write with (samples filled,
                description of the first) when a valued row filled a
                placeholder, stored or in the batch.

        Returns:
            How many rows were new (filled placeholders not counted).

        Raises:
            SchemaError: The rows do not fit the schema, or (``conflicts="raise"``)
                a row has the key of a stored row, or of another row of the
                batch, but different values (neither without a measurement).
            StoreError: The store could not be written (for example the disk
                is full). The message says which runs of the batch were stored
                before the failure, if any; sending the batch again stores only
                the rest. A failed compaction (merging a run's files) is not an
                error: the rows are stored, a warning is logged and a later
                write merges them.

        """
        if conflicts not in ("raise", "keep_stored"):
            raise BadInputError(f"conflicts must be 'raise' or 'keep_stored'; found {conflicts!r}")
        keep_stored = conflicts == "keep_stored"
        skipped: list[tuple[int, str]] = []  # (rows, description of the first)
        # Keys whose placeholder a later row of the batch fills (before and after conform,
        # which may merge timestamps by truncating them to µs).
        in_batch: list[pl.DataFrame] = []
        if keep_stored:
            df, filled = drop_filled_placeholders(df)
            in_batch.append(filled)
            df = self._first_of_each_key(df, file, skipped)
        df = conform(df, "samples", file=file).unique(maintain_order=True)
        _check_frame_ids(df)
        df, filled = drop_filled_placeholders(df)
        in_batch.append(filled)
        if df.height == 0:
            return 0
        batch_filled = _conformed_keys(in_batch)
        groups = df.partition_by("run_id", as_dict=True, maintain_order=True)
        dirs = {rid: self._run_dir(None if rid is None else str(rid)) for (rid,) in groups}
        fills: list[tuple[str, int, str]] = []  # (run, samples filled, description of the first)
        with self._locked():
            # Check every run before writing any, so a conflict leaves the store unchanged.
            # run directory -> (new rows, rows filling stored placeholders, top seq, live files)
            pending: dict[Path, tuple[pl.DataFrame, pl.DataFrame, int, int]] = {}
            for (rid,), part in groups.items():
                run_dir = dirs[rid]
                live, top = self._live_parts(run_dir)
                new, clash, fill = self._only_new(part, run_dir, live)
                if clash.height:
                    msg = self._clash_message(clash, run_dir.name, file)
                    if not keep_stored:
                        raise SchemaError(
                            f"{msg}. Expected the same values (a sample is stored once): "
                            "write it under another run id or node"
                        )
                    skipped.append((clash.height, msg))
                if new.height or fill.height:
                    pending[run_dir] = (new, fill, top, len(live))
                n_fill, first = self._fill_count(new, fill, batch_filled, run_dir.name, file)
                if n_fill:
                    fills.append((run_dir.name, n_fill, first))
            due: list[tuple[int, Path]] = []  # (live files after this write, run directory)
            stored: list[str] = []
            for (rid,) in groups:
                run_dir = dirs[rid]
                fresh, filling, top, n_live = pending.get(run_dir, (None, None, 0, 0))
                if fresh is not None and filling is not None:
                    try:
                        if filling.height:
                            path = run_dir / f"base-{top + 1:012d}.parquet"
                            self._write_filled(run_dir, fresh, filling, path)
                            n_live = 0  # the new base supersedes every file of the run
                        else:
                            path = run_dir / f"part-{top + 1:012d}.parquet"
                            atomic_write_parquet(fresh.sort("node", "device", "timestamp"), path)
                            self._remember_range(path, _time_range(fresh))
                    except StoreError as err:
                        if path.exists():  # renamed into place; only the directory sync failed
                            stored.append(str(rid))
                        rest = [
                            str(r) for (r,) in groups if dirs[r] in pending and str(r) not in stored
                        ]
                        if not stored or not rest:
                            raise
                        msg = str(err).replace(f"; {UNCHANGED}", "")
                        raise StoreError(
                            f"{msg}; of this batch, the rows of run(s) {stored} were stored and "
                            f"those of {rest} were not. Sending the batch again stores only the "
                            "missing rows"
                        ) from err
                    stored.append(str(rid))
                    if n_live + 1 >= COMPACT_AFTER:
                        due.append((n_live + 1, run_dir))
                if on_run is not None:
                    on_run(None if rid is None else str(rid), 0 if fresh is None else fresh.height)
            # Staggered: the fullest run now, every run that reached twice the threshold too;
            # the others at a later write (their rows are stored either way).
            due.sort(key=lambda d: -d[0])
            for k, (n_live, run_dir) in enumerate(due):
                if k == 0 or n_live >= 2 * COMPACT_AFTER:
                    try:
                        self._compact(run_dir)
                    except StoreError as err:
                        # The rows are stored; merging waits for a later write.
                        log.warning(
                            "samples stored; merging the %d files of %s was postponed: %s",
                            n_live,
                            run_dir,
                            str(err).replace(f"; {UNCHANGED}", ""),
                        )
        if skipped:
            n_skipped = sum(n for n, _ in skipped)
            log.warning(
                "%d samples not stored: their key is already stored (or earlier in the batch) "
                "with other values, and the first value is kept; first: %s",
                n_skipped,
                skipped[0][1],
            )
            if on_conflict is not None:
                on_conflict(n_skipped, skipped[0][1])
        if fills:
            n_filled = sum(n for _, n, _ in fills)
            log.warning(
                "%d samples filled: stored (or earlier in the batch) without a measurement "
                "(power_w and energy_j null), they now hold the value sent; %s; first: %s",
                n_filled,
                ", ".join(f"run {run!r}: {n}" for run, n, _ in fills),
                fills[0][2],
            )
            if on_fill is not None:
                on_fill(n_filled, fills[0][2])
        return sum(new.height for new, _, _, _ in pending.values())

    def _fill_count(
        self,
        new: pl.DataFrame,
        fill: pl.DataFrame,
        batch_filled: pl.DataFrame,
        run: str,
        file: str | None,
    ) -> tuple[int, str]:
        """Samples of one run that a valued row fills, and a description of the first.

        ``fill`` fills stored placeholders; a new row (not stored yet) fills a
        placeholder of the batch when its key is in ``batch_filled``.
        """
        label = where(file, label="run " + repr(run))
        if fill.height:
            r = fill.row(0, named=True)
            first = (
                f"{label}sample node {r['node']!r} device {r['device']!r} at {r['timestamp']} "
                f"was stored in {self.root} without a measurement; it now holds "
                f"power_w={r['power_w']}, energy_j={r['energy_j']}"
            )
        else:
            first = ""
        if not batch_filled.height or not new.height:
            return fill.height, first
        hit = new.join(batch_filled, on=["run_id", *_SAMPLE_KEY], how="semi", nulls_equal=True)
        if hit.height and not first:
            r = hit.row(0, named=True)
            first = (
                f"{label}sample node {r['node']!r} device {r['device']!r} at {r['timestamp']} "
                "comes twice in the batch, first without a measurement, then with "
                f"power_w={r['power_w']}, energy_j={r['energy_j']}"
            )
        return fill.height + hit.height, first

    def _write_filled(
        self, run_dir: Path, new: pl.DataFrame, fill: pl.DataFrame, path: Path
    ) -> None:
        """Write a run's live files, with ``fill`` over their placeholders and ``new``, as ``path``.

        ``path`` is a base file numbered above every file of the run, so the one
        rename that puts it in place supersedes them all (we hold the lock); they
        are removed after, and a crash before that leaves them dead, not doubled.
        """
        live, _ = self._live_parts(run_dir)
        old = read_store_files(live, "samples")
        # The filled sample keeps what its placeholder knew that the valued copy does not
        # (model, utilisation, temperature...): only missing columns are taken from it.
        others = [c for c in fill.columns if c not in (*_SAMPLE_KEY, *_VALUES) and c in old.columns]
        if others:
            ph = old.join(fill.select(_SAMPLE_KEY), on=_SAMPLE_KEY, how="semi")
            known = ph.select(*_SAMPLE_KEY, *others)
            fill = (
                fill.join(known, on=_SAMPLE_KEY, how="left", suffix="__ph")
                .with_columns(pl.coalesce(pl.col(c), pl.col(f"{c}__ph")).alias(c) for c in others)
                .select(fill.columns)
            )
        merged = pl.concat(
            [old.join(fill.select(_SAMPLE_KEY), on=_SAMPLE_KEY, how="anti"), fill, new]
        ).sort("node", "device", "timestamp")
        atomic_write_parquet(merged, path)
        self._remember_range(path, _time_range(merged))
        for p in live:  # superseded by the new base; harmless if a crash leaves them
            p.unlink(missing_ok=True)
            self._ranges.pop(str(p), None)

    @staticmethod
    def _first_of_each_key(
        df: pl.DataFrame, file: str | None, skipped: list[tuple[int, str]]
    ) -> pl.DataFrame:
        """``df`` keeping the first row of each sample key; other values are noted in ``skipped``.

        Call it after :func:`drop_filled_placeholders`: a placeholder left then
        has no valued copy, and a later copy without a measurement is a plain
        duplicate, not another value. A frame without the key columns is
        returned as is (:func:`conform` then says what is missing).
        """
        key = ["run_id", *_SAMPLE_KEY]
        if not set(key) <= set(df.columns) or df.height < 2:
            return df
        if not df.select(pl.struct(key).is_duplicated().any()).item():
            return df
        idx = df.with_row_index("_row")
        first = idx.unique(subset=key, keep="first", maintain_order=True)
        later = idx.join(first.select("_row"), on="_row", how="anti")
        values = [c for c in _VALUES if c in df.columns]
        both = later.join(first.select(*key, *values), on=key, how="inner", suffix="_old")
        differ = pl.lit(False)
        for c in values:
            differ = differ | ~pl.col(c).eq_missing(pl.col(f"{c}_old"))
        clash = both.filter(differ)
        if clash.height:
            r = clash.row(0, named=True)
            old = ", ".join(f"{c}={r[c + '_old']}" for c in values)
            new = ", ".join(f"{c}={r[c]}" for c in values)
            skipped.append(
                (
                    clash.height,
                    f"{where(file, label='run ' + repr(r['run_id']))}sample node {r['node']!r} "
                    f"device {r['device']!r} at {r['timestamp']} comes twice in the batch, "
                    f"first with {old}, then with {new}",
                )
            )
        return first.drop("_row")

    def _clash_message(self, clash: pl.DataFrame, run: str, file: str | None) -> str:
        """What the first row of ``clash`` (new values and ``*_old`` stored ones) is."""
        r = clash.row(0, named=True)
        return (
            f"{where(file, label='run ' + repr(run))}sample node {r['node']!r} "
            f"device {r['device']!r} at {r['timestamp']} is already in the store at "
            f"{self.root} with power_w={r['power_w_old']}, energy_j={r['energy_j_old']}; "
            f"the new value is power_w={r['power_w']}, energy_j={r['energy_j']}"
        )

    def _only_new(
        self, part: pl.DataFrame, run_dir: Path, live: list[Path]
    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """Rows of ``part`` not yet in ``live`` (a run's files), conflicts, and fills.

        Only files whose time range overlaps the rows' are read (a file whose
        range is unknown is read whole). A stored placeholder (power_w and
        energy_j null) is filled by a row with a value; a row without a
        measurement whose key is stored is a duplicate, whatever is stored.

        Returns:
            The new rows; the rows whose key is stored with another power_w
            or energy_j, both with a measurement (with the stored ones as
            ``*_old`` columns); and the rows with a measurement whose key is
            stored as a placeholder. Neither of the latter is among the new rows.

        """
        none = part.clear()
        if not live:
            return part, pl.DataFrame(), none
        lo, hi = _time_range(part)
        near = []
        for f in live:
            rng = self._file_range(f)
            if rng is None or (rng[0] <= hi and lo <= rng[1]):
                near.append(f)
        if not near:
            return part, pl.DataFrame(), none
        key = _SAMPLE_KEY
        old = read_store_files(near, "samples", [*key, *_VALUES])
        both = part.join(old, on=key, how="inner", suffix="_old")
        old_empty = pl.col("power_w_old").is_null() & pl.col("energy_j_old").is_null()
        new_empty = is_placeholder(_VALUES)
        differ = ~pl.col("power_w").eq_missing(pl.col("power_w_old")) | ~pl.col(
            "energy_j"
        ).eq_missing(pl.col("energy_j_old"))
        clash = both.filter(differ & ~old_empty & ~new_empty)
        fill = part.join(both.filter(old_empty & ~new_empty).select(key), on=key, how="semi")
        return part.join(old.select(key), on=key, how="anti"), clash, fill

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _remember_range(self, path: Path, rng: tuple[int, int]) -> None:
        try:
            self._ranges[str(path)] = (self._identity(path), rng)
        except OSError:
            self._ranges.pop(str(path), None)

    def _file_range(self, path: Path) -> tuple[int, int] | None:
        """First and last timestamp (µs since the epoch) in a samples file; None if unknown.

        Taken from the file's parquet statistics, kept per file identity (a
        file replaced under the same name is looked at again). ``None`` when
        the file has no usable statistics or is not a samples file: the caller
        then reads it whole (and a corrupt file is reported there).
        """
        try:
            ident = self._identity(path)
        except OSError:
            return None
        hit = self._ranges.get(str(path))
        if hit is not None and hit[0] == ident:
            return hit[1]
        rng = _parquet_time_range(path)
        if rng is not None:
            self._ranges[str(path)] = (ident, rng)
        return rng

    def _compact(self, run_dir: Path) -> None:
        """Merge a run's live files into one base file, then remove them (we hold the lock)."""
        live, top = self._live_parts(run_dir)
        if len(live) < 2:
            return
        merged = read_store_files(live, "samples").sort("node", "device", "timestamp")
        path = run_dir / f"base-{top:012d}.parquet"
        atomic_write_parquet(merged, path)
        if merged.height:
            self._remember_range(path, _time_range(merged))
        for p in live:  # superseded by the base; harmless if a crash leaves them
            p.unlink(missing_ok=True)
            self._ranges.pop(str(p), None)

    def samples(self, run_id: str | None = None, *, unassigned: bool = False) -> pl.DataFrame:
        """Read samples, sorted by run, node, device and time.

        Args:
            run_id: One run's samples; ``None`` for every run.
            unassigned: With ``run_id=None``, also return samples without a run.

        Returns:
            A frame in the ``samples`` schema.

        Readers take no lock: a file listed just before a writer compacted the
        run (merged its files into one and removed them) is gone when read. The
        run's files are then listed again, up to ``READ_RETRIES`` times.

        Raises:
            StoreError: A sample file is corrupt or not of the ``samples`` table,
                or a run's files kept changing while it was read.

        """
        base = self.root / "samples"
        if run_id is not None:
            dirs = [self._run_dir(run_id)]
        else:
            with _reading(self.root, base):
                # A symlinked run directory could point out of the store: it is not read.
                dirs = sorted(
                    d
                    for d in (base.iterdir() if base.is_dir() else [])
                    if d.is_dir() and not d.is_symlink() and (unassigned or d.name != UNASSIGNED)
                )
        frames = [df for d in dirs if (df := self._read_run_dir(d)).height]
        if not frames:
            return empty("samples")
        df = pl.concat(frames) if len(frames) > 1 else frames[0]
        return df.sort("run_id", "node", "device", "timestamp", nulls_last=True)

    def _read_run_dir(self, run_dir: Path) -> pl.DataFrame:
        """One run's samples, listing its files again when one vanished (a compaction)."""
        for attempt in range(1, READ_RETRIES + 1):
            files = self._live_parts(run_dir)[0]
            if not files:
                return empty("samples")
            try:
                return read_store_files(files, "samples")
            except StoreError:
                # A corrupt file is still there; a compacted one is gone and its rows are in
                # the new base file.
                with _reading(self.root, run_dir):
                    gone = not all(f.exists() for f in files)
                if not gone:
                    raise
                log.debug("%s: files changed while read (attempt %d); listing again",
                          run_dir, attempt)  # fmt: skip
        raise StoreError(
            f"{run_dir}: expected its sample files to stay in place while read; they changed "
            f"{READ_RETRIES} times in a row (writers compacting the run). Retry the read"
        )

    # -- runs and epochs (small tables, rewritten whole) -----------------------------------
    def _upsert(self, table: str, df: pl.DataFrame, file: str | None) -> int:
        df = conform(df, table, file=file).unique(maintain_order=True)
        _check_frame_ids(df)
        with self._locked():
            return self._upsert_locked(table, df, self._read_small(table))

    def _upsert_locked(self, table: str, df: pl.DataFrame, old: pl.DataFrame) -> int:
        """Upsert conformed rows ``df`` into ``table``, whose stored rows are ``old`` (locked)."""
        key = list(KEYS[table])
        if table == "runs":
            # A partial update (say, only the status) keeps the fields it leaves null.
            df = df.join(old, on=key, how="left", suffix="_old").select(
                *key,
                *(pl.coalesce(c, f"{c}_old").alias(c) for c in df.columns if c not in key),
            )
        changed = df.join(old, on=df.columns, how="anti", nulls_equal=True)
        if changed.height == 0:
            return 0
        merged = pl.concat([old.join(changed.select(key), on=key, how="anti"), changed])
        atomic_write_parquet(merged.sort(key), self.root / f"{table}.parquet")
        return changed.height

    def write_runs(self, df: pl.DataFrame, *, file: str | None = None) -> int:
        """Insert or update runs by ``run_id``; returns how many rows changed.

        A null field of an update keeps the stored value, so a status change
        can be written as just ``run_id`` and ``status``.
        """
        return self._upsert("runs", df, file)

    def update_runs(
        self, rows: Callable[[pl.DataFrame], pl.DataFrame], *, file: str | None = None
    ) -> int:
        """Upsert the runs rows that ``rows`` computes, computing and writing them under the lock.

        For rows derived from what is stored (a run's energy from its samples,
        fields of its current row): no other writer can change the store
        between the read and the write, so concurrent writers to one run all
        end with rows computed from every sample stored before them.

        Args:
            rows: Called once, with the store's lock held, with the ``runs``
                table as stored; returns the rows to upsert (as for
                :meth:`write_runs`). It may read the store (:meth:`samples`,
                which takes no lock) but must not write to it.
            file: Where the rows came from, for messages.

        Returns:
            How many rows changed.

        Raises:
            StoreError: The store could not be read or written.

        """
        with self._locked():
            old = self._read_small("runs")
            df = conform(rows(old), "runs", file=file).unique(maintain_order=True)
            _check_frame_ids(df)
            return self._upsert_locked("runs", df, old)

    def write_epochs(
        self,
        df: pl.DataFrame,
        *,
        file: str | None = None,
        conflicts: Literal["replace", "raise"] = "replace",
    ) -> int:
        """Insert or update epoch marks by (run_id, epoch); returns how many rows changed.

        Args:
            df: Rows in the ``epochs`` schema.
            file: Where the rows came from, for messages.
            conflicts: ``replace`` (default): a mark replaces the stored mark of
                its (run_id, epoch). ``raise`` (what :class:`profiler.hooks.EpochHooks`
                write with): a mark whose (run_id, epoch) is stored with another
                ``start`` is another stretch of the run, and the whole batch is
                refused, checked under the store's lock so that two writers of one
                run cannot both mark an epoch. The same mark again is no change;
                the same mark with its ``end`` moved (an epoch that grew, as Ray
                Train's repeated reports make it) replaces it.

        Raises:
            SchemaError: The rows do not fit the schema, or (``conflicts="raise"``)
                a mark clashes with a stored one; also (either mode) two marks of
                the batch share a (run_id, epoch).
            StoreError: The store could not be read or written.

        """
        if conflicts not in ("replace", "raise"):
            raise BadInputError(f"conflicts must be 'replace' or 'raise'; found {conflicts!r}")
        if conflicts == "replace":
            return self._upsert("epochs", df, file)
        df = conform(df, "epochs", file=file).unique(maintain_order=True)
        _check_frame_ids(df)
        key = list(KEYS["epochs"])  # conform refused two marks of one key in the batch
        with self._locked():
            old = self._read_small("epochs")
            both = df.join(old, on=key, how="inner", suffix="_old")
            clash = both.filter(pl.col("start") != pl.col("start_old"))
            if clash.height:
                r = clash.row(0, named=True)
                top = old.filter(pl.col("run_id") == r["run_id"]).get_column("epoch").max()
                free = top + 1 if isinstance(top, int) else 0
                raise SchemaError(
                    f"{where(file)}run {r['run_id']!r} epoch {r['epoch']} is already in the store "
                    f"at {self.root} as {r['start_old']} to {r['end_old']}; the new mark is "
                    f"{r['start']} to {r['end']}. Expected a new epoch number (the store keeps "
                    "one mark per run and epoch; another writer of the run marked it): number "
                    f"on from {free}, or use another run id"
                    + (f" ({clash.height} marks clash)" if clash.height > 1 else "")
                )
            return self._upsert_locked("epochs", df, old)

    def _read_small(self, table: str) -> pl.DataFrame:
        path = self.root / f"{table}.parquet"
        with _reading(self.root, path):
            there = path.exists()
        return read_store_files([path], table) if there else empty(table)

    def runs(self) -> pl.DataFrame:
        """Every run, sorted by ``run_id`` (StoreError if ``runs.parquet`` is corrupt)."""
        return self._read_small("runs")

    def epochs(self, run_id: str | None = None) -> pl.DataFrame:
        """Epoch marks, of one run or of all, sorted by run and epoch."""
        df = self._read_small("epochs")
        if run_id is not None:
            df = df.filter(pl.col("run_id") == safe_run_id(run_id))
        return df

    def run(self, run_id: str) -> dict[str, object]:
        """One run's record.

        Raises:
            BadInputError: No run has this id (the message lists a few that exist).

        """
        runs = self.runs()
        hit = runs.filter(pl.col("run_id") == safe_run_id(run_id))
        if hit.height == 0:
            n = self.samples(run_id).height  # an error path: reading them is affordable
            if n:
                # The sidecar alone stores samples only: "the store is empty" misled.
                raise BadInputError(
                    f"run {run_id!r} has {n} samples in the store at {self.root} but no run "
                    "record; a record comes from wattwise run, wattwise train, an importer or "
                    "EpochHooks writing the run's epoch marks"
                )
            known = runs["run_id"].head(5).to_list()
            raise BadInputError(
                f"no run {run_id!r} in the store at {self.root}; "
                + (f"it has {runs.height} runs, e.g. {known}" if known else "the store is empty")
            )
        return hit.row(0, named=True)
