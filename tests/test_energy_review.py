"""Review regressions: a device that measured nothing, 0 s epochs, files without samples."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from cluster.cli import main
from conftest import at
from estimators.energy import epoch_energy, run_energy
from profiler.errors import BadInputError
from profiler.hooks import EpochHooks
from profiler.store import Store


def gpus(second: list[float | None], *, n: int = 100, run: str = "r") -> pl.DataFrame:
    """GPU 0 at 100 W every second for ``n`` s; GPU 1 reads ``second`` (None: ``[N/A]``)."""
    first = pl.DataFrame(
        {
            "run_id": run,
            "node": "n",
            "device": "0",
            "timestamp": [at(i) for i in range(n)],
            "power_w": [100.0] * n,
        }
    )
    other = first.with_columns(device=pl.lit("1"), power_w=pl.Series(second, dtype=pl.Float64))
    return pl.concat([first, other])


def marks(*bounds: tuple[float, float], run: str = "r") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": run,
            "epoch": list(range(len(bounds))),
            "start": [at(a) for a, _ in bounds],
            "end": [at(b) for _, b in bounds],
        }
    )


# ---------------------------------------------------------------- a device that measured nothing


def test_a_device_without_any_value_is_a_gap_not_dropped() -> None:
    """Regression: a GPU whose every reading was [N/A] vanished (devices 1, no gap, no skip)."""
    dead = gpus([None] * 100)
    per = epoch_energy(dead, marks((0, 99)))
    row = per.row(0, named=True)
    assert row["energy_j"] == pytest.approx(9_900.0)  # GPU 0 alone: unchanged
    assert (row["devices"], row["n_skipped"]) == (2, 100)
    assert row["gap_s"] == pytest.approx(99.0)  # GPU 1 measured none of the epoch
    assert row["method"] == "power"
    whole = run_energy(dead).row(0, named=True)
    assert whole["energy_j"] == pytest.approx(9_900.0)
    assert (whole["devices"], whole["n_skipped"]) == (2, 100)
    assert whole["gap_s"] == pytest.approx(99.0)
    # As a device with three readings reports the rest of the epoch as gap.
    few = epoch_energy(gpus([100.0] * 3 + [None] * 97), marks((0, 99))).row(0, named=True)
    assert (few["devices"], few["n_skipped"], few["gap_s"]) == (2, 97, pytest.approx(92.0))


def test_a_device_with_an_all_null_counter_too_is_a_gap() -> None:
    dead = gpus([None] * 100).with_columns(energy_j=pl.lit(None, dtype=pl.Float64))
    row = epoch_energy(dead, marks((10, 30))).row(0, named=True)
    assert (row["devices"], row["n_skipped"], row["gap_s"]) == (2, 100, pytest.approx(20.0))


def test_a_run_whose_only_device_measured_nothing_is_all_gap() -> None:
    dead = gpus([None] * 5, n=5).filter(pl.col("device") == "1")
    row = epoch_energy(dead, marks((0, 4))).row(0, named=True)
    assert row["energy_j"] == 0.0
    assert (row["devices"], row["n_skipped"], row["method"]) == (1, 5, "none")
    assert row["gap_s"] == pytest.approx(4.0)
    # No row when nothing of the run has a value (importers rely on it).
    assert run_energy(dead).height == 0


def test_energy_files_warn_about_a_device_that_measured_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s, e = tmp_path / "s.parquet", tmp_path / "e.parquet"
    gpus([None] * 100).write_parquet(s)
    marks((0, 99)).write_parquet(e)
    assert main(["energy", "--samples", str(s), "--epochs", str(e), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["rows"][0]["devices"], doc["total"]["n_skipped"]) == (2, 100)
    assert doc["total"]["gap_s"] == pytest.approx(99.0)
    assert main(["energy", "--samples", str(s), "--epochs", str(e)]) == 0
    out = capsys.readouterr().out
    assert "99.0 s had no measurement" in out
    assert "100 samples had neither power nor a counter" in out


def test_energy_run_counts_a_device_that_measured_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path / "st")
    store.write_samples(gpus([None] * 100).with_columns(source=pl.lit("nvml")))
    store.write_runs(pl.DataFrame({"run_id": ["r"], "status": ["finished"]}))
    args = ["energy", "--run", "r", "--store", str(store.root), "--json"]
    # Without marks: the whole run.
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert (row["devices"], row["n_skipped"], row["gap_s"]) == (2, 100, pytest.approx(99.0))
    store.write_epochs(marks((0, 50), (50, 99)))
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["devices"] for r in doc["rows"]] == [2, 2]
    assert [r["gap_s"] for r in doc["rows"]] == pytest.approx([50.0, 49.0])
    assert doc["total"]["energy_j"] == pytest.approx(9_900.0)


# ----------------------------------------------------------------------------- 0 s epochs


def flat(n: int = 120) -> pl.DataFrame:
    return pl.DataFrame(
        {"run_id": "r", "timestamp": [at(i) for i in range(n)], "power_w": [200.0] * n}
    )


def test_a_zero_length_epoch_is_0_s_and_0_j() -> None:
    """Regression: end == start (which the store accepts) refused the whole run."""
    per = epoch_energy(flat(10), marks((0, 5), (5, 5), (5, 9)))
    assert per["epoch"].to_list() == [0, 1, 2]
    assert per["energy_j"].to_list() == pytest.approx([1_000.0, 0.0, 800.0])
    assert per["duration_s"].to_list() == pytest.approx([5.0, 0.0, 4.0])
    assert per["mean_power_w"].to_list() == [pytest.approx(200.0), None, pytest.approx(200.0)]
    assert per["gap_s"].to_list() == [0.0, 0.0, 0.0]
    assert per["n_samples"].to_list() == [5, 0, 4]


def test_a_zero_length_epoch_on_the_next_ones_start_is_no_overlap_in_any_order() -> None:
    m = marks((0, 5), (5, 5), (5, 9))
    for order in ([2, 1, 0], [0, 2, 1], [1, 2, 0]):
        per = epoch_energy(flat(10), m[order])
        assert per["epoch"].to_list() == [0, 1, 2]
    # Inside another epoch it overlaps it.
    with pytest.raises(BadInputError, match="epoch 1 starts at .* before the previous epoch ends"):
        epoch_energy(flat(10), marks((0, 5), (3, 3)))


def test_an_epoch_ending_before_it_starts_is_still_refused() -> None:
    with pytest.raises(BadInputError, match=r"row 2, run 'r' epoch 1: expected end >= start"):
        epoch_energy(flat(10), marks((0, 5), (6, 5)))


def hooked_store(root: Path) -> Store:
    """A running run whose hooks marked epoch 2 with nothing to do (start == end).

    Epochs of 20 s at 200 W (4,000 J) from 0 s to 100 s, samples to 119 s,
    12 epochs planned.
    """
    store = Store(root)
    store.write_samples(
        flat().with_columns(node=pl.lit("n"), device=pl.lit("0"), source=pl.lit("nvml"))
    )
    store.write_runs(
        pl.DataFrame(
            {"run_id": ["r"], "status": ["running"], "planned_epochs": [12], "start": [at(0)]}
        )
    )
    times: Iterator[float] = iter([0, 20, 20, 40, 40, 40, 40, 60, 60, 80, 80, 100])
    hooks = EpochHooks("r", store=store, clock=lambda: at(next(times)))
    for _ in range(6):
        with hooks.epoch():  # a resumed loop skips epoch 2, which its checkpoint had done
            pass
    hooks.close()
    assert store.epochs("r")["epoch"].to_list() == [0, 1, 2, 3, 4, 5]
    return store


def test_energy_and_estimate_read_a_run_with_a_zero_length_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = hooked_store(tmp_path / "st")
    run = ["--run", "r", "--store", str(store.root), "--json"]
    assert main(["energy", *run]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["rows"]
    assert [r["duration_s"] for r in rows] == pytest.approx([20.0, 20.0, 0.0, 20.0, 20.0, 20.0])
    assert [r["energy_j"] for r in rows] == pytest.approx([4e3, 4e3, 0.0, 4e3, 4e3, 4e3])
    assert rows[2]["mean_power_w"] is None
    assert doc["total"]["energy_j"] == pytest.approx(20_000.0)
    assert main(["energy", *run[:-1]]) == 0  # the table shows it too
    table = capsys.readouterr().out
    assert re.search(r"│\s+2 │ 2024-01-01 00:00:40 │\s+0.0 │\s+0.000 │\s+- │", table)
    assert main(["estimate", *run]) == 0
    est = json.loads(capsys.readouterr().out)
    # Measured to the last mark (100 s: 20,000 J), then 6 more epochs of 4,000 J: the
    # 0 s epoch counts as done but stays out of the mean (it would pull it to 3,333 J).
    assert est["measured_j"] == pytest.approx(20_000.0)
    assert est["energy_j"] == pytest.approx(20_000.0 + 6 * 4_000.0, rel=1e-9)
    assert "epoch 2" in est["reason"]
    # The report replays the epochs through OnlineStep, which refused a 0 s epoch.
    out = tmp_path / "r.png"
    assert main(["report", "--run", "r", "--store", str(store.root), "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_online_step_leaves_a_0_s_epoch_out_of_the_mean() -> None:
    from estimators.step import OnlineStep

    online = OnlineStep(planned_epochs=12)
    for i in range(6):
        proj = online.update(0.0, 0.0) if i == 2 else online.update(4_000.0, 20.0)
    assert proj.measured_j == pytest.approx(20_000.0)
    assert proj.energy_j == pytest.approx(20_000.0 + 6 * 4_000.0)
    assert "epoch 2 left out of the stable mean: 0 s long" in proj.reason


def test_online_step_past_its_planned_epochs_is_not_called_final() -> None:
    """A run past its plan (a second phase numbering on) was projected at its measured
    energy with a zero-width band: 'finished' while it kept drawing power."""
    from estimators.step import OnlineStep

    online = OnlineStep(planned_epochs=10)
    for _ in range(10):
        proj = online.update(4_000.0, 20.0)
    assert proj.energy_j == pytest.approx(40_000.0) and proj.remaining_epochs == 0
    proj = online.update(4_000.0, 20.0)
    assert proj.energy_j is None and proj.upper_j is None
    assert "the run has finished 11 epochs, more than the 10 planned" in proj.reason


def test_step_projects_from_the_devices_that_have_power() -> None:
    """A device with no power reading at all (dead, or counter-only) is a gap for
    ``energy``; STEP leaves it out rather than leaving every epoch out of its mean."""
    from estimators.step import RunPlan, Step

    samples = gpus([None] * 260, n=260)
    epochs = marks(*[(20 * i, 20 * i + 20) for i in range(12)])
    proj = Step().fit(samples, epochs, plan=RunPlan(planned_epochs=20)).predict()
    assert proj.stable and proj.energy_per_epoch_j == pytest.approx(2_000.0, rel=0.01)
    assert proj.energy_j == pytest.approx(20 * 2_000.0, rel=0.01)


# ----------------------------------------------------------------- file mode without samples


def write(tmp_path: Path, samples: pl.DataFrame, epochs: pl.DataFrame) -> list[str]:
    s, e = tmp_path / "s.parquet", tmp_path / "e.parquet"
    samples.write_parquet(s)
    epochs.write_parquet(e)
    return ["energy", "--samples", str(s), "--epochs", str(e), "--json"]


@pytest.mark.parametrize(
    ("samples", "found"),
    [
        (flat(10).head(0), "found no samples"),
        (flat(10).with_columns(run_id=pl.lit("other")), "found samples of run(s) ['other']"),
    ],
    ids=["empty", "other run"],
)
def test_energy_files_without_samples_of_the_epochs_run_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], samples: pl.DataFrame, found: str
) -> None:
    """Regression: they gave 0 J and exit 0 (run mode refuses a run without samples)."""
    args = write(tmp_path, samples, marks((0, 5)))
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "s.parquet: no samples of run(s) ['r'] of the epoch marks in" in captured.err
    assert "e.parquet" in captured.err
    assert found in captured.err


def test_energy_files_name_only_the_runs_without_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    both = pl.concat([marks((0, 5)), marks((0, 5), run="b"), marks((0, 5), run="c")])
    assert main(write(tmp_path, flat(10), both)) == 2
    assert "no samples of run(s) ['b', 'c']" in capsys.readouterr().err


def test_energy_files_with_an_empty_epochs_file_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: an empty epochs file printed ``rows: []`` and exited 0."""
    assert main(write(tmp_path, flat(10), marks((0, 5)).head(0))) == 2
    err = capsys.readouterr().err
    assert "e.parquet: expected epoch marks (run_id, epoch, start, end); found no rows" in err


def test_energy_files_with_samples_over_part_of_the_epochs_report_the_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(write(tmp_path, flat(10), marks((0, 5), (20, 30)))) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["energy_j"] for r in rows] == pytest.approx([1_000.0, 0.0])
    assert [r["gap_s"] for r in rows] == pytest.approx([0.0, 10.0])
