"""Power sources: the shared contract, then each backend (replay, modelled, RAPL, NVML)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import polars as pl
import pytest

from profiler.errors import (
    BadInputError,
    NotSupportedError,
    PermissionDeniedError,
    SourceUnavailableError,
)
from profiler.sources import open_source, source_class
from profiler.sources.base import PowerSample, PowerSource, SampleGuard, samples_frame
from profiler.sources.modelled import ModelledCpuSource
from profiler.sources.rapl import RaplSource
from profiler.sources.replay import ReplaySource, load_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seaa2023"
T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)


class StepClock:
    """A monotonic clock the test advances by hand (seconds)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def small_trace() -> pl.DataFrame:
    """Two devices, 1 Hz, hand-made: device a at 100, 110, 120, 130 W; device b at 50 W."""
    ts = [T0 + timedelta(seconds=i) for i in range(4)]
    return pl.DataFrame(
        {
            "device": ["a"] * 4 + ["b"] * 4,
            "model": ["Fake GPU"] * 8,
            "timestamp": ts + ts,
            "power_w": [100.0, 110.0, 120.0, 130.0, 50.0, 50.0, 50.0, 50.0],
        }
    )


# -- fake hardware ---------------------------------------------------------------------------
def make_rapl_tree(root: Path, *, pkg_uj: int = 1_000_000, max_uj: int = 10_000_000) -> Path:
    """A powercap tree with package 0 (+dram and core sub-zones) and a non-RAPL zone."""
    zones = {
        "intel-rapl:0": ("package-0", pkg_uj),
        "intel-rapl:0:0": ("core", 500),
        "intel-rapl:0:1": ("dram", 2_000_000),
    }
    write_rapl_zones(root, zones, max_uj=max_uj)
    (root / "intel-rapl-mmio:0").mkdir()
    return root


def write_rapl_zones(root: Path, zones: dict[str, tuple[str, int]], *, max_uj: int) -> None:
    """Powercap zone folders: ``{folder: (name, energy_uj)}``, each with its counter range."""
    for d, (name, uj) in zones.items():
        (root / d).mkdir(parents=True)
        (root / d / "name").write_text(name + "\n")
        (root / d / "energy_uj").write_text(f"{uj}\n")
        (root / d / "max_energy_range_uj").write_text(f"{max_uj}\n")


def set_uj(root: Path, zone: str, uj: int) -> None:
    (root / zone / "energy_uj").write_text(f"{uj}\n")


class FakeGpus:
    """State behind pynvml patched with autospec: per-GPU power (mW) and counter (mJ)."""

    def __init__(self, n: int, *, counter: bool = True, mig: bool = False) -> None:
        self.power_mw = [200_000] * n
        self.energy_mj = [5_000_000] * n
        self.counter = counter
        self.mig = mig

    def patch(self, stack: ExitStack) -> None:
        import pynvml

        def p(name: str, **kw: object) -> mock.MagicMock:
            return stack.enter_context(mock.patch.object(pynvml, name, autospec=True, **kw))

        def energy(h: int) -> int:
            if not self.counter:
                raise pynvml.NVMLError_NotSupported()
            return self.energy_mj[h]

        rates = mock.Mock(gpu=87, memory=40)
        p("nvmlInit")
        p("nvmlShutdown")
        p("nvmlDeviceGetCount", return_value=len(self.power_mw))
        p("nvmlDeviceGetHandleByIndex", side_effect=lambda i: i)
        p("nvmlDeviceGetName", return_value="NVIDIA H100 80GB HBM3")
        p("nvmlDeviceGetUUID", side_effect=lambda h: f"GPU-{h:08d}")
        p("nvmlDeviceGetMigMode", return_value=[1 if self.mig else 0, 0])
        p("nvmlDeviceGetTotalEnergyConsumption", side_effect=energy)
        p("nvmlDeviceGetPowerUsage", side_effect=lambda h: self.power_mw[h])
        p("nvmlDeviceGetUtilizationRates", return_value=rates)
        p("nvmlDeviceGetMemoryInfo", return_value=mock.Mock(used=3 * 2**30))
        p("nvmlDeviceGetTemperature", return_value=61)

    def advance(self, seconds: float = 0.1) -> None:
        for i, mw in enumerate(self.power_mw):
            self.energy_mj[i] += int(mw * seconds)  # mW * s = mJ


