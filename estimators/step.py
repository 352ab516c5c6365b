"""STEP, Stable Training Epoch Projection: find where power settles, then project the total.

After del Rey et al., "Do DL models and training environments have an impact
on energy consumption?" (SEAA 2023, arXiv 2307.05520). Power in a run's first
epochs is unstable (start-up, caching, a frozen base that is later unfrozen);
once it settles, a few epochs predict the rest. The paper fixed the stable
epoch at 10; here it is found automatically and online.

A run is cut into **units** of progress, and STEP works on one number per unit:

* *epoch mode* (epoch marks known): a unit is an epoch and its value is the
  epoch's energy in J. The projection is the energy measured up to the end
  of the last finished epoch plus the mean stable epoch energy times the
  epochs still planned.
* *time mode* (no marks, the total duration known, as in ``wattwise bench
  step``): a unit is a block of ``total_duration_s / planned_epochs`` seconds
  (one mean epoch) and its value is the block's mean power in W. The
  projection is the energy measured so far plus the mean stable power times
  the time that remains.

The **stable regime** is the last regime found by a detector over the unit
values: ``online`` (:class:`OnlineRegimeDetector`, O(1) per unit, the
default: it was the most accurate on the SEAA 2023 traces, see
``bench/step.py``), ``pelt`` (ruptures, penalised change points) or
``fluss`` (stumpy matrix profile + FLUSS on the raw trace, as in the paper).

A projection is **stable** once its regime has lasted ``min_stable_epochs``
units and the run has gone ``settle_epochs`` units (the paper's warm-up of
10 epochs): before that a seemingly flat regime may still be a warm-up phase,
so the answer says "not stable yet" and carries a wide band reaching from the
lowest power seen to the board's power cap. A stable projection's band (90 %
by default) combines the spread of the stable units (Student t, both the
error of their mean and the noise of the units still to come) with a floor
of ``band_floor`` of the remaining energy for slow drift.
"""

from __future__ import annotations

import datetime as dt
import math
from bisect import insort
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal

import numpy as np
import polars as pl

from estimators.energy import DEFAULT_GAP_THRESHOLD_S
from profiler.errors import BadInputError, NotFittedError

Detector = Literal["online", "pelt", "fluss"]
DETECTORS: tuple[str, ...] = ("online", "pelt", "fluss")
#: An epoch with more than this share of its time without samples (``gap_s``) is
#: left out of the stable mean: its energy is not known well enough. An epoch with a
#: smaller gap enters the stable mean scaled to its whole length (its gap counts 0 J
#: in the measured energy, and would bias the mean low).
MAX_GAP_SHARE = 0.2
#: The reason of a running run's projection when its planned epochs are unknown.
PLANNED_UNKNOWN = (
    "planned epochs unknown: give --planned-epochs (STEP needs the number of epochs the run "
    "will have)"
)


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What is known about a run besides its samples.

    Attributes:
        total_duration_s: Total wall time of the run in s (time mode), or
            ``None`` when unknown.
        planned_epochs: Epochs the run is planned for (or, in a replay,
            trained for).
        finished: The run has ended: its projection is the measured total.
        gpu_model: Device name as ``nvidia-smi`` prints it, for the power cap
            and the baselines.
        power_cap_w: Board power limit of one device in W; overrides the GPU
            table.
        gpu_count: Devices the run uses.
        gflops_forward: Forward-pass GFLOPs of one sample (FLOPs baseline).
        training_size: Training samples per epoch (FLOPs baseline).
        validation_size: Validation samples per epoch (FLOPs baseline).

    """

    total_duration_s: float | None = None
    planned_epochs: int | None = None
    finished: bool = False
    gpu_model: str | None = None
    power_cap_w: float | None = None
    gpu_count: int = 1
    gflops_forward: float | None = None
    training_size: int | None = None
    validation_size: int | None = None

    def cap_w(self) -> float | None:
        """The run's total power cap in W (all devices), or ``None`` when unknown."""
        if self.power_cap_w is not None and self.power_cap_w > 0:
            return float(self.power_cap_w) * self.gpu_count
        if self.gpu_model:
            from estimators.gpus import lookup

            try:
                return lookup(self.gpu_model).board_power_w * self.gpu_count
            except BadInputError:
                return None
        return None


