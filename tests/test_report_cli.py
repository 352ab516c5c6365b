"""``wattwise report`` and ``wattwise estimate`` on a stored run: options, output file, clocks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from cluster.cli import main
from conftest import at
from profiler.store import Store

#: Seconds node B's clock runs ahead of node A's (the run's home, whose clock the marks use).
AHEAD_S = 5.0
EPOCHS = 12
EPOCH_S = 10


def power(i: int) -> float:
    """100 W and 300 W in turns of 10 s: each node's power at its i-th second."""
    return 100.0 if (i // 10) % 2 == 0 else 300.0


def two_node_run(root: Path, *, shift: bool = True) -> Store:
    """A running two-node run at 1 Hz; node B stamps with a clock ``AHEAD_S`` ahead.

    Both nodes' samples cover every epoch, first mark to last, on the home
    clock; the run's config holds B's shift as the aggregator records it.
    """
    store = Store(root)
    n = EPOCHS * EPOCH_S + 1
    for node, ahead in (("A", 0.0), ("B", AHEAD_S)):
        store.write_samples(
            pl.DataFrame(
                {
                    "run_id": "r",
                    "node": node,
                    "device": "0",
                    "timestamp": [at(i + ahead) for i in range(n)],
                    "power_w": [power(i) for i in range(n)],
                    "source": "replay",
                }
            )
        )
    store.write_epochs(
        pl.DataFrame(
            {
                "run_id": "r",
                "epoch": list(range(EPOCHS)),
                "start": [at(EPOCH_S * k) for k in range(EPOCHS)],
                "end": [at(EPOCH_S * (k + 1)) for k in range(EPOCHS)],
            }
        )
    )
    clock = {"home": "A", "marks_node": "A", "shift_s": {"B": -AHEAD_S if shift else 0.0}}
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": ["r"],
                "status": ["running"],
                "planned_epochs": [30],
                "start": [at(0)],
                "config": [json.dumps({"clock_home": "A", "clock": clock})],
            }
        )
    )
    return store


def measured_per_node_j() -> float:
    """Trapezoid energy of one node's samples from the first mark to the last."""
    p = [power(i) for i in range(EPOCHS * EPOCH_S + 1)]
    return sum((a + b) / 2 for a, b in zip(p, p[1:], strict=False))


def test_energy_estimate_and_report_agree_on_a_run_with_a_clock_shift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: estimate and report read the store's raw node timestamps, ignoring the
    run's clock shifts that energy applies: three totals (48,200 / 46,400 / 47.2 kJ)."""
    store = two_node_run(tmp_path / "st")
    run = ["--run", "r", "--store", str(store.root)]
    truth = 2 * measured_per_node_j()

    assert main(["energy", *run, "--json"]) == 0
    energy = json.loads(capsys.readouterr().out)["total"]["energy_j"]
    assert main(["estimate", *run, "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)["measured_j"]
    out = tmp_path / "r.html"
    assert main(["report", *run, "--out", str(out)]) == 0
    last_row = re.findall(r"<tr>(<td>.*?)</tr>", out.read_text())[-1]
    cells = re.findall(r"<td>(.*?)</td>", last_row)
    report_kj = float(cells[5].replace(",", ""))  # measured_j, in kJ to 0.1

    assert energy == pytest.approx(truth)
    assert estimate == pytest.approx(truth)
    assert report_kj == pytest.approx(truth / 1e3, abs=0.05)


def test_without_a_recorded_shift_the_clocks_are_taken_as_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shift comes from the run's config: a zero shift leaves B's samples 5 s late."""
    store = two_node_run(tmp_path / "st", shift=False)
    run = ["--run", "r", "--store", str(store.root)]
    assert main(["energy", *run, "--json"]) == 0
    energy = json.loads(capsys.readouterr().out)["total"]["energy_j"]
    assert main(["estimate", *run, "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)["measured_j"]
    assert energy != pytest.approx(2 * measured_per_node_j())
    assert estimate != pytest.approx(2 * measured_per_node_j())


@pytest.mark.parametrize("command", ["report", "estimate"])
@pytest.mark.parametrize(
    ("option", "match"),
    [
        (["--confidence", "5"], r"--confidence must be in \(0, 1\); found 5.0"),
        (["--confidence", "nan"], r"--confidence must be in \(0, 1\); found nan"),
        (["--confidence", "0"], r"--confidence must be in \(0, 1\); found 0.0"),
        (["--planned-epochs", "-3"], r"--planned-epochs must be at least 1; found -3"),
        (["--planned-epochs", "0"], r"--planned-epochs must be at least 1; found 0"),
    ],
)
def test_bad_numbers_exit_2_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    option: list[str],
    match: str,
) -> None:
    """Regression: report took --confidence 5 (a '500% band nan .. nan kJ'), both took
    --planned-epochs -3 (0 epochs remaining) and ignored --planned-epochs 0."""
    store = two_node_run(tmp_path / "st")
    out = tmp_path / "r.html"
    extra = ["--out", str(out)] if command == "report" else ["--json"]
    assert main([command, "--run", "r", "--store", str(store.root), *extra, *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(match, err)
    assert not out.exists()


def test_planned_epochs_option_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = two_node_run(tmp_path / "st")
    run = ["estimate", "--run", "r", "--store", str(store.root), "--json"]
    assert main([*run, "--planned-epochs", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["remaining_epochs"] == 20 - EPOCHS
    assert main(run) == 0  # the run record's planned_epochs
    assert json.loads(capsys.readouterr().out)["remaining_epochs"] == 30 - EPOCHS


@pytest.mark.parametrize("suffix", [".html", ".png"])
def test_report_creates_a_missing_folder(tmp_path: Path, suffix: str) -> None:
    """Regression: --out in a folder that does not exist was a FileNotFoundError traceback;
    like every other --out (atomic_write_parquet) the folder is created."""
    store = two_node_run(tmp_path / "st")
    out = tmp_path / "new" / "deeper" / f"r{suffix}"
    assert main(["report", "--run", "r", "--store", str(store.root), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left


def test_report_replaces_the_file_whole(tmp_path: Path) -> None:
    """Regression: the report was rewritten in place, so a reader (or a failed write) saw a
    truncated or half-written file; it is now written aside and renamed over the old one."""
    store = two_node_run(tmp_path / "st")
    out = tmp_path / "r.html"
    old = "<html>old report</html>"
    out.write_text(old)
    with out.open() as reader:
        assert main(["report", "--run", "r", "--store", str(store.root), "--out", str(out)]) == 0
        assert reader.read() == old  # the old file is intact for whoever has it open
    assert "Last projection" in out.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_report_that_cannot_be_written_exits_2_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder at --out, or a file where its folder would be, is bad input (exit 2)."""
    store = two_node_run(tmp_path / "st")
    out = tmp_path / "r.html"
    out.mkdir()  # a folder in the way
    assert main(["report", "--run", "r", "--store", str(store.root), "--out", str(out)]) == 2
    assert "r.html: is a folder; expected a file name" in capsys.readouterr().err
    assert out.is_dir() and list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "st"]
    blocked = tmp_path / "st" / "runs.parquet" / "r.png"  # a file where the folder would be
    assert main(["report", "--run", "r", "--store", str(store.root), "--out", str(blocked)]) == 2
    assert "r.png: could not create its folder" in capsys.readouterr().err