# -- contract --------------------------------------------------------------------------------
SourceFactory = Callable[[Path, ExitStack], tuple[PowerSource, Callable[[], None]]]


def _replay(tmp: Path, stack: ExitStack) -> tuple[PowerSource, Callable[[], None]]:
    clock = StepClock()
    src = ReplaySource(small_trace(), speed=100.0, clock=clock, counter=True)

    def step() -> None:
        clock.t += 0.01

    return src, step


def _modelled(tmp: Path, stack: ExitStack) -> tuple[PowerSource, Callable[[], None]]:
    return ModelledCpuSource(65.0), lambda: time.sleep(0.02)


def _process(tmp: Path, stack: ExitStack) -> tuple[PowerSource, Callable[[], None]]:
    import subprocess
    import sys

    busy = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 30: pass"
    proc = subprocess.Popen([sys.executable, "-c", busy])
    stack.callback(proc.wait)
    stack.callback(proc.kill)
    return open_source("process", proc.pid, 65.0), lambda: time.sleep(0.05)


def _rapl(tmp: Path, stack: ExitStack) -> tuple[PowerSource, Callable[[], None]]:
    root = make_rapl_tree(tmp / "powercap")
    src = RaplSource(root)
    state = {"pkg": 1_000_000, "dram": 2_000_000}

    def step() -> None:
        state["pkg"] = (state["pkg"] + 3_000_000) % 10_000_000  # wraps every few steps
        state["dram"] += 100_000
        set_uj(root, "intel-rapl:0", state["pkg"])
        set_uj(root, "intel-rapl:0:1", state["dram"])
        time.sleep(0.002)

    return src, step


def _nvml(tmp: Path, stack: ExitStack) -> tuple[PowerSource, Callable[[], None]]:
    gpus = FakeGpus(2)
    gpus.patch(stack)
    src = open_source("nvml")
    return src, gpus.advance


def _dcgm_exporter(tmp: Path, stack: ExitStack) -> tuple[PowerSource, Callable[[], None]]:
    from profiler.exporter import DcgmExporter

    src = ReplaySource(small_trace(), speed=100.0, device_prefix="", loop=True, counter=True)
    exp = stack.enter_context(DcgmExporter(src, node="n"))
    return open_source("dcgm-exporter", exp.url), lambda: time.sleep(0.02)


CONTRACT: dict[str, SourceFactory] = {
    "dcgm-exporter": _dcgm_exporter,
    "replay": _replay,
    "modelled": _modelled,
    "process": _process,
    "rapl": _rapl,
    "nvml": _nvml,
}


@pytest.fixture(params=sorted(CONTRACT))
def any_source(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, PowerSource, Callable[[], None]]]:
    with ExitStack() as stack:
        src, step = CONTRACT[request.param](tmp_path, stack)
        yield request.param, src, step
        src.close()


def test_contract(any_source: tuple[str, PowerSource, Callable[[], None]]) -> None:
    """Timestamps never go backwards, power is never negative, counters are monotonic."""
    name, src, step = any_source
    assert isinstance(src, PowerSource)
    seen: list[PowerSample] = []
    for _ in range(6):
        step()
        seen.extend(src.read())
    assert seen, f"{name} gave no samples"
    by_dev: dict[str, list[PowerSample]] = {}
    for s in seen:
        assert s.source == src.name
        assert s.timestamp.tzinfo is not None and s.timestamp.utcoffset() == timedelta(0)
        assert s.power_w is None or (math.isfinite(s.power_w) and s.power_w >= 0)
        by_dev.setdefault(s.device, []).append(s)
    for dev, ss in by_dev.items():
        ts = [s.timestamp for s in ss]
        assert ts == sorted(ts) and len(set(ts)) == len(ts), f"{name} {dev}: time went back"
        counters = [s.energy_j for s in ss if s.energy_j is not None]
        assert counters == sorted(counters), f"{name} {dev}: counter went back"
    # The frame helper accepts every source's samples as store rows.
    df = samples_frame(seen, node="n1", run_id="r-1")
    assert df.height == len(seen)
    assert set(df["source"].to_list()) == {src.name}


