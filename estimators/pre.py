"""PRE: predict per-epoch energy and time before training, with conformal intervals.

Each target (per-epoch energy in J, per-epoch time in s) is a physical prior
times a learned correction:

* **Prior** (roofline plus overhead, per GPU model): per batch, a host/launch
  overhead ``h = c0 + c1 * layers`` (data loading, kernel launches, small
  kernels) and a device time ``d`` = the batch's FLOPs at ``efficiency`` times
  the GPU's peak throughput overlap as a soft maximum
  ``(h^p + d^p)^(1/p)`` (``p = 1``: they add up; the GPU hides host work
  behind computation as ``p`` grows). Energy is that time at board power:
  ``E = P_board * gpus * batches * (h^p + d^p)^(1/p)``. ``p`` and the
  efficiency are chosen together by grouped cross-validation when a training
  run is compute-bound enough to inform them, else the constructor's values
  (``p = 2``, efficiency 0.8) are kept.
  ``c0`` and ``c1`` (seconds, >= 0) are fitted per GPU model by weighted least
  squares on relative error; a GPU seen with one architecture only borrows
  ``c0`` (the median of the others', capped at its own overhead) and puts
  the rest of its overhead on ``c1``; an unseen GPU gets them from a
  log-linear fit on peak TFLOPS across seen GPUs. A linear prior extrapolates
  to architectures with more or fewer FLOPs and layers than any seen, which
  trees cannot. The efficiency (fraction of peak FLOPS reached) is fitted
  where a GPU ran three architectures; otherwise it is chosen from
  :data:`EFFICIENCY_GRID` by cross-validation grouped by architecture, when
  some training run is compute-bound enough to pin it down
  (:data:`MIN_COMPUTE_SHARE`); otherwise the constructor's default is kept
  and the card says so.
* **Correction**: an XGBoost regressor on ``log(truth / prior)`` with the
  job and GPU features (:data:`estimators.features.FEATURES`); its depth is
  chosen by cross-validation grouped by architecture. It has no monotone
  constraints: the directions physics gives (more FLOPs, layers or batches
  cost more; energy scales with board power) are in the prior by
  construction, and the correction is a residual that may go either way
  (constraining it to rise with board power left every figure of
  ``bench/pre.py`` unchanged).
* **Intervals** (split conformal on out-of-fold log residuals): for a job
  whose architecture was in the training runs, from random K-fold residuals;
  for a new architecture, from folds grouped by architecture (each
  architecture predicted by a model that never saw it); for a GPU model not in
  the training runs, from folds grouped by GPU model; for both new, the two
  half-widths added. The bounds are symmetric in log space (see
  :func:`_quantiles`).

A fitted model saves as one JSON file (the two boosters in XGBoost's own JSON
format, the priors and the conformal quantiles) plus a card (features, rows,
CV scores, date, sha256 of the model file). Loading checks the checksum and
format version; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from estimators.features import FEATURES, same_flops
from profiler.errors import BadInputError, NotFittedError
from profiler.store import atomic_write_bytes

if TYPE_CHECKING:
    import xgboost as xgb

FORMAT = "wattwise-pre"
#: 3: the SEAA architectures are described as trained (features changed meaning) and
#: the model records the FLOPs it saw per architecture. 4: the run's length (``epochs``)
#: is a feature, and the model records its reference length. 5: a second model without
#: the length predicts jobs that do not say how long they run. 6: intervals for a GPU the
#: model has not seen, from folds grouped by GPU. 7: GPUs described by numbers are filed
#: under their name plus a fingerprint of the numbers.
FORMAT_VERSION = 7
TARGETS: dict[str, str] = {"energy": "epoch_energy_j", "time": "epoch_time_s"}
#: Pooled c0 / c1 (layers) when no GPU has two architectures to fit both.
DEFAULT_LAYER_RATIO = 90.0
#: Efficiencies (fraction of peak FLOPS) the grouped cross-validation chooses from.
EFFICIENCY_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: The efficiency is identifiable only when some training run spends at least this
#: share of its measured energy (or time) in the compute term at peak throughput;
#: below it the training runs are overhead-bound and say nothing about it.
MIN_COMPUTE_SHARE = 0.25
#: Efficiencies the least-squares fit (a GPU with three architectures) chooses from.
EFFICIENCY_FIT_GRID: tuple[float, ...] = tuple(round(0.05 + 0.01 * i, 2) for i in range(96))
#: A run pins the overhead down only when its device part is at most this share
#: of its time; above it the overhead hides under the computation.
INFORMATIVE_SHARE = 0.5
#: Soft-maximum exponent of overhead and device time per batch (see :class:`Prior`).
OVERLAP = 2.0
#: Overlap exponents the grouped cross-validation chooses from (1: no overlap).
OVERLAP_GRID: tuple[float, ...] = (1.0, 2.0)


# ----------------------------------------------------------------------------- folds


def grouped_folds(
    groups: Sequence[object], n_splits: int = 5, *, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds in which every group lies wholly in one validation fold.

    With at most ``n_splits`` groups this is leave-one-group-out; otherwise
    groups are shuffled and dealt to folds, largest first, to balance rows.

    Args:
        groups: Group label per row (the architecture).
        n_splits: Folds wanted.
        seed: Shuffle seed.

    Returns:
        (train indices, validation indices) per fold.

    Raises:
        BadInputError: Fewer than two groups.

    """
    labels = np.asarray([str(g) for g in groups])
    uniq, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(uniq) < 2:
        raise BadInputError(
            f"grouped cross-validation needs at least 2 architectures; found {list(uniq)}"
        )
    k = min(n_splits, len(uniq))
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros(k)
    fold_of = np.empty(len(uniq), dtype=int)
    for gi in order:
        f = int(np.argmin(load))
        fold_of[gi] = f
        load[f] += counts[gi]
    row_fold = fold_of[inverse]
    idx = np.arange(len(labels))
    return [(idx[row_fold != f], idx[row_fold == f]) for f in range(k)]


