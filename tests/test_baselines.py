"""Baselines: hand-computed answers and the estimator contract shared with STEP."""

from __future__ import annotations

import inspect
from pathlib import Path

import polars as pl
import pytest

from estimators.baselines import (
    GA_MEMORY_W_PER_GB,
    METHODS,
    MLCO2,
    Carbontracker,
    Flops,
    GreenAlgorithms,
    Naive,
    bench_step,
    summarise,
)
from estimators.step import RunPlan, Step
from profiler.errors import BadInputError, NotFittedError
from tests.conftest import at


def flat(until_s: int, watts: float, util: float | None = None) -> pl.DataFrame:
    n = until_s + 1
    data: dict[str, object] = {
        "timestamp": [at(t) for t in range(n)],
        "power_w": [watts] * n,
    }
    if util is not None:
        data["gpu_util_pct"] = [util] * n
    return pl.DataFrame(data)


PLAN = RunPlan(total_duration_s=1000.0, planned_epochs=10, power_cap_w=300.0)


def test_mlco2_is_board_power_times_duration() -> None:
    assert MLCO2().fit(flat(10, 50), plan=PLAN).predict().energy_j == pytest.approx(300_000)
    plan = RunPlan(total_duration_s=1000.0, gpu_model="NVIDIA GeForce RTX 3090", gpu_count=2)
    assert MLCO2().fit(flat(10, 50), plan=plan).predict().energy_j == pytest.approx(700_000)


def test_green_algorithms_uses_utilisation_memory_and_pue() -> None:
    plan = RunPlan(total_duration_s=1000.0, gpu_model="NVIDIA GeForce RTX 3090")
    est = GreenAlgorithms(pue=1.5).fit(flat(10, 50, util=50.0), plan=plan).predict()
    assert est.energy_j == pytest.approx((350 * 0.5 + GA_MEMORY_W_PER_GB * 24) * 1000 * 1.5)
    assert GA_MEMORY_W_PER_GB == 0.3725


def test_green_algorithms_without_utilisation_assumes_full_use() -> None:
    plan = RunPlan(total_duration_s=100.0, gpu_model="Tesla T4")
    est = GreenAlgorithms().fit(flat(10, 50), plan=plan).predict()
    assert est.energy_j == pytest.approx((70 + GA_MEMORY_W_PER_GB * 16) * 100)


def test_green_algorithms_refuses_a_pue_below_one() -> None:
    with pytest.raises(BadInputError, match="PUE must be >= 1; found 0.5"):
        GreenAlgorithms(pue=0.5).fit(flat(10, 50), plan=PLAN)


def test_flops_baseline() -> None:
    plan = RunPlan(
        planned_epochs=10,
        gpu_model="Tesla T4",
        gflops_forward=1.0,
        training_size=1000,
        validation_size=0,
    )
    est = Flops(utilisation=0.5).fit(flat(10, 50), plan=plan).predict()
    seconds = 1e9 * 3 * 1000 * 10 / (8.141e12 * 0.5)
    assert est.energy_j == pytest.approx(seconds * 70)


def test_flops_baseline_names_what_is_missing() -> None:
    with pytest.raises(BadInputError, match=r"missing \['gflops_forward', 'training_size'\]"):
        Flops().fit(flat(10, 50), plan=RunPlan(planned_epochs=3, gpu_model="Tesla T4"))


def test_carbontracker_multiplies_the_first_epoch() -> None:
    # one epoch is 1000 s / 10 = 100 s; the first one at 100 W holds 10 kJ
    est = Carbontracker().fit(flat(150, 100), plan=PLAN).predict()
    assert est.energy_j == pytest.approx(10 * 100 * 100)


def test_carbontracker_before_the_first_epoch_ends_has_no_answer() -> None:
    est = Carbontracker().fit(flat(50, 100), plan=PLAN).predict()
    assert est.energy_j is None
    assert "needs 1 finished epoch(s); found 0" in est.reason


def test_carbontracker_with_epoch_marks() -> None:
    samples = flat(40, 100).with_columns(run_id=pl.lit("r"))
    epochs = pl.DataFrame(
        {"run_id": ["r", "r"], "epoch": [1, 2], "start": [at(0), at(20)], "end": [at(20), at(40)]}
    )
    est = Carbontracker(epochs_before_pred=2).fit(samples, epochs, plan=PLAN).predict()
    assert est.energy_j == pytest.approx(2000 * 10)


def test_naive_is_mean_power_times_duration() -> None:
    samples = pl.DataFrame({"timestamp": [at(0), at(1), at(2)], "power_w": [100.0, 200.0, 100.0]})
    est = Naive().fit(samples, plan=PLAN).predict()
    assert est.energy_j == pytest.approx(150 * 1000)


