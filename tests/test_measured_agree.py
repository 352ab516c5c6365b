"""One measured energy per stored run: `energy`, `estimate`, `report` and the aggregator agree.

The run's measured total is what ``wattwise energy --run`` totals: its epochs
and the time outside them (each device's power held for at most the gap
threshold past its last sample, longer holes counted 0 J and never bridged,
counters where present); a run still going has measured that up to the end of
its last finished epoch. Regression: STEP's trace integrator stopped at the last sample (the
held tail was lost), bridged gaps and ignored the counter; the report bridged
gaps; the aggregator stored the first-to-last-sample energy as the run's total.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from cluster.aggregator import Aggregator, align
from cluster.cli import main
from conftest import at
from estimators.report import projection_history
from estimators.step import RunPlan
from profiler.store import Store

PLANNED = 20
EPOCHS = 10
EPOCH_S = 24  # the last mark ends at 240 s
WATTS = 200.0


def samples(
    *,
    gap: bool = False,
    counter: bool = False,
    first_s: int = 0,
    last_s: int = 237,
    every_s: int = 1,
    outage_s: int = 20,
) -> pl.DataFrame:
    """One GPU at 200 W every ``every_s`` s from ``first_s`` to ``last_s``.

    With ``gap``, none in (100, 100 + ``outage_s``) s. With ``counter`` the
    samples also carry NVML's cumulative energy counter, which counts 210 J a
    second (spikes the 200 W readings miss).
    """
    times = [
        t for t in range(first_s, last_s + 1, every_s) if not (gap and 100 < t < 100 + outage_s)
    ]
    df = pl.DataFrame(
        {
            "run_id": "r",
            "node": "n",
            "device": "0",
            "timestamp": [at(t) for t in times],
            "power_w": [WATTS] * len(times),
            "source": "replay",
        }
    )
    if counter:
        df = df.with_columns(energy_j=pl.Series([1e6 + 210.0 * t for t in times]))
    return df


def marks() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": "r",
            "epoch": list(range(EPOCHS)),
            "start": [at(EPOCH_S * k) for k in range(EPOCHS)],
            "end": [at(EPOCH_S * (k + 1)) for k in range(EPOCHS)],
        }
    )


def stored(root: Path, smp: pl.DataFrame, status: str = "running") -> Store:
    store = Store(root)
    store.write_samples(smp)
    store.write_epochs(marks())
    store.write_runs(
        pl.DataFrame(
            {"run_id": ["r"], "status": [status], "planned_epochs": [PLANNED], "start": [at(0)]}
        )
    )
    return store


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(list(args)) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def energy_total(capsys: pytest.CaptureFixture[str], store: Store) -> tuple[float, float]:
    """``wattwise energy --run``'s epochs total and run total."""
    out = cli_json(capsys, "energy", "--run", "r", "--store", str(store.root), "--json")
    total = out["total"]
    return float(total["energy_j"]), float(total["run_energy_j"])  # type: ignore[index]


_COUNTER = 210.0 * 237 + WATTS * 3
CASES = {
    # (samples, the epochs' sum, measured to the last mark's end, the run's total)
    # last sample at 237 s, the last mark ends at 240 s: 3 s of held tail
    "tail": (dict(), 48_000.0, 48_000.0, 48_000.0),
    # and nothing between 100 s and 120 s: a 20 s gap of 0 J, not bridged
    "gap": (dict(gap=True), 44_000.0, 44_000.0, 44_000.0),
    # the counter's 210 J/s, where both samples have it; 200 W held over the 3 s tail
    "counter": (dict(counter=True), _COUNTER, _COUNTER, _COUNTER),
    # samples from -30 s (before the first mark) to 260 s (after the last) count too
    "outside": (dict(first_s=-30, last_s=260), 48_000.0, WATTS * 270, WATTS * 290),
    # a sampler every 15 s (CodeCarbon's default) is integrated, not a run of gaps: its
    # threshold is 3 intervals (45 s), so the last sample at 225 s is held to 240 s
    "slow": (dict(every_s=15, last_s=237), 48_000.0, 48_000.0, 48_000.0),
    # and a hole in it (no samples from 105 s to 150 s: 75 s from 90 s to 165 s, 5
    # intervals) is still a gap of 0 J
    "slow gap": (dict(every_s=15, gap=True, outage_s=60), 33_000.0, 33_000.0, 33_000.0),
}


