"""STEP, Carbontracker and the report at the edges: slow samplers, gaps, zones, empty input."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from estimators.baselines import Carbontracker
from estimators.energy import epoch_energy, run_energy
from estimators.report import figure, projection_history
from estimators.step import OnlineStep, RunPlan, Step, Trace
from profiler.errors import BadInputError
from tests.conftest import at

# 12 finished epochs of 100 s at a constant 100 W, 20 planned: the truth is 200 kJ.
PLANNED = 20
TRUTH_J = 100.0 * 100.0 * PLANNED


def flat_run(
    step_s: float = 1.0, *, until_s: float = 1200.0, drop: tuple[float, float] = (0, 0)
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Samples every ``step_s`` s at 100 W (none inside ``drop``), and 12 epochs of 100 s."""
    times = [t for t in np.arange(0.0, until_s + 1e-9, step_s) if not drop[0] < t < drop[1]]
    samples = pl.DataFrame(
        {"timestamp": [at(float(t)) for t in times], "power_w": [100.0] * len(times)}
    )
    epochs = pl.DataFrame(
        {
            "epoch": list(range(12)),
            "start": [at(100.0 * k) for k in range(12)],
            "end": [at(100.0 * (k + 1)) for k in range(12)],
        }
    )
    return samples, epochs


def in_zone(df: pl.DataFrame, cols: tuple[str, ...], zone: str) -> pl.DataFrame:
    return df.with_columns(pl.col(c).dt.convert_time_zone(zone) for c in cols)


# ------------------------------------------------------------------------------ 1: slow samplers


def test_a_sampler_slower_than_5_s_is_not_counted_as_0_j_epochs() -> None:
    samples, epochs = flat_run(10.0)
    plan = RunPlan(planned_epochs=PLANNED)
    proj = Step().fit(samples, epochs, plan=plan).predict()
    assert proj.stable
    assert proj.energy_j == pytest.approx(TRUTH_J, rel=1e-9)
    assert proj.upper_j is not None and proj.upper_j > proj.lower_j  # type: ignore[operator]
    ct = Carbontracker().fit(samples, epochs, plan=plan).predict()
    assert ct.energy_j == pytest.approx(TRUTH_J, rel=1e-9)
    hist = projection_history(samples, epochs, plan)
    assert hist["energy_j"][-1] == pytest.approx(TRUTH_J, rel=1e-9)


def test_an_epoch_mostly_without_samples_is_left_out_of_the_stable_mean() -> None:
    # 1 Hz, but nothing between 520 s and 580 s: epoch 6 (index 5) is 60 % gap.
    samples, epochs = flat_run(1.0, drop=(520.0, 580.0))
    plan = RunPlan(planned_epochs=PLANNED)
    per = epoch_energy(
        samples.with_columns(run_id=pl.lit("r")), epochs.with_columns(run_id=pl.lit("r"))
    )
    assert per["gap_s"][5] == pytest.approx(60.0)  # the gap is real at the default threshold
    proj = Step().fit(samples, epochs, plan=plan).predict()
    assert proj.stable
    assert proj.energy_j == pytest.approx(TRUTH_J, rel=1e-9)
    assert proj.n_stable == 11
    assert "epoch 5 left out" in proj.reason
    hist = projection_history(samples, epochs, plan)
    assert hist["energy_j"][-1] == pytest.approx(TRUTH_J, rel=1e-9)
    assert hist["measured_j"][-1] == pytest.approx(120_000.0, rel=1e-9)


def test_carbontracker_gives_no_answer_when_its_first_epoch_is_mostly_gap() -> None:
    samples, epochs = flat_run(1.0, drop=(10.0, 90.0))
    proj = Carbontracker().fit(samples, epochs, plan=RunPlan(planned_epochs=PLANNED)).predict()
    assert proj.energy_j is None
    assert "epoch 0" in proj.reason and "without samples" in proj.reason


def test_online_step_leaves_a_gappy_epoch_out_of_the_regime() -> None:
    online = OnlineStep(planned_epochs=PLANNED)
    for k in range(12):
        proj = online.update(10_000.0, 100.0, gap_s=60.0 if k == 5 else 0.0)
    assert proj.stable and proj.n_stable == 11
    assert proj.energy_j == pytest.approx(TRUTH_J)
    assert "epoch 5 left out" in proj.reason  # numbered from 0, like epoch marks