@dataclass(frozen=True, slots=True)
class Projection:
    """A projected total energy of one run, with its band and where it came from.

    Attributes:
        method: Estimator that made it (``step``, ``mlco2``, ...).
        energy_j: Projected total energy in J; ``None`` when nothing can be
            projected (no power at all, or the planned epochs of a running
            run unknown), never NaN.
        lower_j: Lower end of the band in J, ``None`` for methods without one.
        upper_j: Upper end of the band in J, ``None`` for methods without one.
        confidence: Nominal coverage of the band (0.9 = 90 %).
        stable: A stable regime was found and trusted (STEP only; ``False``
            for baselines).
        measured_j: Energy measured so far in J (for a finished run: the total).
        elapsed_s: Time observed so far in s.
        remaining_s: Projected time still to run in s, ``None`` if unknown.
        remaining_epochs: Epochs still planned, ``None`` if unknown.
        stable_start_s: Start of the stable regime in s since the first
            sample, ``None`` without one.
        stable_unit: Index of the first unit (epoch, 0-based in the order
            seen) of the stable regime, ``None`` without one.
        stable_power_w: Mean power of the stable regime in W.
        energy_per_epoch_j: Projected energy of each remaining epoch in J.
        epoch_s: Projected duration of each remaining epoch in s.
        n_stable: Units in the stable regime.
        finished: The run has ended; ``energy_j`` is the measured total.
        reason: Why the projection is not stable, and which epochs were left
            out of the stable mean for lack of samples or scaled to their
            length for a short gap (empty when it is stable and used every
            epoch whole).

    """

    method: str
    energy_j: float | None
    lower_j: float | None = None
    upper_j: float | None = None
    confidence: float | None = None
    stable: bool = False
    measured_j: float = 0.0
    elapsed_s: float = 0.0
    remaining_s: float | None = None
    remaining_epochs: float | None = None
    stable_start_s: float | None = None
    stable_unit: int | None = None
    stable_power_w: float | None = None
    energy_per_epoch_j: float | None = None
    epoch_s: float | None = None
    n_stable: int = 0
    finished: bool = False
    reason: str = ""

    def as_row(self) -> dict[str, object]:
        """The projection as a flat dict (one parquet row)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# --------------------------------------------------------------------------------------------
# Traces


@dataclass(frozen=True, slots=True)
class Trace:
    """Power samples of one run prepared for integration, nulls dropped.

    Attributes:
        t: Per device, sample times in s since the run's first sample.
        p: Per device, power in W at those times.
        e: Per device, cumulative trapezoid energy in J at those times.
        origin_us: The first sample's time in µs since the Unix epoch (UTC).
        n_null: Samples dropped because their power was null.

    """

    t: tuple[np.ndarray, ...]
    p: tuple[np.ndarray, ...]
    e: tuple[np.ndarray, ...]
    origin_us: int
    n_null: int

    @classmethod
    def from_samples(cls, samples: pl.DataFrame, *, file: str | None = None) -> Trace:
        """Build from a frame with ``timestamp`` and ``power_w`` (W).

        Optional ``node`` and ``device`` columns split the devices of a
        multi-GPU run; their energies add up. Zone-aware timestamps count in
        UTC, naive ones are taken as UTC (as in :mod:`estimators.energy`), so
        samples and epoch marks in any zones line up.

        Raises:
            BadInputError: Missing columns, non-datetime timestamps, negative
                or non-finite power, or repeated timestamps of one device.

        """
        prefix = f"{file}: " if file else ""
        missing = [c for c in ("timestamp", "power_w") if c not in samples.columns]
        if missing:
            raise BadInputError(
                f"{prefix}STEP needs samples with columns ['timestamp', 'power_w']; "
                f"missing {missing}, found {samples.columns}"
            )
        if not isinstance(samples.schema["timestamp"], pl.Datetime):
            raise BadInputError(
                f"{prefix}expected 'timestamp' to be a datetime; "
                f"found {samples.schema['timestamp']}"
            )
        keys = [c for c in ("node", "device") if c in samples.columns]
        df = samples.select(
            *keys,
            pl.col("timestamp").dt.epoch("us").alias("us"),  # UTC for a zone-aware column
            pl.col("power_w").cast(pl.Float64),
        )
        n_null = int(df["power_w"].null_count() + df["power_w"].is_nan().sum())
        df = df.filter(pl.col("power_w").is_not_null() & pl.col("power_w").is_not_nan())
        bad = df.filter(~pl.col("power_w").is_finite() | (pl.col("power_w") < 0))
        if bad.height:
            raise BadInputError(
                f"{prefix}expected power_w to be a finite number >= 0 W; found {bad['power_w'][0]}"
            )
        if df.height == 0:
            return cls((), (), (), 0, n_null)
        origin = int(df["us"].min())  # type: ignore[arg-type]
        groups = df.partition_by(keys, maintain_order=True) if keys else [df]
        ts, ps, es = [], [], []
        for g in groups:
            g = g.sort("us")
            us = g["us"].to_numpy()
            if len(us) > 1 and (np.diff(us) <= 0).any():
                raise BadInputError(
                    f"{prefix}a device has repeated timestamps; expected one sample per "
                    "device and time. Drop duplicates first"
                )
            t = (us - origin) / 1e6
            p = g["power_w"].to_numpy().astype(np.float64)
            e = np.zeros(len(t))
            if len(t) > 1:
                np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(t), out=e[1:])
            ts.append(t)
            ps.append(p)
            es.append(e)
        return cls(tuple(ts), tuple(ps), tuple(es), origin, n_null)

    @property
    def n_samples(self) -> int:
        """Samples with a power value, all devices."""
        return sum(len(t) for t in self.t)

    @property
    def end_s(self) -> float:
        """Time of the last sample of any device in s (0 without samples)."""
        return max((float(t[-1]) for t in self.t), default=0.0)

    def sample_interval_s(self) -> float:
        """Median time between consecutive samples of a device in s (0 without two samples)."""
        diffs = [np.diff(t) for t in self.t if len(t) > 1]
        return float(np.median(np.concatenate(diffs))) if diffs else 0.0

    def energy_at(self, x: np.ndarray | float) -> np.ndarray:
        """Cumulative energy in J of all devices from the first sample to times ``x`` (s).

        Between samples the cumulative energy is interpolated linearly; outside
        a device's samples it is held (no energy is invented).
        """
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        out = np.zeros_like(x)
        for t, e in zip(self.t, self.e, strict=True):
            out += np.interp(x, t, e)
        return out

    def total_j(self) -> float:
        """Trapezoid energy of the whole trace in J (the bench's ground truth)."""
        return float(sum(e[-1] for e in self.e))

    def until(self, t_s: float) -> Trace:
        """The part of the trace up to ``t_s`` seconds after the first sample (inclusive)."""
        idx = [int(np.searchsorted(t, t_s, side="right")) for t in self.t]
        keep = [i for i in range(len(self.t)) if idx[i] > 0]
        return Trace(
            tuple(self.t[i][: idx[i]] for i in keep),
            tuple(self.p[i][: idx[i]] for i in keep),
            tuple(self.e[i][: idx[i]] for i in keep),
            self.origin_us,
            self.n_null,
        )

    def grid_power(self, step_s: float = 1.0) -> np.ndarray:
        """Total power of all devices on a regular grid of ``step_s`` seconds (W)."""
        if self.end_s <= step_s:
            return np.zeros(0)
        edges = np.arange(0.0, self.end_s + 1e-9, step_s)
        return np.diff(self.energy_at(edges)) / step_s

    def mean_power_w(self) -> float | None:
        """Mean total power so far in W, ``None`` without a measured interval."""
        end = self.end_s
        return self.total_j() / end if end > 0 else None


def trace_energy_j(samples: pl.DataFrame) -> float:
    """Trapezoid integral of a trace's power in J, nulls dropped, devices summed.

    This is the bench's ground truth for a run's energy.
    """
    return Trace.from_samples(samples).total_j()


# --------------------------------------------------------------------------------------------
# Detectors


class OnlineRegimeDetector:
    """Online regime detector over one value per unit (epoch energy or block power).

    A two-sided CUSUM on standardised deviations from the current regime's
    mean: each unit adds ``clip((x - mean) / sigma) - drift`` to the upper sum
    (and the mirror image to the lower one), floored at 0. When a sum passes
    ``threshold`` the regime has changed, starting at the unit after the sum
    was last 0 (the usual CUSUM change-point estimate), or later where the
    units from there split better into two levels (see :meth:`_split`: a slow
    drift before a step keeps the sum above 0). ``sigma`` is the
    unit-to-unit noise of the whole run so far, from the median absolute
    successive difference (robust to the few differences that straddle a
    change), never below ``min_rel_sigma`` of the regime's mean; before two
    differences exist it is ``start_rel_sigma`` of the mean. Clipping keeps a
    lone outlier (a long validation pass) from signalling a change by itself
    or dragging the reference mean (which adds clipped values); a step or a
    gradual ramp accumulates. :meth:`update` costs a sorted
    insertion (microseconds for thousands of epochs) except on a change,
    which re-reads the new regime's units.

    Args:
        drift: Deviation per unit, in sigmas, tolerated without accumulating.
        clip: Largest deviation one unit adds, in sigmas.
        threshold: Accumulated deviation, in sigmas, that signals a change.
        min_rel_sigma: Floor of sigma relative to the regime's mean.
        start_rel_sigma: Sigma relative to the mean before the noise is known.

    Attributes:
        regime_start: Index of the current regime's first unit (0-based).
        n_units: Units seen.

    """

    __slots__ = (
        "drift",
        "clip",
        "threshold",
        "min_rel_sigma",
        "regime_start",
        "n_units",
        "_values",
        "_sum",
        "start_rel_sigma",
        "_absdiffs",
        "_hi",
        "_lo",
        "_hi_zero",
        "_lo_zero",
    )

    def __init__(
        self,
        *,
        drift: float = 0.5,
        clip: float = 3.0,
        threshold: float = 5.0,
        min_rel_sigma: float = 0.002,
        start_rel_sigma: float = 0.05,
    ) -> None:
        self.drift = drift
        self.clip = clip
        self.threshold = threshold
        self.min_rel_sigma = min_rel_sigma
        self.start_rel_sigma = start_rel_sigma
        self.regime_start = 0
        self.n_units = 0
        self._values: list[float] = []
        self._sum = 0.0
        self._absdiffs: list[float] = []  # sorted, for the median
        self._hi = self._lo = 0.0
        self._hi_zero = self._lo_zero = 0

    def _sigma(self, mean: float) -> float:
        """Unit noise in the value's unit: 1.4826 x median |successive difference| / sqrt 2."""
        d = self._absdiffs
        rel_floor = self.min_rel_sigma * abs(mean)
        if len(d) < 2:
            return max(self.start_rel_sigma * abs(mean), rel_floor)
        m = len(d) // 2
        med = d[m] if len(d) % 2 else 0.5 * (d[m - 1] + d[m])
        return max(1.048341 * med, rel_floor)

    def update(self, x: float) -> int:
        """Add the next unit's value; return the current regime's first unit index."""
        i = self.n_units
        self.n_units += 1
        values = self._values
        values.append(x)
        n = i - self.regime_start  # regime units before this one
        if n == 0:
            self._sum = x
            self._hi = self._lo = 0.0
            self._hi_zero = self._lo_zero = i
            return self.regime_start
        mean = self._sum / n
        sigma = self._sigma(mean)
        dev = (x - mean) / sigma if sigma > 0 else 0.0
        dev = min(max(dev, -self.clip), self.clip)
        # The reference mean takes the clipped value, so one outlier cannot drag it away.
        self._hi = max(0.0, self._hi + dev - self.drift)
        self._lo = max(0.0, self._lo - dev - self.drift)
        if self._hi == 0.0:
            self._hi_zero = i
        if self._lo == 0.0:
            self._lo_zero = i
        self._sum += mean + dev * sigma
        insort(self._absdiffs, abs(x - values[i - 1]))
        if self._hi > self.threshold or self._lo > self.threshold:
            first = (self._hi_zero if self._hi > self.threshold else self._lo_zero) + 1
            start = self._split(first, i)
            self.regime_start = start
            new = values[start:]
            self._sum = sum(new)
            self._hi = self._lo = 0.0
            self._hi_zero = self._lo_zero = i
        return self.regime_start

    @property
    def candidate_start(self) -> int:
        """First unit of the regime, or of a change under way but not yet confirmed.

        Once a CUSUM sum is past half the threshold the units since it was
        last 0 are treated as a new regime in the making: projecting from them
        (and calling the run not stable) beats projecting from the old level.
        """
        last = self.n_units - 1
        if self._hi > self.threshold / 2:
            return min(self._hi_zero + 1, last)
        if self._lo > self.threshold / 2:
            return min(self._lo_zero + 1, last)
        return self.regime_start

    def _split(self, first: int, last: int) -> int:
        """Where the change lies among units ``first..last``: the split of the regime so far.

        The CUSUM's last zero is the first unit the sum grew from; a slow drift
        before a step keeps the sum above 0 and moves that estimate units too
        early (mixing the old level into the new regime). The unit ``k`` in
        ``first..last`` that best splits the regime's units into two levels
        (largest ``|mean before - mean from k| x sqrt(n_before n_after / n)``,
        the binary-segmentation statistic) is taken instead.
        """
        rs = self.regime_start
        if first <= rs or first >= last:
            return max(first, rs)
        v = np.asarray(self._values[rs : last + 1], dtype=float)
        c = np.cumsum(v)
        n = len(v)
        k = np.arange(first - rs, last - rs + 1)  # units before the split
        before = c[k - 1] / k
        after = (c[-1] - c[k - 1]) / (n - k)
        stat = np.abs(before - after) * np.sqrt(k * (n - k) / n)
        return rs + int(k[int(np.argmax(stat))])


def detect_online(values: Sequence[float] | np.ndarray, **params: float) -> int:
    """First unit (0-based) of the last regime, by :class:`OnlineRegimeDetector`.

    A change under way counts from its first unit (see
    :attr:`OnlineRegimeDetector.candidate_start`).

    Args:
        values: One value per unit, in order.
        **params: ``drift``, ``clip``, ``threshold``, ``min_rel_sigma`` of the detector.

    """
    det = OnlineRegimeDetector(**params)
    for v in values:
        det.update(float(v))
    return det.candidate_start if det.n_units else 0


def detect_pelt(values: Sequence[float] | np.ndarray, *, min_size: int = 2) -> int:
    """First unit (0-based) of the last regime found by PELT (ruptures, L2 cost).

    The penalty is BIC-like, ``3 * sigma^2 * log(n)``, with the noise level
    ``sigma`` estimated robustly from successive differences (MAD), so a
    single step in the mean is not mistaken for noise.
    """
    import ruptures as rpt

    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2 * min_size:
        return 0
    d = np.diff(v)
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)
    sigma = max(sigma, 1e-3 * float(np.mean(np.abs(v))) + 1e-12)
    pen = 3.0 * sigma**2 * math.log(n)
    bkps = rpt.Pelt(model="l2", min_size=min_size, jump=1).fit(v.reshape(-1, 1)).predict(pen=pen)
    inner = [b for b in bkps if b < n]
    return int(inner[-1]) if inner else 0


