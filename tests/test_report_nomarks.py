"""``wattwise report`` on a run without epoch marks: an ended run's report shows its measured total.

Found in review: ``report`` on a finished run without marks (an imported
nvidia-smi log) refused with exit 2 and asked for ``--planned-epochs``, while
``estimate`` on the same run gave its measured total. A run that has ended has
its energy measured; only a running run needs a plan to be reported on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.cli import main
from conftest import at
from profiler.store import Store

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seaa2023"

#: 200 samples at 100 W, 1 s apart: 199 trapezoids of 100 J.
N = 200
TOTAL_KJ = "19.9 kJ"
#: Why an ended run's report without marks has no per-epoch table or STEP replay.
NO_MARKS_NOTE = (
    "no epoch marks: per-epoch energy and STEP need marks from EpochHooks or `wattwise run`"
)


def _store_without_marks(root: Path, status: str, **record: Any) -> list[str]:
    """Run "r1": ``N`` samples at 100 W, 1 s apart, no epoch marks; its CLI arguments."""
    store = Store(root)
    store.write_samples(
        pl.DataFrame(
            {
                "run_id": "r1",
                "node": "n1",
                "device": "0",
                "timestamp": [at(i) for i in range(N)],
                "power_w": [100.0] * N,
                "source": "replay",
            }
        )
    )
    row = {"run_id": ["r1"], "status": [status], "start": [at(0)]}
    store.write_runs(pl.DataFrame(row | {k: [v] for k, v in record.items()}))
    return ["--run", "r1", "--store", str(root)]


def _estimate_kj(run: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``estimate --json``'s energy of the run, as the report prints it."""
    capsys.readouterr()
    assert main(["estimate", *run, "--json"]) == 0
    return f"{json.loads(capsys.readouterr().out)['energy_j'] / 1e3:,.1f} kJ"


@pytest.mark.parametrize("status", ["finished", "failed"])
def test_report_on_an_ended_run_without_marks_shows_its_measured_total(
    status: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _store_without_marks(tmp_path / "s", status)
    out = tmp_path / "r.html"
    assert main(["report", *run, "--out", str(out)]) == 0, capsys.readouterr().err
    page = out.read_text()
    assert f"Measured total: <b>{TOTAL_KJ}</b>" in page
    assert f"(run {status})" in page
    assert NO_MARKS_NOTE in page
    # No replay without marks or a plan: no projection table, no "last projection".
    assert "<table" not in page and "Last projection" not in page


def test_report_total_is_estimates_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _store_without_marks(tmp_path / "s", "finished")
    assert _estimate_kj(run, capsys) == TOTAL_KJ
    out = tmp_path / "r.png"
    assert main(["report", *run, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_on_a_running_run_without_marks_still_asks_for_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _store_without_marks(tmp_path / "s", "running")
    out = tmp_path / "r.html"
    assert main(["report", *run, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no epoch marks" in err and "give --planned-epochs N" in err, err
    assert not out.exists()


def test_report_with_a_plan_still_replays_step_in_time_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a duration and planned epochs the time-mode replay is kept (10 units of 19.9 s)."""
    run = _store_without_marks(tmp_path / "s", "finished", duration_s=199.0)
    out = tmp_path / "r.html"
    assert main(["report", *run, "--out", str(out), "--planned-epochs", "10"]) == 0
    page = out.read_text()
    assert page.count("<tr>") == 1 + 10 and "Last projection" in page
    assert f"Final measured total: <b>{TOTAL_KJ}</b>" in page
    assert NO_MARKS_NOTE not in page


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real traces not found at {DATA}")
def test_report_on_an_imported_nvidia_smi_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real 44-min RTX 3090 log: finished, no epochs, no marks; report and estimate agree."""
    store = tmp_path / "s"
    csv = DATA / "nvidia-smi-cloud-mobilenet_v2-00.csv"
    assert main(["import", "nvidia-smi", str(csv), "--store", str(store)]) == 0
    run = ["--run", "cloud-mobilenet_v2-00", "--store", str(store)]
    total = _estimate_kj(run, capsys)
    assert total == "417.2 kJ"  # as `import` printed it; the authors' gpu_energy_j: 415.2 kJ
    out = tmp_path / "r.html"
    assert main(["report", *run, "--out", str(out)]) == 0, capsys.readouterr().err
    assert f"Measured total: <b>{total}</b>" in out.read_text()


def test_estimate_on_a_failed_run_without_marks_gives_its_measured_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: report gave a failed run's measured total, estimate refused the run."""
    run = _store_without_marks(tmp_path / "s", "failed")
    assert _estimate_kj(run, capsys) == TOTAL_KJ
    assert main(["estimate", *run]) == 0
    assert "measured total (run failed)" in capsys.readouterr().out