def test_registry_names_every_backend() -> None:
    assert source_class("rapl") is RaplSource
    with pytest.raises(BadInputError, match=r"unknown power source 'gpu'; expected one of"):
        source_class("gpu")


# -- base: guard and frame -------------------------------------------------------------------
def _s(t: int, power: float | None, energy: float | None = None, dev: str = "0") -> PowerSample:
    return PowerSample(dev, None, T0 + timedelta(seconds=t), power, energy, source="nvml")


def test_guard_marks_bad_values_and_reports_once_per_incident(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = SampleGuard("nvml")
    readings = [
        _s(0, 100.0, 10.0),
        _s(1, -5.0, 20.0),  # negative power: incident 1
        _s(2, float("nan"), 30.0),  # same incident continues: not logged again
        _s(3, 100.0, 25.0),  # counter backwards: incident 2
        _s(4, 100.0, 35.0),
        _s(4, 100.0, 36.0),  # same timestamp again: dropped, incident 3
        _s(5, float("inf"), 45.0),  # power bad again after a good one: incident 4
    ]
    with caplog.at_level(logging.WARNING):
        out = guard.check(readings)
    assert [s.power_w for s in out] == [100.0, None, None, 100.0, 100.0, None]
    assert [s.energy_j for s in out] == [10.0, 20.0, 30.0, None, 35.0, 45.0]
    assert out[1].note == "bad power -5.0"
    assert guard.incidents == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert "expected a finite power >= 0 W; got -5.0" in warnings[0]
    assert "went backwards from 30.0 J to 25.0 J" in warnings[1]


def test_samples_frame_is_store_schema() -> None:
    df = samples_frame([_s(1, 10.0), _s(0, None, 1.5)], node="n", run_id=None)
    assert df["timestamp"].dtype == pl.Datetime("us", "UTC")
    assert df["power_w"].to_list() == [None, 10.0]  # sorted by time
    assert df["energy_j"].to_list() == [1.5, None]
    assert df["node"].to_list() == ["n", "n"]


# -- replay ----------------------------------------------------------------------------------
def test_replay_releases_samples_at_speed_with_exact_offsets() -> None:
    clock = StepClock()
    anchor = datetime(2030, 1, 1, tzinfo=UTC)
    src = ReplaySource(small_trace(), speed=2.0, clock=clock, anchor=anchor, model="Fake H100")
    first = src.read()  # offset 0 is due at once
    assert [(s.device, s.power_w) for s in first] == [("a", 100.0), ("b", 50.0)]
    clock.t += 0.75  # 1.5 s of trace: offset 1 s due, 2 s not yet
    second = src.read()
    assert [(s.device, s.timestamp) for s in second] == [
        ("a", anchor + timedelta(seconds=1)),
        ("b", anchor + timedelta(seconds=1)),
    ]
    assert {s.model for s in second} == {"Fake H100"}
    clock.t += 10
    rest = src.read()
    assert [s.power_w for s in rest if s.device == "a"] == [120.0, 130.0]
    assert src.exhausted and src.read() == []


def test_replay_loop_and_counter_keep_increasing() -> None:
    clock = StepClock()
    src = ReplaySource(
        small_trace().filter(pl.col("device") == "a"),
        clock=clock,
        loop=True,
        counter=True,
        device_prefix="",
    )
    clock.t += 4.5  # one lap is 3 s + 1 s step: offsets 0..3 and the next lap's 0
    got = src.read()
    # Trapezoids: 105 + 115 + 125 = 345 J after the first lap, then the 1 s step back to
    # the first sample: (130 + 100) / 2 = 115 J more (the counter never stalls).
    assert [s.energy_j for s in got] == [0.0, 105.0, 220.0, 345.0, 460.0]
    assert [s.device for s in got] == ["0"] * 5
    assert got[4].timestamp - got[3].timestamp == timedelta(seconds=1)
    assert not src.exhausted


@pytest.mark.parametrize("speed", [0, -1.0, math.nan, math.inf])
def test_replay_rejects_bad_speed(speed: float) -> None:
    """Regression: ``--speed inf`` was accepted, then every read raised OverflowError."""
    with pytest.raises(
        BadInputError,
        match=rf"replay speed \(--speed\) must be a finite number > 0 .*; found {speed}$",
    ):
        ReplaySource(small_trace(), speed=speed)


def test_replay_rejects_empty_trace() -> None:
    with pytest.raises(BadInputError, match="at least one sample; it is empty"):
        ReplaySource(small_trace().clear())


def test_load_trace_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        load_trace(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    pl.DataFrame({"timestamp": [T0], "watts": [1.0]}).write_parquet(bad)
    with pytest.raises(BadInputError, match=r"missing \['power_w'\]"):
        load_trace(bad)


@pytest.mark.shared_data
def test_replay_fidelity_on_shared_traces() -> None:
    """Replaying whole runs of the shared traces at 100x gives their energy within 0.1 %."""
    from estimators.energy import run_energy

    traces = SHARED / "traces.parquet"
    if not traces.is_file():
        pytest.skip(f"shared dataset absent: {traces}")
    runs = ["cloud-vgg16-00", "local-v2-nasnet_mobile-17", "cloud-mobilenet_v2-00"]
    trace = load_trace(traces, run_ids=runs)
    clock = StepClock()
    src = ReplaySource(trace, speed=100.0, clock=clock)
    played: list[PowerSample] = []
    while not src.exhausted:
        clock.t += 0.1  # a sidecar tick at 10 Hz: 10 trace seconds
        played.extend(src.read())
    got = samples_frame(played, node="replay").with_columns(run_id=pl.col("device"))
    want = trace.with_columns(run_id=pl.col("device"), node=pl.lit("n"), source=pl.lit("replay"))
    e_got = run_energy(got).sort("run_id")
    e_want = run_energy(want).sort("run_id")
    assert e_got["run_id"].to_list() == sorted(runs)
    for a, b in zip(e_got["energy_j"], e_want["energy_j"], strict=True):
        assert a == pytest.approx(b, rel=1e-3)
        assert b > 1e5  # whole runs, not slivers


# -- modelled --------------------------------------------------------------------------------
def test_modelled_is_util_times_board_power(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 1 1 1\n")
    src = ModelledCpuSource(200.0, proc_stat=stat, cpuinfo=tmp_path / "none")
    # +300 busy (user) and +100 idle jiffies: 75 % busy.
    stat.write_text("cpu  400 0 100 900 0 0 0 0 0 0\n")
    (s,) = src.read()
    assert s.power_w == pytest.approx(150.0)
    assert s.gpu_util_pct == pytest.approx(75.0)
    assert s.source == "modelled" and s.energy_j is None


def test_modelled_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="idle_w <= board_power_w; found board_power_w=10"):
        ModelledCpuSource(10.0, idle_w=20.0)
    with pytest.raises(SourceUnavailableError, match="cannot read .*missing"):
        ModelledCpuSource(10.0, proc_stat=tmp_path / "missing")


# -- RAPL ------------------------------------------------------------------------------------
def test_rapl_counts_joules_across_a_wrap(tmp_path: Path) -> None:
    root = make_rapl_tree(tmp_path, pkg_uj=9_000_000, max_uj=10_000_000)
    src = RaplSource(root)
    assert src.devices == ["package-0", "dram-0"]  # core left out: inside the package
    set_uj(root, "intel-rapl:0", 9_500_000)
    set_uj(root, "intel-rapl:0:1", 2_250_000)
    first = {s.device: s for s in src.read()}
    assert first["package-0"].energy_j == pytest.approx(0.5)
    assert first["dram-0"].energy_j == pytest.approx(0.25)
    set_uj(root, "intel-rapl:0", 1_500_000)  # wrapped: 0.5 J to the top, then 1.5 J
    time.sleep(0.01)
    second = {s.device: s for s in src.read()}
    assert second["package-0"].energy_j == pytest.approx(0.5 + 2.0)
    dt = (second["package-0"].timestamp - first["package-0"].timestamp).total_seconds()
    assert second["package-0"].power_w == pytest.approx(2.0 / dt, rel=0.05)
    assert second["dram-0"].power_w == 0.0


def test_rapl_absent_and_permission(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailableError, match="no readable intel-rapl zones under"):
        RaplSource(tmp_path / "nothing")
    root = make_rapl_tree(tmp_path / "pc")
    (root / "intel-rapl:0" / "energy_uj").chmod(0o000)
    import os

    if os.geteuid() == 0:  # root reads anything: simulate the kernel's refusal differently
        (root / "intel-rapl:0" / "energy_uj").unlink()
        (root / "intel-rapl:0" / "energy_uj").mkdir()
        with pytest.raises(SourceUnavailableError, match="cannot read an integer from"):
            RaplSource(root)
    else:
        with pytest.raises(PermissionDeniedError, match="readable by root only"):
            RaplSource(root)


# -- NVML ------------------------------------------------------------------------------------
def test_nvml_without_a_gpu_is_unavailable() -> None:
    """The real pynvml on this machine: no driver library."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML; the no-GPU path cannot be seen here")
    with pytest.raises(SourceUnavailableError, match=r"NVML: initialising NVML .* failed") as ei:
        open_source("nvml")
    assert isinstance(ei.value.__cause__, pynvml.NVMLError)


def test_nvml_converts_counter_mj_and_power_mw() -> None:
    gpus = FakeGpus(2)
    gpus.power_mw = [250_000, 75_500]
    with ExitStack() as stack:
        gpus.patch(stack)
        src = open_source("nvml")
        a = src.read()
        gpus.advance(2.0)
        b = src.read()
        src.close()
    assert [s.power_w for s in a] == [250.0, 75.5]
    assert [s.energy_j for s in a] == [5000.0, 5000.0]
    assert [s.energy_j for s in b] == [5500.0, 5151.0]  # +500 J and +151 J over 2 s
    assert a[0].model == "NVIDIA H100 80GB HBM3" and a[0].device == "0"
    assert a[0].mem_used_mib == 3072.0 and a[0].gpu_util_pct == 87.0 and a[0].temp_c == 61.0


def test_nvml_pre_volta_uses_power_only() -> None:
    gpus = FakeGpus(1, counter=False)
    with ExitStack() as stack:
        gpus.patch(stack)
        (s,) = open_source("nvml").read()
    assert s.energy_j is None and s.power_w == 200.0


@pytest.mark.parametrize(
    ("error", "expected", "text"),
    [
        ("NVMLError_NoPermission", PermissionDeniedError, "refuses this user"),
        ("NVMLError_DriverNotLoaded", SourceUnavailableError, "kernel driver is not loaded"),
        ("NVMLError_LibraryNotFound", SourceUnavailableError, "libnvidia-ml.so is not installed"),
        ("NVMLError_NotSupported", NotSupportedError, "does not support it"),
    ],
)
def test_nvml_error_mapping(error: str, expected: type[Exception], text: str) -> None:
    import pynvml

    gpus = FakeGpus(1)
    with ExitStack() as stack:
        gpus.patch(stack)
        src = open_source("nvml")
        pynvml.nvmlDeviceGetPowerUsage.side_effect = getattr(pynvml, error)()  # type: ignore[attr-defined]
        with pytest.raises(expected, match=text) as ei:
            src.read()
    assert isinstance(ei.value.__cause__, pynvml.NVMLError)


def test_nvml_mig(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(NotSupportedError, match="MIG instance cannot be measured on its own"):
        open_source("nvml", ["MIG-4f0e2a1b-aaaa-bbbb-cccc-0123456789ab"])
    gpus = FakeGpus(1, mig=True)
    with ExitStack() as stack, caplog.at_level(logging.WARNING):
        gpus.patch(stack)
        (s,) = open_source("nvml").read()
    assert s.power_w == 200.0
    assert "MIG mode: NVML reports power and energy for the whole GPU" in caplog.text