def detect_fluss(
    power: np.ndarray, *, window: int, n_regimes: int = 2, max_cac: float = 0.7
) -> int:
    """Sample index where the last regime starts, by matrix profile + FLUSS (stumpy).

    As in the STEP paper: the corrected arc curve (CAC) of the matrix profile
    dips where the trace changes regime. The matrix profile is computed on raw
    (not z-normalised) subsequences, or a pure change of level would be missed.
    Of the ``n_regimes - 1`` lowest dips the latest one with ``CAC < max_cac``
    is taken; 0 when there is none or the trace is too short (four windows).

    Args:
        power: Power on a regular grid (W).
        window: Subsequence length in samples (about one epoch).
        n_regimes: Regimes FLUSS looks for.
        max_cac: Largest CAC value that counts as a regime change.

    """
    window = max(int(window), 3)
    p = np.asarray(power, dtype=np.float64)
    if len(p) < 4 * window or float(np.std(p)) == 0.0:
        return 0
    import stumpy

    # Not z-normalised: the power level is the signal, and z-normalisation makes a
    # regime that is the same waveform at a higher level look identical.
    mp = stumpy.stump(p, m=window, normalize=False)
    cac, locs = stumpy.fluss(mp[:, 1].astype(np.int64), L=window, n_regimes=n_regimes)
    good = [int(loc) for loc in np.atleast_1d(locs) if cac[int(loc)] < max_cac]
    return max(good) if good else 0


@lru_cache(maxsize=4096)
def _t_quantile(q: float, dof: int) -> float:
    """Student-t quantile (cached: the online update must stay far below a millisecond)."""
    from scipy.stats import t

    return float(t.ppf(q, dof))


# --------------------------------------------------------------------------------------------
# Projection core


