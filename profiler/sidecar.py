"""The per-node sidecar: samples sources on a steady clock and ships batches without losing any.

Two threads. The *sampler* reads every source at ``interval_s`` (ticks are
scheduled on ``time.monotonic()`` as ``t0 + k * interval_s``, so they do not
drift; ticks missed because the machine stalled are skipped and counted),
checks readings with :class:`~profiler.sources.base.SampleGuard`, and every
``batch_interval_s`` cuts the buffered samples into a numbered batch. The
*shipper* hands batches to the receiver oldest first. When the receiver
raises, the batch and every queued one go to the spill :class:`Journal` on
local disk, and the shipper retries the oldest journal batch every
``retry_s``; once it is accepted the journal is drained in order. A batch
the receiver refuses as bad input (:class:`~profiler.errors.BadInputError`,
e.g. a schema error or a conflict with a stored sample) is no outage: it is
set aside as ``rejected-batch-<seq>.parquet`` in the journal directory, with
why in ``rejected-batch-<seq>.reason.txt`` next to it (a
``-<n>`` suffix where that name is taken), the reason is logged, and later
batches are delivered. Memory is
bounded: when queued batches exceed ``max_memory_rows`` the sampler spills
new batches straight to the journal.

A source read that raises or does not return within ``read_timeout_s`` is
reported once per incident; its devices get a marked sample (power and
counter null, ``note`` set) for that tick, and the other sources carry on.

**Attribution.** Each sample gets the run that held its device at the
sample's own timestamp, in this order: a source added for a run
(:meth:`Sidecar.add_source`, e.g. the modelled CPU power of one job's
processes) gives all its samples to that run; else a device attached to a
run (:meth:`Sidecar.attach`, e.g. the GPUs Ray gave a job) belongs to it;
else the node-wide run (none, or the most recent one still attached of
:meth:`Sidecar.set_run` and :meth:`Sidecar.attach_job` in node mode). Every
change of hands is stamped with the later of the sidecar's ``clock`` and the
newest sample already read of the devices concerned, and a sample belongs to
the holder of the interval ``(start, end]`` that contains its timestamp, so a
read that returns samples taken before the change (a slow or lagging source)
gives them to the run that held the device then. So several runs can share a
node, each with its own samples; :meth:`Sidecar.detach` ends everything of one
run, reading its devices once more.

**Clock.** Batches are stamped with the sidecar's ``clock`` when they are
handed to a receiver that has ``send_at(batch, sent_at)`` (the aggregator's),
so the aggregator can estimate this node's clock offset (see
:mod:`cluster.aggregator`). Resends are stamped anew.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from profiler.errors import BadInputError, StoreError
from profiler.journal import Journal, default_journal_dir
from profiler.schema import check_run_id
from profiler.sources.base import PowerSample, PowerSource, SampleGuard, samples_frame, utc_now
from profiler.store import atomic_write_parquet

log = logging.getLogger(__name__)

_EPOCH = datetime.min.replace(tzinfo=UTC)
#: Who held something over time: (start, run) sorted by start; each entry holds (start, next].
_History = list[tuple[datetime, str | None]]


class Receiver(Protocol):
    """Where sample batches go: the aggregator, or the local store until there is one."""

    def send(self, batch: pl.DataFrame) -> None:
        """Accept a batch in the ``samples`` schema; raise if it was not taken."""
        ...


class TimedReceiver(Protocol):
    """A receiver that also takes the sender's clock time of each delivery attempt."""

    def send_at(self, batch: pl.DataFrame, sent_at: datetime) -> None:
        """Accept a batch sent at ``sent_at`` (the sender's UTC clock); raise if not taken."""
        ...


class StoreReceiver:
    """A receiver that writes batches to a local :class:`profiler.store.Store`.

    Args:
        store: The store; ``None`` opens the default one.

    """

    def __init__(self, store: object | None = None) -> None:
        if store is None:
            from profiler.store import Store

            store = Store()
        self.store = store

    @property
    def destination(self) -> str:
        """``store <resolved root>``: the spill journal keeps batches for this store only."""
        return f"store {Path(self.store.root).resolve()}"  # type: ignore[attr-defined]

    def send(self, batch: pl.DataFrame) -> None:
        """Write the batch (idempotently) to the store."""
        self.store.write_samples(batch)  # type: ignore[attr-defined]


class _CallableReceiver:
    def __init__(self, fn: Callable[[pl.DataFrame], object]) -> None:
        self.fn = fn

    def send(self, batch: pl.DataFrame) -> None:
        self.fn(batch)


