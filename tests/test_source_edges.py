"""Edge cases of the power sources: replay loops and speeds, RAPL psys, one GPU failing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl
import pytest

from estimators.energy import run_energy
from profiler.errors import SourceUnavailableError
from profiler.sidecar import Sidecar
from profiler.sources.base import PowerSample, samples_frame
from profiler.sources.nvml import NvmlSource
from profiler.sources.rapl import RaplSource
from profiler.sources.replay import MAX_LAPS_PER_READ, ReplaySource
from tests.test_sources import T0, StepClock, write_rapl_zones


# -- replay: looping a recorded energy counter ----------------------------------------------
def recorded_nvml_trace(n: int = 60, *, watts: float = 100.0) -> pl.DataFrame:
    """A 1 Hz NVML recording at a steady ``watts``; the counter counts since driver load (5 MJ)."""
    return pl.DataFrame(
        {
            "device": ["0"] * n,
            "model": ["NVIDIA H100 80GB HBM3"] * n,
            "timestamp": [T0 + timedelta(seconds=i) for i in range(n)],
            "power_w": [watts] * n,
            "energy_j": [5_000_000.0 + watts * i for i in range(n)],
        }
    )


def play(src: ReplaySource, clock: StepClock, seconds: float) -> list[PowerSample]:
    clock.t += seconds
    return src.read()


def test_looped_recorded_counter_integrates_to_power_times_time() -> None:
    """Regression: each lap added ``lap * E_last``, so a counter starting at 5 MJ jumped 5 MJ."""
    clock = StepClock()
    src = ReplaySource(recorded_nvml_trace(), loop=True, clock=clock, speed=10.0)
    got = play(src, clock, 3 * 60 / 10.0 - 0.05)  # three laps of 59 s + the 1 s step
    assert len(got) == 180
    counters = [s.energy_j for s in got]
    assert all(c is not None for c in counters)
    assert np.all(np.diff(np.array(counters, dtype=float)) >= 0), "counter went back"
    # Continuous across the laps: 100 W over every 1 s step, the lap boundaries included.
    assert np.diff(np.array(counters, dtype=float)) == pytest.approx(100.0)
    res = run_energy(samples_frame(got, node="n", run_id="r"))
    assert res["duration_s"][0] == pytest.approx(179.0)
    assert res["energy_j"][0] == pytest.approx(100.0 * 179.0, rel=0.01)


def test_looped_counter_with_missing_values_never_goes_back() -> None:
    """A missing (null) counter stays null, and a null last value does not shrink the lap."""
    trace = recorded_nvml_trace(10).with_columns(
        energy_j=pl.when(pl.int_range(pl.len()).is_in([4, 9]))
        .then(None)
        .otherwise(pl.col("energy_j"))
    )
    clock = StepClock()
    src = ReplaySource(trace, loop=True, clock=clock)
    got = play(src, clock, 3 * 10 - 0.5)
    assert len(got) == 30
    assert [s.energy_j is None for s in got[:10]] == [i in (4, 9) for i in range(10)]
    counters = np.array([s.energy_j for s in got if s.energy_j is not None], dtype=float)
    assert np.all(np.diff(counters) >= 0), "counter went back"
    res = run_energy(samples_frame(got, node="n", run_id="r"))
    assert res["energy_j"][0] == pytest.approx(100.0 * 29.0, rel=0.01)


def test_looped_synthetic_counter_counts_the_step_between_laps() -> None:
    """The made-up counter (``counter=True``) also covers the step between two laps."""
    clock = StepClock()
    trace = recorded_nvml_trace(5).drop("energy_j")
    src = ReplaySource(trace, loop=True, counter=True, clock=clock)
    got = play(src, clock, 3 * 5 - 0.5)
    assert [s.energy_j for s in got] == pytest.approx([100.0 * i for i in range(15)])


# -- replay: huge speeds ---------------------------------------------------------------------
def test_huge_speed_plays_the_whole_trace_in_one_read() -> None:
    """Regression: ``speed=1e306`` made ``int(elapsed * speed * 1e6)`` overflow on every read."""
    clock = StepClock()
    src = ReplaySource(recorded_nvml_trace(10), clock=clock, speed=1e306)
    got = play(src, clock, 0.5)
    assert [s.energy_j for s in got] == [5_000_000.0 + 100.0 * i for i in range(10)]
    assert src.exhausted and play(src, clock, 1.0) == []


def test_huge_speed_looping_releases_a_bounded_number_of_laps_per_read() -> None:
    """A looping replay at ``1e306`` neither overflows nor loops forever; laps still join up."""
    clock = StepClock()
    src = ReplaySource(recorded_nvml_trace(10), loop=True, clock=clock, speed=1e306)
    first, second = play(src, clock, 0.5), play(src, clock, 0.5)
    # 16 laps of 10 samples and the next lap's first sample; then 16 laps more.
    assert (len(first), len(second)) == (MAX_LAPS_PER_READ * 10 + 1, MAX_LAPS_PER_READ * 10)
    got = first + second
    steps = np.diff([s.timestamp.timestamp() for s in got])
    assert steps == pytest.approx(1.0)
    assert np.diff(np.array([s.energy_j for s in got], dtype=float)) == pytest.approx(100.0)
    assert not src.exhausted


# -- RAPL: the psys platform zone is not a package ------------------------------------------
def make_client_rapl_tree(root: Path) -> Path:
    """An Intel client's powercap tree: package 0 (core, dram) and the psys platform zone."""
    zones = {
        "intel-rapl:0": ("package-0", 1_000_000),
        "intel-rapl:0:0": ("core", 500_000),
        "intel-rapl:0:2": ("dram", 2_000_000),
        "intel-rapl:1": ("psys", 5_000_000),
    }
    write_rapl_zones(root, zones, max_uj=262143328850)
    return root


