"""Load, short: fifty concurrent jobs of twenty replayed devices each on a local Ray cluster.

The same set-up as ``bench/load.py`` (which runs it for ten minutes and
prints figures), for 25 s: every sample the sources produced is stored
exactly once, every job got its epochs finished and a STEP projection, and the
median time from a sample's arrival to the updated projection is under a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wattwise_bench_load", REPO / "bench" / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fifty_concurrent_jobs_lose_and_double_nothing(tmp_path: Path) -> None:
    import ray

    if ray.is_initialized():  # another module's cluster: disconnect from it
        ray.shutdown()
    jobs, per_job = 50, 20
    r = _bench().run_load(
        jobs=jobs,
        devices=jobs * per_job,
        sidecars=5,
        seconds=25.0,
        epoch_s=8.0,
        every_s=10.0,
        probe_s=6.0,
        workers=1,
        root=tmp_path,
        echo=False,
    )
    # Nothing lost, nothing doubled: what the sources produced is what the store holds.
    assert r["lost"] == 0 and r["pending"] == 0
    assert r["produced"] >= jobs * per_job * 20  # 1,000 devices at 1 Hz for 20 s at least
    assert r["stored"] == r["produced"]
    assert r["duplicates"] == 0
    # Every job got its devices' samples and all its marked epochs finished, with a projection.
    assert r["per_run_min"] >= per_job * 20
    assert r["epochs_marked"] >= 2
    assert r["epochs_done"] == [r["epochs_marked"], r["epochs_marked"]]
    assert r["projected_jobs"] == jobs
    # Median, not max: on a shared 2-core machine one Ray round trip can stall for a second.
    lat = sorted(r["latency_s"])
    assert len(lat) >= 3 and lat[len(lat) // 2] < 1.0
