"""``wattwise energy`` and ``wattwise runs`` through the command line entry point."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from cluster.cli import main
from conftest import at
from profiler.store import Store


def write_files(tmp_path, power=(100.0, 200.0, 200.0, 100.0)):
    samples = pl.DataFrame(
        {
            "run_id": "r",
            "timestamp": [at(i) for i in range(len(power))],
            "power_w": list(power),
            "extra_column": 1,  # other columns are allowed in file mode
        }
    )
    epochs = pl.DataFrame(
        {"run_id": "r", "epoch": [1, 2], "start": [at(0), at(1.5)], "end": [at(1.5), at(3)]}
    )
    s, e = tmp_path / "s.parquet", tmp_path / "e.parquet"
    samples.write_parquet(s)
    epochs.write_parquet(e)
    return s, e


def test_file_mode_writes_one_row_per_epoch(tmp_path, capsys):
    s, e = write_files(tmp_path)
    out = tmp_path / "out.parquet"
    assert main(["energy", "--samples", str(s), "--epochs", str(e), "--out", str(out)]) == 0
    got = pl.read_parquet(out)
    assert got["epoch"].to_list() == [1, 2]
    assert got["energy_j"].to_list() == pytest.approx([250.0, 250.0])
    assert got["duration_s"].to_list() == pytest.approx([1.5, 1.5])
    assert got["mean_power_w"].to_list() == pytest.approx([250 / 1.5, 250 / 1.5])
    assert got["gap_s"].to_list() == [0.0, 0.0]
    assert "total" in capsys.readouterr().out


def test_file_mode_json(tmp_path, capsys):
    s, e = write_files(tmp_path)
    assert main(["energy", "--samples", str(s), "--epochs", str(e), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"]["energy_j"] == pytest.approx(500.0)
    assert doc["rows"][0]["start"] == "2024-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("power", "match"),
    [
        ((100.0, -3.0, 100.0, 100.0), r"s.parquet, row 2, 'power_w': expected a finite number"),
    ],
)
def test_file_mode_bad_input_exits_2_with_one_line(tmp_path, capsys, power, match):
    s, e = write_files(tmp_path, power)
    out = tmp_path / "out.parquet"
    assert main(["energy", "--samples", str(s), "--epochs", str(e), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(match, err)
    assert not out.exists()


def test_missing_or_corrupt_files_exit_2(tmp_path, capsys):
    s, e = write_files(tmp_path)
    assert main(["energy", "--samples", str(tmp_path / "nope.parquet"), "--epochs", str(e)]) == 2
    assert "nope.parquet: expected a parquet file of samples" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    assert main(["energy", "--samples", str(s), "--epochs", str(bad)]) == 2
    assert "bad.parquet: expected a parquet file of epoch marks" in capsys.readouterr().err
    assert main(["energy"]) == 2
    assert "expected either --run RUN_ID" in capsys.readouterr().err


def test_run_mode_reads_the_store(tmp_path, capsys):
    store = Store(tmp_path / "st")
    store.write_samples(
        pl.DataFrame(
            {
                "run_id": "job-1",
                "node": "n",
                "device": "0",
                "timestamp": [at(i) for i in range(4)],
                "power_w": [100.0, 200.0, 200.0, 100.0],
                "source": "replay",
            }
        )
    )
    store.write_runs(pl.DataFrame({"run_id": ["job-1"], "status": ["finished"]}))
    # Without epoch marks: the whole run.
    assert main(["energy", "--run", "job-1", "--store", str(store.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"]["energy_j"] == pytest.approx(500.0)
    store.write_epochs(
        pl.DataFrame({"run_id": "job-1", "epoch": [0], "start": [at(0)], "end": [at(1.5)]})
    )
    assert main(["energy", "--run", "job-1", "--store", str(store.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"]["energy_j"] == pytest.approx(250.0)
    assert main(["energy", "--run", "nope", "--store", str(store.root)]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert main(["runs", "--store", str(store.root)]) == 0
    assert "job-1" in capsys.readouterr().out


def test_the_parser_can_be_built_many_times_in_one_process():
    """Regression: the shared 'bench' group was cached by id(subparsers); when a collected
    parser's id was reused, build_parser() failed with 'conflicting subparser: step'."""
    import gc

    from cluster.cli import build_parser

    for _ in range(40):
        parser = build_parser()
        args = parser.parse_args(["bench", "pre", "--train", "a", "--test", "b", "--out", "c"])
        assert (args.command, args.bench_command) == ("bench", "pre")
        del parser
        gc.collect()


@pytest.mark.parametrize("gap", ["nan", "inf", "-inf", "0", "-1"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_gap_threshold_must_be_finite_and_positive(tmp_path, capsys, gap, json_flag):
    """Regression: --gap-threshold nan exited 0 and wrote energy_j NaN (and printed the bare
    token NaN, not JSON, with --json)."""
    s, e = write_files(tmp_path)
    out = tmp_path / "out.parquet"
    args = ["energy", "--samples", str(s), "--epochs", str(e), "--out", str(out)]
    assert main([*args, f"--gap-threshold={gap}", *json_flag]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "--gap-threshold must be a finite number > 0; found" in captured.err
    assert not out.exists()
