"""Epoch hooks for training code: epoch marks (run id, epoch, start, end UTC) and nothing per batch.

Three shapes, one recorder:

* :class:`EpochHooks` for plain loops (``epoch_start()``/``epoch_end()``, as
  Carbontracker users know, or ``with hooks.epoch():``);
* :func:`lightning_callback` for PyTorch Lightning (imported lazily; Lightning
  is not a dependency of wattwise);
* :func:`ray_train_hooks` (inside a Ray Train worker: rank 0 records, other
  ranks get a no-op) and :func:`ray_train_callback` (on the driver, from the
  ``epoch`` each ``ray.train.report`` carries).

Marks are written to a sink at each epoch end (default: the local store's
``epochs`` table). There is deliberately no per-batch call: the sidecar
measures power independently, so batches cost nothing.

The store keeps one mark per (run, epoch), so an epoch number names one
stretch of a run: a number already marked for the run is refused (a second
mark would silently replace the first), and :meth:`EpochHooks.close` raises
when marks could not be written, so no mark is lost without an error. The
store itself refuses a mark for an epoch another writer of the run marked
meanwhile at another time (a retried job beside the first attempt), under its
lock; the same epoch marked at overlapping times by another writer (another
rank of the same loop) is the same epoch, and no error. An epoch whose block
raises is not marked: it did not finish.

Writing to the store, the hooks also give a run that has no ``runs`` row yet
(one measured by ``wattwise sample --run``, not started by the runner) a row
of its own, ``running``, when its first epoch starts, marked as theirs in its
``config`` (:data:`ROW_MARK`), and record it ``finished`` (``failed``) when they
close (after an error). Any later hooks of the run (a job resumed from a
checkpoint, a second training phase, another rank) update that row in turn; a
row someone else wrote is never changed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import polars as pl

from profiler.errors import BadInputError, StoreError
from profiler.schema import RUNS, UTC_US, check_run_id, conform
from profiler.sources.base import utc_now

log = logging.getLogger(__name__)

Sink = Callable[[pl.DataFrame], object]

#: Fields of the run's ``runs`` row that the hooks set themselves (not in ``run_info``).
OWN_RUN_FIELDS: tuple[str, ...] = (
    "run_id",
    "status",
    "start",
    "end",
    "trained_epochs",
    "duration_s",
)

#: Key and value in the ``config`` JSON object of a ``runs`` row the hooks created. Such a
#: row is the hooks' to update, by any hooks of the run (the process that made it, a job
#: resumed from a checkpoint, a second training phase, other ranks); a row without it
#: (written by ``wattwise run``, ``wattwise train``, the aggregator, an importer) is not.
ROW_MARK: tuple[str, str] = ("recorded_by", "profiler.hooks")


@dataclass(frozen=True, slots=True)
class EpochMark:
    """One finished epoch.

    Attributes:
        run_id: Run the epoch belongs to.
        epoch: Epoch number as the training code counts it.
        start: Start, timezone-aware UTC.
        end: End, timezone-aware UTC.

    """

    run_id: str
    epoch: int
    start: datetime
    end: datetime


def _hooks_row(row: Mapping[str, Any]) -> bool:
    """Whether a ``runs`` row was made by epoch hooks (its ``config`` holds :data:`ROW_MARK`)."""
    try:
        config = json.loads(row.get("config") or "null")
    except ValueError:
        return False
    return isinstance(config, dict) and config.get(ROW_MARK[0]) == ROW_MARK[1]


def _foreign(row: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a ``runs`` row that hooks never change (another writer's, if changed)."""
    return {k: v for k, v in row.items() if k not in OWN_RUN_FIELDS}


def _drop(marks: pl.DataFrame) -> None:
    """The sink of :class:`NoOpHooks`: keeps nothing."""


def marks_frame(marks: list[EpochMark]) -> pl.DataFrame:
    """Epoch marks as a frame in the store's ``epochs`` schema."""
    return pl.DataFrame(
        {
            "run_id": [m.run_id for m in marks],
            "epoch": [m.epoch for m in marks],
            "start": [m.start for m in marks],
            "end": [m.end for m in marks],
        },
        schema={"run_id": pl.String, "epoch": pl.Int64, "start": UTC_US, "end": UTC_US},
    )


