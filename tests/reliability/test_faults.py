"""Faults on a real local Ray cluster: nothing lost or doubled, runs marked, projections resumed.

Every sidecar here replays a real recorded trace (the first run of the
shared SEAA 2023 traces) from a fixed anchor time, so what the sources
produced is known exactly: ``TRACE_ROWS`` samples at ``anchor + offset``
with the recorded power. After each fault the store must hold exactly those
samples for the run (same count, same timestamps and power, each once) and
the aggregator's measured energy must equal the energy of the recorded
trace. A replay restarted after a fault plays again from its anchor, so
samples a dead process held only in memory are produced again, and the
store's idempotent key absorbs the copies that had arrived already.

Faults: the aggregator killed (and restarted by Ray) in the middle of two
running jobs; a sidecar cut from the aggregator (``CUT_S``, 12 s; 60 s with
``WATTWISE_SLOW_TESTS=1``); a sidecar killed and restarted by the manager
while its journal holds unsent batches; the real Prometheus stopped while
the DCGM source reads it; a worker node removed in the middle of a job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from conftest import SHARED_DATA, typed_ray_cluster

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow
SLOW = os.environ.get("WATTWISE_SLOW_TESTS") == "1"
TRACE_ROWS = 60
#: Replay speed: the 60 s trace plays in 10 s.
SPEED = 6.0
#: How long a sidecar is cut from the aggregator, in s (the issue's minute with SLOW).
CUT_S = 60.0 if SLOW else 12.0
AGG_OPTIONS = {"flush_interval_s": 0.5, "max_lag_s": 2.0}
SIDECAR = {"interval_s": 0.2, "batch_interval_s": 0.5, "send_timeout_s": 5.0}
PROMETHEUS = "/usr/bin/prometheus"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trace() -> pl.DataFrame:
    """The first 60 s of the first real run of the shared traces (1 Hz)."""
    if not (SHARED_DATA / "traces.parquet").is_file():
        pytest.skip(f"real traces not found at {SHARED_DATA} (../shared/data/seaa2023)")
    from profiler.sources.replay import load_trace

    df = load_trace(SHARED_DATA / "traces.parquet", max_runs=1).head(TRACE_ROWS)
    assert df.height == TRACE_ROWS and df["device"].n_unique() == 1
    return df


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, trace: pl.DataFrame
) -> Iterator[dict[str, Any]]:
    """A head plus gpu-a and gpu-b workers, and the aggregator on one store."""
    from cluster.actors import aggregator

    root = tmp_path_factory.mktemp("faults")
    with typed_ray_cluster("wattwise-faults") as c:
        agg = aggregator(root / "store", options=AGG_OPTIONS, retrain_delay_s=3600)
        ray.get(agg.ping.remote(), timeout=120)
        state = {"cluster": c, "root": root, "store": root / "store", "agg": agg}
        try:
            yield state
        finally:
            _kill_aggregator(state["agg"])


def _kill_aggregator(agg: Any) -> None:
    try:
        ray.kill(agg, no_restart=True)
    except Exception:
        pass


def _node_ids() -> dict[str, str]:
    out = {}
    for n in ray.nodes():
        for res in n["Resources"]:
            if n["Alive"] and res.startswith("node_type:"):
                out[res.split(":", 1)[1]] = n["NodeID"]
    return out


def _anchor() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _expected(trace: pl.DataFrame, anchor: datetime) -> pl.DataFrame:
    """What a replay of ``trace`` from ``anchor`` produces: timestamps and power."""
    return trace.select(
        (pl.col("timestamp") - pl.col("timestamp").first() + pl.lit(anchor))
        .dt.cast_time_unit("us")
        .dt.convert_time_zone("UTC")
        .alias("timestamp"),
        pl.col("power_w").cast(pl.Float64),
    )


def _span_us(trace: pl.DataFrame) -> int:
    """Trace time from its first to its last sample, in µs."""
    return int((trace["timestamp"][-1] - trace["timestamp"][0]).total_seconds() * 1e6)


def _trace_energy(trace: pl.DataFrame, anchor: datetime) -> float:
    from estimators.energy import run_energy

    exp = _expected(trace, anchor).with_columns(
        run_id=pl.lit("x"), node=pl.lit("n"), device=pl.lit("0"), source=pl.lit("replay")
    )
    return float(run_energy(exp)["energy_j"][0])


def _replay(trace: pl.DataFrame, anchor: datetime) -> list[tuple[str, dict[str, Any]]]:
    return [("replay", {"trace": trace, "speed": SPEED, "device_prefix": "", "anchor": anchor})]


def _start_sidecar(
    node_id: str, node: str, run_id: str, trace: pl.DataFrame, anchor: datetime, journal: Path
) -> Any:
    from cluster.actors import journal_dir_for, sidecar_actor

    return sidecar_actor(
        node_id,
        node,
        _replay(trace, anchor),
        name=f"fault-{node}",
        run_id=run_id,
        journal_dir=journal_dir_for(journal, node),
        **SIDECAR,
    )


def _wait(what: str, check: Any, timeout: float = 120.0, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as err:  # an actor restarting: ask again
            last = err
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def _drain(sidecar: Any) -> dict[str, int]:
    """Wait until the sidecar has played the whole trace and delivered everything; stop it."""
    _wait(
        "the whole trace to be played",
        lambda: ray.get(sidecar.stats.remote(), timeout=30)["samples"] >= TRACE_ROWS,
    )
    stats = _wait(
        "the sidecar to deliver everything",
        lambda: (s := ray.get(sidecar.flush.remote(), timeout=60))["pending"] == 0 and s,
    )
    final = ray.get(sidecar.stop.remote(), timeout=60)
    ray.kill(sidecar)
    assert final["pending"] == 0 and final["lost"] == 0
    return dict(stats)


def _ping(agg: Any) -> dict[str, Any]:
    return dict(ray.get(agg.ping.remote(), timeout=10))


def _marks(run_id: str, anchor: datetime, epochs: range, span_us: int) -> pl.DataFrame:
    """Marks of ``epochs`` of 4 even epochs over the trace; the last ends on its last sample."""
    edge = [anchor + timedelta(microseconds=k * span_us // 4) for k in range(5)]
    return pl.DataFrame(
        {
            "run_id": [run_id] * len(epochs),
            "epoch": list(epochs),
            "start": [edge[k] for k in epochs],
            "end": [edge[k + 1] for k in epochs],
        },
        schema_overrides={"start": pl.Datetime("us", "UTC"), "end": pl.Datetime("us", "UTC")},
    )


def _check_exact(store_root: Path, run_id: str, trace: pl.DataFrame, anchor: datetime) -> None:
    """The run's stored samples are exactly the replayed trace: each sample once, none missing."""
    from profiler.store import Store

    got = Store(store_root).samples(run_id)
    assert got.height == TRACE_ROWS, run_id
    assert got.select("node", "device", "timestamp").n_unique() == TRACE_ROWS
    assert got.select("timestamp", "power_w").sort("timestamp").equals(_expected(trace, anchor))


