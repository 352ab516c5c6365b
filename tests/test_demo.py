"""``wattwise demo``, run as a user types it: a local Ray cluster of two node types, end to end.

Each test starts the demo in its own process (it starts and ends its own Ray
cluster) and checks the one JSON object ``--json`` prints against the store
and the report files it names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from profiler.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _demo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "demo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_jobs(jobs: list[dict], store: Store, planned: int) -> None:
    """Every live job finished, was measured by the modelled source, and STEP answered at 1/5."""
    for j in jobs:
        assert j["status"] == "finished"
        assert j["epochs"] == j["planned_epochs"] == planned
        assert j["measured_energy_j"] > 0
        assert j["projected_after_epochs"] == -(-planned // 5)  # a fifth, rounded up
        assert j["lower_j"] <= j["projected_energy_j"] <= j["upper_j"]
        row = store.run(j["run_id"])
        assert row["status"] == "finished" and row["node_type"] == j["node_type"]
        assert row["energy_source"] == "modelled"
        assert row["energy_j"] == pytest.approx(j["measured_energy_j"], rel=1e-9)
        samples = store.samples(j["run_id"])
        assert samples["source"].unique().to_list() == ["modelled"]
        assert store.epochs(j["run_id"])["epoch"].to_list() == list(range(planned))


def test_demo_json_runs_jobs_on_two_node_types_and_places_one_by_pre(shared_data, tmp_path):
    store_dir = tmp_path / "store"
    r = _demo(
        "--json", "--store", str(store_dir), "--data", str(shared_data),
        "--epochs", "5", "--archs", "mobilenet_v3_small",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # stdout is the JSON object alone; tables went to stderr
    store = Store(store_dir)
    jobs = out["jobs"]
    assert sorted(j["node_type"] for j in jobs) == ["cpu-eco", "cpu-perf"]
    _check_jobs(jobs, store, planned=5)
    # One sidecar per node: the head and the two workers.
    assert len(out["sidecars"]) == 3
    # PRE learned from the imported real runs plus the two live ones, and placed a new job.
    assert out["model"]["version"] >= 1 and out["model"]["rows"] >= 249 + 2
    rec = out["recommendation"]
    assert rec["node_type"] in ("cpu-eco", "cpu-perf") and rec["predicted_energy_j"] > 0
    assert rec["lower_j"] <= rec["predicted_energy_j"] <= rec["upper_j"]
    assert rec["placement"]["ray_resources"] == {f"node_type:{rec['node_type']}": 0.001}
    auto = out["auto_job"]
    assert auto["placement"] == "predicted (PRE)" and auto["node_type"] == rec["node_type"]
    _check_jobs([auto], store, planned=5)
    # The recorded-data checks ran too: raw CSVs within 1 %, STEP far ahead of today's rules.
    rec_data = out["recorded"]
    assert len(rec_data["raw_csv_difference_pct"]) == 3
    assert all(abs(d) < 1.0 for d in rec_data["raw_csv_difference_pct"].values())
    medians = rec_data["step_vs_baselines"]
    assert medians["step"] < 0.5
    assert all(medians["step"] * 10 < v for m, v in medians.items() if m != "step")
    # The report files exist: one HTML page per job with its plot, and the summary.
    files = [Path(f) for f in out["reports"]["files"]]
    assert len(files) == 4 and all(f.is_file() for f in files)
    assert all("<img" in f.read_text() for f in files if f.suffix == ".html")
    assert json.loads(files[-1].read_text())["jobs"] == jobs
    assert "Jobs: measured energy" in r.stderr and "MODELLED" in r.stderr


def test_demo_replays_recorded_runs_through_the_same_path(shared_data, tmp_path):
    runs = pl.read_parquet(shared_data / "runs.parquet").filter(pl.col("has_trace"))
    # The shortest recorded run on each GPU keeps the test short.
    short = runs.sort("duration_s").group_by("gpu_model", maintain_order=True).first()
    ids = short["run_id"].to_list()
    store_dir = tmp_path / "store"
    r = _demo(
        "--json", "--replay", str(shared_data), "--speed", "100", "--runs", ",".join(ids),
        "--store", str(store_dir),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    store = Store(store_dir)
    assert out["mode"] == "replay" and len(out["jobs"]) == 2
    truth = {r["run_id"]: r for r in short.iter_rows(named=True)}
    for j in out["jobs"]:
        orig = truth[j["replay_of"]]
        assert j["status"] == "finished"
        assert j["epochs"] == j["planned_epochs"] == orig["trained_epochs"]
        assert "equal slices" in j["epoch_marks"]
        # Every recorded sample went through sidecar and aggregator once: the energy is the
        # recording's (the dataset's own figure sums integer watts: within 1 %).
        assert j["samples_sent"] == store.samples(j["run_id"]).height
        assert j["measured_energy_j"] == pytest.approx(orig["gpu_energy_j"], rel=0.01)
        assert j["projected_energy_j"] is not None
        assert store.run(j["run_id"])["energy_source"] == "measured"
    assert out["model"]["rows"] >= 249
    assert out["recommendation"]["node_type"] in {j["node_type"] for j in out["jobs"]}


def test_demo_without_the_real_traces_says_pre_has_too_few_runs(tmp_path):
    store_dir = tmp_path / "store"
    r = _demo(
        "--json", "--store", str(store_dir), "--data", str(tmp_path / "nothing"),
        "--epochs", "3", "--archs", "mobilenet_v3_small", "--no-auto",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert "The real traces are not at" in r.stderr
    _check_jobs(out["jobs"], Store(store_dir), planned=3)
    assert out["model"]["version"] is None
    assert "at least 10 finished runs" in out["model"]["reason"]
    assert out["recommendation"]["node_type"] is None and "auto_job" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replay", "/nonexistent/folder"], "expected a SEAA 2023 style folder"),
        (["--replay", ".", "--speed", "0"], "--speed must be a number > 0"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_demo_refuses_bad_input_before_starting_anything(tmp_path, args, message):
    r = _demo(*args, "--store", str(tmp_path / "s"), timeout=120)
    assert r.returncode == 2
    assert message in r.stderr