# ------------------------------------------------------------------------------ 2: time-mode units


def test_time_mode_counts_the_unit_its_last_sample_ends() -> None:
    # 1 Hz samples, units of 10.5 s: a cut at k units keeps a sample up to 0.5 s before the edge.
    n = 1050
    samples = pl.DataFrame(
        {"timestamp": [at(t) for t in range(n + 1)], "power_w": [100.0] * (n + 1)}
    )
    plan = RunPlan(total_duration_s=float(n), planned_epochs=100)
    trace = Trace.from_samples(samples)
    for k in (1, 2, 10, 11):
        step = Step().fit(trace.until(k * 10.5), plan=plan)
        assert len(step.units_) == k
        assert step.units_ == pytest.approx(np.full(k, 100.0))
    hist = projection_history(samples, None, plan)
    assert hist["stable"].to_list()[:9] == [False] * 9
    assert hist["stable"][9]  # after 10 units the warm-up of 10 epochs is over
    assert hist["energy_j"][9] == pytest.approx(100.0 * n)
    early = Step().fit(trace.until(5 * 10.5), plan=plan).predict()
    assert "only 5 of the 10 epochs" in early.reason


# ------------------------------------------------------------------------------ 3: time zones


def test_time_zones_of_samples_and_marks_do_not_matter() -> None:
    samples, epochs = flat_run(1.0)
    plan = RunPlan(planned_epochs=PLANNED)
    utc = Step().fit(samples, epochs, plan=plan).predict()
    for zone in ("Europe/Madrid", "America/New_York"):
        s = in_zone(samples, ("timestamp",), zone)
        e = in_zone(epochs, ("start", "end"), zone)
        proj = Step().fit(s, e, plan=plan).predict()
        assert proj.measured_j == pytest.approx(utc.measured_j)
        assert proj.elapsed_s == pytest.approx(1200.0)
        assert proj.energy_j == pytest.approx(TRUTH_J)
        assert proj.stable_start_s == utc.stable_start_s
        assert Trace.from_samples(s).origin_us == Trace.from_samples(samples).origin_us
        hist = projection_history(s, e, plan)
        assert hist["t_s"][-1] == pytest.approx(1200.0)
        assert hist["measured_j"][-1] == pytest.approx(120_000.0)
        fig = figure(s, e, hist, truth_j=None, title="zone")
        marks = [float(np.asarray(line.get_xdata())[0]) for line in fig.axes[0].lines[1:]]
        assert marks[:12] == pytest.approx([100.0 * (k + 1) / 60 for k in range(12)])


def test_naive_marks_are_utc_against_zoned_samples() -> None:
    samples, epochs = flat_run(1.0)
    madrid = in_zone(samples, ("timestamp",), "Europe/Madrid")
    naive = epochs.with_columns(pl.col("start", "end").dt.replace_time_zone(None))
    proj = Step().fit(madrid, naive, plan=RunPlan(planned_epochs=PLANNED)).predict()
    assert proj.elapsed_s == pytest.approx(1200.0)
    assert proj.energy_j == pytest.approx(TRUTH_J)


# ------------------------------------------------------------------------------ 4: null keys


@pytest.mark.parametrize("first_null", [True, False])
def test_a_null_device_is_refused_not_merged(first_null: bool) -> None:
    ts = [at(t) for t in range(10)]
    devices = [None] * 10 + ["1"] * 10 if first_null else ["1"] * 10 + [None] * 10
    s = pl.DataFrame(
        {"run_id": ["r"] * 20, "device": devices, "timestamp": ts + ts, "power_w": [100.0] * 20}
    )
    row = 1 if first_null else 11
    with pytest.raises(BadInputError, match=rf"row {row}, 'device'.*expected a device id"):
        run_energy(s)
    marks = pl.DataFrame({"run_id": ["r"], "epoch": [0], "start": [at(0)], "end": [at(9)]})
    with pytest.raises(BadInputError, match="found null"):
        epoch_energy(s, marks)


