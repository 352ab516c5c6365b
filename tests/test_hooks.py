"""Epoch hooks: marks recorded correctly, sink failures retried, framework adapters."""

from __future__ import annotations

import importlib.util
import time
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from profiler.errors import BadInputError
from profiler.hooks import EpochHooks, NoOpHooks, lightning_callback, ray_train_hooks
from profiler.sources.base import utc_now
from profiler.store import Store


def test_marks_go_to_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    hooks = EpochHooks("r-7", store=store)
    before = utc_now()
    for _ in range(3):
        with hooks.epoch():
            time.sleep(0.01)
    after = utc_now()
    df = store.epochs("r-7")
    assert df["epoch"].to_list() == [0, 1, 2]
    assert df["run_id"].to_list() == ["r-7"] * 3
    starts, ends = df["start"].to_list(), df["end"].to_list()
    assert before <= starts[0] and ends[-1] <= after
    for s, e in zip(starts, ends, strict=True):
        assert e - s >= timedelta(seconds=0.01)
    assert all(ends[i] <= starts[i + 1] for i in range(2))


def test_explicit_numbers_and_misuse() -> None:
    got: list[pl.DataFrame] = []
    hooks = EpochHooks("r-1", sink=got.append, first_epoch=1)
    hooks.epoch_start()
    hooks.epoch_end()
    hooks.epoch_start(5)
    with pytest.raises(BadInputError, match="epoch 5 is still open; call epoch_end"):
        hooks.epoch_start()
    hooks.epoch_end()
    with pytest.raises(BadInputError, match="epoch_end\\(\\) without epoch_start"):
        hooks.epoch_end()
    assert [m.epoch for m in hooks.marks] == [1, 5]
    assert [d["epoch"].to_list() for d in got] == [[1], [5]]


def test_epoch_block_that_raises_is_still_marked() -> None:
    got: list[pl.DataFrame] = []
    hooks = EpochHooks("r-1", sink=got.append)
    with pytest.raises(RuntimeError, match="nan loss"), hooks.epoch():
        raise RuntimeError("nan loss")
    assert len(got) == 1 and got[0]["epoch"].item() == 0


def test_failing_sink_keeps_marks_and_retries() -> None:
    calls: list[int] = []
    state = {"down": True}

    def sink(df: pl.DataFrame) -> None:
        if state["down"]:
            raise OSError("store locked")
        calls.append(df.height)

    hooks = EpochHooks("r-1", sink=sink)
    for _ in range(2):
        with hooks.epoch():
            pass
    state["down"] = False
    with hooks.epoch():
        pass
    assert calls == [3]  # the two waiting marks went with the third
    assert hooks.flush()


def test_per_epoch_cost_is_tiny() -> None:
    hooks = EpochHooks("r-1", sink=lambda df: None)
    t = time.perf_counter()
    for _ in range(200):
        hooks.epoch_start()
        hooks.epoch_end()
    per_epoch = (time.perf_counter() - t) / 200
    assert per_epoch < 2e-3  # against epochs of seconds to hours


def test_ray_train_hooks_only_rank_zero_records() -> None:
    assert isinstance(ray_train_hooks("r-1", rank=1), NoOpHooks)
    got: list[pl.DataFrame] = []
    h = ray_train_hooks("r-1", rank=0, sink=got.append)
    with h.epoch():
        pass
    assert len(got) == 1


def test_ray_train_callback_marks_reported_epochs() -> None:
    from profiler.hooks import RayTrainEpochMarks, ray_train_callback

    got: list[pl.DataFrame] = []
    hooks = EpochHooks("r-1", sink=got.append)
    cb = RayTrainEpochMarks(hooks)
    cb.after_report(None, [{"epoch": 0, "loss": 1.0}, {"epoch": 0}], None)
    cb.after_report(None, [{"loss": 0.9}], None)  # no epoch key: not an epoch end
    cb.after_report(None, [{"epoch": 1}], None)
    assert [m.epoch for m in hooks.marks] == [0, 1]
    assert hooks.marks[0].end == hooks.marks[1].start
    assert [d["epoch"].item() for d in got] == [0, 1]
    try:
        import ray.train  # noqa: F401
    except ImportError:
        from profiler.errors import NotSupportedError

        with pytest.raises(NotSupportedError, match="needs ray\\[train\\] importable"):
            ray_train_callback(hooks)
    else:
        assert hasattr(ray_train_callback(hooks), "after_report")


def test_lightning_callback() -> None:
    if not (importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning")):
        from profiler.errors import NotSupportedError

        with pytest.raises(NotSupportedError, match="pip install lightning"):
            lightning_callback(EpochHooks("r-1", sink=lambda df: None))
        return
    got: list[pl.DataFrame] = []
    cb = lightning_callback(EpochHooks("r-1", sink=got.append))

    class Trainer:
        is_global_zero = True
        current_epoch = 4

    cb.on_train_epoch_start(Trainer(), None)
    cb.on_train_epoch_end(Trainer(), None)
    assert got[0]["epoch"].item() == 4


# -- bench/gpu_check.py: its no-GPU answer and its training loop on the CPU -----------------------
GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_without_a_gpu_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("gpu_check: no usable NVIDIA GPU: ")
    assert "--device cpu --dry-run" in out.stderr


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            str(GPU_CHECK),
            "--device",
            "cpu",
            "--dry-run",
            "--out",
            str(tmp_path),
            "--models",
            "mobilenet_v3_small",
            "--batch-sizes",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["model"] == "mobilenet_v3_small" and run["epochs"] == 2 and run["steps"] == 6
    assert run["counter_energy_j"] is None and run["power_energy_j"] > 0
    store = Store(tmp_path / "store")
    assert store.epochs(run["run_id"])["epoch"].to_list() == [0, 1]
    samples = store.samples(run["run_id"])
    assert samples.height == run["n_samples"] > 0
    assert set(samples["source"].to_list()) == {"modelled"}
    assert store.run(run["run_id"])["energy_source"] == "modelled"
