"""A sample stored without a measurement (a placeholder) is filled by a valued copy of it.

A placeholder is a sample whose power_w and energy_j are both null: an nvidia-smi
``[N/A]`` cell, the cut-off last line of a log, a source that failed at that tick.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import polars as pl
import pytest

from conftest import at
from profiler import store as store_mod
from profiler.errors import SchemaError, StoreError
from profiler.schema import conform
from profiler.store import Store

MODES = ["raise", "keep_stored"]


def batch(power: list[float | None], start: int = 0, run: str = "r1") -> pl.DataFrame:
    """Samples of GPU 0 on node n1, one a second from ``at(start)``."""
    return pl.DataFrame(
        {
            "run_id": run,
            "node": "n1",
            "device": "0",
            "timestamp": [at(start + i) for i in range(len(power))],
            "power_w": power,
            "source": "nvidia-smi",
        },
        schema_overrides={"power_w": pl.Float64},
    )


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


class Reports:
    """Collects what ``on_fill`` and ``on_conflict`` are told."""

    def __init__(self) -> None:
        self.fills: list[tuple[int, str]] = []
        self.conflicts: list[tuple[int, str]] = []

    def kw(self, mode: str) -> dict[str, object]:
        kw: dict[str, object] = {
            "conflicts": mode,
            "on_fill": lambda n, m: self.fills.append((n, m)),
        }
        if mode == "keep_stored":
            kw["on_conflict"] = lambda n, m: self.conflicts.append((n, m))
        return kw


@pytest.mark.parametrize("mode", MODES)
def test_a_valued_copy_fills_a_stored_placeholder(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    s, rep = Store(tmp_path), Reports()
    assert s.write_samples(batch([100.0, None, 100.0]), conflicts=mode) == 3
    with caplog.at_level("WARNING", logger="profiler.store"):
        assert s.write_samples(batch([100.0, 120.0, 100.0, 100.0]), **rep.kw(mode)) == 1  # t=3
    assert s.samples("r1")["power_w"].to_list() == [100.0, 120.0, 100.0, 100.0]
    assert rep.conflicts == []
    assert len(rep.fills) == 1 and rep.fills[0][0] == 1
    assert "at 2024-01-01 00:00:01+00:00 was stored" in rep.fills[0][1]
    assert "power_w=120.0" in rep.fills[0][1]
    assert "1 samples filled" in caplog.text and "run 'r1': 1" in caplog.text
    # One file holds the run now: the new base superseded the old files in one rename.
    run_dir = tmp_path / "samples" / "r1"
    assert [p.name for p in run_dir.iterdir() if not p.name.startswith(".")] == [
        "base-000000000001.parquet"
    ]
    assert s.write_samples(batch([100.0, 120.0, 100.0, 100.0]), **rep.kw(mode)) == 0
    assert len(rep.fills) == 1  # the value is stored now: a plain duplicate


@pytest.mark.parametrize("mode", MODES)
def test_a_placeholder_copy_of_a_valued_sample_is_a_plain_duplicate(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    s, rep = Store(tmp_path), Reports()
    s.write_samples(batch([100.0, 120.0, 100.0]))
    before = snapshot(tmp_path)
    with caplog.at_level("WARNING", logger="profiler.store"):
        assert s.write_samples(batch([100.0, None, 100.0]), **rep.kw(mode)) == 0
    assert (rep.fills, rep.conflicts, caplog.text) == ([], [], "")
    assert snapshot(tmp_path) == before
    assert s.samples("r1")["power_w"].to_list() == [100.0, 120.0, 100.0]


def test_two_values_still_conflict_and_a_refused_batch_fills_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.write_samples(batch([100.0, None]))
    before = snapshot(tmp_path)
    with pytest.raises(SchemaError, match=r"at 2024-01-01 00:00:00\+00:00 is already in the"):
        s.write_samples(batch([90.0, 120.0]))  # t=0 conflicts, t=1 would fill
    assert snapshot(tmp_path) == before


def test_keep_stored_skips_a_conflict_and_still_fills(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s, rep = Store(tmp_path), Reports()
    s.write_samples(batch([100.0, None]))
    with caplog.at_level("WARNING", logger="profiler.store"):
        assert s.write_samples(batch([90.0, 120.0]), **rep.kw("keep_stored")) == 0
    assert s.samples("r1")["power_w"].to_list() == [100.0, 120.0]
    assert [n for n, _ in rep.conflicts] == [1] and "power_w=90.0" in rep.conflicts[0][1]
    assert [n for n, _ in rep.fills] == [1]
    assert "1 samples not stored" in caplog.text and "1 samples filled" in caplog.text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("placeholder_first", [True, False])
def test_of_both_copies_in_one_batch_the_valued_one_is_kept(
    tmp_path: Path, mode: str, placeholder_first: bool
) -> None:
    s, rep = Store(tmp_path), Reports()
    empty, valued = batch([None], start=1), batch([120.0], start=1)
    two = batch([100.0]).vstack(empty if placeholder_first else valued)
    two = two.vstack(valued if placeholder_first else empty)
    assert s.write_samples(two, **rep.kw(mode)) == 2
    assert s.samples("r1")["power_w"].to_list() == [100.0, 120.0]
    assert rep.conflicts == []
    # A value after the placeholder fills it; a placeholder after the value is a duplicate.
    assert [n for n, _ in rep.fills] == ([1] if placeholder_first else [])
    if placeholder_first:
        assert "comes twice in the batch, first without a measurement" in rep.fills[0][1]


def test_conform_accepts_a_placeholder_beside_its_valued_copy() -> None:
    two = pl.concat([batch([None]), batch([120.0])])
    assert conform(two, "samples").height == 2  # the store keeps the valued one
    with pytest.raises(SchemaError, match="two different rows share the key"):
        conform(pl.concat([batch([100.0]), batch([120.0])]), "samples")


def test_a_fill_survives_a_crash_before_clean_up_and_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 4)
    s = Store(tmp_path)
    s.write_samples(batch([100.0, None, 100.0]))
    s.write_samples(batch([100.0, None], start=3))
    run_dir = tmp_path / "samples" / "r1"
    old = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert sorted(old) == ["part-000000000000.parquet", "part-000000000001.parquet"]
    assert s.write_samples(batch([120.0, 100.0, 100.0, 140.0, 100.0], start=1)) == 1  # t=5 new
    # A crash after the new base's rename and before the old files were removed: put them back.
    for name, data in old.items():
        (run_dir / name).write_bytes(data)
    want = [100.0, 120.0, 100.0, 100.0, 140.0, 100.0]
    got = s.samples("r1")
    assert got["power_w"].to_list() == want and got["timestamp"].n_unique() == 6
    assert Store(tmp_path).samples("r1")["power_w"].to_list() == want  # a fresh reader too
    assert s.write_samples(batch(want)) == 0  # idempotent over the new base
    for i in range(6):  # enough parts for a compaction
        s.write_samples(batch([100.0], start=10 + i))
    live = s._live_parts(run_dir)[0]
    # A compaction after the fill's base (base-000000000002) merged everything into one base.
    assert len(live) == 1 and live[0].name.startswith("base-") and int(live[0].name[5:17]) > 2
    got = s.samples("r1")
    assert got["power_w"].to_list() == [*want, *[100.0] * 6]
    assert got["timestamp"].n_unique() == got.height == 12


def test_a_fill_that_cannot_be_written_leaves_the_store_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(tmp_path)
    s.write_samples(batch([100.0, None, 100.0]))
    before = snapshot(tmp_path)

    def disk_full(self: pl.DataFrame, fh: object, **kwargs: object) -> None:
        fh.write(b"PAR1 half a file")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", disk_full)
    with pytest.raises(StoreError, match="the disk is full; the store is unchanged"):
        s.write_samples(batch([100.0, 120.0, 100.0]))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert s.samples("r1")["power_w"].to_list() == [100.0, None, 100.0]
    assert s.write_samples(batch([100.0, 120.0, 100.0])) == 0  # sent again: filled now
    assert s.samples("r1")["power_w"].to_list() == [100.0, 120.0, 100.0]


def test_fills_of_several_runs_are_counted_per_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s, rep = Store(tmp_path), Reports()
    s.write_samples(pl.concat([batch([None, None], run="a"), batch([None], run="b")]))
    both = pl.concat([batch([1.0, 2.0], run="a"), batch([3.0], run="b")])
    with caplog.at_level("WARNING", logger="profiler.store"):
        assert s.write_samples(both, **rep.kw("raise")) == 0
    assert [n for n, _ in rep.fills] == [3]
    assert "run 'a': 2, run 'b': 1" in caplog.text
    assert s.samples()["power_w"].to_list() == [1.0, 2.0, 3.0]


def _nvsmi(power: float | None) -> pl.DataFrame:
    """One nvidia-smi sample: power (or its `[N/A]`) with model, utilisation and temperature."""
    return pl.DataFrame(
        {
            "run_id": "r1",
            "node": "n",
            "device": "0",
            "timestamp": [at(0)],
            "model": "NVIDIA A100",
            "power_w": pl.Series([power], dtype=pl.Float64),
            "gpu_util_pct": [97.0],
            "temp_c": [71.0],
            "source": "nvidia-smi",
        }
    )


COLS = ("model", "power_w", "gpu_util_pct", "temp_c")


@pytest.mark.parametrize("same_batch", [False, True])
def test_a_fill_keeps_what_the_placeholder_knew(tmp_path: Path, same_batch: bool) -> None:
    """Regression: a power-only copy filling an `[N/A]` sample replaced the whole row, so
    the model, utilisation and temperature the placeholder carried were lost."""
    store = Store(tmp_path / "s")
    valued = pl.DataFrame(
        {"run_id": "r1", "node": "n", "device": "0", "timestamp": [at(0)], "power_w": [250.0]}
    ).with_columns(source=pl.lit("nvidia-smi"))
    if same_batch:
        store.write_samples(pl.concat([_nvsmi(None), valued], how="diagonal_relaxed"))
    else:
        store.write_samples(_nvsmi(None))
        store.write_samples(valued)
    got = store.samples("r1")
    assert got.height == 1
    assert got.select(COLS).row(0) == ("NVIDIA A100", 250.0, 97.0, 71.0)
