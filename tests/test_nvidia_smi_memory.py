"""nvidia-smi CSV reader: bounded memory on long files, and the same result read in pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from profiler.errors import BadInputError, SchemaError
from profiler.importers import nvidia_smi
from profiler.importers.nvidia_smi import read_nvidia_smi_file

REPO = Path(__file__).resolve().parents[1]
NATIVE_HEADER = (
    "timestamp, name, utilization.gpu [%], utilization.memory [%], memory.total [MiB], "
    "memory.used [MiB], power.draw [W], power.max_limit [W], temperature.gpu"
)


def smi_rows(n: int, start_s: int = 0) -> pl.Series:
    """``n`` rows as nvidia-smi writes them at 1 Hz (native layout), from 13:27:53.079 on."""
    i = pl.int_range(start_s, start_s + n, eager=True)
    return pl.select(
        pl.concat_str(
            (pl.datetime(2023, 3, 9, 13, 27, 53, 79_000) + pl.duration(seconds=i)).dt.strftime(
                "%Y/%m/%d %H:%M:%S%.3f"
            ),
            pl.lit(", NVIDIA GeForce RTX 3090, "),
            (i * 7 % 101).cast(pl.String),
            pl.lit(" %, "),
            (i % 41).cast(pl.String),
            pl.lit(" %, 24268 MiB, 11135 MiB, "),
            (8.14 + (i * 37 % 32800) / 100).round(2).cast(pl.String),
            pl.lit(" W, 350.00 W, "),
            (27 + i % 40).cast(pl.String),
        )
    ).to_series()


def write(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


def outcome(path: Path) -> tuple[object, ...]:
    """What reading ``path`` gives: the samples, rows and cut-off line, or the error."""
    try:
        read = read_nvidia_smi_file(path, node="n", run_id="r")
    except BadInputError as err:
        return type(err).__name__, str(err)
    return read.samples.to_dicts(), read.rows.to_list(), read.cut_off_row, read.cut_off_text


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 40 bytes (one line or less) and conform slices of 3 samples."""
    monkeypatch.setattr(nvidia_smi, "_PIECE_BYTES", 40)
    monkeypatch.setattr(nvidia_smi, "_CONFORM_ROWS", 3)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_long_file_is_read_in_a_few_times_its_size(tmp_path: Path) -> None:
    """Regression: a 400,000-row file took 10x its size (430 MiB for 43 MB) to read.

    Every line became a Python string, then a polars string, a list of cells and
    stripped cells at once, and ``conform`` hashed every sample's key in one go.
    Read a piece at a time it takes about 2.5x (110 MiB).
    """
    path = tmp_path / "long.csv"
    path.write_text(NATIVE_HEADER + "\n" + "\n".join(smi_rows(400_000).to_list()) + "\n")
    warm = write(tmp_path / "warm.csv", [NATIVE_HEADER, *smi_rows(1000).to_list()])
    child = (
        "import json, sys\n"
        "def hwm():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM:'))\n"
        "from profiler.importers.nvidia_smi import read_nvidia_smi_file as read\n"
        "read(sys.argv[2], node='n', run_id='r')\n"
        "before = hwm()\n"
        "n = read(sys.argv[1], node='n', run_id='r').samples.height\n"
        "print(json.dumps({'rows': n, 'added_kib': hwm() - before}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, str(path), str(warm)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "POLARS_MAX_THREADS": "2"},
    )
    fig = json.loads(done.stdout)
    assert fig["rows"] == 400_000
    size_kib = path.stat().st_size / 1024
    assert fig["added_kib"] < 5 * size_kib, (
        f"reading a {size_kib / 1024:.0f} MiB file added {fig['added_kib'] / 1024:.0f} MiB"
    )


def test_pieces_give_the_samples_of_one_read(tmp_path: Path, small_pieces: None) -> None:
    """Blank lines, a repeated header, CRLF and a cut-off last line, across many pieces."""
    rows = smi_rows(12).to_list()
    lines = [NATIVE_HEADER, *rows[:4], "", NATIVE_HEADER, *rows[4:9], "  ", *rows[9:]]
    path = tmp_path / "t.csv"
    path.write_bytes(("\r\n".join(lines) + "\r\n" + rows[-1][:30]).encode())
    small = outcome(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nvidia_smi, "_PIECE_BYTES", 4 << 20)
        mp.setattr(nvidia_smi, "_CONFORM_ROWS", 1 << 16)
        whole = outcome(path)
    assert small == whole
    samples, data_rows, cut_row, cut_text = small
    assert len(samples) == 12  # type: ignore[arg-type]
    assert data_rows == [1, 2, 3, 4, 7, 8, 9, 10, 11, 13, 14, 15]
    assert (cut_row, cut_text) == (16, rows[-1][:30])


def test_pieces_report_the_first_check_that_refuses_a_row(
    tmp_path: Path, small_pieces: None
) -> None:
    """A wrong field count (row 9) is named before an earlier bad timestamp (row 2).

    As when the whole file is checked at once: the first check that refuses any row
    names its first row, even if another piece holds an earlier row another check refuses.
    """
    rows = smi_rows(10).to_list()
    rows[1] = "yesterday" + rows[1][23:]
    rows[8] += ", 5"
    path = write(tmp_path / "t.csv", [NATIVE_HEADER, *rows])
    with pytest.raises(BadInputError, match=r"t\.csv, row 9: expected 9 comma-separated fields"):
        read_nvidia_smi_file(path, node="n", run_id="r")


def test_a_later_byte_not_utf8_is_named_first(tmp_path: Path, small_pieces: None) -> None:
    """An undecodable byte is named with its file offset, before any row's error."""
    rows = smi_rows(5).to_list()
    rows[0] = "yesterday" + rows[0][23:]
    path = tmp_path / "t.csv"
    text = ("\n".join([NATIVE_HEADER, *rows]) + "\n").encode()
    path.write_bytes(text + b"\xff\n")
    with pytest.raises(BadInputError, match=rf"found byte 0xff at offset {len(text)}$"):
        read_nvidia_smi_file(path, node="n", run_id="r")


def test_byte_offset_counts_the_bom(tmp_path: Path) -> None:
    """Regression: after a UTF-8 BOM the offset left the BOM out and named the wrong byte.

    ``b"\\xef\\xbb\\xbfab\\xff"`` was reported as byte 0xbf at offset 2; it is 0xff at 5.
    """
    path = tmp_path / "t.csv"
    head = b"\xef\xbb\xbf" + NATIVE_HEADER.encode() + b"\n"
    path.write_bytes(head + b"\xff\n")
    with pytest.raises(BadInputError, match=rf"found byte 0xff at offset {len(head)}$"):
        read_nvidia_smi_file(path, node="n", run_id="r")


def test_conform_slices_count_rows_over_the_file(tmp_path: Path, small_pieces: None) -> None:
    """A power of 1e400 W (infinite) in row 8 is named as row 8, not its row in a slice."""
    rows = smi_rows(10).to_list()
    rows[7] = rows[7].replace(rows[7].split(", ")[6], "1e400 W")
    path = write(tmp_path / "t.csv", [NATIVE_HEADER, *rows])
    with pytest.raises(SchemaError, match=r"row 8, 'power_w': expected a finite number >= 0"):
        read_nvidia_smi_file(path, node="n", run_id="r")