@dataclass(frozen=True, slots=True)
class _Units:
    """The values of the units seen so far, and how to turn a rate into energy.

    Attributes:
        values: Value per unit (W in time mode, J in epoch mode).
        starts_s: Start of each unit in s since the first sample.
        measured_j: Energy the projection starts from, J.
        elapsed_s: Time observed in s.
        remaining: Amount still to come, in the rate's unit (s or epochs).
        remaining_units: The same in units (for the noise of future units).
        elapsed_units: Units elapsed (fractional in time mode).
        unit_s: Duration of each unit in s.
        time_mode: Values are powers (W) and ``remaining`` is seconds.
        index: Epoch (0-based, in order) of each unit where some finished
            epochs were left out; ``None`` when unit ``i`` is epoch ``i``.
        note: Which epochs were left out and why, for the projection's reason.

    """

    values: np.ndarray
    starts_s: np.ndarray
    measured_j: float
    elapsed_s: float
    remaining: float
    remaining_units: float
    elapsed_units: float
    unit_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    time_mode: bool = True
    index: np.ndarray | None = None
    note: str = ""

    def epoch_of(self, unit: int) -> int:
        """The epoch (0-based, in order) that unit ``unit`` stands for."""
        return int(self.index[unit]) if self.index is not None else unit


def _units_text(x: float) -> str:
    """Elapsed units for a message: two decimals at most, never rounded up to the next unit."""
    return f"{math.floor(x * 100 + 1e-6) / 100:g}"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _project(
    u: _Units,
    start: int,
    *,
    method: str,
    confidence: float,
    min_stable_epochs: int,
    settle_epochs: float,
    band_floor: float,
    cap_w: float | None,
    planned_epochs: int | None,
    why: str = "",
) -> Projection:
    """Turn unit values and the stable regime's first unit into a projection with a band."""
    n_all = len(u.values)
    stable_vals = u.values[start:]
    n = len(stable_vals)
    base = Projection(
        method=method,
        energy_j=None,
        confidence=confidence,
        measured_j=u.measured_j,
        elapsed_s=u.elapsed_s,
        remaining_epochs=(u.remaining_units if planned_epochs is not None else None),
    )
    rem = max(u.remaining, 0.0)
    unit_s = float(np.mean(u.unit_s[start:])) if n else None
    if n == 0:
        reason = why or _join(
            f"STEP needs at least {min_stable_epochs} whole epochs of power to find a stable "
            f"regime; found {n_all}",
            u.note,
        )
        return _wide(base, u, rem, cap_w, reason)
    rate = float(np.mean(stable_vals))
    power = rate if u.time_mode else (rate / unit_s if unit_s else None)
    remaining_s = rem if u.time_mode else (rem * unit_s if unit_s else None)
    sd = float(np.std(stable_vals, ddof=1)) if n > 1 else abs(rate)
    centre = u.measured_j + rate * rem
    info = replace(
        base,
        energy_j=centre,
        remaining_s=remaining_s,
        stable_start_s=float(u.starts_s[start]),
        stable_unit=u.epoch_of(start),
        stable_power_w=power,
        energy_per_epoch_j=(rate * unit_s if u.time_mode and unit_s else rate),
        epoch_s=unit_s,
        n_stable=n,
    )
    reasons = []
    if why:
        reasons.append(why)
    # A band needs the spread of two units at least (a t quantile with 0 dof is NaN).
    need = max(min_stable_epochs, 2)
    if n < need:
        reasons.append(
            # The stable point's epoch is in the answer (``stable_unit``); numbering it
            # here too once disagreed with the table (1-based position vs epoch number).
            f"STEP needs {need} epochs after the stable point; this run has {n}"
        )
    if u.elapsed_units + 1e-9 < settle_epochs:
        reasons.append(
            f"only {_units_text(u.elapsed_units)} of the {settle_epochs:g} epochs a warm-up may "
            "last have run; power may not have settled yet"
        )
    if reasons:
        return _wide(info, u, rem, cap_w, _join(*reasons, u.note))
    q = _t_quantile(0.5 + confidence / 2.0, n - 1)
    spread = q * sd * math.sqrt(1.0 / n + 1.0 / max(u.remaining_units, 1.0))
    half = rem * (spread + band_floor * abs(rate))
    return replace(
        info,
        lower_j=max(centre - half, u.measured_j),
        upper_j=centre + half,
        stable=True,
        reason=u.note,
    )


def _wide(base: Projection, u: _Units, rem: float, cap_w: float | None, reason: str) -> Projection:
    """A not-stable answer: best guess plus a band from the lowest rate seen to the cap."""
    vals = u.values
    rate = None
    if base.energy_j is not None and rem > 0:
        rate = (base.energy_j - u.measured_j) / rem
    elif len(vals):
        rate = float(vals[-1])
    if u.time_mode:
        cap_rate = cap_w
        fallback = (u.measured_j / u.elapsed_s) if u.elapsed_s > 0 else None
    else:
        unit_s = float(np.mean(u.unit_s)) if len(u.unit_s) else None
        cap_rate = cap_w * unit_s if (cap_w and unit_s) else None
        fallback = None
    if rate is None:
        rate = fallback
    # Power may yet fall back as low as anything seen in this run (start-up included).
    lo_rate = float(np.min(vals)) if len(vals) else (rate or 0.0)
    hi_rate = max(float(np.max(vals)) if len(vals) else 0.0, rate or 0.0)
    hi_rate = max(cap_rate, hi_rate) if cap_rate else 2.0 * hi_rate
    energy = None if rate is None else u.measured_j + rate * rem
    if rate is None and not cap_rate:
        return replace(base, energy_j=None, lower_j=u.measured_j, upper_j=None, reason=reason)
    lo_rate = min(lo_rate, rate) if rate is not None else 0.0
    return replace(
        base,
        energy_j=energy,
        lower_j=u.measured_j + lo_rate * rem,
        upper_j=u.measured_j + hi_rate * rem,
        stable=False,
        reason=reason,
    )


# --------------------------------------------------------------------------------------------
# Estimators


def _check_min_stable(min_stable_epochs: int) -> None:
    if min_stable_epochs < 2:
        raise BadInputError(
            f"min_stable_epochs must be >= 2; found {min_stable_epochs} (the band comes from "
            "the spread of the stable epochs, and one epoch has none)"
        )


class ProjectionPredictor:
    """``predict`` for projectors whose ``fit`` sets ``projection_`` (STEP and the baselines)."""

    projection_: Projection

    def predict(self) -> Projection:
        """The projection made by ``fit``.

        Raises:
            NotFittedError: ``fit`` has not been called.

        """
        if not hasattr(self, "projection_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet; call fit() first")
        return self.projection_


