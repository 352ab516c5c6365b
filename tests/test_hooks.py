"""Epoch hooks: marks recorded correctly, sink failures retried, framework adapters."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from profiler.errors import BadInputError, StoreError
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


def test_epoch_block_that_raises_is_not_marked() -> None:
    """A crashed epoch did not finish: no mark, and its number stays free for the rerun."""
    got: list[pl.DataFrame] = []
    hooks = EpochHooks("r-1", sink=got.append)
    with pytest.raises(RuntimeError, match="nan loss"), hooks.epoch():
        raise RuntimeError("nan loss")
    assert got == [] and hooks.marks == []
    with hooks.epoch():
        pass
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


# -- one mark per (run, epoch): reports, phases, retries and refusals ----------------------------
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(*seconds: float) -> Callable[[], datetime]:
    """A clock returning ``T0`` plus each of ``seconds`` in turn."""
    times = iter([T0 + timedelta(seconds=s) for s in seconds])
    return lambda: next(times)


def spans(df: pl.DataFrame) -> list[tuple[int, float, float]]:
    """(epoch, start s, end s) after ``T0`` of each stored mark."""
    return [
        (e, (s - T0).total_seconds(), (t - T0).total_seconds())
        for e, s, t in df.select("epoch", "start", "end").iter_rows()
    ]


def test_ray_train_callback_keeps_an_epochs_start_over_several_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from profiler import hooks as hooks_module
    from profiler.hooks import RayTrainEpochMarks

    store = Store(tmp_path)
    monkeypatch.setattr(hooks_module, "utc_now", at(0, 50, 100, 150, 200))
    hooks = EpochHooks("r-2", store=store)
    cb = RayTrainEpochMarks(hooks)  # epoch 0 starts at 0 s
    for epoch in (0, 0, 1, 1):  # mid-epoch and end-of-epoch reports at 50, 100, 150, 200 s
        cb.after_report(None, [{"epoch": epoch, "loss": 1.0}], None)
    assert spans(store.epochs("r-2")) == [(0, 0.0, 100.0), (1, 100.0, 200.0)]
    assert [(m.epoch, m.end) for m in hooks.marks] == [
        (0, T0 + timedelta(seconds=100)),
        (1, T0 + timedelta(seconds=200)),
    ]
    hooks.close()


def test_ray_train_callback_does_not_mark_a_rerun_epoch_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from profiler import hooks as hooks_module
    from profiler.hooks import RayTrainEpochMarks

    got: list[pl.DataFrame] = []
    monkeypatch.setattr(hooks_module, "utc_now", at(0, 10, 20, 30, 40))
    hooks = EpochHooks("r-2", sink=got.append)
    cb = RayTrainEpochMarks(hooks)
    for epoch in (0, 1, 0, 2):  # workers restored from an early checkpoint report epoch 0 again
        cb.after_report(None, [{"epoch": epoch}], None)
    assert spans(pl.concat(got)) == [(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 30.0, 40.0)]
    assert [m.epoch for m, _ in hooks.refused] == [0]
    with pytest.raises(BadInputError, match="refused 1 epoch mark.*epoch 0 was already marked"):
        hooks.close()


def test_a_second_phase_numbers_on_and_a_stored_epoch_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = EpochHooks("r1", store=store, clock=at(0, 10, 20, 30))
    for _ in range(2):
        with first.epoch():
            pass
    second = EpochHooks("r1", store=store, clock=at(40, 50, 60, 70))  # a fine-tuning phase
    for _ in range(2):
        with second.epoch():
            pass
    assert spans(store.epochs("r1")) == [
        (0, 0.0, 10.0),
        (1, 20.0, 30.0),
        (2, 40.0, 50.0),
        (3, 60.0, 70.0),
    ]
    with pytest.raises(BadInputError, match="epoch 3 was already marked by these hooks"):
        second.epoch_start(3)
    third = EpochHooks("r1", store=store)
    with pytest.raises(
        BadInputError, match=r"already has a mark for epoch 0; .* on from 4 \(epoch_start"
    ):
        third.epoch_start(0)
    assert spans(store.epochs("r1"))[0] == (0, 0.0, 10.0)


def test_a_retried_epoch_after_a_passing_write_failure_loses_no_mark(tmp_path: Path) -> None:
    store = Store(tmp_path)
    down = {"n": 1}

    def sink(df: pl.DataFrame) -> int:
        if down["n"]:
            down["n"] -= 1
            raise StoreError("could not write epochs.parquet: the disk is full")
        return store.write_epochs(df)

    hooks = EpochHooks("r3", sink=sink, clock=at(*range(0, 100, 10)))
    hooks.epoch_start(0)
    hooks.epoch_end()  # not written: pending
    with pytest.raises(BadInputError, match="epoch 0 was already marked by these hooks"):
        hooks.epoch_start(0)  # retrying the epoch: keep it open instead
    for epoch in range(1, 5):
        with hooks.epoch(epoch):
            pass
    hooks.close()
    assert spans(store.epochs("r3")) == [(e, 20.0 * e, 20.0 * e + 10) for e in range(5)]
    assert hooks.flush() and not hooks.refused


def test_a_mark_refused_for_good_holds_back_no_later_mark(tmp_path: Path) -> None:
    store = Store(tmp_path)
    # The node's clock is stepped back 30 s (NTP) during epoch 1: its end precedes its start.
    hooks = EpochHooks("r4", store=store, clock=at(0, 10, 20, -5, 30, 40, 50, 60, 70))
    for _ in range(4):
        with hooks.epoch():
            pass
    assert spans(store.epochs("r4")) == [(0, 0.0, 10.0), (2, 30.0, 40.0), (3, 50.0, 60.0)]
    assert [m.epoch for m, _ in hooks.refused] == [1]
    with pytest.raises(BadInputError, match=r"refused 1 epoch mark.*epoch 1: .*end >= start"):
        hooks.close()
    record = Store(tmp_path).run("r4")  # the row the hooks made: the run lacks a mark
    assert (record["status"], record["trained_epochs"]) == ("failed", 3)


def test_close_raises_when_marks_stay_unwritten() -> None:
    def sink(df: pl.DataFrame) -> None:
        raise StoreError("could not write epochs.parquet: the disk is full")

    hooks = EpochHooks("r5", sink=sink)
    with hooks.epoch():
        pass
    with pytest.raises(StoreError, match=r"1 epoch mark\(s\) \(epochs 0\) could not be written"):
        hooks.close()
    assert [m.epoch for m in hooks.marks] == [0]


# -- wattwise train on its own ---------------------------------------------------------------------
TRAIN = ["train", "--arch", "mobilenet_v3_small", "--epochs", "1", "--image-size", "32"]
TRAIN += ["--train-size", "8", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture
def standalone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WATTWISE_RUNNER", "WATTWISE_RUN_ID", "WATTWISE_EPOCHS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("standalone")
def test_train_refuses_the_run_id_of_an_ended_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    args = [*TRAIN, "--run-id", "exp1", "--store", str(tmp_path)]
    assert main(args) == 0
    store = Store(tmp_path)
    record, marks = store.run("exp1"), store.epochs("exp1")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--run-id 'exp1': the store at" in err and "as 'finished'" in err
    assert store.run("exp1") == record and store.epochs("exp1").equals(marks)


@pytest.mark.usefixtures("standalone")
def test_train_records_the_run_failed_when_marks_are_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    def disk_full(self: Store, df: pl.DataFrame, **kwargs: object) -> int:
        raise StoreError(f"could not write {self.root / 'epochs.parquet'}: the disk is full")

    monkeypatch.setattr(Store, "write_epochs", disk_full)
    assert main([*TRAIN, "--run-id", "exp2", "--store", str(tmp_path)]) == 1
    assert "epochs 0) could not be written" in capsys.readouterr().err
    assert Store(tmp_path).run("exp2")["status"] == "failed"
