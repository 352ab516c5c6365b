"""Edge cases of imports and store writes found in review: parallel imports, failed writes.

Each test's docstring names the bug it guards against. The samples are the
real nvidia-smi traces in ``../shared/data/seaa2023``; a failing disk is
simulated by making one call of ``os.replace`` or ``os.fsync`` fail as the
kernel would (``ENOSPC``, ``EIO``).
"""

from __future__ import annotations

import errno
import fcntl
import multiprocessing as mp
import os
import stat
import time
from pathlib import Path

import polars as pl
import pytest

from cluster.aggregator import Aggregator
from conftest import at
from profiler.errors import BadInputError, StoreError
from profiler.importers import import_samples
from profiler.importers.nvidia_smi import read_nvidia_smi_csv
from profiler.journal import Journal
from profiler.store import Store, atomic_write_parquet

TRACE = "nvidia-smi-cloud-mobilenet_v2-00.csv"


def _import(root: str, path: str, node: str, run_id: str) -> int:
    """Import one nvidia-smi file as ``node`` of ``run_id`` (runs in a child process)."""
    samples = read_nvidia_smi_csv(path, node=node, run_id=run_id)
    return import_samples(Store(root), samples, file=path).samples_new


def _lock_waiters(lock: Path) -> int:
    """Processes blocked in ``flock`` on ``lock``, from ``/proc/locks``."""
    inode = f":{lock.stat().st_ino} "
    return sum(
        1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line
    )


def _batch(run_id: str, start: int, n: int = 3) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": run_id,
            "node": "n1",
            "device": "0",
            "timestamp": [at(start + i) for i in range(n)],
            "power_w": [100.0 + i for i in range(n)],
            "source": "replay",
        }
    )


@pytest.fixture
def dir_fsync_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fsync`` of a directory fails with EIO (the rename before it has happened)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# ------------------------------------------------------------- parallel imports into one run


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux /proc/locks")
def test_parallel_imports_of_two_nodes_into_one_run_count_both(
    shared_data: Path, tmp_path: Path
) -> None:
    """Regression: two imports into one run at once computed the run row (energy, gpu_count)
    before taking the store's lock, so the last writer's row counted only its own node
    (gpu_count 1 and half the energy, in 2 of 3 trials).

    Both child processes are held at the store's lock until each has read the store, the
    widest window the race has; then they run freely. Repeated three times, one run each.
    """
    path = str(shared_data / TRACE)
    one = Store(tmp_path / "single")
    n = _import(str(one.root), path, "n1", "r")
    single = one.run("r")
    root = tmp_path / "store"
    root.mkdir()
    lock = root / ".lock"
    lock.touch()
    with mp.get_context("spawn").Pool(2) as pool:
        for trial in range(3):
            run_id = f"r{trial}"
            with lock.open("a+b") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                jobs = [
                    pool.apply_async(_import, (str(root), path, node, run_id))
                    for node in ("n1", "n2")
                ]
                deadline = time.monotonic() + 120
                while _lock_waiters(lock) < 2:
                    assert time.monotonic() < deadline, "the imports never reached the lock"
                    assert not any(j.ready() for j in jobs), [j.get() for j in jobs if j.ready()]
                    time.sleep(0.05)
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            assert [j.get(timeout=120) for j in jobs] == [n, n]
            store = Store(root)
            row = store.run(run_id)
            assert store.samples(run_id).height == 2 * n
            assert row["gpu_count"] == 2
            assert row["energy_j"] == pytest.approx(2 * single["energy_j"])
            assert row["duration_s"] == pytest.approx(single["duration_s"])


def test_update_runs_reads_the_current_row_under_the_lock(tmp_path: Path) -> None:
    """``Store.update_runs`` hands its callback the runs table as stored and writes its rows."""
    store = Store(tmp_path)
    store.write_runs(
        pl.DataFrame(
            {"run_id": ["a"], "status": ["finished"], "job_name": ["J"], "energy_j": [10.0]}
        )
    )
    seen: list[pl.DataFrame] = []

    def add_energy(runs: pl.DataFrame) -> pl.DataFrame:
        seen.append(runs)
        return runs.with_columns(pl.col("energy_j") + 5.0)

    assert store.update_runs(add_energy) == 1
    assert seen[0]["energy_j"].to_list() == [10.0]
    assert store.run("a")["energy_j"] == 15.0 and store.run("a")["job_name"] == "J"


