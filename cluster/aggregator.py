"""The aggregator's state machine: sample batches and epoch marks in, per-epoch energy and STEP out.

A plain class (no Ray; :mod:`cluster.actors` wraps it). Per running run it keeps

* a **window** of recent samples per stream (node, device): every sample since
  the end of the last finished epoch, plus ``retain_s`` seconds before it (to
  absorb resent batches) and one sample before that (to integrate across the
  boundary). Older samples are folded into a per-stream base (cumulative
  energy and gap time at the window's first sample), so memory grows with the
  running jobs and their current epoch, never with history. A run with no
  epoch mark yet keeps its last 5 to 10 minutes (with a store; without one,
  all its samples): a first mark that starts before them rebuilds the run
  from the store;
* the **pending epoch marks** and, per finished epoch, its energy, duration,
  gap time and sample count. Marks are checked before anything is written,
  as :func:`estimators.energy.prepare_epochs` checks them at the run's end
  (no overlap, one start per epoch number, none for a run that has ended),
  so a bad mark is refused (``BadInputError``) instead of making the run
  impossible to finish;
* an :class:`estimators.step.OnlineStep` updated once per finished epoch, so
  the projection is current after every epoch.

**Incremental energy.** An incoming batch is validated in one pass, split by
run and appended to that run's list of chunks: O(rows) with no per-stream
Python work. Only when a run has a pending epoch mark are its chunks merged
into the window (sorted, duplicates dropped) and checked: an epoch is
*finished* once every stream of the run has a sample at or after the epoch's
end, or the run's newest sample is ``max_lag_s`` past it (a node whose batches
lag that much is treated as having a gap). Its energy uses exactly the
integration of :func:`estimators.energy.epoch_energy` (counter deltas, else
trapezoids, gaps over ``gap_threshold_s`` not integrated, an interval split
exactly at the boundary), evaluated on the window. History is never
recomputed per batch.

**Exactly once.** Samples are deduplicated by (node, device, timestamp)
inside the window. A new sample older than the end of the run's last finished
epoch was missed by that epoch. If its stream is new (a node whose first batch
came after the epoch closed), the run's finished epochs and STEP are rebuilt
from the store at once (``recomputed_runs``; once per such stream; epochs
finished before stay finished; if the store cannot be read the run keeps its
live state and the rebuild is tried again 5 s later). So is a run given any
stream first seen after one of its epochs finished (a device that joined
late): :func:`estimators.energy.epoch_energy` counts it in the finished
epochs too, its first power held back up to the gap threshold and the time
before that as its gap. So is a run given a known stream's samples older than
that stream's first sample seen live (a backfill: a sidecar's first batches,
failed at startup, resent after later ones; once per such batch, which is
bounded by the stream's batches before its first). Otherwise
(a known stream's batch that lagged past the epoch's closing, or a sample older
than the window) it is *late*: it is stored (the store drops duplicates) but
does not change finished epochs while the run goes on, so ``late_samples``
counts it and the run's final totals and epochs are recomputed from the store
when it ends. A known stream's new sample at or after that end can still change the
epoch: if it falls inside the stream's interval that straddled the end when the epoch
closed (a hole ``max_lag_s`` closed over, or a device silent across the end), it
splits that interval. If the interval was or becomes a gap (longer than the stream's
gap threshold), the run is rebuilt from the store as for a new stream; otherwise
(only the interpolation changes) the sample counts as late. A sample sent again
with other values keeps its first value, in memory and in the store alike (the
store skips it and counts it as ``rejected``); one batch with two values for one
sample is refused. Samples of a run that has ended are stored too (counted as
``after_finish``; a restarted sidecar resends its journal), and after the flush
that writes them the run's stored ``energy_j``, ``end``, ``duration_s`` and its
held summary are recomputed from the store, as :meth:`Aggregator.finish_run`
computes them (once per run per flush). Samples go to the store in
batches (``flush_rows`` / ``flush_interval_s``); with a write-ahead journal
(``wal``) every batch is on local disk before :meth:`Aggregator.ingest_samples`
returns, and a restart replays it.

**Clocks.** Every node stamps samples (sidecar) and epoch marks (hooks)
with its own clock, and clocks of two nodes can be seconds apart.

* *Estimate.* Each sample batch (``sent_at``: the sidecar's clock when it
  handed the batch over, stamped anew on every resend) and each forward of
  epoch marks (``node``, ``sent_at``: the mark relay's clock) gives
  ``receive time - send time`` = (aggregator clock - node clock) + one-way
  delay. The node's offset estimate is the minimum over its last
  ``clock_window`` deliveries (NTP-like): it is biased by the smallest
  one-way delay seen, never by queueing, so its error is at most that delay
  (milliseconds on a LAN; :meth:`Aggregator.stats` gives ``clock_offset_s``
  and the spread of the observations, ``clock_spread_s``). A node with no
  delivery for an hour is forgotten (at most 4096 nodes are kept, those heard
  from most recently); if it comes back, its estimate starts afresh.
* *Stored raw.* Samples and marks are stored with the timestamps their node
  gave them; nothing in the ``samples`` or ``epochs`` tables is rewritten.
  So the store's idempotent key (node, device, timestamp) stays exact: a
  batch resent after the estimate moved, or after a restart, is still
  recognised and stored once.
* *Aligned per run.* A run is aligned on the clock of its **home** node,
  the node whose clock its epoch marks use (``clock_home`` in the run's
  config, as :func:`cluster.runner.run_job` writes it; else the node of
  the first marks or samples). Samples of another node N are shifted by
  ``offset(N) - offset(home)`` when they are integrated. That shift is
  fixed for (run, N) when N's first samples of the run arrive, so
  duplicates within the run still coincide, and it is written to the run's
  config as ``clock = {"home": ..., "shift_s": {N: seconds}, "marks_node": ...}``;
  a restart, a recomputation from the store after late samples, and
  :meth:`Aggregator.epochs` of ended runs apply the same shifts. A
  one-node run (the usual case) has no shift at all: its marks and samples
  share a clock, whatever that clock's offset.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from estimators.energy import (
    DEFAULT_GAP_THRESHOLD_S,
    RHYTHM_INTERVALS,
    classify_intervals,
    inside,
    outside,
    stream_threshold,
)
from profiler.errors import BadInputError, SchemaError, StoreError
from profiler.schema import (
    RUN_STATUSES,
    SOURCES,
    TIME_END,
    TIME_MIN,
    UTC_US,
    check_run_id,
    conform,
    schema,
)

if TYPE_CHECKING:
    from profiler.journal import Journal
    from profiler.store import Store

log = logging.getLogger(__name__)

_SAMPLES_SCHEMA = schema("samples")
_REQUIRED = ("node", "device", "timestamp", "source")
_KEEP = ("node", "device", "timestamp", "power_w", "energy_j")
_KEY = ("run_id", "node", "device", "timestamp")
#: Summaries of ended runs kept in memory for queries (older ones are read from the store).
_FINISHED_CACHE = 1024
#: A run without epoch marks keeps at least this much (µs) of its newest samples in memory,
#: at most twice as much (older ones are folded; a first mark before them is read back from
#: the store).
_UNMARKED_KEEP_US = 300_000_000
#: A node with no batch for this long (µs) leaves ``node_lag_s`` (and its metric series).
_NODE_QUIET_US = 600_000_000
#: How often ingest looks for such nodes (µs).
_NODE_SWEEP_US = 60_000_000
#: A node with no delivery for this long (µs) loses its clock offset estimate (a fresh one
#: is made if it comes back).
_CLOCK_FORGET_US = 3_600_000_000
#: At most this many nodes keep a clock offset estimate (those heard from most recently).
_CLOCK_MAX_NODES = 4096

OnFinish = Callable[[str, str, dict[str, Any]], object]


# ------------------------------------------------------------------------------------ STEP glue


def _new_projector(run: Mapping[str, Any]) -> Any | None:
    """A STEP online projector for a run, or ``None`` when its planned epochs are unknown.

    Kept in one function so that a change in :mod:`estimators.step`'s API is
    adapted here only.
    """
    planned = run.get("planned_epochs")
    if planned is None or int(planned) <= 0:
        return None
    from estimators.step import OnlineStep, RunPlan

    spec = _config(run).get("gpu_spec")
    board = spec.get("gpu_board_power_w") if isinstance(spec, dict) else None
    cap = RunPlan(
        gpu_model=run.get("gpu_model"),
        gpu_count=int(run.get("gpu_count") or 1),
        power_cap_w=float(board) if isinstance(board, (int, float)) and board > 0 else None,
    ).cap_w()
    return OnlineStep(planned_epochs=int(planned), power_cap_w=cap)


def _project(
    projector: Any, energy_j: float, duration_s: float, between_j: float, gap_s: float = 0.0
) -> Any:
    """Feed one finished epoch and return the projection.

    Args:
        projector: The run's :class:`estimators.step.OnlineStep`.
        energy_j: The epoch's energy in J.
        duration_s: Its duration in s.
        between_j: Energy before it outside any epoch, in J.
        gap_s: Its time without samples in s: an epoch mostly uncovered is left
            out of STEP's stable mean (its energy would be low, not measured).

    """
    return projector.update(energy_j, duration_s, between_j=between_j, gap_s=gap_s)


def _projection_dict(proj: Any | None, reason: str = "") -> dict[str, Any]:
    if proj is None:
        return {"method": "step", "energy_j": None, "stable": False, "reason": reason}
    out: dict[str, Any] = dict(proj.as_row())
    return out


# ------------------------------------------------------------------------------------ PRE glue


def _set_clock(st: _Run) -> _Run:
    """Fill a run's clock alignment from its record's config (kept where already set)."""
    home, marks_node, shifts = _clock_of(st.row)
    if st.home is None:
        st.home = home
    if st.marks_node is None:
        st.marks_node = marks_node
    for n, us in shifts.items():
        st.shift_us.setdefault(n, us)
    return st


def _retrain(store: Store) -> bool:
    """Retrain PRE on the store (:func:`cluster.retrain.retrain`); never raises.

    Returns:
        Whether a retrain ran.

    """
    from cluster.retrain import retrain

    try:
        result = retrain(store)
    except Exception as err:  # a retrain failing must never take the aggregator down
        log.warning("PRE retrain on %s failed: %s: %s", store.root, type(err).__name__, err)
        return False
    log.info(
        "PRE retrain: %s v%d: %s",
        "accepted" if result.accepted else "rejected",
        result.version,
        result.decision,
    )
    return True


class Debounced:
    """Call ``fn()`` once, ``delay_s`` seconds after the last of a burst of triggers.

    Args:
        fn: What to run (in a timer thread).
        delay_s: Quiet time in s before it runs.

    Attributes:
        calls: How many times ``fn`` ran.

    """

    def __init__(self, fn: Callable[[], object], delay_s: float = 10.0) -> None:
        self.fn = fn
        self.delay_s = delay_s
        self.calls = 0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def __call__(self, *args: object) -> None:
        """Trigger (arguments are ignored): restart the quiet period."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay_s, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
        self.calls += 1
        try:
            self.fn()
        except Exception:
            log.exception("debounced call failed")

    def cancel(self) -> None:
        """Drop a pending call."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


# ------------------------------------------------------------------------------------ state

#: "Not set" in the per-stream int64 arrays (floor, first sample time).
_UNSET = np.iinfo(np.int64).min
#: "No such sample" in int64 µs (later than any).
_NEVER = np.iinfo(np.int64).max
#: After a failed rebuild of a reopened run (the store is down), wait this long (µs).
_REOPEN_RETRY_US = 5_000_000
_POWER, _COUNTER, _GAP = 0, 1, 2  # interval kinds, as estimators.energy


@dataclass(slots=True)
class _Block:
    """Samples of one run as columns (what a window or a queued chunk holds).

    Attributes:
        sid: Stream index within the run (int32; see ``_Run.names``).
        us: Sample time in µs since the Unix epoch (int64).
        p: Power in W (float64, NaN where unknown).
        c: Cumulative energy counter in J (float64, NaN where unknown).

    """

    sid: np.ndarray
    us: np.ndarray
    p: np.ndarray
    c: np.ndarray

    @property
    def height(self) -> int:
        """Number of samples."""
        return len(self.us)


@dataclass(slots=True)
class _Run:
    """One running run. Per-stream state lives in arrays indexed by stream index (sid).

    ``base_e``/``base_g`` are the energy (J) and gap time (s) folded away
    before the window's first sample of each stream; ``floor_us`` the time of
    that first sample once pruned; ``first_us`` the stream's first sample
    time; ``join_us`` its first sample time when it was first merged live,
    kept across rebuilds from the store (samples older than that are a
    backfill: :meth:`_View._missed`); ``pruned`` how many samples were folded
    (``_UNSET`` = not yet).
    """

    run_id: str
    row: dict[str, Any]
    projector: Any | None
    projection: Any | None = None
    chunks: list[_Block] = field(default_factory=list)
    window: _Block | None = None
    names: list[tuple[str, str]] = field(default_factory=list)  # sid -> (node, device)
    sid_of: dict[tuple[str, str], int] = field(default_factory=dict)
    base_e: np.ndarray = field(default_factory=lambda: np.zeros(0))
    base_g: np.ndarray = field(default_factory=lambda: np.zeros(0))
    floor_us: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    first_us: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    join_us: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pruned: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Gap threshold of each stream in s once its sampler's rhythm is known (NaN: not yet;
    # see estimators.energy.stream_threshold).
    thr_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # Per stream until its threshold is kept: its first sample times (µs, at most
    # RHYTHM_INTERVALS + 1, kept across pruning) and the provisional thresholds used.
    head_us: dict[int, np.ndarray] = field(default_factory=dict)
    thr_used: dict[int, set[float]] = field(default_factory=dict)
    pending: dict[int, tuple[int, int]] = field(default_factory=dict)  # epoch -> (start, end) µs
    done: list[dict[str, Any]] = field(default_factory=list)
    watermark_us: int | None = None  # end of the last finished epoch
    energy_at_watermark_j: float = 0.0
    newest_us: int | None = None
    # A run with no epoch mark yet (and a store): samples before this were folded
    # into the stream bases (see Aggregator._fold_unmarked); None: no sample yet.
    fold_from_us: int | None = None
    oldest_new_us: int | None = None  # oldest sample among the chunks not yet compacted
    received: int = 0  # rows received (before duplicates are dropped)
    late: int = 0
    skipped: int = 0
    dirty: bool = False
    # A stream first seen after an epoch closed brought samples of that epoch: the
    # aggregator rebuilds the run from the store (see Aggregator._recompute_reopened).
    reopened: bool = False
    retry_reopen_us: int = 0  # after a failed rebuild, not before this time
    # Epochs ending at or before this were finished before a rebuild from the store:
    # they stay finished (live epochs and projections never go backwards).
    keep_done_us: int = _UNSET
    sources: set[str] = field(default_factory=set)  # where its samples came from
    home: str | None = None  # node whose clock the run is aligned on (its marks' clock)
    marks_node: str | None = None  # node whose clock its epoch marks use, if not home
    shift_us: dict[str, int] = field(default_factory=dict)  # node -> µs added to its times

    def stream(self, node: str, device: str) -> int:
        """The stream index of (node, device), allocated on first sight."""
        key = (node, device)
        sid = self.sid_of.get(key)
        if sid is not None:
            return sid
        sid = len(self.names)
        self.names.append(key)
        self.sid_of[key] = sid
        if sid >= len(self.base_e):
            cap = max(8, 2 * len(self.base_e))
            grow = cap - len(self.base_e)
            self.base_e = np.concatenate((self.base_e, np.zeros(grow)))
            self.base_g = np.concatenate((self.base_g, np.zeros(grow)))
            self.floor_us = np.concatenate((self.floor_us, np.full(grow, _UNSET, np.int64)))
            self.first_us = np.concatenate((self.first_us, np.full(grow, _UNSET, np.int64)))
            self.join_us = np.concatenate((self.join_us, np.full(grow, _UNSET, np.int64)))
            self.pruned = np.concatenate((self.pruned, np.zeros(grow, np.int64)))
            self.thr_s = np.concatenate((self.thr_s, np.full(grow, np.nan)))
        return sid

    def provisional_differs(self, sid: int, final: float) -> bool:
        """Whether epochs finished while stream ``sid`` had a threshold other than ``final``."""
        return self.watermark_us is not None and bool(self.thr_used.get(sid, set()) - {final})

    @property
    def devices(self) -> int:
        """Streams that have had a sample with a value."""
        return int((self.first_us[: len(self.names)] != _UNSET).sum())


class _View:
    """The windows of several runs, merged, as exact integration streams in one set of arrays.

    Samples are sorted by (run, stream, time); stream segment ``k`` holds rows
    ``seg_a[k]:seg_b[k]``. Per stream it holds the same quantities as
    :class:`estimators.energy.EnergyStream` (cumulative energy ``e`` and gap
    time ``g`` from the segment's first sample, interval ``kind`` and energy
    ``inc``, edge powers), computed for all streams at once. Interval ``i``
    lies between rows ``i`` and ``i + 1``; those between two segments are
    meaningless and never read.

    ``rebuild``: the runs can be rebuilt from a store (a backfill older than the
    window reopens its run; without a store it counts as late).
    """

    __slots__ = (
        "runs", "goff", "gid", "us", "t", "p", "c", "key", "span", "umin", "ranks",
        "seg_a", "seg_b", "seg_g", "seg_run", "run_seg", "dt", "inc", "kind", "e", "g",
        "edge_first", "edge_last", "base_e", "base_g", "floor_us", "first_us", "join_us",
        "pruned", "thr", "thr_g", "seg_thr",
    )  # fmt: skip

    def __init__(self, runs: list[_Run], thr: float, *, rebuild: bool = True) -> None:
        self.runs = runs
        self.thr = thr
        ns = np.array([len(st.names) for st in runs], dtype=np.int64)
        self.goff = goff = np.concatenate(([0], np.cumsum(ns)))
        # Per-stream state of all runs, indexed by global stream id gid = goff[run] + sid.
        self.base_e = _cat([st.base_e[: len(st.names)] for st in runs], np.float64)
        self.base_g = _cat([st.base_g[: len(st.names)] for st in runs], np.float64)
        self.floor_us = _cat([st.floor_us[: len(st.names)] for st in runs], np.int64)
        self.first_us = _cat([st.first_us[: len(st.names)] for st in runs], np.int64)
        self.join_us = _cat([st.join_us[: len(st.names)] for st in runs], np.int64)
        self.pruned = _cat([st.pruned[: len(st.names)] for st in runs], np.int64)
        self.thr_g = _cat([st.thr_s[: len(st.names)] for st in runs], np.float64)
        sids, uss, ps, cs = [], [], [], []
        block_off: list[int] = []
        fresh_l: list[bool] = []  # per block: a new chunk (True) or the window
        may_be_late = False
        # Chunks reaching below the end of the run's last finished epoch can hold
        # samples that epoch never saw.
        below_wm = False
        # Per stream of a run with a finished epoch and new chunks: its samples P and Q
        # around the end of the run's last finished epoch (P the last before it, Q the
        # first at or after it; Q absent: the stream was silent since P). (gid, P, Q,
        # end) per run, checked in _straddled once the new samples are merged.
        around: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        for r, st in enumerate(runs):
            win = st.window
            if st.chunks and st.watermark_us is not None and win is not None and win.height:
                around.append(_around(win, st.watermark_us, int(goff[r])))
            for blk in ([st.window] if st.window is not None else []) + st.chunks:
                if blk.height:
                    sids.append(blk.sid)
                    uss.append(blk.us)
                    ps.append(blk.p)
                    cs.append(blk.c)
                    block_off.append(int(goff[r]))
                    fresh_l.append(blk is not st.window)
            # Windows hold no sample below their stream's floor: only chunks reaching
            # below the highest floor can hold late samples.
            if st.chunks and st.oldest_new_us is not None and len(st.names):
                may_be_late |= st.oldest_new_us < int(st.floor_us[: len(st.names)].max())
                if st.watermark_us is not None:
                    below_wm |= st.oldest_new_us < st.watermark_us
            st.chunks = []
            st.oldest_new_us = None
        gid = _cat(sids, np.int64)
        lengths = [len(s) for s in sids]
        if sids:
            gid += np.repeat(np.array(block_off, dtype=np.int64), lengths)
        us = _cat(uss, np.int64)
        p = _cat(ps, np.float64)
        c = _cat(cs, np.float64)
        fresh = np.repeat(np.array(fresh_l, dtype=bool), lengths) if below_wm else None
        # Samples with neither power nor a counter carry no measurement (as energy.py).
        empty = np.isnan(p) & np.isnan(c)
        if empty.any():
            for r, k in self._per_run(gid[empty]):
                runs[r].skipped += k
            keep = ~empty
            gid, us, p, c = gid[keep], us[keep], p[keep], c[keep]
            fresh = fresh[keep] if fresh is not None else None
        # One stable sort by (stream, time): windows are sorted already and chunks
        # mostly are, so it runs on presorted stretches. Stable: the first arrival of a
        # duplicated (node, device, timestamp) comes first and is the one kept.
        self.ranks: np.ndarray | None = None
        if len(us):
            self.umin = int(us.min())
            self.span = int(us.max()) - self.umin + 3
            if int(goff[-1]) * self.span < 2**62:
                key = gid * self.span + (us - (self.umin - 1))
            else:  # times too far apart for one int64 key: rank them instead
                self.ranks, inv = np.unique(us, return_inverse=True)
                self.span = len(self.ranks) + 2
                key = gid * self.span + (inv.astype(np.int64) + 1)
            order = np.argsort(key, kind="stable")
            key, gid, us, p, c = key[order], gid[order], us[order], p[order], c[order]
            fresh = fresh[order] if fresh is not None else None
            first = np.ones(len(key), dtype=bool)
            np.not_equal(key[1:], key[:-1], out=first[1:])
            if not first.all():
                key, gid, us, p, c = key[first], gid[first], us[first], p[first], c[first]
                fresh = fresh[first] if fresh is not None else None
        else:
            self.umin, self.span = 0, 3
            key = np.zeros(0, dtype=np.int64)
        # A sample older than its stream's window cannot change finished epochs.
        late = us < self.floor_us[gid] if may_be_late else None
        if late is not None and late.any():
            # ... unless it is a backfill (older than its stream's first sample seen live,
            # in a finished epoch) and there is a store to rebuild the run from with it.
            back = np.zeros(len(late), dtype=bool)
            if rebuild:
                idx = np.flatnonzero(late)
                g, u = gid[idx], us[idx]
                back[idx] = (u < self.join_us[g]) & (u < self._watermarks()[self._run_of(g)])
            for r, _ in self._per_run(gid[back]):
                runs[r].reopened = True
                runs[r].dirty = True
            for r, k in self._per_run(gid[late & ~back]):
                runs[r].late += k
                runs[r].dirty = True
            keep = ~late
            key, gid, us, p, c = key[keep], gid[keep], us[keep], p[keep], c[keep]
            fresh = fresh[keep] if fresh is not None else None
        if fresh is not None:
            self._missed(fresh, gid, us)
        self.key, self.gid, self.us, self.p, self.c = key, gid, us, p, c
        n = len(us)
        brk = np.flatnonzero(gid[1:] != gid[:-1]) + 1
        self.seg_a = np.concatenate(([0], brk)) if n else np.zeros(0, dtype=np.int64)
        self.seg_b = np.concatenate((brk, [n])) if n else np.zeros(0, dtype=np.int64)
        self.seg_g = gid[self.seg_a]
        self.seg_run = np.searchsorted(goff, self.seg_g, side="right") - 1
        self.run_seg = np.searchsorted(self.seg_run, np.arange(len(runs) + 1), side="left")
        unset = self.first_us[self.seg_g] == _UNSET
        if unset.any():
            self._joined_late(unset)
        self.first_us[self.seg_g[unset]] = us[self.seg_a[unset]]
        joined = self.join_us[self.seg_g] == _UNSET
        self.join_us[self.seg_g[joined]] = us[self.seg_a[joined]]
        self._thresholds()
        self._build()
        if around:
            self._straddled(around)

    def _thresholds(self) -> None:
        """Each segment's gap threshold: its stream's, as ``energy.stream_threshold`` gives it.

        A stream's threshold comes from its first intervals: its first sample
        times are kept in the run (across pruning) until there are
        ``RHYTHM_INTERVALS + 1`` of them; then the threshold is kept
        (``thr_g``). Until then it is provisional (the floor below 3
        intervals). If an epoch finished while a provisional threshold other
        than the final one was in use, the run is marked to be recomputed
        from the store when it finishes, as ``wattwise energy`` computes it.
        """
        self.seg_thr = self.thr_g[self.seg_g] if len(self.seg_g) else np.zeros(0)
        need = RHYTHM_INTERVALS + 1
        for k in np.flatnonzero(np.isnan(self.seg_thr)).tolist():
            g = int(self.seg_g[k])
            r = int(self.seg_run[k])
            run, sid = self.runs[r], g - int(self.goff[r])
            a, b = int(self.seg_a[k]), int(self.seg_b[k])
            head = run.head_us.get(sid)
            window = self.us[a : min(b, a + need)]
            head = window if head is None else np.union1d(head, window)[:need]
            thr = stream_threshold(head / 1e6, self.thr)
            self.seg_thr[k] = thr
            if len(head) < need:
                run.head_us[sid] = head.copy()
                if run.watermark_us is not None or run.pending:
                    run.thr_used.setdefault(sid, set()).add(thr)
                continue
            self.thr_g[g] = thr
            run.head_us.pop(sid, None)
            run.dirty |= run.provisional_differs(sid, thr)
            run.thr_used.pop(sid, None)

    def _watermarks(self) -> np.ndarray:
        """Per run, the end of its last finished epoch in µs (``_UNSET``: none yet)."""
        return np.array(
            [_UNSET if st.watermark_us is None else st.watermark_us for st in self.runs],
            dtype=np.int64,
        )

    def _run_of(self, gid: np.ndarray) -> np.ndarray:
        """Run index of each global stream id."""
        return np.searchsorted(self.goff, gid, side="right") - 1

    def _missed(self, fresh: np.ndarray, gid: np.ndarray, us: np.ndarray) -> None:
        """Flag runs given new samples (not duplicates) older than their last finished epoch's end.

        Such a sample belongs to a finished epoch that was computed without it.
        If its stream was first seen now (a node whose first batch came after the
        epoch closed), or the sample is older than its stream's first sample seen
        live (``join_us``: a backfill, e.g. a sidecar's first batches, failed at
        startup, resent after later ones), the run is marked ``reopened``: the
        aggregator rebuilds it from the store, once per such batch. Otherwise (a
        known stream's batch that lagged past the epoch's closing) the sample is
        counted as late and the run's final totals are recomputed from the store
        when it ends.
        """
        missed = fresh & (us < self._watermarks()[self._run_of(gid)])
        if not missed.any():
            return
        g, u = gid[missed], us[missed]
        reopen = (self.first_us[g] == _UNSET) | (u < self.join_us[g])
        for r, _ in self._per_run(g[reopen]):
            self.runs[r].reopened = True
            self.runs[r].dirty = True
        for r, k in self._per_run(g[~reopen]):
            self.runs[r].late += k
            self.runs[r].dirty = True

    def _joined_late(self, new: np.ndarray) -> None:
        """Flag runs with a stream first seen after one of their epochs finished.

        Those epochs were finished without it, while ``wattwise energy`` counts
        it in them: its first power held back up to its gap threshold (into a
        finished epoch when its first sample is that close to the epoch's
        end), and the time before that as its gap (which STEP weighs). The run
        is marked ``reopened`` and rebuilt from the store, as for a new
        stream's samples older than the epoch's end (:meth:`_missed`); once
        per stream, since it is known afterwards.

        Args:
            new: Per segment, whether its stream is seen for the first time.

        """
        for r in np.unique(self.seg_run[new]).tolist():
            st = self.runs[r]
            if st.watermark_us is not None:
                st.reopened = True
                st.dirty = True

    def _straddled(self, around: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]) -> None:
        """Flag runs given new samples inside the interval that straddled a finished epoch's end.

        The run's last finished epoch was integrated (at its end) over the
        interval from a stream's sample P before its end to Q after it, or
        with P's power held beyond P if the stream had no Q yet (it closed by
        ``max_lag_s`` while the stream was silent). A new sample N between
        the end and Q (one before the end is late, see :meth:`_missed`) splits
        that interval, so ``wattwise energy`` integrates P-N instead. If P-N is
        a gap, or P-Q was one (longer than the stream's gap threshold), the
        held or skipped energy was wrong: the run is marked ``reopened`` and
        rebuilt from the store (its finished epochs and STEP corrected live,
        as for a new stream). Otherwise only the interpolation differs: N
        counts as late and the run's final epochs are recomputed from the
        store when it ends.
        """
        gids = np.concatenate([g for g, _, _, _ in around])
        p_us = np.concatenate([p for _, p, _, _ in around])
        q_us = np.concatenate([q for _, _, q, _ in around])
        wm = np.concatenate([np.full(len(g), w, dtype=np.int64) for g, _, _, w in around])
        k = np.searchsorted(self.seg_g, gids)
        held = k < len(self.seg_g)
        held[held] = self.seg_g[k[held]] == gids[held]
        k, p_us, q_us, wm = k[held], p_us[held], q_us[held], wm[held]
        nxt = self.find(k, p_us, "right")  # the row after P in its stream (P is held)
        more = nxt < self.seg_b[k]
        k, nxt, p_us, q_us, wm = k[more], nxt[more], p_us[more], q_us[more], wm[more]
        n_us = self.us[nxt]
        split = (n_us >= wm) & (n_us < q_us)
        if not split.any():
            return
        k, nxt, p_us, q_us = k[split], nxt[split], p_us[split], q_us[split]
        silent = q_us == _NEVER
        was_gap = ~silent & ((q_us - p_us) / 1e6 > self.seg_thr[k])
        big = (self.kind[nxt - 1] == _GAP) | was_gap
        for r in np.unique(self.seg_run[k[big]]).tolist():
            self.runs[r].reopened = True
            self.runs[r].dirty = True
        for r, n in self._per_run(self.seg_g[k[~big]]):
            self.runs[r].late += n
            self.runs[r].dirty = True

    def _per_run(self, gids: np.ndarray) -> list[tuple[int, int]]:
        r = np.searchsorted(self.goff, gids, side="right") - 1
        counts = np.bincount(r, minlength=len(self.runs))
        return [(int(i), int(counts[i])) for i in np.flatnonzero(counts)]

    def _build(self) -> None:
        """Exact integration streams of every segment (as :meth:`EnergyStream.build`)."""
        us, p, c = self.us, self.p, self.c
        n = len(us)
        thr = np.repeat(self.seg_thr, self.seg_b - self.seg_a)[:-1] if n else self.thr
        self.t = t = us / 1e6
        dt, inc, kind, gap = classify_intervals(t, p, c, thr)
        between = self.seg_b[:-1] - 1  # intervals joining two segments
        gap[between] = False
        inc[between] = 0.0
        e = np.zeros(n)
        g = np.zeros(n)
        # Per-segment running sums, each from 0.0, so every stream's values are
        # bit-for-bit those of EnergyStream.build on that stream alone.
        for a, b in zip(self.seg_a.tolist(), self.seg_b.tolist(), strict=True):
            if b - a > 1:
                np.cumsum(inc[a : b - 1], out=e[a + 1 : b])
        if gap.any():
            gdt = np.where(gap, dt, 0.0)
            with_gap = np.unique(np.searchsorted(self.seg_a, np.flatnonzero(gap), side="right") - 1)
            for k in with_gap.tolist():
                a, b = int(self.seg_a[k]), int(self.seg_b[k])
                np.cumsum(gdt[a : b - 1], out=g[a + 1 : b])
        self.dt, self.inc, self.kind, self.e, self.g = dt, inc, kind, e, g
        self.edge_first = self._edge(self.seg_a, self.seg_a)
        self.edge_last = self._edge(self.seg_b - 1, self.seg_b - 2)

    def _edge(self, row: np.ndarray, interval: np.ndarray) -> np.ndarray:
        """Power held beyond an edge sample: its power, else a counter interval's mean power."""
        w = self.p[row].copy()
        fix = np.isnan(w) & (self.seg_b - self.seg_a >= 2)
        if fix.any():
            i = interval[fix]
            ok = (self.kind[i] == _COUNTER) & (self.dt[i] > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                w[fix] = np.where(ok, self.inc[i] / self.dt[i], np.nan)
        return np.asarray(w, dtype=np.float64)

    def find(self, seg: np.ndarray, x_us: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
        """Global row index ``searchsorted(t, x, side)`` within each query's segment."""
        if self.ranks is None:
            rel = np.clip(x_us - (self.umin - 1), 0, self.span - 1)
        elif side == "right":
            rel = np.searchsorted(self.ranks, x_us, side="right")
        else:
            rel = np.searchsorted(self.ranks, x_us, side="left") + 1
        found = np.searchsorted(self.key, self.seg_g[seg] * self.span + rel, side=side)
        return np.asarray(found, dtype=np.int64)

    def at(self, seg: np.ndarray, x_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative energy (J) and gap (s) of each query's stream at time x (µs).

        As :meth:`estimators.energy.EnergyStream.at`, for many streams at once.
        """
        t = self.t
        x = x_us / 1e6
        a, b = self.seg_a[seg], self.seg_b[seg]
        i = self.find(seg, x_us, "right") - 1
        energy = np.empty(len(x))
        gap = np.empty(len(x))
        before, after = i < a, i >= b - 1
        inner = ~(before | after)
        energy[inner], gap[inner] = inside(self, i[inner], x[inner])
        # Outside the samples: hold the edge power up to the threshold, then a gap.
        for mask, sign, row, w_all in (
            (before, -1.0, a, self.edge_first),
            (after, 1.0, b - 1, self.edge_last),
        ):
            if not mask.any():
                continue
            r = row[mask]
            anchor_e = np.zeros(len(r)) if sign < 0 else self.e[r]
            anchor_g = np.zeros(len(r)) if sign < 0 else self.g[r]
            energy[mask], gap[mask] = outside(
                np.abs(x[mask] - t[r]),
                w_all[seg[mask]],
                self.seg_thr[seg[mask]],
                anchor_e,
                anchor_g,
                sign,
            )
        return energy, gap

    def store(self, keep: np.ndarray | None = None) -> None:
        """Write the (optionally filtered) merged samples and stream state back to the runs."""
        gid, us, p, c = self.gid, self.us, self.p, self.c
        if keep is not None:
            gid, us, p, c = gid[keep], us[keep], p[keep], c[keep]
        run_of = np.searchsorted(self.goff, gid, side="right") - 1
        rows = np.concatenate(([0], np.cumsum(np.bincount(run_of, minlength=len(self.runs)))))
        goff = self.goff.tolist()
        rows_l = rows.tolist()
        for r, st in enumerate(self.runs):
            g0, g1 = goff[r], goff[r + 1]
            a, b = rows_l[r], rows_l[r + 1]
            st.window = _Block(
                (gid[a:b] - g0).astype(np.int32), us[a:b].copy(), p[a:b].copy(), c[a:b].copy()
            )
            m = g1 - g0
            st.base_e[:m] = self.base_e[g0:g1]
            st.base_g[:m] = self.base_g[g0:g1]
            st.floor_us[:m] = self.floor_us[g0:g1]
            st.first_us[:m] = self.first_us[g0:g1]
            st.join_us[:m] = self.join_us[g0:g1]
            st.pruned[:m] = self.pruned[g0:g1]
            st.thr_s[:m] = self.thr_g[g0:g1]

    def totals(self, r: int) -> dict[str, Any]:
        """Run ``r``'s measured totals so far (all streams, folded history included)."""
        k0, k1 = int(self.run_seg[r]), int(self.run_seg[r + 1])
        if k0 == k1:
            return {
                "energy_j": 0.0,
                "duration_s": None,
                "start": None,
                "end": None,
                "gap_s": 0.0,
                "n_samples": 0,
            }
        gs = self.seg_g[k0:k1]
        last = self.seg_b[k0:k1] - 1
        energy = float(np.sum(self.base_e[gs] + self.e[last]))
        gap = float(np.max(self.base_g[gs] + self.g[last]))
        first_us = self.first_us[gs]
        first = int(np.min(np.where(first_us == _UNSET, 0, first_us)))
        end = int(np.max(self.us[last]))
        n = int(np.sum(self.pruned[gs] + (self.seg_b[k0:k1] - self.seg_a[k0:k1])))
        return {
            "energy_j": energy,
            "duration_s": (end - first) / 1e6,
            "start": _us_to_dt(first),
            "end": _us_to_dt(end),
            "gap_s": gap,
            "n_samples": n,
        }


def _around(win: _Block, end_us: int, goff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per stream of a window with a sample before ``end_us``: (gid, P, Q, end) as µs.

    P is the stream's last sample before ``end_us``, Q its first at or after
    it (``_NEVER`` if none). The window is sorted by (stream, time).
    """
    starts = np.flatnonzero(np.concatenate(([True], win.sid[1:] != win.sid[:-1])))
    stops = np.append(starts[1:], win.height)
    before = np.add.reduceat((win.us < end_us).astype(np.int64), starts)
    has = before > 0
    starts, stops, before = starts[has], stops[has], before[has]
    q_row = starts + before
    q = np.where(q_row < stops, win.us[np.minimum(q_row, win.height - 1)], _NEVER)
    gid = goff + win.sid[starts].astype(np.int64)
    return gid, win.us[q_row - 1], q, end_us


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts).astype(dtype, copy=False)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us_iso(us: int) -> str:
    """µs since the Unix epoch as an ISO 8601 UTC time (for messages)."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat()


def _now_us() -> int:
    return time.time_ns() // 1000


def _us_to_dt(us: int | None) -> datetime | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


class ClockOffsets:
    """Per-node clock offset estimates: min over recent deliveries of (receive - send) time.

    Memory is bounded: a node with no delivery for ``forget_after_us`` (of the
    receiver's clock) is forgotten, checked on each observation, and at most
    ``max_nodes`` nodes are kept (those heard from most recently). A node
    that comes back after being forgotten (a rebooted host, a new pod with an
    old name) starts a fresh estimate; a node that keeps reporting keeps its
    own. Runs fix each node's shift when its first samples arrive, so
    forgetting never changes a running run's alignment.

    Args:
        window: Deliveries per node the minimum is taken over (recent ones, so
            a drifting clock is followed).
        forget_after_us: A node silent this long (µs) loses its estimate.
        max_nodes: Most nodes with an estimate.

    """

    def __init__(
        self,
        window: int = 256,
        *,
        forget_after_us: int = _CLOCK_FORGET_US,
        max_nodes: int = _CLOCK_MAX_NODES,
    ) -> None:
        self.window = window
        self.forget_after_us = forget_after_us
        self.max_nodes = max_nodes
        # node -> its recent observations (µs), least recently heard from first.
        self._obs: OrderedDict[str, deque[int]] = OrderedDict()
        self._seen: dict[str, int] = {}  # node -> receive time of its newest delivery (µs)

    def observe(self, node: str, received_us: int, sent_us: int) -> None:
        """Record one delivery: sent at ``sent_us`` (node clock), received at ``received_us``."""
        q = self._obs.get(node)
        if q is None or received_us - self._seen[node] > self.forget_after_us:
            q = self._obs[node] = deque(maxlen=self.window)  # new, or back after silence
        self._obs.move_to_end(node)
        self._seen[node] = received_us
        q.append(received_us - sent_us)
        while len(self._obs) > 1:
            oldest = next(iter(self._obs))
            silent = received_us - self._seen[oldest] > self.forget_after_us
            if not silent and len(self._obs) <= self.max_nodes:
                break
            del self._obs[oldest]
            del self._seen[oldest]

    def offset_us(self, node: str) -> int | None:
        """Aggregator minus node clock in µs (plus the least one-way delay); None if unseen."""
        q = self._obs.get(node)
        return min(q) if q else None

    def spread_us(self, node: str) -> int | None:
        """Largest minus smallest observation in µs: delays' spread (queueing, retries)."""
        q = self._obs.get(node)
        return max(q) - min(q) if q else None

    def nodes(self) -> list[str]:
        """Nodes with an estimate."""
        return sorted(self._obs)


def _dt_us(value: datetime | int | float | None) -> int | None:
    """A send time as µs since the Unix epoch (datetimes must be timezone-aware)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise BadInputError(
                f"sent_at must be timezone-aware UTC; found naive {value.isoformat()}"
            )
        return int(round(value.timestamp() * 1e6))
    return int(value)


def _config(row: Mapping[str, Any]) -> dict[str, Any]:
    raw = row.get("config")
    if not raw:
        return {}
    try:
        cfg = json.loads(str(raw))
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _clock_of(row: Mapping[str, Any]) -> tuple[str | None, str | None, dict[str, int]]:
    """(home, marks node, node -> shift µs) from a run record's config."""
    cfg = _config(row)
    found = cfg.get("clock")
    clock: dict[str, Any] = found if isinstance(found, dict) else {}
    home = clock.get("home") or cfg.get("clock_home")
    shifts = {str(k): int(round(float(v) * 1e6)) for k, v in (clock.get("shift_s") or {}).items()}
    return (
        None if home is None else str(home),
        None if clock.get("marks_node") is None else str(clock["marks_node"]),
        shifts,
    )


def align(
    samples: pl.DataFrame, marks: pl.DataFrame, row: Mapping[str, Any]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Samples and marks of one run on its home clock, by the shifts in its config.

    Args:
        samples: The run's stored samples (raw node timestamps).
        marks: The run's stored epoch marks.
        row: The run record (its ``config`` holds ``clock``).

    Returns:
        Both frames with timestamps shifted where the config says so.

    """
    home, marks_node, shifts = _clock_of(row)
    shifts = {n: us for n, us in shifts.items() if us and n != home}
    if shifts and samples.height:
        by_node = pl.col("node").replace_strict(
            {n: us for n, us in shifts.items()}, default=0, return_dtype=pl.Int64
        )
        samples = samples.with_columns(
            timestamp=pl.col("timestamp") + pl.duration(microseconds=by_node)
        )
    m = shifts.get(marks_node or "", 0)
    if m and marks.height:
        marks = marks.with_columns(
            start=pl.col("start") + pl.duration(microseconds=m),
            end=pl.col("end") + pl.duration(microseconds=m),
        )
    return samples, marks


def overlapping_marks(marks: pl.DataFrame) -> list[tuple[int, int, int, int, int, int]]:
    """Pairs of one run's epoch marks that overlap (what ``prepare_epochs`` refuses).

    Args:
        marks: One run's marks (``epochs`` schema).

    Returns:
        ``(epoch a, start a, end a, epoch b, start b, end b)`` (times in µs since
        the Unix epoch) for each mark ``b`` that starts before an earlier-starting
        mark ``a`` ends (``a``: the one of those ending last), in start order.

    """
    if marks.height < 2:
        return []
    start, end = pl.col("start").dt.epoch("us"), pl.col("end").dt.epoch("us")
    return _overlap_pairs(marks.select("epoch", start, end).iter_rows())


def _overlap_pairs(
    marks: Iterable[tuple[int, int, int]],
) -> list[tuple[int, int, int, int, int, int]]:
    """:func:`overlapping_marks` on ``(epoch, start µs, end µs)`` tuples, in any order."""
    out: list[tuple[int, int, int, int, int, int]] = []
    held: tuple[int, int, int] | None = None  # the mark ending last so far
    for ep, s, e in sorted(marks, key=lambda m: (m[1], m[2], m[0])):
        if held is not None and s < held[2]:
            out.append((*held, int(ep), int(s), int(e)))
        if held is None or e > held[2]:
            held = (int(ep), int(s), int(e))
    return out


EPOCH_COLUMNS: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "epoch": pl.Int64(),
    "start": UTC_US,
    "end": UTC_US,
    "energy_j": pl.Float64(),
    "duration_s": pl.Float64(),
    "mean_power_w": pl.Float64(),
    "gap_s": pl.Float64(),
    "n_samples": pl.Int64(),
}


class Aggregator:
    """Per-run energy, epochs and STEP projections from sample batches and epoch marks.

    Args:
        store: The run store everything is written to (``None``: keep nothing,
            for benchmarks).
        gap_threshold_s: Longest interval between two samples, in s, that is
            integrated from power (as :func:`estimators.energy.epoch_energy`).
        retain_s: Seconds of samples kept before the last finished epoch's end
            to absorb resent batches exactly.
        max_lag_s: An epoch is finished when the run's newest sample is this
            many s past its end, even if a stream has not reached it yet.
        flush_rows: Write pending samples to the store once this many wait.
        flush_interval_s: ... or once the oldest has waited this long, in s
            (checked on each call and by :meth:`maybe_flush`).
        max_pending_rows: Refuse new batches (the sender keeps them) while this
            many rows wait for a store that does not accept them.
        wal: Write-ahead journal (or its directory): each batch is on disk
            before it is acknowledged; ``None`` acknowledges from memory.
        on_finish: Called with (run_id, status, summary) after a run ended
            and its totals were stored.
        clock: Wall clock in µs since the Unix epoch, replaceable in tests.
        clock_window: Deliveries per node the clock offset minimum is taken over.

    """

    def __init__(
        self,
        store: Store | None,
        *,
        gap_threshold_s: float = DEFAULT_GAP_THRESHOLD_S,
        retain_s: float = 60.0,
        max_lag_s: float = 30.0,
        flush_rows: int = 200_000,
        flush_interval_s: float = 2.0,
        max_pending_rows: int = 5_000_000,
        wal: Journal | str | Path | None = None,
        on_finish: OnFinish | None = None,
        clock: Callable[[], int] = _now_us,
        clock_window: int = 256,
    ) -> None:
        if gap_threshold_s <= 0:
            raise BadInputError(f"gap threshold must be > 0 s; found {gap_threshold_s}")
        self.store = store
        self.gap_threshold_s = float(gap_threshold_s)
        self.retain_us = int(retain_s * 1e6)
        self.max_lag_us = int(max_lag_s * 1e6)
        self.flush_rows = flush_rows
        self.flush_interval_us = int(flush_interval_s * 1e6)
        self.max_pending_rows = max_pending_rows
        if wal is not None and not hasattr(wal, "append"):
            from profiler.journal import Journal

            wal = Journal(wal)
        self.wal: Journal | None = wal  # type: ignore[assignment]
        self.on_finish = on_finish
        self.clock = clock
        self._runs: dict[str, _Run] = {}
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0
        self._pending_since: int | None = None
        self._wal_seqs: list[int] = []
        self._lock = threading.RLock()
        # Store writes happen outside ``_lock`` (ingest and queries go on meanwhile):
        # ``_flush_lock`` lets one flush run at a time; ``_queue_lock`` guards the queue
        # (``_pending``, ``_pending_rows``, ``_pending_since``, ``_wal_seqs``,
        # ``_inflight_rows``) and is held only briefly; ``_wal_lock`` serialises journal
        # appends and removals. Order: ``_lock``, then ``_flush_lock``, then either other.
        self._flush_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._wal_lock = threading.Lock()
        self._inflight_rows = 0  # of ``_pending_rows``, those a flush is writing now
        self._reopened: set[str] = set()  # runs a new stream reopened (to rebuild)
        # Runs that had ended when samples of theirs came (``after_finish``): seen by the
        # batch being ingested, queued with the pending batches, and written by a flush
        # (their stored figures are brought up to date after it: _refresh_ended).
        self._ended_seen: set[str] = set()
        self._ended_pending: set[str] = set()
        self._ended_written: set[str] = set()
        self.node_lag_s: dict[str, float] = {}
        self._node_seen_us: dict[str, int] = {}  # node -> when its newest batch came
        self._nodes_swept_us = 0
        self.offsets = ClockOffsets(clock_window)
        self.counters: dict[str, int] = {
            "batches": 0,
            "samples": 0,
            "unassigned": 0,
            "late": 0,
            "flushed": 0,
            "rejected": 0,
            "epochs": 0,
            "finished_runs": 0,
            "after_finish": 0,
            "recomputed_runs": 0,
        }

    # -------------------------------------------------------------------------------- runs
    def start_run(self, run: Mapping[str, Any] | pl.DataFrame, *, write: bool = True) -> str:
        """Register a running run (its record goes to the store's ``runs`` table).

        Args:
            run: One run record (``runs`` schema; at least ``run_id``;
                ``planned_epochs`` enables STEP).
            write: Store the record (``False`` when rebuilding from the store).

        Returns:
            The run id.

        Raises:
            SchemaError: The record does not fit the ``runs`` schema.
            BadInputError: (``write``) The run id is taken by a run that has
                ended (finished or failed): its record, samples and marks
                would mix with the new run's.

        """
        row = dict(run.row(0, named=True)) if isinstance(run, pl.DataFrame) else dict(run)
        row.setdefault("status", "running")
        if row.get("status") is None:
            row["status"] = "running"
        if row.get("start") is None:
            row["start"] = _us_to_dt(self.clock())
        frame = conform(pl.DataFrame([row], infer_schema_length=None), "runs")
        row = frame.row(0, named=True)
        run_id = str(row["run_id"])
        with self._lock:
            if write:
                self._refuse_ended(run_id)
            if write and self.store is not None:
                self.store.write_runs(frame)
            existing = self._runs.get(run_id)
            if existing is not None:
                existing.row.update({k: v for k, v in row.items() if v is not None})
                if existing.projector is None and not existing.done:
                    existing.projector = _new_projector(existing.row)
                _set_clock(existing)
                return run_id
            self._finished.pop(run_id, None)
            self._runs[run_id] = _set_clock(_Run(run_id, row, _new_projector(row)))
        return run_id

    def _ended(self, run_id: str) -> str | None:
        """How a run that has ended is known (``None`` if it has not): its status and end."""
        if run_id in self._runs:
            return None
        status, end = None, None
        held = self._finished.get(run_id)
        if held is not None:
            status = held.get("status")
        if self.store is not None:
            known = self.store.runs().filter(pl.col("run_id") == run_id)
            if known.height:
                status, end = known["status"][0], known["end"][0]
        if status is None or status == "running":
            return None
        when = f"ended at {end.isoformat()}" if end is not None else "end time not recorded"
        held_by = "this aggregator" if self.store is None else f"the store at {self.store.root}"
        return f"{held_by} has it as {status!r} ({when})"

    def _refuse_ended(self, run_id: str) -> None:
        """BadInputError if ``run_id`` names a run that has ended (here or in the store)."""
        ended = self._ended(run_id)
        if ended is not None:
            raise BadInputError(
                f"run {run_id!r} already ended: {ended}; expected a new run id. Choose another "
                "id (or leave it out for a generated one)"
            )

    def _state(self, run_id: str) -> _Run | None:
        """The run's state; ``None`` for a run that has ended (its samples are only stored)."""
        st = self._runs.get(run_id)
        if st is not None:
            return st
        if run_id in self._finished:
            return None
        row: dict[str, Any] = {"run_id": run_id, "status": "running"}
        if self.store is not None:
            try:
                known = self.store.runs().filter(pl.col("run_id") == run_id)
            except StoreError:
                known = pl.DataFrame()
            if known.height:
                row = known.row(0, named=True)
                if row["status"] != "running":
                    return None
            else:
                # Samples or marks for a run nobody announced: track it (STEP needs a plan).
                self.store.write_runs(pl.DataFrame([row]))
        st = _set_clock(_Run(run_id, row, _new_projector(row)))
        self._runs[run_id] = st
        return st

    # -------------------------------------------------------------------------------- clocks
    def _shift(self, st: _Run, node: str, *, write: bool) -> int:
        """µs added to ``node``'s times in run ``st`` (fixed at first sight; see the docstring)."""
        got = st.shift_us.get(node)
        if got is not None:
            return got
        inferred = st.home is None
        if inferred:
            st.home = node
        if st.home is None or node == st.home:
            shift = 0
        else:
            mine, home = self.offsets.offset_us(node), self.offsets.offset_us(st.home)
            if mine is None or home is None:
                log.warning(
                    "run %s: no clock offset estimate for node %s or home node %s yet; its "
                    "samples are taken as on the home clock",
                    st.run_id,
                    node if mine is None else st.home,
                    st.home,
                )
                shift = 0
            else:
                shift = mine - home
        st.shift_us[node] = shift
        if write and (inferred or node != st.home):
            self._save_clock(st)
        return shift

    def _save_clock(self, st: _Run) -> None:
        """Write the run's clock alignment into its record's config (for restarts)."""
        cfg = _config(st.row)
        cfg["clock"] = {
            "home": st.home,
            "marks_node": st.marks_node,
            "shift_s": {n: us / 1e6 for n, us in sorted(st.shift_us.items()) if n != st.home},
        }
        st.row["config"] = json.dumps(cfg)
        if self.store is not None:
            self.store.write_runs(
                pl.DataFrame(
                    [{"run_id": st.run_id, "status": st.row.get("status") or "running",
                      "config": st.row["config"]}]
                )
            )  # fmt: skip

    def _observe(self, node: str | None, sent_at: datetime | int | float | None) -> None:
        sent = _dt_us(sent_at)
        if node is not None and sent is not None:
            self.offsets.observe(str(node), self.clock(), sent)

    # -------------------------------------------------------------------------------- ingest
    def ingest_samples(
        self, batch: pl.DataFrame, *, write: bool = True, sent_at: datetime | None = None
    ) -> int:
        """Take a batch of samples (``samples`` schema); returns the rows taken.

        Rows without a run id are stored as unassigned (they belong to no
        run's energy). Duplicates of samples already held are ignored.

        Raises:
            SchemaError: The batch does not fit the ``samples`` schema; nothing
                was taken.
            StoreError: The store has refused writes for so long that
                ``max_pending_rows`` wait; nothing was taken (resend later).

        """
        if sent_at is not None and batch.height:
            nodes = batch["node"].unique()
            if nodes.len() == 1 and nodes[0] is not None:
                with self._lock:
                    self._observe(str(nodes[0]), sent_at)
        if batch.height == 0:
            return 0
        batch = self._validate(batch)
        with self._lock:
            if write and self._pending_rows + batch.height > self.max_pending_rows:
                self.maybe_flush(force=True)
                if self._pending_rows + batch.height > self.max_pending_rows:
                    raise StoreError(
                        f"the aggregator holds {self._pending_rows} samples the store at "
                        f"{getattr(self.store, 'root', None)} has not accepted (bound "
                        f"{self.max_pending_rows}); resend the batch of {batch.height} later"
                    )
            seq = self._journal(batch) if write else None
            try:
                self._absorb(batch, write=write)
            except BaseException:
                self._ended_seen.clear()
                self._enqueue(None, seq)  # its journal entry is dropped with the next flush
                raise
            stored = write and self.store is not None
            ended, self._ended_seen = self._ended_seen, set()
            self._enqueue(batch if stored else None, seq, ended=ended if stored else None)
            if write:
                self._recompute_reopened()
        if write and self.store is not None:
            # Outside the lock: a store write does not hold up queries. By age, an ingest
            # call flushes only rows twice as old as the interval: the periodic
            # maybe_flush (the actor's flush thread) normally gets there first, so
            # ingest calls seldom wait for a store write.
            self.maybe_flush(_age_factor=2)
        return batch.height

    def _validate(self, batch: pl.DataFrame) -> pl.DataFrame:
        if batch.schema != _SAMPLES_SCHEMA:
            return conform(batch, "samples")
        p, e = pl.col("power_w"), pl.col("energy_j")
        bad = batch.select(
            pl.any_horizontal(*(pl.col(c).is_null().any() for c in _REQUIRED)),
            ((~p.is_finite()) | (p < 0)).any(),
            ((~e.is_finite()) | (e < 0)).any(),
            (~pl.col("source").is_in(SOURCES)).any(),
            # Times Python cannot hold (year 10000) would break every later read.
            ((pl.col("timestamp") < TIME_MIN) | (pl.col("timestamp") >= TIME_END)).any(),
            # Two rows of one sample: harmless if equal, refused if not (conform tells).
            pl.struct(_KEY).hash().is_duplicated().any(),
        ).row(0)
        if any(bad):
            return conform(batch, "samples")  # raises with the row and the reason
        # The fast path skips conform: check the run ids here, before the batch reaches the
        # write-ahead journal (a refused batch there would fail every rebuild).
        for run_id in batch["run_id"].drop_nulls().unique().to_list():
            check_run_id(run_id, context="samples batch: ")
        return batch

    def _absorb(self, batch: pl.DataFrame, *, live: bool = True, write: bool = True) -> None:
        """Split a valid batch by run and queue each part on its run (no store writes).

        One pass over the batch: stretches of rows of one (run, node, device)
        are found with one run-length encoding (a batch whose streams are
        interleaved is sorted by stream first), mapped to their run's stream
        index in a loop over stretches, and the rows are grouped by run with
        one stable argsort. Each run gets numpy views (no per-run polars
        calls); runs whose pending epoch may now be complete are finished
        together by :meth:`_advance_many`.

        ``live`` batches count in the counters and the per-node arrival lag;
        replays from the store do not.
        """
        now = self.clock()
        if live:
            self.counters["batches"] += 1
            self.counters["samples"] += batch.height
        nodes = batch["node"]
        ts = batch["timestamp"]
        if not live:
            pass
        elif nodes[0] == nodes[-1] and nodes.n_unique() == 1:
            newest = ts.max()
            self.node_lag_s[str(nodes[0])] = (now - int(newest.timestamp() * 1e6)) / 1e6  # type: ignore[union-attr]
            self._node_seen_us[str(nodes[0])] = now
        else:
            for node, newest in batch.group_by("node").agg(pl.col("timestamp").max()).iter_rows():
                self.node_lag_s[str(node)] = (now - int(newest.timestamp() * 1e6)) / 1e6
                self._node_seen_us[str(node)] = now
        if live and now - self._nodes_swept_us >= _NODE_SWEEP_US:
            self._forget_quiet_nodes(now)
        keys = ("run_id", "node", "device")
        seg = batch.select(pl.struct(*keys).rle_id()).to_series().to_numpy()
        n = batch.height
        n_seg = int(seg[-1]) + 1
        if n_seg > 64 and n_seg * 4 > n:
            # Interleaved streams (e.g. time-major rows): one stable sort by stream.
            batch = batch.sort(*keys, maintain_order=True, nulls_last=True)
            seg = batch.select(pl.struct(*keys).rle_id()).to_series().to_numpy()
            n_seg = int(seg[-1]) + 1
        starts = np.concatenate(([0], np.flatnonzero(np.diff(seg)) + 1))
        lengths = np.diff(np.concatenate((starts, [n])))
        idx = pl.Series(starts)
        rid_l = batch["run_id"].gather(idx).to_list()
        node_l = batch["node"].gather(idx).to_list()
        dev_l = batch["device"].gather(idx).to_list()
        # Stretch -> (position among this batch's runs, stream index in the run).
        pos_of: dict[str | None, int] = {}
        states: list[_Run | None] = []
        rids: list[str | None] = []
        seg_pos = np.empty(n_seg, dtype=np.int64)
        seg_sid = np.empty(n_seg, dtype=np.int32)
        seg_shift = np.zeros(n_seg, dtype=np.int64)
        save = write and live
        for j, (rid, node, dev) in enumerate(zip(rid_l, node_l, dev_l, strict=True)):
            pos = pos_of.get(rid)
            if pos is None:
                # Ids held here were checked when they came (the store's directory
                # names): only others are checked again (cheap; batches that came through
                # ingest_samples have been checked already).
                if rid is not None and rid not in self._runs and rid not in self._finished:
                    check_run_id(rid)
                pos = pos_of[rid] = len(states)
                states.append(None if rid is None else self._state(rid))
                rids.append(rid)
            seg_pos[j] = pos
            st = states[pos]
            if st is not None:
                seg_sid[j] = st.stream(node, dev)
                shift = st.shift_us.get(node)
                seg_shift[j] = shift if shift is not None else self._shift(st, node, write=save)
            else:
                seg_sid[j] = -1
        row_pos = np.repeat(seg_pos, lengths)
        row_sid = np.repeat(seg_sid, lengths)
        us = batch["timestamp"].dt.epoch("us").to_numpy()
        if seg_shift.any():  # other nodes' clocks onto each run's home clock
            us = us + np.repeat(seg_shift, lengths)
        p = batch["power_w"].cast(pl.Float64).to_numpy()
        c = batch["energy_j"].cast(pl.Float64).to_numpy()
        if len(states) > 1 and (np.diff(row_pos) < 0).any():
            order = np.argsort(row_pos, kind="stable")
            row_pos, row_sid, us, p, c = (
                row_pos[order], row_sid[order], us[order], p[order], c[order]
            )  # fmt: skip
        counts = np.bincount(row_pos, minlength=len(states))
        offs = np.concatenate(([0], np.cumsum(counts)))
        lo = np.minimum.reduceat(us, offs[:-1]).tolist()
        hi = np.maximum.reduceat(us, offs[:-1]).tolist()
        src = batch["source"]
        if src.n_unique() == 1:
            one = str(src[0])
            per_run_sources: dict[str | None, set[str]] | None = None
        else:
            per_run_sources = {}
            for rid, s in batch.select("run_id", "source").unique().iter_rows():
                per_run_sources.setdefault(rid, set()).add(s)
        offs_l = offs.tolist()
        ready: list[_Run] = []
        below: list[_Run] = []  # runs given samples older than their last finished epoch's end
        fold: list[_Run] = []  # runs without marks holding 2 x _UNMARKED_KEEP_US of samples
        can_fold = live and self.store is not None
        for pos, st in enumerate(states):
            a, b = offs_l[pos], offs_l[pos + 1]
            if st is None:
                rid = rids[pos]
                self.counters["unassigned" if rid is None else "after_finish"] += b - a
                if rid is not None and live:
                    self._ended_seen.add(rid)
                continue
            if per_run_sources is None:
                st.sources.add(one)
            else:
                st.sources.update(per_run_sources[rids[pos]])
            st.chunks.append(_Block(row_sid[a:b], us[a:b], p[a:b], c[a:b]))
            st.received += b - a
            st.oldest_new_us = (
                lo[pos] if st.oldest_new_us is None else min(st.oldest_new_us, lo[pos])
            )
            st.newest_us = hi[pos] if st.newest_us is None else max(st.newest_us, hi[pos])
            if st.pending:
                ready.append(st)
            elif can_fold and st.watermark_us is None:
                if st.fold_from_us is None:
                    st.fold_from_us = lo[pos]
                elif st.newest_us - st.fold_from_us >= 2 * _UNMARKED_KEEP_US:
                    fold.append(st)
            if st.watermark_us is not None and lo[pos] < st.watermark_us:
                sids = np.unique(row_sid[a:b])
                # A new stream, or one given samples older than its first seen live.
                if (st.first_us[sids] == _UNSET).any() or lo[pos] < int(st.join_us[sids].max()):
                    below.append(st)
        self._advance_many(ready)
        if fold:
            self._fold_unmarked(fold)
        # A new stream's samples older than the last finished epoch's end (or a known
        # stream's older than its first sample): merge them now, so that the epochs that
        # missed them are recomputed at once.
        merge = [st for st in below if st.chunks]
        if merge:
            self._view(merge).store()

    def ingest_epochs(
        self,
        marks: pl.DataFrame,
        *,
        write: bool = True,
        node: str | None = None,
        sent_at: datetime | None = None,
        replay: bool = False,
    ) -> int:
        """Take epoch marks (``epochs`` schema); returns the marks taken.

        The marks are first checked with the run's marks taken before (the
        store's, else those held here), as :func:`estimators.energy.prepare_epochs`
        checks them when the run ends: each epoch ends at or after its start,
        one mark per epoch number (the same mark again is no change; its
        ``end`` may move, as Ray Train's repeated reports make it grow, its
        ``start`` may not), and no two epochs overlap. A run that has ended
        takes no marks. If any mark is refused, nothing is taken or written.

        Then the marks are written to the store at once (they are few); a mark
        for an epoch already finished is ignored unless its end moved, in
        which case the run is rebuilt from the store.

        Args:
            marks: The marks.
            write: Store them (``False`` when rebuilding from the store).
            node: Node whose clock the marks use (``None``: the run's home node).
            sent_at: The sender's clock when it sent them (for the offset estimate).
            replay: Marks replayed from the store (a rebuild): not counted as taken.

        Raises:
            SchemaError: The marks do not fit the ``epochs`` schema.
            BadInputError: A mark overlaps another epoch of its run, restarts an
                epoch marked before with another start, or belongs to a run that
                has ended; nothing was taken.

        """
        if node is not None and sent_at is not None:
            with self._lock:
                self._observe(node, sent_at)
        if marks.height == 0:
            return 0
        marks = conform(marks, "epochs")
        with self._lock:
            if not replay:
                self._check_marks(marks)
            if write and self.store is not None:
                self.store.write_epochs(marks)
            rows = marks.select(
                "run_id",
                "epoch",
                pl.col("start").dt.epoch("us").alias("s"),
                pl.col("end").dt.epoch("us").alias("e"),
            ).sort("run_id", "s")
            rebuild: set[str] = set()
            refill: set[str] = set()  # runs whose window no longer holds a mark's start
            for rid, epoch, s, e in rows.iter_rows():
                st = self._state(rid)
                if st is None:
                    continue
                if node is not None:
                    if st.home is None:
                        st.home = node
                    if node != st.home:
                        moved = st.marks_node != node
                        st.marks_node = node
                        shift = self._shift(st, node, write=write)
                        if moved and write:
                            self._save_clock(st)
                        s, e = s + shift, e + shift
                elif st.marks_node is not None and st.marks_node != st.home:
                    shift = st.shift_us.get(st.marks_node, 0)  # rebuilt from the store
                    s, e = s + shift, e + shift
                d = next((d for d in reversed(st.done) if d["epoch"] == epoch), None)
                if d is not None:
                    if (d["_s"], d["_e"]) != (s, e):
                        rebuild.add(rid)
                    continue
                if st.watermark_us is not None and s < st.watermark_us:
                    rebuild.add(rid)  # an earlier epoch arrived after later ones finished
                    continue
                held = len(st.names)
                folded = (st.floor_us[:held] > s) & (st.pruned[:held] > 0)
                if write and self.store is not None and folded.any():
                    # A first mark after _fold_unmarked: its start's samples are in the store.
                    refill.add(rid)
                    if not replay:
                        self.counters["epochs"] += 1
                    continue
                st.pending[int(epoch)] = (int(s), int(e))
                if not replay:
                    self.counters["epochs"] += 1
            for rid in rebuild:
                if write and self.store is not None:
                    log.warning(
                        "run %s: epoch marks out of order; rebuilding it from the store", rid
                    )
                    self._reload(rid)
            for rid in refill - rebuild:
                log.info(
                    "run %s: its first epoch mark starts before the samples held in memory; "
                    "rebuilding it from the store",
                    rid,
                )
                self._reload(rid)
            todo = []
            for rid in dict.fromkeys(rows["run_id"].to_list()):
                if rid in rebuild or rid in refill:
                    continue
                st = self._runs.get(rid)
                if st is not None and st.pending:
                    todo.append(st)
            self._advance_many(todo)
            if write:
                self._recompute_reopened()
        return marks.height

    def _check_marks(self, marks: pl.DataFrame) -> None:
        """Refuse marks that would leave a run's marks invalid (see :meth:`ingest_epochs`).

        Checked on the marks as their node stamped them: with a store, against
        the run's stored marks (what ``finish_run`` and ``wattwise energy``
        read); without one, against the marks held here, taken back to the
        marks' clock.

        Raises:
            BadInputError: Which run and epochs, what was expected and found.

        """
        rows = marks.unique(maintain_order=True).select(
            "run_id",
            "epoch",
            pl.col("start").dt.epoch("us").alias("s"),
            pl.col("end").dt.epoch("us").alias("e"),
        )
        for (rid,), group in rows.group_by("run_id", maintain_order=True):
            rid = str(rid)
            new = {int(ep): (int(s), int(e)) for _, ep, s, e in group.iter_rows()}
            ended = self._ended(rid)
            if ended is not None:
                raise BadInputError(
                    f"run {rid!r} has ended: {ended}; its epoch marks are final. Expected marks "
                    f"of a running run; found {len(new)} mark(s) for epoch(s) "
                    f"{sorted(new)[:5]}. Nothing was taken"
                )
            have = self._marks_of(rid)
            for ep, (s, e) in new.items():
                old = have.get(ep)
                if old is not None and old[0] != s:
                    raise BadInputError(
                        f"run {rid!r} epoch {ep} is marked already from {_us_iso(old[0])} to "
                        f"{_us_iso(old[1])}; the new mark starts at {_us_iso(s)}. Expected the "
                        "same start (a mark's end may move) or a new epoch number. Nothing was "
                        "taken"
                    )
                have[ep] = (s, e)
            # Marks already stored that overlap each other (written around the aggregator)
            # are finish_run's to report; only an overlap with a new mark is refused here.
            for ep0, s0, e0, ep1, s1, e1 in _overlap_pairs(
                (ep, s, e) for ep, (s, e) in have.items()
            ):
                news = [ep for ep in (ep0, ep1) if ep in new]
                if news:
                    raise BadInputError(
                        f"run {rid!r}: epoch {ep1} ({_us_iso(s1)} to {_us_iso(e1)}) starts "
                        f"before epoch {ep0} ({_us_iso(s0)} to {_us_iso(e0)}) ends; expected "
                        f"epochs that do not overlap (new mark(s): epoch {news}). Nothing was "
                        "taken"
                    )

    def _marks_of(self, run_id: str) -> dict[int, tuple[int, int]]:
        """The run's marks taken so far: epoch -> (start, end) in µs on the marks' clock."""
        if self.store is not None:
            stored = self.store.epochs(run_id).select(
                "epoch", pl.col("start").dt.epoch("us"), pl.col("end").dt.epoch("us")
            )
            return {int(ep): (int(s), int(e)) for ep, s, e in stored.iter_rows()}
        st = self._runs.get(run_id)
        if st is None:
            return {}
        back = 0  # held marks are on the run's home clock: undo the marks node's shift
        if st.marks_node is not None and st.marks_node != st.home:
            back = st.shift_us.get(st.marks_node, 0)
        held = {int(d["epoch"]): (d["_s"] - back, d["_e"] - back) for d in st.done}
        held.update({ep: (s - back, e - back) for ep, (s, e) in st.pending.items()})
        return held

    def _recompute_reopened(self) -> None:
        """Rebuild from the store every run a new stream reopened (see :meth:`_View._missed`).

        A node whose first batch arrives after an epoch closed holds samples of
        that epoch; the run's finished epochs and its STEP projection are
        recomputed from the store with them (once per such stream: afterwards
        the stream is known, and its samples that come too late count as late).
        So does a known stream's batch older than its first sample seen live (a
        backfill: once per such batch). Without a store the run is only marked
        for recomputation at its end.
        """
        if self.store is None or not self._reopened:
            return
        now = self.clock()
        for rid in sorted(self._reopened):
            st = self._runs.get(rid)
            if st is None or not st.reopened:
                self._reopened.discard(rid)
                continue
            if now < st.retry_reopen_us:
                continue
            log.info(
                "run %s: a node's first samples (or samples older than them) arrived after "
                "an epoch closed; recomputing its finished epochs from the store",
                rid,
            )
            try:
                self._reload(rid)
            except Exception as err:  # the store is down: keep the run as it is, try later
                st.retry_reopen_us = now + _REOPEN_RETRY_US
                log.warning(
                    "run %s: recomputing it from the store at %s failed (%s: %s); it keeps its "
                    "live state and is tried again in %.0f s (its totals are recomputed at its "
                    "end in any case)",
                    rid,
                    getattr(self.store, "root", None),
                    type(err).__name__,
                    err,
                    _REOPEN_RETRY_US / 1e6,
                )
                continue
            self._reopened.discard(rid)
            self.counters["recomputed_runs"] += 1

    # -------------------------------------------------------------------------------- epochs
    def _view(self, runs: list[_Run]) -> _View:
        """Merge the runs' new chunks into their windows and build their integration streams."""
        late = sum(st.late for st in runs)
        view = _View(runs, self.gap_threshold_s, rebuild=self.store is not None)
        self.counters["late"] += sum(st.late for st in runs) - late
        if self.store is not None:  # without a store there is nothing to rebuild it from
            self._reopened.update(st.run_id for st in runs if st.reopened)
        return view

    def _advance_many(self, runs: list[_Run], *, force: bool = False) -> None:
        """Finish every pending epoch whose samples have arrived (all of them with ``force``).

        All runs are handled in one vectorised pass: their windows are merged
        and integrated together, every pending epoch of every run is checked
        for completeness at once, the energies at all epoch boundaries are
        evaluated at once, and the windows are pruned at once. Only the
        bookkeeping per finished epoch (its row, the STEP update) is a loop.
        """
        cand: list[tuple[_Run, list[tuple[int, tuple[int, int]]]]] = []
        for st in runs:
            if not st.pending:
                continue
            order = sorted(st.pending.items(), key=lambda kv: kv[1][0])
            if not force and (st.newest_us is None or st.newest_us < order[0][1][1]):
                continue  # no stream has reached the first pending end yet: nothing can be ready
            cand.append((st, order))
        if not cand:
            return
        view = self._view([st for st, _ in cand])
        # Every (run, pending epoch), in start order per run.
        ep_run = np.array([r for r, (_, o) in enumerate(cand) for _ in o], dtype=np.int64)
        ep_s = np.array([s for _, o in cand for _, (s, _) in o], dtype=np.int64)
        ep_e = np.array([e for _, o in cand for _, (_, e) in o], dtype=np.int64)
        ep_epoch = [epoch for _, o in cand for epoch, _ in o]
        if force:
            ready = np.ones(len(ep_run), dtype=bool)
        else:
            ready = self._ready(view, ep_run, ep_s, ep_e)
            keep = np.array([st.keep_done_us for st, _ in cand], dtype=np.int64)
            ready |= ep_e <= keep[ep_run]
        # Per run, the pending epochs up to the first that is not ready.
        chosen: list[int] = []
        runs_done: list[int] = []
        k = 0
        ready_l = ready.tolist()
        for r, (_, order) in enumerate(cand):
            took = False
            for j in range(len(order)):
                if not ready_l[k + j]:
                    break
                chosen.append(k + j)
                took = True
            if took:
                runs_done.append(r)
            k += len(order)
        if not chosen:
            view.store()
            return
        ch = np.array(chosen, dtype=np.int64)
        stats = self._epoch_stats(view, ep_run[ch], ep_s[ch], ep_e[ch])
        for (ej, gap, n_samples, e_s, e_e, has), i in zip(stats, chosen, strict=True):
            st = cand[int(ep_run[i])][0]
            epoch = ep_epoch[i]
            del st.pending[epoch]
            self._finish_epoch(
                st, epoch, int(ep_s[i]), int(ep_e[i]), ej, gap, n_samples, e_s, e_e, has
            )
        self._prune(view, runs_done)

    def _ready(
        self, view: _View, ep_run: np.ndarray, ep_s: np.ndarray, ep_e: np.ndarray
    ) -> np.ndarray:
        """Whether each (run, epoch) is finished.

        Finished: every live stream has samples around and throughout [s, e]
        without holes, or the run's newest sample is ``max_lag_s`` past e.

        A hole is an interval longer than 1.5 times the stream's median
        interval: a batch that has not arrived yet (batches can arrive out of
        order). Streams silent since ``max_lag_s`` before ``s`` are ignored.
        """
        newest = np.array(
            [st.newest_us if st.newest_us is not None else _UNSET for st in view.runs],
            dtype=np.int64,
        )
        lagging = newest[ep_run] >= ep_e + self.max_lag_us
        k0 = view.run_seg[ep_run]
        cnt = view.run_seg[ep_run + 1] - k0
        pair_ep = np.repeat(np.arange(len(ep_run)), cnt)
        first = np.concatenate(([0], np.cumsum(cnt)))[:-1]
        seg = k0[pair_ep] + (np.arange(len(pair_ep)) - first[pair_ep])
        s_us, e_us = ep_s[pair_ep], ep_e[pair_ep]
        s, e = s_us / 1e6, e_us / 1e6
        silent = s - self.max_lag_us / 1e6
        a, b = view.seg_a[seg], view.seg_b[seg]
        t_first, t_last = view.t[a], view.t[b - 1]
        skip = t_last < silent
        bad = ~skip & ((t_first > s) | (t_last < e))
        i = np.maximum(view.find(seg, s_us, "right") - 1, a)
        j = view.find(seg, e_us, "left")
        check = ~skip & ~bad & (j - i >= 1) & (b - a >= 3)
        if check.any():
            cs, ci, cj = seg[check], i[check], j[check]
            dt = np.concatenate((view.dt, [np.inf, np.inf]))
            widest = np.maximum.reduceat(dt, np.column_stack((ci, cj)).ravel())[::2]
            # A stream's smallest interval bounds its median from below: only where
            # that cannot settle it is the median computed.
            ua, ub = view.seg_a[cs], view.seg_b[cs] - 1
            smallest = np.minimum.reduceat(dt, np.column_stack((ua, ub)).ravel())[::2]
            hole = widest > 1.5 * smallest
            for q in np.flatnonzero(hole).tolist():
                med = float(np.median(view.dt[int(ua[q]) : int(ub[q])]))
                hole[q] = float(widest[q]) > 1.5 * med
            bad[np.flatnonzero(check)[hole]] = True
        not_ok = np.bincount(pair_ep, weights=bad, minlength=len(ep_run))
        return np.asarray(lagging | ((cnt > 0) & (not_ok == 0)), dtype=bool)

    def _epoch_stats(
        self, view: _View, ep_run: np.ndarray, ep_s: np.ndarray, ep_e: np.ndarray
    ) -> list[tuple[float, float, int, float, float, bool]]:
        """Energy (J), gap (s), samples, run energy at start and end (J) of each epoch.

        Run energy is cumulative over all the run's streams, folded history
        included (as :func:`estimators.energy.epoch_energy` on all samples).
        The last item says whether the run had any stream.
        """
        k0 = view.run_seg[ep_run]
        cnt = view.run_seg[ep_run + 1] - k0
        m = len(ep_run)
        pair_ep = np.repeat(np.arange(m), cnt)
        first = np.concatenate(([0], np.cumsum(cnt)))
        seg = k0[pair_ep] + (np.arange(len(pair_ep)) - first[:-1][pair_ep])
        q = np.concatenate((seg, seg))
        x = np.concatenate((ep_s[pair_ep], ep_e[pair_ep]))
        energy, gaps = view.at(q, x)
        count = view.find(q, x, "left") - view.seg_a[q]
        npair = len(seg)
        gid = view.seg_g[seg]
        be, bg = view.base_e[gid], view.base_g[gid]
        e0 = np.bincount(pair_ep, weights=be + energy[:npair], minlength=m)
        e1 = np.bincount(pair_ep, weights=be + energy[npair:], minlength=m)
        single = (cnt == 1)[pair_ep]
        gd = np.where(
            single, (bg + gaps[npair:]) - (bg + gaps[:npair]), gaps[npair:] - gaps[:npair]
        )
        has = cnt > 0
        gap = np.zeros(m)
        if npair:
            gap[has] = np.maximum.reduceat(gd, first[:-1][has])
        n = np.bincount(pair_ep, weights=count[npair:] - count[:npair], minlength=m)
        return list(
            zip(
                (e1 - e0).tolist(),
                gap.tolist(),
                n.astype(np.int64).tolist(),
                e0.tolist(),
                e1.tolist(),
                has.tolist(),
                strict=True,
            )
        )

    def _finish_epoch(
        self,
        st: _Run,
        epoch: int,
        s: int,
        e: int,
        ej: float,
        gap: float,
        n: int,
        energy_s: float,
        energy_e: float,
        has_streams: bool,
    ) -> None:
        duration = (e - s) / 1e6
        if has_streams:
            prev = st.energy_at_watermark_j if st.watermark_us is not None else 0.0
            between = max(energy_s - prev, 0.0)
            st.energy_at_watermark_j = energy_e
        else:
            ej, gap, n, between = 0.0, duration, 0, 0.0
        st.done.append(
            {
                "run_id": st.run_id,
                "epoch": epoch,
                "start": _us_to_dt(s),
                "end": _us_to_dt(e),
                "energy_j": ej,
                "duration_s": duration,
                "mean_power_w": ej / duration if duration > 0 else None,
                "gap_s": gap,
                "n_samples": n,
                "_s": s,
                "_e": e,
            }
        )
        st.watermark_us = e if st.watermark_us is None else max(st.watermark_us, e)
        if st.projector is not None and duration > 0:
            st.projection = _project(st.projector, ej, duration, between, gap)

    def _fold_unmarked(self, runs: list[_Run]) -> None:
        """Fold the samples of runs without epoch marks older than ``_UNMARKED_KEEP_US``.

        Their totals stay exact (folded into the stream bases, as :meth:`_prune`
        does after an epoch). A first mark that starts before the samples
        still held rebuilds the run from the store (:meth:`ingest_epochs`), so
        memory holds at most ``2 x _UNMARKED_KEEP_US`` of such a run's samples
        however long it runs without marks. Only with a store.
        """
        view = self._view(runs)
        cuts = []
        for st in runs:
            assert st.newest_us is not None
            st.fold_from_us = st.newest_us - _UNMARKED_KEEP_US
            cuts.append(st.fold_from_us)
        self._prune(view, list(range(len(runs))), cuts)

    def _prune(self, view: _View, runs_done: list[int], cuts: list[int] | None = None) -> None:
        """Fold samples older than ``watermark - retain_s`` (or ``cuts``) into stream bases.

        The windows of all the view's runs are stored.
        """
        if not runs_done:
            view.store()
            return
        rd = np.array(runs_done, dtype=np.int64)
        cnt = view.run_seg[rd + 1] - view.run_seg[rd]
        seg = np.concatenate(
            [np.arange(view.run_seg[r], view.run_seg[r + 1]) for r in runs_done]
        ).astype(np.int64)
        if len(seg) == 0:
            view.store()
            return
        if cuts is None:
            cuts = [(view.runs[r].watermark_us or 0) - self.retain_us for r in runs_done]
        keep_from = np.repeat(np.array(cuts, dtype=np.int64), cnt)
        a = view.seg_a[seg]
        i0 = np.maximum(view.find(seg, keep_from, "right") - 1 - a, 0)
        gid = view.seg_g[seg]
        view.base_e[gid] += view.e[a + i0]
        view.base_g[gid] += view.g[a + i0]
        view.pruned[gid] += i0
        view.floor_us[gid] = view.us[a + i0]
        if not i0.any():
            view.store()
            return
        floor = np.full(len(view.seg_a), _UNSET, dtype=np.int64)
        floor[seg] = view.us[a + i0]
        keep = view.us >= np.repeat(floor, view.seg_b - view.seg_a)
        view.store(keep)

    # -------------------------------------------------------------------------------- finish
    def finish_run(self, run_id: str, status: str = "finished") -> dict[str, Any]:
        """End a run: finish its epochs, store the measured totals, drop it from memory.

        A failed run keeps everything measured until then and is stored as
        ``failed`` (PRE trains on finished runs only). With a store, its stored
        ``energy_j`` (and STEP's final figure) is the run's total as ``wattwise
        energy --run`` gives it (:func:`estimators.energy.run_total_j`: its
        epochs and the time outside them, the edges held up to the marks);
        without one, the energy from its first sample to its last. The
        summary's ``measured_energy_j`` (the Prometheus energy counter) never
        goes below what was reported while the run ran.

        If the run's stored epoch marks overlap (written straight to the store,
        e.g. by an older tool or an import: the aggregator refuses such marks),
        the run still ends: its stored ``energy_j`` is the energy from its first
        sample to its last, ``trained_epochs`` is left empty, nothing stored is
        removed, and a warning naming the overlapping epochs and how to fix
        them is logged and returned as the summary's ``warning``.

        Args:
            run_id: The run.
            status: ``finished`` or ``failed``.

        Returns:
            The run's summary (as :meth:`status` gives it).

        Raises:
            BadInputError: Unknown status, or the run is not running here.

        """
        if status not in ("finished", "failed"):
            raise BadInputError(
                f"run {run_id}: status must be 'finished' or 'failed'; found {status!r}"
            )
        check_run_id(run_id)
        with self._lock:
            st = self._runs.get(run_id)
            if st is None:
                raise BadInputError(
                    f"run {run_id!r} is not running on this aggregator; running runs: "
                    f"{sorted(self._runs)[:5]}"
                )
            self._advance_many([st], force=True)
            totals = self._totals_many([st])[0]
            self._settle_thresholds(st)
            overlap = self._stored_overlaps(st) if self.store is not None else []
            warning = None
            if overlap:
                # Marks written around the aggregator (it refuses overlapping ones): no
                # per-epoch figure can be trusted, but the run must still end.
                self.flush()
                totals, _ = self._recompute(st, with_epochs=False)
                warning = self._overlap_warning(st, overlap, float(totals["energy_j"]))
                log.warning("%s", warning)
            elif st.dirty and self.store is not None:
                self.flush()
                totals, done = self._recompute(st)
                st.done = done
            span_j = float(totals["energy_j"])  # first sample to last, as reported while running
            if self.store is not None and not overlap:
                self.flush()
                totals = totals | {"energy_j": self._stored_total(st)}
            end = totals["end"] or _us_to_dt(self.clock())
            row = {
                "run_id": run_id,
                "status": status,
                "end": end,
                "duration_s": totals["duration_s"],
                "energy_j": totals["energy_j"],
                # Every number says where it came from: a run measured only by the
                # modelled CPU source has a modelled total, not a measured one.
                "energy_source": "modelled" if st.sources == {"modelled"} else "measured",
                # Unknown while its marks overlap (left empty rather than guessed).
                "trained_epochs": None if overlap else len(st.done),
            }
            if st.row.get("start") is None and totals["start"] is not None:
                row["start"] = totals["start"]
            st.row.update({k: v for k, v in row.items() if v is not None})
            if st.projector is not None:
                st.projection = st.projector.finish(totals["energy_j"])
            if self.store is not None:
                self.flush()
                self.store.write_runs(pl.DataFrame([row], schema_overrides={"end": UTC_US}))
            # The summary's measured_energy_j is the Prometheus energy counter, which must
            # not go down: samples outside every epoch, counted while the run ran, stay in it.
            summary = self._summary(
                st, live=totals | {"energy_j": max(span_j, float(totals["energy_j"]))}
            )
            if warning is not None:
                summary["warning"] = warning
            del self._runs[run_id]
            self._finished[run_id] = summary
            while len(self._finished) > _FINISHED_CACHE:
                self._finished.popitem(last=False)
            self.counters["finished_runs"] += 1
        if self.on_finish is not None:
            try:
                self.on_finish(run_id, status, summary)
            except Exception:
                log.exception("run %s: on_finish callback failed", run_id)
        return summary

    def _settle_thresholds(self, st: _Run) -> None:
        """Mark a finishing run for recomputation if a stream's threshold was never kept.

        A stream with fewer than ``RHYTHM_INTERVALS + 1`` samples had only
        provisional thresholds; ``wattwise energy`` uses the one all its samples
        give. If an epoch finished with another, the run is recomputed.
        """
        for sid in st.thr_used:
            head = st.head_us.get(sid)
            floor = self.gap_threshold_s
            final = floor if head is None else stream_threshold(head / 1e6, floor)
            st.dirty |= st.provisional_differs(sid, final)

    def _totals_many(self, runs: list[_Run]) -> list[dict[str, Any]]:
        """Measured totals of each run so far (merging its queued chunks into its window)."""
        if not runs:
            return []
        view = self._view(runs)
        view.store()
        return [view.totals(r) for r in range(len(runs))]

    def _stored_total(self, st: _Run) -> float:
        """A run's measured energy from the store, as ``wattwise energy --run`` totals it.

        :func:`estimators.energy.run_total_j`: its epochs and the time outside
        them, edges held for at most the gap threshold, gaps 0 J, counters
        where present.
        """
        from estimators.energy import run_total_j

        assert self.store is not None
        samples, marks = align(self.store.samples(st.run_id), self.store.epochs(st.run_id), st.row)
        return run_total_j(samples, marks, gap_threshold_s=self.gap_threshold_s)

    def _stored_overlaps(self, st: _Run) -> list[tuple[int, int, int, int, int, int]]:
        """Pairs of the run's stored epoch marks that overlap (see :func:`overlapping_marks`)."""
        assert self.store is not None
        return overlapping_marks(self.store.epochs(st.run_id))

    def _overlap_warning(
        self, st: _Run, overlap: list[tuple[int, int, int, int, int, int]], energy_j: float
    ) -> str:
        """What finishing a run whose stored marks overlap did, and how to fix it."""
        pairs = "; ".join(
            f"epoch {e1} ({_us_iso(s1)} to {_us_iso(t1)}) starts before epoch {e0} "
            f"({_us_iso(s0)} to {_us_iso(t0)}) ends"
            for e0, s0, t0, e1, s1, t1 in overlap[:5]
        )
        more = f" (and {len(overlap) - 5} more)" if len(overlap) > 5 else ""
        root = getattr(self.store, "root", None)
        return (
            f"run {st.run_id!r}: its stored epoch marks overlap: {pairs}{more}; expected epochs "
            "that do not overlap. Its per-epoch energy cannot be computed, so the run ended "
            f"with energy_j {energy_j:.6g} J, the energy from its first sample to its last, "
            "and trained_epochs left empty; nothing stored was removed. To fix: rewrite its "
            f"marks in {root}/epochs.parquet so that no two overlap (Store.write_epochs "
            "replaces the mark of each (run_id, epoch)), then `wattwise energy --run "
            f"{st.run_id}` gives its per-epoch energy"
        )

    def _recompute(
        self, st: _Run, *, with_epochs: bool = True
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Totals and epochs of a run from the store (after late samples).

        The totals span the samples (first to last); the stored run total is
        :meth:`_stored_total`. Without ``with_epochs`` the epochs are not
        computed (an empty list: marks that overlap cannot be).
        """
        from estimators.energy import epoch_energy, run_energy

        assert self.store is not None
        samples, marks = align(self.store.samples(st.run_id), self.store.epochs(st.run_id), st.row)
        thr = self.gap_threshold_s
        tot = run_energy(samples, gap_threshold_s=thr) if samples.height else None
        if tot is None or tot.height == 0:
            totals = {
                "energy_j": 0.0,
                "duration_s": None,
                "start": None,
                "end": None,
                "gap_s": 0.0,
                "n_samples": 0,
            }
        else:
            r = tot.row(0, named=True)
            totals = {
                k: r[k] for k in ("energy_j", "duration_s", "start", "end", "gap_s", "n_samples")
            }
        done = []
        if with_epochs and marks.height:
            ep = epoch_energy(samples, marks, gap_threshold_s=thr)
            for r in ep.iter_rows(named=True):
                d = {k: r[k] for k in EPOCH_COLUMNS}
                d["_s"] = int(r["start"].timestamp() * 1e6)
                d["_e"] = int(r["end"].timestamp() * 1e6)
                done.append(d)
        return totals, done

    # -------------------------------------------------------------------------------- store
    def _journal(self, batch: pl.DataFrame) -> int | None:
        """Write a batch to the write-ahead journal; its sequence number (None: no journal)."""
        if self.wal is None:
            return None
        with self._wal_lock:
            return self.wal.append(batch)

    def _enqueue(
        self, batch: pl.DataFrame | None, seq: int | None, *, ended: set[str] | None = None
    ) -> None:
        """Queue a batch for the store together with its journal entry (``None``: none).

        ``ended``: runs that had ended when the batch came; their stored figures
        are brought up to date after the flush that writes it.
        """
        with self._queue_lock:
            if seq is not None:
                self._wal_seqs.append(seq)
            if ended:
                self._ended_pending |= ended
            if batch is not None:
                self._pending.append(batch)
                self._pending_rows += batch.height
                if self._pending_since is None:
                    self._pending_since = self.clock()

    def maybe_flush(self, *, force: bool = False, _age_factor: int = 1) -> int:
        """Write pending samples when enough wait or the oldest waited long enough.

        Unless ``force``, returns at once when another flush is running (its
        rows wait for the next one). Store failures are logged and the rows
        kept for the next try. (``_age_factor``: the oldest must have waited
        this many ``flush_interval_s``; ingest calls ask for 2.)

        Returns:
            Rows written (new to the store).

        """
        with self._queue_lock:
            if not self._pending or self.store is None:
                return 0
            due = (
                force
                or self._pending_rows - self._inflight_rows >= self.flush_rows
                or (
                    self._pending_since is not None
                    and self.clock() - self._pending_since >= _age_factor * self.flush_interval_us
                )
            )
        if not due:
            return 0
        if not self._flush_lock.acquire(blocking=force):
            return 0
        try:
            n = self._flush_locked()
        except StoreError as err:
            log.warning(
                "aggregator: store write failed (%s); %d samples kept for retry",
                err,
                self._pending_rows,
            )
            return 0
        finally:
            self._flush_lock.release()
        self._refresh_ended()
        return n

    def flush(self) -> int:
        """Write every pending sample to the store now (after any flush already running).

        A sample whose key is stored already with other values keeps the
        stored (first) value, as in memory: it is skipped, logged and counted
        as ``rejected``; the rest of its batch is written.

        Returns:
            Rows new to the store.

        Raises:
            StoreError: The store could not be written; the rows stay pending.

        """
        if self.store is None:
            return 0
        with self._flush_lock:
            n = self._flush_locked()
        self._refresh_ended()
        return n

    def _flush_locked(self) -> int:
        """Write the queued batches (caller holds ``_flush_lock``, not necessarily ``_lock``).

        The queue is taken under ``_queue_lock`` and written without any lock
        that ingest or queries wait for. Each batch is in the journal until the
        store holds it: journal entries are removed only after the write
        returned, and only those of the batches taken (batches queued
        meanwhile keep theirs). A failed write puts the batches back in front.
        """
        assert self.store is not None
        with self._queue_lock:
            if not self._pending:
                return 0
            taken, seqs, since = self._pending, self._wal_seqs, self._pending_since
            ended, self._ended_pending = self._ended_pending, set()
            rows = self._pending_rows - self._inflight_rows
            self._pending, self._wal_seqs, self._pending_since = [], [], None
            self._inflight_rows += rows
        rejected = 0

        def skipped(rows: int, first: str) -> None:
            nonlocal rejected
            rejected += rows

        try:
            try:
                # Queued batches in arrival order: of two values of one sample, the first
                # (the one the aggregator integrated) is stored, as by _absorb.
                n = self.store.write_samples(
                    pl.concat(taken, how="vertical"), conflicts="keep_stored", on_conflict=skipped
                )
            except SchemaError:
                # Only a batch the store cannot take at all (e.g. its run directory is a
                # symlink out of the store) gets here: the others must not wait for it.
                n, rejected = 0, 0
                for part in taken:
                    try:
                        n += self.store.write_samples(
                            part, conflicts="keep_stored", on_conflict=skipped
                        )
                    except SchemaError as err:
                        rejected += part.height
                        log.error("aggregator: dropped a batch of %d samples: %s", part.height, err)
        except BaseException:
            with self._queue_lock:
                self._pending = taken + self._pending
                self._wal_seqs = seqs + self._wal_seqs
                self._ended_pending |= ended
                self._inflight_rows -= rows
                if since is not None:
                    self._pending_since = min(since, self._pending_since or since)
            raise
        with self._queue_lock:
            self._inflight_rows -= rows
            self._pending_rows -= rows
            self.counters["flushed"] += n
            self.counters["rejected"] += rejected
            self._ended_written |= ended
        if self.wal is not None:
            with self._wal_lock:
                for seq in seqs:
                    self.wal.remove(seq)
        return n

    def close(self) -> None:
        """Flush everything that waits."""
        self.flush()

    def _refresh_ended(self) -> None:
        """Bring the stored figures of ended runs given samples since up to date.

        Samples of a run that has ended (a restarted sidecar resending its
        journal, a lagging node) are stored like any others, so ``wattwise
        energy --run`` counts them; here, after the flush that wrote them
        (once per run per flush, however many batches came), the run's record
        gets what :meth:`finish_run` would have stored with them: ``energy_j``
        (:func:`estimators.energy.run_total_j` on the store; the first sample
        to the last if its marks overlap), ``end`` and ``duration_s`` (first
        sample to last) and ``energy_source``. The record is computed and
        written under the store's lock (:meth:`Store.update_runs`), so a
        concurrent writer cannot slip samples in between. Runs whose energy was
        reported rather than measured (``energy_source`` ``reported``, an
        import) are left as they are. The summary :meth:`status` serves for
        the run, if held, is updated too (its ``measured_energy_j``, the
        Prometheus counter, never goes down). Per-epoch energy of an ended run
        is computed from the store when asked (:meth:`epochs`), so it is
        current already.

        A store that cannot be read or written is logged and the runs are
        tried again after the next flush; this never raises.
        """
        if self.store is None:
            return
        with self._queue_lock:
            ids, self._ended_written = self._ended_written, set()
        if not ids:
            return
        figures: dict[str, dict[str, Any]] = {}

        def rows(runs: pl.DataFrame) -> pl.DataFrame:
            out = []
            for row in runs.filter(pl.col("run_id").is_in(sorted(ids))).iter_rows(named=True):
                if row["status"] == "running" or row.get("energy_source") == "reported":
                    continue
                fig = self._ended_figures(row)
                if fig is not None:
                    figures[str(row["run_id"])] = fig
                    out.append(fig["row"])
            if not out:
                return pl.DataFrame(schema={"run_id": pl.String(), "status": pl.String()})
            return pl.DataFrame(out, schema_overrides={"end": UTC_US})

        try:
            self.store.update_runs(rows)
        except Exception as err:  # never fail the flush (the samples are stored)
            retry = isinstance(err, StoreError)
            if retry:
                with self._queue_lock:
                    self._ended_written |= ids
            log.warning(
                "aggregator: runs %s got samples after they ended, but their stored energy "
                "could not be updated (%s: %s)%s",
                sorted(ids)[:5],
                type(err).__name__,
                err,
                "; tried again after the next flush" if retry else "",
            )
            return
        with self._lock:
            for rid, fig in figures.items():
                held = self._finished.get(rid)
                if held is None:
                    continue
                total = float(fig["row"]["energy_j"])
                new = dict(held)
                new["measured_energy_j"] = max(
                    float(held.get("measured_energy_j") or 0.0), fig["span_j"], total
                )
                for key in ("duration_s", "gap_s", "samples"):
                    if key in held:
                        new[key] = fig[key]
                proj = held.get("projection")
                if isinstance(proj, dict) and proj.get("finished"):
                    new["projection"] = proj | dict.fromkeys(
                        ("energy_j", "lower_j", "upper_j", "measured_j"), total
                    )
                self._finished[rid] = new  # replaced, not changed: readers may hold the old
        if figures:
            log.info(
                "aggregator: stored energy of ended runs updated after samples came late: %s",
                {rid: round(float(f["row"]["energy_j"]), 3) for rid, f in figures.items()},
            )

    def _ended_figures(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """An ended run's record fields recomputed from the store (see :meth:`_refresh_ended`).

        Returns:
            ``row`` (the fields to upsert), ``span_j`` (J, first sample to last),
            ``duration_s`` (s), ``gap_s`` (s) and ``samples``; ``None`` when the
            run has no sample with a value.

        """
        from estimators.energy import run_energy, run_total_j

        assert self.store is not None
        run_id = str(row["run_id"])
        stored = self.store.samples(run_id)
        samples, marks = align(stored, self.store.epochs(run_id), row)
        thr = self.gap_threshold_s
        span = run_energy(samples, gap_threshold_s=thr) if samples.height else None
        if span is None or span.height == 0:
            return None
        sp = span.row(0, named=True)
        if marks.height and not overlapping_marks(marks):
            total = run_total_j(samples, marks, gap_threshold_s=thr)
        else:  # as finish_run: no marks, or marks that overlap (first sample to last)
            total = float(sp["energy_j"])
        end = sp["end"] if row.get("end") is None else max(row["end"], sp["end"])
        sources = set(stored["source"].unique().to_list())
        return {
            "row": {
                "run_id": run_id,
                "status": row["status"],
                "end": end,
                "duration_s": sp["duration_s"],
                "energy_j": total,
                "energy_source": "modelled" if sources == {"modelled"} else "measured",
            },
            "span_j": float(sp["energy_j"]),
            "duration_s": sp["duration_s"],
            "gap_s": sp["gap_s"],
            "samples": sp["n_samples"],
        }

    # -------------------------------------------------------------------------------- rebuild
    @classmethod
    def rebuild(
        cls, store: Store, *, owns: Callable[[str], bool] | None = None, **kwargs: Any
    ) -> Aggregator:
        """An aggregator holding the state of every running run in ``store``.

        Batches left in the write-ahead journal by a process that died are
        written to the store first (a sample stored already with other values
        keeps the stored value, as in :meth:`flush`; runs that had ended get
        their stored figures updated, as after a flush); then each running run's
        samples and epoch marks are replayed (one run at a time, so memory
        stays bounded by the largest run's current window plus one run's
        history). A run that cannot be rebuilt is logged and left out (its
        later samples are stored, not measured live): one bad run record must
        not stop the others, nor make every restart fail.

        Args:
            store: The run store.
            owns: Keep only the running runs for which this is true (a shard's own).
            **kwargs: As for :class:`Aggregator`.

        """
        agg = cls(store, **kwargs)
        with agg._lock:
            if agg.wal is not None:

                def skipped(rows: int, first: str) -> None:
                    agg.counters["rejected"] += rows

                for seq, path in agg.wal.pending():
                    try:
                        part = agg.wal.read(path)
                        store.write_samples(part, conflicts="keep_stored", on_conflict=skipped)
                    except (SchemaError, BadInputError) as err:
                        # Never a crash loop: keep the batch aside for a person to look at.
                        aside = path.with_name(f"rejected-{path.name}")
                        path.replace(aside)
                        log.error("aggregator: journal batch %s refused (%s); kept as %s",
                                  path, err, aside)  # fmt: skip
                        continue
                    # Samples of runs that had ended (the refresh skips running ones).
                    agg._ended_written.update(part["run_id"].drop_nulls().unique().to_list())
                    agg.wal.remove(seq)
            runs = store.runs()
            for row in runs.filter(pl.col("status") == "running").iter_rows(named=True):
                if owns is None or owns(str(row["run_id"])):
                    agg._load_or_skip(row)
        agg._refresh_ended()
        return agg

    def _load_or_skip(self, row: dict[str, Any]) -> None:
        """:meth:`_load` a run; on failure log it and hold it as ended (never raises)."""
        run_id = str(row["run_id"])
        try:
            self._load(row)
        except Exception as err:  # one bad run must not keep the aggregator from starting
            self._runs.pop(run_id, None)
            reason = f"{type(err).__name__}: {err}"
            log.error(
                "aggregator: run %s could not be rebuilt from the store at %s (%s); it is "
                "left out: its new samples are stored but not measured live. Correct or "
                "remove its record in runs.parquet and restart",
                run_id,
                getattr(self.store, "root", None),
                reason,
            )
            self._finished[run_id] = {
                "run_id": run_id,
                "status": row.get("status"),
                "node_type": row.get("node_type"),
                "planned_epochs": row.get("planned_epochs"),
                "epochs_done": row.get("trained_epochs"),
                "measured_energy_j": row.get("energy_j"),
                "duration_s": row.get("duration_s"),
                "projection": _projection_dict(None, f"not rebuilt after a restart: {reason}"),
            }

    def _load(self, row: dict[str, Any], *, keep_done_us: int = _UNSET, late: int = 0) -> None:
        """(Re)build a run from the store; its old state stays if reading or replaying fails.

        Args:
            row: The run's record.
            keep_done_us: Epochs ending at or before this (µs) finish whether or not
                every stream covers them (they were finished before the rebuild).
            late: Late samples counted before the rebuild.

        """
        assert self.store is not None
        run_id = str(row["run_id"])
        samples = self.store.samples(run_id)
        marks = self.store.epochs(run_id)
        old = self._runs.pop(run_id, None)
        try:
            self.start_run(row, write=False)
            st = self._runs[run_id]
            st.keep_done_us, st.late = keep_done_us, late
            if old is not None:
                # Each stream's first sample seen live stays what it was: samples older
                # than that which come after the rebuild are a backfill too.
                for sid, name in enumerate(old.names):
                    if old.join_us[sid] != _UNSET:
                        new_sid = st.stream(*name)  # may grow the arrays: first
                        st.join_us[new_sid] = old.join_us[sid]
            if samples.height:
                self._absorb(samples, live=False)
            if marks.height:
                self.ingest_epochs(marks, write=False, replay=True)
        except BaseException:
            self._runs.pop(run_id, None)
            if old is not None:
                self._runs[run_id] = old
            raise

    def _reload(self, run_id: str) -> None:
        """Rebuild one run from the store (marks out of order, samples an epoch missed).

        Epochs finished before stay finished, and the run's late count is kept.
        """
        assert self.store is not None
        self.flush()
        st = self._runs.get(run_id)
        row = st.row if st is not None else self.store.run(run_id)
        keep = _UNSET
        if st is not None and st.watermark_us is not None:
            keep = max(st.watermark_us, st.keep_done_us)
        self._load(dict(row), keep_done_us=keep, late=st.late if st is not None else 0)

    # -------------------------------------------------------------------------------- queries
    def _summary(self, st: _Run, *, live: dict[str, Any] | None = None) -> dict[str, Any]:
        if live is None:
            live = self._totals_many([st])[0]
        proj = st.projection
        reason = "" if st.projector is not None else "planned_epochs unknown: STEP needs it"
        if proj is None and st.projector is not None:
            reason = "no epoch has finished yet"
        return {
            "run_id": st.run_id,
            "status": st.row.get("status", "running"),
            "node_type": st.row.get("node_type"),
            "planned_epochs": st.row.get("planned_epochs"),
            "epochs_done": len(st.done),
            "epochs_pending": len(st.pending),
            "samples": live["n_samples"],
            "late_samples": st.late,
            "devices": st.devices,
            "measured_energy_j": live["energy_j"],
            "duration_s": live["duration_s"],
            "gap_s": live["gap_s"],
            "projection": _projection_dict(proj, reason),
        }

    def status(self, run_id: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Summary of one run, or of every run held in memory (running and recently ended).

        Raises:
            BadInputError: Unknown run id.

        """
        with self._lock:
            if run_id is None:
                held = list(self._runs.values())
                totals = self._totals_many(held)
                out = [self._summary(st, live=tot) for st, tot in zip(held, totals, strict=True)]
                return out + list(self._finished.values())
            check_run_id(run_id)
            st = self._runs.get(run_id)
            if st is not None:
                return self._summary(st)
            if run_id in self._finished:
                return self._finished[run_id]
        if self.store is not None:
            row = self.store.run(run_id)  # raises BadInputError for an unknown run
            return {
                "run_id": run_id,
                "status": row["status"],
                "node_type": row.get("node_type"),
                "planned_epochs": row.get("planned_epochs"),
                "epochs_done": row.get("trained_epochs"),
                "measured_energy_j": row.get("energy_j"),
                "duration_s": row.get("duration_s"),
                "projection": _projection_dict(None, "run not held by this aggregator"),
            }
        raise BadInputError(f"no run {run_id!r} on this aggregator")

    def running(self) -> list[str]:
        """Ids of the runs held as running."""
        with self._lock:
            return sorted(self._runs)

    def projection(self, run_id: str) -> dict[str, Any]:
        """The run's current STEP projection as a dict (``energy_j`` None when there is none)."""
        summary = self.status(run_id)
        assert isinstance(summary, dict)
        return {"run_id": run_id, **summary["projection"]}

    def epochs(self, run_id: str) -> pl.DataFrame:
        """Per-epoch energy of a run: finished epochs (running run) or from the store.

        Returns:
            Columns ``run_id``, ``epoch``, ``start``, ``end`` (UTC), ``energy_j``
            (J), ``duration_s`` (s), ``mean_power_w`` (W), ``gap_s`` (s),
            ``n_samples``.

        """
        check_run_id(run_id)
        with self._lock:
            st = self._runs.get(run_id)
            if st is not None:
                rows = [{k: d[k] for k in EPOCH_COLUMNS} for d in st.done]
                return pl.DataFrame(rows, schema=EPOCH_COLUMNS)
        if self.store is None:
            raise BadInputError(f"no run {run_id!r} on this aggregator")
        from estimators.energy import epoch_energy

        row = self.store.run(run_id)  # raises for an unknown run
        marks = self.store.epochs(run_id)
        if marks.height == 0:
            return pl.DataFrame(schema=EPOCH_COLUMNS)
        samples, marks = align(self.store.samples(run_id), marks, row)
        ep = epoch_energy(samples, marks, gap_threshold_s=self.gap_threshold_s)
        return ep.select(list(EPOCH_COLUMNS))

    def _forget_quiet_nodes(self, now: int) -> None:
        """Drop the arrival lag of nodes with no batch for ``_NODE_QUIET_US`` (gone pods)."""
        self._nodes_swept_us = now
        for node in [n for n, t in self._node_seen_us.items() if now - t > _NODE_QUIET_US]:
            del self._node_seen_us[node]
            self.node_lag_s.pop(node, None)

    def stats(self) -> dict[str, Any]:
        """Counters (rows, batches), pending rows, running runs, per-node arrival lag in s.

        ``node_lag_s`` lists the nodes that sent a batch in the last
        ``_NODE_QUIET_US`` (10 minutes): a node gone since (an autoscaled pod)
        is dropped rather than reported with its last lag forever.

        ``clock_offset_s``: per node, aggregator clock minus node clock in s as
        estimated (plus the least one-way delay); ``clock_spread_s``: the
        spread of its observations in s.
        """
        with self._lock:
            self._forget_quiet_nodes(self.clock())
            nodes = self.offsets.nodes()
            return {
                **self.counters,
                "pending_rows": self._pending_rows,
                "running_runs": len(self._runs),
                "node_lag_s": dict(self.node_lag_s),
                "clock_offset_s": {n: (self.offsets.offset_us(n) or 0) / 1e6 for n in nodes},
                "clock_spread_s": {n: (self.offsets.spread_us(n) or 0) / 1e6 for n in nodes},
            }


def runs_table(agg: Aggregator) -> list[dict[str, Any]]:
    """Every run the aggregator or its store knows, newest state first (for the HTTP API)."""
    held = agg.status()
    assert isinstance(held, list)
    seen = {r["run_id"] for r in held}
    out = list(held)
    if agg.store is not None:
        for row in agg.store.runs().iter_rows(named=True):
            if row["run_id"] not in seen:
                out.append(
                    {
                        "run_id": row["run_id"],
                        "status": row["status"],
                        "node_type": row.get("node_type"),
                        "epochs_done": row.get("trained_epochs"),
                        "measured_energy_j": row.get("energy_j"),
                    }
                )
    return out


def _jsonable(value: Any) -> Any:
    """Datetimes to ISO strings, NaN to None (for JSON answers)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


assert set(RUN_STATUSES) >= {"running", "finished", "failed"}
