"""Epoch hooks across processes and ranks: crashed epochs, resumed runs, ranks, run_info types."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from conftest import at
from profiler.errors import BadInputError
from profiler.hooks import ROW_MARK, EpochHooks, NoOpHooks, ray_train_hooks
from profiler.sources.modelled import ModelledCpuSource
from profiler.store import Store

HOOKS_CONFIG = {ROW_MARK[0]: ROW_MARK[1]}


def ticks(*seconds: float) -> Callable[[], datetime]:
    """A clock returning ``at(s)`` for each of ``seconds`` in turn."""
    times = iter([at(s) for s in seconds])
    return lambda: next(times)


def spans(df: pl.DataFrame) -> list[tuple[int, float, float]]:
    """(epoch, start s, end s) of stored marks, seconds after ``at(0)``."""
    return [
        (e, (s - at(0)).total_seconds(), (x - at(0)).total_seconds())
        for e, s, x in df.select("epoch", "start", "end").iter_rows()
    ]


def row_of(store: Store, run_id: str, *fields: str) -> tuple[Any, ...]:
    record = store.run(run_id)
    return tuple(record[f] for f in fields)


# -- 1. NoOpHooks stand in for EpochHooks on other ranks ----------------------------------------
def test_noop_hooks_take_every_form_epoch_hooks_take() -> None:
    """Bug: NoOpHooks (ranks other than 0) had no __enter__/__exit__ nor ``refused``, so the
    README's ``with ray_train_hooks(...) as hooks:`` crashed every rank but 0."""
    with ray_train_hooks("rn", rank=1) as hooks:
        for epoch in range(2):
            with hooks.epoch(epoch):
                pass
        hooks.epoch_start()
        hooks.epoch_end()
    assert isinstance(hooks, NoOpHooks)
    assert (hooks.run_id, hooks.marks, hooks.refused, hooks.flush()) == ("rn", [], [], True)
    hooks.close()
    real = EpochHooks("rn", sink=lambda df: None)
    surface = {n for n in [*dir(EpochHooks), *vars(real)] if not n.startswith("_")}
    assert sorted(n for n in surface | {"__enter__", "__exit__"} if not hasattr(hooks, n)) == []
    assert NoOpHooks().marks is not NoOpHooks().marks  # no list shared between instances
    with pytest.raises(ValueError, match="boom"), NoOpHooks() as other, other.epoch():
        raise ValueError("boom")  # the block's error goes on
    with pytest.raises(BadInputError, match="run_id must match .* found 'no good'"):
        ray_train_hooks("no good", rank=1)  # every rank checks the id, not only rank 0


# -- 2. an epoch whose block raised is not marked ------------------------------------------------
def test_a_crashed_epoch_is_not_marked_and_the_resumed_job_reruns_it(tmp_path: Path) -> None:
    """Bug: ``with hooks.epoch():`` stored the mark of an epoch whose block raised, so resuming
    from the checkpoint before it was refused ("already has a mark for epoch 2")."""
    store = Store(tmp_path)
    oom = RuntimeError("CUDA out of memory")
    first = EpochHooks("rA", store=store, clock=ticks(0, 10, 10, 20, 20, 25))
    with pytest.raises(RuntimeError) as raised, first:
        for epoch in range(4):
            with first.epoch(epoch):
                if epoch == 2:
                    raise oom
    assert raised.value is oom  # unchanged
    assert [m.epoch for m in first.marks] == [0, 1]
    assert spans(store.epochs("rA")) == [(0, 0.0, 10.0), (1, 10.0, 20.0)]
    assert row_of(store, "rA", "status", "trained_epochs", "end") == ("failed", 2, at(25))
    # The job restarts from the checkpoint of epoch 1 and runs epochs 2 and 3.
    with EpochHooks("rA", store=store, clock=ticks(100, 110, 110, 120, 130)) as second:
        for epoch in range(2, 4):
            with second.epoch(epoch):
                pass
    assert second.refused == []
    assert spans(store.epochs("rA")) == [
        (0, 0.0, 10.0),
        (1, 10.0, 20.0),
        (2, 100.0, 110.0),
        (3, 110.0, 120.0),
    ]


