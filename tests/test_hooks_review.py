"""Epoch hooks found wanting in review: two hooks of one run, and runs measured without a runner."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from profiler.errors import BadInputError, SchemaError, StoreError
from profiler.hooks import EpochHooks
from profiler.store import Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)
VGG16 = Path("/work/shared/data/seaa2023/nvidia-smi-cloud-vgg16-00.csv")


def at(*seconds: float) -> Callable[[], datetime]:
    """A clock returning ``T0`` plus each of ``seconds`` in turn."""
    times = iter([T0 + timedelta(seconds=s) for s in seconds])
    return lambda: next(times)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def spans(df: pl.DataFrame) -> list[tuple[int, float, float]]:
    return [
        (e, (s - T0).total_seconds(), (x - T0).total_seconds())
        for e, s, x in df.select("epoch", "start", "end").iter_rows()
    ]


# -- 1. the store refuses a second mark for a (run, epoch), also between two hooks --------------
def test_two_hooks_of_one_run_cannot_both_mark_an_epoch(tmp_path: Path) -> None:
    """Two ranks running the README loop (or a retried job beside the first attempt): both
    hooks were created before either wrote, so only the store can see the clash."""
    store = Store(tmp_path)
    a = EpochHooks("job", store=store, clock=at(0, 10, 40))
    b = EpochHooks("job", store=store, clock=at(20, 30))
    with a.epoch(0):
        pass
    with b.epoch(0):  # the training loop goes on: the refusal is logged, not raised here
        pass
    assert spans(store.epochs("job")) == [(0, 0.0, 10.0)]  # the first mark stays
    assert [m.epoch for m, _ in b.refused] == [0]
    assert "already in the store" in b.refused[0][1]
    a.close()
    with pytest.raises(BadInputError, match=r"refused 1 epoch mark.*epoch 0: .*already in"):
        b.close()


def test_write_epochs_conflicts_raise_is_insert_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    mark = pl.DataFrame({"run_id": ["r"], "epoch": [0], "start": [t(0)], "end": [t(10)]})
    assert store.write_epochs(mark, conflicts="raise") == 1
    assert store.write_epochs(mark, conflicts="raise") == 0  # the same mark again: no change
    other = mark.with_columns(start=pl.lit(t(20)), end=pl.lit(t(30)))
    with pytest.raises(
        SchemaError,
        match=r"run 'r' epoch 0 is already in the store at .* 2026-01-01 00:00:00\+00:00 to "
        r"2026-01-01 00:00:10\+00:00; the new mark is 2026-01-01 00:00:20\+00:00 to .*number "
        r"on from 1",
    ):
        store.write_epochs(
            pl.concat([other.with_columns(epoch=pl.lit(1, dtype=pl.Int64)), other]),
            conflicts="raise",
        )
    assert spans(store.epochs("r")) == [(0, 0.0, 10.0)]  # the whole batch was refused
    # The same mark with its end moved (Ray Train's repeated reports of one epoch) is taken.
    assert store.write_epochs(mark.with_columns(end=pl.lit(t(12))), conflicts="raise") == 1
    assert spans(store.epochs("r")) == [(0, 0.0, 12.0)]
    twice = pl.concat([mark, mark.with_columns(end=pl.lit(t(11)))])
    with pytest.raises(
        SchemaError, match=r"two different rows share the key \{'run_id': 'r', 'epoch': 0\}"
    ):
        store.write_epochs(twice, conflicts="raise")
    with pytest.raises(BadInputError, match="conflicts must be 'replace' or 'raise'"):
        store.write_epochs(mark, conflicts="keep")  # type: ignore[arg-type]
    # The default still replaces (the aggregator and hand fixes rely on it).
    assert store.write_epochs(other) == 1
    assert spans(store.epochs("r")) == [(0, 20.0, 30.0)]


# -- 2. hooks give a run measured by `wattwise sample` its runs row ------------------------------
def test_sidecar_and_hooks_make_a_run_energy_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`wattwise sample --run my-run` beside `EpochHooks("my-run")`, as the README shows."""
    from cluster.cli import main

    root = str(tmp_path / "store")
    errors: list[BaseException] = []

    def train() -> None:
        try:
            time.sleep(0.3)
            with EpochHooks("my-run", store=Store(root), run_info={"planned_epochs": 2}) as h:
                for epoch in range(2):
                    with h.epoch(epoch):
                        time.sleep(0.5)
        except BaseException as err:  # surfaced below
            errors.append(err)

    trainer = threading.Thread(target=train)
    trainer.start()
    sample = ["sample", "--source", "replay", "--replay", str(VGG16), "--speed", "4"]
    sample += ["--interval", "0.1", "--batch-interval", "0.3", "--duration", "2", "--run"]
    sample += ["my-run", "--node", "n1", "--journal", str(tmp_path / "j"), "--store", root]
    assert main(sample) == 0
    trainer.join()
    assert not errors, errors
    capsys.readouterr()
    record = Store(root).run("my-run")
    assert record["status"] == "finished" and record["planned_epochs"] == 2
    assert record["trained_epochs"] == 2
    marks = Store(root).epochs("my-run")
    assert record["start"] == marks["start"][0] and record["end"] >= marks["end"][1]
    assert main(["runs", "--store", root]) == 0
    assert "my-run" in capsys.readouterr().out
    assert main(["energy", "--run", "my-run", "--store", root, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"]["energy_j"] > 0


def test_hooks_leave_a_row_they_did_not_create(tmp_path: Path) -> None:
    """The Ray runner (or `wattwise train`, an importer) writes the row: the hooks keep out."""
    store = Store(tmp_path)
    row = {"run_id": "ray-1", "status": "running", "node_type": "gpu-a", "start": t(-5)}
    store.write_runs(pl.DataFrame([row]))
    before = store.run("ray-1")
    with EpochHooks("ray-1", store=store, clock=at(0, 10, 20, 30, 40)) as h:
        for _ in range(2):
            with h.epoch():
                pass
    assert store.run("ray-1") == before
    assert spans(store.epochs("ray-1")) == [(0, 0.0, 10.0), (1, 20.0, 30.0)]


def test_hooks_leave_their_row_once_another_writer_took_it(tmp_path: Path) -> None:
    """A row the hooks created and a runner then took over (its upsert) is left as it is."""
    store = Store(tmp_path)
    h = EpochHooks("r1", store=store, clock=at(0, 10, 20))
    with h.epoch():
        pass
    assert store.run("r1")["status"] == "running" and store.run("r1")["start"] == t(0)
    store.write_runs(pl.DataFrame({"run_id": ["r1"], "status": ["running"], "node_type": ["x"]}))
    taken = store.run("r1")
    h.close()
    assert store.run("r1") == taken


def test_hooks_record_their_run_failed_when_the_block_raises(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with (
        pytest.raises(RuntimeError, match="nan loss"),
        EpochHooks("r2", store=store, clock=at(0, 10, 20, 30, 40)) as h,
    ):
        with h.epoch():
            pass
        with h.epoch():
            raise RuntimeError("nan loss")
    record = store.run("r2")  # the crashed epoch is not marked, so not trained
    assert record["status"] == "failed" and record["trained_epochs"] == 1
    assert record["end"] == t(30) and spans(store.epochs("r2")) == [(0, 0.0, 10.0)]


def test_hooks_register_the_run_once_the_store_works_again(tmp_path: Path) -> None:
    """The row failing to write holds back no mark; it is written with a later one."""
    store = Store(tmp_path)
    down = {"on": True}
    real = Store.update_runs

    class Flaky(Store):
        def update_runs(self, rows, *, file=None):  # type: ignore[no-untyped-def]
            if down["on"]:
                raise StoreError(f"could not write {self.root / 'runs.parquet'}: the disk is full")
            return real(self, rows, file=file)

    h = EpochHooks("r3", store=Flaky(tmp_path), clock=at(0, 10, 20, 30, 40))
    with h.epoch():
        pass
    assert store.runs().height == 0 and spans(store.epochs("r3")) == [(0, 0.0, 10.0)]
    down["on"] = False
    with h.epoch():
        pass
    assert spans(store.epochs("r3")) == [(0, 0.0, 10.0), (1, 20.0, 30.0)]
    assert store.run("r3")["start"] == t(0)
    h.close()
    assert store.run("r3")["status"] == "finished" and store.run("r3")["end"] == t(40)


def test_hooks_with_a_sink_write_no_row(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with EpochHooks("r4", sink=store.write_epochs) as h, h.epoch():
        pass
    assert store.epochs("r4").height == 1 and store.runs().height == 0


def test_close_raises_when_the_run_row_stays_unwritten(tmp_path: Path) -> None:
    class NoRuns(Store):
        def update_runs(self, rows, *, file=None):  # type: ignore[no-untyped-def]
            raise StoreError(f"could not write {self.root / 'runs.parquet'}: the disk is full")

    h = EpochHooks("r6", store=NoRuns(tmp_path))
    with h.epoch():
        pass
    with pytest.raises(StoreError, match="could not give the run a row .* the disk is full"):
        h.close()
    assert Store(tmp_path).epochs("r6").height == 1


def test_run_info_is_checked_against_the_runs_table(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"run_info: expected columns of the runs table.*"):
        EpochHooks("r5", store=Store(tmp_path), run_info={"epochs": 3})
    with pytest.raises(BadInputError, match="run_info: the hooks set run_id, status, start, end"):
        EpochHooks("r5", store=Store(tmp_path), run_info={"status": "finished"})