# ------------------------------------------------------------------------------ the aggregator dies


def test_the_aggregator_killed_mid_two_jobs_loses_and_doubles_nothing(
    cluster: dict[str, Any], trace: pl.DataFrame
) -> None:
    """Extends test_cluster_ray's restart (sidecars stopped first) to batches in flight."""
    agg, root = cluster["agg"], cluster["root"]
    ids = _node_ids()
    anchor = _anchor()
    span = _span_us(trace)  # 4 epochs planned, splitting the trace evenly
    runs = {kind: f"kill-agg-{kind}" for kind in ("gpu-a", "gpu-b")}
    sidecars = {}
    for kind, run_id in runs.items():
        ray.get(agg.start_run.remote({"run_id": run_id, "node_type": kind, "planned_epochs": 4}))
        sidecars[kind] = _start_sidecar(
            ids[kind], f"ka-{kind}", run_id, trace, anchor, root / "journal"
        )
    # Epoch 0 ends a quarter into the trace: its mark arrives once that much has played.
    _wait(
        "a third of the trace",
        lambda: all(
            ray.get(s.stats.remote(), timeout=30)["sent"] >= TRACE_ROWS / 3
            for s in sidecars.values()
        ),
    )
    for run_id in runs.values():
        ray.get(agg.ingest_epochs.remote(_marks(run_id, anchor, range(0, 1), span)))
    before = {r: ray.get(agg.status.remote(r)) for r in runs.values()}
    assert all(b["epochs_done"] == 1 for b in before.values())
    old = _ping(agg)
    ray.kill(agg, no_restart=False)  # mid-stream: batches in flight fail and are resent
    _wait("Ray to restart the aggregator", lambda: _ping(agg)["pid"] != old["pid"])
    # Epochs 1 and 2 are marked while the sidecars still send; epoch 3 after the end.
    for run_id in runs.values():
        ray.get(agg.ingest_epochs.remote(_marks(run_id, anchor, range(1, 3), span)))
    stats = {kind: _drain(s) for kind, s in sidecars.items()}
    for run_id in runs.values():
        ray.get(agg.ingest_epochs.remote(_marks(run_id, anchor, range(3, 4), span)))
    ray.get(agg.flush.remote())
    expected_j = _trace_energy(trace, anchor)
    for kind, run_id in runs.items():
        assert stats[kind]["samples"] == TRACE_ROWS and stats[kind]["lost"] == 0
        now = ray.get(agg.status.remote(run_id))
        assert now["status"] == "running" and now["samples"] == TRACE_ROWS
        assert now["epochs_done"] == 4  # the projection resumed after the restart
        assert now["projection"]["energy_j"] is not None
        assert now["measured_energy_j"] == pytest.approx(expected_j, rel=1e-9)
        assert now["gap_s"] == 0.0
        _check_exact(cluster["store"], run_id, trace, anchor)
        done = ray.get(agg.finish_run.remote(run_id), timeout=120)
        assert done["samples"] == TRACE_ROWS
        assert done["measured_energy_j"] == pytest.approx(expected_j, rel=1e-9)
    from profiler.store import Store

    stored = Store(cluster["store"]).runs().filter(pl.col("run_id").is_in(list(runs.values())))
    assert stored["status"].to_list() == ["finished", "finished"]
    assert stored["energy_j"].to_list() == pytest.approx([expected_j] * 2, rel=1e-9)
    assert stored["trained_epochs"].to_list() == [4, 4]


