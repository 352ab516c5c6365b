"""Baseline energy estimators with STEP's interface, and the bench that compares them.

Every estimator is fitted on one run's samples observed so far and a
:class:`~estimators.step.RunPlan`, and ``predict()`` returns a
:class:`~estimators.step.Projection` of the run's total energy:

* ``mlco2`` (ML CO2 Impact, Lacoste et al. 2019): board power x duration.
* ``green_algorithms`` (Lannelongue et al. 2021): (board power x
  utilisation + 0.3725 W per GB of memory) x duration x PUE.
* ``flops``: training FLOPs / (peak FLOP/s x utilisation) x board power.
* ``carbontracker`` (Anthony et al. 2020): mean energy of the first
  epoch(s) x planned epochs.
* ``naive``: mean power so far x duration.

None of them has a band (``lower_j`` and ``upper_j`` are ``None``) or a stable
point (``stable`` is ``False``). :func:`bench_step` runs all of them, and
STEP, on recorded traces cut at a fraction of each run's duration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import polars as pl

from estimators.gpus import GpuSpec, lookup
from estimators.step import (
    MAX_GAP_SHARE,
    Projection,
    ProjectionPredictor,
    RunPlan,
    Step,
    Trace,
    run_epochs,
    time_unit_problem,
)
from profiler.errors import BadInputError, where

#: Memory power of Green Algorithms, in W per GB (Lannelongue et al. 2021).
GA_MEMORY_W_PER_GB = 0.3725


class Estimator(Protocol):
    """What the bench needs from an estimator."""

    name: str

    def fit(
        self, samples: pl.DataFrame | Trace, epochs: pl.DataFrame | None = None, *, plan: RunPlan
    ) -> Estimator:
        """Learn from one run's samples so far."""
        ...

    def predict(self) -> Projection:
        """The projected total energy."""
        ...


def _spec(gpu: str | GpuSpec | None, plan: RunPlan) -> GpuSpec | None:
    model = gpu if gpu is not None else plan.gpu_model
    return lookup(model) if model is not None else None


def _board_power_w(
    gpu: str | GpuSpec | None, board_power_w: float | None, plan: RunPlan, who: str
) -> float:
    """Board power of all devices in W: explicit, else the plan's cap, else the GPU table."""
    if board_power_w is not None:
        return float(board_power_w) * plan.gpu_count
    if gpu is None and plan.power_cap_w:
        return float(plan.power_cap_w) * plan.gpu_count
    spec = _spec(gpu, plan)
    if spec is None:
        raise BadInputError(
            f"{who} needs the board power: give board_power_w, a power cap or a GPU model; "
            "found none"
        )
    return spec.board_power_w * plan.gpu_count


def _duration(plan: RunPlan, who: str) -> float:
    if plan.total_duration_s is None or not plan.total_duration_s > 0:
        raise BadInputError(
            f"{who} needs the run's total duration in s; found {plan.total_duration_s}"
        )
    return float(plan.total_duration_s)


def _trace(samples: pl.DataFrame | Trace) -> Trace:
    return samples if isinstance(samples, Trace) else Trace.from_samples(samples)


class _Baseline(ProjectionPredictor):
    """Shared ``predict`` (from :class:`ProjectionPredictor`) and the answer helper."""

    name = "baseline"

    def _answer(
        self,
        energy_j: float | None,
        trace: Trace,
        plan: RunPlan,
        reason: str = "",
        *,
        epochs_done: int | None = None,
    ) -> None:
        """Record the projection; one below the energy measured so far is raised to it.

        Like STEP, which projects nothing more once the planned duration or
        epochs have run, a baseline never projects less than was measured; the
        reason says so (and whether the run has gone past its plan).
        """
        if energy_j is not None and not math.isfinite(energy_j):
            energy_j, reason = None, reason or "the estimate is not a finite number"
        measured = trace.total_j()
        if energy_j is not None and energy_j < measured:
            past = []
            total, planned = plan.total_duration_s, plan.planned_epochs
            if total and trace.end_s > total:
                past.append(f"{trace.end_s:.0f} s have run, more than the {total:.0f} s planned")
            if epochs_done is not None and planned and epochs_done > planned:
                past.append(f"{epochs_done} epochs have run, more than the {planned} planned")
            why = f" ({'; '.join(past)}: more epochs ran than planned)" if past else ""
            clamp = (
                f"{self.name}'s estimate of {energy_j:.0f} J is below the {measured:.0f} J "
                f"measured so far{why}; the projection is the measured energy"
            )
            energy_j, reason = measured, "; ".join(r for r in (reason, clamp) if r)
        self.projection_ = Projection(
            method=self.name,
            energy_j=energy_j,
            measured_j=measured,
            elapsed_s=trace.end_s,
            remaining_s=(
                max(plan.total_duration_s - trace.end_s, 0.0) if plan.total_duration_s else None
            ),
            reason=reason,
        )