def test_naive_without_samples_gives_none_not_nan() -> None:
    samples = pl.DataFrame(
        {"timestamp": [at(0)], "power_w": [None]}, schema_overrides={"power_w": pl.Float64}
    )
    est = Naive().fit(samples, plan=PLAN).predict()
    assert est.energy_j is None and "fewer than 2 power samples" in est.reason


def test_board_power_is_required_somewhere() -> None:
    with pytest.raises(BadInputError, match="needs the board power"):
        MLCO2().fit(flat(10, 50), plan=RunPlan(total_duration_s=10.0))


# ---------------------------------------------------------------- contract over every method

CONTRACT_PLAN = RunPlan(
    total_duration_s=1000.0,
    planned_epochs=10,
    gpu_model="Tesla T4",
    gflops_forward=1.0,
    training_size=100,
    validation_size=10,
)


@pytest.mark.parametrize("name", sorted(m for m in METHODS if m != "step-fluss"))
def test_estimator_contract(name: str) -> None:
    est = METHODS[name]()
    fitted_attrs = [a for a in vars(est) if a.endswith("_")] if hasattr(est, "__dict__") else []
    assert fitted_attrs == []  # nothing learned in __init__
    with pytest.raises(NotFittedError, match=type(est).__name__):
        est.predict()
    assert est.fit(flat(300, 70), plan=CONTRACT_PLAN) is est
    proj = est.predict()
    assert proj.method == est.name
    assert proj.energy_j is not None and proj.energy_j > 0


@pytest.mark.parametrize("cls", [MLCO2, GreenAlgorithms, Flops, Carbontracker, Naive, Step])
def test_init_takes_keyword_only_params_and_stores_them_unchanged(cls: type) -> None:
    sig = inspect.signature(cls.__init__)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    est = cls()
    for p in params:
        assert getattr(est, p.name) == p.default


# ---------------------------------------------------------------- never below what was measured


def test_a_run_past_its_plan_is_projected_at_what_was_measured() -> None:
    # 2000 s at 100 W were measured (200 kJ) of a run planned for 1000 s and 10 epochs.
    for est in (Naive(), Carbontracker(), MLCO2(), GreenAlgorithms()):
        proj = est.fit(flat(2000, 100), plan=PLAN).predict()
        assert proj.energy_j is not None and proj.energy_j >= proj.measured_j, est.name
    for est in (Naive(), Carbontracker()):  # 100 W x 1000 s = 100 kJ < 200 kJ measured
        proj = est.fit(flat(2000, 100), plan=PLAN).predict()
        assert proj.energy_j == pytest.approx(200_000), est.name
        assert proj.measured_j == pytest.approx(200_000)
        assert "below the 200000 J measured so far" in proj.reason, est.name
        assert "2000 s have run, more than the 1000 s planned" in proj.reason
        assert "more epochs ran than planned" in proj.reason


def test_carbontracker_with_more_epoch_marks_than_planned_says_so() -> None:
    samples = flat(60, 100).with_columns(run_id=pl.lit("r"))
    epochs = pl.DataFrame(
        {
            "run_id": ["r"] * 3,
            "epoch": [1, 2, 3],
            "start": [at(0), at(20), at(40)],
            "end": [at(20), at(40), at(60)],
        }
    )
    plan = RunPlan(planned_epochs=2)
    proj = Carbontracker().fit(samples, epochs, plan=plan).predict()
    assert proj.energy_j == pytest.approx(6000)  # not 2 x 2000 J
    assert "3 epochs have run, more than the 2 planned" in proj.reason


def test_flops_below_the_measured_energy_is_raised_to_it() -> None:
    plan = RunPlan(planned_epochs=10, gpu_model="Tesla T4", gflops_forward=1.0, training_size=100)
    proj = Flops().fit(flat(100, 70), plan=plan).predict()
    assert proj.energy_j == pytest.approx(7000)
    assert "flops's estimate of 86 J is below the 7000 J measured so far" in proj.reason


# ---------------------------------------------------------------- bench_step input checks