@pytest.mark.parametrize("status", ["running", "finished"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_measures_what_energy_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, status: str
) -> None:
    kwargs, epochs_j, to_last_end, run_j = CASES[case]
    store = stored(tmp_path / "st", samples(**kwargs), status)
    assert energy_total(capsys, store) == pytest.approx((epochs_j, run_j), rel=1e-12)
    est = cli_json(capsys, "estimate", "--run", "r", "--store", str(store.root), "--json")
    if status == "finished":
        assert est["measured_j"] == pytest.approx(run_j, rel=1e-12)
        assert est["energy_j"] == pytest.approx(run_j, rel=1e-12)
    else:
        # Measured up to the last finished epoch's end; STEP's projection starts from
        # there: 10 more epochs of 4,800 J (24 s at 200 W).
        assert est["measured_j"] == pytest.approx(to_last_end, rel=1e-12)
        assert est["energy_j"] == pytest.approx(to_last_end + 10 * 4_800.0, rel=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_reports_replay_ends_on_what_energy_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    kwargs, _, to_last_end, _ = CASES[case]
    store = stored(tmp_path / "st", samples(**kwargs))
    smp, ep = align(store.samples("r"), store.epochs("r"), store.run("r"))
    hist = projection_history(smp, ep, RunPlan(planned_epochs=PLANNED))
    assert hist.height == EPOCHS
    assert hist["measured_j"][-1] == pytest.approx(to_last_end, rel=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_aggregators_stored_total_is_what_energy_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    kwargs, epochs_j, _, run_j = CASES[case]
    store = Store(tmp_path / "agg")
    agg = Aggregator(store)  # the plain class, no Ray
    agg.start_run({"run_id": "r", "planned_epochs": PLANNED})
    agg.ingest_epochs(marks())
    agg.ingest_samples(samples(**kwargs))
    summary = agg.finish_run("r")
    assert energy_total(capsys, store) == pytest.approx((epochs_j, run_j), rel=1e-12)
    assert store.run("r")["energy_j"] == pytest.approx(run_j, rel=1e-12)
    assert summary["measured_energy_j"] == pytest.approx(run_j, rel=1e-12)
    assert summary["projection"]["energy_j"] == pytest.approx(run_j, rel=1e-12)
    assert agg.epochs("r")["energy_j"].sum() == pytest.approx(epochs_j, rel=1e-12)


@pytest.mark.parametrize("status", ["running", "finished"])
def test_without_epoch_marks_estimate_measures_what_energy_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: str
) -> None:
    """Time mode (no marks, the run's duration known): first to last sample, the gap 0 J."""
    store = Store(tmp_path / "st")
    store.write_samples(samples(gap=True))
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": ["r"],
                "status": [status],
                "planned_epochs": [PLANNED],
                "duration_s": [480.0],
                "start": [at(0)],
            }
        )
    )
    total, run_j = energy_total(capsys, store)
    assert total == run_j == pytest.approx(WATTS * (237 - 20), rel=1e-12)
    est = cli_json(capsys, "estimate", "--run", "r", "--store", str(store.root), "--json")
    assert est["measured_j"] == pytest.approx(total, rel=1e-12)


def test_the_reports_replay_without_marks_does_not_bridge_a_gap() -> None:
    """Regression: in time mode the replay refitted on Trace prefixes, so its measured
    energy bridged the 20 s hole (43,200 J at 216 s) while `estimate` had 39,200 J."""
    smp = samples(gap=True)
    plan = RunPlan(planned_epochs=PLANNED, total_duration_s=480.0)
    hist = projection_history(smp, None, plan)
    assert hist["t_s"][-1] == pytest.approx(216.0)
    assert hist["measured_j"][-1] == pytest.approx(WATTS * (216 - 20), rel=1e-12)


def test_energy_file_mode_does_not_claim_a_run_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: file mode printed run_energy_j = the epochs' sum and outside_epochs_j = 0
    for samples outside the epochs; it sees epochs only, so it claims no run total."""
    s, e = tmp_path / "s.parquet", tmp_path / "e.parquet"
    samples(first_s=-30, last_s=260).write_parquet(s)
    marks().write_parquet(e)
    out = cli_json(capsys, "energy", "--samples", str(s), "--epochs", str(e), "--json")
    total = out["total"]
    assert total["energy_j"] == pytest.approx(48_000.0)  # type: ignore[index]
    assert "run_energy_j" not in total and "outside_epochs_j" not in total  # type: ignore[operator]


def test_marks_with_string_times_get_a_clear_error() -> None:
    """Regression: the measured total ran before the marks were checked (AttributeError)."""
    from estimators.step import Step
    from profiler.errors import BadInputError

    bad = marks().with_columns(pl.col("start").cast(pl.String), pl.col("end").cast(pl.String))
    with pytest.raises(BadInputError, match="'start': expected a datetime column"):
        Step().fit(samples(), bad, plan=RunPlan(planned_epochs=PLANNED))


def test_a_slow_sampler_streamed_to_the_aggregator_is_integrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 15 s sampler's samples arriving with the epochs are integrated live, not counted as gaps.

    The aggregator learns a stream's rhythm from its first intervals (3 at
    least): the first epoch (24 s, two intervals in) is counted before that, so
    the run is recomputed from the store when it finishes, and its stored
    epochs and total are ``wattwise energy``'s. Regression: with a fixed 5 s
    threshold every 15 s interval was a gap (1,000 J of held edges for 48,000 J).
    """
    smp = samples(every_s=15)
    mk = marks()
    store = Store(tmp_path / "agg")
    agg = Aggregator(store, retain_s=30.0)  # a short window: early samples are folded away
    agg.start_run({"run_id": "r", "planned_epochs": PLANNED})
    t_s = (smp["timestamp"] - smp["timestamp"][0]).dt.total_seconds().to_numpy()
    cut = -1.0
    for k in range(EPOCHS):  # each epoch's mark comes with the samples up to 15 s past it
        batch = (t_s > cut) & (t_s <= EPOCH_S * (k + 1) + 15)
        cut = EPOCH_S * (k + 1) + 15
        agg.ingest_samples(smp.filter(pl.Series(batch)))
        agg.ingest_epochs(mk[k : k + 1])
    live = agg.epochs("r")
    # The last epoch ends after the last sample: it finishes with the run.
    assert live.height == EPOCHS - 1
    # The first epoch finished before the rhythm was known: a gap, and said so (gap_s).
    assert (live["energy_j"][0], live["gap_s"][0]) == (0.0, 24.0)
    # Once the rhythm is known, every epoch is 24 s at 200 W.
    assert live["energy_j"][2:].to_list() == pytest.approx([4_800.0] * (EPOCHS - 3), rel=1e-12)
    assert live["gap_s"][2:].to_list() == [0.0] * (EPOCHS - 3)
    summary = agg.finish_run("r")
    assert energy_total(capsys, store) == pytest.approx((48_000.0, 48_000.0), rel=1e-12)
    assert store.run("r")["energy_j"] == pytest.approx(48_000.0, rel=1e-12)
    assert summary["measured_energy_j"] == pytest.approx(48_000.0, rel=1e-12)
    # Finished, the run is recomputed from the store: the first epoch too.
    assert agg.epochs("r")["energy_j"].to_list() == pytest.approx([4_800.0] * EPOCHS, rel=1e-12)


