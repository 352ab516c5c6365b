"""Per-run samples when runs share a node: GPUs by device, CPU jobs by their own process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from estimators.energy import run_energy
from profiler.sidecar import Sidecar
from profiler.sources.modelled import ModelledCpuSource
from profiler.sources.process import ProcessCpuSource, parse_stat
from profiler.sources.replay import ReplaySource

T0 = datetime(2024, 1, 1, tzinfo=UTC)
BOARD_W = 100.0

#: Busy for ``duty`` of every 10 ms for ``seconds`` s: argv duty seconds.
BURNER = """
import sys, time
duty, end = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.monotonic()
    while time.monotonic() - t < 0.01 * duty:
        pass
    time.sleep(0.01 * (1 - duty))
"""


def burner(duty: float, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", BURNER, str(duty), str(seconds)])


def wait_exited(pid: int, timeout_s: float = 60.0) -> None:
    """Wait for ``pid`` to end without reaping it (its stat keeps its whole CPU time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None and info.si_pid:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not end in {timeout_s} s")


def reap_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """Reap ``proc``; its user + system CPU time in s as the kernel accounts it."""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return float(ru.ru_utime + ru.ru_stime)


def test_parse_stat_takes_a_command_with_spaces_and_parentheses() -> None:
    line = "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 30 7 3 20 0 1 0 9999 0 0"
    st = parse_stat(line + " 0" * 30)
    assert (st.pid, st.ppid) == (4242, 17)
    assert (st.self_ticks, st.child_ticks, st.start_ticks) == (280, 10, 9999)
    with pytest.raises(ValueError, match=r"expected 'pid \(comm\) state ppid"):
        parse_stat("garbage")


def test_two_cpu_jobs_on_one_sidecar_each_get_only_their_own_samples(tmp_path: Path) -> None:
    """Two burners (100 % and 25 % of a CPU) attributed to two runs by one sidecar."""
    frames: list[pl.DataFrame] = []
    side = Sidecar(
        [ModelledCpuSource(BOARD_W)],
        node="n1",
        interval_s=0.2,
        batch_interval_s=0.5,
        receiver=frames.append,
        journal=tmp_path / "journal",
    )
    hot, cool = burner(1.0, 2.0), burner(0.25, 2.0)
    side.start()
    try:
        modes = {
            "run-hot": side.attach_job("run-hot", pid=hot.pid),
            "run-cool": side.attach_job("run-cool", pid=cool.pid),
        }
        assert modes["run-hot"] == {"mode": "process", "device": f"cpu:{hot.pid}", "key": "a1"}
        assert modes["run-cool"]["device"] == f"cpu:{cool.pid}"
        for p in (hot, cool):
            wait_exited(p.pid)
        side.detach("run-hot")  # final reads see the ended processes' whole CPU time
        side.detach("run-cool")
        assert side.owners() == {"*": None}
    finally:
        side.stop()
        cpu_s = {"run-hot": reap_cpu_s(hot), "run-cool": reap_cpu_s(cool)}
    df = pl.concat(frames)
    assert side.stats.sent == df.height == side.stats.samples
    devices = {
        rid: set(df.filter(pl.col("run_id") == rid)["device"].to_list())
        for rid in ("run-hot", "run-cool")
    }
    assert devices == {"run-hot": {f"cpu:{hot.pid}"}, "run-cool": {f"cpu:{cool.pid}"}}
    # The node-wide modelled source's samples belong to no run.
    assert df.filter(pl.col("device") == "cpu")["run_id"].null_count() > 0
    assert df.filter(pl.col("device") == "cpu")["run_id"].drop_nulls().len() == 0
    ncpu = os.cpu_count() or 1
    energy = {}
    for rid in ("run-hot", "run-cool"):
        part = df.filter(pl.col("run_id") == rid).sort("timestamp")
        energy[rid] = float(run_energy(part)["energy_j"][0])
        # The counter is the model integrated exactly: board power x CPU s / CPUs,
        # with the CPU time the kernel reports for the reaped process (1 tick = 10 ms).
        assert part["energy_j"][0] == 0.0
        assert energy[rid] == pytest.approx(BOARD_W * cpu_s[rid] / ncpu, abs=BOARD_W * 0.05 / ncpu)
    assert energy["run-hot"] > 1.5 * energy["run-cool"] > 0


def test_process_source_counts_children_and_starts_at_the_process_start() -> None:
    code = (
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, '-c', {BURNER!r}, '1.0', '0.6'])\n"
        f"subprocess.run([sys.executable, '-c', {BURNER!r}, '1.0', '0.6'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    src = ProcessCpuSource(proc.pid, BOARD_W, cpus=1)
    first = src.read()
    assert [s.power_w for s in first][0] is None and first[0].energy_j == 0.0
    # The first sample sits at the process start, before the source was made.
    assert first[0].timestamp < first[1].timestamp - timedelta(seconds=0.3)
    seen = list(first)
    wait_exited(proc.pid)
    seen += src.read()
    cpu_s = reap_cpu_s(proc)
    assert seen[-1].energy_j == pytest.approx(BOARD_W * cpu_s, abs=BOARD_W * 0.05)
    assert cpu_s > 0.3  # the children's busy time is in it (the parent only waits)
    after = src.read()
    assert after[-1].power_w == 0.0 and after[-1].energy_j == seen[-1].energy_j
    assert src.ended