@pytest.fixture
def two_runs(shared_data: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    runs = pl.read_parquet(shared_data / "runs.parquet").filter(pl.col("has_trace")).head(2)
    traces = (
        pl.scan_parquet(shared_data / "traces.parquet")
        .filter(pl.col("run_id").is_in(runs["run_id"].to_list()))
        .collect()
    )
    return runs, traces


@pytest.mark.shared_data
def test_bench_step_leaves_out_a_run_with_null_epochs_or_duration_with_a_reason(
    two_runs: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    runs, traces = two_runs
    first, second = runs["run_id"].to_list()
    # A store holds null trained_epochs for a running or failed run.
    null_epochs = runs.with_columns(
        trained_epochs=pl.when(pl.col("run_id") == first).then(None).otherwise("trained_epochs")
    )
    pred = bench_step(null_epochs, traces, fraction=0.2, methods=["step", "naive"])
    assert pred.height == 4  # every (run, method) has a row
    left_out = pred.filter(pl.col("run_id") == first)
    assert left_out["predicted_energy_j"].is_null().all()
    assert left_out["true_energy_j"].is_not_null().all()
    assert all("runs.trained_epochs is null" in r for r in left_out["reason"])
    assert pred.filter(pl.col("run_id") == second)["predicted_energy_j"].is_not_null().all()

    null_duration = runs.with_columns(duration_s=pl.lit(None, pl.Float64))
    by_runs = bench_step(null_duration, traces, fraction=0.2, methods=["naive"], duration="runs")
    assert by_runs["predicted_energy_j"].is_null().all()
    assert all("runs.duration_s is null" in r for r in by_runs["reason"])
    # The trace's span does not need duration_s.
    by_trace = bench_step(null_duration, traces, fraction=0.2, methods=["naive"])
    assert by_trace["predicted_energy_j"].is_not_null().all()


@pytest.mark.shared_data
def test_bench_step_refuses_samples_without_a_time_or_run(
    two_runs: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    runs, traces = two_runs
    no_time = traces.with_columns(
        timestamp=pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise("timestamp")
    )
    with pytest.raises(BadInputError, match=r"traces.timestamp has 1 null\(s\)"):
        bench_step(runs, no_time, fraction=0.2, methods=["naive"])
    no_run = traces.with_columns(
        run_id=pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise("run_id")
    )
    with pytest.raises(BadInputError, match=r"traces.run_id has 1 null\(s\)"):
        bench_step(runs, no_run, fraction=0.2, methods=["naive"])


# ---------------------------------------------------------------- summarise


def test_summarise_reports_the_stable_bands_apart_from_the_wide_not_stable_ones() -> None:
    # As at F = 0.1 on the real traces: the stable runs' 90 % bands are narrow and
    # miss some truths; the not-stable runs' "lowest power seen .. power cap" bands
    # are wide and hold every truth, which lifts the coverage over all bands.
    true = 1_000_000.0
    stable = [True, True, True, True, False, False, False, False, False, False]
    pred_j = [1.01e6, 0.99e6, 1.05e6, 0.94e6, 1.1e6, 0.9e6, 1.2e6, 0.8e6, 1.0e6, None]
    half = [0.02, 0.02, 0.02, 0.02, 0.5, 0.5, 0.6, 0.6, 0.55, None]
    rows = [
        {
            "method": "step",
            "predicted_energy_j": p,
            "lower_j": None if p is None or h is None else p - h * true,
            "upper_j": None if p is None or h is None else p + h * true,
            "stable": s,
            "true_energy_j": true,
        }
        for p, h, s in zip(pred_j, half, stable, strict=True)
    ]
    rows.append(
        {
            "method": "naive",
            "predicted_energy_j": 1.1e6,
            "lower_j": None,
            "upper_j": None,
            "stable": None,
            "true_energy_j": true,
        }
    )
    t = pl.col("true_energy_j")
    pred = pl.DataFrame(rows).with_columns(
        ((pl.col("predicted_energy_j") - t).abs() / t * 100).alias("ape_pct"),
        ((pl.col("lower_j") <= t) & (t <= pl.col("upper_j"))).alias("covered"),
        ((pl.col("upper_j") - pl.col("lower_j")) / 2 / t * 100).alias("half_width_pct"),
    )
    s = {r["method"]: r for r in summarise(pred).iter_rows(named=True)}
    step = s["step"]
    # All 9 bands: the 2 missed are stable ones (1.05e6 +/- 2 %, 0.94e6 +/- 2 %).
    assert step["coverage"] == pytest.approx(7 / 9)
    assert step["median_half_width_pct"] == pytest.approx(50.0)
    assert step["stable_runs"] == 4
    assert step["stable_coverage"] == pytest.approx(2 / 4)
    assert step["stable_median_half_width_pct"] == pytest.approx(2.0)
    # A method without a stable flag has no stable figures, not zeros.
    naive = s["naive"]
    assert naive["stable_runs"] is None
    assert naive["stable_coverage"] is None
    assert naive["stable_median_half_width_pct"] is None


@pytest.mark.shared_data
def test_summarise_stable_figures_match_the_real_runs(
    two_runs: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    runs, traces = two_runs
    pred = bench_step(runs, traces, fraction=0.2, methods=["step"])
    row = summarise(pred).row(0, named=True)
    stable = pred.filter(pl.col("stable"))
    assert row["stable_runs"] == stable.height
    assert row["stable_coverage"] == stable["covered"].mean()
    assert row["stable_median_half_width_pct"] == stable["half_width_pct"].median()


# ---------------------------------------------------------------- bench step: bad traces


def _bench_files(tmp_path: Path, traces: pl.DataFrame) -> list[str]:
    """``wattwise bench step`` arguments for runs "a" and "b" and ``traces``, written to files."""
    runs = pl.DataFrame(
        {
            "run_id": ["a", "b"],
            "duration_s": [100.0, 100.0],
            "trained_epochs": [10, 10],
            "gpu_model": ["NVIDIA GeForce RTX 3090"] * 2,
        }
    )
    runs.write_parquet(tmp_path / "runs.parquet")
    traces.write_parquet(tmp_path / "traces.parquet")
    return [
        "bench",
        "step",
        "--runs",
        str(tmp_path / "runs.parquet"),
        "--traces",
        str(tmp_path / "traces.parquet"),
        "--observe-fraction",
        "0.5",
        "--methods",
        "naive,step",
    ]


def _two_traces() -> pl.DataFrame:
    """Runs "a" then "b": 101 samples each at 100 W, 1 s apart (rows 1-101 and 102-202)."""
    return pl.concat([flat(100, 100.0).with_columns(run_id=pl.lit(r)) for r in ("a", "b")])


def _power_at(traces: pl.DataFrame, row: int, value: float | None) -> pl.DataFrame:
    """``traces`` with ``power_w`` of 1-based ``row`` set to ``value``."""
    return traces.with_columns(
        power_w=pl.when(pl.int_range(pl.len()) == row - 1)
        .then(pl.lit(value, pl.Float64))
        .otherwise("power_w")
    )


@pytest.mark.parametrize(
    ("value", "shown"), [(float("nan"), "nan"), (float("inf"), "inf"), (-5.0, "-5.0")]
)
def test_bench_step_refuses_nan_inf_or_negative_power_naming_file_run_and_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float, shown: str
) -> None:
    from cluster.cli import main

    args = _bench_files(tmp_path, _power_at(_two_traces(), 130, value))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'traces.parquet'}, row 130, run 'b': " in err
    assert f"expected power_w to be a finite number >= 0 W; found {shown}" in err
    with pytest.raises(BadInputError, match="row 130, run 'b'"):
        bench_step(*_frames(tmp_path), fraction=0.5, methods=["naive"])


def _frames(tmp_path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(tmp_path / "runs.parquet"), pl.read_parquet(tmp_path / "traces.parquet")


def test_bench_step_refuses_a_repeated_timestamp_naming_file_run_and_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    traces = _two_traces()
    dup = pl.concat([traces[:120], traces[119:120], traces[120:]])  # rows 120 and 121
    assert main(_bench_files(tmp_path, dup)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'traces.parquet'}, row 121, run 'b': " in err
    assert "repeated timestamp 2024-01-01 00:00:18" in err and "(also at row 120)" in err


def test_bench_step_refuses_a_non_datetime_timestamp_or_non_numeric_power(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    traces = _two_traces()
    file = str(tmp_path / "traces.parquet")
    as_text = traces.with_columns(pl.col("timestamp").cast(pl.String))
    assert main(_bench_files(tmp_path, as_text)) == 2
    assert f"{file}, 'timestamp': expected a datetime column" in capsys.readouterr().err
    as_text = traces.with_columns(pl.col("power_w").cast(pl.String))
    assert main(_bench_files(tmp_path, as_text)) == 2
    assert f"{file}, 'power_w': expected numbers (W); found String" in capsys.readouterr().err


def test_bench_step_skips_null_power_and_sorts_an_unsorted_trace(tmp_path: Path) -> None:
    # Null power is a sample without a value (the real SEAA traces have some): skipped, as
    # in `wattwise energy`. Rows out of time order are put in order: the integral is the same.
    traces = _two_traces()
    whole = bench_step(*_frames_of(tmp_path, traces), fraction=0.5, methods=["naive"])
    assert whole["true_energy_j"].to_list() == pytest.approx([10_000.0, 10_000.0])
    with_null = bench_step(
        *_frames_of(tmp_path, _power_at(traces, 130, None)), fraction=0.5, methods=["naive"]
    )
    assert with_null["true_energy_j"].to_list() == pytest.approx([10_000.0, 10_000.0])
    shuffled = traces.sample(fraction=1.0, shuffle=True, seed=1)
    again = bench_step(*_frames_of(tmp_path, shuffled), fraction=0.5, methods=["naive", "step"])
    expected = bench_step(*_frames_of(tmp_path, traces), fraction=0.5, methods=["naive", "step"])
    assert again.equals(expected)


def _frames_of(tmp_path: Path, traces: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    _bench_files(tmp_path, traces)
    return _frames(tmp_path)
