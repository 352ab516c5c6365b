"""Output paths of ``wattwise bench pre`` found in review: checked before the fit.

``--out`` or ``--plot`` below a file ended in a traceback after the whole fit,
and a Parquet ``--out`` that could not be written said "the store is
unchanged", though ``bench pre`` has no store.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cluster.cli import main
from estimators.pre import PREModel
from profiler.errors import BadInputError
from profiler.store import atomic_write_bytes


@pytest.fixture
def files(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Training and test runs files: a slice of the real SEAA 2023 runs each."""
    runs = pl.read_parquet(shared_data / "runs.parquet").sort("run_id")
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    runs.gather_every(4).write_parquet(train)
    runs.gather_every(4, offset=1).head(12).write_parquet(test)
    return train, test


def _no_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    def fit(self: PREModel, frame: pl.DataFrame) -> PREModel:
        raise AssertionError("PRE was fitted before the output paths were checked")

    monkeypatch.setattr(PREModel, "fit", fit)


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_an_output_below_a_file_is_refused_before_the_fit(
    option: str,
    files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: ``--out ro/pred.csv`` (``ro`` a file) ended in a FileExistsError
    traceback (exit 1) after the fit; ``--plot ro/x.png`` too, after pred.csv was written."""
    (tmp_path / "ro").write_text("")
    train, test = files
    out = tmp_path / ("ro/pred.csv" if option == "--out" else "pred.csv")
    argv = ["bench", "pre", "--train", str(train), "--test", str(test), "--out", str(out)]
    bad = out if option == "--out" else tmp_path / "ro" / "x.png"
    if option == "--plot":
        argv += ["--plot", str(bad)]
    _no_fit(monkeypatch)
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{option} {bad}: {tmp_path / 'ro'} is a file, not a folder" in err
    assert "nothing was trained" in err
    assert not (tmp_path / "pred.csv").exists()


def test_an_output_that_is_a_folder_is_refused_before_the_fit(
    files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "pred.csv").mkdir()
    train, test = files
    _no_fit(monkeypatch)
    argv = ["bench", "pre", "--train", str(train), "--test", str(test)]
    assert main([*argv, "--out", str(tmp_path / "pred.csv")]) == 2
    assert "is a folder; expected a file name" in capsys.readouterr().err


def test_a_parquet_out_that_cannot_be_written_names_the_file_not_a_store(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: the message said "...; the store is unchanged"; bench pre has none."""
    train, test = files
    out = tmp_path / ("p" * 300 + ".parquet")  # longer than a file name may be
    argv = ["bench", "pre", "--train", str(train), "--test", str(test), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "File name too long" in err and f"{out} is unchanged" in err
    assert "store" not in err


def test_atomic_write_bytes_below_a_file_is_refused_not_a_traceback(tmp_path: Path) -> None:
    """Found in review: the folder was made outside the error handling (FileExistsError)."""
    (tmp_path / "ro").write_text("")
    with pytest.raises(BadInputError, match=r"could not create its folder .*ro.*is in the way"):
        atomic_write_bytes(b"x", tmp_path / "ro" / "sub" / "pred.csv")
    assert (tmp_path / "ro").read_text() == ""