def test_gpu_devices_attached_to_runs_carry_their_runs(tmp_path: Path) -> None:
    """A replayed two-GPU node: GPU 0 to run a, GPU 1 (by UUID) to run b, then released."""
    rows = [(d, T0 + timedelta(seconds=i), 100.0 + 100 * int(d)) for d in "01" for i in range(20)]
    trace = pl.DataFrame(rows, schema=["device", "timestamp", "power_w"], orient="row")
    clock = {"t": 0.0}
    src = ReplaySource(trace, clock=lambda: clock["t"])
    src.device_aliases = {"GPU-0000-b": "1"}  # as NVML would list UUIDs
    frames: list[pl.DataFrame] = []
    side = Sidecar(
        [src], node="g1", run_id="node-run", receiver=frames.append, journal=tmp_path / "j"
    )

    def ticks(n: int) -> None:
        for _ in range(n):
            side.tick()
            clock["t"] += 1.0

    ticks(3)  # t = 0..2: both GPUs node-wide
    assert side.attach_job("run-a", gpus=[0]) == {"mode": "devices", "devices": ["0"]}
    assert side.attach("run-b", ["GPU-0000-b"]) == ["1"]
    ticks(4)  # t = 3..6: each GPU its run
    side.detach("run-a")
    ticks(2)  # t = 7..8: GPU 0 back to the node-wide run
    side.set_run(None)
    ticks(1)  # t = 9: GPU 0 unassigned, GPU 1 still run b
    side.cut()
    side.ship()
    df = pl.concat(frames).with_columns(
        s=((pl.col("timestamp") - pl.col("timestamp").min()).dt.total_seconds())
    )
    got = {(dev, int(s)): rid for dev, s, rid in df.select("device", "s", "run_id").iter_rows()}
    for s in range(10):
        want0 = "node-run" if s < 3 or 7 <= s < 9 else ("run-a" if s < 7 else None)
        want1 = "node-run" if s < 3 else "run-b"
        assert (got[("0", s)], got[("1", s)]) == (want0, want1), s
    assert side.owners() == {"1": "run-b", "*": None}


def test_without_gpus_or_a_cpu_model_a_run_takes_the_whole_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trace = pl.DataFrame({"device": ["0"], "timestamp": [T0], "power_w": [1.0]})
    side = Sidecar([ReplaySource(trace)], node="r1", receiver=list().append, journal=tmp_path)
    assert side.attach_job("run-x", pid=os.getpid()) == {"mode": "node"}
    assert side.attach_job("run-y") == {"mode": "node"}
    assert "run run-y takes the whole node from run run-x" in caplog.text
    side.detach("run-x")  # it no longer holds the node: nothing changes
    assert side.run_id == "run-y"
    side.detach("run-y")
    assert side.run_id is None


def test_a_process_that_has_ended_cannot_be_attached() -> None:
    from profiler.errors import SourceUnavailableError

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(SourceUnavailableError, match=rf"no process {proc.pid} under /proc"):
        ProcessCpuSource(proc.pid)


# ---------------------------------------------------------------------------- on a Ray cluster