def _frame_at(times: list[int], device: str = "0", node: str = "n") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": "r",
            "node": node,
            "device": device,
            "timestamp": [at(t) for t in times],
            "power_w": [WATTS] * len(times),
            "source": "replay",
        }
    )


def test_estimate_uses_each_devices_own_threshold_not_a_pooled_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU at 1 Hz for 10 s, then every 3 s, with a 9 s hole (99 s to 108 s).

    Its own rhythm (its first 8 intervals) is 1 s: the hole is a gap for
    ``energy``. Regression: ``estimate`` and ``report`` pooled the median over the
    whole run (3 s, so a 9 s threshold) and bridged it: 48,000 J for 46,200 J.
    """
    times = list(range(10)) + [t for t in range(10, 241, 3) if not 100 < t < 108]
    store = stored(tmp_path / "st", _frame_at(times), "finished")
    _, run_j = energy_total(capsys, store)
    assert run_j == pytest.approx(46_200.0, rel=1e-12)
    est = cli_json(capsys, "estimate", "--run", "r", "--store", str(store.root), "--json")
    assert est["measured_j"] == pytest.approx(run_j, rel=1e-12)
    smp, ep = align(store.samples("r"), store.epochs("r"), store.run("r"))
    hist = projection_history(smp, ep, RunPlan(planned_epochs=PLANNED))
    assert hist["measured_j"][-1] == pytest.approx(run_j, rel=1e-12)


def test_a_very_slow_sampler_in_the_aggregator_keeps_its_first_intervals_across_pruning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sampler every 20 s, 5 s epochs, one sample per batch, a 10 s window.

    The window never holds 4 of its samples, so its rhythm must come from the
    first sample times the run keeps. Regression: the threshold was fixed at the
    5 s floor from the pruned window and every live epoch was 0 J for the whole
    run, with no recomputation at the end.
    """
    n, epoch_s = 40, 5
    times = list(range(0, n * epoch_s + 20, 20))
    smp = _frame_at(times)
    mk = pl.DataFrame(
        {
            "run_id": "r",
            "epoch": list(range(n)),
            "start": [at(epoch_s * k) for k in range(n)],
            "end": [at(epoch_s * (k + 1)) for k in range(n)],
        }
    )
    store = Store(tmp_path / "agg")
    agg = Aggregator(store, retain_s=10.0)
    agg.start_run({"run_id": "r", "planned_epochs": 2 * n})
    k = 0
    for i, t in enumerate(times):
        agg.ingest_samples(smp[i : i + 1])
        while k < n and (k + 1) * epoch_s <= t:
            agg.ingest_epochs(mk[k : k + 1])
            k += 1
    live = agg.epochs("r")["energy_j"].to_list()
    # Before its 4th sample (60 s) the rhythm is unknown: those epochs are gaps; after
    # it every epoch is 5 s at 200 W.
    assert live[:8] == [0.0] * 8
    assert live[12:] == pytest.approx([1_000.0] * (n - 12), rel=1e-12)
    summary = agg.finish_run("r")
    assert energy_total(capsys, store)[1] == pytest.approx(40_000.0, rel=1e-12)
    assert summary["measured_energy_j"] == pytest.approx(40_000.0, rel=1e-12)
    assert agg.epochs("r")["energy_j"].to_list() == pytest.approx([1_000.0] * n, rel=1e-12)