class MLCO2(_Baseline):
    """ML CO2 Impact: board power x total duration.

    Args:
        gpu: GPU model name or spec; ``None`` takes the plan's cap or model.
        board_power_w: Board power of one device in W, overriding the table.

    """

    name = "mlco2"

    def __init__(
        self, *, gpu: str | GpuSpec | None = None, board_power_w: float | None = None
    ) -> None:
        self.gpu = gpu
        self.board_power_w = board_power_w

    def fit(
        self, samples: pl.DataFrame | Trace, epochs: pl.DataFrame | None = None, *, plan: RunPlan
    ) -> MLCO2:
        """Compute board power x duration; see the class docstring."""
        trace = _trace(samples)
        power = _board_power_w(self.gpu, self.board_power_w, plan, "ML CO2 Impact")
        self._answer(power * _duration(plan, "ML CO2 Impact"), trace, plan)
        return self


class GreenAlgorithms(_Baseline):
    """Green Algorithms: (board power x utilisation + 0.3725 W/GB x memory) x duration x PUE.

    Args:
        gpu: GPU model name or spec; ``None`` takes the plan's model.
        board_power_w: Board power of one device in W, overriding the table.
        usage: Utilisation factor in [0, 1]; ``None`` uses the mean
            ``gpu_util_pct`` observed so far, else 1.
        memory_gb: Memory counted in GB; ``None`` uses the GPU's memory.
        pue: Power usage effectiveness of the data centre (1.0 = device energy only,
            comparable with a GPU power trace; the tool's default is 1.67).

    """

    name = "green_algorithms"

    def __init__(
        self,
        *,
        gpu: str | GpuSpec | None = None,
        board_power_w: float | None = None,
        usage: float | None = None,
        memory_gb: float | None = None,
        pue: float = 1.0,
    ) -> None:
        self.gpu = gpu
        self.board_power_w = board_power_w
        self.usage = usage
        self.memory_gb = memory_gb
        self.pue = pue

    def fit(
        self, samples: pl.DataFrame | Trace, epochs: pl.DataFrame | None = None, *, plan: RunPlan
    ) -> GreenAlgorithms:
        """Compute the Green Algorithms estimate; see the class docstring."""
        trace = _trace(samples)
        if self.pue < 1.0:
            raise BadInputError(f"PUE must be >= 1; found {self.pue}")
        power = _board_power_w(self.gpu, self.board_power_w, plan, "Green Algorithms")
        usage = self.usage
        if usage is None:
            usage = 1.0
            if isinstance(samples, pl.DataFrame) and "gpu_util_pct" in samples.columns:
                mean = samples["gpu_util_pct"].drop_nulls().drop_nans().mean()
                if mean is not None:
                    usage = float(mean) / 100.0  # type: ignore[arg-type]
        if not 0.0 <= usage <= 1.0:
            raise BadInputError(f"Green Algorithms usage must be in [0, 1]; found {usage}")
        memory = self.memory_gb
        if memory is None:
            spec = _spec(self.gpu, plan) if (self.gpu or plan.gpu_model) else None
            memory = spec.memory_gb * plan.gpu_count if spec else 0.0
        watts = power * usage + GA_MEMORY_W_PER_GB * memory
        self._answer(watts * _duration(plan, "Green Algorithms") * self.pue, trace, plan)
        return self