# ------------------------------------------------------------------------- a sidecar is cut off


def _recreate_aggregator(cluster: dict[str, Any]) -> Any:
    from cluster.actors import aggregator

    def fresh() -> Any:
        handle = aggregator(cluster["store"], options=AGG_OPTIONS, retrain_delay_s=3600)
        _ping(handle)
        return handle

    cluster["agg"] = _wait("a new aggregator", fresh, timeout=120, every=1.0)
    return cluster["agg"]


def test_a_sidecar_cut_from_the_aggregator_resends_its_journal(
    cluster: dict[str, Any], trace: pl.DataFrame
) -> None:
    agg, root = cluster["agg"], cluster["root"]
    node_id = _node_ids()["gpu-a"]
    anchor = _anchor()
    run_id = "cut-off"
    ray.get(agg.start_run.remote({"run_id": run_id, "node_type": "gpu-a", "planned_epochs": 4}))
    sidecar = _start_sidecar(node_id, "cut", run_id, trace, anchor, root / "journal")
    _wait("a few batches", lambda: ray.get(sidecar.stats.remote(), timeout=30)["sent"] >= 10)
    # Cut: the aggregator is gone for CUT_S (killed for good, then started again from the store).
    _kill_aggregator(agg)
    _wait(
        "the sidecar to spill",
        lambda: ray.get(sidecar.stats.remote(), timeout=30)["spilled"] > 0,
    )
    time.sleep(max(0.0, CUT_S - 2.0))
    during = ray.get(sidecar.stats.remote(), timeout=30)
    assert during["send_failures"] >= 1 and during["lost"] == 0
    # With a 12 s cut the 10 s replay has ended: everything after the first batches waits on disk.
    assert during["pending"] > 0
    agg = _recreate_aggregator(cluster)
    stats = _drain(sidecar)
    assert stats["lost"] == 0
    ray.get(agg.flush.remote())
    now = ray.get(agg.status.remote(run_id))
    assert now["samples"] == TRACE_ROWS and now["gap_s"] == 0.0
    assert now["measured_energy_j"] == pytest.approx(_trace_energy(trace, anchor), rel=1e-9)
    _check_exact(cluster["store"], run_id, trace, anchor)
    span = _span_us(trace)
    ray.get(agg.ingest_epochs.remote(_marks(run_id, anchor, range(0, 3), span)))
    assert ray.get(agg.status.remote(run_id))["projection"]["energy_j"] is not None
    assert ray.get(agg.finish_run.remote(run_id), timeout=120)["samples"] == TRACE_ROWS


