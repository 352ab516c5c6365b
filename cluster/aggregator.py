"""The aggregator's state machine: sample batches and epoch marks in, per-epoch energy and STEP out.

A plain class (no Ray; :mod:`cluster.actors` wraps it). Per running run it keeps

* a **window** of recent samples per stream (node, device): every sample since
  the end of the last finished epoch, plus ``retain_s`` seconds before it (to
  absorb resent batches) and one sample before that (to integrate across the
  boundary). Older samples are folded into a per-stream base (cumulative
  energy and gap time at the window's first sample), so memory grows with the
  running jobs and their current epoch, never with history;
* the **pending epoch marks** and, per finished epoch, its energy, duration,
  gap time and sample count;
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
inside the window; a sample older than its stream's window is *late*: it is
stored (the store drops duplicates) but cannot change finished epochs, so the
run is flagged and its final totals are recomputed from the store when it
ends. Samples go to the store in batches (``flush_rows`` / ``flush_interval_s``);
with a write-ahead journal (``wal``) every batch is on local disk before
:meth:`Aggregator.ingest_samples` returns, and a restart replays it.

**Clocks.** Epoch marks and samples of one run come from the same node's
clock (hooks and sidecar run side by side), so they are aligned without any
offset correction; across nodes wattwise relies on NTP. The delay between a
batch's newest sample and its arrival is kept per node (``node_lag_s`` in
:meth:`Aggregator.stats`) so a skewed clock shows up as a negative lag.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from estimators.energy import DEFAULT_GAP_THRESHOLD_S, EnergyStream
from profiler.errors import BadInputError, SchemaError, StoreError
from profiler.schema import RUN_STATUSES, SOURCES, UTC_US, check_run_id, conform, schema

if TYPE_CHECKING:
    from profiler.journal import Journal
    from profiler.store import Store

log = logging.getLogger(__name__)

_SAMPLES_SCHEMA = schema("samples")
_REQUIRED = ("node", "device", "timestamp", "source")
_KEEP = ("node", "device", "timestamp", "power_w", "energy_j")
#: Summaries of ended runs kept in memory for queries (older ones are read from the store).
_FINISHED_CACHE = 1024

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

    cap = RunPlan(gpu_model=run.get("gpu_model"), gpu_count=int(run.get("gpu_count") or 1)).cap_w()
    return OnlineStep(planned_epochs=int(planned), power_cap_w=cap)


def _project(projector: Any, energy_j: float, duration_s: float, between_j: float) -> Any:
    """Feed one finished epoch (J, s, J before it outside any epoch) and return the projection."""
    return projector.update(energy_j, duration_s, between_j=between_j)


def _projection_dict(proj: Any | None, reason: str = "") -> dict[str, Any]:
    if proj is None:
        return {"method": "step", "energy_j": None, "stable": False, "reason": reason}
    out: dict[str, Any] = dict(proj.as_row())
    return out


# ------------------------------------------------------------------------------------ PRE glue


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


@dataclass(slots=True)
class _StreamBase:
    """What is folded away of one stream: totals up to its window's first sample."""

    energy_j: float = 0.0
    gap_s: float = 0.0
    floor_us: int | None = None  # time of the window's first sample once pruned
    first_us: int | None = None
    pruned: int = 0  # samples folded into the base


@dataclass(slots=True)
class _Run:
    run_id: str
    row: dict[str, Any]
    projector: Any | None
    projection: Any | None = None
    chunks: list[pl.DataFrame] = field(default_factory=list)
    window: pl.DataFrame | None = None
    bases: dict[tuple[str, str], _StreamBase] = field(default_factory=dict)
    pending: dict[int, tuple[int, int]] = field(default_factory=dict)  # epoch -> (start, end) µs
    done: list[dict[str, Any]] = field(default_factory=list)
    watermark_us: int | None = None  # end of the last finished epoch
    energy_at_watermark_j: float = 0.0
    newest_us: int | None = None
    oldest_new_us: int | None = None  # oldest sample among the chunks not yet compacted
    received: int = 0  # rows received (before duplicates are dropped)
    late: int = 0
    skipped: int = 0
    dirty: bool = False
    sources: set[str] = field(default_factory=set)  # where its samples came from


