"""The run store: schema checks, idempotent and atomic writes, compaction, safe paths."""

from __future__ import annotations

import errno
import hashlib
import os

import polars as pl
import pytest

from conftest import at
from profiler import store as store_mod
from profiler.errors import BadInputError, SchemaError, StoreError
from profiler.schema import schema
from profiler.store import Store, default_root


def batch(start=0, n=3, run="r1", power=100.0, device="0"):
    return pl.DataFrame(
        {
            "run_id": run,
            "node": "n1",
            "device": device,
            "timestamp": [at(start + i) for i in range(n)],
            "power_w": [power + start + i for i in range(n)],
            "source": "replay",
        }
    )


def snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WATTWISE_STORE", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    monkeypatch.delenv("WATTWISE_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_root() == tmp_path / "data" / "wattwise" / "store"


def test_empty_store_reads_empty_frames_with_the_schema(tmp_path):
    s = Store(tmp_path / "nothing")
    assert s.samples().schema == schema("samples")
    assert s.runs().height == 0 and s.runs().schema == schema("runs")
    assert s.epochs().height == 0


def test_samples_written_twice_are_stored_once(tmp_path):
    s = Store(tmp_path)
    assert s.write_samples(batch(0, 3)) == 3
    assert s.write_samples(batch(0, 3)) == 0
    assert s.write_samples(batch(1, 4)) == 2  # overlaps t=1,2; adds t=3,4
    got = s.samples("r1")
    assert got.height == 5
    assert got["timestamp"].is_sorted()
    assert got["timestamp"].dtype == pl.Datetime("us", "UTC")


def test_a_conflicting_rewrite_is_refused_and_the_store_is_unchanged(tmp_path):
    s = Store(tmp_path)
    s.write_samples(batch(0, 3))
    before = snapshot(tmp_path)
    clash = r"run 'r1': .* already in the store .* power_w=100.0.*new value is"
    with pytest.raises(SchemaError, match=clash):
        s.write_samples(batch(0, 3, power=5.0))
    assert snapshot(tmp_path) == before


def test_conflicting_rows_inside_one_batch_are_refused(tmp_path):
    twice = pl.concat([batch(0, 1), batch(0, 1, power=7.0)])
    with pytest.raises(SchemaError, match="two different rows share the key"):
        Store(tmp_path).write_samples(twice)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (batch().with_columns(watts=pl.lit(1)), r"has no column\(s\) \['watts'\]"),
        (batch().drop("node"), r"needs column 'node'"),
        (batch().with_columns(power_w=pl.lit("high")), r"'power_w': expected Float64"),
        (batch().with_columns(power_w=pl.lit(-1.0)), r"row 1, 'power_w': expected a finite"),
        (batch().with_columns(source=pl.lit("guess")), r"'source': expected one of"),
        (batch(run="../../etc"), r"run_id must match .* found '../../etc'"),
        (
            batch().with_columns(pl.col("timestamp").dt.replace_time_zone(None)),
            r"'timestamp': expected Datetime",
        ),
    ],
)
def test_schema_is_checked_on_write(tmp_path, frame, match):
    s = Store(tmp_path)
    with pytest.raises(SchemaError, match=match):
        s.write_samples(frame, file="in.csv")
    assert not (tmp_path / "samples").exists()


def test_timezones_are_converted_to_utc(tmp_path):
    s = Store(tmp_path)
    local = batch().with_columns(pl.col("timestamp").dt.convert_time_zone("Europe/Madrid"))
    s.write_samples(local)
    assert s.samples("r1")["timestamp"].to_list() == batch()["timestamp"].to_list()


def test_many_batches_are_compacted_without_losing_a_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 4)
    s = Store(tmp_path)
    for i in range(10):
        s.write_samples(batch(i * 3, 3))
    files = sorted(p.name for p in (tmp_path / "samples" / "r1").iterdir())
    assert len(files) < 4
    assert any(f.startswith("base-") for f in files)
    got = s.samples("r1")
    assert got.height == 30
    assert got["timestamp"].n_unique() == 30
    assert s.write_samples(batch(0, 30)) == 0  # still idempotent across the base file


