"""The job runner and the built-in workload on a real local Ray cluster with two node types."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.runner import job_from_command, new_run_id
from cluster.train import TrainConfig, train
from conftest import typed_ray_cluster
from profiler.errors import BadInputError

WATTWISE = str(Path(sys.executable).parent / "wattwise")
TINY = ["--arch", "resnet18", "--image-size", "32", "--train-size", "64", "--batch-size", "32"]


def test_train_marks_each_epoch_through_the_hooks() -> None:
    from profiler.hooks import EpochHooks

    frames: list[pl.DataFrame] = []
    hooks = EpochHooks("t-1", sink=frames.append)
    cfg = TrainConfig(
        arch="mobilenet_v3_small", epochs=2, image_size=32, train_size=16, batch_size=8
    )
    result = train(cfg, hooks)
    assert result.epochs == 2 and len(result.epoch_s) == 2 and result.device == "cpu"
    marks = pl.concat(frames)
    assert marks["epoch"].to_list() == [0, 1]
    assert (marks["end"] > marks["start"]).all()
    assert marks["start"][1] >= marks["end"][0]


def test_train_refuses_an_unknown_architecture_and_dataset() -> None:
    with pytest.raises(BadInputError, match=r"unknown architecture 'resnet19'; expected"):
        train(TrainConfig(arch="resnet19", epochs=1))
    with pytest.raises(BadInputError, match=r"dataset must be one of \['fake'\]; found 'cifar10'"):
        TrainConfig(dataset="cifar10").check()


def test_the_built_in_workload_command_is_understood_as_a_job() -> None:
    job = job_from_command([WATTWISE, "train", *TINY, "--epochs", "4"])
    assert job is not None
    assert (job.architecture, job.batch_size, job.training_size) == ("resnet18", 32, 64)
    assert (job.image_height, job.image_width, job.planned_epochs) == (32, 32, 4)
    assert job_from_command(["python", "train.py", "--epochs", "4"]) is None


def test_run_ids_are_valid_and_name_the_node_type() -> None:
    rid = new_run_id("gpu a/100")
    assert rid.startswith("gpu-a-100-") and len(rid) == len("gpu-a-100-") + 15 + 1 + 6


# ---------------------------------------------------------------------------- on a Ray cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A head node plus two one-CPU worker nodes typed gpu-a and gpu-b."""
    pytest.importorskip("ray")
    with typed_ray_cluster("wattwise"):
        yield {"store": tmp_path_factory.mktemp("runner") / "store"}


SIDECAR = {"interval_s": 0.2, "batch_interval_s": 1.0}


def _node_of(node_type: str) -> str:
    import ray

    return next(
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and f"node_type:{node_type}" in n["Resources"]
    )


@pytest.mark.slow
def test_a_run_is_placed_on_its_node_type_measured_and_recorded(
    ray_cluster: dict[str, Any],
) -> None:
    import ray

    from cluster.actors import aggregator
    from cluster.runner import run_job
    from profiler.store import Store

    result = run_job(
        [WATTWISE, "train", *TINY, "--epochs", "3"],
        node_type="gpu-b",
        store_root=ray_cluster["store"],
        sidecar_options=SIDECAR,
    )
    assert result.status == "finished" and result.returncode == 0
    assert result.node_id == _node_of("gpu-b")
    assert result.summary["epochs_done"] == 3
    assert result.summary["planned_epochs"] == 3
    store = Store(ray_cluster["store"])
    run = store.run(result.run_id)
    assert run["status"] == "finished" and run["trained_epochs"] == 3
    assert run["node_type"] == "gpu-b" and run["architecture"] == "resnet18"
    assert run["gflops_forward"] is not None and run["gflops_forward"] > 0
    assert run["energy_j"] == pytest.approx(result.summary["measured_energy_j"])
    assert run["energy_j"] > 0
    samples = store.samples(result.run_id)
    assert samples.height == result.summary["samples"] > 0
    assert samples["source"].unique().to_list() == ["modelled"]
    epochs = store.epochs(result.run_id)
    assert epochs["epoch"].to_list() == [0, 1, 2]
    # The aggregator answers for the finished run.
    agg = aggregator(create=False)
    status = ray.get(agg.status.remote(result.run_id))
    assert status["status"] == "finished" and status["epochs_done"] == 3
    per_epoch = ray.get(agg.epochs.remote(result.run_id))
    assert per_epoch.height == 3 and (per_epoch["energy_j"] > 0).all()


@pytest.mark.slow
def test_a_crashing_command_is_stored_as_failed_with_its_exit_code(
    ray_cluster: dict[str, Any],
) -> None:
    from cluster.runner import run_job
    from profiler.store import Store

    result = run_job(
        [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"],
        node_type="gpu-a",
        store_root=ray_cluster["store"],
        sidecar_options=SIDECAR,
    )
    assert (result.status, result.returncode, result.stopped) == ("failed", 3, False)
    assert result.node_id == _node_of("gpu-a")
    assert Store(ray_cluster["store"]).run(result.run_id)["status"] == "failed"


@pytest.mark.slow
def test_an_unknown_node_type_is_refused_with_the_known_ones(
    ray_cluster: dict[str, Any],
) -> None:
    from cluster.runner import run_job

    with pytest.raises(BadInputError, match=r"unknown node type 'gpu-z'.*gpu-a \(1 alive\), gpu-b"):
        run_job(["true"], node_type="gpu-z", store_root=ray_cluster["store"])