class EpochHooks:
    """Records epoch marks of one run.

    Each epoch number is marked once per run. ``epoch_start(n)`` refuses an
    ``n`` these hooks already marked, or (when writing to a store, i.e. no
    ``sink``) one the store already has for the run: the store keeps one
    mark per (run, epoch), so the new mark would replace the old one. A
    second training phase of the same run therefore numbers on: without
    numbers, ``epoch_start()`` continues after the last stored epoch. To
    retry an epoch (say after an out-of-memory error), keep it open: call
    ``epoch_start()`` once and ``epoch_end()`` after the attempt that
    succeeds, so its mark covers every attempt. An epoch whose ``with
    hooks.epoch():`` block raises is not marked (it did not finish): the error
    goes on unchanged, the epoch number stays free for a rerun (say from a
    checkpoint), and its samples count in the run's total as time outside
    every epoch.

    Other hooks of the run may write meanwhile. The store checks each mark
    when it is written: a mark for an epoch another writer stored at a time
    that does not overlap this one (a real numbering clash, say a retried job
    beside the first attempt) is refused (see ``refused``). One whose stored
    twin overlaps it in time (``start <= their end`` and ``their start <= end``:
    another rank of the same data-parallel loop marked the same epoch first)
    is no error: it is logged at info level and the stored mark stands. With
    ``torchrun`` the simplest is still to record on rank 0 only, as
    :func:`ray_train_hooks` does::

        hooks = EpochHooks("my-run") if os.environ.get("RANK", "0") == "0" else NoOpHooks()

    Writing to a store, the hooks register a run the store has no ``runs``
    row for when its first epoch starts: status ``running``, ``start`` that
    epoch's start, ``run_info``, and :data:`ROW_MARK` in its ``config``.
    :meth:`close` records that row ``finished`` (``failed`` when marks were
    lost, or when leaving a ``with`` block on an error), with ``end``,
    ``duration_s`` (from the row's ``start``) and ``trained_epochs`` (the
    marks the store has for the run, whoever wrote them). Later hooks of the
    run (a job resumed from a checkpoint, a second training phase, another
    rank) take that row on: ``running`` again when their first epoch starts
    (the original ``start`` stays; ``end`` keeps the last one until they
    close), then ended as above. A row without the mark (from the runner,
    ``wattwise train``, the aggregator, an importer) is left alone, and so is
    one whose other fields another writer changed since these hooks last saw
    it (the runner took it over).

    Args:
        run_id: The run's id.
        sink: Called with an ``epochs`` frame at each epoch end; default
            ``Store().write_epochs`` with ``conflicts="raise"``. If it raises
            :class:`BadInputError`, each pending mark is offered alone and those
            refused again are refused
            for good: logged as errors and listed in ``refused``, so they do
            not hold back later marks. Any other error is taken as passing
            (store locked, disk full): the marks stay pending and are written
            with the next one, and at :meth:`close`.
        store: Store to write to when no sink is given.
        first_epoch: Number of the first epoch when ``epoch_start`` gets none;
            default one after the last epoch the store has for the run (0 for
            a new run or a custom sink).
        clock: UTC clock of the marks (default :func:`profiler.sources.base.utc_now`,
            the node's clock, which the node's sidecar also uses).
        run_info: Further fields of the run's ``runs`` row should the hooks
            create it, e.g. ``{"planned_epochs": 10, "architecture": "resnet50"}``
            (store only; not the fields in :data:`OWN_RUN_FIELDS`). Each value
            must have its column's type: ``int`` for integer columns, a finite
            ``int``/``float`` for float ones, ``str`` for text, or ``None``;
            ``config`` is a JSON object, as its JSON text or as a ``dict``.

    Attributes:
        marks: Every mark recorded so far, in order (written or not).
        refused: Marks the sink refused for good, each with the reason.

    Raises:
        StoreError: The store's epoch marks cannot be read (no sink given).
        BadInputError: ``run_info`` holds a field the ``runs`` table lacks, one
            the hooks set, or a value of the wrong type; or it comes with a sink.

    """

    def __init__(
        self,
        run_id: str,
        *,
        sink: Sink | None = None,
        store: object | None = None,
        first_epoch: int | None = None,
        clock: Callable[[], datetime] = utc_now,
        run_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_id = check_run_id(run_id)
        self.clock = clock
        #: The store whose ``runs`` table gets the run's row (None: a custom sink).
        self._store: Any = None
        #: The run's row as these hooks last wrote it; None until they create one.
        self._row: dict[str, Any] | None = None
        self._row_error: Exception | None = None
        if run_info and sink is not None:
            raise BadInputError(
                f"run {self.run_id}: run_info is for the run's row in the store; with a sink "
                "the hooks write no row. Drop run_info, or pass store= instead of sink="
            )
        self._run_info = self._check_run_info(run_info or {})
        #: Epoch numbers the store already had for the run when these hooks started.
        self._stored: frozenset[int] = frozenset()
        self._where = "the sink"
        self._row_due = False  # a run row to create with the first mark (store only)
        if sink is None:
            if store is None:
                from profiler.store import Store

                store = Store()
            # Insert only: the store refuses a mark another writer of the run made meanwhile.
            sink = functools.partial(store.write_epochs, conflicts="raise")  # type: ignore[attr-defined]
            stored = store.epochs(self.run_id)  # type: ignore[attr-defined]
            self._store = store
            self._row_due = True
            self._stored = frozenset(int(e) for e in stored["epoch"].to_list())
            self._where = f"the store at {getattr(store, 'root', store)}"
        self.sink: Sink = sink
        self.marks: list[EpochMark] = []
        self.refused: list[tuple[EpochMark, str]] = []
        self._unsent: dict[int, EpochMark] = {}  # one pending mark per epoch, never two
        self._marked: set[int] = set()
        self._last_error: Exception | None = None
        if first_epoch is None:
            first_epoch = max(self._stored) + 1 if self._stored else 0
        self._next = first_epoch
        self._epoch: int | None = None
        self._start: datetime | None = None
        self._first_start: datetime | None = None  # of the first epoch started: the row's start

    def _check_run_info(self, info: Mapping[str, Any]) -> dict[str, Any]:
        """``info`` as fields of the run's row, checked against the ``runs`` table.

        Returns:
            The fields with Python values of their columns' types, ``config`` as
            JSON text of an object holding :data:`ROW_MARK`.

        """
        known = {c.name for c in RUNS} - set(OWN_RUN_FIELDS)
        own = sorted(set(info) & set(OWN_RUN_FIELDS))
        if own:
            raise BadInputError(
                f"run {self.run_id}: run_info: the hooks set {', '.join(OWN_RUN_FIELDS)} "
                f"themselves; found {own}"
            )
        unknown = sorted(set(info) - known)
        if unknown:
            raise BadInputError(
                f"run {self.run_id}: run_info: expected columns of the runs table "
                f"({', '.join(sorted(known))}); found {unknown}"
            )
        types = {c.name: c.dtype for c in RUNS}
        fields = {k: self._check_field(k, v, types[k]) for k, v in info.items() if k != "config"}
        fields["config"] = self._check_config(info.get("config"))
        conform(self._run_frame({**fields, "status": "running"}), "runs", file="run_info")
        return fields

    def _check_field(self, name: str, value: Any, dtype: pl.DataType) -> Any:
        """``value`` of ``run_info[name]`` if it has the column's type (no rounding, no parsing).

        Raises:
            BadInputError: It has another type (``planned_epochs=10.5`` would
                be stored as 10, ``batch_size="sixty"`` not at all).

        """
        if value is None:
            return None
        ok: Any = None
        if dtype == pl.Int64:
            want = "an integer (int)"
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                ok = int(value)
        elif dtype == pl.Float64:
            want = "a finite number (int or float)"
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                ok = float(value) if math.isfinite(float(value)) else None
        else:
            want = "text (str)"
            ok = value if isinstance(value, str) else None
        if ok is None:
            raise BadInputError(
                f"run {self.run_id}: run_info[{name!r}]: expected {want} or None for the runs "
                f"table's {dtype} column; found {value!r} ({type(value).__name__})"
            )
        return ok

    def _check_config(self, config: Any) -> str:
        """``run_info``'s ``config`` (None, a dict or JSON text of an object) plus :data:`ROW_MARK`.

        Raises:
            BadInputError: It is not a JSON object, as text or as a dict.

        """
        want = (
            f"run {self.run_id}: run_info['config']: expected a JSON object, as JSON text "
            "(str) or a dict of JSON values"
        )
        found: Any = {}
        if isinstance(config, Mapping):
            try:
                found = json.loads(json.dumps(dict(config), allow_nan=False))
            except (TypeError, ValueError) as err:
                raise BadInputError(f"{want}; found a dict JSON cannot hold ({err})") from err
        elif isinstance(config, str):
            try:
                found = json.loads(config)
            except ValueError as err:
                raise BadInputError(f"{want}; found text that is not JSON ({err})") from err
            if not isinstance(found, dict):
                raise BadInputError(f"{want}; found JSON {type(found).__name__}: {config!r}")
        elif config is not None:
            raise BadInputError(f"{want}; found {config!r} ({type(config).__name__})")
        return json.dumps({**found, ROW_MARK[0]: ROW_MARK[1]})

    def _run_frame(self, fields: Mapping[str, Any]) -> pl.DataFrame:
        """A one-row ``runs`` frame of this run (typed as the table, for null fields)."""
        types = {c.name: c.dtype for c in RUNS}
        row = {"run_id": self.run_id, **fields}
        return pl.DataFrame([row], schema={k: types[k] for k in row})

    def _check_new(self, epoch: int) -> None:
        """BadInputError if the run already has a mark for ``epoch``."""
        if epoch in self._marked:
            old = next(m for m in reversed(self.marks) if m.epoch == epoch)
            raise BadInputError(
                f"run {self.run_id}: epoch {epoch} was already marked by these hooks "
                f"({old.start.isoformat()} to {old.end.isoformat()}); expected a new epoch "
                f"number (the next free one is {self._free()}). To retry an epoch, keep it "
                "open: call epoch_start() once and epoch_end() after the attempt that succeeds"
            )
        if epoch in self._stored:
            raise BadInputError(
                f"run {self.run_id}: {self._where} already has a mark for epoch {epoch}; "
                "expected a new epoch number (a second mark would replace the first). Number a "
                f"further training phase on from {self._free()} (epoch_start() without a "
                "number does), or use a new run id"
            )

    def _free(self) -> int:
        """The lowest epoch number after every one the run has."""
        return max(self._marked | self._stored, default=-1) + 1

    def epoch_start(self, epoch: int | None = None) -> None:
        """Mark the start of an epoch (default: one after the previous).

        Writing to a store, the first epoch also gives the run its row, or sets
        the hooks' row of the run ``running`` again (see the class docstring).

        Raises:
            BadInputError: The previous epoch was not ended, or the run already
                has a mark for this epoch number.

        """
        if self._start is not None:
            raise BadInputError(
                f"run {self.run_id}: epoch_start() for epoch "
                f"{epoch if epoch is not None else self._next} while epoch {self._epoch} "
                "is still open; call epoch_end() first"
            )
        number = self._next if epoch is None else int(epoch)
        self._check_new(number)
        self._epoch = number
        self._start = self.clock()
        if self._first_start is None:
            self._first_start = self._start
        self._register_run()

    def epoch_end(self) -> EpochMark:
        """Mark the end of the open epoch and write its mark.

        Returns:
            The mark.

        Raises:
            BadInputError: No epoch is open.

        """
        end = self.clock()
        if self._start is None or self._epoch is None:
            raise BadInputError(
                f"run {self.run_id}: epoch_end() without epoch_start(); call epoch_start() at "
                "the beginning of each epoch"
            )
        mark = EpochMark(self.run_id, self._epoch, self._start, end)
        self._next = self._epoch + 1
        self._start = self._epoch = None
        self._record(mark)
        return mark

    def _record(self, mark: EpochMark) -> None:
        """Keep a new mark (its number checked by :meth:`_check_new`) and write it."""
        self.marks.append(mark)
        self._marked.add(mark.epoch)
        self._unsent[mark.epoch] = mark
        self.flush()

    def _extend(self, end: datetime) -> EpochMark:
        """Move the end of the last mark to ``end`` (its start stays) and write it again."""
        mark = replace(self.marks[-1], end=end)
        self.marks[-1] = mark
        self.refused = [(m, why) for m, why in self.refused if m.epoch != mark.epoch]
        self._unsent[mark.epoch] = mark  # replaces a pending older version: never two rows
        self.flush()
        return mark

    def flush(self) -> bool:
        """Write marks the sink has not taken yet; returns True when none remain.

        Sending the same pending marks again is harmless: they hold one mark
        per epoch, and the store takes a mark it already has as no change.
        """
        if not self._unsent:
            return True
        self._register_run()
        try:
            self.sink(marks_frame(list(self._unsent.values())))
        except BadInputError:
            self._send_one_by_one()
        except Exception as err:  # keep training; retry with the next mark
            self._passing(err, len(self._unsent))
        else:
            self._unsent.clear()
        return not self._unsent

    def _register_run(self) -> None:
        """Give the run a ``runs`` row, or take on the hooks' row it has (once; retried on failure).

        Nothing happens before an epoch started. Then a run without a row gets
        one, ``running`` from the first epoch's start; a row holding
        :data:`ROW_MARK` (made by earlier hooks of the run) is set ``running``
        again, its start kept; any other row is someone else's and left alone.
        """
        start = self._first_start or (self.marks[0].start if self.marks else None)
        if self._store is None or not self._row_due or start is None:
            return
        running = self._run_frame({"status": "running"})
        made: list[dict[str, Any]] = []

        def rows(old: pl.DataFrame) -> pl.DataFrame:
            cur = old.filter(pl.col("run_id") == self.run_id)
            if cur.height:
                row = cur.row(0, named=True)
                if not _hooks_row(row):
                    return running.clear()  # someone else's row: leave it
                made.append({**row, "status": "running"})
                return running.clear() if row["status"] == "running" else running
            frame = self._run_frame({**self._run_info, "status": "running", "start": start})
            made.append(conform(frame, "runs").row(0, named=True))
            return frame

        try:
            self._store.update_runs(rows)
        except Exception as err:  # keep training; the next mark tries again
            self._row_error = err
            log.warning(
                "run %s: could not register the run in %s: %s; will retry",
                self.run_id,
                self._where,
                err,
            )
            return
        self._row_error = None
        self._row_due = False
        if made:
            self._row = made[0]
            log.info("run %s: its row in %s is running", self.run_id, self._where)

    def _finish_run(self, status: str) -> None:
        """Record the hooks' row of the run as ended with ``status``, if it is still theirs.

        ``trained_epochs`` is the number of marks the store has for the run
        (other hooks of the run may have written some), ``duration_s`` runs
        from the row's ``start``. The row is left alone when another writer
        took it over: its mark gone, or a field the hooks do not set changed
        since these hooks last saw it.

        Raises:
            StoreError: The row could not be written.

        """
        if self._store is None or self._row is None or self._row["status"] == status:
            return
        end = self.clock()
        mine = self._row
        done: list[dict[str, Any]] = []

        def rows(old: pl.DataFrame) -> pl.DataFrame:
            cur = old.filter(pl.col("run_id") == self.run_id)
            row = cur.row(0, named=True) if cur.height == 1 else None
            if row is None or not _hooks_row(row) or _foreign(row) != _foreign(mine):
                return self._run_frame({"status": status}).clear()  # theirs now
            start = row["start"]
            update = self._run_frame(
                {
                    "status": status,
                    "end": end,
                    "trained_epochs": self._store.epochs(self.run_id).height,
                    "duration_s": (end - start).total_seconds() if start is not None else None,
                }
            )
            new = conform(update, "runs").row(0, named=True)
            done.append({**row, **{k: new[k] for k in update.columns}})
            return update

        self._store.update_runs(rows)
        if done:
            self._row = done[0]
        else:
            log.info("run %s: its row in %s was changed by another writer; left as is",
                     self.run_id, self._where)  # fmt: skip
            self._row = None

    def _passing(self, err: Exception, n: int) -> None:
        """Note a passing sink failure; the marks stay pending."""
        self._last_error = err
        log.warning("run %s: could not write %d epoch mark(s): %s; will retry", self.run_id, n, err)

    def _send_one_by_one(self) -> None:
        """Offer each pending mark alone; refuse for good those the sink refuses again.

        A mark the store refuses because another writer of the run stored the
        same epoch at an overlapping time (another rank) is taken as written.
        """
        for epoch, mark in list(self._unsent.items()):
            try:
                self.sink(marks_frame([mark]))
            except BadInputError as err:
                try:
                    twin = self._twin(mark)
                except Exception as read_err:  # passing: try again with the next mark
                    self._passing(read_err, 1)
                    continue
                del self._unsent[epoch]
                if twin is not None:
                    log.info(
                        "run %s: epoch %d (%s to %s) was stored first by another writer of the "
                        "run (%s to %s, overlapping: the same epoch, say another rank); kept "
                        "theirs",
                        self.run_id,
                        epoch,
                        mark.start.isoformat(),
                        mark.end.isoformat(),
                        twin.start.isoformat(),
                        twin.end.isoformat(),
                    )
                    continue
                self.refused.append((mark, str(err)))
                log.error(
                    "run %s: %s refused the mark of epoch %d (%s to %s) for good: %s",
                    self.run_id,
                    self._where,
                    epoch,
                    mark.start.isoformat(),
                    mark.end.isoformat(),
                    err,
                )
            except Exception as err:
                self._passing(err, 1)
            else:
                del self._unsent[epoch]

    def _twin(self, mark: EpochMark) -> EpochMark | None:
        """The store's mark of ``mark``'s epoch if it overlaps ``mark`` in time (store only).

        Two data-parallel ranks mark each epoch at nearly the same times; a
        real numbering clash (an epoch numbered again later) does not overlap.

        Raises:
            StoreError: The store's marks cannot be read.

        """
        if self._store is None:
            return None
        stored = self._store.epochs(self.run_id).filter(pl.col("epoch") == mark.epoch)
        for start, end in stored.select("start", "end").iter_rows():
            if start <= mark.end and mark.start <= end:
                return EpochMark(self.run_id, mark.epoch, start, end)
        return None

    @contextlib.contextmanager
    def epoch(self, epoch: int | None = None) -> Iterator[None]:
        """``with hooks.epoch():`` marks one epoch around the block, if the block finishes.

        A block that raises leaves the epoch unmarked (a crashed epoch did not
        finish; its number stays free for a rerun) and its error goes on unchanged.
        """
        self.epoch_start(epoch)
        try:
            yield
        except BaseException as err:
            self._drop_open(err)
            raise
        self.epoch_end()

    def _drop_open(self, err: BaseException) -> None:
        """Forget the open epoch without marking it (its block raised ``err``)."""
        log.info(
            "run %s: epoch %s (started %s) raised %s; not marked (its samples count in the "
            "run's total, outside every epoch)",
            self.run_id,
            self._epoch,
            self._start.isoformat() if self._start is not None else "?",
            type(err).__name__,
        )
        self._start = self._epoch = None

    def close(self) -> None:
        """Write any marks still waiting; raise when a mark could not be written.

        The hooks' row of the run (see the class docstring) is recorded
        ``finished``, or ``failed`` when this raises.

        Raises:
            StoreError: Marks are still pending after a last try (the sink kept
                failing); they are in ``marks``, to be written with
                ``Store.write_epochs(marks_frame(hooks.marks))`` once it works.
                Or the run's row could not be written.
            BadInputError: The sink refused marks for good (``refused`` says why).

        """
        try:
            self._close_marks()
        except (StoreError, BadInputError):
            self._end_run("failed")
            raise
        self._end_run("finished", must=True)

    def _end_run(self, status: str, *, must: bool = False) -> None:
        """Record the run's end in the hooks' row of the run; raise only with ``must``."""
        try:
            self._register_run()  # a row still due, or the hooks' row to take on
            if self._row_due and self._row_error is not None:
                raise StoreError(
                    f"run {self.run_id}: could not give the run a row in {self._where}: "
                    f"{self._row_error}; expected one written when the first epoch started, "
                    f"so that `wattwise runs` and `wattwise energy --run {self.run_id}` find "
                    "it. Write it with Store.write_runs once the store works"
                ) from self._row_error
            self._finish_run(status)
        except Exception as err:
            if must:
                raise
            log.error("run %s: could not record the run %s: %s", self.run_id, status, err)

    def _close_marks(self) -> None:
        """Write any marks still waiting; raise when a mark could not be written."""
        self.flush()
        refused = "; ".join(f"epoch {m.epoch}: {why}" for m, why in self.refused)
        if self._unsent:
            epochs = ", ".join(str(e) for e in self._unsent)
            raise StoreError(
                f"run {self.run_id}: {len(self._unsent)} epoch mark(s) (epochs {epochs}) could "
                f"not be written to {self._where}: {self._last_error}; expected every mark "
                "written by close(). They are in hooks.marks: write them with "
                "Store.write_epochs(marks_frame(hooks.marks)) once the store works"
                + (f". Refused for good: {refused}" if refused else "")
            ) from self._last_error
        if self.refused:
            raise BadInputError(
                f"run {self.run_id}: {self._where} refused {len(self.refused)} epoch mark(s) "
                f"for good, so the run lacks them: {refused}"
            )

    def __enter__(self) -> EpochHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
            return
        try:  # the block's own error goes on; a failing close is only logged
            self._close_marks()
        except (StoreError, BadInputError) as err:
            log.error("run %s: %s", self.run_id, err)
        self._end_run("failed")


class NoOpHooks:
    """Same calls as :class:`EpochHooks`, recording nothing (ranks other than 0).

    It stands in for :class:`EpochHooks` in every form the README shows
    (``with ... as hooks:``, ``with hooks.epoch():``, ``epoch_start()``/
    ``epoch_end()``, ``close()``), so one training loop runs on every rank.

    Args:
        run_id: The run's id (checked as :class:`EpochHooks` checks it), or None.

    Attributes:
        run_id: The run's id, or None.
        clock: UTC clock (unused; :func:`profiler.sources.base.utc_now`).
        sink: Takes a frame of marks and drops it (nothing is ever sent).
        marks: Always empty: nothing is recorded.
        refused: Always empty: nothing is written.

    Raises:
        BadInputError: ``run_id`` is not a valid run id.

    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = None if run_id is None else check_run_id(run_id)
        self.clock: Callable[[], datetime] = utc_now
        self.sink: Sink = _drop
        self.marks: list[EpochMark] = []
        self.refused: list[tuple[EpochMark, str]] = []

    def epoch_start(self, epoch: int | None = None) -> None:
        """Do nothing."""

    def epoch_end(self) -> None:
        """Do nothing."""

    @contextlib.contextmanager
    def epoch(self, epoch: int | None = None) -> Iterator[None]:
        """Run the block."""
        yield

    def close(self) -> None:
        """Do nothing."""

    def flush(self) -> bool:
        """Nothing to write."""
        return True

    def __enter__(self) -> NoOpHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        """Do nothing; the block's error, if any, goes on."""


def lightning_callback(hooks: EpochHooks) -> Any:
    """A PyTorch Lightning ``Callback`` that records each training epoch through ``hooks``.

    Raises:
        NotSupportedError: Neither ``lightning`` nor ``pytorch_lightning`` is installed.

    """
    from profiler.errors import NotSupportedError

    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as err:
            raise NotSupportedError(
                "the Lightning callback needs PyTorch Lightning: `pip install lightning`; "
                "or call hooks.epoch_start()/epoch_end() in your loop"
            ) from err

    class WattwiseEpochCallback(Callback):  # type: ignore[misc]
        """Calls ``epoch_start``/``epoch_end`` around each training epoch (rank 0 only)."""

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.is_global_zero:
                hooks.epoch_start(trainer.current_epoch)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.is_global_zero:
                hooks.epoch_end()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            hooks.close()

    return WattwiseEpochCallback()


def ray_train_hooks(
    run_id: str, *, rank: int | None = None, **kwargs: Any
) -> EpochHooks | NoOpHooks:
    """Hooks for use inside a Ray Train ``train_loop_per_worker``: only world rank 0 records.

    Args:
        run_id: The run's id.
        rank: World rank; default asks ``ray.train.get_context()``.
        **kwargs: Passed to :class:`EpochHooks` (``sink``, ``store``, ``first_epoch``).

    """
    if rank is None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
    return EpochHooks(run_id, **kwargs) if rank == 0 else NoOpHooks(run_id)


class RayTrainEpochMarks:
    """Turns epochs reported through ``ray.train.report`` into epoch marks, on the driver.

    Epoch ``n`` ends when the workers' report carrying ``{key: n}`` arrives;
    the next epoch starts then. Another report carrying the same ``n`` (say
    mid-epoch and end-of-epoch reports) moves the end of epoch ``n``'s mark
    to that report, keeping its start. The first epoch starts when this
    object is created (just before ``trainer.fit()``). Marks are as precise as
    report arrival on the controller; :func:`ray_train_hooks` inside the
    worker is exact. Use :func:`ray_train_callback` to get it as a Ray Train
    callback.

    A report of an epoch marked before, but not the last one (workers
    restarted from an older checkpoint re-run epochs), is not marked again:
    it is logged as an error and listed in ``hooks.refused``, so
    ``hooks.close()`` raises after training instead of the callback stopping
    ``trainer.fit()``.

    Args:
        hooks: Where the marks go.
        key: Metric name holding the epoch number.

    """

    def __init__(self, hooks: EpochHooks, *, key: str = "epoch") -> None:
        self.hooks = hooks
        self.key = key
        self._start = utc_now()
        self._open: int | None = None  # the last reported epoch: its mark may still grow

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        """Ray Train's hook: close the reported epoch (rank 0's metrics decide)."""
        if not metrics or self.key not in metrics[0]:
            return
        epoch = int(metrics[0][self.key])
        end = utc_now()
        previous, self._start = self._start, end
        if epoch == self._open:
            self.hooks._extend(end)
            return
        mark = EpochMark(self.hooks.run_id, epoch, previous, end)
        try:
            self.hooks._check_new(epoch)
        except BadInputError as err:
            self._open = None
            self.hooks.refused.append((mark, str(err)))
            log.error("run %s: report of epoch %d not marked: %s", self.hooks.run_id, epoch, err)
            return
        self._open = epoch
        self.hooks._record(mark)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """Ray Train's hook: write what was recorded before the failure."""
        self.hooks.flush()


def ray_train_callback(hooks: EpochHooks, *, key: str = "epoch") -> Any:
    """A Ray Train ``UserCallback`` for ``RunConfig(callbacks=[...])``, see RayTrainEpochMarks.

    Raises:
        NotSupportedError: Ray Train cannot be imported here.

    """
    from profiler.errors import NotSupportedError

    try:
        from ray.train import UserCallback
    except ImportError as err:
        raise NotSupportedError(
            f"the Ray Train callback needs ray[train] importable ({err}); "
            "or use ray_train_hooks() inside train_loop_per_worker"
        ) from err

    class WattwiseTrainCallback(RayTrainEpochMarks, UserCallback):
        """Epoch marks from ``ray.train.report``."""

    return WattwiseTrainCallback(hooks, key=key)