# -- 3. later hooks processes of a run update the row hooks created ------------------------------
def test_a_resumed_job_takes_on_the_row_the_first_attempt_left_failed(tmp_path: Path) -> None:
    """Bug: only the process that created the runs row updated it: a resumed run stayed
    ``failed`` with the first attempt's end and trained_epochs."""
    store = Store(tmp_path)
    first = EpochHooks("rB", store=store, clock=ticks(0, 10, 10, 15), run_info={"batch_size": 64})
    with pytest.raises(RuntimeError, match="node lost"), first:
        with first.epoch():
            pass
        with first.epoch():
            raise RuntimeError("node lost")
    assert row_of(store, "rB", "status", "trained_epochs", "end") == ("failed", 1, at(15))
    second = EpochHooks("rB", store=store, clock=ticks(100, 110, 110, 120, 125))
    second.epoch_start()  # numbers on from the stored epochs: 1
    assert row_of(store, "rB", "status", "start") == ("running", at(0))  # original start kept
    second.epoch_end()
    with second.epoch():
        pass
    second.close()
    assert spans(store.epochs("rB")) == [(0, 0.0, 10.0), (1, 100.0, 110.0), (2, 110.0, 120.0)]
    rec = store.run("rB")
    got = tuple(rec[k] for k in ("status", "trained_epochs", "start", "end", "batch_size"))
    assert got == ("finished", 3, at(0), at(125), 64)
    assert rec["duration_s"] == pytest.approx(125.0)
    assert json.loads(str(rec["config"])) == HOOKS_CONFIG


def test_a_second_training_phase_updates_the_row(tmp_path: Path) -> None:
    """Bug: a second phase (another process, numbering on) left the row as phase 1 ended it."""
    store = Store(tmp_path)
    with EpochHooks("two-phase", store=store, clock=ticks(0, 10, 10, 20, 21)) as phase1:
        for _ in range(2):
            with phase1.epoch():
                pass
    assert row_of(store, "two-phase", "status", "trained_epochs", "end") == ("finished", 2, at(21))
    with EpochHooks("two-phase", store=store, clock=ticks(50, 60, 60, 70, 70, 80, 85)) as phase2:
        for _ in range(3):
            with phase2.epoch():
                pass
    assert store.epochs("two-phase")["epoch"].to_list() == [0, 1, 2, 3, 4]
    got = row_of(store, "two-phase", "status", "trained_epochs", "start", "end", "duration_s")
    assert got == ("finished", 5, at(0), at(85), pytest.approx(85.0))


def test_a_later_process_leaves_a_row_the_hooks_did_not_create(tmp_path: Path) -> None:
    """Rows from the runner, ``wattwise train`` or an importer stay theirs (as before)."""
    store = Store(tmp_path)
    row = {"run_id": "ray-2", "status": "failed", "start": at(-5), "end": at(-1)}
    store.write_runs(pl.DataFrame([row | {"trained_epochs": 0, "config": '{"clock_home": "n1"}'}]))
    before = store.run("ray-2")
    with EpochHooks("ray-2", store=store, clock=ticks(0, 10, 20)) as hooks, hooks.epoch():
        pass
    assert store.run("ray-2") == before and store.epochs("ray-2").height == 1


# -- 4. two ranks marking the same epochs ---------------------------------------------------------
def test_two_ranks_marking_the_same_epochs_both_close_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug: two ranks of a DDP job using hooks on one run id: the rank whose mark of an epoch
    came second got BadInputError on close and marked the run failed (row 'failed', 1)."""
    store = Store(tmp_path)
    r0 = EpochHooks("ddp", store=store, clock=ticks(0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 31.0))
    r1 = EpochHooks("ddp", store=store, clock=ticks(0.2, 10.1, 10.1, 20.3, 20.3, 30.2, 32.0))
    with caplog.at_level(logging.INFO, logger="profiler.hooks"):
        for epoch, first in [(0, r1), (1, r0), (2, r0)]:  # who ends first varies, as in DDP
            second = r1 if first is r0 else r0
            r0.epoch_start(epoch)
            r1.epoch_start(epoch)
            first.epoch_end()
            second.epoch_end()
        r0.close()
        r1.close()
    assert r0.refused == [] and r1.refused == []
    assert spans(store.epochs("ddp")) == [(0, 0.2, 10.1), (1, 10.0, 20.0), (2, 20.0, 30.0)]
    got = row_of(store, "ddp", "status", "trained_epochs", "start", "end")
    assert got == ("finished", 3, at(0), at(32))
    kept = [r for r in caplog.records if "stored first by another writer" in r.getMessage()]
    assert [r.levelno for r in kept] == [logging.INFO] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_real_numbering_clash_between_writers_is_still_refused(tmp_path: Path) -> None:
    """Epoch 0 stored for 0-10 s; another writer's epoch 0 at 10.5-20 s is another stretch."""
    store = Store(tmp_path)
    a = EpochHooks("job", store=store, clock=ticks(0, 10, 11))
    b = EpochHooks("job", store=store, clock=ticks(10.5, 20, 21))
    with a.epoch(0):
        pass
    with b.epoch(0):
        pass
    assert spans(store.epochs("job")) == [(0, 0.0, 10.0)]
    assert [m.epoch for m, _ in b.refused] == [0]
    a.close()
    with pytest.raises(BadInputError, match=r"refused 1 epoch mark.*epoch 0: .*already in"):
        b.close()
    assert row_of(store, "job", "status", "trained_epochs") == ("failed", 1)


