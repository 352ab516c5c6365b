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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from profiler.errors import BadInputError
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

    Args:
        run_id: The run's id.
        sink: Called with a one-row ``epochs`` frame at each epoch end;
            default ``Store().write_epochs``. If it raises, the mark is kept and
            written with the next one (and at :meth:`close`).
        store: Store to write to when no sink is given.
        first_epoch: Number of the first epoch when ``epoch_start`` gets none.
        clock: UTC clock of the marks (default :func:`profiler.sources.base.utc_now`,
            the node's clock, which the node's sidecar also uses).

    Attributes:
        marks: Every mark recorded so far, in order.

    """

    def __init__(
        self,
        run_id: str,
        *,
        sink: Sink | None = None,
        store: object | None = None,
        first_epoch: int = 0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.run_id = check_run_id(run_id)
        self.clock = clock
        if sink is None:
            if store is None:
                from profiler.store import Store

                store = Store()
            sink = store.write_epochs  # type: ignore[attr-defined]
        self.sink: Sink = sink
        self.marks: list[EpochMark] = []
        self._unsent: list[EpochMark] = []
        self._next = first_epoch
        self._epoch: int | None = None
        self._start: datetime | None = None

    def epoch_start(self, epoch: int | None = None) -> None:
        """Mark the start of an epoch (default: one after the previous).

        Raises:
            BadInputError: The previous epoch was not ended.

        """
        if self._start is not None:
            raise BadInputError(
                f"run {self.run_id}: epoch_start() for epoch "
                f"{epoch if epoch is not None else self._next} while epoch {self._epoch} "
                "is still open; call epoch_end() first"
            )
        self._epoch = self._next if epoch is None else int(epoch)
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
        self.marks.append(mark)
        self._unsent.append(mark)
        self._next = self._epoch + 1
        self._start = self._epoch = None
        self.flush()
        return mark

    def flush(self) -> bool:
        """Write marks the sink has not taken yet; returns True when none remain."""
        if not self._unsent:
            return True
        try:
            self.sink(marks_frame(self._unsent))
        except Exception as err:  # keep training; retry with the next mark
            log.warning(
                "run %s: could not write %d epoch mark(s): %s; will retry",
                self.run_id,
                len(self._unsent),
                err,
            )
            return False
        self._unsent = []
        return True

    @contextlib.contextmanager
    def epoch(self, epoch: int | None = None) -> Iterator[None]:
        """``with hooks.epoch():`` marks one epoch around the block (also when it raises)."""
        self.epoch_start(epoch)
        try:
            yield
        finally:
            self.epoch_end()

    def close(self) -> None:
        """Write any marks still waiting."""
        self.flush()

    def __enter__(self) -> EpochHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    the next epoch starts then. The first epoch starts when this object is
    created (just before ``trainer.fit()``). Marks are as precise as report
    arrival on the controller; :func:`ray_train_hooks` inside the worker is
    exact. Use :func:`ray_train_callback` to get it as a Ray Train callback.

    Args:
        hooks: Where the marks go.
        key: Metric name holding the epoch number.

    """

    def __init__(self, hooks: EpochHooks, *, key: str = "epoch") -> None:
        self.hooks = hooks
        self.key = key
        self._start = utc_now()

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        """Ray Train's hook: close the reported epoch (rank 0's metrics decide)."""
        if not metrics or self.key not in metrics[0]:
            return
        end = utc_now()
        mark = EpochMark(self.hooks.run_id, int(metrics[0][self.key]), self._start, end)
        self._start = end
        self.hooks.marks.append(mark)
        self.hooks._unsent.append(mark)
        self.hooks.flush()

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