# ------------------------------------------------------------- failed writes say what was stored


def test_a_failed_run_record_write_says_the_samples_were_stored(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with the disk full at runs.parquet an import said "the store is unchanged"
    although its samples were stored (without a run row); running it again must write it."""
    path = str(shared_data / TRACE)
    samples = read_nvidia_smi_csv(path, node="n1", run_id="m")
    store = Store()
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("runs.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StoreError) as err:
        import_samples(store, samples, file=path)
    text = str(err.value)
    assert "runs.parquet: the disk is full" in text and "unchanged" not in text
    assert "2649 new samples of run 'm' were stored but its run record was not" in text
    assert "run the import again to write it" in text
    monkeypatch.undo()
    assert store.samples("m").height == 2649 and store.runs().height == 0
    again = import_samples(store, samples, file=path)
    assert again.samples_new == 0 and again.runs_changed == 1
    assert store.run("m")["energy_j"] == pytest.approx(again.runs[0].energy_j)
    assert store.run("m")["gpu_count"] == 1


def test_a_failed_directory_sync_says_the_file_was_replaced(
    tmp_path: Path, dir_fsync_fails: None
) -> None:
    """Regression: when fsync of the directory failed after the rename, the error said
    "the store is unchanged" although the new file was in place."""
    path = tmp_path / "t.parquet"
    with pytest.raises(StoreError) as err:
        atomic_write_parquet(pl.DataFrame({"x": [1, 2]}), path)
    text = str(err.value)
    assert "unchanged" not in text
    assert f"{path} was replaced but may not be durable" in text and "Input/output" in text
    assert pl.read_parquet(path)["x"].to_list() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temporary left


def test_a_failed_directory_sync_in_a_sample_write_names_the_runs_stored(
    tmp_path: Path, dir_fsync_fails: None
) -> None:
    """Regression: the run whose file was renamed into place was reported as not stored."""
    store = Store(tmp_path)
    with pytest.raises(StoreError) as err:
        store.write_samples(pl.concat([_batch("a", 0), _batch("b", 0)]))
    text = str(err.value)
    assert "unchanged" not in text
    assert "run(s) ['a'] were stored and those of ['b'] were not" in text
    assert store.samples("a").height == 3 and store.samples("b").height == 0


def test_a_failed_directory_sync_in_the_journal_keeps_the_batch_number(
    tmp_path: Path, dir_fsync_fails: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: Journal.append said "the store is unchanged" while its batch file was in
    place, and the next append reused (overwrote) that batch's number."""
    journal = Journal(tmp_path)
    with pytest.raises(StoreError) as err:
        journal.append(_batch("a", 0))
    assert "unchanged" not in str(err.value) and "may not be durable" in str(err.value)
    monkeypatch.undo()
    assert journal.append(_batch("a", 10)) == 2
    assert [seq for seq, _ in journal.pending()] == [1, 2] and journal.rows == 6


# ------------------------------------------------------------- corrupt journal batches


def test_a_truncated_journal_batch_is_bad_input_and_set_aside(tmp_path: Path) -> None:
    """Regression: a truncated journal file raised polars' ComputeError from Journal() and
    Journal.read, which Aggregator.rebuild does not set aside: every restart failed."""
    wal = tmp_path / "wal"
    journal = Journal(wal)
    journal.append(_batch("a", 0))
    journal.append(_batch("a", 10))
    first = journal.pending()[0][1]
    first.write_bytes(first.read_bytes()[:100])
    again = Journal(wal)
    with pytest.raises(BadInputError, match=rf"{first}: expected a parquet batch"):
        again.read(first)
    store = Store(tmp_path / "store")
    Aggregator.rebuild(store, wal=wal)
    assert sorted(p.name for p in wal.iterdir()) == [f"rejected-{first.name}"]
    assert store.samples("a").height == 3
