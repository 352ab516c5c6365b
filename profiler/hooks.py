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
when marks could not be written, so no mark is lost without an error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import polars as pl

from profiler.errors import BadInputError, StoreError
from profiler.schema import UTC_US, check_run_id
from profiler.sources.base import utc_now

log = logging.getLogger(__name__)

Sink = Callable[[pl.DataFrame], object]


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
    succeeds, so its mark covers every attempt.

    Args:
        run_id: The run's id.
        sink: Called with an ``epochs`` frame at each epoch end; default
            ``Store().write_epochs``. If it raises :class:`BadInputError`, each
            pending mark is offered alone and those refused again are refused
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

    Attributes:
        marks: Every mark recorded so far, in order (written or not).
        refused: Marks the sink refused for good, each with the reason.

    Raises:
        StoreError: The store's epoch marks cannot be read (no sink given).

    """

    def __init__(
        self,
        run_id: str,
        *,
        sink: Sink | None = None,
        store: object | None = None,
        first_epoch: int | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.run_id = check_run_id(run_id)
        self.clock = clock
        #: Epoch numbers the store already had for the run when these hooks started.
        self._stored: frozenset[int] = frozenset()
        self._where = "the sink"
        if sink is None:
            if store is None:
                from profiler.store import Store

                store = Store()
            sink = store.write_epochs  # type: ignore[attr-defined]
            stored = store.epochs(self.run_id)  # type: ignore[attr-defined]
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
        try:
            self.sink(marks_frame(list(self._unsent.values())))
        except BadInputError:
            self._send_one_by_one()
        except Exception as err:  # keep training; retry with the next mark
            self._passing(err, len(self._unsent))
        else:
            self._unsent.clear()
        return not self._unsent

    def _passing(self, err: Exception, n: int) -> None:
        """Note a passing sink failure; the marks stay pending."""
        self._last_error = err
        log.warning("run %s: could not write %d epoch mark(s): %s; will retry", self.run_id, n, err)

    def _send_one_by_one(self) -> None:
        """Offer each pending mark alone; refuse for good those the sink refuses again."""
        for epoch, mark in list(self._unsent.items()):
            try:
                self.sink(marks_frame([mark]))
            except BadInputError as err:
                del self._unsent[epoch]
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

    @contextlib.contextmanager
    def epoch(self, epoch: int | None = None) -> Iterator[None]:
        """``with hooks.epoch():`` marks one epoch around the block (also when it raises)."""
        self.epoch_start(epoch)
        try:
            yield
        finally:
            self.epoch_end()

    def close(self) -> None:
        """Write any marks still waiting; raise when a mark could not be written.

        Raises:
            StoreError: Marks are still pending after a last try (the sink kept
                failing); they are in ``marks``, to be written with
                ``Store.write_epochs(marks_frame(hooks.marks))`` once it works.
            BadInputError: The sink refused marks for good (``refused`` says why).

        """
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
            self.close()
        except (StoreError, BadInputError) as err:
            log.error("run %s: %s", self.run_id, err)


class NoOpHooks:
    """Same calls as :class:`EpochHooks`, recording nothing (non-zero ranks)."""

    marks: list[EpochMark] = []

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
    return EpochHooks(run_id, **kwargs) if rank == 0 else NoOpHooks()


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