def test_rapl_skips_psys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: psys (whole platform, package included) was reported as ``package-1``."""
    root = make_client_rapl_tree(tmp_path / "powercap")
    with caplog.at_level(logging.DEBUG, logger="profiler.sources.rapl"):
        src = RaplSource(root)
    assert src.devices == ["package-0", "dram-0"]
    assert "psys" in caplog.text
    (root / "intel-rapl:0" / "energy_uj").write_text("11000000\n")  # package: +10 J
    (root / "intel-rapl:0:2" / "energy_uj").write_text("3000000\n")  # dram: +1 J
    (root / "intel-rapl:1" / "energy_uj").write_text("20000000\n")  # psys: +15 J
    got = {s.device: s.energy_j for s in src.read()}
    assert got == {"package-0": 10.0, "dram-0": 1.0}


def test_rapl_skips_unknown_top_level_zones(tmp_path: Path) -> None:
    """A top-level zone not named ``package...`` (and its sub-zones) is not a package."""
    root = make_client_rapl_tree(tmp_path / "powercap")
    (root / "intel-rapl:1" / "name").write_text("platform-thing\n")
    write_rapl_zones(root, {"intel-rapl:1:0": ("dram", 7)}, max_uj=262143328850)
    assert RaplSource(root).devices == ["package-0", "dram-0"]
    (root / "intel-rapl:0" / "name").write_text("psys\n")
    with pytest.raises(SourceUnavailableError, match="psys"):
        RaplSource(root)


# -- NVML: one GPU failing does not blank the others ----------------------------------------
class FakeGpus:
    """State behind pynvml patched with autospec: power (mW), counter (mJ), lost GPUs."""

    def __init__(self, n: int) -> None:
        self.power_mw = [250_000 + 1000 * i for i in range(n)]
        self.energy_mj = [5_000_000_000] * n
        self.lost: set[int] = set()

    def patch(self, stack: ExitStack) -> None:
        import pynvml

        def p(name: str, **kw: object) -> mock.MagicMock:
            return stack.enter_context(mock.patch.object(pynvml, name, autospec=True, **kw))

        def check(h: int) -> None:
            if h in self.lost:  # Xid 79: the GPU fell off the bus
                raise pynvml.NVMLError_GpuIsLost()

        def energy(h: int) -> int:
            check(h)
            return self.energy_mj[h]

        def power(h: int) -> int:
            check(h)
            return self.power_mw[h]

        p("nvmlInit")
        p("nvmlShutdown")
        p("nvmlDeviceGetCount", return_value=len(self.power_mw))
        p("nvmlDeviceGetHandleByIndex", side_effect=lambda i: i)
        p("nvmlDeviceGetName", return_value="NVIDIA H100 80GB HBM3")
        p("nvmlDeviceGetUUID", side_effect=lambda h: f"GPU-{h:08d}")
        p("nvmlDeviceGetMigMode", return_value=[0, 0])
        p("nvmlDeviceGetTotalEnergyConsumption", side_effect=energy)
        p("nvmlDeviceGetPowerUsage", side_effect=power)
        p("nvmlDeviceGetUtilizationRates", return_value=mock.Mock(gpu=87, memory=40))
        p("nvmlDeviceGetMemoryInfo", return_value=mock.Mock(used=3 * 2**30))
        p("nvmlDeviceGetTemperature", return_value=61)

    def advance(self, seconds: float = 1.0) -> None:
        for i, mw in enumerate(self.power_mw):
            self.energy_mj[i] += int(mw * seconds)  # mW * s = mJ


@pytest.fixture
def four_gpus() -> Iterator[FakeGpus]:
    gpus = FakeGpus(4)
    with ExitStack() as stack:
        gpus.patch(stack)
        yield gpus


def test_nvml_lost_gpu_is_marked_and_the_others_keep_measuring(four_gpus: FakeGpus) -> None:
    """Regression: one GPU's NVML error made read() raise, blanking every GPU."""
    src = NvmlSource()
    reads = []
    for k in range(4):
        if k == 1:
            four_gpus.lost.add(2)
        reads.append(src.read())
        four_gpus.advance()
    src.close()
    for k, got in enumerate(reads):
        assert [s.device for s in got] == ["0", "1", "2", "3"]
        for s in got:
            if s.device == "2" and k >= 1:
                assert s.power_w is None and s.energy_j is None
                assert s.note is not None and "GPU is lost" in s.note
            else:
                i = int(s.device)
                assert s.power_w == 250.0 + i and s.note is None
                assert s.energy_j == pytest.approx(5_000_000.0 + k * (250.0 + i))


