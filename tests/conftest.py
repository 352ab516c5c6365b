"""Fixtures shared by every test: an isolated store, clean environment, the shared real data."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "seaa2023"
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    """A UTC timestamp ``seconds`` after 2024-01-01 00:00:00 UTC."""
    return T0 + dt.timedelta(seconds=seconds)


#: A real run's job (vgg16 on the SEAA RTX 3090 runs) in the shared runs layout.
RUN = {
    "gpu_model": "NVIDIA GeForce RTX 3090",
    "architecture": "vgg16",
    "batch_size": 32,
    "training_size": 23807,
    "validation_size": 0,
    "gflops_forward": 10.03,
    "image_height": 128,
    "image_width": 128,
}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test gets its own store and no inherited cluster or GPU settings."""
    monkeypatch.setenv("WATTWISE_STORE", str(tmp_path / "store"))
    for name in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def shared_data() -> Path:
    """The real SEAA 2023 traces in ../shared, or a skip saying why."""
    if not (SHARED_DATA / "runs.parquet").is_file():
        pytest.skip(f"real traces not found at {SHARED_DATA} (../shared/data/seaa2023)")
    return SHARED_DATA


@contextlib.contextmanager
def typed_ray_cluster(namespace: str, kinds: tuple[str, ...] = ("gpu-a", "gpu-b")) -> Iterator[Any]:
    """A real local Ray cluster: a one-CPU head plus one one-CPU worker per node type.

    Each worker carries the resource ``node_type:<kind>``; the driver is
    connected in ``namespace`` and disconnected (and ``RAY_ADDRESS`` restored)
    at the end.
    """
    import ray
    from ray.cluster_utils import Cluster

    saved = os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():  # another module's cluster: disconnect from it
        ray.shutdown()
    small = {"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    for kind in kinds:
        c.add_node(**small, resources={f"node_type:{kind}": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=namespace, include_dashboard=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