@dataclass(slots=True)
class SidecarStats:
    """Counters of a sidecar, in rows (samples) unless named otherwise.

    Attributes:
        ticks: Sampling rounds done.
        skipped_ticks: Rounds skipped because the sampler fell behind.
        samples: Samples taken (including marked ones).
        marked: Samples marked because their source failed, hung or gave nonsense.
        bad_reads: Source reads that raised or timed out.
        sent: Rows the receiver accepted (first try or from the journal).
        spilled: Rows written to the journal.
        lost: Rows dropped because neither the receiver nor the journal took them.
        batches_sent: Batches the receiver accepted.
        send_failures: Receiver calls that raised.
        rejected_batches: Batches set aside: journal batch files that could not be
            read back (torn or corrupt), and batches the receiver refused as bad input
            (:class:`~profiler.errors.BadInputError`, a schema error or a conflict with
            a stored sample: resending cannot change the answer). Each is kept as
            ``rejected-batch-<seq>.parquet`` in the journal directory (``-<n>`` added
            where an earlier one has that name), the reason is logged as an error, and
            delivery goes on with the next batch.
        rejected_rows: Rows of those batches, where their size is known (from the
            batch, the parquet footer, or the journal that wrote them); files of
            unknown size add nothing here.

    """

    ticks: int = 0
    skipped_ticks: int = 0
    samples: int = 0
    marked: int = 0
    bad_reads: int = 0
    sent: int = 0
    spilled: int = 0
    lost: int = 0
    batches_sent: int = 0
    send_failures: int = 0
    rejected_batches: int = 0
    rejected_rows: int = 0


@dataclass(slots=True)
class _Runner:
    """One source with its guard, worker thread and the devices it has shown."""

    source: PowerSource
    guard: SampleGuard
    pool: ThreadPoolExecutor
    pending: Future[list[PowerSample]] | None = None
    devices: dict[str, str | None] = field(default_factory=dict)
    run_id: str | None = None  # set: every sample of this source belongs to this run
    key: str = ""
    last_ts: dict[str, datetime] = field(default_factory=dict)  # newest sample per device


@dataclass(slots=True)
class _Batch:
    seq: int
    frame: pl.DataFrame | None  # None once spilled to the journal


