"""Every PromQL expression of every Grafana panel returns data from a real Prometheus.

A real ``prometheus`` (Debian's, installed by ``.ci/run``) scrapes, once a
second and with the jobs of ``deploy/prometheus/prometheus.yml``, the metrics
of an aggregator that is ingesting a job built from a real SEAA 2023 trace
(plus the real runs imported into its store and a real PRE retrain), and the
dcgm-exporter look-alike replaying real traces.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from cluster.aggregator import Aggregator
from cluster.metrics import serve_metrics, sidecar_stats_of, stop_metrics
from cluster.retrain import retrain
from profiler.exporter import DcgmExporter
from profiler.importers.seaa2023 import import_seaa2023
from profiler.sidecar import Sidecar
from profiler.sources.replay import ReplaySource, load_trace
from profiler.store import Store

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
LIVE_RUN = "live-vgg16"
TRACE_RUN = "cloud-vgg16-00"  # 98 epochs in 3672 s on an RTX 3090
FIRST_EPOCHS = 12
SUBSTITUTIONS = {"$run_id": LIVE_RUN, "$__range": "1h"}

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def live_job(shared: Path) -> tuple[dict[str, Any], pl.DataFrame, pl.DataFrame]:
    """A run record, samples and epoch marks of a job replayed from a real trace.

    The trace has no epoch boundaries; it is cut into the run's real number of
    epochs of equal length (duration / trained epochs).
    """
    runs = pl.read_parquet(shared / "runs.parquet").filter(pl.col("run_id") == TRACE_RUN)
    r = runs.row(0, named=True)
    trace = load_trace(shared / "traces.parquet", run_ids=[TRACE_RUN])
    epoch_s = r["duration_s"] / r["trained_epochs"]
    t0 = trace["timestamp"][0]
    samples = trace.select(
        pl.lit(LIVE_RUN).alias("run_id"),
        pl.lit("gpu-node-3090-1").alias("node"),
        pl.lit("0").alias("device"),
        "timestamp",
        "power_w",
        pl.lit(None, dtype=pl.Float64).alias("energy_j"),
        pl.lit("replay").alias("source"),
    ).filter(pl.col("power_w").is_not_null())
    n = r["trained_epochs"]
    marks = pl.DataFrame(
        {
            "run_id": [LIVE_RUN] * n,
            "epoch": list(range(n)),
            "start": [t0 + dt.timedelta(seconds=i * epoch_s) for i in range(n)],
            "end": [t0 + dt.timedelta(seconds=(i + 1) * epoch_s) for i in range(n)],
        }
    )
    record = {
        "run_id": LIVE_RUN,
        "job_name": "vgg16-finetune",
        "node_type": "cloud",
        "gpu_model": r["gpu_model"],
        "gpu_count": 1,
        "architecture": "vgg16",
        "batch_size": 32,
        "training_size": r["training_size"],
        "planned_epochs": n,
    }
    return record, samples, marks


def feed_epochs(
    agg: Aggregator, samples: pl.DataFrame, marks: pl.DataFrame, a: int, b: int
) -> None:
    """Ingest epochs a..b-1: their marks and samples up to 1 s past the last end."""
    lo = marks["start"][a]
    hi = marks["end"][b - 1] + dt.timedelta(seconds=1)
    agg.ingest_epochs(marks.slice(a, b - a))
    agg.ingest_samples(samples.filter((pl.col("timestamp") >= lo) & (pl.col("timestamp") <= hi)))


def promql_expressions() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) of every target of every panel."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for p in dash["panels"]:
            for t in p["targets"]:
                out.append((path.name, p["title"], t["expr"]))
    return out


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted template variable in {expr!r}"
    return expr


@pytest.fixture
def stack(shared_data: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Store with the real runs and a PRE model, a live aggregator, a sidecar, the exporter."""
    if not Path(PROMETHEUS).is_file():
        pytest.skip(f"prometheus not installed at {PROMETHEUS} (apt-get install prometheus)")
    store = Store(tmp_path / "store")
    import_seaa2023(store, shared_data, progress=False)
    retrain(store)
    agg = Aggregator(store)
    record, samples, marks = live_job(shared_data)
    agg.start_run(record)
    feed_epochs(agg, samples, marks, 0, FIRST_EPOCHS)

    replay = ReplaySource.from_file(
        str(shared_data / "traces.parquet"), run_ids=["cloud-mobilenet_v2-00"], speed=1.0
    )
    sidecar = Sidecar(
        [replay],
        node="gpu-node-3090-2",
        interval_s=0.2,
        batch_interval_s=0.5,
        receiver=agg.ingest_samples,
        journal=tmp_path / "journal",
    ).start()
    port = serve_metrics(agg, sidecar_stats=sidecar_stats_of({"gpu-node-3090-2": sidecar}))
    exporter = DcgmExporter.for_file(
        str(shared_data / "traces.parquet"),
        run_ids=["cloud-vgg16-01", "local-v2-mobilenet_v2-00"],
        node="gpu-node-3090-1",
    ).start()

    stop = threading.Event()

    def trickle() -> None:  # one more epoch every 0.5 s: the job keeps running
        e = FIRST_EPOCHS
        while not stop.wait(0.5) and e < 40:
            feed_epochs(agg, samples, marks, e, e + 1)
            e += 1

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()

    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    targets = {
        "wattwise-aggregator": f"127.0.0.1:{port}",
        "dcgm-exporter": f"127.0.0.1:{exporter.port}",
    }
    assert {j["job_name"] for j in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    prom_port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(
                    f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()}"
                )
            time.sleep(0.2)
        yield {"url": url, "agg": agg, "store": store, "sidecar": sidecar}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        stop.set()
        feeder.join(timeout=5)
        sidecar.stop()
        exporter.stop()
        stop_metrics(port)