# ------------------------------------------------------------------------------ a sidecar dies


def test_a_killed_sidecar_is_restarted_by_the_manager_and_its_journal_resent(
    cluster: dict[str, Any], trace: pl.DataFrame, tmp_path: Path
) -> None:
    from cluster.actors import SidecarManager

    anchor = _anchor()
    run_id = "sidecar-killed"
    agg = cluster["agg"]
    ray.get(agg.start_run.remote({"run_id": run_id, "node_type": "gpu-b", "planned_epochs": 4}))
    victim_id = _node_ids()["gpu-b"]
    # Every sidecar the manager starts, the replacement included, samples for the run: the
    # runner's assignment would not survive the restart (see the xfail test below).
    mgr = SidecarManager(
        _replay(trace, anchor), journal_dir=str(tmp_path / "journal"), run_id=run_id, **SIDECAR
    )
    try:
        assert victim_id in mgr.reconcile()
        nodes = sorted(mgr.names.values())
        assert len(nodes) == 3  # head, gpu-a, gpu-b: three streams of the run
        victim = mgr.handles[victim_id]
        _wait("a few batches", lambda: ray.get(victim.stats.remote(), timeout=30)["sent"] >= 6)
        # Make it spill (aggregator away), then kill it while its journal holds batches.
        _kill_aggregator(agg)
        _wait(
            "batches in the journal",
            lambda: ray.get(victim.stats.remote(), timeout=30)["spilled"] >= 6,
        )
        journal = Path(tmp_path / "journal" / mgr.names[victim_id])
        assert len(list(journal.glob("batch-*.parquet"))) >= 1
        ray.kill(victim)
        _wait("the victim to die", lambda: not _alive(victim))
        assert mgr.reconcile() == [victim_id]
        assert mgr.restarts == 1
        agg = _recreate_aggregator(cluster)
        # The replacement resends the dead one's journal, then its own samples.
        _wait("the journal to be resent", lambda: not list(journal.glob("batch-*.parquet")))
        for handle in mgr.handles.values():
            _drain(handle)
        mgr.handles.clear()
    finally:
        mgr.stop_all()
    ray.get(agg.flush.remote())
    now = ray.get(agg.status.remote(run_id))
    assert now["samples"] == 3 * TRACE_ROWS
    # Samples are checked row for row below; the energy is summed incrementally over batches
    # that the resend splits differently from run to run, and microsecond timestamps turned
    # into float seconds differ in the last bits: one CI run was 1.6e-9 off (3.5e-5 J).
    assert now["measured_energy_j"] == pytest.approx(3 * _trace_energy(trace, anchor), rel=1e-8)
    from profiler.store import Store

    stored = Store(cluster["store"]).samples(run_id)
    for node in nodes:
        got = stored.filter(pl.col("node") == node)
        assert got.height == TRACE_ROWS, node
        assert (
            got.select("timestamp", "power_w").sort("timestamp").equals(_expected(trace, anchor))
        ), node
    ray.get(agg.finish_run.remote(run_id), timeout=120)