def test_nvml_raises_when_every_gpu_fails(four_gpus: FakeGpus) -> None:
    src = NvmlSource()
    four_gpus.lost.update(range(4))
    with pytest.raises(SourceUnavailableError, match="GPU 0"):
        src.read()
    four_gpus.lost.clear()
    assert [s.power_w for s in src.read()] == [250.0, 251.0, 252.0, 253.0]
    src.close()


def test_sidecar_stores_the_lost_gpu_as_marked_samples(four_gpus: FakeGpus, tmp_path: Path) -> None:
    """The sidecar keeps the healthy GPUs' readings and stores the lost GPU's rows as null."""
    got: list[pl.DataFrame] = []
    sc = Sidecar([NvmlSource()], node="n", run_id="r", receiver=got.append, journal=tmp_path)
    try:
        for k in range(4):  # driven by hand: no sampler threads
            if k == 1:
                four_gpus.lost.add(2)
            sc.tick()
            four_gpus.advance()
        sc.cut()
        sc.ship()
        marked = sc.stats.marked
    finally:
        sc.close()
    df = pl.concat(got)
    per = (
        df.group_by("device")
        .agg(measured=pl.col("power_w").is_not_null().sum(), null=pl.col("power_w").is_null().sum())
        .sort("device")
    )
    assert per.rows() == [("0", 4, 0), ("1", 4, 0), ("2", 1, 3), ("3", 4, 0)]
    assert marked == 3