def random_folds(
    n: int, n_splits: int = 5, *, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Plain shuffled K-fold split of ``n`` rows."""
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(perm, min(n_splits, n))
    return [
        (np.sort(np.concatenate(parts[:i] + parts[i + 1 :])), np.sort(p))
        for i, p in enumerate(parts)
    ]


def arch_keys(frame: pl.DataFrame) -> list[str]:
    """Architecture identity per row: its name, else its FLOPs and layers."""
    names = frame["architecture"].to_list()
    gf = frame["gflops_forward"].to_list()
    ly = frame["layers"].to_list()
    return [
        n if n else f"gflops={g:.6g}/layers={lay}" for n, g, lay in zip(names, gf, ly, strict=True)
    ]


def arch_flops(frame: pl.DataFrame) -> dict[str, list[float]]:
    """Forward GFLOPs per sample seen per named architecture.

    Args:
        frame: Feature rows with ``architecture`` and ``gflops_forward``.

    Returns:
        Architecture name to its distinct forward GFLOPs, sorted; rows without
        a name or FLOPs are left out.

    """
    out: dict[str, set[float]] = {}
    names, gflops = frame["architecture"].to_list(), frame["gflops_forward"].to_list()
    for n, g in zip(names, gflops, strict=True):
        if n and g is not None:
            out.setdefault(str(n), set()).add(float(g))
    return {k: sorted(v) for k, v in out.items()}


def _seen(
    keys: list[str], gflops: list[float | None], known: set[str], flops: dict[str, list[float]]
) -> np.ndarray:
    """Whether each row's architecture was trained on, at the same FLOPs per sample.

    A named architecture counts as seen when its forward GFLOPs are within
    :data:`estimators.features.SAME_CONFIG_TOLERANCE` of one it was trained
    at (another input size or width is another workload).
    """
    out = np.zeros(len(keys), dtype=bool)
    for i, (k, g) in enumerate(zip(keys, gflops, strict=True)):
        if k not in known:
            continue
        seen_g = flops.get(k)
        out[i] = seen_g is None or g is None or any(same_flops(g, s) for s in seen_g)
    return out


# ----------------------------------------------------------------------------- prior


def _arrays(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    def col(name: str) -> np.ndarray:
        return frame[name].cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(float)

    tf = col("gpu_fp32_tflops")
    fp16 = col("gpu_fp16_tflops")
    half = col("precision_bits") <= 16
    peak = np.where(half & np.isfinite(fp16), fp16, tf)
    gpus = np.maximum(col("gpu_count"), 1.0)
    return {
        "batches": col("batches_per_epoch"),
        "layers": col("layers"),
        # Seconds of the epoch's FLOPs at peak throughput on all of the job's GPUs.
        "compute_s": col("tflop_per_epoch") / (peak * gpus),
        "power_w": col("gpu_board_power_w") * gpus,
        "tflops": tf,
        "gpu": np.asarray(frame["gpu_model"].cast(pl.String).to_list(), dtype=object),
    }


def _take(a: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``idx`` of the arrays of :func:`_arrays` (cheaper than slicing the frame)."""
    return {k: v[idx] for k, v in a.items()}


def _overhead_coef(
    layers: np.ndarray, s: np.ndarray, d: np.ndarray, overlap: float
) -> tuple[float, float] | None:
    """Per-batch ``(c0, c1)`` of one GPU, or ``None`` when one architecture cannot split them.

    The overhead each run shows is what is left of its time once the device
    part is taken out: ``h = (s^p - d^p)^(1/p)``. Only runs whose device part
    is at most :data:`INFORMATIVE_SHARE` of their time pin ``h`` down (on a
    compute-bound run the overhead hides under the computation); with two such
    architectures ``c0`` and ``c1`` are fitted on them. Otherwise, with two
    architectures of any kind, the additive split (``s - d``) is the only
    information there is on the ratio of ``c0`` to ``c1``, and is used.
    """
    if len(np.unique(layers)) < 2:
        return None
    h = np.power(np.maximum(s**overlap - d**overlap, 0.0), 1.0 / overlap)
    inf = d <= INFORMATIVE_SHARE * s
    if len(np.unique(layers[inf])) >= 2:
        return _nnls2(layers[inf], h[inf], 1.0 / s[inf] ** 2)
    return _nnls2(layers, s - d, 1.0 / s**2)


def _combine(h: np.ndarray, d: np.ndarray, overlap: float) -> np.ndarray:
    """Seconds per batch of host overhead ``h`` and device work ``d`` overlapping by ``p``."""
    return np.asarray(np.power(h**overlap + d**overlap, 1.0 / overlap), dtype=float)


@dataclass(frozen=True, slots=True)
class Prior:
    """Per-GPU overhead constants of the physical prior of one target.

    Attributes:
        energy: Whether the target is energy (time at board power) or time.
        coef: GPU name to (c0 in s per batch, c1 in s per batch and layer).
        tflops: GPU name to peak FP32 TFLOPS (for unseen GPUs).
        slope: d log c / d log TFLOPS for (c0, c1), for unseen GPUs.
        intercept: log c at 1 TFLOPS for (c0, c1), for unseen GPUs.
        efficiency: Fraction of peak FLOPS the compute term assumes.
        overlap: Exponent ``p`` of the soft maximum of overhead and device time
            per batch (1: they add up; large: the longer one hides the other).

    """

    energy: bool
    coef: dict[str, tuple[float, float]]
    tflops: dict[str, float]
    slope: tuple[float, float]
    intercept: tuple[float, float]
    efficiency: float
    overlap: float = 1.0

    @classmethod
    def fit(
        cls,
        frame: pl.DataFrame,
        y: np.ndarray,
        *,
        energy: bool,
        efficiency: float = 0.8,
        overlap: float = 1.0,
    ) -> Prior:
        """Fit per-GPU ``c0``, ``c1`` to truths ``y`` (J or s per epoch).

        Args:
            frame: Feature rows.
            y: Truth per row (J per epoch for energy, s per epoch for time).
            energy: Whether ``y`` is energy.
            efficiency: Fraction of peak FLOPS reached in the compute term when
                no GPU has runs of three architectures to learn it from.
            overlap: Exponent of the soft maximum of overhead and device time.

        """
        a = _arrays(frame)
        fitted = _fitted_efficiency(a, y, energy=energy, overlap=overlap)
        return cls._fit(
            a,
            y,
            energy=energy,
            efficiency=efficiency if fitted is None else fitted,
            overlap=overlap,
        )

    @classmethod
    def _fit(
        cls,
        a: dict[str, np.ndarray],
        y: np.ndarray,
        *,
        energy: bool,
        efficiency: float,
        overlap: float,
    ) -> Prior:
        """:meth:`fit` on the arrays of :func:`_arrays`, ``efficiency`` as given."""
        s = y / (a["batches"] * (a["power_w"] if energy else 1.0))
        d = a["compute_s"] / a["batches"] / efficiency
        names = a["gpu"]
        coef: dict[str, tuple[float, float]] = {}
        tflops: dict[str, float] = {}
        single: list[tuple[str, np.ndarray]] = []
        for g in sorted(set(names.tolist())):
            m = names == g
            tflops[str(g)] = float(np.nanmedian(a["tflops"][m]))
            c = _overhead_coef(a["layers"][m], s[m], d[m], overlap)
            if c is None:
                single.append((str(g), m))
            else:
                coef[str(g)] = c
        # A GPU seen with one architecture cannot separate c0 from c1: it borrows
        # c0 (per-batch host and data-loading cost, little GPU-dependent).
        c0s = [c0 for c0, _ in coef.values()]
        for g, m in single:
            over = np.power(np.maximum(s[m] ** overlap - d[m] ** overlap, 0.0), 1.0 / overlap)
            ov = float(np.median(over))
            lay = float(np.median(a["layers"][m]))
            c0 = min(float(np.median(c0s)) if c0s else ov / 2, max(ov, 0.0))
            coef[g] = (c0, max(ov - c0, 0.0) / lay)
        slope, intercept = _log_fit(coef, tflops)
        return cls(energy, coef, tflops, slope, intercept, efficiency, overlap)

    @staticmethod
    def fitted_efficiency(
        frame: pl.DataFrame, y: np.ndarray, *, energy: bool, overlap: float = 1.0
    ) -> float | None:
        """Efficiency fitted where one GPU ran three architectures, else ``None``.

        Per such GPU, the efficiency on :data:`EFFICIENCY_FIT_GRID` whose
        overhead fit (:func:`_overhead_coef`) gives the least mean absolute log
        error on that GPU's runs is kept; the median over GPUs is returned.
        """
        return _fitted_efficiency(_arrays(frame), y, energy=energy, overlap=overlap)

    def coefficients(self, gpu: str, tflops: float) -> tuple[float, float]:
        """``(c0, c1)`` of a GPU; extrapolated on TFLOPS for a GPU not fitted."""
        if gpu in self.coef:
            return self.coef[gpu]
        lt = math.log(tflops)
        return (
            math.exp(self.intercept[0] + self.slope[0] * lt),
            math.exp(self.intercept[1] + self.slope[1] * lt),
        )

    def predict(self, frame: pl.DataFrame) -> np.ndarray:
        """Prior per-epoch energy (J) or time (s) per row."""
        return self._predict(_arrays(frame))

    def _predict(self, a: dict[str, np.ndarray]) -> np.ndarray:
        """:meth:`predict` on the arrays of :func:`_arrays`."""
        seen: dict[tuple[str, float], int] = {}
        keys = zip(a["gpu"].tolist(), a["tflops"].tolist(), strict=True)
        code = np.fromiter((seen.setdefault(k, len(seen)) for k in keys), dtype=int)
        c = np.array([self.coefficients(*k) for k in seen]).reshape(-1, 2)[code]
        per_batch = _combine(
            c[:, 0] + c[:, 1] * a["layers"],
            a["compute_s"] / a["batches"] / self.efficiency,
            self.overlap,
        )
        secs = a["batches"] * per_batch
        return np.asarray(secs * (a["power_w"] if self.energy else 1.0), dtype=float)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "energy": self.energy,
            "coef": {k: list(v) for k, v in self.coef.items()},
            "tflops": self.tflops,
            "slope": list(self.slope),
            "intercept": list(self.intercept),
            "efficiency": self.efficiency,
            "overlap": self.overlap,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Prior:
        """Inverse of :meth:`to_json`."""
        return cls(
            bool(d["energy"]),
            {k: (float(v[0]), float(v[1])) for k, v in d["coef"].items()},
            {k: float(v) for k, v in d["tflops"].items()},
            (float(d["slope"][0]), float(d["slope"][1])),
            (float(d["intercept"][0]), float(d["intercept"][1])),
            float(d["efficiency"]),
            float(d["overlap"]),
        )


def _fitted_efficiency(
    a: dict[str, np.ndarray], y: np.ndarray, *, energy: bool, overlap: float
) -> float | None:
    """:meth:`Prior.fitted_efficiency` on the arrays of :func:`_arrays`."""
    s = y / (a["batches"] * (a["power_w"] if energy else 1.0))
    comp = a["compute_s"] / a["batches"]
    names = a["gpu"]
    etas = []
    for g in sorted(set(names.tolist())):
        m = names == g
        lay, sg, cg = a["layers"][m], s[m], comp[m]
        if len(np.unique(lay)) < 3 or len(np.unique(cg)) < 3:
            continue
        best: tuple[float, float] | None = None
        for eta in EFFICIENCY_FIT_GRID:
            d = cg / eta
            c = _overhead_coef(lay, sg, d, overlap)
            assert c is not None
            pred = _combine(c[0] + c[1] * lay, d, overlap)
            err = float(np.mean(np.abs(np.log(pred / sg))))
            if best is None or err < best[0] - 1e-12:
                best = (err, float(eta))
        assert best is not None
        etas.append(best[1])
    return float(np.median(etas)) if etas else None


def compute_share(frame: pl.DataFrame, y: np.ndarray, *, energy: bool) -> np.ndarray:
    """Per row, the share of truth ``y`` the prior's compute term takes at peak FLOPS."""
    a = _arrays(frame)
    comp = a["compute_s"] * (a["power_w"] if energy else 1.0)
    return np.asarray(comp / y, dtype=float)


def _nnls2(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least squares ``y ~ c0 + c1 x`` with ``c0, c1 >= 0``."""
    sw = np.sqrt(w)
    c, *_ = np.linalg.lstsq(np.column_stack([sw, sw * x]), sw * y, rcond=None)
    c0, c1 = float(c[0]), float(c[1])
    if c0 >= 0 and c1 >= 0:
        return c0, c1
    only_c1 = max(float(np.sum(w * x * y) / np.sum(w * x * x)), 0.0)
    only_c0 = max(float(np.sum(w * y) / np.sum(w)), 0.0)
    err1 = float(np.sum(w * (y - only_c1 * x) ** 2))
    err0 = float(np.sum(w * (y - only_c0) ** 2))
    return (0.0, only_c1) if err1 < err0 else (only_c0, 0.0)


def _log_fit(
    coef: dict[str, tuple[float, float]], tflops: dict[str, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    names = list(coef)
    lt = np.log([tflops[n] for n in names])
    slopes, icpts = [], []
    for j in (0, 1):
        lc = np.log(np.maximum([coef[n][j] for n in names], 1e-9))
        if len(names) >= 2 and np.ptp(lt) > 0:
            b = float(np.clip(np.polyfit(lt, lc, 1)[0], -1.0, 0.0))
        else:
            b = 0.0
        slopes.append(b)
        icpts.append(float(np.median(lc - b * lt)))
    return (slopes[0], slopes[1]), (icpts[0], icpts[1])


# ----------------------------------------------------------------------------- one target


def _matrix(frame: pl.DataFrame, *, without_length: bool = False) -> np.ndarray:
    """The correction's input matrix (:data:`FEATURES` in order).

    Args:
        frame: Feature rows.
        without_length: Blank the run's length (``epochs``) in every row, for
            the model trained without it (no tree can split on a blank column).

    """
    x = np.array(  # a writable copy
        frame.select([pl.col(c).cast(pl.Float64) for c in FEATURES])
        .fill_null(float("nan"))
        .to_numpy(),
        dtype=float,
    )
    if without_length:
        x[:, FEATURES.index("epochs")] = np.nan
    return x


def _quantiles(r: np.ndarray, coverage: float) -> tuple[float, float]:
    """Symmetric conformal bounds of log residuals (finite-sample corrected).

    Symmetric in log space: with few groups, one-sided residual quantiles
    echo the direction of the few extrapolations seen, not the next one's.
    """
    n = len(r)
    level = min(1.0, math.ceil((n + 1) * coverage) / n)
    q = float(np.quantile(np.abs(r), level, method="higher"))
    return -q, q


@dataclass(frozen=True, slots=True)
class _Fitted:
    prior: Prior
    booster: xgb.Booster
    seen_q: tuple[float, float]
    unseen_q: tuple[float, float] | None
    #: From folds grouped by GPU model (None with a single GPU model in training).
    gpu_q: tuple[float, float] | None = None

    def point(self, a: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """Prior (on the arrays of :func:`_arrays`) times the correction (on inputs ``x``)."""
        import xgboost as xgb

        corr = np.exp(self.booster.predict(xgb.DMatrix(x)))
        return np.asarray(self.prior._predict(a) * corr, dtype=float)


def _lengths(frame: pl.DataFrame, what: str) -> np.ndarray:
    """The ``epochs`` column (the run's length; nan where null).

    Raises:
        BadInputError: A length that is not a finite number > 0 (``what``:
            ``training`` or ``prediction``, for the message).

    """
    col = frame["epochs"].cast(pl.Float64)
    bad = (col.is_not_null() & ~(col.is_finite() & (col > 0))).to_numpy()
    ep = col.fill_null(float("nan")).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        run = frame.row(i, named=True).get("run_id")
        raise BadInputError(
            f"PRE {what} rows: column 'epochs' (the run's length) must be a finite number > 0 "
            f"or null; {int(bad.sum())} row(s) are not (first: row {i + 1}"
            f"{'' if run is None else f', run {run!r}'}, {ep[i]!r})"
        )
    return ep


def _fitted_json(f: _Fitted) -> dict[str, Any]:
    return {
        "prior": f.prior.to_json(),
        "seen_q": list(f.seen_q),
        "unseen_q": None if f.unseen_q is None else list(f.unseen_q),
        "gpu_q": None if f.gpu_q is None else list(f.gpu_q),
        "booster": json.loads(bytes(f.booster.save_raw("json")).decode()),
    }


def _fitted_from_json(td: dict[str, Any]) -> _Fitted:
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(bytearray(json.dumps(td["booster"]).encode()))
    return _Fitted(
        Prior.from_json(td["prior"]),
        booster,
        (float(td["seen_q"][0]), float(td["seen_q"][1])),
        None if td["unseen_q"] is None else (float(td["unseen_q"][0]), float(td["unseen_q"][1])),
        None if td["gpu_q"] is None else (float(td["gpu_q"][0]), float(td["gpu_q"][1])),
    )


def _bounds(fit: _Fitted, seen: np.ndarray, seen_gpu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the interval's factors (log-space bounds ``q``, exponentiated).

    Architecture and GPU seen: random-fold bounds. A new architecture on a
    seen GPU: architecture-grouped bounds; a seen architecture on a new GPU:
    GPU-grouped bounds; both new: the two added (their errors compound). NaN
    where training cannot say (one architecture, or one GPU model).
    """
    nan = (np.nan, np.nan)
    arch = np.asarray(fit.unseen_q if fit.unseen_q is not None else nan)
    gpu = np.asarray(fit.gpu_q if fit.gpu_q is not None else nan)
    q = np.where(
        (seen & seen_gpu)[:, None],
        np.asarray(fit.seen_q),
        np.where(seen[:, None], gpu, np.where(seen_gpu[:, None], arch, arch + gpu)),
    )
    return np.exp(q[:, 0]), np.exp(q[:, 1])


class PREModel:
    """Per-epoch energy and time predictor (see the module docstring).

    Args:
        coverage: Nominal coverage of the prediction intervals (0.9 = 90 %).
        n_estimators: Boosting rounds of each correction model.
        max_depths: Tree depths tried by grouped cross-validation.
        learning_rate: XGBoost ``eta``.
        cv_folds: Folds for grouped and random cross-validation.
        nthread: XGBoost threads. 1 by default: the boosters are small (a few
            thousand rows, shallow trees), and with 2 threads on a busy 2-core
            machine OpenMP's waiting made training 50 times slower.
        seed: Seed of folds and boosting.
        efficiency: Fraction of peak FLOPS assumed by the prior's compute term
            when the training runs cannot pin it down (no GPU ran three
            architectures and no run is compute-bound enough for grouped
            cross-validation over :data:`EFFICIENCY_GRID`). Chosen by hand
            after looking at the SEAA 2023 runs: a caveat.
        overlap: Soft-maximum exponent of per-batch overhead and device time
            in the prior (1: they add up). 2 is a choice made before measuring
            (a smooth maximum), not tuned on the held-out architectures.

    Attributes:
        priors_: Fitted prior per target (``energy``, ``time``).
        cv_: Cross-validation scores: per target, grouped and random MAPE (%)
            and interval coverage, the chosen depth, and the efficiency with
            how it was chosen (and its grouped-CV scores).
        architectures_: Architecture keys seen in training.
        architecture_gflops_: Forward GFLOPs per sample trained on, per named
            architecture: a job of that name at other FLOPs (another input
            size or width) is predicted as an unseen architecture.
        gpus_: GPU names seen in training.
        n_rows_: Training rows.
        oof_: Per target, out-of-fold predictions of the training rows from
            architecture-grouped folds (random folds with one architecture).

    """

    def __init__(
        self,
        *,
        coverage: float = 0.9,
        n_estimators: int = 200,
        max_depths: tuple[int, ...] = (2, 4),
        learning_rate: float = 0.05,
        cv_folds: int = 5,
        nthread: int = 1,
        seed: int = 0,
        efficiency: float = 0.8,
        overlap: float = OVERLAP,
        epochs_feature: bool = True,
    ) -> None:
        self.coverage = coverage
        self.n_estimators = n_estimators
        self.max_depths = max_depths
        self.learning_rate = learning_rate
        self.cv_folds = cv_folds
        self.nthread = nthread
        self.seed = seed
        self.efficiency = efficiency
        self.overlap = overlap
        self.epochs_feature = epochs_feature
        self.reference_epochs_: float | None = None
        self.fitted_free_: dict[str, _Fitted] = {}

    @property
    def uses_length(self) -> bool:
        """Whether jobs with a known length are predicted by a model that uses it."""
        return any(self.fitted_[t] is not self.fitted_free_[t] for t in self.fitted_)

    def _x(self, frame: pl.DataFrame) -> np.ndarray:
        """The inputs of :attr:`fitted_` for ``frame`` (the length column blank when unused)."""
        return _matrix(frame, without_length=not self.uses_length)

    # -- fit

    def _params(self, depth: int) -> dict[str, Any]:
        return {
            "max_depth": depth,
            "eta": self.learning_rate,
            "nthread": self.nthread,
            "seed": self.seed,
            "objective": "reg:absoluteerror",
            "subsample": 0.8,
            "min_child_weight": 3,
            "verbosity": 0,
        }

    def _prior(
        self,
        a: dict[str, np.ndarray],
        y: np.ndarray,
        energy: bool,
        efficiency: float,
        overlap: float,
    ) -> Prior:
        """Prior of training rows ``a`` under ``overlap``.

        The efficiency is fitted where a GPU ran three architectures, else
        ``efficiency`` is used.
        """
        fitted = _fitted_efficiency(a, y, energy=energy, overlap=overlap)
        eta = efficiency if fitted is None else fitted
        return Prior._fit(a, y, energy=energy, efficiency=eta, overlap=overlap)

    def _train(self, depth: int, dtrain: xgb.DMatrix) -> xgb.Booster:
        import xgboost as xgb

        return xgb.train(self._params(depth), dtrain, self.n_estimators)

    def _choose_efficiency(
        self,
        a: dict[str, np.ndarray],
        y: np.ndarray,
        energy: bool,
        folds: list[tuple[np.ndarray, np.ndarray]] | None,
    ) -> tuple[float, float, str, dict[str, float | None]]:
        """Efficiency and overlap of the prior, chosen inside the training rows.

        Both are chosen together by cross-validation grouped by architecture
        over :data:`EFFICIENCY_GRID` x :data:`OVERLAP_GRID`, when some training
        run is compute-bound enough to say anything about them
        (:data:`MIN_COMPUTE_SHARE`); otherwise the constructor's values are
        kept. Where a GPU ran three architectures the efficiency is then fitted
        by least squares under the chosen overlap.

        Args:
            a: Arrays of :func:`_arrays` of the training rows.
            y: Truths (J or s per epoch).
            energy: Whether ``y`` is energy.
            folds: Architecture-grouped folds, or ``None`` (one architecture).

        Returns:
            (efficiency, overlap, how they were chosen, grouped-CV score per
            grid point ``"p=<overlap>,eta=<efficiency>"``: mean absolute log
            error of the prior alone, in %; null where the prior was impossible).

        """
        comp = a["compute_s"] * (a["power_w"] if energy else 1.0)
        share = float(np.nanmax(comp / y))
        if folds is None or share < MIN_COMPUTE_SHARE:
            probe = _fitted_efficiency(a, y, energy=energy, overlap=self.overlap)
            if probe is not None:
                return probe, self.overlap, "fitted: a GPU ran three or more architectures", {}
            return (
                self.efficiency,
                self.overlap,
                f"default: not identifiable (largest compute share {share:.2f} < "
                f"{MIN_COMPUTE_SHARE})",
                {},
            )
        parts = [(_take(a, tr), y[tr], _take(a, va), va) for tr, va in folds]
        oof = {(p, eta): np.empty(len(y)) for p in OVERLAP_GRID for eta in EFFICIENCY_GRID}
        for at, yt, av, va in parts:
            for p in OVERLAP_GRID:
                # A fold whose GPU ran three architectures fits its own efficiency:
                # the same prior for every grid value, fitted once.
                fitted = _fitted_efficiency(at, yt, energy=energy, overlap=p)
                once = None
                for eta in EFFICIENCY_GRID:
                    if fitted is not None and once is not None:
                        oof[p, eta][va] = once
                        continue
                    pred = Prior._fit(
                        at,
                        yt,
                        energy=energy,
                        efficiency=eta if fitted is None else fitted,
                        overlap=p,
                    )._predict(av)
                    oof[p, eta][va] = pred
                    once = pred
        scores: dict[tuple[float, float], float] = {}
        for k, o in oof.items():
            # A prior whose compute term alone exceeds a truth is physically impossible.
            ok = bool(np.all(np.isfinite(o) & (o > 0)))
            scores[k] = float(100 * np.mean(np.abs(np.log(o / y)))) if ok else math.inf
        best_p, best_eta = min(scores, key=lambda k: scores[k])
        # JSON has no infinity: an impossible grid value is recorded as null.
        shown = {
            f"p={k[0]:g},eta={k[1]:g}": (v if math.isfinite(v) else None) for k, v in scores.items()
        }
        if not math.isfinite(scores[best_p, best_eta]):
            return (
                self.efficiency,
                self.overlap,
                "default: every grid value gave a non-positive prior",
                shown,
            )
        probe = _fitted_efficiency(a, y, energy=energy, overlap=best_p)
        if probe is not None:
            how = "overlap by grouped CV; efficiency fitted (a GPU ran 3+ architectures)"
            return probe, best_p, how, shown
        return best_eta, best_p, "grouped CV", shown

    def _oof(
        self,
        a: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        energy: bool,
        depths: Sequence[int],
        folds: list[tuple[np.ndarray, np.ndarray]],
        choice: tuple[float, float],
    ) -> dict[int, np.ndarray]:
        """Out-of-fold predictions per tree depth.

        Every fold uses the efficiency and overlap ``choice`` made on all the
        training rows (a fold whose GPU ran three architectures refits the
        efficiency, as the full fit does). The choice is two numbers picked
        by grouped CV of the prior alone; choosing them again inside each
        fold (nested) cost most of the training time and, with few
        architectures, scored degenerate single-architecture inner folds.
        Each fold's prior is fitted once and shared by all depths.
        """
        import xgboost as xgb

        out = {depth: np.empty(len(y)) for depth in depths}
        for tr, va in folds:
            at = _take(a, tr)
            prior = self._prior(at, y[tr], energy, *choice)
            dtrain = xgb.DMatrix(
                x[tr], label=np.log(y[tr] / prior._predict(at)), nthread=self.nthread
            )
            dval = xgb.DMatrix(x[va], nthread=self.nthread)
            base = prior._predict(_take(a, va))
            for depth in depths:
                out[depth][va] = base * np.exp(self._train(depth, dtrain).predict(dval))
        return out

    def fit(self, frame: pl.DataFrame) -> PREModel:
        """Fit both targets on feature rows with truths.

        Args:
            frame: Rows of :func:`estimators.features.runs_features`
                (``epoch_energy_j`` and ``epoch_time_s`` > 0).

        Returns:
            ``self``.

        Raises:
            BadInputError: Missing columns, too few rows, non-positive truths,
                or rows without layers.

        """
        need = ["architecture", "gpu_model", *FEATURES, *TARGETS.values()]
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise BadInputError(
                f"PRE training rows need column(s) {missing}; found {frame.columns}. "
                "Build them with estimators.features.runs_features"
            )
        if frame.height < 10:
            raise BadInputError(
                f"PRE needs at least 10 finished runs to train; found {frame.height}"
            )
        for c in (
            *TARGETS.values(),
            "layers",
            "gflops_forward",
            "gpu_fp32_tflops",
            "gpu_board_power_w",
        ):
            bad = frame.filter(pl.col(c).is_null() | ~(pl.col(c) > 0))
            if bad.height:
                raise BadInputError(
                    f"PRE training rows: column {c!r} must be > 0 in every row; "
                    f"{bad.height} row(s) are not (first: {bad.row(0, named=True).get('run_id')})"
                )
        ep = _lengths(frame, "training")
        known = ep[~np.isnan(ep)]
        self.reference_epochs_ = float(np.median(known)) if len(known) else None
        a = _arrays(frame)
        keys = arch_keys(frame)
        n_arch = len(set(keys))
        gfolds = grouped_folds(keys, self.cv_folds, seed=self.seed) if n_arch >= 2 else None
        rfolds = random_folds(frame.height, self.cv_folds, seed=self.seed)
        gpu_names = frame["gpu_model"].cast(pl.String).to_list()
        ufolds = (
            grouped_folds(gpu_names, self.cv_folds, seed=self.seed)
            if len(set(gpu_names)) >= 2
            else None
        )
        x_free = _matrix(frame, without_length=True)
        # With the length (when it is a feature and some run has one), and without it for
        # jobs that do not say how long they run: each with its own intervals.
        with_length = self.epochs_feature and len(known) > 0
        self.fitted_: dict[str, _Fitted] = {}
        self.fitted_free_ = {}
        self.cv_: dict[str, dict[str, Any]] = {}
        self.oof_: dict[str, np.ndarray] = {}
        for name, col in TARGETS.items():
            energy = name == "energy"
            y = frame[col].to_numpy().astype(float)
            choice = self._choose_efficiency(a, y, energy, gfolds)
            free, cv_free, oof_free = self._fit_target(
                a, x_free, y, energy, gfolds, rfolds, ufolds, choice
            )
            self.fitted_free_[name] = free
            if with_length:
                x = _matrix(frame)
                full, cv, oof = self._fit_target(a, x, y, energy, gfolds, rfolds, ufolds, choice)
                cv["without_length"] = cv_free
            else:
                full, cv, oof = free, cv_free, oof_free
            self.fitted_[name] = full
            self.cv_[name] = cv
            self.oof_[name] = oof
        self.architectures_ = sorted(set(keys))
        self.architecture_gflops_ = arch_flops(frame)
        self.gpus_ = sorted(set(frame["gpu_model"].to_list()))
        self.n_rows_ = frame.height
        return self

    def _fit_target(
        self,
        a: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        energy: bool,
        gfolds: list[tuple[np.ndarray, np.ndarray]] | None,
        rfolds: list[tuple[np.ndarray, np.ndarray]],
        ufolds: list[tuple[np.ndarray, np.ndarray]] | None,
        choice: tuple[float, float, str, dict[str, float | None]],
    ) -> tuple[_Fitted, dict[str, Any], np.ndarray]:
        """One target on inputs ``x``: depth by grouped CV, conformal bounds, final fit.

        Bounds: random folds for seen jobs, architecture-grouped folds for a
        new architecture, GPU-grouped folds (``ufolds``) for a new GPU model.

        Returns:
            The fitted model, its CV scores (for the card) and its out-of-fold
            predictions (architecture-grouped, else random folds).

        """
        import xgboost as xgb

        eta, ov, eta_how, eta_scores = choice
        depth, goof = self.max_depths[0], None
        if gfolds is not None:
            oofs = self._oof(a, x, y, energy, self.max_depths, gfolds, (eta, ov))
            depth = min(self.max_depths, key=lambda d: _mape(oofs[d], y))
            goof = oofs[depth]
        roof = self._oof(a, x, y, energy, (depth,), rfolds, (eta, ov))[depth]
        seen_q = _quantiles(np.log(y / roof), self.coverage)
        unseen_q = _quantiles(np.log(y / goof), self.coverage) if goof is not None else None
        uoof = None
        if ufolds is not None:
            uoof = self._oof(a, x, y, energy, (depth,), ufolds, (eta, ov))[depth]
        gpu_q = _quantiles(np.log(y / uoof), self.coverage) if uoof is not None else None
        prior = self._prior(a, y, energy, eta, ov)
        resid = np.log(y / prior._predict(a))
        booster = self._train(depth, xgb.DMatrix(x, label=resid, nthread=self.nthread))
        cv = {
            "max_depth": depth,
            "efficiency": prior.efficiency,
            "overlap": prior.overlap,
            "efficiency_source": eta_how,
            "efficiency_cv_log_error_pct": eta_scores,
            "random_mape_pct": _mape(roof, y),
            # Each fold's runs against bounds from the other folds' residuals: a bound
            # checked on the residuals it came from covers them by construction.
            "random_coverage": _held_out_cover(roof, y, rfolds, self.coverage),
            "grouped_mape_pct": None if goof is None else _mape(goof, y),
            "grouped_coverage": None
            if goof is None or gfolds is None
            else _held_out_cover(goof, y, gfolds, self.coverage),
            "grouped_folds": 0 if gfolds is None else len(gfolds),
            "gpu_grouped_mape_pct": None if uoof is None else _mape(uoof, y),
            "gpu_grouped_coverage": None
            if uoof is None or ufolds is None
            else _held_out_cover(uoof, y, ufolds, self.coverage),
        }
        oof = goof if goof is not None else roof
        return _Fitted(prior, booster, seen_q, unseen_q, gpu_q), cv, oof

    # -- predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "fitted_"):
            raise NotFittedError(
                "This PREModel instance is not fitted yet; call fit(rows) or PREModel.load(path)"
            )

    def predict(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Predict per-epoch energy and time with intervals.

        Args:
            frame: Feature rows (:func:`estimators.features.feature_frame` or
                ``runs_features``).

        Returns:
            Per row: ``predicted_epoch_energy_j``, ``lower_j``, ``upper_j``,
            ``predicted_epoch_time_s``, ``time_lower_s``, ``time_upper_s``,
            ``seen_architecture`` and ``seen_gpu`` (bools). Intervals of a new
            architecture are null when training had a single architecture, and
            of a new GPU model when training had a single GPU model.

        Raises:
            NotFittedError: Before ``fit``.
            BadInputError: Missing feature columns, or rows without layers,
                board power or TFLOPS.

        """
        self._check_fitted()
        missing = [c for c in ("architecture", "gpu_model", *FEATURES) if c not in frame.columns]
        if missing:
            raise BadInputError(
                f"PRE prediction rows need column(s) {missing}; found {frame.columns}"
            )
        for c in ("layers", "gpu_fp32_tflops", "gpu_board_power_w", "batches_per_epoch"):
            if frame[c].null_count():
                raise BadInputError(
                    f"PRE prediction rows: column {c!r} has nulls; expected numbers"
                )
        ep = _lengths(frame, "prediction")
        has_length = ~np.isnan(ep)
        x = _matrix(frame)
        _check_float32(x, frame)
        arrays = _arrays(frame)  # the priors' inputs, shared by every target and model
        x_free = _matrix(frame, without_length=True)
        seen = _seen(
            arch_keys(frame),
            frame["gflops_forward"].to_list(),
            set(self.architectures_),
            self.architecture_gflops_,
        )
        gpus = set(self.gpus_)
        seen_gpu = np.array([g in gpus for g in frame["gpu_model"].to_list()], dtype=bool)
        out: dict[str, Any] = {}
        names = {
            "energy": ("predicted_epoch_energy_j", "lower_j", "upper_j"),
            "time": ("predicted_epoch_time_s", "time_lower_s", "time_upper_s"),
        }
        for t, fit in self.fitted_.items():
            free = self.fitted_free_[t]
            # A job that says how long it runs gets the model that uses the length; one
            # that does not, the model trained without it (and that model's intervals).
            p_len, q_len = fit.point(arrays, x), _bounds(fit, seen, seen_gpu)
            if free is fit:
                p, (lo_f, hi_f) = p_len, q_len
            else:
                p_free, q_free = free.point(arrays, x_free), _bounds(free, seen, seen_gpu)
                p = np.where(has_length, p_len, p_free)
                lo_f = np.where(has_length, q_len[0], q_free[0])
                hi_f = np.where(has_length, q_len[1], q_free[1])
            col, lo, hi = names[t]
            out[col] = p
            out[lo] = p * lo_f
            out[hi] = p * hi_f
        # Energy and time are predicted by separate models; where they extrapolate, the
        # energy can imply more power than the board can draw (a ViT on an H100: 918 W of
        # 700). A GPU draws at most its board power, so the run takes at least its energy
        # at board power: the time (and its interval) is scaled up to that where it is
        # below. The time, not the energy, gives way: per-epoch energy is the better
        # predicted of the two (bench/pre.py: time MAPE is the higher in every split and
        # fold; capping the energy instead made leave-one-architecture-out worse).
        floor = out["predicted_epoch_energy_j"] / arrays["power_w"]
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(
                out["predicted_epoch_time_s"] < floor, floor / out["predicted_epoch_time_s"], 1.0
            )
        for c in names["time"]:
            out[c] = out[c] * scale
        res = pl.DataFrame(out).fill_nan(None)
        return res.with_columns(
            pl.Series("seen_architecture", seen),
            pl.Series("seen_gpu", seen_gpu),
        )

    # -- persistence

    def to_json(self) -> dict[str, Any]:
        """The model as plain JSON (boosters in XGBoost's JSON format)."""
        self._check_fitted()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "features": list(FEATURES),
            "coverage": self.coverage,
            "architectures": self.architectures_,
            "architecture_gflops": self.architecture_gflops_,
            "gpus": self.gpus_,
            "n_rows": self.n_rows_,
            "epochs_feature": self.epochs_feature,
            "reference_epochs": self.reference_epochs_,
            "cv": self.cv_,
            "targets": {t: _fitted_json(f) for t, f in self.fitted_.items()},
            # Jobs without a length; null: the same model as "targets" (length not used).
            "targets_without_length": None
            if not self.uses_length
            else {t: _fitted_json(f) for t, f in self.fitted_free_.items()},
        }

    def save(self, path: str | Path, *, card: dict[str, Any] | None = None) -> Path:
        """Write the card (``<stem>.card.json``), then the model file, each atomically.

        Args:
            path: Model file, e.g. ``models/pre-v3.json``.
            card: Extra card fields (version, decision...).

        Returns:
            The card's path.

        """
        path = Path(path)
        body = json.dumps(self.to_json(), separators=(",", ":")).encode()
        full_card = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_file": path.name,
            "sha256": hashlib.sha256(body).hexdigest(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "features": list(FEATURES),
            "training_rows": self.n_rows_,
            "architectures": self.architectures_,
            "gpus": self.gpus_,
            "coverage": self.coverage,
            "cv": self.cv_,
            **(card or {}),
        }
        # The card first: a model file is what makes a version exist, so a failure
        # between the two leaves an orphan card (ignored, overwritten by the next save),
        # never a model without its card.
        cpath = card_path(path)
        atomic_write_bytes(json.dumps(full_card, indent=2).encode(), cpath)
        try:
            atomic_write_bytes(body, path)
        except BaseException:
            with contextlib.suppress(OSError):
                cpath.unlink()
            raise
        return cpath

    @classmethod
    def load(cls, path: str | Path) -> PREModel:
        """Load a model saved by :meth:`save`, checking its card's checksum and version.

        Raises:
            BadInputError: Missing or unreadable (no permission) file or
                card, checksum mismatch (tampered or partial file), another
                format or version, or malformed content.

        """
        import xgboost as xgb

        path = Path(path)
        cpath = card_path(path)
        for p, what in ((path, "model file"), (cpath, "model card")):
            if not p.is_file():
                raise BadInputError(f"{p}: expected a PRE {what}; no such file")
        try:
            body = path.read_bytes()
        except OSError as err:
            raise BadInputError(_unreadable(path, "model file", err)) from err
        card = read_card(cpath)
        if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
            raise BadInputError(
                f"{cpath}: expected format {FORMAT!r} version {FORMAT_VERSION}; found "
                f"{card.get('format')!r} version {card.get('format_version')!r}. Retrain with "
                "'wattwise retrain'"
            )
        digest = hashlib.sha256(body).hexdigest()
        if card.get("sha256") != digest:
            raise BadInputError(
                f"{path}: checksum mismatch: card says sha256 {card.get('sha256')}, file has "
                f"{digest}; the model file was changed or is incomplete. Retrain with "
                "'wattwise retrain'"
            )
        try:
            d = json.loads(body)
            if d.get("format_version") != FORMAT_VERSION or list(d["features"]) != list(FEATURES):
                raise BadInputError(
                    f"{path}: model of format version {d.get('format_version')} with features "
                    f"{d.get('features')}; this wattwise expects version {FORMAT_VERSION} with "
                    f"{list(FEATURES)}. Retrain with 'wattwise retrain'"
                )
            m = cls(coverage=float(d["coverage"]), epochs_feature=bool(d["epochs_feature"]))
            ref = d["reference_epochs"]
            m.reference_epochs_ = None if ref is None else float(ref)
            m.fitted_ = {t: _fitted_from_json(td) for t, td in d["targets"].items()}
            free = d["targets_without_length"]
            m.fitted_free_ = (
                dict(m.fitted_)
                if free is None
                else {t: _fitted_from_json(td) for t, td in free.items()}
            )
            if set(m.fitted_free_) != set(m.fitted_):
                raise ValueError("targets_without_length does not have the targets' keys")
            m.cv_ = d["cv"]
            m.architectures_ = list(d["architectures"])
            flops = d["architecture_gflops"]
            if not isinstance(flops, dict):
                raise TypeError(f"architecture_gflops is {type(flops).__name__}, not an object")
            m.architecture_gflops_ = {str(k): [float(x) for x in v] for k, v in flops.items()}
            m.gpus_ = list(d["gpus"])
            m.n_rows_ = int(d["n_rows"])
        except BadInputError:
            raise
        except (KeyError, TypeError, ValueError, xgb.core.XGBoostError) as err:
            raise BadInputError(f"{path}: malformed PRE model file ({err!r})") from err
        return m


def _mape(p: np.ndarray, y: np.ndarray) -> float:
    return float(100.0 * np.mean(np.abs(p - y) / y))


def _check_float32(x: np.ndarray, frame: pl.DataFrame) -> None:
    """Refuse features XGBoost (float32) would read as infinite, naming the row and column.

    Raises:
        BadInputError: A finite value beyond float32's range (``--gflops 1e40``).

    """
    big = np.isfinite(x) & (np.abs(x) > np.finfo(np.float32).max)
    if big.any():
        i, j = (int(v[0]) for v in np.nonzero(big))
        run = frame.row(i, named=True).get("run_id")
        raise BadInputError(
            f"PRE prediction rows: column {FEATURES[j]!r} must be at most "
            f"{float(np.finfo(np.float32).max):.3g} (the model reads float32); found {x[i, j]:.3g} "
            f"(row {i + 1}{'' if run is None else f', run {run!r}'})"
        )


def _held_out_cover(
    p: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], coverage: float
) -> float:
    """Share of rows inside bounds calibrated on the other folds' out-of-fold residuals."""
    r = np.log(y / p)
    inside = 0
    for tr, va in folds:
        lo, hi = _quantiles(r[tr], coverage)
        inside += int(np.sum((r[va] >= lo) & (r[va] <= hi)))
    return inside / len(y)


def read_card(cpath: Path) -> dict[str, Any]:
    """A model card's fields.

    Raises:
        BadInputError: The card cannot be read (no permission), is not JSON,
            or is JSON but not an object.

    """
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{cpath}: expected a JSON model card; {err}") from err
    except OSError as err:
        raise BadInputError(_unreadable(cpath, "model card", err)) from err
    if not isinstance(card, dict):
        raise BadInputError(
            f"{cpath}: expected a JSON object (the model card's fields); found "
            f"{json.dumps(card)[:80]}. Retrain with 'wattwise retrain'"
        )
    return card


def _unreadable(path: Path, what: str, err: OSError) -> str:
    """The message for a PRE model file or card that exists but cannot be read."""
    return (
        f"{path}: expected a readable PRE {what}; could not read it ({err.strerror or err}); "
        "check its permissions"
    )


def card_path(model_path: Path) -> Path:
    """``pre-v3.json`` -> ``pre-v3.card.json``."""
    return model_path.with_name(model_path.stem + ".card.json")