class Sidecar:
    """Samples power sources and ships them in batches to a receiver.

    Use :meth:`start`/:meth:`stop` (or ``with Sidecar(...)``) to run it in the
    background, :meth:`run` to block for a while, or :meth:`tick`,
    :meth:`cut` and :meth:`ship` to drive it step by step.

    Args:
        sources: Power sources to read each tick.
        node: Node name stored with the samples; default the host name.
        run_id: Run the samples belong to (``None``: unassigned).
        interval_s: Seconds between ticks, 0.1 to 3600.
        batch_interval_s: Seconds between batches, finite and > 0 (at least one
            tick is used).
        receiver: A :class:`Receiver`, a :class:`TimedReceiver` (given the send
            time too) or a callable taking the batch frame; default writes to the
            local store.
        journal: Spill journal, or its directory; default
            ``default_journal_dir()/<node>``. A directory is opened for the
            receiver's destination (see :class:`~profiler.journal.Journal`): batches
            spilled there for another store or receiver are left alone, never
            delivered to this one.
        max_memory_rows: Rows kept in memory waiting to be shipped before new
            batches go straight to the journal.
        read_timeout_s: Longest a source read may take in s; default the interval, at
            least 1 s (a busy machine can delay a read by a few ticks at 10 Hz).
        retry_s: Seconds between receiver retries during an outage; default
            ``batch_interval_s``.
        clock: UTC wall clock stamped on each delivery attempt for receivers with
            ``send_at`` (default :func:`profiler.sources.base.utc_now`).

    Attributes:
        stats: The :class:`SidecarStats` counters.

    Raises:
        BadInputError: An interval outside its range (or not a finite number), or a
            bad run id.

    """

    def __init__(
        self,
        sources: Sequence[PowerSource],
        *,
        node: str | None = None,
        run_id: str | None = None,
        interval_s: float = 1.0,
        batch_interval_s: float = 5.0,
        receiver: Receiver | TimedReceiver | Callable[[pl.DataFrame], object] | None = None,
        journal: Journal | str | Path | None = None,
        max_memory_rows: int = 100_000,
        read_timeout_s: float | None = None,
        retry_s: float | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:

        if not 0.1 <= interval_s <= 3600:
            raise BadInputError(
                f"sidecar interval must be between 0.1 s and 3600 s; found {interval_s} s"
            )
        if not (math.isfinite(batch_interval_s) and batch_interval_s > 0):
            raise BadInputError(
                f"sidecar batch interval must be a finite number of seconds > 0; found "
                f"{batch_interval_s} s"
            )
        if not sources:
            raise BadInputError("the sidecar needs at least one power source; none given")
        self.node = node or socket.gethostname()
        self._base_run = None if run_id is None else check_run_id(run_id)  # set_run's
        self._node_stack: list[str] = []  # runs given the whole node by attach_job, oldest first
        self._node_hist: _History = [(_EPOCH, self._base_run)]
        self._dev_hist: dict[str, _History] = {}  # device -> runs attached to it over time
        self.interval_s = float(interval_s)
        self.batch_interval_s = max(float(batch_interval_s), self.interval_s)
        self.read_timeout_s = (
            max(self.interval_s, 1.0) if read_timeout_s is None else read_timeout_s
        )
        self.retry_s = self.batch_interval_s if retry_s is None else retry_s
        self.max_memory_rows = max_memory_rows
        if receiver is None:
            receiver = StoreReceiver()
        elif not hasattr(receiver, "send") and not hasattr(receiver, "send_at"):
            receiver = _CallableReceiver(receiver)
        self.receiver: Receiver = receiver  # type: ignore[assignment]
        if journal is None and (
            self.node in ("", ".", "..") or any(c in self.node for c in ("/", "\\", "\0"))
        ):
            # The node names its default journal folder: '../x' would put it elsewhere.
            raise BadInputError(
                "sidecar node name must be one folder name (no '/', '\\', NUL, '.' or '..'): "
                f"it names the default spill journal {default_journal_dir()}/<node>; found "
                f"{self.node!r} (give another --node, or --journal DIR)"
            )
        if not isinstance(journal, Journal):
            journal = Journal(
                journal if journal is not None else default_journal_dir() / self.node,
                destination=_destination(self.receiver),
            )
        self.journal = journal
        self.clock = clock
        self.stats = SidecarStats()
        self._runners = [self._runner(s, None, f"s{i}") for i, s in enumerate(sources)]
        self._added = 0
        self._tick_lock = threading.Lock()
        self._buffer: list[tuple[PowerSample, str | None]] = []
        self._queue: deque[_Batch] = deque()
        self._queued_rows = 0
        self._seq = max((seq for seq, _ in self.journal.pending()), default=0)
        self._lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._outage = False
        self._spill_failing = False
        self._skip: set[int] = set()  # journal batches set aside that could not be renamed
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _runner(source: PowerSource, run_id: str | None, key: str) -> _Runner:
        name = getattr(source, "name", type(source).__name__)
        return _Runner(
            source,
            SampleGuard(name, log),
            ThreadPoolExecutor(1, thread_name_prefix=f"wattwise-read-{name}"),
            run_id=run_id,
            key=key,
        )

    # -- attribution --------------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The node-wide run now: the most recent one attached and not yet detached."""
        return self._node_hist[-1][1]

    @property
    def node_runs(self) -> list[str]:
        """The runs holding the whole node, oldest first (the last one gets the samples)."""
        return ([self._base_run] if self._base_run is not None else []) + self._node_stack

    def _owner(self, r: _Runner, device: str, ts: datetime) -> str | None:
        """The run a sample of ``device`` read from ``r`` and stamped ``ts`` belongs to."""
        if r.run_id is not None:
            return r.run_id
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        h = self._dev_hist.get(device)
        run = _held_at(h, ts) if h else None
        if run is not None:
            return run
        node = self._node_hist
        return _held_at(node, ts) if ts > node[0][0] else node[0][1]

    def _change_at(self, devices: Sequence[str] | None) -> datetime:
        """When a change of hands takes effect.

        The later of the clock and the newest sample already read of ``devices``
        (``None``: all), which were given out already; from the start when none
        was read yet (nothing was given out).
        """
        seen = [
            ts
            for r in self._runners
            if r.run_id is None
            for d, ts in r.last_ts.items()
            if devices is None or d in devices
        ]
        if not seen:
            return _EPOCH
        now = self.clock()
        return max([now if now.tzinfo else now.replace(tzinfo=UTC), *seen])

    @staticmethod
    def _hand(h: _History, run: str | None, at: datetime) -> None:
        """Record that ``run`` holds from ``at`` on (no entry if it holds already)."""
        if h and h[-1][1] == run:
            return
        at = max(at, h[-1][0]) if h else at
        if h and h[-1][0] == at:
            h.pop()  # the previous holder held nothing: replace it
            if h and h[-1][1] == run:
                return
        h.append((at, run))

    def _node_changed(self) -> None:
        """Record the node-wide run after a change of ``_base_run``/``_node_stack``."""
        now = self._node_stack[-1] if self._node_stack else self._base_run
        if now != self._node_hist[-1][1]:
            self._hand(self._node_hist, now, self._change_at(None))

    def _seen(self, r: _Runner, samples: Sequence[PowerSample]) -> None:
        for s in samples:
            r.devices[s.device] = s.model
            r.last_ts[s.device] = s.timestamp

    def _prune(self) -> None:
        """Forget holders no sample can reach any more.

        The guard refuses samples older than the newest one of their device, so
        no read returns a sample from before every source's newest one.
        """
        shared = [r for r in self._runners if r.run_id is None]
        for d in list(self._dev_hist):
            h = self._dev_hist[d]
            seen = [r.last_ts[d] for r in shared if d in r.last_ts]
            if not seen:
                continue
            wm = min(seen)
            while len(h) > 1 and h[1][0] <= wm:
                h.pop(0)
            if len(h) == 1 and h[0][1] is None and h[0][0] <= wm:
                del self._dev_hist[d]
        seen = [min(r.last_ts.values()) for r in shared if r.last_ts]
        if seen:
            wm, h = min(seen), self._node_hist
            if len(h) > 1 and h[1][0] <= wm:
                while len(h) > 1 and h[1][0] <= wm:
                    h.pop(0)
                h[0] = (_EPOCH, h[0][1])

    def _known_device(self, device: str) -> str:
        """A device id as the sources name it: aliases (e.g. GPU UUIDs) resolved."""
        for r in self._runners:
            if device in r.devices or device in (getattr(r.source, "devices", None) or ()):
                return device
        for r in self._runners:
            aliases = getattr(r.source, "device_aliases", None)
            if isinstance(aliases, dict) and device in aliases:
                return str(aliases[device])
        if device.strip().isdigit():
            return str(int(device))
        return device

    def attach(self, run_id: str, devices: Sequence[str | int]) -> list[str]:
        """Give ``devices`` (and their samples from now on) to ``run_id``.

        Device ids are those the sources use (NVML: the GPU index); a GPU UUID
        is accepted where the source lists it in ``device_aliases``. A device
        another run holds is taken over (Ray gave it to this run).

        Returns:
            The device ids as stored with the samples.

        Raises:
            BadInputError: A bad run id.

        """
        rid = check_run_id(run_id)
        names = [self._known_device(str(d)) for d in devices]
        with self._tick_lock:
            for d in names:
                h = self._dev_hist.setdefault(d, [])
                prev = h[-1][1] if h else None
                if prev is not None and prev != rid:
                    log.info("sidecar: device %s moves from run %s to run %s", d, prev, rid)
                self._hand(h, rid, self._change_at([d]))
        return names

    def detach(self, run_id: str, *, final_read: bool = True) -> int:
        """End all of ``run_id``: its devices, its sources, its node-wide hold.

        Its sources are read once more and closed; the sources of its devices are
        read once more (samples stamped up to now are still its). The node goes
        back to the most recent node-wide run still attached.

        Returns:
            Samples taken by the final reads of its sources.

        """
        rid = check_run_id(run_id)
        n = 0
        for r in [r for r in self._runners if r.run_id == rid]:
            n += self.remove_source(r.key, final_read=final_read)
        with self._tick_lock:
            mine = [d for d, h in self._dev_hist.items() if h and h[-1][1] == rid]
            for d in mine:
                self._hand(self._dev_hist[d], None, self._change_at([d]))
            if rid in self._node_stack:
                self._node_stack.remove(rid)
            if self._base_run == rid:
                self._base_run = None
            self._node_changed()
            if final_read and mine:
                # Read the sources of its devices once more: what they took up to now is
                # the run's (by timestamp), and is shipped without waiting for a tick.
                got: list[tuple[PowerSample, str | None]] = []
                for r in self._runners:
                    if r.run_id is None and any(d in r.devices for d in mine):
                        got += [
                            (s, self._owner(r, s.device, s.timestamp))
                            for s in self._read_now(r, final_read=True)
                        ]
                self._keep(got)
        return n

    def attach_job(
        self,
        run_id: str,
        *,
        gpus: Sequence[str | int] = (),
        pid: int | None = None,
        process_options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Attribute a job's samples on this node to ``run_id``, the best way the sources allow.

        1. The job was given GPUs: those devices are attached to the run (:meth:`attach`).
        2. Else, when the node is measured by the modelled CPU source (no
           GPU) and the job's process id is known: a
           :class:`~profiler.sources.process.ProcessCpuSource` for its process
           tree is added for the run, modelled with the same board power.
        3. Else the run takes the whole node: every sample of the node goes to
           it until it detaches; then the node goes back to the run that held
           it before (if still attached), so of runs sharing such a node, the
           most recently attached gets the samples.

        Args:
            run_id: The run.
            gpus: Device ids of the job's GPUs (Ray's ``get_gpu_ids()``).
            pid: Process id of the job's command.
            process_options: More arguments for the process source.

        Returns:
            ``{"mode": "devices"|"process"|"node", ...}`` with the devices or source
            key. ``{"mode": "process", "pending": True}`` when case 2 applies but no
            ``pid`` was given: nothing is attached yet; call again with the pid once
            the command runs (the process source counts from the process start, so
            nothing is lost). Cases 1 and 3 are best attached before the command starts.

        """
        rid = check_run_id(run_id)
        if gpus:
            return {"mode": "devices", "devices": self.attach(rid, gpus)}
        node_model = next(
            (
                r.source
                for r in self._runners
                if r.run_id is None
                and getattr(r.source, "name", "") == "modelled"
                and hasattr(r.source, "board_power_w")
            ),
            None,
        )
        if node_model is not None and pid is None:
            return {"mode": "process", "pending": True}
        if node_model is not None and pid is not None:
            from profiler.errors import WattwiseError
            from profiler.sources.process import ProcessCpuSource

            opts = {
                "board_power_w": node_model.board_power_w,
                "idle_w": getattr(node_model, "idle_w", 0.0),
                **(process_options or {}),
            }
            try:
                src = ProcessCpuSource(pid, **opts)
            except WattwiseError as err:
                log.warning("sidecar: run %s: %s; it takes the whole node instead", rid, err)
            else:
                key = self.add_source(src, run_id=rid)
                return {"mode": "process", "device": src.device, "key": key}
        with self._tick_lock:
            prev = self.run_id
            if prev is not None and prev != rid:
                log.warning(
                    "sidecar on %s: run %s takes the whole node from run %s (its sources cannot "
                    "tell the runs apart): all the node's samples go to run %s until it "
                    "detaches, then back to run %s if it still runs",
                    self.node,
                    rid,
                    prev,
                    rid,
                    prev,
                )
            if rid in self._node_stack:
                self._node_stack.remove(rid)
            self._node_stack.append(rid)
            self._node_changed()
        return {"mode": "node"}

    def owners(self) -> dict[str, str | None]:
        """Who owns what now: device -> run, ``source:<key>`` -> run, ``*`` -> node-wide run."""
        out: dict[str, str | None] = {
            d: h[-1][1] for d, h in self._dev_hist.items() if h and h[-1][1] is not None
        }
        for r in self._runners:
            if r.run_id is not None:
                out[f"source:{r.key}"] = r.run_id
        out["*"] = self.run_id
        return out

    def add_source(self, source: PowerSource, *, run_id: str | None = None) -> str:
        """Start reading ``source`` at the next tick; its samples belong to ``run_id`` if given.

        Returns:
            A key for :meth:`remove_source`.

        """
        rid = None if run_id is None else check_run_id(run_id)
        with self._tick_lock:
            self._added += 1
            key = f"a{self._added}"
            self._runners = [*self._runners, self._runner(source, rid, key)]
        return key

    def remove_source(self, key: str, *, final_read: bool = True) -> int:
        """Stop reading an added source, after one last read (kept), and close it.

        Returns:
            Samples the final read took (0 for an unknown key).

        """
        with self._tick_lock:
            r = next((r for r in self._runners if r.key == key), None)
            if r is None:
                return 0
            self._runners = [x for x in self._runners if x is not r]
            got = self._read_now(r, final_read=final_read)
            if got:
                with self._lock:
                    self._buffer.extend((s, self._owner(r, s.device, s.timestamp)) for s in got)
                self.stats.samples += len(got)
        r.pool.shutdown(wait=False, cancel_futures=True)
        try:
            r.source.close()
        except Exception as err:
            log.debug("closing %s failed: %s", r.source.name, err)
        return len(got)

    def _read_now(self, r: _Runner, *, final_read: bool) -> list[PowerSample]:
        """Keep a late read that returned since the last tick, then read once more.

        A read still out is left to the next tick; a final read that does not
        return within the read timeout becomes the runner's pending read.
        """
        got: list[PowerSample] = []
        if r.pending is not None and r.pending.done():
            try:
                got = r.guard.check(r.pending.result(timeout=0))
            except Exception as err:
                log.warning("sidecar: late read of %s failed: %s", r.source.name, err)
            r.pending = None
        if final_read and r.pending is None:
            fut = r.pool.submit(r.source.read)
            try:
                got += r.guard.check(fut.result(self.read_timeout_s))
            except Exception as err:
                if not fut.done():
                    r.pending = fut
                log.warning("sidecar: final read of %s failed: %s", r.source.name, err)
        self._seen(r, got)
        return got

    def sources(self) -> list[dict[str, Any]]:
        """The sources read now: name, key, owning run (added ones) and devices seen."""
        return [
            {
                "name": getattr(r.source, "name", type(r.source).__name__),
                "key": r.key,
                "run_id": r.run_id,
                "devices": sorted(r.devices),
            }
            for r in self._runners
        ]

    # -- sampling -----------------------------------------------------------------------------
    def tick(self) -> int:
        """Read every source once (in parallel, each within the read timeout).

        Returns:
            Samples added to the buffer.

        """
        with self._tick_lock:
            return self._tick()

    def _tick(self) -> int:
        started: list[_Runner] = []
        marks: list[tuple[PowerSample, str | None]] = []
        got: list[tuple[PowerSample, str | None]] = []
        for r in self._runners:
            if r.pending is not None:
                if not r.pending.done():
                    marks += self._mark(r, "hang", "still hung from an earlier tick")
                    continue
                # A read that missed its tick's deadline has returned since: keep what it
                # read (the source has moved past those samples, a new read would not
                # return them again).
                late, r.pending = r.pending, None
                got += self._collect(r, late, marks)
            r.pending = r.pool.submit(r.source.read)
            started.append(r)
        deadline = time.monotonic() + self.read_timeout_s
        for r in started:
            fut = r.pending
            assert fut is not None
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                if not fut.done():
                    self.stats.bad_reads += 1
                    r.guard.report(
                        "*",
                        "hang",
                        f"read did not return within {self.read_timeout_s} s; its devices get "
                        "marked samples until it does (what it reads then is kept)",
                    )
                    marks += self._mark(r, "hang", f"no reading within {self.read_timeout_s} s")
                    continue
            r.pending = None
            got += self._collect(r, fut, marks)
        got += marks
        self._keep(got)
        self.stats.ticks += 1
        self._prune()
        return len(got)

    def _keep(self, got: list[tuple[PowerSample, str | None]]) -> None:
        """Buffer samples (with their runs) and count them."""
        with self._lock:
            self._buffer.extend(got)
        self.stats.samples += len(got)
        self.stats.marked += sum(1 for s, _ in got if s.note)

    def _collect(
        self,
        r: _Runner,
        fut: Future[list[PowerSample]],
        marks: list[tuple[PowerSample, str | None]],
    ) -> list[tuple[PowerSample, str | None]]:
        """The samples of a finished read (checked), or marks in ``marks`` if it failed."""
        try:
            res = fut.result(timeout=0)
        except Exception as err:
            self.stats.bad_reads += 1
            r.guard.report("*", "error", f"read failed: {type(err).__name__}: {err}")
            marks += self._mark(r, "error", f"read failed: {err}")
            return []
        r.guard.resolve("*", "hang")
        r.guard.resolve("*", "error")
        checked = r.guard.check(res)
        self._seen(r, checked)
        return [(s, self._owner(r, s.device, s.timestamp)) for s in checked]

    def _mark(self, r: _Runner, kind: str, note: str) -> list[tuple[PowerSample, str | None]]:
        """Null samples saying why ``r``'s devices have no reading now.

        They carry no measurement (energy integration skips them) and do not
        pass the guard's ordering: a reading that returns late, stamped
        before the mark, must still be kept.
        """
        ts = utc_now()
        return [
            (
                PowerSample(dev, model, ts, None, None, source=r.source.name, note=note),
                self._owner(r, dev, ts),
            )
            for dev, model in r.devices.items()
        ]

    # -- batching and shipping ---------------------------------------------------------------
    def cut(self) -> int:
        """Turn the buffered samples into the next numbered batch.

        Returns:
            Rows in the batch (0 when the buffer was empty).

        """
        with self._lock:
            buf, self._buffer = self._buffer, []
            if not buf:
                return 0
            frame = _frame(buf, self.node)
            self._seq += 1
            batch = _Batch(self._seq, frame)
            fits = self._queued_rows + frame.height <= self.max_memory_rows
            # During an outage, or with memory full, batches go to the journal; one the
            # journal refuses stays in memory while there is room (else it is counted lost).
            if (fits and not self._outage) or (not self._spill(batch, in_memory=fits) and fits):
                self._queue.append(batch)
                self._queued_rows += frame.height
        self._wake.set()
        return frame.height

    def _spill(self, batch: _Batch, *, in_memory: bool) -> bool:
        """Move a batch to the journal (caller holds ``_lock``).

        Args:
            batch: The batch.
            in_memory: Whether the caller keeps the batch in the memory queue when
                the journal refuses it; else its rows are counted lost.

        Returns:
            Whether the journal took it.

        """
        assert batch.frame is not None
        n = batch.frame.height
        try:
            self.journal.append(batch.frame, seq=batch.seq)
        except Exception as err:  # disk full, journal bound
            if in_memory:
                if not self._spill_failing:
                    log.error(
                        "sidecar: could not spill %d samples to %s: %s; keeping batches in "
                        "memory (up to %d rows) until the receiver or the journal takes them",
                        n,
                        self.journal.directory,
                        err,
                        self.max_memory_rows,
                    )
                self._spill_failing = True
                return False
            self.stats.lost += n
            log.error(
                "sidecar: could not spill %d samples to %s and memory is full (%d rows "
                "queued, bound %d): %s; they are lost",
                n,
                self.journal.directory,
                self._queued_rows,
                self.max_memory_rows,
                err,
            )
            return False
        if self._spill_failing:
            self._spill_failing = False
            log.warning("sidecar: the journal %s takes batches again", self.journal.directory)
        self.stats.spilled += n
        return True

    def set_run(self, run_id: str | None) -> None:
        """Make ``run_id`` the node-wide run from now on (the buffer is cut first).

        It replaces the run given at construction or by an earlier call; runs that
        took the whole node with :meth:`attach_job` keep it until they detach.
        """
        rid = None if run_id is None else check_run_id(run_id)
        self.cut()
        with self._tick_lock:
            if rid is not None and rid in self._node_stack:
                self._node_stack.remove(rid)
            self._base_run = rid
            self._node_changed()

    def ship(self) -> bool:
        """Deliver queued and spilled batches, oldest first, until one fails.

        A batch refused as bad input (:class:`~profiler.errors.BadInputError`)
        is set aside (see :attr:`SidecarStats.rejected_batches`) and delivery
        goes on with the next one.

        Returns:
            True when nothing is left to deliver.

        """
        with self._ship_lock:
            while True:
                with self._lock:
                    item = self._oldest()
                if item is None:
                    return True
                if isinstance(item, BadInputError):
                    continue  # set aside; go on with the next batch
                seq, frame, from_memory = item
                try:
                    send_at = getattr(self.receiver, "send_at", None)
                    if send_at is not None:
                        send_at(frame, self.clock())
                    else:
                        self.receiver.send(frame)
                except Exception as err:
                    self.stats.send_failures += 1
                    if isinstance(err, BadInputError):
                        # Refused for what it holds, not for an outage: sending it again
                        # gets the same answer, so it is set aside and later batches go on.
                        with self._lock:
                            if from_memory:
                                self._queue.popleft()
                                self._queued_rows -= frame.height
                            path = None if from_memory else self._journal_path(seq)
                            self._reject(seq, path, err, frame=frame, refused=True)
                        continue
                    with self._lock:
                        if not self._outage:
                            log.warning(
                                "sidecar: receiver %s refused batch %d (%s: %s); spilling to "
                                "%s and retrying every %.1f s",
                                type(self.receiver).__name__,
                                seq,
                                type(err).__name__,
                                err,
                                self.journal.directory,
                                self.retry_s,
                            )
                        self._outage = True
                        kept: deque[_Batch] = deque()
                        for b in self._queue:
                            # Already counted in memory: what the journal refuses stays there.
                            if self._spill(b, in_memory=True):
                                self._queued_rows -= b.frame.height if b.frame is not None else 0
                            else:
                                kept.append(b)
                        self._queue = kept
                    return False
                with self._lock:
                    if from_memory:
                        b = self._queue.popleft()
                        self._queued_rows -= frame.height
                    else:
                        self.journal.remove(seq)
                    self.stats.sent += frame.height
                    self.stats.batches_sent += 1
                    if self._outage and len(self.journal) == 0:
                        # Nothing waits on disk (resent, or the journal took nothing): new
                        # batches queue in memory again.
                        self._outage = False
                        log.warning("sidecar: receiver is back; nothing waits in the journal")

    def _oldest(self) -> tuple[int, pl.DataFrame, bool] | BadInputError | None:
        """The oldest batch to deliver: (seq, frame, from memory), or ``None``.

        A journal file that cannot be read is set aside (:meth:`_reject`) and its
        error returned instead, so that the caller goes on with the next one.
        """
        pending = [(seq, p) for seq, p in self.journal.pending() if seq not in self._skip]
        j = pending[0] if pending else None
        m = self._queue[0] if self._queue else None
        if j is not None and (m is None or j[0] < m.seq):
            try:
                return j[0], self.journal.read(j[1]), False
            except BadInputError as err:
                self._reject(j[0], j[1], err)
                return err
        if m is not None and m.frame is not None:
            return m.seq, m.frame, True
        return None

    def _journal_path(self, seq: int) -> Path:
        """The journal file of batch ``seq`` (as :meth:`_oldest` found it)."""
        for s, p in self.journal.pending():
            if s == seq:
                return p
        return self.journal.directory / f"batch-{seq:012d}.parquet"

    def _reject(
        self,
        seq: int,
        path: Path | None,
        err: Exception,
        *,
        frame: pl.DataFrame | None = None,
        refused: bool = False,
    ) -> None:
        """Set a batch aside (kept as ``rejected-<name>`` in the journal directory), count, log it.

        For a journal file that cannot be read, and for a batch the receiver
        refused as bad input (``refused``), which sending again cannot change.
        Caller holds ``_lock``.

        Args:
            seq: The batch number.
            path: Its journal file; ``None`` for a batch held in memory
                (``frame``), which is written to the rejected name instead.
            err: Why it cannot be delivered.
            frame: The batch's rows, where they were read.
            refused: Whether the receiver refused it (else the file is unreadable).

        """
        import pyarrow.parquet as pq

        rows: int | None = None if frame is None else frame.height
        aside = _aside(self.journal.directory, f"batch-{seq:012d}.parquet")
        if path is None:
            assert frame is not None
            try:
                atomic_write_parquet(frame, aside)
            except StoreError as write_err:
                self.stats.lost += frame.height
                log.error(
                    "sidecar: receiver %s refused batch %d as bad input (%s: %s), and setting "
                    "it aside failed (%s); its %d samples are lost",
                    type(self.receiver).__name__,
                    seq,
                    type(err).__name__,
                    err,
                    write_err,
                    frame.height,
                )
                return
            where = f"kept as {aside}"
        else:
            before = self.journal.rows
            if rows is None:
                try:
                    rows = int(pq.read_metadata(path).num_rows)
                except (Exception, pl.exceptions.PanicException):
                    rows = None
            aside = _aside(path.parent, path.name)
            try:
                path.rename(aside)
            except OSError as move_err:
                self._skip.add(seq)  # left in place: skipped by this process, retried at next start
                where = f"left in place ({move_err}); skipped until the sidecar restarts"
            else:
                where = f"kept as {aside}"
            self.journal.remove(seq)  # the file has moved: this only forgets its count
            if rows is None and before - self.journal.rows > 0:
                rows = before - self.journal.rows  # this process spilled it: the journal knew
        self.stats.rejected_batches += 1
        self.stats.rejected_rows += rows or 0
        if where.startswith("kept as"):
            why = (
                f"receiver {type(self.receiver).__name__} refused batch {seq} as bad input"
                if refused
                else f"journal batch {seq} cannot be delivered"
            )
            _write_reason(aside, f"{why}: {type(err).__name__}: {err}\nrows: {rows}\n")
        if refused:
            log.error(
                "sidecar: receiver %s refused batch %d as bad input (%s: %s); sending it again "
                "cannot change that, so its %s samples are not sent; %s; later batches go on",
                type(self.receiver).__name__,
                seq,
                type(err).__name__,
                err,
                "" if rows is None else rows,
                where,
            )
        else:
            log.error(
                "sidecar: a journal batch cannot be delivered: %s; %s samples in it are not "
                "sent; %s",
                err,
                "its" if rows is None else rows,
                where,
            )

    # -- threads ------------------------------------------------------------------------------
    def _sample_loop(self) -> None:
        t0 = time.monotonic()
        k = 0
        next_cut = t0 + self.batch_interval_s
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # never let one bad round stop sampling
                log.exception("sidecar: sampling round failed")
            now = time.monotonic()
            if now >= next_cut:
                self.cut()
                next_cut += self.batch_interval_s * max(
                    1, int((now - next_cut) // self.batch_interval_s) + 1
                )
            k += 1
            due = t0 + k * self.interval_s
            if now > due:  # fell behind: skip the missed ticks instead of bursting
                missed = int((now - due) // self.interval_s) + 1
                self.stats.skipped_ticks += missed
                k += missed
                due = t0 + k * self.interval_s
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _ship_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.retry_s if self._outage else None)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.ship()
            except Exception:
                log.exception("sidecar: shipping failed")

    def start(self) -> Sidecar:
        """Start sampling and shipping in background threads; returns self."""
        if self._threads:
            return self
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._sample_loop, name="wattwise-sampler", daemon=True),
            threading.Thread(target=self._ship_loop, name="wattwise-shipper", daemon=True),
        ]
        for t in self._threads:
            t.start()
        if self.journal.pending():
            self._wake.set()  # batches left by an earlier process: resend them first
        return self

    def stop(self) -> SidecarStats:
        """Stop the threads, cut the last batch and try once more to deliver everything.

        Whatever the receiver still refuses stays in the journal for the next start.

        Returns:
            The final counters.

        """
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join()
        self._threads = []
        self._drain_pending()
        self.cut()
        try:
            self.ship()
        except Exception:  # what was not delivered stays queued or in the journal
            log.exception("sidecar: delivery at stop failed; undelivered batches stay pending")
        return self.stats

    def _drain_pending(self) -> None:
        """Keep what reads still out at stop return within the read timeout."""
        deadline = time.monotonic() + self.read_timeout_s
        with self._tick_lock:
            got: list[tuple[PowerSample, str | None]] = []
            marks: list[tuple[PowerSample, str | None]] = []
            for r in self._runners:
                fut = r.pending
                if fut is None:
                    continue
                with contextlib.suppress(Exception):
                    fut.result(timeout=max(0.0, deadline - time.monotonic()))
                if fut.done():
                    r.pending = None
                    got += self._collect(r, fut, marks)
            self._keep(got + marks)

    def close(self) -> None:
        """Stop (if running) and close every source."""
        try:
            self.stop()
        finally:
            self._close_sources()

    def _close_sources(self) -> None:
        for r in list(self._runners):
            r.pool.shutdown(wait=False, cancel_futures=True)
            try:
                r.source.close()
            except Exception as err:
                log.debug("closing %s failed: %s", r.source.name, err)

    def run(self, duration_s: float | None = None) -> SidecarStats:
        """Sample for ``duration_s`` seconds (``None``: until interrupted), then stop."""
        self.start()
        try:
            if duration_s is None:
                while True:
                    time.sleep(3600)
            else:
                self._stop.wait(duration_s)
        finally:
            stats = self.stop()
        return stats

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending_rows(self) -> int:
        """Rows taken but not yet accepted by the receiver (buffer, memory queue, journal)."""
        with self._lock:
            return len(self._buffer) + self._queued_rows + self.journal.rows


def _destination(receiver: object) -> str | None:
    """Where a receiver delivers, for the spill journal (see :class:`~profiler.journal.Journal`).

    Its ``destination`` (a store: ``store <resolved root>``), else its class (the
    aggregator's receiver: one per cluster); ``None`` for a plain callable, whose
    destination is unknown (its journal is neither recorded nor checked).
    """
    if isinstance(receiver, _CallableReceiver):
        return None
    dest = getattr(receiver, "destination", None)
    if isinstance(dest, str):
        return dest
    cls = type(receiver)
    return f"receiver {cls.__module__}.{cls.__qualname__}"


def _aside(directory: Path, name: str) -> Path:
    """``directory/rejected-<name>``, or with ``-<n>`` before the suffix if that is taken.

    Batch numbers start again after a restart with an empty journal, so a name
    can repeat; a batch set aside earlier is never overwritten.
    """
    aside = directory / f"rejected-{name}"
    n = 1
    while aside.exists():
        aside = directory / f"rejected-{Path(name).stem}-{n}{Path(name).suffix}"
        n += 1
    return aside


def reason_path(aside: Path) -> Path:
    """The text file that says why the batch at ``aside`` was set aside (``<stem>.reason.txt``)."""
    return aside.with_name(f"{aside.stem}.reason.txt")


def _write_reason(aside: Path, text: str) -> None:
    """Write why a batch was set aside next to it (best effort: the log says it too)."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        reason_path(aside).write_text(f"set aside {stamp}\n{text}")
    except OSError as err:
        log.warning("sidecar: could not write why %s was set aside: %s", aside, err)


def _frame(buf: list[tuple[PowerSample, str | None]], node: str) -> pl.DataFrame:
    """Samples with their runs as a ``samples`` frame, sorted by device and time."""
    return samples_frame([s for s, _ in buf], node=node, run_ids=[rid for _, rid in buf])


def _held_at(h: _History, ts: datetime) -> str | None:
    """Who held at ``ts``: the last entry starting before it (``None`` before the first)."""
    for start, run in reversed(h):
        if start < ts:
            return run
    return None
