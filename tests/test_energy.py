"""Per-epoch and per-run energy, checked against sums worked out by hand."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from conftest import at
from estimators.energy import epoch_energy, run_energy
from profiler.errors import BadInputError


def samples(power, *, times=None, counter=None, run="r", device="0", node="n"):
    times = list(range(len(power))) if times is None else times
    data = {
        "run_id": run,
        "node": node,
        "device": device,
        "timestamp": [at(t) for t in times],
        "power_w": pl.Series(power, dtype=pl.Float64),
    }
    if counter is not None:
        data["energy_j"] = pl.Series(counter, dtype=pl.Float64)
    return pl.DataFrame(data)


def epochs(*bounds, run="r"):
    return pl.DataFrame(
        {
            "run_id": run,
            "epoch": list(range(len(bounds))),
            "start": [at(a) for a, _ in bounds],
            "end": [at(b) for _, b in bounds],
        }
    )


def test_trapezoid_three_samples():
    # 100 W -> 200 W -> 200 W over 2 s: 150 J + 200 J.
    out = run_energy(samples([100, 200, 200]))
    assert out["energy_j"].item() == pytest.approx(350.0)
    assert out["duration_s"].item() == pytest.approx(2.0)
    assert out["mean_power_w"].item() == pytest.approx(175.0)
    assert out["method"].item() == "power"


def test_boundary_inside_a_rising_interval_is_split_exactly():
    # Power rises linearly 100 -> 200 W between t=0 and t=1; a mark at 0.5 s.
    # First half: 0.5 * (100 + 150) / 2 = 62.5 J; second half: 0.5 * (150 + 200) / 2 = 87.5 J.
    out = epoch_energy(samples([100, 200]), epochs((0, 0.5), (0.5, 1)))
    assert out["energy_j"].to_list() == pytest.approx([62.5, 87.5])
    assert out["mean_power_w"].to_list() == pytest.approx([125.0, 175.0])
    # Samples count where start <= t < end: the one at t=1 ends the last epoch.
    assert out["n_samples"].to_list() == [1, 0]


def test_epochs_add_up_to_the_run():
    rng = np.random.default_rng(0)
    power = list(rng.uniform(50, 300, 200))
    marks = [(0, 13.3), (13.3, 77.7), (80.0, 150.2), (150.2, 199)]
    per_epoch = epoch_energy(samples(power), epochs(*marks))
    whole = epoch_energy(samples(power), epochs((0, 199)))
    between = epoch_energy(samples(power), epochs((77.7, 80.0)))
    assert per_epoch["energy_j"].sum() + between["energy_j"].item() == pytest.approx(
        whole["energy_j"].item()
    )


def test_counter_deltas_win_over_power_and_resets_fall_back_to_power():
    # Counter says 10 J, then a reset (counter goes back to 0); power says 100 W.
    out = run_energy(samples([100, 100, 100], counter=[1000, 1010, 0]))
    # First interval: counter delta 10 J; second: reset -> trapezoid 100 J.
    assert out["energy_j"].item() == pytest.approx(110.0)
    assert out["method"].item() == "counter+power"


def test_counter_is_split_linearly_at_a_mark():
    out = epoch_energy(
        samples([None, None, None], counter=[0.0, 40.0, 100.0]), epochs((0, 0.25), (0.25, 2))
    )
    assert out["energy_j"].to_list() == pytest.approx([10.0, 90.0])


def test_gap_longer_than_threshold_is_reported_not_bridged():
    out = epoch_energy(
        samples([100, 100, 100, 100], times=[0, 1, 11, 12]), epochs((0, 12)), gap_threshold_s=5
    )
    assert out["energy_j"].item() == pytest.approx(200.0)  # 0-1 and 11-12 only
    assert out["gap_s"].item() == pytest.approx(10.0)


def test_a_counter_spans_a_gap_because_it_measured_it():
    out = run_energy(samples([100, 100], times=[0, 60], counter=[0, 6000]), gap_threshold_s=5)
    assert out["energy_j"].item() == pytest.approx(6000.0)
    assert out["gap_s"].item() == 0.0


def test_edges_hold_power_up_to_the_threshold_then_count_as_gap():
    s = samples([100, 100], times=[10, 11])
    out = epoch_energy(s, epochs((9.5, 11.5), (0, 9.5)), gap_threshold_s=5)
    by_epoch = {r["epoch"]: r for r in out.iter_rows(named=True)}
    # 0.5 s held before the first sample, 1 s measured, 0.5 s held after: 200 J.
    assert by_epoch[0]["energy_j"] == pytest.approx(200.0)
    assert by_epoch[0]["gap_s"] == 0.0
    # 0-9.5 s: power is held for 5 s back from the first sample (5-10 s), so 4.5 s of
    # this epoch are held (450 J) and 0-5 s are a gap.
    assert by_epoch[1]["energy_j"] == pytest.approx(450.0)
    assert by_epoch[1]["gap_s"] == pytest.approx(5.0)
    # Rows come ordered by run and start time.
    assert out["epoch"].to_list() == [1, 0]


def test_devices_and_nodes_add_up_per_epoch():
    a = samples([100, 100, 100], device="0")
    b = samples([50, 50, 50], device="1", node="other")
    out = epoch_energy(pl.concat([a, b]), epochs((0, 2)))
    assert out["energy_j"].item() == pytest.approx(300.0)
    assert out["devices"].item() == 2


def test_interleaved_devices_are_accepted():
    a = samples([100, 100, 100], device="0")
    b = samples([50, 50, 50], device="1")
    mixed = pl.concat([a, b]).sort("timestamp", "device")
    assert run_energy(mixed)["energy_j"].item() == pytest.approx(300.0)


def test_null_power_samples_are_skipped_and_counted():
    out = run_energy(samples([100, None, 100]))
    assert out["energy_j"].item() == pytest.approx(200.0)
    assert out["n_skipped"].item() == 1


def test_run_without_samples_is_all_gap():
    out = epoch_energy(samples([100, 100]), epochs((0, 5), run="other"))
    assert out["energy_j"].item() == 0.0
    assert out["gap_s"].item() == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (samples([100, -5, 100]), r"row 2, 'power_w': expected a finite number >= 0; found -5"),
        (samples([100, float("nan")]), r"row 2, 'power_w': expected a finite number >= 0"),
        (samples([1, 2, 3], times=[0, 2, 1]), r"row 3.*out-of-order timestamp"),
        (samples([1, 2, 3], times=[0, 1, 1]), r"row 3.*duplicated timestamp"),
        (samples([1, 2]).drop("power_w"), r"need column\(s\) \['power_w'\]"),
        (samples([1, 2]).with_columns(pl.col("power_w").cast(pl.String)), r"expected numbers"),
    ],
)
def test_bad_samples_are_refused_with_the_row(frame, match):
    with pytest.raises(BadInputError, match=match):
        epoch_energy(frame, epochs((0, 1)), samples_file="s.parquet")
    with pytest.raises(BadInputError, match="s.parquet"):
        epoch_energy(frame, epochs((0, 1)), samples_file="s.parquet")


@pytest.mark.parametrize(
    ("marks", "match"),
    [
        (epochs((0, 1), (2, 1)), r"row 2, run 'r' epoch 1: expected end >= start"),
        (epochs((0, 2), (1, 3)), r"epoch 1 starts at .* before the previous epoch ends"),
        (epochs((0, 1)).drop("end"), r"need column\(s\) \['end'\]"),
        (pl.concat([epochs((0, 1)), epochs((1, 2))]), r"epoch 0 appears more than once"),
    ],
)
def test_bad_epochs_are_refused(marks, match):
    with pytest.raises(BadInputError, match=match):
        epoch_energy(samples([1, 2, 3]), marks, epochs_file="e.parquet")


def test_power_and_counter_on_alternate_samples_are_not_gaps():
    # 100 W for 10 s; the counter (0, 200, ..., 1000 J) on even seconds, power on odd ones.
    # No interval has the same reading at both ends: each holds its one power.
    power = [None if i % 2 == 0 else 100.0 for i in range(11)]
    counter = [100.0 * i if i % 2 == 0 else None for i in range(11)]
    s = samples(power, counter=counter)
    run = run_energy(s)
    assert run["energy_j"].item() == pytest.approx(1000.0)
    assert run["gap_s"].item() == 0.0
    assert run["method"].item() == "power"
    # A mark inside a held interval splits it linearly; the epochs add up to the run.
    out = epoch_energy(s, epochs((0, 4.5), (4.5, 10)))
    assert out["energy_j"].to_list() == pytest.approx([450.0, 550.0])
    assert out["gap_s"].to_list() == [0.0, 0.0]


def test_one_lost_power_next_to_one_lost_counter_holds_the_power_left():
    # Counter and power on every sample, except: power lost at t=1, counter lost at t=2.
    # 0-1: counter 100 J; 1-2: only t=2 has power (150 W): held, 150 J;
    # 2-3: trapezoid (150 + 150) / 2 = 150 J; 3-4: counter 150 J.
    power = [100.0, None, 150.0, 150.0, 150.0]
    counter = [0.0, 100.0, None, 400.0, 550.0]
    out = run_energy(samples(power, counter=counter))
    assert out["energy_j"].item() == pytest.approx(550.0)
    assert out["gap_s"].item() == 0.0
    assert out["method"].item() == "counter+power"


def test_a_reset_with_power_on_one_side_holds_it():
    # 0-1: counter 10 J; 1-2: the counter goes back and t=2 has no power: 100 W held.
    out = run_energy(samples([100.0, 100.0, None], counter=[1000.0, 1010.0, 0.0]))
    assert out["energy_j"].item() == pytest.approx(110.0)
    assert out["gap_s"].item() == 0.0


def test_power_is_held_only_up_to_the_gap_threshold():
    # Power-only at t=0 and a counter-only sample 10 s later: nothing spans those 10 s.
    s = samples([100.0, None, 100.0], times=[0, 10, 11], counter=[None, 0.0, None])
    out = run_energy(s, gap_threshold_s=5)
    assert out["energy_j"].item() == pytest.approx(100.0)  # 10-11 s, held
    assert out["gap_s"].item() == pytest.approx(10.0)


def test_the_aggregator_integrates_mixed_readings_as_epoch_energy():
    """Live windows (cluster.aggregator) classify intervals as the whole stream does."""
    from cluster.aggregator import Aggregator
    from profiler.schema import UTC_US

    rng = np.random.default_rng(5)
    parts = []
    truth = 0.0
    for dev in ("0", "1"):
        t = np.cumsum(rng.uniform(0.8, 1.2, 90))
        t[50:] += 7.0  # one gap longer than the 5 s threshold
        w = rng.uniform(80.0, 250.0, len(t))
        cum = np.concatenate(([0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(t))))
        truth += cum[-1] - (cum[50] - cum[49])
        # Counter on even samples, power on odd ones. Device 1 has both up to sample 40,
        # with a counter reset at sample 30 whose power was lost.
        i = np.arange(len(t))
        counter = np.where(i % 2 == 0, cum, np.nan)
        power = np.where(i % 2 == 1, w, np.nan)
        if dev == "1":
            counter[:40], power[:40] = cum[:40], w[:40]
            counter[30:] -= cum[30]
            power[30] = np.nan
        frame = samples(power.tolist(), times=t.tolist(), counter=counter.tolist(), device=dev)
        parts.append(frame.with_columns(pl.col("power_w", "energy_j").fill_nan(None)))
    df = pl.concat(parts).sort("timestamp").with_columns(pl.lit("replay").alias("source"))
    df = df.with_columns(pl.col("timestamp").cast(UTC_US))
    spans = [(10.0 * k + 3.3, 10.0 * k + 13.3) for k in range(8)]
    mk = epochs(*spans).with_columns(pl.col("start", "end").cast(UTC_US))
    agg = Aggregator(None, retain_s=3.0, max_lag_s=20.0)
    agg.start_run({"run_id": "r", "planned_epochs": len(spans)})
    agg.ingest_epochs(mk, write=False)
    cuts = np.linspace(0, df.height, 9).astype(int).tolist()
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        agg.ingest_samples(df.slice(a, b - a), write=False)
    want = epoch_energy(df, mk)
    got = agg.epochs("r")
    assert got["epoch"].to_list() == list(range(len(spans)))
    assert got["energy_j"].to_list() == pytest.approx(want["energy_j"].to_list(), rel=1e-9)
    assert got["gap_s"].to_list() == pytest.approx(want["gap_s"].to_list(), abs=1e-9)
    # Held powers stand in for the missing trapezoids: close to the true energy, and
    # only the 7 s (+ one interval) stretch is a gap.
    run = run_energy(df)
    assert run["energy_j"].item() == pytest.approx(truth, rel=0.05)
    assert 7.8 < run["gap_s"].item() < 8.2


def test_a_streams_threshold_follows_its_own_sampler() -> None:
    """max(floor, 3 x the median of the first 8 intervals); the floor below 3 intervals."""
    from estimators.energy import stream_threshold

    assert stream_threshold(np.arange(0.0, 100.0, 1.0), 5.0) == 5.0  # 1 Hz: the floor
    assert stream_threshold(np.arange(0.0, 300.0, 15.0), 5.0) == 45.0  # every 15 s
    # An outage among the first intervals does not move the median, nor one later.
    t = np.concatenate(([0.0, 1.0, 2.0, 60.0], np.arange(61.0, 100.0), [500.0]))
    assert stream_threshold(t, 5.0) == 5.0
    # Two intervals say nothing of a rhythm: a 60 s hole stays a gap.
    assert stream_threshold(np.array([0.0, 60.0, 120.0]), 5.0) == 5.0
    # An explicit threshold is a floor.
    assert stream_threshold(np.arange(0.0, 300.0, 15.0), 100.0) == 100.0
