"""STEP, Carbontracker and the report at the edges: slow samplers, gaps, zones, empty input."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    # The 60 s gap counts 0 J in the measured energy, as in `wattwise energy` (never
    # bridged): 114 kJ measured, plus the stable 10 kJ for each of the 8 epochs to come.
    assert proj.measured_j == pytest.approx(TRUTH_J * 12 / 20 - 6_000.0, rel=1e-9)
    assert proj.energy_j == pytest.approx(TRUTH_J - 6_000.0, rel=1e-9)
    assert proj.n_stable == 11
    assert "epoch 5 left out" in proj.reason
    hist = projection_history(samples, epochs, plan)
    assert hist["energy_j"][-1] == pytest.approx(TRUTH_J - 6_000.0, rel=1e-9)
    assert hist["measured_j"][-1] == pytest.approx(114_000.0, rel=1e-9)
    assert hist["measured_j"][-1] == pytest.approx(per["energy_j"].sum(), rel=1e-12)


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


# ------------------------------------------------------------------------------ 7: short gaps


def test_a_short_gap_is_scaled_to_its_epochs_length_not_counted_as_0_j() -> None:
    # 1 Hz, nothing between 520 s and 535 s: epoch 5 has a 15 s gap (15 %, kept in the mean).
    samples, epochs = flat_run(1.0, drop=(520.0, 535.0))
    plan = RunPlan(planned_epochs=PLANNED)
    proj = Step().fit(samples, epochs, plan=plan).predict()
    assert proj.stable and proj.n_stable == 12
    assert proj.energy_per_epoch_j == pytest.approx(10_000.0, rel=1e-9)
    # Measured as `wattwise energy` measures it: the 15 s gap counts 0 J, never scaled.
    assert proj.measured_j == pytest.approx(118_500.0, rel=1e-9)
    assert proj.energy_j == pytest.approx(118_500.0 + 8 * 10_000.0, rel=1e-9)
    assert "epoch 5: 15 s without samples, scaled to its length" in proj.reason
    # The online update (the aggregator's, and the report's replay) scales it alike, and
    # its measured energy is the same (the gap counts 0 J there too).
    online = OnlineStep(planned_epochs=PLANNED)
    for k in range(12):
        live = online.update(8_500.0 if k == 5 else 10_000.0, 100.0, gap_s=15.0 if k == 5 else 0)
    assert live.stable and live.energy_per_epoch_j == pytest.approx(10_000.0)
    assert live.measured_j == pytest.approx(118_500.0)
    assert live.energy_j == pytest.approx(118_500.0 + 8 * 10_000.0)
    assert "epoch 5: 15 s without samples, scaled to its length" in live.reason
    hist = projection_history(samples, epochs, plan)
    assert hist["energy_j"][-1] - hist["measured_j"][-1] == pytest.approx(8 * 10_000.0)


@pytest.mark.shared_data
def test_short_outages_on_a_real_trace_do_not_bias_the_projection(shared_data: Path) -> None:
    # cloud-vgg16-00 cut into 30 epochs, 14 seen; 18 % of epochs 11-13 without samples.
    s = (
        pl.read_parquet(shared_data / "traces.parquet")
        .filter(pl.col("run_id") == "cloud-vgg16-00")
        .sort("timestamp")
    )
    truth = Trace.from_samples(s).total_j()
    t0 = s["timestamp"].min()
    span = (s["timestamp"].max() - t0) / 30  # type: ignore[operator]
    k = 14
    epochs = pl.DataFrame(
        {
            "epoch": list(range(k)),
            "start": [t0 + span * i for i in range(k)],
            "end": [t0 + span * (i + 1) for i in range(k)],
        }
    )
    seen = s.filter(pl.col("timestamp") <= epochs["end"][-1])
    for e in (11, 12, 13):
        a = epochs["start"][e] + span * 0.3
        seen = seen.filter(~pl.col("timestamp").is_between(a, a + span * 0.18))
    plan = RunPlan(planned_epochs=30, power_cap_w=350.0)
    proj = Step().fit(seen, epochs, plan=plan).predict()
    assert proj.stable
    # The outages were never measured (0 J, as in `wattwise energy`); what STEP projects
    # beyond the measured energy is the rest of the run, unbiased by them.
    end_s = (epochs["end"][-1] - t0).total_seconds()  # type: ignore[operator]
    rest = truth - float(Trace.from_samples(s).energy_at(end_s)[0])
    assert proj.measured_j < truth - rest - 15_000.0  # three outages of 23 s at ~350 W
    assert proj.energy_j - proj.measured_j == pytest.approx(rest, rel=0.02)  # type: ignore[operator]
    assert proj.lower_j <= proj.measured_j + rest <= proj.upper_j  # type: ignore[operator]
    assert "epoch 11: 23 s without samples, scaled to its length" in proj.reason
    hist = projection_history(seen, epochs, plan)
    assert hist["stable"][-1]
    assert hist["measured_j"][-1] == pytest.approx(proj.measured_j, rel=1e-12)
    assert hist["energy_j"][-1] - hist["measured_j"][-1] == pytest.approx(rest, rel=0.02)


# ------------------------------------------------------------------------------ 8: no plan


NO_PLAN = "planned epochs unknown: give --planned-epochs"


def test_without_planned_epochs_a_running_run_is_not_projected() -> None:
    samples, epochs = flat_run(1.0)
    proj = Step().fit(samples, epochs, plan=RunPlan(power_cap_w=300.0)).predict()
    assert proj.energy_j is None and not proj.stable and not proj.finished
    assert proj.lower_j is None and proj.upper_j is None and proj.remaining_s is None
    assert proj.reason.startswith(NO_PLAN)
    assert proj.measured_j == pytest.approx(120_000.0)
    with pytest.raises(BadInputError, match=NO_PLAN):
        projection_history(samples, epochs, RunPlan())
    # A finished run's answer is its measured total, and its replay knows its epochs.
    done = RunPlan(finished=True)
    assert Step().fit(samples, epochs, plan=done).predict().energy_j == pytest.approx(120_000.0)
    hist = projection_history(samples, epochs, done)
    assert hist.height == 12 and hist["energy_j"][-1] == pytest.approx(120_000.0)


def _store_unplanned(root: Path, status: str) -> None:
    from profiler.store import Store

    samples, epochs = flat_run(1.0)
    store = Store(root)
    store.write_samples(
        samples.with_columns(
            run_id=pl.lit("r1"), node=pl.lit("n1"), device=pl.lit("0"), source=pl.lit("replay")
        )
    )
    store.write_epochs(epochs.with_columns(run_id=pl.lit("r1")))
    store.write_runs(pl.DataFrame({"run_id": ["r1"], "status": [status], "start": [at(0)]}))


def test_cli_without_planned_epochs_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from cluster.cli import main

    _store_unplanned(tmp_path / "s", "running")
    store = ["--run", "r1", "--store", str(tmp_path / "s")]
    assert main(["estimate", *store, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["energy_j"] is None and row["stable"] is False
    assert row["reason"].startswith(NO_PLAN)
    assert main(["estimate", *store]) == 0
    out = capsys.readouterr().out
    assert "planned epochs unknown" in out and "stable" in out and "not yet" in out
    assert main(["estimate", *store, "--planned-epochs", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy_j"] == pytest.approx(TRUTH_J)
    assert main(["report", *store, "--out", str(tmp_path / "r.html")]) == 2
    assert "planned epochs unknown" in capsys.readouterr().err
    _store_unplanned(tmp_path / "f", "finished")
    done = ["--run", "r1", "--store", str(tmp_path / "f")]
    assert main(["estimate", *done, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy_j"] == pytest.approx(120_000.0)
    assert main(["report", *done, "--out", str(tmp_path / "f.html")]) == 0


def _store_planned(root: Path, status: str, planned: int) -> list[str]:
    """A run "r1" with 12 recorded epochs and ``planned`` stored; the CLI's run arguments."""
    _store_unplanned(root, status)
    from profiler.store import Store

    Store(root).write_runs(
        pl.DataFrame(
            {"run_id": ["r1"], "status": [status], "start": [at(0)], "planned_epochs": [planned]}
        )
    )
    return ["--run", "r1", "--store", str(root)]