def _alive(handle: Any) -> bool:
    try:
        ray.get(handle.ping.remote(), timeout=5)
        return True
    except Exception:
        return False


def test_a_restarted_sidecar_keeps_its_run_assignment(
    cluster: dict[str, Any], trace: pl.DataFrame, tmp_path: Path
) -> None:
    from cluster.actors import SidecarManager

    node_id = _node_ids()["gpu-a"]
    mgr = SidecarManager(_replay(trace, _anchor()), journal_dir=str(tmp_path / "j"), **SIDECAR)
    try:
        mgr.reconcile()
        ray.get(mgr.handles[node_id].set_run.remote("kept-run"), timeout=60)
        ray.kill(mgr.handles[node_id])
        _wait("the sidecar to die", lambda: not _alive(mgr.handles[node_id]))
        assert mgr.reconcile() == [node_id]
        owners = ray.get(mgr.handles[node_id].owners.remote(), timeout=60)
    finally:
        mgr.stop_all()
    assert owners["*"] == "kept-run"


# ------------------------------------------------------------------------------ Prometheus stops


def _start_prometheus(tmp_path: Path, target_port: int, port: int) -> subprocess.Popen[bytes]:
    """A real Prometheus scraping ``target_port`` every second (as tests/test_exporter.py)."""
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: dcgm\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    return subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "ab"),  # noqa: SIM115
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _newest_scrape(url: str) -> float:
    """Time of Prometheus' newest DCGM scrape, in s since 1970 (0 when it has none)."""
    import urllib.request

    q = url + "/api/v1/query?query=max(timestamp(DCGM_FI_DEV_POWER_USAGE))"
    with urllib.request.urlopen(q, timeout=5) as r:
        res = json.loads(r.read())["data"]["result"]
    return float(res[0]["value"][1]) if res else 0.0