class Step(ProjectionPredictor):
    """STEP projector for one run: fit on what was observed, predict the total.

    Args:
        detector: Stable-point detector: ``online`` (default), ``pelt`` or ``fluss``.
        confidence: Nominal coverage of the band, in (0, 1).
        min_stable_epochs: Units the stable regime must have lasted (at least 2).
        settle_epochs: Units the run must have gone before any regime is
            trusted (the paper's warm-up length, 10 epochs).
        band_floor: Smallest band half-width, as a fraction of the remaining
            energy (slow drift the unit spread cannot show).
        drift: Online detector: deviation per unit tolerated, in sigmas.
        clip: Online detector: largest deviation one unit adds, in sigmas.
        threshold: Online detector: accumulated deviation that is a change, in sigmas.

    Attributes:
        projection_: The projection (after ``fit``).
        units_: Unit values used (W in time mode, J in epoch mode; epochs
            left out for lack of samples are not among them).
        stable_start_: First unit of the stable regime (an index into ``units_``).

    """

    name = "step"

    def __init__(
        self,
        *,
        detector: Detector = "online",
        confidence: float = 0.9,
        min_stable_epochs: int = 3,
        settle_epochs: float = 10.0,
        band_floor: float = 0.01,
        drift: float = 0.5,
        clip: float = 3.0,
        threshold: float = 5.0,
    ) -> None:
        self.detector = detector
        self.confidence = confidence
        self.min_stable_epochs = min_stable_epochs
        self.settle_epochs = settle_epochs
        self.band_floor = band_floor
        self.drift = drift
        self.clip = clip
        self.threshold = threshold

    def _check_params(self) -> None:
        if self.detector not in DETECTORS:
            raise BadInputError(
                f"unknown STEP detector {self.detector!r}; expected one of {DETECTORS}"
            )
        if not 0.0 < self.confidence < 1.0:
            raise BadInputError(f"confidence must be in (0, 1); found {self.confidence}")
        _check_min_stable(self.min_stable_epochs)

    def fit(
        self,
        samples: pl.DataFrame | Trace,
        epochs: pl.DataFrame | None = None,
        *,
        plan: RunPlan,
    ) -> Step:
        """Find the stable regime of one run and project its total energy.

        Args:
            samples: The run's samples so far (``timestamp``, ``power_w``;
                optional ``node``, ``device``), or a prepared :class:`Trace`.
            epochs: The run's finished epochs (``epoch``, ``start``, ``end``);
                ``None`` or empty for time mode.
            plan: Total duration and/or planned epochs, power cap. With
                epochs, a run that is not finished and has no planned epochs
                gets no projection (``energy_j`` ``None``, reason
                :data:`PLANNED_UNKNOWN`): what is measured is not its total.

        The measured energy (``measured_j``; a finished run's total) is
        :func:`measured_energy_j` of the samples frame, the figure ``wattwise
        energy --run`` totals. A prepared :class:`Trace` carries power only: with
        one, it is the trapezoid from its first sample to its last.

        Returns:
            self

        Raises:
            BadInputError: Bad parameters or malformed samples; neither epochs
                nor a total duration and planned epochs to cut time units by.

        """
        self._check_params()
        trace = samples if isinstance(samples, Trace) else Trace.from_samples(samples)
        has_epochs = epochs is not None and epochs.height > 0
        if isinstance(samples, Trace):
            measured = trace.total_j()
        else:
            # Running with marks: what was measured up to the end of the last finished
            # epoch (the epoch under way is part of what remains).
            until = None if plan.finished or not has_epochs else epochs["end"].max()  # type: ignore[index]
            measured = measured_energy_j(
                samples,
                epochs if has_epochs else None,
                until=until,  # type: ignore[arg-type]
            )
        if plan.finished:
            total = measured
            self.units_ = np.zeros(0)
            self.stable_start_ = None
            self.projection_ = Projection(
                method=self.name,
                energy_j=total,
                lower_j=total,
                upper_j=total,
                confidence=self.confidence,
                stable=True,
                measured_j=total,
                elapsed_s=trace.end_s,
                remaining_s=0.0,
                remaining_epochs=0.0,
                finished=True,
            )
            return self
        if epochs is not None and has_epochs and samples is not None:
            if isinstance(samples, Trace):
                raise BadInputError("epoch mode needs the samples frame, not a Trace")
            units, why = _epoch_units(samples, epochs, trace, plan, measured)
            if plan.planned_epochs is None:
                # Not finished and no epoch count: what is measured is not the total.
                self.units_ = units.values
                self.stable_start_ = None
                self.projection_ = Projection(
                    method=self.name,
                    energy_j=None,
                    confidence=self.confidence,
                    measured_j=units.measured_j,
                    elapsed_s=units.elapsed_s,
                    reason=_join(PLANNED_UNKNOWN, why, units.note),
                )
                return self
        else:
            units, why = _time_units(trace, plan, measured)
        self.units_ = units.values
        start = self._detect(units, trace)
        self.stable_start_ = start
        self.projection_ = _project(
            units,
            start,
            method=self.name,
            confidence=self.confidence,
            min_stable_epochs=self.min_stable_epochs,
            settle_epochs=self.settle_epochs,
            band_floor=self.band_floor,
            cap_w=plan.cap_w(),
            planned_epochs=plan.planned_epochs,
            why=why,
        )
        return self

    def _detect(self, units: _Units, trace: Trace) -> int:
        v = units.values
        if len(v) < 2:
            return 0
        if self.detector == "online":
            return detect_online(v, drift=self.drift, clip=self.clip, threshold=self.threshold)
        if self.detector == "pelt":
            return detect_pelt(v)
        # fluss: on the raw trace at 1 s, window one unit; map the sample to the next unit.
        window = int(round(float(np.median(units.unit_s)))) if len(units.unit_s) else 30
        at_s = float(detect_fluss(trace.grid_power(1.0), window=window))
        after = np.flatnonzero(units.starts_s >= at_s - 1e-9)
        return int(after[0]) if len(after) else len(v)


def time_unit_problem(total_s: float, planned_epochs: int, interval_s: float) -> str:
    """Why time mode cannot cut ``total_s`` into ``planned_epochs`` epochs ("" when it can).

    An epoch (``total_s / planned_epochs``) shorter than the time between
    samples has no sample of its own: its mean power would be interpolated,
    not measured. Such a plan (``trained_epochs = 10**15``) is a wrong number,
    and cutting time into that many units would need arrays of petabytes.

    Args:
        total_s: The run's total duration in s.
        planned_epochs: The run's planned epochs.
        interval_s: Median time between a device's samples in s (0: unknown,
            fewer than two samples; nothing is refused then, as there is
            nothing to cut).

    """
    unit = total_s / planned_epochs
    if interval_s > 0 and unit < interval_s:
        most = max(int(total_s / interval_s), 1)
        return (
            f"{planned_epochs} planned epochs over {total_s:.0f} s make an epoch of "
            f"{unit:.3g} s, shorter than the {interval_s:.3g} s between samples, so most epochs "
            f"would have no sample; expected at most {most} epochs (the duration over the "
            "sample interval)"
        )
    return ""