def test_every_dashboard_expression_returns_data(stack: dict[str, Any]) -> None:
    from prometheus_api_client import PrometheusConnect

    prom = PrometheusConnect(url=stack["url"], disable_ssl=True)
    exprs = promql_expressions()
    assert len(exprs) >= 25  # three dashboards, every panel counted
    assert {e[0] for e in exprs} == {"cluster-overview.json", "job.json", "fleet.json"}
    pending = {(d, t, substitute(x)) for d, t, x in exprs}
    results: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 30  # rate() over [1m] needs two scrapes of a moving counter
    while pending and time.monotonic() < deadline:
        time.sleep(1.0)
        for item in sorted(pending):
            res = prom.custom_query(item[2])
            if res:
                results[item[2]] = res
                pending.discard(item)
    assert not pending, f"expressions without data: {sorted(pending)}"

    # The scraped numbers are the aggregator's.
    energy = results[f'wattwise_job_energy_joules_total{{run_id="{LIVE_RUN}"}}'][0]
    assert energy["metric"]["job"] == "wattwise-aggregator"
    assert energy["metric"]["job_name"] == "vgg16-finetune"
    assert energy["metric"]["node_type"] == "cloud"
    measured = stack["agg"].status(LIVE_RUN)["measured_energy_j"]
    # The job keeps running; the last scrape is at most a few epochs (12.5 kJ each) behind.
    assert 0 < float(energy["value"][1]) <= measured
    assert measured - float(energy["value"][1]) < 5 * 13_000
    stable = results[f'wattwise_job_stable{{run_id="{LIVE_RUN}"}}'][0]
    assert stable["value"][1] == "1"  # STEP is stable after 12 epochs of this trace
    power = results[f'wattwise_job_power_watts{{run_id="{LIVE_RUN}"}}'][0]
    assert 250 < float(power["value"][1]) < 420  # an RTX 3090 fine-tuning VGG16 (350 W cap)
    version = results["wattwise_pre_model_version"][0]
    assert version["value"][1] == "1"
    # Energy per sample on the RTX 3090 box for VGG16: total energy / samples seen, from the store.
    runs = (
        stack["store"]
        .runs()
        .filter((pl.col("node_type") == "cloud") & (pl.col("architecture") == "vgg16"))
    )
    expected = runs["energy_j"].sum() / (runs["trained_epochs"] * runs["training_size"]).sum()
    eps = {
        (r["metric"]["node_type"], r["metric"]["architecture"]): float(r["value"][1])
        for r in results["wattwise_node_type_energy_per_sample_joules"]
    }
    assert eps[("cloud", "vgg16")] == pytest.approx(expected, rel=1e-9)