def test_a_null_node_is_refused() -> None:
    s = pl.DataFrame(
        {
            "run_id": ["r"] * 4,
            "node": [None, None, "a", "a"],
            "timestamp": [at(0), at(1)] * 2,
            "power_w": [100.0] * 4,
        }
    )
    with pytest.raises(BadInputError, match=r"row 1, 'node'.*expected a node"):
        run_energy(s)


# ------------------------------------------------------------------------------ 5: empty, null, NaN


EMPTY = pl.DataFrame(schema={"timestamp": pl.Datetime("us", "UTC"), "power_w": pl.Float64})
NULLS = pl.DataFrame(
    {"timestamp": [at(0), at(1)], "power_w": [None, None]},
    schema={"timestamp": pl.Datetime("us", "UTC"), "power_w": pl.Float64},
)
MARKS = pl.DataFrame(
    {
        "epoch": [0, 1, 2],
        "start": [at(100.0 * k) for k in range(3)],
        "end": [at(100.0 * (k + 1)) for k in range(3)],
    }
)


@pytest.mark.parametrize("samples", [EMPTY, NULLS], ids=["empty", "all-null"])
def test_epoch_mode_without_power_gives_no_answer(samples: pl.DataFrame) -> None:
    plan = RunPlan(planned_epochs=20, power_cap_w=300.0)
    proj = Step().fit(samples, MARKS, plan=plan).predict()
    assert proj.energy_j is None and not proj.stable
    assert "no power samples" in proj.reason
    assert proj.remaining_epochs == 17
    ct = Carbontracker().fit(samples, MARKS, plan=plan).predict()
    assert ct.energy_j is None and "no power samples" in ct.reason
    assert projection_history(samples, MARKS, plan).height == 0


def test_remaining_epochs_never_goes_negative() -> None:
    proj = Step().fit(NULLS, MARKS, plan=RunPlan(planned_epochs=1, power_cap_w=300.0)).predict()
    assert proj.remaining_epochs == 0.0
    samples, epochs = flat_run(1.0)
    proj = Step().fit(samples, epochs, plan=RunPlan(planned_epochs=5)).predict()
    assert proj.remaining_epochs == 0.0


def test_nan_power_is_skipped_in_epoch_mode_as_in_time_mode() -> None:
    samples, epochs = flat_run(1.0)
    power = samples["power_w"].to_list()
    power[5], power[50] = None, math.nan
    samples = samples.with_columns(power_w=pl.Series(power, dtype=pl.Float64))
    plan = RunPlan(planned_epochs=PLANNED, total_duration_s=2000.0)
    assert Step().fit(samples, plan=plan).predict().energy_j == pytest.approx(TRUTH_J)
    assert Step().fit(samples, epochs, plan=plan).predict().energy_j == pytest.approx(TRUTH_J)
    assert Carbontracker().fit(samples, epochs, plan=plan).predict().energy_j == pytest.approx(
        TRUTH_J
    )
    assert projection_history(samples, epochs, plan)["energy_j"][-1] == pytest.approx(TRUTH_J)


def test_an_error_in_epoch_mode_names_the_row_of_the_callers_frame() -> None:
    samples, epochs = flat_run(1.0)
    power = samples["power_w"].to_list()
    power[2] = math.nan  # row 3: skipped, must not shift the row numbers after it
    samples = samples.with_columns(power_w=pl.Series(power, dtype=pl.Float64))
    swapped = pl.concat([samples[:8], samples[9:10], samples[8:9], samples[10:]])
    with pytest.raises(BadInputError, match=r"row 10\b.*out-of-order"):
        Step().fit(swapped, epochs, plan=RunPlan(planned_epochs=PLANNED))


# ------------------------------------------------------------------------------ 6: NaN band


def test_min_stable_epochs_below_2_is_refused() -> None:
    samples, epochs = flat_run(1.0)
    with pytest.raises(BadInputError, match="min_stable_epochs must be >= 2; found 1"):
        Step(min_stable_epochs=1).fit(samples, epochs, plan=RunPlan(planned_epochs=PLANNED))
    with pytest.raises(BadInputError, match="min_stable_epochs must be >= 2; found 1"):
        OnlineStep(planned_epochs=PLANNED, min_stable_epochs=1)