def _time_units(trace: Trace, plan: RunPlan, measured_j: float) -> tuple[_Units, str]:
    """Blocks of one mean epoch (``total_duration_s / planned_epochs``) as units.

    A block counts as finished once the last sample is within one sample
    interval of its end (a trace cut at a block's end rarely has a sample right
    on it); its value is the mean power over the part the samples cover.
    ``measured_j`` is the energy measured so far (J), the projection's start.

    Raises:
        BadInputError: No total duration or planned epochs, or an epoch
            shorter than the time between samples (:func:`time_unit_problem`;
            the number of units, and so the memory, is bounded by the samples).

    """
    total, epochs = plan.total_duration_s, plan.planned_epochs
    if total is None or not epochs or total <= 0 or epochs <= 0:
        raise BadInputError(
            "STEP without epoch marks needs the run's total duration and planned epochs to cut "
            f"time into epochs; found total_duration_s={total}, planned_epochs={epochs}"
        )
    problem = time_unit_problem(float(total), int(epochs), trace.sample_interval_s())
    if problem:
        raise BadInputError(f"STEP without epoch marks: {problem}")
    unit = float(total) / int(epochs)
    end = trace.end_s
    k = 0
    if trace.n_samples > 1:
        k = int(math.floor(end / unit + 1e-9))
        if (k + 1) * unit - end <= trace.sample_interval_s() and end > k * unit + 1e-9:
            k += 1
    edges = np.arange(k + 1, dtype=np.float64) * unit
    cut = np.minimum(edges, end)
    values = np.diff(trace.energy_at(cut)) / np.diff(cut) if k else np.zeros(0)
    why = ""
    if trace.n_samples == 0:
        why = "no power samples (all null or none)"
    elif trace.n_samples < 3:
        why = f"too few samples: {trace.n_samples}"
    units = _Units(
        values=values,
        starts_s=edges[:-1],
        measured_j=measured_j,
        elapsed_s=end,
        remaining=max(float(total) - end, 0.0),
        remaining_units=max(float(total) - end, 0.0) / unit,
        elapsed_units=max(end / unit, float(k)),
        unit_s=np.full(k, unit),
        time_mode=True,
    )
    return units, why


