"""End to end: ``ray start`` (two node types), two concurrent ``ray job submit -- wattwise run``."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
WATTWISE = str(BIN / "wattwise")
TINY = "--arch resnet18 --image-size 32 --train-size 64 --batch-size 32 --epochs 3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_of(tags: list[str]) -> list[int]:
    """Pids whose command line holds one of ``tags``, plus all their descendants."""
    procs: dict[int, tuple[int, str]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = (
                Path(f"/proc/{p}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode("utf-8", "replace")
            )
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(p)] = (ppid, cmd)
    mine = {p for p, (_, cmd) in procs.items() if any(t in cmd for t in tags)}
    grew = True
    while grew:
        grew = False
        for p, (pp, _) in procs.items():
            if pp in mine and p not in mine:
                mine.add(p)
                grew = True
    mine.discard(os.getpid())
    return sorted(mine)


def _stop_cluster(tags: list[str]) -> None:
    """Kill this test's Ray processes by pid (``ray stop`` stops every cluster of the user)."""
    for pid in _processes_of(tags):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``ray start --head`` typed sim-a plus a ``ray start --address`` worker typed sim-b."""
    if shutil.which(RAY) is None:
        pytest.skip(f"the ray CLI is not installed at {RAY}")
    temp = tempfile.mkdtemp(prefix="ww", dir="/tmp")  # Ray's socket paths must stay short
    port, dash, client = (_free_port() for _ in range(3))

    def agent_ports() -> list[str]:
        # Every agent port explicit and free: another Ray cluster of this test session
        # (or of another user) may hold the defaults, and the head's job agent then never
        # starts ("No available agent to submit job").
        return [
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray >= 2.59 turns token authentication on for local clusters and keeps the token in
    # a per-user file that other clusters of the session may rewrite: this cluster gets
    # its own token, given to every process and to the client explicitly.
    token = secrets.token_urlsafe(24)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token
    tags = [temp, f"127.0.0.1:{port}", f"--port={port}"]
    head = [
        RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp}", "--num-cpus=1", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", "--disable-usage-stats", *agent_ports(),
        "--resources", json.dumps({"node_type:sim-a": 1, "accelerator_type:T4": 1}),
    ]  # fmt: skip
    worker = [
        RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=1", *agent_ports(),
        "--resources", json.dumps({"node_type:sim-b": 1}),
    ]  # fmt: skip
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            pytest.skip(f"ray start --head failed here: {started.stderr[-500:]}")
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        from ray.job_submission import JobSubmissionClient

        while True:
            try:
                client_ = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
                break
            except Exception as err:
                if time.monotonic() > deadline:
                    pytest.skip(f"the job-submission dashboard did not start at {url}: {err}")
                time.sleep(1)
        joined = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0, joined.stderr[-2000:]
        yield {"url": url, "client": client_, "env": env, "address": f"127.0.0.1:{port}"}
    finally:
        _stop_cluster(tags)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_jobs_submitted_to_two_node_types_are_measured_and_recorded(
    ray_head: dict[str, Any], tmp_path: Path
) -> None:
    from profiler.store import Store

    store = tmp_path / "store"
    env = ray_head["env"]
    ids = {}
    for kind in ("sim-a", "sim-b"):
        sub = f"e2e-{kind}-{os.getpid()}"
        cmd = [
            RAY, "job", "submit", "--address", ray_head["url"], "--no-wait",
            "--submission-id", sub, "--",
            WATTWISE, "run", "--node-type", kind, "--run-id", f"run-{kind}",
            "--store", str(store), "--json", "--", WATTWISE, "train", *TINY.split(),
        ]  # fmt: skip
        # The head's dashboard agent can come up after the dashboard itself; Ray then
        # answers "No available agent to submit job, please try again later".
        agent_deadline = time.monotonic() + 90
        while True:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            if out.returncode == 0 or "No available agent" not in out.stderr:
                break
            if time.monotonic() > agent_deadline:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stderr[-2000:]
        ids[kind] = sub
    client = ray_head["client"]
    deadline = time.monotonic() + 240
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {k: str(client.get_job_status(s)) for k, s in ids.items()}
        if all(
            s in ("JobStatus.SUCCEEDED", "JobStatus.FAILED", "SUCCEEDED", "FAILED")
            for s in states.values()
        ):
            break
        time.sleep(1)
    logs = {k: client.get_job_logs(s) for k, s in ids.items()}
    for kind, state in states.items():
        assert state.endswith("SUCCEEDED"), f"{kind}: {state}\n{logs[kind][-3000:]}"

    s = Store(store)
    runs = {r["run_id"]: r for r in s.runs().iter_rows(named=True)}
    assert set(runs) == {"run-sim-a", "run-sim-b"}
    for kind in ("sim-a", "sim-b"):
        r = runs[f"run-{kind}"]
        assert (r["status"], r["node_type"], r["trained_epochs"]) == ("finished", kind, 3)
        # Only the modelled CPU source measured these runs, and the total says so.
        assert r["energy_j"] > 0 and r["energy_source"] == "modelled"
        samples = s.samples(f"run-{kind}")
        assert samples.height > 0 and samples["source"].unique().to_list() == ["modelled"]
        assert s.epochs(f"run-{kind}")["epoch"].to_list() == [0, 1, 2]
        printed = json.loads(next(ln for ln in logs[kind].splitlines() if ln.startswith("{")))
        assert printed["run_id"] == f"run-{kind}" and printed["status"] == "finished"
    # sim-a names a GPU model through Ray's accelerator_type resource; sim-b does not.
    assert runs["run-sim-a"]["gpu_model"] == "T4" and runs["run-sim-b"]["gpu_model"] is None
    # The two jobs ran at the same time.
    assert runs["run-sim-a"]["start"] < runs["run-sim-b"]["end"]
    assert runs["run-sim-b"]["start"] < runs["run-sim-a"]["end"]

    # The aggregator's answers, asked from another process as a user would.
    status = subprocess.run(
        [WATTWISE, "aggregator", "status", "--json", "--address", ray_head["address"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    answer = json.loads(status.stdout)
    by_id = {r["run_id"]: r for r in answer["runs"]}
    for kind in ("sim-a", "sim-b"):
        r = by_id[f"run-{kind}"]
        assert r["status"] == "finished" and r["epochs_done"] == 3
        assert r["measured_energy_j"] == pytest.approx(runs[f"run-{kind}"]["energy_j"])
    assert answer["aggregator"]["store"] == str(store.resolve())
    assert len(answer["aggregator"]["sidecars"]) == 2