@pytest.mark.slow
def test_two_concurrent_jobs_on_one_node_have_disjoint_samples(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import ray

    from cluster.runner import run_job
    from conftest import typed_ray_cluster
    from profiler.store import Store

    store_root = tmp_path / "store"
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def job(name: str, duty: float) -> None:
        try:
            results[name] = run_job(
                [sys.executable, "-c", BURNER, str(duty), "3"],
                node_type="cpu-x",
                store_root=store_root,
                num_cpus=0.5,
                sidecar_options={"interval_s": 0.25, "batch_interval_s": 1.0},
                job_name=name,
            )
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    with typed_ray_cluster("wattwise-attribution", kinds=("cpu-x",)):
        threads = [
            threading.Thread(target=job, args=(name, duty))
            for name, duty in (("hot", 1.0), ("cool", 0.2))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        node_ids = {r.node_id for r in results.values()}
        assert len(node_ids) == 1 and ray.is_initialized()
    hot, cool = results["hot"], results["cool"]
    assert hot.status == cool.status == "finished"
    store = Store(store_root)
    runs = {rid: store.run(rid) for rid in (hot.run_id, cool.run_id)}
    # They did run at the same time on that one node.
    assert runs[hot.run_id]["start"] < runs[cool.run_id]["end"]
    assert runs[cool.run_id]["start"] < runs[hot.run_id]["end"]
    s_hot, s_cool = store.samples(hot.run_id), store.samples(cool.run_id)
    dev_hot, dev_cool = set(s_hot["device"].to_list()), set(s_cool["device"].to_list())
    assert len(dev_hot) == len(dev_cool) == 1 and dev_hot != dev_cool
    assert next(iter(dev_hot)).startswith("cpu:") and next(iter(dev_cool)).startswith("cpu:")
    keys = ["node", "device", "timestamp"]
    assert s_hot.select(keys).join(s_cool.select(keys), on=keys).height == 0
    assert set(s_hot["source"].to_list()) == {"modelled"}
    assert runs[hot.run_id]["energy_source"] == "modelled"
    assert runs[hot.run_id]["energy_j"] > 1.5 * runs[cool.run_id]["energy_j"] > 0
    config = __import__("json").loads(str(runs[hot.run_id]["config"]))
    assert config["clock_home"]  # the node whose clock its epoch marks use


def test_restored_node_wide_run_is_released_once_the_aggregator_says_it_ended(
    tmp_path: Path,
) -> None:
    """A sidecar restarted while the aggregator is unreachable keeps its node-wide run, asks
    again, and lets the run go when the aggregator answers that it is no longer running."""
    import json

    from cluster.actors import _SidecarActorImpl

    answers: dict[str, list[bool | None]] = {"node-run": [None, None, False], "job-run": [True]}
    asked: list[str] = []

    class Probe(_SidecarActorImpl):
        verify_interval_s = 0.05

        @staticmethod
        def _still_running(run_id: str) -> bool | None:
            asked.append(run_id)
            queue = answers[run_id]
            return queue.pop(0) if len(queue) > 1 else queue[0]

    journal = tmp_path / "journal"
    journal.mkdir()
    (journal / "assignments.json").write_text(
        json.dumps({"node_run": "node-run", "jobs": {"job-run": {"gpus": [], "pid": None}}})
    )
    actor = Probe(
        "node-1",
        [("modelled", {"board_power_w": 50.0})],
        interval_s=0.2,
        batch_interval_s=10.0,
        journal_dir=str(journal),
    )
    shipped: list[pl.DataFrame] = []

    class Memory:  # no aggregator in this test: batches are kept here
        def send(self, frame: pl.DataFrame) -> None:
            shipped.append(frame)

    actor.sidecar.receiver = Memory()
    state = journal / "assignments.json"
    try:
        owners = actor.owners()
        assert owners.get("*") == "node-run"  # kept: the aggregator could not say
        deadline = time.monotonic() + 10
        while actor.owners().get("*") is not None or json.loads(state.read_text())["node_run"]:
            assert time.monotonic() < deadline, f"node-run never released; asked {asked}"
            time.sleep(0.05)
        assert asked.count("node-run") == 3  # at restore, once more unsure, then "ended"
        assert "job-run" in json.loads(state.read_text())["jobs"]
    finally:
        actor.stop()