class Flops(_Baseline):
    """FLOPs-based: training FLOPs / (peak FLOP/s x utilisation) x board power.

    Training FLOPs per epoch are ``3 x forward FLOPs x training samples`` (forward
    plus a backward pass of twice the cost) plus ``forward FLOPs x validation
    samples``.

    Args:
        gpu: GPU model name or spec; ``None`` takes the plan's model.
        utilisation: Fraction of the FP32 peak the training reaches.
        precision: Which peak to use: ``fp32`` or ``fp16`` (tensor cores).

    """

    name = "flops"

    def __init__(
        self, *, gpu: str | GpuSpec | None = None, utilisation: float = 0.3, precision: str = "fp32"
    ) -> None:
        self.gpu = gpu
        self.utilisation = utilisation
        self.precision = precision

    def fit(
        self, samples: pl.DataFrame | Trace, epochs: pl.DataFrame | None = None, *, plan: RunPlan
    ) -> Flops:
        """Compute the FLOPs estimate; see the class docstring."""
        trace = _trace(samples)
        spec = _spec(self.gpu, plan)
        missing = [
            n
            for n in ("gflops_forward", "training_size", "planned_epochs")
            if getattr(plan, n) is None
        ]
        if spec is None or missing:
            raise BadInputError(
                "the FLOPs baseline needs a GPU model, gflops_forward, training_size and "
                f"planned_epochs; missing {missing + ([] if spec else ['gpu_model'])}"
            )
        peak = spec.fp16_tflops if self.precision == "fp16" else spec.fp32_tflops
        if peak is None:
            raise BadInputError(f"{spec.name} has no {self.precision} tensor peak; use fp32")
        assert plan.gflops_forward is not None and plan.training_size is not None
        assert plan.planned_epochs is not None
        samples_per_epoch = 3 * plan.training_size + (plan.validation_size or 0)
        per_epoch = 1e9 * plan.gflops_forward * samples_per_epoch
        flops_per_s = peak * 1e12 * self.utilisation * plan.gpu_count
        seconds = per_epoch * plan.planned_epochs / flops_per_s
        self._answer(seconds * spec.board_power_w * plan.gpu_count, trace, plan)
        return self


class Carbontracker(_Baseline):
    """Carbontracker's rule: mean energy of the first epoch(s) x planned epochs.

    Without epoch marks an epoch is ``total_duration_s / planned_epochs``
    seconds from the first sample.

    Args:
        epochs_before_pred: Epochs measured before predicting (the tool's default is 1).

    """

    name = "carbontracker"

    def __init__(self, *, epochs_before_pred: int = 1) -> None:
        self.epochs_before_pred = epochs_before_pred

    def fit(
        self, samples: pl.DataFrame | Trace, epochs: pl.DataFrame | None = None, *, plan: RunPlan
    ) -> Carbontracker:
        """Measure the first epochs and multiply; see the class docstring."""
        trace = _trace(samples)
        k = self.epochs_before_pred
        planned = plan.planned_epochs
        if not planned or planned <= 0:
            raise BadInputError(f"Carbontracker needs planned epochs > 0; found {planned}")
        if epochs is not None and epochs.height and isinstance(samples, pl.DataFrame):
            if trace.n_samples == 0:
                self._answer(None, trace, plan, "no power samples (all null or none)")
                return self
            per = run_epochs(samples, epochs, trace).head(k)
            bad = per.filter(~pl.col("covered"))
            if bad.height:
                r = bad.row(0, named=True)
                self._answer(
                    None,
                    trace,
                    plan,
                    f"Carbontracker measures epoch {r['epoch']}, but {r['gap_s']:.0f} s of its "
                    f"{r['duration_s']:.0f} s are without samples (more than "
                    f"{MAX_GAP_SHARE:.0%}); its energy is not known",
                )
                return self
            first = per["energy_j"].to_numpy()
        else:
            unit = _duration(plan, "Carbontracker") / planned
            n = min(k, int(trace.end_s / unit + 1e-9))
            first = np.diff(trace.energy_at(np.arange(n + 1) * unit)) if n else np.zeros(0)
        if len(first) == 0:
            self._answer(None, trace, plan, f"Carbontracker needs {k} finished epoch(s); found 0")
            return self
        done = epochs.height if epochs is not None and epochs.height else None
        self._answer(float(np.mean(first)) * planned, trace, plan, epochs_done=done)
        return self


class Naive(_Baseline):
    """Mean power so far x total duration."""

    name = "naive"

    def __init__(self) -> None:
        pass

    def fit(
        self, samples: pl.DataFrame | Trace, epochs: pl.DataFrame | None = None, *, plan: RunPlan
    ) -> Naive:
        """Compute mean power x duration."""
        trace = _trace(samples)
        mean = trace.mean_power_w()
        if mean is None:
            self._answer(None, trace, plan, "no measured interval (fewer than 2 power samples)")
            return self
        self._answer(mean * _duration(plan, "the naive estimate"), trace, plan)
        return self