def test_planned_epochs_below_the_recorded_epochs_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    store = _store_planned(tmp_path / "s", "running", 20)
    for cmd in (["estimate"], ["report", "--out", str(tmp_path / "r.html")]):
        assert main([*cmd, *store, "--planned-epochs", "10"]) == 2
        err = capsys.readouterr().err
        assert "expected >= 12 recorded epochs, found 10" in err and "'r1'" in err
    assert not (tmp_path / "r.html").exists()
    # As many planned as recorded: the last epoch has ended, nothing remains.
    assert main(["estimate", *store, "--planned-epochs", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["remaining_epochs"] == 0


def test_a_stored_plan_below_the_recorded_epochs_is_not_called_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A second training phase numbers its epochs on past the plan stored for the first.
    from cluster.cli import main

    store = _store_planned(tmp_path / "s", "running", 5)
    stale = "the run record's planned_epochs (5) are fewer than the 12 epochs recorded"
    assert main(["estimate", *store, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["energy_j"] is None and row["stable"] is False and row["lower_j"] is None
    assert row["reason"].startswith(f"planned epochs unknown: {stale}; give --planned-epochs")
    assert row["measured_j"] == pytest.approx(120_000.0)
    assert main(["estimate", *store]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not yet" in out and stale in out
    assert main(["report", *store, "--out", str(tmp_path / "r.html")]) == 2
    assert stale in capsys.readouterr().err
    # Given, the planned epochs are used as usual.
    assert main(["estimate", *store, "--planned-epochs", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy_j"] == pytest.approx(TRUTH_J)
    # A finished run's answer is its measured total; its replay takes the epochs it recorded.
    done = _store_planned(tmp_path / "f", "finished", 5)
    assert main(["estimate", *done, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy_j"] == pytest.approx(120_000.0)
    assert main(["report", *done, "--out", str(tmp_path / "f.html")]) == 0