def test_a_stale_part_left_by_a_crashed_compaction_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 2)
    s = Store(tmp_path)
    s.write_samples(batch(0, 2))
    # Keep a copy of the first part, as if the compaction died before deleting it.
    part = tmp_path / "samples" / "r1" / "part-000000000000.parquet"
    data = part.read_bytes()
    s.write_samples(batch(2, 2))
    assert not part.exists()
    part.write_bytes(data)
    assert s.samples("r1").height == 4


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    s = Store(tmp_path)
    s.write_samples(batch(0, 3))
    before = snapshot(tmp_path)

    def disk_full(self, fh, **kwargs):
        fh.write(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", disk_full)
    with pytest.raises(StoreError, match="the disk is full; the store is unchanged"):
        s.write_samples(batch(10, 3))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert s.samples("r1").height == 3


def test_disk_full_midway_through_a_batch_says_which_runs_were_stored(tmp_path, monkeypatch):
    s = Store(tmp_path)
    real = store_mod.atomic_write_parquet
    calls = []

    def second_write_fails(df, path):
        calls.append(path)
        if len(calls) == 2:
            raise StoreError(f"could not write {path}: the disk is full; the store is unchanged")
        real(df, path)

    monkeypatch.setattr(store_mod, "atomic_write_parquet", second_write_fails)
    two_runs = pl.concat([batch(0, 3, run="a"), batch(0, 3, run="b")])
    with pytest.raises(StoreError) as err:
        s.write_samples(two_runs)
    text = str(err.value)
    assert "the disk is full" in text and "store is unchanged" not in text
    assert "run(s) ['a'] were stored and those of ['b'] were not" in text
    monkeypatch.undo()
    assert s.samples("a").height == 3 and s.samples("b").height == 0
    assert s.write_samples(two_runs) == 3  # resending stores only what was missing
    assert s.samples("b").height == 3


def test_failed_compaction_keeps_the_write_and_merges_later(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 3)
    s = Store(tmp_path)
    s.write_samples(batch(0, 2))
    s.write_samples(batch(10, 2))

    def compaction_fails(self, run_dir):
        raise StoreError(
            f"could not write {run_dir}/base: the disk is full; the store is unchanged"
        )

    monkeypatch.setattr(Store, "_compact", compaction_fails)
    with caplog.at_level("WARNING", logger="profiler.store"):
        assert s.write_samples(batch(20, 2)) == 2  # the third file: compaction due, and fails
    assert "samples stored; merging the 3 files" in caplog.text and "disk is full" in caplog.text
    assert s.samples("r1").height == 6
    monkeypatch.undo()
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 3)
    s.write_samples(batch(30, 2))  # a later write merges them
    run_dir = tmp_path / "samples" / "r1"
    assert [p.name.split("-")[0] for p in s._live_parts(run_dir)[0]] == ["base"]
    assert s.samples("r1").height == 8


def test_runs_upsert_keeps_fields_a_partial_update_leaves_out(tmp_path):
    s = Store(tmp_path)
    first = pl.DataFrame({"run_id": ["a"], "status": ["running"], "gpu_model": ["NVIDIA H100"]})
    assert s.write_runs(first) == 1
    assert s.write_runs(first) == 0
    assert s.write_runs(pl.DataFrame({"run_id": ["a"], "status": ["finished"]})) == 1
    row = s.run("a")
    assert row["status"] == "finished" and row["gpu_model"] == "NVIDIA H100"


def test_bad_status_and_unknown_run(tmp_path):
    s = Store(tmp_path)
    with pytest.raises(SchemaError, match=r"'status': expected one of .* found 'done'"):
        s.write_runs(pl.DataFrame({"run_id": ["a"], "status": ["done"]}))
    with pytest.raises(BadInputError, match="no run 'zz' in the store .* the store is empty"):
        s.run("zz")
    # Found in review: samples without a run record (the sidecar alone) said "empty".
    s.write_samples(batch(run="zz"))
    with pytest.raises(BadInputError, match="run 'zz' has 3 samples in the store .* no run record"):
        s.run("zz")


def test_epochs_upsert_by_run_and_epoch(tmp_path):
    s = Store(tmp_path)
    marks = pl.DataFrame(
        {"run_id": "a", "epoch": [0, 1], "start": [at(0), at(10)], "end": [at(10), at(20)]}
    )
    assert s.write_epochs(marks) == 2
    assert s.write_epochs(marks) == 0
    fixed = marks.with_columns(end=pl.when(pl.col("epoch") == 1).then(at(21)).otherwise("end"))
    assert s.write_epochs(fixed) == 1
    assert s.epochs("a")["end"].to_list() == [at(10), at(21)]
    with pytest.raises(SchemaError, match="expected end >= start"):
        s.write_epochs(marks.with_columns(end=pl.lit(at(-5))))


def test_atomic_writes_keep_a_files_mode_and_follow_the_umask(tmp_path):
    """Found in review: the temporaries came from mkstemp (0600), so every report, model
    and store file became unreadable to others, even one that was 0644 before."""
    from profiler.store import atomic_write_bytes, atomic_write_parquet

    old = os.umask(0o022)
    try:
        new = tmp_path / "new.parquet"
        atomic_write_parquet(pl.DataFrame({"a": [1]}), new)
        assert new.stat().st_mode & 0o777 == 0o644
        atomic_write_bytes(b"<html></html>", tmp_path / "report.html")
        assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
        # a replaced file keeps the mode it had
        new.chmod(0o664)
        atomic_write_parquet(pl.DataFrame({"a": [2]}), new)
        assert new.stat().st_mode & 0o777 == 0o664
        assert pl.read_parquet(new)["a"].to_list() == [2]
        (tmp_path / "report.html").chmod(0o640)
        atomic_write_bytes(b"<html>2</html>", tmp_path / "report.html")
        assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