# -- 5. run_info values of the wrong type ------------------------------------------------------
@pytest.mark.parametrize(
    ("info", "message"),
    [
        (
            {"planned_epochs": 10.5},
            r"run r: run_info\['planned_epochs'\]: expected an integer \(int\) or None for the "
            r"runs table's Int64 column; found 10\.5 \(float\)",
        ),
        ({"batch_size": "sixty"}, r"\['batch_size'\]: expected an integer .*found 'sixty' \(str\)"),
        ({"gpu_count": True}, r"\['gpu_count'\]: expected an integer .*found True \(bool\)"),
        ({"gflops_forward": math.inf}, r"expected a finite number .*found inf \(float\)"),
        ({"architecture": 50}, r"\['architecture'\]: expected text \(str\) .*found 50 \(int\)"),
        ({"config": "[1, 2]"}, r"\['config'\]: expected a JSON object.*found JSON list"),
        ({"config": "lr=0.1"}, r"\['config'\]: expected a JSON object.*found text that is not"),
        ({"config": {"lr": {0.1}}}, r"\['config'\]: .*found a dict JSON cannot hold"),
        ({"config": 3}, r"\['config'\]: expected a JSON object.*found 3 \(int\)"),
    ],
)
def test_run_info_of_the_wrong_type_is_refused(
    tmp_path: Path, info: dict[str, Any], message: str
) -> None:
    """Bug: planned_epochs 10.5 was stored as 10, 'sixty' gave a raw polars ComputeError, a
    config dict crashed."""
    with pytest.raises(BadInputError, match=message):
        EpochHooks("r", store=Store(tmp_path), run_info=info)
    assert Store(tmp_path).runs().height == 0


def test_run_info_of_the_right_types_is_stored(tmp_path: Path) -> None:
    store = Store(tmp_path)
    info = {
        "planned_epochs": np.int64(10),
        "gflops_forward": 4,
        "architecture": "resnet50",
        "precision": None,
        "config": {"lr": 0.1, "optimizer": "sgd"},
    }
    with EpochHooks("r", store=store, run_info=info, clock=ticks(0, 10, 20)) as h, h.epoch():
        pass
    got = row_of(store, "r", "planned_epochs", "gflops_forward", "architecture", "precision")
    assert got == (10, 4.0, "resnet50", None)
    assert json.loads(str(store.run("r")["config"])) == {"lr": 0.1, "optimizer": "sgd"} | (
        HOOKS_CONFIG
    )
    text = EpochHooks("r2", store=store, run_info={"config": '{"lr": 0.2}'}, clock=ticks(0, 1, 2))
    with text, text.epoch():
        pass
    assert json.loads(str(store.run("r2")["config"])) == {"lr": 0.2} | HOOKS_CONFIG


# -- 6. modelled source with an infinite board power -------------------------------------------
def test_modelled_source_refuses_a_board_power_that_is_not_finite(tmp_path: Path) -> None:
    """Bug: board_power_w=inf was taken (nan was refused): every sample was stored null."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    for board in (math.inf, math.nan):
        with pytest.raises(
            BadInputError, match=r"needs finite powers in W .*board_power_w=(inf|nan)"
        ):
            ModelledCpuSource(board, proc_stat=stat, cpuinfo=tmp_path / "none")
    assert ModelledCpuSource(65.0, proc_stat=stat, cpuinfo=tmp_path / "none").board_power_w == 65.0


def test_sample_with_an_infinite_board_power_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug: ``wattwise sample --source modelled --board-power-w inf`` stored nulls, exit 0."""
    from cluster.cli import main

    store = tmp_path / "store"
    args = ["sample", "--source", "modelled", "--board-power-w", "inf", "--duration", "1"]
    args += ["--interval", "0.2", "--journal", str(tmp_path / "j"), "--store", str(store)]
    assert main(args) == 2
    assert "board_power_w=inf" in capsys.readouterr().err
    assert Store(store).samples().height == 0
