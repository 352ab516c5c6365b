"""The dcgm-exporter look-alike, the DCGM sources against it and a real Prometheus, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from profiler.errors import SourceUnavailableError
from profiler.exporter import DcgmExporter
from profiler.importers.dcgm import parse_dcgm_text
from profiler.sources.dcgm import DcgmExporterSource, DcgmPrometheusSource
from profiler.sources.replay import ReplaySource
from profiler.store import Store

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seaa2023"
ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = "/usr/bin/prometheus"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def flat_trace(seconds: int = 600) -> pl.DataFrame:
    """GPU a at a steady 100 W, GPU b at 250 W, 1 Hz."""
    ts = [T0 + timedelta(seconds=i) for i in range(seconds)]
    return pl.DataFrame(
        {
            "device": ["a"] * seconds + ["b"] * seconds,
            "timestamp": ts + ts,
            "power_w": [100.0] * seconds + [250.0] * seconds,
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.fixture
def exporter() -> Iterator[DcgmExporter]:
    src = ReplaySource(flat_trace(), device_prefix="", loop=True, counter=True, model="Fake H100")
    with DcgmExporter(src, node="node-a") as exp:
        yield exp


def test_exporter_text_parses_back(exporter: DcgmExporter) -> None:
    time.sleep(1.05)
    text = get(exporter.url)
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter" in text
    assert "# TYPE DCGM_FI_DEV_POWER_USAGE gauge" in text
    line = next(x for x in text.splitlines() if x.startswith('DCGM_FI_DEV_POWER_USAGE{gpu="1"'))
    assert 'modelName="Fake H100",Hostname="node-a"} 250.000000' in line
    df = parse_dcgm_text(text, timestamp=T0).sort("power_w")
    assert df["power_w"].to_list() == [100.0, 250.0]
    # One second of trace played: 100 J and 250 J (trapezoids of flat power), sent as mJ.
    assert df["energy_j"].to_list() == [100.0, 250.0]
    assert df["node"].to_list() == ["node-a", "node-a"]
    assert get(exporter.url.replace("/metrics", "/")).startswith("wattwise dcgm-exporter")


def test_exporter_source_scrapes_directly(exporter: DcgmExporter) -> None:
    src = DcgmExporterSource(exporter.url)
    seen = []
    for _ in range(3):
        seen += src.read()
        time.sleep(0.5)
    by: dict[str, list[float]] = {}
    for s in seen:
        assert s.source == "dcgm" and s.model == "Fake H100"
        by.setdefault(str(s.power_w), []).append(s.energy_j or 0.0)
    assert sorted(by) == ["100.0", "250.0"]
    for counters in by.values():
        assert counters == sorted(counters)


def test_a_job_attached_by_gpu_index_gets_its_dcgm_gpu(
    exporter: DcgmExporter, tmp_path: Path
) -> None:
    """Ray hands a job GPU indices; DCGM names devices by UUID: the source maps one to the other."""
    from profiler.sidecar import Sidecar

    src = DcgmExporterSource(exporter.url)
    uuids = {s.power_w: s.device for s in src.read()}
    assert src.device_aliases == {"0": uuids[100.0], "1": uuids[250.0]}
    got: list[pl.DataFrame] = []
    side = Sidecar([src], node="node-a", receiver=got.append, journal=tmp_path / "j")
    side.attach_job("job-1", gpus=["1"])
    for _ in range(3):
        side.tick()
        time.sleep(0.3)
    side.cut()
    side.ship()
    df = pl.concat(got)
    mine = df.filter(pl.col("run_id") == "job-1")
    assert mine.height >= 3 and set(mine["device"]) == {uuids[250.0]}
    assert set(mine["power_w"]) == {250.0}
    assert df.filter(pl.col("device") == uuids[100.0])["run_id"].is_null().all()
    side.close()


def test_exporter_source_unreachable() -> None:
    with pytest.raises(SourceUnavailableError, match="cannot reach dcgm-exporter at .*9400"):
        DcgmExporterSource(f"http://127.0.0.1:{free_port()}/metrics")


@pytest.mark.shared_data
def test_exporter_serves_an_nvidia_smi_csv() -> None:
    csv = SHARED / "nvidia-smi-cloud-vgg16-00.csv"
    if not csv.is_file():
        pytest.skip(f"shared dataset absent: {csv}")
    with DcgmExporter.for_file(str(csv), speed=1.0, node="cloud") as exp:
        df = parse_dcgm_text(get(exp.url), timestamp=T0)
    # The first CSV row: 8.14 W, 27 C, 11051 MiB used, on an RTX 3090.
    assert df.select("power_w", "temp_c", "mem_used_mib", "model").row(0) == (
        8.14,
        27.0,
        11051.0,
        "NVIDIA GeForce RTX 3090",
    )


# -- a real Prometheus -----------------------------------------------------------------------
@pytest.fixture
def prometheus(tmp_path: Path, exporter: DcgmExporter) -> Iterator[str]:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"Prometheus binary absent at {PROMETHEUS} (apt-get install prometheus)")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: dcgm\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{exporter.port}']\n"
    )
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                q = get(url + "/api/v1/query?query=count_over_time(DCGM_FI_DEV_POWER_USAGE[1m])")
                res = json.loads(q)["data"]["result"]
                if res and min(int(r["value"][1]) for r in res) >= 3:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(
                    "Prometheus did not scrape 3 times in 15 s: "
                    + (tmp_path / "prometheus.log").read_text()[-2000:]
                )
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_dcgm_source_through_a_real_prometheus(prometheus: str, exporter: DcgmExporter) -> None:
    src = DcgmPrometheusSource(prometheus, hostname="node-a", lookback_s=60)
    first = src.read()
    per_dev: dict[str, list] = {}
    for s in first:
        per_dev.setdefault(s.device, []).append(s)
    assert len(per_dev) == 2
    for ss in per_dev.values():
        assert len(ss) >= 3  # every scrape once, with its own time
        assert len({s.power_w for s in ss}) == 1
        ts = [s.timestamp for s in ss]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)
        e = [s.energy_j for s in ss]
        assert e == sorted(e) and e[-1] > e[0]
        watts = ss[0].power_w
        rate = (e[-1] - e[0]) / (ts[-1] - ts[0]).total_seconds()
        assert rate == pytest.approx(watts, rel=0.35)  # 1 Hz steps against scrape times
        assert ss[0].model == "Fake H100"
    assert sorted(ss[0].power_w for ss in per_dev.values()) == [100.0, 250.0]
    time.sleep(1.2)
    second = src.read()  # only scrapes newer than the first read's
    last = {d: max(s.timestamp for s in ss) for d, ss in per_dev.items()}
    assert second and all(s.timestamp > last[s.device] for s in second)
    with pytest.raises(SourceUnavailableError, match=r"hosts it has: \['node-a'\]"):
        DcgmPrometheusSource(prometheus, hostname="node-b")


def test_dcgm_query_outage_loses_no_scrape(prometheus: str, exporter: DcgmExporter) -> None:
    """Prometheus keeps scraping while the source cannot query it: the next read fills the hole."""
    from prometheus_api_client import PrometheusConnect

    src = DcgmPrometheusSource(prometheus, hostname="node-a", lookback_s=60, timeout_s=1)
    assert set(src.device_aliases) == {"0", "1"}
    first = src.read()
    good = src._prom
    src._prom = PrometheusConnect(url=f"http://127.0.0.1:{free_port()}", disable_ssl=True)
    with pytest.raises(SourceUnavailableError):
        src.read()
    time.sleep(4.0)  # about four scrapes happen meanwhile
    with pytest.raises(SourceUnavailableError):
        src.read()
    src._prom = good
    after = src.read()
    for dev in {s.device for s in first}:
        ts = sorted(s.timestamp for s in first + after if s.device == dev)
        steps = [(b - a).total_seconds() for a, b in zip(ts, ts[1:], strict=False)]
        # Every 1 s scrape is there: no step spans the outage.
        assert max(steps) < 2.5, steps
        assert len(ts) == len(set(ts))


def test_dcgm_prometheus_unreachable() -> None:
    with pytest.raises(SourceUnavailableError, match="cannot reach Prometheus at"):
        DcgmPrometheusSource(f"http://127.0.0.1:{free_port()}", hostname="x", timeout_s=1)


# -- CLI -------------------------------------------------------------------------------------
WATTWISE = [sys.executable, "-m", "cluster.cli"]


def test_cli_sample_replay_into_store(tmp_path: Path) -> None:
    trace = tmp_path / "t.parquet"
    flat_trace(seconds=50).write_parquet(trace)
    out = subprocess.run(
        [
            *WATTWISE,
            "sample",
            "--source",
            "replay",
            "--replay",
            str(trace),
            "--speed",
            "100",
            "--interval",
            "0.1",
            "--run",
            "r-cli",
            "--store",
            str(tmp_path / "s"),
            "--journal",
            str(tmp_path / "j"),
            "--node",
            "n1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["samples"] == stats["sent"] == 100 and stats["lost"] == 0
    df = Store(tmp_path / "s").samples("r-cli")
    assert df.height == 100 and set(df["power_w"].to_list()) == {100.0, 250.0}


def test_cli_sample_errors(tmp_path: Path) -> None:
    out = subprocess.run(
        [*WATTWISE, "sample", "--source", "replay", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "wattwise sample: error: --source replay needs --replay FILE (a trace to play)"
    )
    if not Path("/sys/class/powercap/intel-rapl:0").exists():
        out = subprocess.run(
            [*WATTWISE, "sample", "--source", "rapl", "--store", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert out.returncode == 1 and "no readable intel-rapl zones" in out.stderr


def test_cli_exporter_serves_until_stopped(tmp_path: Path) -> None:
    trace = tmp_path / "t.parquet"
    flat_trace(seconds=20).write_parquet(trace)
    port = free_port()
    proc = subprocess.Popen(
        [
            *WATTWISE,
            "exporter",
            "--replay",
            str(trace),
            "--port",
            str(port),
            "--gpus",
            "2",
            "--model",
            "Fake A100",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                text = get(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(
                        f"exporter did not come up: {proc.stderr.read() if proc.stderr else ''}"
                    )
                time.sleep(0.2)
        df = parse_dcgm_text(text, timestamp=T0)
        assert df.height == 2 and set(df["model"].to_list()) == {"Fake A100"}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