def _now_us() -> int:
    return time.time_ns() // 1000


def _us_to_dt(us: int | None) -> datetime | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


def _empty_window() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "node": pl.String,
            "device": pl.String,
            "us": pl.Int64,
            "power_w": pl.Float64,
            "energy_j": pl.Float64,
        }
    )


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
        self._valid_ids: set[str] = set()
        self._lock = threading.RLock()
        self.node_lag_s: dict[str, float] = {}
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
            if write and self.store is not None:
                self.store.write_runs(frame)
            existing = self._runs.get(run_id)
            if existing is not None:
                existing.row.update({k: v for k, v in row.items() if v is not None})
                if existing.projector is None and not existing.done:
                    existing.projector = _new_projector(existing.row)
                return run_id
            self._finished.pop(run_id, None)
            self._runs[run_id] = _Run(run_id, row, _new_projector(row))
            self._valid_ids.add(run_id)
        return run_id

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
        st = _Run(run_id, row, _new_projector(row))
        self._runs[run_id] = st
        return st

    # -------------------------------------------------------------------------------- ingest
    def ingest_samples(self, batch: pl.DataFrame, *, write: bool = True) -> int:
        """Take a batch of samples (``samples`` schema); returns the rows taken.

        Rows without a run id are stored as unassigned (they belong to no
        run's energy). Duplicates of samples already held are ignored.

        Raises:
            SchemaError: The batch does not fit the ``samples`` schema; nothing
                was taken.
            StoreError: The store has refused writes for so long that
                ``max_pending_rows`` wait; nothing was taken (resend later).

        """
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
            if write and self.wal is not None:
                self._wal_seqs.append(self.wal.append(batch))
            self._absorb(batch)
            if write and self.store is not None:
                self._pending.append(batch)
                self._pending_rows += batch.height
                if self._pending_since is None:
                    self._pending_since = self.clock()
                self.maybe_flush()
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
        ).row(0)
        if any(bad):
            return conform(batch, "samples")  # raises with the row and the reason
        return batch

    def _absorb(self, batch: pl.DataFrame, *, live: bool = True) -> None:
        """Split a valid batch by run and queue each part on its run (no store writes).

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
        else:
            for node, newest in batch.group_by("node").agg(pl.col("timestamp").max()).iter_rows():
                self.node_lag_s[str(node)] = (now - int(newest.timestamp() * 1e6)) / 1e6
        parts = batch.select(
            "run_id",
            *(pl.col(c) for c in ("node", "device")),
            pl.col("timestamp").dt.epoch("us").alias("us"),
            "power_w",
            "energy_j",
            "source",
        )
        rids = parts["run_id"]
        if rids[0] == rids[-1] and rids.null_count() == 0 and rids.n_unique() == 1:
            groups: Iterable[tuple[Any, pl.DataFrame]] = [(rids[0], parts)]
        else:
            groups = ((k[0], g) for k, g in parts.partition_by("run_id", as_dict=True).items())
        for rid, part in groups:
            if rid is None:
                self.counters["unassigned"] += part.height
                continue
            if rid not in self._valid_ids:
                check_run_id(rid)
                self._valid_ids.add(rid)
            st = self._state(rid)
            if st is None:
                self.counters["after_finish"] += part.height
                continue
            st.sources.update(part["source"].unique().to_list())
            part = part.drop("run_id", "source")
            st.chunks.append(part)
            st.received += part.height
            lo, top = part.select(pl.col("us").min().alias("lo"), pl.col("us").max()).row(0)
            st.oldest_new_us = lo if st.oldest_new_us is None else min(st.oldest_new_us, lo)
            st.newest_us = top if st.newest_us is None else max(st.newest_us, top)
            if st.pending:
                self._advance(st)

    def ingest_epochs(self, marks: pl.DataFrame, *, write: bool = True) -> int:
        """Take epoch marks (``epochs`` schema); returns the marks taken.

        Marks are written to the store at once (they are few); a mark for an
        epoch already finished is ignored unless it differs, in which case
        the run is rebuilt from the store.

        Raises:
            SchemaError: The marks do not fit the ``epochs`` schema.

        """
        if marks.height == 0:
            return 0
        marks = conform(marks, "epochs")
        with self._lock:
            if write and self.store is not None:
                self.store.write_epochs(marks)
            rows = marks.select(
                "run_id",
                "epoch",
                pl.col("start").dt.epoch("us").alias("s"),
                pl.col("end").dt.epoch("us").alias("e"),
            ).sort("run_id", "s")
            rebuild: set[str] = set()
            for rid, epoch, s, e in rows.iter_rows():
                st = self._state(rid)
                if st is None:
                    continue
                done = {d["epoch"]: d for d in st.done}
                if epoch in done:
                    d = done[epoch]
                    if (d["_s"], d["_e"]) != (s, e):
                        rebuild.add(rid)
                    continue
                if st.watermark_us is not None and s < st.watermark_us:
                    rebuild.add(rid)  # an earlier epoch arrived after later ones finished
                    continue
                st.pending[int(epoch)] = (int(s), int(e))
                self.counters["epochs"] += 1
            for rid in rebuild:
                if write and self.store is not None:
                    log.warning(
                        "run %s: epoch marks out of order; rebuilding it from the store", rid
                    )
                    self._reload(rid)
            for rid in {r for r in rows["run_id"].to_list() if r not in rebuild}:
                st = self._runs.get(rid)
                if st is not None and st.pending:
                    self._advance(st)
        return marks.height

    # -------------------------------------------------------------------------------- epochs
    def _compact(self, st: _Run) -> pl.DataFrame:
        """Merge a run's new chunks into its window (sorted by stream and time, no duplicates)."""
        if not st.chunks:
            return st.window if st.window is not None else _empty_window()
        parts = ([st.window] if st.window is not None else []) + st.chunks
        st.chunks = []
        win = pl.concat(parts, how="vertical")
        # Samples with neither power nor a counter carry no measurement (as energy.py).
        empty = win.select((pl.col("power_w").is_null() & pl.col("energy_j").is_null()).sum())
        n_empty = int(empty.item())
        if n_empty:
            win = win.filter(pl.col("power_w").is_not_null() | pl.col("energy_j").is_not_null())
            st.skipped += n_empty
        win = win.unique(["node", "device", "us"], keep="first", maintain_order=True).sort(
            "node", "device", "us"
        )
        floors = [(k[0], k[1], b.floor_us) for k, b in st.bases.items() if b.floor_us is not None]
        oldest_new, st.oldest_new_us = st.oldest_new_us, None
        # Only chunks reaching below some stream's floor can hold late samples.
        if floors and (oldest_new is None or oldest_new < max(f[2] for f in floors)):
            fl = pl.DataFrame(
                floors,
                schema={"node": pl.String, "device": pl.String, "floor": pl.Int64},
                orient="row",
            )
            win = win.join(fl, on=["node", "device"], how="left", maintain_order="left")
            late = win.filter(pl.col("us") < pl.col("floor")).height
            if late:
                st.late += late
                st.dirty = True
                self.counters["late"] += late
                win = win.filter(pl.col("floor").is_null() | (pl.col("us") >= pl.col("floor")))
            win = win.drop("floor")
        st.window = win
        return win

    def _streams(self, st: _Run, win: pl.DataFrame) -> dict[tuple[str, str], EnergyStream]:
        out: dict[tuple[str, str], EnergyStream] = {}
        if win.height == 0:
            return out
        keys = win.select("node", "device")
        seg = keys.select(pl.struct("node", "device").rle_id()).to_series().to_numpy()
        starts = np.concatenate(([0], np.flatnonzero(np.diff(seg)) + 1, [win.height]))
        us_all = win["us"].to_numpy()
        p_all = win["power_w"].to_numpy()
        c_all = win["energy_j"].to_numpy()
        names = keys[starts[:-1]].rows()
        for (node, device), a, b in zip(names, starts[:-1], starts[1:], strict=True):
            us = us_all[a:b]
            c = c_all[a:b]
            stream = EnergyStream.build(
                us / 1e6,
                p_all[a:b].astype(float),
                None if np.isnan(c).all() else c,
                self.gap_threshold_s,
            )
            out[(node, device)] = stream
            base = st.bases.setdefault((node, device), _StreamBase())
            if base.first_us is None:
                base.first_us = int(us[0])
        return out

    def _advance(self, st: _Run, *, force: bool = False) -> None:
        """Finish every pending epoch whose samples have arrived (all of them with ``force``)."""
        order = sorted(st.pending.items(), key=lambda kv: kv[1][0])
        if not force and (st.newest_us is None or st.newest_us < order[0][1][1]):
            return  # no stream has reached the first pending end yet: nothing can be ready
        win = self._compact(st)
        streams = self._streams(st, win)
        ready = []
        if force:
            ready = order
        else:
            for epoch, (s, e) in order:
                lagging = st.newest_us is not None and st.newest_us >= e + self.max_lag_us
                if not (lagging or (streams and self._complete(streams, s, e))):
                    break
                ready.append((epoch, (s, e)))
        if not ready:
            return
        for epoch, (s, e) in ready:
            del st.pending[epoch]
            self._finish_epoch(st, streams, epoch, s, e)
        self._prune(st, streams)

    def _complete(
        self, streams: Mapping[tuple[str, str], EnergyStream], s_us: int, e_us: int
    ) -> bool:
        """Whether every live stream has samples around and throughout [s, e] without holes.

        A hole is an interval longer than 1.5 times the stream's median
        interval: a batch that has not arrived yet (batches can arrive out of
        order). Streams silent since ``max_lag_s`` before ``s`` are ignored.
        """
        s, e = s_us / 1e6, e_us / 1e6
        silent = s - self.max_lag_us / 1e6
        for stream in streams.values():
            t = stream.t
            if t[-1] < silent:
                continue
            if t[0] > s or t[-1] < e:
                return False
            i = max(int(np.searchsorted(t, s, side="right")) - 1, 0)
            j = int(np.searchsorted(t, e, side="left"))
            if j - i >= 1 and len(t) >= 3:
                dt = np.diff(t)
                if float(np.max(dt[i:j])) > 1.5 * float(np.median(dt)):
                    return False
        return True

    def _cumulative(
        self, st: _Run, streams: Mapping[tuple[str, str], EnergyStream], x_us: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run energy (J, all streams), largest stream gap (s) and sample count up to times x."""
        x = x_us / 1e6
        energy = np.zeros(len(x))
        gaps = []
        count = np.zeros(len(x), dtype=np.int64)
        for key, stream in streams.items():
            base = st.bases[key]
            e, g = stream.at(x)
            energy += base.energy_j + e
            gaps.append(base.gap_s + g)
            count += base.pruned + np.searchsorted(stream.t, x, side="left")
        gap = np.max(gaps, axis=0) if gaps else np.zeros(len(x))
        return energy, gap, count

    def _finish_epoch(
        self, st: _Run, streams: Mapping[tuple[str, str], EnergyStream], epoch: int, s: int, e: int
    ) -> None:
        duration = (e - s) / 1e6
        if streams:
            energy, gaps, count = self._cumulative(st, streams, np.array([s, e], dtype=np.float64))
            ej = float(energy[1] - energy[0])
            gap = (
                float(gaps[1] - gaps[0]) if len(streams) == 1 else self._max_gap(st, streams, s, e)
            )
            n = int(count[1] - count[0])
            prev = st.energy_at_watermark_j if st.watermark_us is not None else 0.0
            between = max(float(energy[0]) - prev, 0.0)
            st.energy_at_watermark_j = float(energy[1])
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
            st.projection = _project(st.projector, ej, duration, between)

    def _max_gap(
        self, st: _Run, streams: Mapping[tuple[str, str], EnergyStream], s: int, e: int
    ) -> float:
        x = np.array([s, e], dtype=np.float64) / 1e6
        return max(float(np.diff(stream.at(x)[1])[0]) for stream in streams.values())

    def _prune(self, st: _Run, streams: Mapping[tuple[str, str], EnergyStream]) -> None:
        """Fold samples older than ``watermark - retain_s`` into each stream's base."""
        if st.watermark_us is None or st.window is None:
            return
        keep_from = (st.watermark_us - self.retain_us) / 1e6
        keep = []
        for (node, device), stream in streams.items():
            i0 = max(int(np.searchsorted(stream.t, keep_from, side="right")) - 1, 0)
            base = st.bases[(node, device)]
            if i0 > 0:
                base.energy_j += float(stream.e[i0])
                base.gap_s += float(stream.g[i0])
                base.pruned += i0
            base.floor_us = int(round(stream.t[i0] * 1e6))
            keep.append((node, device, base.floor_us))
        fl = pl.DataFrame(
            keep, schema={"node": pl.String, "device": pl.String, "floor": pl.Int64}, orient="row"
        )
        st.window = (
            st.window.join(fl, on=["node", "device"], how="left", maintain_order="left")
            .filter(pl.col("us") >= pl.col("floor"))
            .drop("floor")
        )

    # -------------------------------------------------------------------------------- finish
    def finish_run(self, run_id: str, status: str = "finished") -> dict[str, Any]:
        """End a run: finish its epochs, store the measured totals, drop it from memory.

        A failed run keeps everything measured until then and is stored as
        ``failed`` (PRE trains on finished runs only).

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
            self._advance(st, force=True)
            streams = self._streams(st, self._compact(st))
            totals = self._totals(st, streams)
            if st.dirty and self.store is not None:
                self.flush()
                totals, done = self._recompute(st)
                st.done = done
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
                "trained_epochs": len(st.done),
            }
            if st.row.get("start") is None and totals["start"] is not None:
                row["start"] = totals["start"]
            st.row.update({k: v for k, v in row.items() if v is not None})
            if st.projector is not None:
                st.projection = st.projector.finish(totals["energy_j"])
            if self.store is not None:
                self.flush()
                self.store.write_runs(pl.DataFrame([row], schema_overrides={"end": UTC_US}))
            summary = self._summary(st, live=totals)
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

    def _totals(self, st: _Run, streams: Mapping[tuple[str, str], EnergyStream]) -> dict[str, Any]:
        if not streams:
            return {
                "energy_j": 0.0,
                "duration_s": None,
                "start": None,
                "end": None,
                "gap_s": 0.0,
                "n_samples": 0,
            }
        energy = sum(st.bases[k].energy_j + float(s.e[-1]) for k, s in streams.items())
        gap = max(st.bases[k].gap_s + float(s.g[-1]) for k, s in streams.items())
        first = min(int(st.bases[k].first_us or 0) for k in streams)
        last = max(int(round(s.t[-1] * 1e6)) for s in streams.values())
        n = sum(st.bases[k].pruned + len(s.t) for k, s in streams.items())
        return {
            "energy_j": energy,
            "duration_s": (last - first) / 1e6,
            "start": _us_to_dt(first),
            "end": _us_to_dt(last),
            "gap_s": gap,
            "n_samples": n,
        }

    def _recompute(self, st: _Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Totals and epochs of a run from the store (after late samples)."""
        from estimators.energy import epoch_energy, run_energy

        assert self.store is not None
        samples = self.store.samples(st.run_id)
        marks = self.store.epochs(st.run_id)
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
        if marks.height:
            ep = epoch_energy(samples, marks, gap_threshold_s=thr)
            for r in ep.iter_rows(named=True):
                d = {k: r[k] for k in EPOCH_COLUMNS}
                d["_s"] = int(r["start"].timestamp() * 1e6)
                d["_e"] = int(r["end"].timestamp() * 1e6)
                done.append(d)
        return totals, done

    # -------------------------------------------------------------------------------- store
    def maybe_flush(self, *, force: bool = False) -> int:
        """Write pending samples when enough wait or the oldest waited long enough.

        Store failures are logged and the rows kept for the next try.

        Returns:
            Rows written (new to the store).

        """
        with self._lock:
            if not self._pending:
                return 0
            due = (
                force
                or self._pending_rows >= self.flush_rows
                or (
                    self._pending_since is not None
                    and self.clock() - self._pending_since >= self.flush_interval_us
                )
            )
            if not due:
                return 0
            try:
                return self.flush()
            except StoreError as err:
                log.warning(
                    "aggregator: store write failed (%s); %d samples kept for retry",
                    err,
                    self._pending_rows,
                )
                return 0

    def flush(self) -> int:
        """Write every pending sample to the store now.

        A batch that conflicts with stored samples (same key, other values)
        is dropped with an error logged, so it cannot block the others.

        Returns:
            Rows new to the store.

        Raises:
            StoreError: The store could not be written; the rows stay pending.

        """
        with self._lock:
            if not self._pending or self.store is None:
                return 0
            pending = self._pending
            try:
                n = self.store.write_samples(pl.concat(pending, how="vertical"))
            except SchemaError:
                n = 0
                for part in pending:
                    try:
                        n += self.store.write_samples(part)
                    except SchemaError as err:
                        self.counters["rejected"] += part.height
                        log.error("aggregator: dropped a batch of %d samples: %s", part.height, err)
            self._pending = []
            self._pending_rows = 0
            self._pending_since = None
            self.counters["flushed"] += n
            if self.wal is not None:
                for seq in self._wal_seqs:
                    self.wal.remove(seq)
                self._wal_seqs = []
            return n

    def close(self) -> None:
        """Flush everything that waits."""
        self.flush()

    # -------------------------------------------------------------------------------- rebuild
    @classmethod
    def rebuild(cls, store: Store, **kwargs: Any) -> Aggregator:
        """An aggregator holding the state of every running run in ``store``.

        Batches left in the write-ahead journal by a process that died are
        written to the store first; then each running run's samples and epoch
        marks are replayed (one run at a time, so memory stays bounded by the
        largest run's current window plus one run's history).

        Args:
            store: The run store.
            **kwargs: As for :class:`Aggregator`.

        """
        agg = cls(store, **kwargs)
        with agg._lock:
            if agg.wal is not None:
                for seq, path in agg.wal.pending():
                    store.write_samples(agg.wal.read(path))
                    agg.wal.remove(seq)
            runs = store.runs()
            for row in runs.filter(pl.col("status") == "running").iter_rows(named=True):
                agg._load(row)
        return agg

    def _load(self, row: dict[str, Any]) -> None:
        assert self.store is not None
        run_id = str(row["run_id"])
        self._runs.pop(run_id, None)
        self.start_run(row, write=False)
        samples = self.store.samples(run_id)
        if samples.height:
            self._absorb(samples, live=False)
        marks = self.store.epochs(run_id)
        if marks.height:
            self.ingest_epochs(marks, write=False)

    def _reload(self, run_id: str) -> None:
        """Rebuild one run from the store (after marks arrived out of order)."""
        assert self.store is not None
        self.flush()
        st = self._runs.get(run_id)
        row = st.row if st is not None else self.store.run(run_id)
        self._load(dict(row))

    # -------------------------------------------------------------------------------- queries
    def _summary(self, st: _Run, *, live: dict[str, Any] | None = None) -> dict[str, Any]:
        if live is None:
            live = self._totals(st, self._streams(st, self._compact(st)))
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
            "devices": len(st.bases),
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
                out = [self._summary(st) for st in self._runs.values()]
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

        self.store.run(run_id)  # raises for an unknown run
        marks = self.store.epochs(run_id)
        if marks.height == 0:
            return pl.DataFrame(schema=EPOCH_COLUMNS)
        ep = epoch_energy(self.store.samples(run_id), marks, gap_threshold_s=self.gap_threshold_s)
        return ep.select(list(EPOCH_COLUMNS))

    def stats(self) -> dict[str, Any]:
        """Counters (rows, batches), pending rows, running runs and per-node arrival lag in s."""
        with self._lock:
            return {
                **self.counters,
                "pending_rows": self._pending_rows,
                "running_runs": len(self._runs),
                "node_lag_s": dict(self.node_lag_s),
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