#: Bench methods: name -> factory. ``step-*`` are the detector comparison.
METHODS: dict[str, Callable[[], Estimator]] = {
    "step": lambda: Step(),
    "carbontracker": lambda: Carbontracker(),
    "mlco2": lambda: MLCO2(),
    "green_algorithms": lambda: GreenAlgorithms(),
    "naive": lambda: Naive(),
    "flops": lambda: Flops(),
    "step-online": lambda: Step(detector="online"),
    "step-pelt": lambda: Step(detector="pelt"),
    "step-fluss": lambda: Step(detector="fluss"),
    "step-none": lambda: Step(detector="online", threshold=math.inf),
}
DEFAULT_METHODS: tuple[str, ...] = ("step", "carbontracker", "mlco2", "green_algorithms", "naive")

_RUN_COLUMNS = ("run_id", "duration_s", "trained_epochs")


def bench_step(
    runs: pl.DataFrame,
    traces: pl.DataFrame,
    *,
    fraction: float,
    methods: Sequence[str] = DEFAULT_METHODS,
    duration: str = "trace",
    file: str | None = None,
) -> pl.DataFrame:
    """Give every method the first ``fraction`` of each traced run; compare with the truth.

    Each method sees the samples up to ``fraction x total duration`` after the
    run's first sample, the total duration and ``trained_epochs`` (as planned
    epochs), the GPU model and power limit, but no epoch marks.

    A run this cannot describe is left out the way a method that cannot answer
    is: its rows have no prediction and a ``reason``. That is a run whose
    ``trained_epochs`` is null (a store's running or failed run), not a whole
    number >= 1, or so large that an epoch would be shorter than the time
    between its samples (``10**15``), or whose total duration is unknown
    (``duration="runs"`` with a null or NaN ``duration_s``, or a trace
    spanning 0 s without one). Samples without a
    ``run_id`` or ``timestamp`` are refused, not dropped, and so are NaN,
    infinite or negative power and a device's repeated timestamps, naming the
    row (1-based, in ``traces`` as given), the run and ``file``. A null power
    is a sample without a value: skipped, as ``wattwise energy`` does. Samples
    out of time order are put in order (the integral does not depend on it).

    Args:
        runs: One row per run: ``run_id``, ``duration_s``, ``trained_epochs``;
            optional ``gpu_model``, ``power_limit_w``, ``gflops_forward``,
            ``training_size``, ``validation_size``.
        traces: Samples: ``run_id``, ``timestamp``, ``power_w`` (optional
            ``gpu_util_pct``).
        fraction: Observed fraction of each run's duration, in (0, 1].
        methods: Names from :data:`METHODS`.
        duration: ``trace``: the total duration is the trace's span (the
            truth's span); ``runs``: the ``duration_s`` column.
        file: Where ``traces`` came from, named in its errors.

    Returns:
        One row per (run_id, method): ``predicted_energy_j``, ``lower_j``,
        ``upper_j``, ``stable``, ``true_energy_j``, ``ape_pct`` (absolute
        percentage error), ``covered`` (truth inside the band, null without
        one), ``half_width_pct`` (half the band over the truth, in %),
        ``reason``.

    Raises:
        BadInputError: Bad fraction, unknown method, missing columns, null
            ``run_id`` or ``timestamp`` values, non-datetime timestamps,
            non-numeric, NaN, infinite or negative power, or a device's
            repeated timestamps.

    """
    if not 0.0 < fraction <= 1.0:
        raise BadInputError(f"observe fraction must be in (0, 1]; found {fraction}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BadInputError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    if duration not in ("trace", "runs"):
        raise BadInputError(f"duration must be 'trace' or 'runs'; found {duration!r}")
    missing = [c for c in _RUN_COLUMNS if c not in runs.columns]
    missing += [
        f"traces.{c}" for c in ("run_id", "timestamp", "power_w") if c not in traces.columns
    ]
    if missing:
        raise BadInputError(
            f"bench step needs columns {missing}; runs has {runs.columns}, "
            f"traces has {traces.columns}"
        )
    for frame, name, cols in (
        (runs, "runs", ("run_id",)),
        (traces, "traces", ("run_id", "timestamp")),
    ):
        for c in cols:
            nulls = frame.filter(pl.col(c).is_null())
            if nulls.height:
                ids = nulls["run_id"].drop_nulls().unique(maintain_order=True).head(5).to_list()
                raise BadInputError(
                    f"{name}.{c} has {nulls.height} null(s)"
                    + (f" (runs {ids})" if ids else "")
                    + f"; expected a {c} on every row of {name}"
                )
    _check_traces(traces, file)
    info = {r["run_id"]: r for r in runs.iter_rows(named=True)}
    rows: list[dict[str, object]] = []
    traces = traces.sort("run_id", "timestamp")
    for (run_id,), part in traces.partition_by("run_id", as_dict=True, maintain_order=True).items():
        r = info.get(run_id)
        if r is None:
            continue
        full = Trace.from_samples(part, file=f"{file}, run {run_id!r}" if file else None)
        truth = full.total_j() if full.n_samples > 1 else None
        runs_s = r["duration_s"]
        if runs_s is not None and math.isnan(runs_s):
            runs_s = None
        total_s = full.end_s if duration == "trace" else runs_s
        if not total_s or total_s <= 0:
            total_s = runs_s
        why = ""
        epochs = r["trained_epochs"]
        if epochs is None:
            why = (
                "runs.trained_epochs is null for this run (a running or failed run?); the bench "
                "needs it as the planned epochs"
            )
        elif total_s is None:
            why = (
                f"runs.duration_s is {'null' if r['duration_s'] is None else 'NaN'} for this run"
                + ("" if duration == "runs" else f" and its trace spans {full.end_s:.0f} s")
                + "; the bench needs the run's total duration"
            )
        else:
            why = _epochs_problem(epochs, float(total_s), full.sample_interval_s())
        if why:
            rows.extend(
                {
                    "run_id": run_id,
                    "method": name,
                    "predicted_energy_j": None,
                    "lower_j": None,
                    "upper_j": None,
                    "stable": False if name.startswith("step") else None,
                    "true_energy_j": truth,
                    "reason": why,
                }
                for name in methods
            )
            continue
        total_s = float(total_s)
        plan = RunPlan(
            total_duration_s=total_s,
            planned_epochs=int(epochs),
            gpu_model=r.get("gpu_model"),
            power_cap_w=r.get("power_limit_w"),
            gflops_forward=r.get("gflops_forward"),
            training_size=r.get("training_size"),
            validation_size=r.get("validation_size"),
        )
        cut_s = fraction * total_s
        seen = full.until(cut_s)
        short = seen.end_s + 5.0 < cut_s
        util = part.filter(
            (pl.col("timestamp") - pl.col("timestamp").min()).dt.total_microseconds() <= cut_s * 1e6
        )
        for name in methods:
            est = METHODS[name]()
            try:
                proj = est.fit(util if name == "green_algorithms" else seen, plan=plan).predict()
            except BadInputError as err:
                proj = Projection(method=name, energy_j=None, reason=str(err))
            stable = proj.stable
            reason = proj.reason
            if short and name.startswith("step"):
                stable = False
                reason = (
                    f"the trace ends at {seen.end_s:.0f} s, before the observed window of "
                    f"{cut_s:.0f} s; " + reason
                )
            rows.append(
                {
                    "run_id": run_id,
                    "method": name,
                    "predicted_energy_j": proj.energy_j,
                    "lower_j": proj.lower_j,
                    "upper_j": proj.upper_j,
                    "stable": stable if name.startswith("step") else None,
                    "true_energy_j": truth,
                    "reason": reason,
                }
            )
    schema = {
        "run_id": pl.String,
        "method": pl.String,
        "predicted_energy_j": pl.Float64,
        "lower_j": pl.Float64,
        "upper_j": pl.Float64,
        "stable": pl.Boolean,
        "true_energy_j": pl.Float64,
        "reason": pl.String,
    }
    out = pl.DataFrame(rows, schema=schema)
    true = pl.col("true_energy_j")
    return out.with_columns(
        ((pl.col("predicted_energy_j") - true).abs() / true * 100).alias("ape_pct"),
        ((pl.col("lower_j") <= true) & (true <= pl.col("upper_j"))).alias("covered"),
        ((pl.col("upper_j") - pl.col("lower_j")) / 2 / true * 100).alias("half_width_pct"),
    )


def _epochs_problem(epochs: object, total_s: float, interval_s: float) -> str:
    """Why a run's ``trained_epochs`` cannot be its planned epochs ("" when it can).

    Not a whole number >= 1 (0, negative, NaN, 2.5), or so many that an epoch
    is shorter than the time between the trace's samples
    (:func:`~estimators.step.time_unit_problem`: ``10**15`` epochs).
    """
    from estimators.features import is_epoch_count

    if not is_epoch_count(epochs):
        return (
            f"runs.trained_epochs is {epochs!r} for this run; the bench needs a whole number "
            ">= 1 as the planned epochs"
        )
    n = int(float(epochs))  # type: ignore[arg-type]
    problem = time_unit_problem(total_s, n, interval_s)
    return f"runs.trained_epochs is {n} for this run: {problem}" if problem else ""


def _check_traces(traces: pl.DataFrame, file: str | None) -> None:
    """Refuse what :meth:`Trace.from_samples` would drop or refuse, naming the row and run.

    Raises:
        BadInputError: Non-datetime timestamps; non-numeric, NaN, infinite or
            negative power; a device's repeated timestamps.

    """
    stamp, power = traces.schema["timestamp"], traces.schema["power_w"]
    if not isinstance(stamp, pl.Datetime):
        raise BadInputError(
            f"{where(file, label=repr('timestamp'))}expected a datetime column (UTC, or naive "
            f"meaning UTC); found {stamp}"
        )
    if not (power.is_numeric() or power == pl.Null):
        raise BadInputError(
            f"{where(file, label=repr('power_w'))}expected numbers (W); found {power}"
        )
    keys = ["run_id", *(c for c in ("node", "device") if c in traces.columns)]
    df = traces.select(*keys, "timestamp", pl.col("power_w").cast(pl.Float64)).with_row_index(
        "row", offset=1
    )
    w = pl.col("power_w")
    bad = df.filter(w.is_nan() | w.is_infinite() | (w < 0))
    if bad.height:
        r = bad.row(0, named=True)
        run = f"run {r['run_id']!r}"
        raise BadInputError(
            f"{where(file, r['row'], run)}expected power_w to be a finite number >= 0 W; "
            f"found {r['power_w']}"
        )
    same = [pl.col(c).eq_missing(pl.col(c).shift(1)) for c in (*keys, "timestamp")]
    dup = (
        df.sort(*keys, "timestamp", "row")
        .with_columns(pl.col("row").shift(1).alias("first"))
        .filter(pl.all_horizontal(same))
        .sort("row")
    )
    if dup.height:
        r = dup.row(0, named=True)
        run = f"run {r['run_id']!r}"
        device = "".join(f"{c} {r[c]!r} " for c in keys[1:])
        raise BadInputError(
            f"{where(file, r['row'], run)}{device}repeated timestamp {r['timestamp']} (also at "
            f"row {r['first']}); expected one sample per device and time. Drop duplicates first"
        )


def summarise(pred: pl.DataFrame) -> pl.DataFrame:
    """Per method: error, band coverage and width, over all bands and over the stable ones.

    A run STEP does not call stable carries the wide "lowest power seen ..
    power cap" band, not the 90 % band, so coverage over all bands mixes the
    two; the ``stable_*`` columns measure the 90 % claim alone.

    Args:
        pred: Output of :func:`bench_step`.

    Returns:
        One row per method: ``runs``, ``no_answer`` (runs without a
        projection), ``median_ape_pct``, ``p90_ape_pct``, ``coverage`` (share
        of all bands, not-stable ones included, that hold the truth),
        ``median_half_width_pct`` (over all bands), ``stable_share``,
        ``stable_runs`` (runs called stable), ``stable_coverage`` and
        ``stable_median_half_width_pct`` (over the stable runs' bands only).
        The ``stable*`` columns are null for a method without a stable flag;
        ``stable_coverage`` and ``stable_median_half_width_pct`` are null when
        no run with a band is stable.

    """
    stable = pl.col("stable")
    has_flag = stable.is_not_null().any()
    return pred.group_by("method", maintain_order=True).agg(
        pl.len().alias("runs"),
        pl.col("predicted_energy_j").is_null().sum().alias("no_answer"),
        pl.col("ape_pct").median().alias("median_ape_pct"),
        pl.col("ape_pct").quantile(0.9, interpolation="linear").alias("p90_ape_pct"),
        pl.col("covered").mean().alias("coverage"),
        pl.col("half_width_pct").median().alias("median_half_width_pct"),
        stable.mean().alias("stable_share"),
        pl.when(has_flag).then(stable.sum()).alias("stable_runs"),
        pl.col("covered").filter(stable.fill_null(False)).mean().alias("stable_coverage"),
        pl.col("half_width_pct")
        .filter(stable.fill_null(False))
        .median()
        .alias("stable_median_half_width_pct"),
    )
