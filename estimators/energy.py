"""Energy of runs and epochs from power samples: counter deltas or trapezoids, split at epoch marks.

For each stream of samples (one run, node and device), in time order, every
interval between two consecutive samples is one of:

* **counter**: both samples carry the cumulative ``energy_j`` counter and it did
  not go backwards; the interval's energy is the counter delta. A counter is
  measured energy, so such an interval is never a gap, however long.
* **power**: otherwise, when both samples have ``power_w`` and the interval is
  at most ``gap_threshold_s`` long; the energy is the trapezoid.
  A counter reset (the counter going backwards) falls back to this rule and the next.
* **held**: otherwise, when the interval is at most ``gap_threshold_s`` long and
  only one of its samples has ``power_w`` while the other has only the counter
  (power and counter read on different samples, or one reading of each lost):
  that one power is held across the interval, as at a stream's edges.
* **gap**: anything else. Its energy is not invented: it counts 0 J and its
  length is reported as ``gap_s``.

Each interval's kind depends on its two samples only, so a live window of the
samples (``cluster.aggregator``) integrates exactly as the whole stream does.
In particular a counter delta is used only between two adjacent samples that
both carry the counter; it is not spread over intervals whose ends lack it.

Within an interval the cumulative energy is known as a function of time
(quadratic for a trapezoid, linear for a counter or a held power), so an epoch
boundary that falls inside an interval splits it exactly. Before a stream's
first sample and after its last, power is held at the edge sample's value (or,
if it has none, the mean power of its counter interval) for up to
``gap_threshold_s`` seconds (a 1 Hz sampler rarely hits an epoch mark exactly);
beyond that the uncovered time is a gap. Devices and nodes of one run add up
per epoch; ``gap_s`` of a row is the largest over its devices.

Each stream's threshold is ``max(gap_threshold_s, 3 x its sampler's interval)``
(:func:`stream_threshold`: the median of its first 8 intervals), so a sampler
slower than one sample every ``gap_threshold_s / 3`` seconds is integrated, not
counted as one long gap, while a stretch without samples much longer than the
sampler's own rhythm still is a gap.

Samples whose ``power_w`` and ``energy_j`` are both null carry no measurement
and are skipped; their number is reported as ``n_skipped``. A device all of
whose samples are skipped (say every reading was ``[N/A]``: the GPU fell off
the bus) still counts in ``devices`` and ``n_skipped``, and it measured none
of any epoch: the whole epoch is its gap (as the time beyond the edge samples
is a gap for a device with a few readings).

An epoch may last 0 s (``end == start``: hooks that mark an epoch with nothing
to do); it gets 0 J and no mean power. One ending before it starts is refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

from profiler.errors import BadInputError, where

DEFAULT_GAP_THRESHOLD_S = 5.0
#: A stream's gap threshold is at least this many of its own sample intervals, so a
#: sampler slower than one sample every ``DEFAULT_GAP_THRESHOLD_S / 3`` s is not a run of
#: gaps (CodeCarbon, for one, samples every 15 s by default).
GAP_INTERVALS = 3.0
#: The sampler's interval is the median of a stream's first this many intervals (it must
#: have at least :data:`MIN_RHYTHM_INTERVALS`), so a later outage does not change it and a
#: live window (``cluster.aggregator``) knows it as soon as a batch would.
RHYTHM_INTERVALS = 8
MIN_RHYTHM_INTERVALS = 3
_POWER, _COUNTER, _GAP, _HELD = 0, 1, 2, 3


def stream_threshold(t: np.ndarray, floor: float) -> float:
    """Gap threshold of one stream in s: ``max(floor, 3 x its sampler's interval)``.

    The sampler's interval is the median of the stream's first
    :data:`RHYTHM_INTERVALS` intervals; with fewer than
    :data:`MIN_RHYTHM_INTERVALS` of them the rhythm is unknown and ``floor`` is
    used.

    Args:
        t: The stream's sample times in s, increasing (only the first few are read).
        floor: The configured threshold (``--gap-threshold``), a lower bound.

    """
    d = np.diff(np.asarray(t[: RHYTHM_INTERVALS + 1], dtype=np.float64))
    if len(d) < MIN_RHYTHM_INTERVALS:
        return float(floor)
    return max(float(floor), GAP_INTERVALS * float(np.median(d)))


def classify_intervals(
    t: np.ndarray, p: np.ndarray, c: np.ndarray | None, thr: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kind and energy of every interval between consecutive samples (see the module doc).

    Args:
        t: Sample times in s, increasing.
        p: Power in W at each sample (NaN where unknown).
        c: Cumulative energy counter in J at each sample (NaN where missing), or ``None``.
        thr: Gap threshold in s, or one per interval.

    Returns:
        ``dt`` (s), ``inc`` (J; 0 for gaps), ``kind`` (power, counter, held or gap)
        and ``gap`` (bool) per interval.

    """
    # Written to allocate few large temporaries: on big inputs, fresh memory (page
    # faults) costs more than the arithmetic.
    dt = np.diff(t)
    inc = p[:-1] + p[1:]  # becomes the energy of each interval, in J
    inc *= 0.5
    inc *= dt
    gap = (dt > thr) | np.isnan(inc)
    kind = np.where(gap, _GAP, _POWER).astype(np.int8)
    if c is not None:
        dc = np.diff(c)
        counter_ok = dc >= 0  # False for NaN (a missing counter) and for resets
        kind[counter_ok] = _COUNTER
        inc[counter_ok] = dc[counter_ok]
        gap &= ~counter_ok
        # Power on one side only, the counter alone on the other: hold that power.
        ii = np.flatnonzero(gap)
        ii = ii[dt[ii] <= (thr if np.ndim(thr) == 0 else np.asarray(thr)[ii])]
        if len(ii):
            pa, pb = p[ii], p[ii + 1]
            known_a, known_b = ~np.isnan(pa), ~np.isnan(pb)
            held = np.where(known_a, ~np.isnan(c[ii + 1]), ~np.isnan(c[ii])) & (known_a ^ known_b)
            ii = ii[held]
            kind[ii] = _HELD
            inc[ii] = np.where(known_a[held], pa[held], pb[held]) * dt[ii]
            gap[ii] = False
    inc[gap] = 0.0
    return dt, inc, kind, gap


@dataclass(frozen=True, slots=True)
class EnergyStream:
    """One device's samples prepared for exact integration.

    Attributes:
        t: Sample times in s since the Unix epoch (float64), strictly increasing.
        e: Cumulative integrated energy at each sample in J (``e[0] == 0``).
        g: Cumulative gap time at each sample in s.
        kind: Kind of each interval (length ``len(t) - 1``).
        p: Power at each sample in W (NaN where unknown).
        inc: Energy of each interval in J.
        edge_first_w: Power held before the first sample, in W (NaN if unknown).
        edge_last_w: Power held after the last sample, in W (NaN if unknown).
        thr: Gap threshold in s.
        n_skipped: Samples dropped because they carried neither power nor counter.

    """

    t: np.ndarray
    e: np.ndarray
    g: np.ndarray
    kind: np.ndarray
    p: np.ndarray
    inc: np.ndarray
    edge_first_w: float
    edge_last_w: float
    thr: float
    n_skipped: int

    @classmethod
    def build(
        cls, t: np.ndarray, p: np.ndarray, c: np.ndarray | None, thr: float, n_skipped: int = 0
    ) -> EnergyStream:
        """Prepare one device's samples.

        Args:
            t: Sample times in s, strictly increasing.
            p: Power in W at each sample (NaN where unknown).
            c: Cumulative energy counter in J at each sample, or ``None``.
            thr: Gap threshold in s.
            n_skipped: Samples dropped before (no value at all), for reporting.

        Returns:
            The stream, ready for :meth:`at`.

        """
        dt, inc, kind, gap = classify_intervals(t, p, c, thr)
        e = np.empty(len(t))
        e[0] = 0.0
        np.cumsum(inc, out=e[1:])
        g = np.zeros(len(t))
        if gap.any():
            np.cumsum(np.where(gap, dt, 0.0), out=g[1:])

        def edge(sample_w: float, interval: int) -> float:
            if not np.isnan(sample_w):
                return float(sample_w)
            if len(dt) > interval >= -len(dt) and kind[interval] == _COUNTER and dt[interval] > 0:
                return float(inc[interval] / dt[interval])
            return float("nan")

        return cls(t, e, g, kind, p, inc, edge(p[0], 0), edge(p[-1], -1), thr, n_skipped)

    def at(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative energy (J) and gap time (s) since the first sample, at times ``x`` (s)."""
        t, n = self.t, len(self.t)
        i = np.searchsorted(t, x, side="right") - 1
        energy = np.empty_like(x)
        gap = np.empty_like(x)
        before, after = i < 0, i >= n - 1
        inner = ~(before | after)
        energy[inner], gap[inner] = inside(self, i[inner], x[inner])
        # Outside the samples: hold the edge power up to the threshold, then a gap.
        for mask, sign, anchor_e, anchor_g, anchor_t, w in (
            (before, -1.0, 0.0, 0.0, t[0], self.edge_first_w),
            (after, 1.0, self.e[-1], self.g[-1], t[-1], self.edge_last_w),
        ):
            if mask.any():
                energy[mask], gap[mask] = outside(
                    np.abs(x[mask] - anchor_t), w, self.thr, anchor_e, anchor_g, sign
                )
        return energy, gap


class _Intervals(Protocol):
    """Per-sample arrays of one or many concatenated streams (see :class:`EnergyStream`)."""

    @property
    def t(self) -> np.ndarray: ...
    @property
    def e(self) -> np.ndarray: ...
    @property
    def g(self) -> np.ndarray: ...
    @property
    def kind(self) -> np.ndarray: ...
    @property
    def p(self) -> np.ndarray: ...
    @property
    def inc(self) -> np.ndarray: ...


def inside(st: _Intervals, ii: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative energy (J) and gap (s) at times ``x`` inside intervals ``ii``.

    The exact partial integral: quadratic in time for a trapezoid, linear for
    a counter or a held power, flat for a gap (whose time counts as gap).

    Args:
        st: The samples' arrays (``t[ii] <= x < t[ii + 1]`` for every query).
        ii: Index of the interval's first sample, per query.
        x: Query times in s.

    """
    s = x - st.t[ii]
    dt = st.t[ii + 1] - st.t[ii]
    k = st.kind[ii]
    pa, pb = st.p[ii], st.p[ii + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        part_power = pa * s + 0.5 * (pb - pa) / dt * s * s
        part_counter = st.inc[ii] * s / dt
    linear = (k == _COUNTER) | (k == _HELD)
    energy = st.e[ii] + np.where(k == _POWER, part_power, np.where(linear, part_counter, 0.0))
    return energy, st.g[ii] + np.where(k == _GAP, s, 0.0)


def outside(
    d: np.ndarray,
    w: float | np.ndarray,
    thr: float,
    anchor_e: float | np.ndarray,
    anchor_g: float | np.ndarray,
    sign: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative energy (J) and gap (s) ``d`` seconds before (``sign=-1``) or after a stream.

    Power ``w`` (W; NaN when unknown) is held for at most ``thr`` seconds; the
    rest is a gap. ``anchor_e``/``anchor_g`` are the values at the edge sample.
    """
    unknown = np.isnan(w)
    held = np.where(unknown, 0.0, np.minimum(d, thr))
    return anchor_e + sign * held * np.where(unknown, 0.0, w), anchor_g + sign * (d - held)


def _seconds(col: pl.Expr) -> pl.Expr:
    """Datetime (naive = UTC, or any zone) to float seconds since the Unix epoch."""
    return col.dt.epoch("us").cast(pl.Float64) / 1e6


def _as_utc(df: pl.DataFrame, name: str, file: str | None) -> pl.DataFrame:
    dtype = df.schema[name]
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            return df.with_columns(pl.col(name).dt.convert_time_zone("UTC"))
        return df.with_columns(pl.col(name).dt.replace_time_zone("UTC"))
    raise BadInputError(
        f"{where(file, label=repr(name))}expected a datetime column (UTC, or naive meaning UTC); "
        f"found {dtype}"
    )


def _require(df: pl.DataFrame, cols: tuple[str, ...], what: str, file: str | None) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise BadInputError(
            f"{where(file)}{what} need column(s) {missing}; found columns {df.columns}"
        )


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_values(df: pl.DataFrame, name: str, file: str | None) -> None:
    """Refuse NaN, infinite and negative values in a float column (nulls are fine)."""
    col = pl.col(name)
    bad = df.select((col.is_nan() | col.is_infinite() | (col < 0)).any()).item()
    if bad:
        r = _first_row(
            df.select((col.is_nan() | col.is_infinite() | (col < 0)).fill_null(False))
            .to_series()
            .to_numpy()
        )
        raise BadInputError(
            f"{where(file, r + 1, repr(name))}expected a finite number >= 0; found {df[name][r]}"
        )


_Ident = tuple[str, str, str]


def _prepare_streams(
    samples: pl.DataFrame, thr: float, file: str | None
) -> tuple[dict[_Ident, EnergyStream], dict[_Ident, int]]:
    """Validate samples and build one integration stream per (run_id, node, device).

    Samples of several devices may be interleaved; within one device they
    must be in strictly increasing time.

    Returns:
        The streams, and the devices whose samples all lacked a value (no
        stream: they measured nothing) with the number of their samples.

    Raises:
        BadInputError: Missing columns, non-numeric, negative or non-finite
            power or energy, a null run id, node or device, or timestamps of
            one device not strictly increasing (unsorted or duplicated).

    """
    _require(samples, ("run_id", "timestamp", "power_w"), "samples", file)
    has_counter = "energy_j" in samples.columns
    for name in ("power_w", "energy_j") if has_counter else ("power_w",):
        dtype = samples.schema[name]
        if not (dtype.is_numeric() or dtype == pl.Null):
            raise BadInputError(f"{where(file, label=repr(name))}expected numbers; found {dtype}")
    samples = _as_utc(samples, "timestamp", file)
    keys = [c for c in ("run_id", "node", "device") if c in samples.columns]
    df = samples.select(
        *keys,
        pl.col("timestamp").dt.epoch("us").alias("us"),
        pl.col("power_w").cast(pl.Float64),
        *([pl.col("energy_j").cast(pl.Float64)] if has_counter else []),
    ).with_row_index("row", offset=1)
    for name in ("power_w", "energy_j") if has_counter else ("power_w",):
        _check_values(df, name, file)
    if df["run_id"].null_count():
        r = _first_row(df["run_id"].is_null().to_numpy())
        raise BadInputError(f"{where(file, r + 1, repr('run_id'))}expected a run id; found null")
    for k in keys[1:]:
        # A null id is no device: merging it with another stream, or guessing one, would
        # add up or invent energy. The samples schema requires node and device.
        if df[k].null_count():
            r = _first_row(df[k].is_null().to_numpy())
            raise BadInputError(
                f"{where(file, r + 1, repr(k))}expected a {k} id; found null. Fill in the "
                f"{k} of every sample, or drop the column when the run has a single {k}"
            )
    streams: dict[_Ident, EnergyStream] = {}
    silent: dict[_Ident, int] = {}
    for key, part in _split_streams(df, keys):
        named = dict(zip(keys, key, strict=True))
        ident = (str(named["run_id"]), str(named.get("node", "")), str(named.get("device", "0")))
        us = part["us"].to_numpy()
        p = part["power_w"].to_numpy()  # nulls become NaN; real NaNs were refused above
        c = part["energy_j"].to_numpy() if has_counter else None
        empty = np.isnan(p) if c is None else np.isnan(p) & np.isnan(c)
        n_skipped = int(empty.sum())
        if n_skipped:
            keep = ~empty
            us, p, part = us[keep], p[keep], part.filter(pl.Series(keep))
            c = None if c is None else c[keep]
        if len(us) == 0:
            # Not dropped: a device that measured nothing is reported (skipped, gap).
            silent[ident] = n_skipped
            continue
        back = np.flatnonzero(us[1:] <= us[:-1])
        if len(back):
            _unsorted(part, int(back[0]) + 1, ident, file)
        if c is not None and np.isnan(c).all():
            c = None
        t = us / 1e6
        streams[ident] = EnergyStream.build(t, p, c, stream_threshold(t, thr), n_skipped)
    return streams, silent


def _by_run(
    streams: dict[_Ident, EnergyStream], silent: dict[_Ident, int]
) -> tuple[dict[str, list[EnergyStream]], dict[str, list[int]]]:
    """Streams per run, and the sample counts of each run's devices that measured nothing."""
    by_run: dict[str, list[EnergyStream]] = {}
    for (run_id, _, _), st in streams.items():
        by_run.setdefault(run_id, []).append(st)
    silent_by_run: dict[str, list[int]] = {}
    for (run_id, _, _), n in silent.items():
        silent_by_run.setdefault(run_id, []).append(n)
    return by_run, silent_by_run


def _split_streams(
    df: pl.DataFrame, keys: Sequence[str]
) -> list[tuple[tuple[object, ...], pl.DataFrame]]:
    """Rows of each (run_id, node, device), in input order.

    Streams usually arrive contiguous (one device after another), and slicing
    them out is nearly free; interleaved devices fall back to a hash partition.
    """
    if df.height == 0:
        return []
    # eq_missing: a null never passes for "the same as the first value" (nor is skipped).
    constant = df.select(pl.col(k).eq_missing(pl.col(k).first()).all() for k in keys).row(0)
    varying = [k for k, const in zip(keys, constant, strict=True) if not const]
    if not varying:
        return [(df.select(keys).row(0), df)]
    expr = pl.col(varying[0]) if len(varying) == 1 else pl.struct(varying)
    seg = df.select(expr.rle_id()).to_series().to_numpy()
    starts = np.concatenate(([0], np.flatnonzero(np.diff(seg)) + 1))
    firsts = df.select(keys)[starts].rows()
    if len(set(firsts)) == len(firsts):
        ends = [*starts[1:], df.height]
        return [
            (k, df.slice(int(a), int(b - a))) for k, a, b in zip(firsts, starts, ends, strict=True)
        ]
    return list(df.partition_by(keys, as_dict=True, maintain_order=True).items())


def _unsorted(part: pl.DataFrame, i: int, ident: tuple[str, str, str], file: str | None) -> None:
    rec, prev = part.row(i, named=True), part.row(i - 1, named=True)
    what = "a duplicated" if rec["us"] == prev["us"] else "an out-of-order"
    stamp = pl.Series([rec["us"], prev["us"]]).cast(pl.Datetime("us", "UTC")).to_list()
    raise BadInputError(
        f"{where(file, rec['row'], 'run ' + repr(ident[0]))}node {ident[1]!r} device "
        f"{ident[2]!r} has {what} timestamp {stamp[0]} after {stamp[1]} (row {prev['row']}); "
        "expected strictly increasing times per run, node and device. Sort the samples and "
        "drop duplicates first"
    )


def _label(row: dict[str, object], *, epoch: bool = True) -> str:
    text = f"run {row['run_id']!r}"
    return text + (f" epoch {row['epoch']}" if epoch else "")


def prepare_epochs(epochs: pl.DataFrame, *, file: str | None = None) -> pl.DataFrame:
    """Validate epoch marks.

    An epoch may end when it starts (0 s). Epochs of one run may touch (one
    starts when the previous ends); a 0 s epoch may sit on another's start or
    end, not inside it.

    Raises:
        BadInputError: Missing columns, null values, an epoch ending before it
            starts, a repeated (run_id, epoch), or epochs of one run overlapping.

    """
    _require(epochs, ("run_id", "epoch", "start", "end"), "epochs", file)
    epochs = _as_utc(_as_utc(epochs, "start", file), "end", file)
    if not epochs.schema["epoch"].is_integer():
        raise BadInputError(
            f"{where(file, label=repr('epoch'))}expected integer epoch numbers; "
            f"found {epochs.schema['epoch']}"
        )
    df = epochs.select(
        pl.col("run_id").cast(pl.String),
        pl.col("epoch").cast(pl.Int64),
        "start",
        "end",
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("row"),
    )
    for c in ("run_id", "epoch", "start", "end"):
        if df[c].null_count():
            i = _first_row(df[c].is_null().to_numpy())
            raise BadInputError(f"{where(file, i + 1, repr(c))}expected a value; found null")
    # end == start is an epoch of 0 s: the store accepts it and EpochHooks writes it.
    bad = df.filter(pl.col("end") < pl.col("start")).head(1)
    if bad.height:
        r = bad.row(0, named=True)
        raise BadInputError(
            f"{where(file, r['row'], _label(r))}expected end >= start; "
            f"found start {r['start']} and end {r['end']}"
        )
    dup = df.filter(pl.struct("run_id", "epoch").is_duplicated()).head(1)
    if dup.height:
        r = dup.row(0, named=True)
        raise BadInputError(
            f"{where(file, r['row'], _label(r, epoch=False))}epoch {r['epoch']} appears more "
            "than once; expected one mark per (run_id, epoch)"
        )
    # By end too: a 0 s epoch on the next one's start comes first (no overlap either way).
    df = df.sort("run_id", "start", "end")
    over = df.filter(pl.col("start") < pl.col("end").shift(1).over("run_id")).head(1)
    if over.height:
        r = over.row(0, named=True)
        raise BadInputError(
            f"{where(file, r['row'], _label(r, epoch=False))}epoch {r['epoch']} starts at "
            f"{r['start']}, before the previous epoch ends; expected epochs that do not overlap"
        )
    return df.with_columns(
        _seconds(pl.col("start")).alias("t0"), _seconds(pl.col("end")).alias("t1")
    )


def _method(streams: list[EnergyStream]) -> str:
    kinds = set()
    for s in streams:
        if (s.kind == _COUNTER).any():
            kinds.add("counter")
        if ((s.kind == _POWER) | (s.kind == _HELD)).any():
            kinds.add("power")
    return "+".join(sorted(kinds)) if kinds else "none"


def epoch_energy(
    samples: pl.DataFrame,
    epochs: pl.DataFrame,
    *,
    gap_threshold_s: float = DEFAULT_GAP_THRESHOLD_S,
    samples_file: str | None = None,
    epochs_file: str | None = None,
) -> pl.DataFrame:
    """Energy per (run, epoch), summed over the run's devices and nodes.

    Args:
        samples: Samples with at least ``run_id``, ``timestamp``, ``power_w``
            (W); optional ``energy_j`` (cumulative J), ``node``, ``device``.
        epochs: Epoch marks with ``run_id``, ``epoch``, ``start``, ``end``.
        gap_threshold_s: Longest interval between two samples, in s, that is
            integrated from power; longer ones are gaps. A stream whose sampler
            is slower uses 3 x its own interval (:func:`stream_threshold`).
        samples_file: Where the samples came from, for messages.
        epochs_file: Where the epoch marks came from, for messages.

    Returns:
        One row per epoch, ordered by run and start, with ``energy_j`` (J),
        ``duration_s`` (s), ``mean_power_w`` (W, energy over duration; null
        for a 0 s epoch), ``gap_s`` (s without measurement, largest over
        devices; the whole epoch when a device measured nothing), ``n_samples``
        (samples inside the epoch, all devices), ``n_skipped`` (samples of the
        run without any value), ``devices`` (those that measured nothing
        included) and ``method`` (counter, power or counter+power).

    Raises:
        BadInputError: See :func:`_prepare_streams` and :func:`prepare_epochs`.

    """
    if gap_threshold_s <= 0:
        raise BadInputError(f"gap threshold must be > 0 s; found {gap_threshold_s}")
    by_run, silent = _by_run(*_prepare_streams(samples, gap_threshold_s, samples_file))
    ep = prepare_epochs(epochs, file=epochs_file)
    parts = []
    for (run_id,), marks in ep.partition_by("run_id", as_dict=True, maintain_order=True).items():
        t0 = marks["t0"].to_numpy()
        t1 = marks["t1"].to_numpy()
        n = len(t0)
        energy = np.zeros(n)
        gap = np.zeros(n)
        count = np.zeros(n, dtype=np.int64)
        run_streams = by_run.get(str(run_id), [])
        for st in run_streams:
            e, g = st.at(np.concatenate((t0, t1)))
            energy += e[n:] - e[:n]
            gap = np.maximum(gap, g[n:] - g[:n])
            count += np.searchsorted(st.t, t1, side="left") - np.searchsorted(st.t, t0, "left")
        run_silent = silent.get(str(run_id), [])
        if run_silent or not run_streams:
            # A device that measured nothing (or none at all): the whole epoch is its gap.
            gap = t1 - t0
        duration = t1 - t0
        parts.append(
            pl.DataFrame(
                {
                    "run_id": marks["run_id"],
                    "epoch": marks["epoch"],
                    "start": marks["start"],
                    "end": marks["end"],
                    "energy_j": energy,
                    "duration_s": duration,
                    "gap_s": gap,
                    "n_samples": count,
                    "n_skipped": sum(st.n_skipped for st in run_streams) + sum(run_silent),
                    "devices": len(run_streams) + len(run_silent),
                    "method": _method(run_streams),
                },
                schema_overrides={"n_skipped": pl.Int64, "devices": pl.Int64},
            ).with_columns(
                # A 0 s epoch has 0 J and no mean power.
                pl.when(pl.col("duration_s") > 0)
                .then(pl.col("energy_j") / pl.col("duration_s"))
                .otherwise(None)
                .alias("mean_power_w")
            )
        )
    if not parts:
        return _empty_epoch_result()
    return pl.concat(parts)


def _empty_epoch_result() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "run_id": pl.String,
            "epoch": pl.Int64,
            "start": pl.Datetime("us", "UTC"),
            "end": pl.Datetime("us", "UTC"),
            "energy_j": pl.Float64,
            "duration_s": pl.Float64,
            "mean_power_w": pl.Float64,
            "gap_s": pl.Float64,
            "n_samples": pl.Int64,
            "n_skipped": pl.Int64,
            "devices": pl.Int64,
            "method": pl.String,
        }
    )


def run_energy(
    samples: pl.DataFrame,
    *,
    gap_threshold_s: float = DEFAULT_GAP_THRESHOLD_S,
    file: str | None = None,
) -> pl.DataFrame:
    """Total energy per run, from each device's first sample to its last.

    Args:
        samples: As for :func:`epoch_energy`.
        gap_threshold_s: As for :func:`epoch_energy`.
        file: Where the input came from, for messages.

    Returns:
        One row per run with at least one value: ``run_id``, ``start``,
        ``end`` (UTC), ``energy_j`` (J, all devices), ``duration_s`` (s,
        first to last sample with a value of any device), ``mean_power_w``
        (W), ``gap_s`` (s, largest over devices; the whole duration when a
        device measured nothing), ``n_samples``, ``n_skipped``, ``devices``
        (those that measured nothing included), ``method``.

    """
    if gap_threshold_s <= 0:
        raise BadInputError(f"gap threshold must be > 0 s; found {gap_threshold_s}")
    by_run, silent = _by_run(*_prepare_streams(samples, gap_threshold_s, file))
    runs = list(by_run.values())
    quiet = [silent.get(run_id, []) for run_id in by_run]
    t0 = [min(st.t[0] for st in r) for r in runs]
    t1 = [max(st.t[-1] for st in r) for r in runs]
    out = pl.DataFrame(
        {
            "run_id": list(by_run),
            "t0": t0,
            "t1": t1,
            "energy_j": [sum(float(st.e[-1]) for st in r) for r in runs],
            # A device that measured nothing has the whole run as its gap.
            "gap_s": [
                b - a if q else max(float(st.g[-1]) for st in r)
                for r, q, a, b in zip(runs, quiet, t0, t1, strict=True)
            ],
            "n_samples": [sum(len(st.t) for st in r) for r in runs],
            "n_skipped": [
                sum(st.n_skipped for st in r) + sum(q) for r, q in zip(runs, quiet, strict=True)
            ],
            "devices": [len(r) + len(q) for r, q in zip(runs, quiet, strict=True)],
            "method": [_method(r) for r in runs],
        },
        schema_overrides={"n_samples": pl.Int64, "n_skipped": pl.Int64, "devices": pl.Int64},
    )
    to_dt = (pl.col("t0") * 1e6).round().cast(pl.Int64).cast(pl.Datetime("us", "UTC"))
    to_dt1 = (pl.col("t1") * 1e6).round().cast(pl.Int64).cast(pl.Datetime("us", "UTC"))
    out = out.with_columns(
        to_dt.alias("start"),
        to_dt1.alias("end"),
        (pl.col("t1") - pl.col("t0")).alias("duration_s"),
    ).with_columns(
        pl.when(pl.col("duration_s") > 0)
        .then(pl.col("energy_j") / pl.col("duration_s"))
        .otherwise(None)
        .alias("mean_power_w")
    )
    return out.select(
        "run_id",
        "start",
        "end",
        "energy_j",
        "duration_s",
        "mean_power_w",
        "gap_s",
        "n_samples",
        "n_skipped",
        "devices",
        "method",
    ).sort("run_id")


def span_energies(
    samples: pl.DataFrame,
    bounds: list[dt.datetime],
    *,
    gap_threshold_s: float = DEFAULT_GAP_THRESHOLD_S,
) -> np.ndarray:
    """Energy (J, all devices) of one run in each interval ``[bounds[i], bounds[i + 1]]``.

    The integration of :func:`epoch_energy` (power held for at most
    ``gap_threshold_s`` past a device's first and last sample, gaps 0 J and
    never bridged, counter deltas where present), over intervals that tile the
    run: their sum is the energy from ``bounds[0]`` to ``bounds[-1]``.

    Args:
        samples: One run's samples (as for :func:`epoch_energy`; ``run_id``
            optional).
        bounds: Increasing UTC times, at least two.
        gap_threshold_s: As for :func:`epoch_energy`.

    Raises:
        BadInputError: See :func:`epoch_energy`.

    """
    if len(bounds) < 2:
        return np.zeros(0)
    s = samples if "run_id" in samples.columns else samples.with_columns(run_id=pl.lit("run"))
    if s.height == 0:
        return np.zeros(len(bounds) - 1)
    rid = str(s["run_id"][0])
    s = s.with_columns(run_id=pl.lit(rid))
    marks = pl.DataFrame(
        {
            "run_id": [rid] * (len(bounds) - 1),
            "epoch": list(range(len(bounds) - 1)),
            "start": bounds[:-1],
            "end": bounds[1:],
        },
        schema={
            "run_id": pl.String,
            "epoch": pl.Int64,
            "start": pl.Datetime("us", "UTC"),
            "end": pl.Datetime("us", "UTC"),
        },
    )
    per = epoch_energy(s, marks, gap_threshold_s=gap_threshold_s).sort("epoch")
    return per["energy_j"].fill_null(0.0).to_numpy().astype(float)


def run_span(
    samples: pl.DataFrame, epochs: pl.DataFrame | None = None
) -> tuple[dt.datetime, dt.datetime] | None:
    """A run's extent, or ``None`` without samples or marks.

    From the earlier of its first sample and first mark's start to the later of
    its last sample and last mark's end.
    """
    ts: list[dt.datetime] = []
    if samples.height:
        col = samples["timestamp"]
        ts += [col.min(), col.max()]  # type: ignore[list-item]
    if epochs is not None and epochs.height:
        ts += [epochs["start"].min(), epochs["end"].max()]  # type: ignore[list-item]
    ts = [_utc(t) for t in ts if t is not None]
    return (min(ts), max(ts)) if ts else None


def _utc(t: dt.datetime) -> dt.datetime:
    """``t`` in UTC; a naive time is taken as UTC (as :func:`epoch_energy` takes marks)."""
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def run_total_j(
    samples: pl.DataFrame,
    epochs: pl.DataFrame | None = None,
    *,
    gap_threshold_s: float = DEFAULT_GAP_THRESHOLD_S,
    until: dt.datetime | None = None,
) -> float:
    """A run's measured energy in J: all of it, its epochs and the time outside them.

    From the start of :func:`run_span` to its end (or ``until``), with the
    integration of :func:`epoch_energy`: so it is the sum of the epochs'
    energies plus the energy before the first, between and after the last
    epoch (model loading, evaluation, saving). ``wattwise energy --run`` prints
    it as the run's total, ``wattwise estimate`` and ``wattwise report`` take it
    as the measured energy, and the aggregator stores it for a finished run.

    Args:
        samples: One run's samples (as for :func:`epoch_energy`).
        epochs: Its epoch marks, or ``None``.
        gap_threshold_s: As for :func:`epoch_energy`.
        until: End of the span instead (the end of the last finished epoch, for
            a run still going).

    Raises:
        BadInputError: See :func:`epoch_energy`.

    """
    if samples.height == 0:
        return 0.0
    # Checked first, so that bad types get epoch_energy's messages.
    samples = _as_utc(samples, "timestamp", None)
    if epochs is not None and epochs.height:
        epochs = prepare_epochs(epochs)
    span = run_span(samples, epochs)
    if span is None:
        return 0.0
    start, end = span
    if until is not None:
        end = _utc(until)
    if end <= start:
        return 0.0
    return float(span_energies(samples, [start, end], gap_threshold_s=gap_threshold_s).sum())