def _for_energy(
    samples: pl.DataFrame, epochs: pl.DataFrame | None
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Samples and epoch marks as :mod:`estimators.energy` takes them.

    Samples without ``run_id`` get one; epoch marks without ``run_id``, or when
    the samples hold one run, belong to the samples' run. NaN power (and NaN
    counter) becomes null, which :func:`~estimators.energy.epoch_energy` skips
    and counts: filtering rows out instead would shift the row numbers its
    messages give.
    """
    s = samples if "run_id" in samples.columns else samples.with_columns(run_id=pl.lit("run"))
    if (
        epochs is not None
        and s.height
        and ("run_id" not in epochs.columns or s["run_id"].n_unique() == 1)
    ):
        epochs = epochs.with_columns(run_id=pl.lit(s["run_id"][0]))
    fix = [pl.col("power_w").cast(pl.Float64).fill_nan(None)]
    if "energy_j" in s.columns and s.schema["energy_j"].is_float():
        fix.append(pl.col("energy_j").fill_nan(None))
    return s.with_columns(fix), epochs


def measured_energy_j(
    samples: pl.DataFrame,
    epochs: pl.DataFrame | None = None,
    *,
    gap_threshold_s: float = DEFAULT_GAP_THRESHOLD_S,
    until: dt.datetime | None = None,
) -> float:
    """The energy measured in a run's samples in J, as ``wattwise energy --run`` totals it.

    :func:`estimators.energy.run_total_j`: the run's epochs and the time outside
    them (counter deltas where present, power held for at most
    ``gap_threshold_s`` past a device's first and last sample, gaps counted
    0 J and never bridged), up to ``until`` when given. This is STEP's
    ``measured_j`` and a finished run's total. The gap threshold is
    ``wattwise energy``'s (by default 5 s, or 3 of a slower device's own
    intervals: :func:`estimators.energy.stream_threshold`).

    Args:
        samples: The run's samples (``timestamp``, ``power_w``; optional
            ``energy_j`` counter, ``run_id``, ``node``, ``device``).
        epochs: The run's finished epochs (``epoch``, ``start``, ``end``), or ``None``.
        gap_threshold_s: As ``wattwise energy --gap-threshold``.
        until: End of the span measured (UTC), or ``None``: the run's end.

    Raises:
        BadInputError: See :func:`estimators.energy.epoch_energy`.

    """
    from estimators.energy import run_total_j

    if samples.height == 0:
        return 0.0
    s, ep = _for_energy(samples, epochs)
    return run_total_j(s, ep, gap_threshold_s=gap_threshold_s, until=until)


def measured_epochs(
    samples: pl.DataFrame,
    epochs: pl.DataFrame,
    *,
    gap_threshold_s: float = DEFAULT_GAP_THRESHOLD_S,
) -> np.ndarray:
    """Per epoch in time order, the energy measured since the previous epoch's end (J).

    The first epoch's figure starts at the run's start (its first sample or
    first mark), so the running sum after epoch k is what the run measured up
    to that epoch's end, and after the last epoch (for a run that ended then)
    :func:`measured_energy_j`. The integration is ``wattwise energy``'s
    (:func:`estimators.energy.span_energies`, the counter included, unlike
    :func:`run_epochs`, STEP's units), with ``gap_threshold_s``.

    Raises:
        BadInputError: See :func:`estimators.energy.epoch_energy`.

    """
    from estimators.energy import run_span, span_energies

    s, ep = _for_energy(samples, epochs)
    assert ep is not None
    span = run_span(s, ep)
    if span is None or not ep.height:
        return np.zeros(0)
    ends = ep.sort("start")["end"].to_list()
    return span_energies(s, [span[0], *ends], gap_threshold_s=gap_threshold_s)


def run_epochs(samples: pl.DataFrame, epochs: pl.DataFrame, trace: Trace) -> pl.DataFrame:
    """Energy of each finished epoch of one run, as STEP and the baselines use it.

    :func:`estimators.energy.epoch_energy` on the power samples (a counter is
    not used, as in :class:`Trace`; a device without any power reading is left
    out), with NaN power skipped like a null and a
    gap threshold from each device's own rhythm (``wattwise energy``'s default:
    :func:`estimators.energy.stream_threshold`).
    Epoch marks without ``run_id``, or when the samples hold one run, belong to
    the samples' run.

    Args:
        samples: The run's samples, at least one with a power value.
        epochs: The run's finished epochs (``epoch``, ``start``, ``end``).
        trace: :meth:`Trace.from_samples` of ``samples``.

    Returns:
        :func:`~estimators.energy.epoch_energy`'s rows in time order, plus
        ``t0_s`` and ``t1_s`` (start and end in s since the trace's first
        sample) and ``covered`` (at most :data:`MAX_GAP_SHARE` of the epoch
        without samples).

    """
    from estimators.energy import epoch_energy

    power = samples.select([c for c in samples.columns if c != "energy_j"])
    # A device without a single power reading (dead, or counter-only) has nothing for STEP's
    # units: it is left out here (``wattwise energy`` reports it as a gap), not made a gap
    # over every epoch, which would leave every epoch out of the stable mean.
    keys = [c for c in ("run_id", "node", "device") if c in power.columns]
    if keys and power.height:
        has = pl.col("power_w").is_not_null() & pl.col("power_w").cast(pl.Float64).is_not_nan()
        power = power.filter(has.any().over(keys))
    s, ep = _for_energy(power, epochs)
    assert ep is not None
    per = epoch_energy(s, ep).sort("start")

    def seconds(col: str) -> pl.Expr:
        return (pl.col(col).dt.epoch("us") - trace.origin_us) / 1e6

    return per.with_columns(
        seconds("start").alias("t0_s"),
        seconds("end").alias("t1_s"),
        (pl.col("gap_s") <= MAX_GAP_SHARE * pl.col("duration_s")).alias("covered"),
    )


def left_out_note(per: pl.DataFrame, gap_threshold_s: float) -> str:
    """Which epochs of :func:`run_epochs` are left out of the stable mean, and why."""
    out = per.filter(~pl.col("covered"))
    if out.height == 0:
        return ""
    names = ", ".join(str(e) for e in out["epoch"].head(5)) + (" ..." if out.height > 5 else "")
    worst = out.row(int(np.argmax(out["gap_s"].to_numpy())), named=True)
    return (
        f"epoch{'s' if out.height > 1 else ''} {names} left out of the stable mean: more than "
        f"{MAX_GAP_SHARE:.0%} of the epoch without samples (up to {worst['gap_s']:.0f} s of "
        f"{worst['duration_s']:.0f} s; samples more than {gap_threshold_s:g} s apart, or 3 of "
        "a slower device's own intervals, count as a gap)"
    )


def scaled_note(scaled: Sequence[tuple[object, float]]) -> str:
    """Which epochs enter the stable mean scaled to their length, from ``(epoch, gap_s)`` pairs.

    An epoch with a gap of at most :data:`MAX_GAP_SHARE` of its time is kept in
    the stable mean with its energy times ``duration_s / (duration_s - gap_s)``.
    """
    parts = [f"epoch {e}: {g:.0f} s without samples, scaled to its length" for e, g in scaled[:5]]
    if len(scaled) > 5:
        parts.append(f"{len(scaled) - 5} more epochs scaled alike")
    return "; ".join(parts)


def zero_length_note(epochs: Sequence[object]) -> str:
    """Which epochs of 0 s (``end == start``) are left out of the stable mean (empty when none)."""
    if not epochs:
        return ""
    names = ", ".join(str(e) for e in epochs[:5]) + (" ..." if len(epochs) > 5 else "")
    return (
        f"epoch{'s' if len(epochs) > 1 else ''} {names} left out of the stable mean: 0 s long "
        "(end == start)"
    )


def _epoch_units(
    samples: pl.DataFrame, epochs: pl.DataFrame, trace: Trace, plan: RunPlan, measured_j: float
) -> tuple[_Units, str]:
    """Finished epochs as units, their energy from :func:`run_epochs`.

    Epochs mostly without samples count as run (elapsed) but are left out of
    the units (see :data:`MAX_GAP_SHARE`); the value of a kept epoch with a
    shorter gap is its energy scaled to its whole length. An epoch of 0 s
    (``end == start``) counts as run too, but as a unit of 0 J it would pull
    the stable mean down: it is left out, and the note names it.
    ``measured_j`` is the energy measured so far (J, :func:`measured_energy_j`,
    never scaled).
    """
    if trace.n_samples == 0:
        n = epochs.height
        remaining = float(max((plan.planned_epochs or n) - n, 0))
        empty = np.zeros(0)
        units = _Units(empty, empty, measured_j, 0.0, remaining, remaining, float(n), empty, False)
        return units, "no power samples (all null or none)"
    per = run_epochs(samples, epochs, trace)
    n = per.height
    instant = per["duration_s"].to_numpy() <= 0
    keep = np.flatnonzero(per["covered"].to_numpy() & ~instant)
    zero_note = zero_length_note(per["epoch"].filter(pl.Series(instant)).to_list())
    last_end = float(per["t1_s"].max())  # type: ignore[arg-type]
    planned = plan.planned_epochs if plan.planned_epochs is not None else n
    remaining = float(max(planned - n, 0))
    kept = per[keep]
    gap = kept["gap_s"].to_numpy().astype(np.float64)
    dur = kept["duration_s"].to_numpy().astype(np.float64)
    scaled = [(e, g) for e, g in zip(kept["epoch"].to_list(), gap.tolist(), strict=True) if g > 0]
    return _Units(
        # An epoch's gap counts 0 J: scaled to its whole length, it is not low in the mean.
        values=kept["energy_j"].to_numpy().astype(np.float64)
        * np.where(gap > 0, dur / np.maximum(dur - gap, 1e-12), 1.0),
        starts_s=per["t0_s"].to_numpy()[keep],
        measured_j=measured_j,
        elapsed_s=last_end,
        remaining=remaining,
        remaining_units=remaining,
        elapsed_units=float(n),
        unit_s=per["duration_s"].to_numpy()[keep].astype(np.float64),
        time_mode=False,
        index=keep if len(keep) < n else None,
        note=_join(scaled_note(scaled), left_out_note(per, DEFAULT_GAP_THRESHOLD_S), zero_note),
    ), ""


class OnlineStep:
    """STEP updated after every epoch in O(1): the aggregator's per-run state.

    An epoch with more than :data:`MAX_GAP_SHARE` of its time without samples
    (``gap_s``) counts as run and its energy as measured, but it stays out of
    the regime and the stable mean, and the projection's reason names it. An
    epoch with a shorter gap enters the regime and the stable mean with its
    energy scaled to its whole length, ``energy_j * duration_s / (duration_s -
    gap_s)`` (as :class:`Step` does), and the reason names it too; its
    measured energy stays ``energy_j``. An epoch of 0 s (``end == start``)
    counts as run and is left out of the mean the same way. A run that has
    finished more epochs than planned gets no projection (the plan is stale:
    a second phase numbering on), not its measured energy called final.

    Args:
        planned_epochs: Epochs the run is planned for.
        confidence: Nominal coverage of the band.
        min_stable_epochs: See :class:`Step` (at least 2).
        settle_epochs: See :class:`Step`.
        band_floor: See :class:`Step`.
        power_cap_w: Total board power cap in W, for the not-stable band.
        drift: See :class:`OnlineRegimeDetector`.
        clip: See :class:`OnlineRegimeDetector`.
        threshold: See :class:`OnlineRegimeDetector`.

    Raises:
        BadInputError: ``min_stable_epochs`` below 2.

    """

    def __init__(
        self,
        *,
        planned_epochs: int,
        confidence: float = 0.9,
        min_stable_epochs: int = 3,
        settle_epochs: float = 10.0,
        band_floor: float = 0.01,
        power_cap_w: float | None = None,
        drift: float = 0.5,
        clip: float = 3.0,
        threshold: float = 5.0,
    ) -> None:
        _check_min_stable(min_stable_epochs)
        self.planned_epochs = planned_epochs
        self.confidence = confidence
        self.min_stable_epochs = min_stable_epochs
        self.settle_epochs = settle_epochs
        self.band_floor = band_floor
        self.power_cap_w = power_cap_w
        self._det = OnlineRegimeDetector(drift=drift, clip=clip, threshold=threshold)
        self._measured = 0.0
        self._elapsed = 0.0
        self._n = 0
        # The epochs in the regime detector (all but those left out for gaps): values,
        # durations and which epoch (0-based) each one is.
        self._values: list[float] = []
        self._durations: list[float] = []
        self._epoch: list[int] = []
        self._left_out: list[tuple[int, float, float]] = []  # (epoch, gap_s, duration_s)
        self._scaled: list[tuple[int, float]] = []  # (epoch, gap_s) kept, scaled to its length
        self._instant: list[int] = []  # epochs of 0 s, left out of the mean
        # Sums over the current regime, rebuilt only when the regime changes.
        self._start = 0
        self._sum = self._sum2 = self._dsum = 0.0
        self._lo = math.inf
        self._hi = 0.0

    def update(
        self,
        energy_j: float,
        duration_s: float,
        *,
        between_j: float = 0.0,
        gap_s: float = 0.0,
        measured_j: float | None = None,
    ) -> Projection:
        """Add one finished epoch and return the new projection.

        Args:
            energy_j: The epoch's energy in J.
            duration_s: The epoch's duration in s.
            between_j: Energy since the previous epoch's end that belongs to
                no epoch (J), counted as measured.
            gap_s: Time of the epoch without samples in s; above
                :data:`MAX_GAP_SHARE` of ``duration_s`` the epoch is left out
                of the stable mean, below it the epoch's energy enters the
                mean scaled to its whole length.
            measured_j: The epoch's energy as measured (J), where it differs
                from the value STEP's regime takes (``energy_j``): a report
                replaying a stored run adds the figure ``wattwise energy``
                gives (counter deltas, gaps 0 J) to the measured energy, while
                the regime keeps the units :class:`Step` uses. Default ``energy_j``.

        Raises:
            BadInputError: A negative or non-finite energy, duration or gap.

        """
        measured = energy_j if measured_j is None else measured_j
        if not (
            math.isfinite(energy_j)
            and energy_j >= 0
            and math.isfinite(measured)
            and measured >= 0
            and math.isfinite(duration_s)
            and duration_s >= 0
            and math.isfinite(gap_s)
            and gap_s >= 0
        ):
            raise BadInputError(
                f"epoch {self._n + 1}: expected energy_j >= 0 J, duration_s >= 0 s, gap_s >= 0 s "
                f"and measured_j >= 0 J; found {energy_j} J over {duration_s} s with {gap_s} s of "
                f"gap, measured {measured} J"
            )
        self._n += 1
        self._measured += measured + between_j
        self._elapsed += duration_s
        if duration_s == 0:  # as a 0 J unit it would pull the stable mean down
            self._instant.append(self._n - 1)
            return self._projection()
        if gap_s > MAX_GAP_SHARE * duration_s:
            self._left_out.append((self._n - 1, gap_s, duration_s))
            return self._projection()
        if gap_s > 0:  # its gap counts 0 J: scaled to its whole length, it is not low
            self._scaled.append((self._n - 1, gap_s))
            energy_j *= duration_s / (duration_s - gap_s)
        self._values.append(energy_j)
        self._durations.append(duration_s)
        self._epoch.append(self._n - 1)
        self._lo = min(self._lo, energy_j)
        self._hi = max(self._hi, energy_j)
        self._det.update(energy_j)
        start = self._det.candidate_start
        if start != self._start:
            self._start = start
            vals = self._values[start:]
            self._sum = sum(vals)
            self._sum2 = sum(v * v for v in vals)
            self._dsum = sum(self._durations[start:])
        else:
            self._sum += energy_j
            self._sum2 += energy_j * energy_j
            self._dsum += duration_s
        return self._projection()

    def _note(self) -> str:
        """Which epochs were scaled or left out of the stable mean, and why (empty when none)."""
        out = self._left_out
        instant = zero_length_note(self._instant)
        if not out:
            return _join(scaled_note(self._scaled), instant)
        # Numbered from 0 in the order fed, as epoch marks are.
        names = ", ".join(str(e) for e, _, _ in out[:5]) + (" ..." if len(out) > 5 else "")
        _, gap, dur = max(out, key=lambda r: r[1] / r[2])
        return _join(
            scaled_note(self._scaled),
            f"epoch{'s' if len(out) > 1 else ''} {names} left out of the stable mean: more than "
            f"{MAX_GAP_SHARE:.0%} of the epoch without samples (up to {gap:.0f} s of {dur:.0f} s)",
            instant,
        )

    def _projection(self) -> Projection:
        remaining = float(max(self.planned_epochs - self._n, 0))
        if self._n > self.planned_epochs:
            return Projection(
                method="step",
                energy_j=None,
                confidence=self.confidence,
                measured_j=self._measured,
                elapsed_s=self._elapsed,
                reason=_join(
                    f"planned epochs unknown: the run has finished {self._n} epochs, more than "
                    f"the {self.planned_epochs} planned",
                    self._note(),
                ),
            )
        if not self._values:  # every epoch so far was left out
            unit_s = self._elapsed / self._n
            cap = self.power_cap_w * unit_s if self.power_cap_w else None
            return Projection(
                method="step",
                energy_j=None,
                lower_j=self._measured,
                upper_j=self._measured + cap * remaining if cap else None,
                confidence=self.confidence,
                measured_j=self._measured,
                elapsed_s=self._elapsed,
                remaining_s=remaining * unit_s,
                remaining_epochs=remaining,
                reason=_join("no epoch with samples over most of its time yet", self._note()),
            )
        n = len(self._values) - self._start
        mean = self._sum / n
        unit_s = self._dsum / n
        sd = math.sqrt(max(self._sum2 - n * mean * mean, 0.0) / (n - 1)) if n > 1 else mean
        centre = self._measured + mean * remaining
        proj = Projection(
            method="step",
            energy_j=centre,
            confidence=self.confidence,
            measured_j=self._measured,
            elapsed_s=self._elapsed,
            remaining_s=remaining * unit_s,
            remaining_epochs=remaining,
            stable_unit=self._epoch[self._start],
            stable_power_w=mean / unit_s,
            energy_per_epoch_j=mean,
            epoch_s=unit_s,
            n_stable=n,
        )
        if n >= max(self.min_stable_epochs, 2) and self._n >= self.settle_epochs:
            q = _t_quantile(0.5 + self.confidence / 2.0, n - 1)
            half = remaining * (
                q * sd * math.sqrt(1.0 / n + 1.0 / max(remaining, 1.0)) + self.band_floor * mean
            )
            return replace(
                proj,
                lower_j=max(centre - half, self._measured),
                upper_j=centre + half,
                stable=True,
                reason=self._note(),
            )
        lo = min(self._lo if self._lo < math.inf else mean, mean)
        hi = max(self._hi, mean)
        hi = max(hi, self.power_cap_w * unit_s) if self.power_cap_w else 2.0 * hi
        return replace(
            proj,
            lower_j=self._measured + lo * remaining,
            upper_j=self._measured + hi * remaining,
            reason=_join(
                f"not stable yet: {n} epochs in the current regime (need "
                f"{self.min_stable_epochs}), {self._n} epochs run (need {self.settle_epochs:g})",
                self._note(),
            ),
        )

    def finish(self, total_j: float | None = None) -> Projection:
        """The final record of an ended run: the measured total (``total_j`` if given)."""
        total = self._measured if total_j is None else float(total_j)
        return Projection(
            method="step",
            energy_j=total,
            lower_j=total,
            upper_j=total,
            confidence=self.confidence,
            stable=True,
            measured_j=total,
            elapsed_s=self._elapsed,
            remaining_s=0.0,
            remaining_epochs=0.0,
            finished=True,
        )