def test_prometheus_stopped_while_the_dcgm_source_reads_it(
    tmp_path: Path, trace: pl.DataFrame
) -> None:
    """Marked samples during the outage, no crash, reads resume, no sample twice."""
    import socket

    from profiler.exporter import DcgmExporter
    from profiler.sidecar import Sidecar
    from profiler.sources.dcgm import DcgmPrometheusSource
    from profiler.sources.replay import ReplaySource

    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"Prometheus binary absent at {PROMETHEUS} (apt-get install prometheus)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    batches: list[pl.DataFrame] = []
    lock = threading.Lock()

    def receive(batch: pl.DataFrame) -> None:
        with lock:
            batches.append(batch)

    src = ReplaySource(trace, device_prefix="", loop=True, counter=True, model="Fake GPU")
    with DcgmExporter(src, node="prom-node") as exporter:
        proc = _start_prometheus(tmp_path, exporter.port, port)
        try:
            first = datetime.now(UTC).timestamp()
            _wait("3 scrapes", lambda: _newest_scrape(url) > first + 2, timeout=60)
            source = DcgmPrometheusSource(url, hostname="prom-node", timeout_s=1.0, lookback_s=5)
            sidecar = Sidecar(
                [source],
                node="prom-node",
                run_id="prom-run",
                interval_s=0.5,
                batch_interval_s=1.0,
                receiver=receive,
                journal=tmp_path / "journal",
            ).start()
            time.sleep(4)
            stopped = datetime.now(UTC)
            _stop(proc)
            time.sleep(5)
            proc = _start_prometheus(tmp_path, exporter.port, port)
            restarted = datetime.now(UTC)
            # Back, and scraping again (its first scrape comes seconds after it answers).
            _wait(
                "Prometheus to scrape again",
                lambda: _newest_scrape(url) > restarted.timestamp(),
                timeout=60,
            )
            time.sleep(3)
            stats = sidecar.stop()
            sidecar.close()
        finally:
            _stop(proc)
    df = pl.concat(batches)
    assert stats.lost == 0 and stats.bad_reads >= 1
    # During the outage the device got marked samples: no power, no counter.
    marked = df.filter(pl.col("power_w").is_null())
    assert marked.height >= 1 and marked["energy_j"].null_count() == marked.height
    assert marked["timestamp"].min() > stopped
    real = df.filter(pl.col("power_w").is_not_null())
    # Reads resumed: scrapes from after the restart arrived, each (device, time) once.
    assert real.filter(pl.col("timestamp") > restarted).height >= 2
    assert real.filter(pl.col("timestamp") < stopped).height >= 2
    assert real.select("device", "timestamp").n_unique() == real.height
    ts = real.sort("timestamp")["timestamp"]
    assert ts.is_sorted()
    # The outage is a hole in the samples (no scrape while Prometheus was down)...
    step = ts.diff().dt.total_seconds().drop_nulls()
    assert step.max() >= 3.0
    # ... yet no energy is lost: the DCGM counter spans it, and energy integration uses it.
    from estimators.energy import run_energy

    tot = run_energy(real.with_columns(source=pl.lit("dcgm")))
    by_time = real.sort("timestamp")
    counter_j = by_time["energy_j"][-1] - by_time["energy_j"][0]
    assert tot["energy_j"][0] == pytest.approx(counter_j, rel=1e-9)
    assert tot["method"][0] == "counter"


# ------------------------------------------------------------------------------ a node dies


def test_a_worker_node_removed_mid_job_leaves_a_failed_run_with_what_was_measured(
    cluster: dict[str, Any], trace: pl.DataFrame
) -> None:
    from cluster.runner import run_job
    from profiler.store import Store

    c = cluster["cluster"]
    node = c.add_node(
        num_cpus=1, object_store_memory=100 * 1024 * 1024, resources={"node_type:gpu-c": 1}
    )
    c.wait_for_nodes()
    _wait("the gpu-c node", lambda: "gpu-c" in _node_ids(), timeout=120)
    # The aggregator may have been recreated by earlier tests; give it this cluster's sidecars.
    agg = cluster["agg"]
    ray.get(agg.start_sidecars.remote(_replay(trace, _anchor()), dict(SIDECAR)), timeout=120)
    result: dict[str, Any] = {}
    run_id = "node-dies"

    def job() -> None:
        try:
            result["ok"] = run_job(
                [sys.executable, "-c", "import time; time.sleep(300)"],
                node_type="gpu-c",
                run_id=run_id,
                epochs=4,
                store_root=str(cluster["store"]),
            )
        except Exception as err:
            result["error"] = err

    t = threading.Thread(target=job, daemon=True)
    t.start()
    store = Store(cluster["store"])
    _wait(
        "samples of the job",
        lambda: ray.get(agg.status.remote(run_id), timeout=30)["samples"] >= 10,
        timeout=180,
    )
    c.remove_node(node)
    t.join(timeout=240)
    assert not t.is_alive(), "run_job did not return after its node died"
    assert "error" in result  # the job's actor died with its node
    row = store.run(run_id)
    assert row["status"] == "failed"
    measured = store.samples(run_id)
    assert measured.height >= 10
    assert measured.select("node", "device", "timestamp").n_unique() == measured.height
    from estimators.energy import run_energy

    assert row["energy_j"] == pytest.approx(float(run_energy(measured)["energy_j"][0]), rel=1e-6)
    assert row["energy_j"] > 0
    status = ray.get(agg.status.remote(run_id), timeout=60)
    assert status["status"] == "failed"
