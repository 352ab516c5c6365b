"""``wattwise demo`` on the real traces: the README's main command."""

from __future__ import annotations

import re

import polars as pl

from cluster.cli import main
from profiler.store import Store


def test_demo_imports_checks_and_ranks(shared_data, tmp_path, capsys):
    store = tmp_path / "demo-store"
    assert main(["demo", "--data", str(shared_data), "--store", str(store), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "249 runs, 600,070 samples" in out
    # The three raw CSVs agree with the dataset's own energy within 1 %.
    raw = out.split("2. Raw nvidia-smi CSVs")[1].split("3. Per-epoch energy")[0]
    diffs = [float(d) for d in re.findall(r"([+-]\d+\.\d+) %", raw)]
    assert len(diffs) == 3 and all(abs(d) < 1.0 for d in diffs)
    assert "saving vs worst" in out
    # The live run: every epoch measured, nothing lost.
    assert re.search(r"sidecar: (\d+) samples taken, \1 stored, 0 spilled, 0 lost", out)
    runs = Store(store).runs().filter(pl.col("run_id").str.starts_with("demo-"))
    assert runs.height == 1 and runs["status"].item() == "finished"
    assert runs["trained_epochs"].item() == 3
    assert runs["energy_j"].item() > 0
    # STEP on the recorded runs beats every baseline at 20 % observed.
    medians = {m: float(v) for m, v in re.findall(r"│ (\w+)\s+│\s+189 │\s+([\d.]+) │", out)}
    assert set(medians) == {"step", "carbontracker", "mlco2", "green_algorithms", "naive"}
    assert medians["step"] < 0.5
    assert all(medians["step"] * 10 < v for m, v in medians.items() if m != "step")
    # PRE was retrained and recommended a node type with a placement.
    assert "PRE v1 on 249 runs: accepted" in out
    assert re.search(r"recommended: [\w-]+ \(saves \d+ %", out)
    assert "'ray_resources': {'node_type:" in out
    # A second run changes nothing in the store.
    assert main(["demo", "--data", str(shared_data), "--store", str(store), "--epochs", "1"]) == 0
    assert "(0 new)" in capsys.readouterr().out


def test_demo_without_data_measures_a_modelled_cpu_run(tmp_path, capsys):
    store = tmp_path / "store"
    args = ["demo", "--data", str(tmp_path / "nothing"), "--store", str(store), "--epochs", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "The real traces are not at" in out
    assert re.search(r"sidecar: (\d+) samples taken, \1 stored, 0 spilled, 0 lost", out)
    samples = Store(store).samples()
    assert samples.height > 0
    assert samples["source"].unique().to_list() == ["modelled"]
    assert Store(store).epochs()["epoch"].to_list() == [0, 1]
