"""Importers: nvidia-smi CSV, dcgm-exporter text, SEAA 2023 dataset layout."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from profiler.errors import BadInputError
from profiler.importers import slug
from profiler.importers.dcgm import (
    format_dcgm_file,
    format_dcgm_text,
    parse_dcgm_text,
    read_dcgm_file,
)
from profiler.importers.nvidia_smi import read_nvidia_smi_csv, read_nvidia_smi_file
from profiler.importers.seaa2023 import import_seaa2023
from profiler.schema import schema
from profiler.store import Store

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seaa2023"
needs_shared = pytest.mark.skipif(
    not (SHARED / "runs.parquet").is_file(), reason=f"shared dataset not found at {SHARED}"
)

NATIVE_HEADER = (
    "timestamp, name, utilization.gpu [%], utilization.memory [%], memory.total [MiB], "
    "memory.used [MiB], power.draw [W], power.max_limit [W], temperature.gpu"
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def smi_row(ts: str, power: str, util: str = "50 %", temp: str = "60") -> str:
    gpu = "NVIDIA GeForce RTX 3090"
    return f"{ts}, {gpu}, {util}, 10 %, 24268 MiB, 11051 MiB, {power}, 350.00 W, {temp}"


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# nvidia-smi CSV


def test_native_header_slash_timestamps_units_and_na() -> None:
    df = read_nvidia_smi_csv(DATA / "nvidia-smi-native.csv", node="box", run_id="r1")
    assert df.schema == schema("samples")
    assert df["timestamp"].to_list() == [
        utc(2023, 3, 9, 13, 27, 53, 79000),
        utc(2023, 3, 9, 13, 27, 54, 83000),
        utc(2023, 3, 9, 13, 27, 55, 84000),
        utc(2023, 3, 9, 13, 27, 56, 85000),
    ]
    assert df["power_w"].to_list() == [8.14, 47.60, None, 335.36]
    assert df["gpu_util_pct"].to_list() == [0.0, 12.0, None, 94.0]
    assert df["mem_util_pct"].to_list() == [0.0, 3.0, None, 41.0]  # [Not Supported]
    assert df["mem_used_mib"].to_list() == [11051.0, 11051.0, None, 11135.0]
    assert df["temp_c"].to_list() == [27.0, 30.0, None, 65.0]  # bare N/A
    assert df["energy_j"].null_count() == 4
    # uuid wins over index and pci.bus_id
    assert set(df["device"]) == {"GPU-5a1e0f3c-0000-4000-8000-000000000000"}
    assert set(df["model"]) == {"NVIDIA GeForce RTX 3090"}
    assert set(df["node"]) == {"box"} and set(df["run_id"]) == {"r1"}
    assert set(df["source"]) == {"nvidia-smi"}


def test_renamed_header_dash_timestamps() -> None:
    df = read_nvidia_smi_csv(DATA / "nvidia-smi-renamed.csv", node="cloud", run_id=None)
    assert df["timestamp"][0] == utc(2022, 12, 5, 9, 55, 42, 535000)
    assert df["power_w"].to_list() == [100.0, 200.0, 300.0]
    assert df["gpu_util_pct"].to_list() == [0.0, 50.0, 100.0]
    assert df["mem_used_mib"].to_list() == [23573.0, 23573.0, 23657.0]
    assert df["temp_c"].to_list() == [55.0, 56.0, 57.0]
    assert df["device"].to_list() == ["0", "0", "0"]  # no device column: one device "0"
    assert df["run_id"].null_count() == 3


def test_nounits_and_no_fraction(tmp_path: Path) -> None:
    text = (
        "timestamp, power.draw [W], utilization.gpu [%]\n"
        "2023/03/09 13:27:53, 47.6, 7\n"
        "2023/03/09 13:27:54, 1.5e2, 8\n"
    )
    df = read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")
    assert df["power_w"].to_list() == [47.6, 150.0]
    assert df["timestamp"].to_list() == [utc(2023, 3, 9, 13, 27, 53), utc(2023, 3, 9, 13, 27, 54)]


def test_timestamps_are_local_time_in_tz() -> None:
    # Madrid is UTC+1 in December: 09:55:42.535 local is 08:55:42.535 UTC.
    df = read_nvidia_smi_csv(
        DATA / "nvidia-smi-renamed.csv", node="n", run_id="r", tz="Europe/Madrid"
    )
    assert df["timestamp"][0] == utc(2022, 12, 5, 8, 55, 42, 535000)


def test_several_gpus_interleaved() -> None:
    df = read_nvidia_smi_csv(DATA / "nvidia-smi-two-gpus.csv", node="n", run_id="r")
    a = df.filter(pl.col("device") == "GPU-aaaaaaaa-0000-4000-8000-000000000000")
    b = df.filter(pl.col("device") == "GPU-bbbbbbbb-0000-4000-8000-000000000000")
    assert a["power_w"].to_list() == [100.0, 110.0, 120.0]
    assert b["power_w"].to_list() == [200.0, 220.0, 240.0]
    assert b["timestamp"][0] == utc(2024, 1, 10, 8, 0, 0, 4000)
    assert set(df["model"]) == {"NVIDIA H100 80GB HBM3"}


def test_index_identifies_devices_without_uuid(tmp_path: Path) -> None:
    text = (
        "timestamp, index, power.draw [W]\n"
        "2024/01/10 08:00:00.000, 0, 100.00 W\n"
        "2024/01/10 08:00:00.000, 1, 200.00 W\n"
        "2024/01/10 08:00:01.000, 0, 110.00 W\n"
        "2024/01/10 08:00:01.000, 1, 210.00 W\n"
    )
    df = read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")
    assert df["device"].to_list() == ["0", "1", "0", "1"]
    assert df["power_w"].to_list() == [100.0, 200.0, 110.0, 210.0]


CUT_OFF = "2023/03/09 14:29:10.658, NVIDIA GeForce RTX 3090, 93 %, 40 %, 24268 MiB, 11135 "


def test_cut_off_last_line_is_left_out_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a last line cut off mid-write (as in cloud-vgg16-00) was kept with
    power_w=None, so importing the finished file later conflicted with it."""
    text = NATIVE_HEADER + "\n" + smi_row("2023/03/09 14:29:09.657", "335.36 W") + "\n" + CUT_OFF
    read = read_nvidia_smi_file(write(tmp_path, text), node="n", run_id="r")
    assert read.samples["power_w"].to_list() == [335.36]
    assert read.rows.to_list() == [1]
    assert (read.cut_off_row, read.cut_off_text) == (2, CUT_OFF)
    # the plain reader gives the same samples and logs what it left out
    with caplog.at_level(logging.WARNING):
        df = read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")
    assert df.equals(read.samples)
    assert "row 2: the last line has no newline at its end" in caplog.text


@pytest.mark.parametrize(
    "last",
    [
        smi_row("2023/03/09 14:29:10.658", "335.36 W", temp="6"),  # "6" of "65": all fields
        "2023/03/09 14:29:10.658, NVIDIA GeForce RTX 3090, 93 %, 40 %, 24268 MiB, 111",
        "2023/03/09 14:2",  # even the timestamp is cut short
    ],
)
def test_any_last_line_without_newline_is_left_out(tmp_path: Path, last: str) -> None:
    """A complete-looking last cell may be cut short too ("6" of "65"): only the newline tells."""
    text = NATIVE_HEADER + "\n" + smi_row("2023/03/09 14:29:09.657", "335.36 W") + "\n" + last
    read = read_nvidia_smi_file(write(tmp_path, text), node="n", run_id="r")
    assert read.samples["temp_c"].to_list() == [60.0]
    assert read.cut_off_row == 2


def test_only_a_cut_off_line_gives_no_samples(tmp_path: Path) -> None:
    text = NATIVE_HEADER + "\n" + CUT_OFF
    read = read_nvidia_smi_file(write(tmp_path, text), node="n", run_id="r")
    assert (read.samples.height, read.cut_off_row) == (0, 1)


def test_finished_file_has_no_cut_off_row(tmp_path: Path) -> None:
    text = NATIVE_HEADER + "\n" + smi_row("2023/03/09 14:29:09.657", "335.36 W") + "\n"
    read = read_nvidia_smi_file(write(tmp_path, text), node="n", run_id="r")
    assert (read.samples.height, read.cut_off_row, read.cut_off_text) == (1, None, None)


def test_blank_lines_and_repeated_header_are_skipped(tmp_path: Path) -> None:
    text = "\n".join(
        [
            NATIVE_HEADER,
            smi_row("2023/03/09 13:00:00.000", "10.00 W"),
            "",
            NATIVE_HEADER,  # nvidia-smi restarted, appending to the same file
            smi_row("2023/03/09 13:00:01.000", "20.00 W"),
            "",
        ]
    )
    read = read_nvidia_smi_file(write(tmp_path, text), node="n", run_id="r")
    assert read.samples["power_w"].to_list() == [10.0, 20.0]
    assert read.rows.to_list() == [1, 4]  # data rows: the blank line and header count


BAD_SMI = {
    "empty file": ("", r"trace\.csv: empty file; expected a header line"),
    "blank file": ("\n\n", r"empty file"),
    "header only": (NATIVE_HEADER + "\n", r"empty file: the header has no data rows"),
    "no power column": (
        "timestamp, name, utilization.gpu [%]\n2023/03/09 13:27:53.079, X, 1 %\n",
        r"trace\.csv, header: expected a 'power\.draw' column .*found columns "
        r"\['timestamp', 'name', 'utilization\.gpu \[%\]'\]",
    ),
    "no timestamp column": (
        "time, power.draw [W]\n2023/03/09 13:27:53.079, 5 W\n",
        r"header: expected a 'timestamp' column",
    ),
    "no header": (
        smi_row("2023/03/09 13:27:53.079", "5.00 W") + "\n",
        r"header: expected a header line .*found data '2023/03/09",
    ),
    "unparsable timestamp": (
        NATIVE_HEADER
        + "\n"
        + smi_row("2023/03/09 13:27:53.079", "5.00 W")
        + "\n"
        + smi_row("09.03.2023 13:27:54", "5.00 W")
        + "\n",
        r"trace\.csv, row 2, column 'timestamp': expected a timestamp like "
        r"'2022-12-05 09:55:42\.535' or '2023/03/09 13:27:53\.079'; found '09\.03\.2023 13:27:54'",
    ),
    "missing timestamp": (
        NATIVE_HEADER + "\n" + smi_row("", "5.00 W") + "\n",
        r"row 1, column 'timestamp': expected a timestamp .*; found an empty cell",
    ),
    "non-numeric power": (
        NATIVE_HEADER + "\n" + smi_row("2023/03/09 13:27:53.079", "abc W") + "\n",
        r"row 1, column 'power\.draw \[W\]': expected a power in W such as '47\.60 W' "
        r"\(or \[N/A\]\); found 'abc W'",
    ),
    "power in the wrong unit": (
        NATIVE_HEADER + "\n" + smi_row("2023/03/09 13:27:53.079", "24268 MiB") + "\n",
        r"row 1, column 'power\.draw \[W\]': expected a power in W .*found '24268 MiB'",
    ),
    "negative power": (
        NATIVE_HEADER
        + "\n"
        + smi_row("2023/03/09 13:27:53.079", "5.00 W")
        + "\n"
        + smi_row("2023/03/09 13:27:54.079", "-3.50 W")
        + "\n",
        r"row 2, column 'power\.draw \[W\]': expected a power >= 0 W; found -3\.5 W",
    ),
    "non-numeric temperature": (
        NATIVE_HEADER + "\n" + smi_row("2023/03/09 13:27:53.079", "5 W", temp="hot") + "\n",
        r"row 1, column 'temperature\.gpu': expected a number such as '65' .*found 'hot'",
    ),
    "unsorted timestamps": (
        NATIVE_HEADER
        + "\n"
        + smi_row("2023/03/09 13:27:53.079", "5.00 W")
        + "\n"
        + smi_row("2023/03/09 13:27:55.079", "5.00 W")
        + "\n"
        + smi_row("2023/03/09 13:27:54.079", "5.00 W")
        + "\n",
        r"row 3, 'timestamp': unsorted timestamps: 2023-03-09 13:27:54\.079000\+00:00 follows "
        r"2023-03-09 13:27:55\.079000\+00:00 \(row 2\) for device '0'; expected strictly "
        r"increasing timestamps per device",
    ),
    "duplicated timestamps": (
        NATIVE_HEADER
        + "\n"
        + smi_row("2023/03/09 13:27:53.079", "5.00 W")
        + "\n"
        + smi_row("2023/03/09 13:27:53.079", "6.00 W")
        + "\n",
        r"row 2, 'timestamp': duplicated timestamps: .* \(row 1\) for device '0'.*if the file "
        r"holds several GPUs, add index or uuid to --query-gpu",
    ),
    "negative utilisation": (
        NATIVE_HEADER + "\n" + smi_row("2023/03/09 13:27:53.079", "5 W", util="-5 %") + "\n",
        r"trace\.csv, row 1, column 'utilization\.gpu \[%\]': expected a utilisation from 0 to "
        r"100 %; found -5 %",
    ),
    "utilisation over 100 %": (
        NATIVE_HEADER
        + "\n"
        + smi_row("2023/03/09 13:27:53.079", "5 W")
        + "\n"
        + smi_row("2023/03/09 13:27:54.079", "5 W", util="500 %")
        + "\n",
        r"row 2, column 'utilization\.gpu \[%\]': expected a utilisation from 0 to 100 %; "
        r"found 500 %",
    ),
    "memory utilisation over 100 %": (
        "timestamp,gpu_power_draw,gpu_memory_usage\n2022-12-05 09:55:42.535,5 W,100.5 %\n",
        r"row 1, column 'gpu_memory_usage': expected a utilisation from 0 to 100 %; "
        r"found 100\.5 %",
    ),
    "short row in the middle": (
        NATIVE_HEADER
        + "\n"
        + "2023/03/09 13:27:53.079, NVIDIA GeForce RTX 3090, 5 %\n"
        + smi_row("2023/03/09 13:27:54.079", "5.00 W")
        + "\n",
        r"row 1: expected 9 comma-separated fields as in the header; found 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SMI))
def test_nvidia_smi_bad_input(tmp_path: Path, case: str) -> None:
    text, message = BAD_SMI[case]
    with pytest.raises(BadInputError, match=message):
        read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")


def test_duplicates_are_per_device(tmp_path: Path) -> None:
    text = (
        "timestamp, index, power.draw [W]\n"
        "2024/01/10 08:00:00.000, 0, 100.00 W\n"
        "2024/01/10 08:00:01.000, 1, 200.00 W\n"
        "2024/01/10 08:00:01.000, 1, 210.00 W\n"
    )
    with pytest.raises(BadInputError, match=r"row 3, .*duplicated .*\(row 2\) for device '1'"):
        read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")


def test_nonexistent_local_time_is_refused(tmp_path: Path) -> None:
    # Clocks in Madrid jumped from 02:00 to 03:00 on 2023-03-26: 02:30 never happened.
    text = NATIVE_HEADER + "\n" + smi_row("2023-03-26 02:30:00.000", "5.00 W") + "\n"
    with pytest.raises(BadInputError, match=r"row 1, .*does not exist or is ambiguous"):
        read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r", tz="Europe/Madrid")


def test_unknown_time_zone_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"unknown time zone 'Mars/Olympus'"):
        read_nvidia_smi_csv(
            DATA / "nvidia-smi-renamed.csv", node="n", run_id="r", tz="Mars/Olympus"
        )
    with pytest.raises(BadInputError, match=r"nope\.csv: expected an nvidia-smi CSV file; no such"):
        read_nvidia_smi_csv(tmp_path / "nope.csv", node="n", run_id="r")


def test_bad_run_id_is_refused() -> None:
    with pytest.raises(BadInputError, match=r"run_id must match"):
        read_nvidia_smi_csv(DATA / "nvidia-smi-renamed.csv", node="n", run_id="../escape")


@needs_shared
def test_shared_csvs_equal_the_dataset_traces() -> None:
    """The raw CSVs parse to exactly the rows the dataset authors extracted into traces.parquet."""
    traces = pl.read_parquet(SHARED / "traces.parquet")
    cols = ["timestamp", "power_w", "gpu_util_pct", "mem_util_pct", "mem_used_mib", "temp_c"]
    cut_off = {}
    for path in sorted(SHARED.glob("nvidia-smi-*.csv")):
        run_id = path.stem.removeprefix("nvidia-smi-")
        read = read_nvidia_smi_file(path, node="cloud", run_id=run_id)
        df = read.samples
        ref = traces.filter(pl.col("run_id") == run_id).with_columns(
            pl.col("timestamp").dt.replace_time_zone("UTC")
        )
        if read.cut_off_row is not None:
            cut_off[run_id] = read.cut_off_row
            # the dataset kept the cut-off last line as a sample without power
            assert ref["power_w"][-1] is None
            ref = ref.head(-1)
        assert df.height == ref.height > 2000
        assert df.select(cols).equals(ref.select(cols)), run_id
    assert list(cut_off) == ["cloud-vgg16-00"]


@needs_shared
def test_shared_csvs_energy_within_1_percent_of_reported() -> None:
    """The proof of issue 2: raw CSV -> trapezoid energy within 1 % of gpu_energy_j."""
    from estimators.energy import run_energy

    runs = pl.read_parquet(SHARED / "runs.parquet")
    paths = sorted(SHARED.glob("nvidia-smi-*.csv"))
    assert len(paths) == 3
    for path in paths:
        run_id = path.stem.removeprefix("nvidia-smi-")
        t0 = time.perf_counter()
        samples = read_nvidia_smi_csv(path, node="cloud", run_id=run_id)
        elapsed = time.perf_counter() - t0
        energy = run_energy(samples)["energy_j"].item()
        reported = runs.filter(pl.col("run_id") == run_id)["gpu_energy_j"].item()
        rel = energy / reported - 1
        print(
            f"{run_id}: {samples.height} rows in {elapsed * 1000:.0f} ms, {energy:.0f} J "
            f"vs reported {reported:.0f} J, relative error {rel:+.3%}"
        )
        assert abs(rel) < 0.01
        assert elapsed < 1.0  # vectorised: ~30 ms for 5,000 rows on a 2-core CPU


# -- header units ------------------------------------------------------------------------------
def test_header_unit_sets_the_unit_of_the_cells(tmp_path: Path) -> None:
    """Regression: ``power.draw [mW]`` with cells ``100000`` was read as 100000 W."""
    from estimators.energy import run_energy

    text = (
        "timestamp, power.draw [mW], memory.used [GiB], utilization.gpu [%]\n"
        "2024/01/10 08:00:00.000, 100000, 2, 5 %\n"
        "2024/01/10 08:00:01.000, 100000 mW, 0.5 GiB, 5\n"
        "2024/01/10 08:00:02.000, 100000.0mW, [N/A], 5 %\n"
    )
    df = read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")
    assert df["power_w"].to_list() == [100.0, 100.0, 100.0]
    assert df["mem_used_mib"].to_list() == [2048.0, 512.0, None]
    assert run_energy(df)["energy_j"].item() == pytest.approx(200.0)


def test_kilowatts_and_kibibytes_convert(tmp_path: Path) -> None:
    text = "timestamp, power.draw [kW], memory.used [KiB]\n2024/01/10 08:00:00, 0.25 kW, 1024 KiB\n"
    df = read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")
    assert (df["power_w"].item(), df["mem_used_mib"].item()) == (250.0, 1.0)


BAD_UNITS = {
    "unknown power unit": (
        "timestamp, power.draw [dBm]\n2024/01/10 08:00:00, 5\n",
        r"trace\.csv, header: column 'power\.draw \[dBm\]': expected the unit 'W' or 'mW' or "
        r"'kW' \(or none, meaning 'W'\); found 'dBm'",
    ),
    "megawatt is not milliwatt": (
        "timestamp, power.draw [MW]\n2024/01/10 08:00:00, 5\n",
        r"header: column 'power\.draw \[MW\]': expected the unit .*; found 'MW'",
    ),
    "memory in MB (decimal or binary?)": (
        "timestamp, power.draw [W], memory.used [MB]\n2024/01/10 08:00:00, 5, 7\n",
        r"header: column 'memory\.used \[MB\]': expected the unit 'MiB' or 'KiB' or 'GiB' "
        r"\(or none, meaning 'MiB'\); found 'MB'",
    ),
    "temperature in F": (
        "timestamp, power.draw [W], temperature.gpu [F]\n2024/01/10 08:00:00, 5, 150\n",
        r"column 'temperature\.gpu \[F\]': expected the unit 'C' .*found 'F'",
    ),
    "cell unit disagrees with the header": (
        "timestamp, power.draw [mW]\n2024/01/10 08:00:00, 100000 mW\n2024/01/10 08:00:01, 100 W\n",
        r"trace\.csv, row 2, column 'power\.draw \[mW\]': expected a power in mW such as "
        r"'47\.60 mW' \(or \[N/A\]\); found '100 W': its unit 'W' is not the column's unit 'mW'$",
    ),
    "cell in mW under a header without unit": (
        "timestamp,gpu_power_draw\n2024-01-10 08:00:00,100000 mW\n",
        r"row 1, column 'gpu_power_draw': expected a power in W .*found '100000 mW': its unit "
        r"'mW' is not the column's unit 'W' \(the header names no unit, so 'W' is assumed; "
        r"write 'gpu_power_draw \[mW\]' in the header\)",
    ),
    "memory cell in GiB under MiB": (
        "timestamp, power.draw [W], memory.used [MiB]\n2024/01/10 08:00:00, 5 W, 2 GiB\n",
        r"row 1, column 'memory\.used \[MiB\]': expected a number such as '11135 MiB' .*"
        r"found '2 GiB': its unit 'GiB' is not the column's unit 'MiB'$",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UNITS))
def test_units_that_cannot_be_read_are_refused(tmp_path: Path, case: str) -> None:
    text, message = BAD_UNITS[case]
    with pytest.raises(BadInputError, match=message):
        read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")


# -- several GPUs without a device column ------------------------------------------------------
def gpus_csv(n_gpus: int, *, seconds: int = 60, index: bool = False, step_ms: int = 2) -> str:
    """nvidia-smi -l 1 on ``n_gpus`` H100s: each GPU's row stamped ``step_ms`` after the last."""
    rows = ["timestamp, " + ("index, " if index else "") + "power.draw [W]"]
    for t in range(seconds):
        for g in range(n_gpus):
            ms = 1000 * t + step_ms * g
            stamp = f"2024/01/10 13:{ms // 60_000:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
            rows.append(f"{stamp}, " + (f"{g}, " if index else "") + f"{300 - 200 * (g % 2)}.00 W")
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("n_gpus", [2, 4, 8])
def test_interleaved_gpus_without_index_are_refused(tmp_path: Path, n_gpus: int) -> None:
    """Regression: two GPUs 2 ms apart became one alternating trace, half the energy."""
    with pytest.raises(
        BadInputError,
        match=rf"trace\.csv, row 2, 'timestamp': the rows look like several GPUs interleaved: "
        rf"{60 * (n_gpus - 1)} times a row comes only 2 ms \(median\) after the previous one, "
        r"while samples are \d+ ms apart.*add index \(or uuid\) to the --query-gpu list",
    ):
        read_nvidia_smi_csv(write(tmp_path, gpus_csv(n_gpus)), node="n", run_id="r")


def test_interleaved_gpus_with_index_import_whole(tmp_path: Path) -> None:
    from estimators.energy import run_energy

    df = read_nvidia_smi_csv(write(tmp_path, gpus_csv(2, index=True)), node="n", run_id="r")
    assert df["device"].unique().sort().to_list() == ["0", "1"]
    assert run_energy(df)["energy_j"].sum() == pytest.approx(59 * 400.0)


def test_one_gpu_with_pauses_and_a_change_of_rate_imports(tmp_path: Path) -> None:
    """One GPU: a 1 s trace, a restart after a pause, then -lms 50; none of it looks like GPUs."""
    stamps = [i * 1000 for i in range(30)] + [600_000 + i * 1000 for i in range(30)]
    stamps += [700_000 + i * 50 for i in range(100)] + [900_000, 960_000]
    rows = [
        f"2024/01/10 13:{ms // 60_000:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}, 100.00 W"
        for ms in stamps
    ]
    text = "timestamp, power.draw [W]\n" + "\n".join(rows) + "\n"
    df = read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")
    assert df.height == len(stamps) and set(df["device"]) == {"0"}


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        (
            "name",
            ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"],
            r"row 2, column 'name': found 'NVIDIA A100-SXM4-80GB' after 'NVIDIA H100 80GB HBM3'"
            r": 2 GPUs in a file without an index, uuid or pci\.bus_id column",
        ),
        (
            "serial",
            ["1650123456789", "1650123456790"],
            r"row 2, column 'serial': found '1650123456790' after '1650123456789': 2 GPUs",
        ),
    ],
)
def test_several_names_or_serials_without_index_are_refused(
    tmp_path: Path, column: str, values: list[str], message: str
) -> None:
    rows = [
        f"2024/01/10 13:00:{t:02d}.{5 * g:03d}, {values[g]}, 100.00 W"
        for t in range(3)
        for g in range(2)
    ]
    text = f"timestamp, {column}, power.draw [W]\n" + "\n".join(rows) + "\n"
    with pytest.raises(BadInputError, match=message + r".*add index \(or uuid\) to the"):
        read_nvidia_smi_csv(write(tmp_path, text), node="n", run_id="r")


# ---------------------------------------------------------------------------------------------
# dcgm-exporter text

H100 = 'modelName="NVIDIA H100 80GB HBM3"'
AT = datetime(2024, 5, 1, 12, 0, 0)


def dcgm_line(
    metric: str, value: str, labels: str = f'gpu="0",UUID="GPU-a",{H100},Hostname="n1"'
) -> str:
    return f"{metric}{{{labels}}} {value}"


def test_parse_dcgm_scrape() -> None:
    text = "\n".join(
        [
            "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
            "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
            dcgm_line("DCGM_FI_DEV_POWER_USAGE", "71.200000"),
            # lower-case hostname label, escaped quote in a label value, no UUID: the gpu
            # label names the device
            'DCGM_FI_DEV_POWER_USAGE{gpu="1",device="nvidia1",modelName="GPU \\"X\\"",'
            'hostname="n1"} 80',
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
            dcgm_line("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "123456789"),
            dcgm_line("DCGM_FI_DEV_GPU_UTIL", "97"),
            dcgm_line("DCGM_FI_DEV_FB_USED", "71232"),
            dcgm_line("DCGM_FI_DEV_GPU_TEMP", "41"),
            dcgm_line("DCGM_FI_DEV_MEM_COPY_UTIL", "12"),
            dcgm_line("DCGM_FI_DEV_SM_CLOCK", "1980"),  # not read
            "up 1",  # another family: ignored
        ]
    )
    df = parse_dcgm_text(text, timestamp=AT)
    assert df.schema == schema("samples")
    a = df.filter(pl.col("device") == "GPU-a").row(0, named=True)
    assert a["node"] == "n1" and a["model"] == "NVIDIA H100 80GB HBM3"
    assert a["timestamp"] == utc(2024, 5, 1, 12)
    assert a["power_w"] == 71.2
    assert a["energy_j"] == pytest.approx(123456.789)  # mJ -> J
    assert (a["gpu_util_pct"], a["mem_used_mib"], a["temp_c"], a["mem_util_pct"]) == (
        97.0,
        71232.0,
        41.0,
        12.0,
    )
    b = df.filter(pl.col("device") == "1").row(0, named=True)
    assert (b["node"], b["model"], b["power_w"], b["energy_j"]) == ("n1", 'GPU "X"', 80.0, None)
    assert set(df["source"]) == {"dcgm"} and df["run_id"].null_count() == 2


def test_dcgm_line_timestamp_and_node_override() -> None:
    text = dcgm_line("DCGM_FI_DEV_POWER_USAGE", "50", 'gpu="0",UUID="GPU-a"') + " 1714564800250"
    df = parse_dcgm_text(text, node="k8s-node-3")
    assert df["timestamp"].to_list() == [utc(2024, 5, 1, 12, 0, 0, 250000)]
    assert df["node"].to_list() == ["k8s-node-3"]


def test_dcgm_nan_is_null() -> None:
    df = parse_dcgm_text(dcgm_line("DCGM_FI_DEV_POWER_USAGE", "NaN"), timestamp=AT)
    assert df["power_w"].to_list() == [None]


BAD_DCGM = {
    "malformed line": (
        "# HELP x\n" + 'DCGM_FI_DEV_POWER_USAGE{gpu="0"',
        r"scrape\.txt, line 2: expected 'METRIC\{label=\"value\",\.\.\.\} VALUE \[TIMESTAMP_MS\]'",
    ),
    "unknown value": (
        dcgm_line("DCGM_FI_DEV_POWER_USAGE", "abc"),
        r'line 1 DCGM_FI_DEV_POWER_USAGE\{gpu="0",UUID="GPU-a",Hostname="n1"\}: expected a '
        r"number such as 71\.2 \(or NaN\); found 'abc'",
    ),
    "negative power": (
        "\n" + dcgm_line("DCGM_FI_DEV_POWER_USAGE", "-1.5"),
        r'line 2 DCGM_FI_DEV_POWER_USAGE\{gpu="0",UUID="GPU-a",Hostname="n1"\}: expected a value '
        r">= 0; found -1\.5",
    ),
    "infinite energy": (
        dcgm_line("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "+Inf"),
        r"line 1 DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION.*expected a finite number; found '\+Inf'",
    ),
    "bad label set": (
        'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID=GPU-a} 5',
        r"line 1: expected labels like name=\"value\" separated by commas; found 'UUID=GPU-a'",
    ),
    "no device label": (
        dcgm_line("DCGM_FI_DEV_POWER_USAGE", "5", 'Hostname="n1"'),
        r"line 1 .*expected a UUID or gpu label naming the device",
    ),
    "no host": (
        dcgm_line("DCGM_FI_DEV_POWER_USAGE", "5", 'gpu="0"'),
        r"line 1 .*expected a Hostname or hostname label naming the node; .*--node",
    ),
    "bad line timestamp": (
        dcgm_line("DCGM_FI_DEV_POWER_USAGE", "5") + " yesterday",
        r"expected a timestamp in ms since 1970 after the value; found 'yesterday'",
    ),
    "two values": (
        dcgm_line("DCGM_FI_DEV_POWER_USAGE", "5")
        + "\n"
        + dcgm_line("DCGM_FI_DEV_POWER_USAGE", "6"),
        r"line 2 .*appears twice for this device and time, with 5\.0 and 6\.0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DCGM))
def test_dcgm_bad_input(case: str) -> None:
    text, message = BAD_DCGM[case]
    with pytest.raises(BadInputError, match=message):
        parse_dcgm_text(text, timestamp=AT, file="scrape.txt")


def test_dcgm_needs_a_time() -> None:
    with pytest.raises(BadInputError, match=r"line 1 .*no timestamp and none was given"):
        parse_dcgm_text(dcgm_line("DCGM_FI_DEV_POWER_USAGE", "5"))


def test_format_dcgm_text_exact() -> None:
    rows = pl.DataFrame(
        {
            "node": ["node-1"],
            "device": ["GPU-abc"],
            "model": ["NVIDIA H100 80GB HBM3"],
            "power_w": [71.2],
            "energy_j": [123456.789],
        }
    )
    assert format_dcgm_text(rows) == (
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).\n"
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
        'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-abc",device="nvidia0",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 71.200000\n'
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).\n"
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
        'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-abc",device="nvidia0",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"} 123456789\n'
    )


def test_dcgm_round_trip_one_scrape() -> None:
    df = read_dcgm_file(DATA / "dcgm-scrapes.txt", run_id="r")
    first = df.filter(pl.col("timestamp") == pl.col("timestamp").min()).drop("run_id")
    text = format_dcgm_text(first, driver_version="550.54.15")
    back = parse_dcgm_text(text, timestamp=utc(2024, 5, 1, 12))
    assert back.drop("run_id").equals(first)
    assert 'DCGM_FI_DRIVER_VERSION="550.54.15"' in text


def test_dcgm_round_trip_series(tmp_path: Path) -> None:
    df = read_dcgm_file(DATA / "dcgm-scrapes.txt", run_id="r")
    assert df.height == 6 and df["device"].n_unique() == 2
    path = tmp_path / "again.txt"
    path.write_text(format_dcgm_file(df))
    assert read_dcgm_file(path, run_id="r").equals(df)
    # and with per-line timestamps instead of scrape markers
    stamped = format_dcgm_text(df, with_timestamps=True, hostname_label="hostname")
    assert parse_dcgm_text(stamped).drop("run_id").equals(df.drop("run_id"))


def test_dcgm_file_values_and_energy() -> None:
    from estimators.energy import run_energy

    df = read_dcgm_file(DATA / "dcgm-scrapes.txt", run_id="r")
    a = df.filter(pl.col("device") == "GPU-aaaaaaaa-0000-4000-8000-000000000000")
    assert a["timestamp"].to_list() == [utc(2024, 5, 1, 12, 0, s) for s in (0, 1, 2)]
    assert a["energy_j"].to_list() == [1000.0, 1100.0, 1250.0]
    assert a["power_w"].to_list() == [71.2, 128.8, 171.2]
    assert set(df["node"]) == {"gpu-node-1"}
    # counter deltas: GPU a 100 + 150 J, GPU b 200 + 200 J
    assert run_energy(df)["energy_j"].item() == pytest.approx(650.0)


def test_dcgm_file_single_scrape_needs_timestamp(tmp_path: Path) -> None:
    path = write(tmp_path, dcgm_line("DCGM_FI_DEV_POWER_USAGE", "5") + "\n", "one.txt")
    df = read_dcgm_file(path, timestamp=AT)
    assert df["timestamp"].to_list() == [utc(2024, 5, 1, 12)]
    with pytest.raises(BadInputError, match=r"one\.txt, line 1 .*no timestamp and none was given"):
        read_dcgm_file(path)


def test_dcgm_file_bad_input(tmp_path: Path) -> None:
    line = dcgm_line("DCGM_FI_DEV_POWER_USAGE", "5")
    with pytest.raises(BadInputError, match=r"empty file"):
        read_dcgm_file(write(tmp_path, "", "e.txt"))
    with pytest.raises(BadInputError, match=r"line 1: expected an ISO 8601 time .*found 'noon'"):
        read_dcgm_file(write(tmp_path, f"# scrape noon\n{line}\n", "b.txt"))
    unsorted = f"# scrape 2024-05-01T12:00:01Z\n{line}\n# scrape 2024-05-01T12:00:00Z\n{line}\n"
    with pytest.raises(BadInputError, match=r"u\.txt, line 3, 'timestamp': unsorted timestamps"):
        read_dcgm_file(write(tmp_path, unsorted, "u.txt"))
    dup = f"# scrape 2024-05-01T12:00:00Z\n{line}\n# scrape 2024-05-01T12:00:00Z\n{line}\n"
    with pytest.raises(BadInputError, match=r"line 3, 'timestamp': duplicated timestamps"):
        read_dcgm_file(write(tmp_path, dup, "d.txt"))
    with pytest.raises(BadInputError, match=r"no DCGM_FI_DEV_\* metric that wattwise reads"):
        read_dcgm_file(write(tmp_path, "# scrape 2024-05-01T12:00:00Z\nup 1\n", "n.txt"))
    with pytest.raises(BadInputError, match=r"x\.txt, line 4 DCGM_FI_DEV_POWER_USAGE.*found 'abc'"):
        text = f"# scrape 2024-05-01T12:00:00Z\n{line}\n# scrape 2024-05-01T12:00:01Z\n"
        read_dcgm_file(write(tmp_path, text + line.replace(" 5", " abc"), "x.txt"))


# ---------------------------------------------------------------------------------------------
# SEAA 2023 layout (hand-made three-run folder)


def make_dataset(folder: Path, *, traces: pl.DataFrame | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    runs = pl.DataFrame(
        {
            "run_id": ["cloud-vgg16-00", "local-v2-vgg16-00", "local-v1-vgg16-00"],
            "environment": ["Cloud", "Local ML Engineer/Gamer", "Local Normal User"],
            "gpu_model": [
                "NVIDIA GeForce RTX 3090",
                "NVIDIA GeForce RTX 3070",
                "NVIDIA GeForce GTX 750 Ti",
            ],
            "architecture": ["vgg16"] * 3,
            "run": [0, 0, 0],
            "batch_size": [32] * 3,
            "gflops_forward": [15.5] * 3,
            "training_size": [23807] * 3,
            "validation_size": [10203] * 3,
            "trained_epochs": [40, 38, 12],
            "duration_s": [2.5, 1.0, 3600.0],
            "gpu_energy_j": [405.0, 150.0, 99000.0],
            "avg_power_w": [200.0, 150.0, 27.5],
            "power_limit_w": [350.0, 220.0, 38.5],
            "f1_score": [0.98, 0.97, 0.96],
            "accuracy": [0.981, 0.971, 0.961],
            "has_trace": [True, True, False],
        }
    )
    if traces is None:
        traces = pl.DataFrame(
            {
                "run_id": ["cloud-vgg16-00"] * 3 + ["local-v2-vgg16-00"] * 2,
                "timestamp": [
                    datetime(2023, 3, 9, 13, 0, 0),
                    datetime(2023, 3, 9, 13, 0, 1),
                    datetime(2023, 3, 9, 13, 0, 2),
                    datetime(2023, 3, 10, 9, 0, 0),
                    datetime(2023, 3, 10, 9, 0, 1),
                ],
                "power_w": [100.0, 200.0, 300.0, 100.0, None],
                "gpu_util_pct": [1.0, 2.0, 3.0, 4.0, 5.0],
                "mem_util_pct": [1.0, 2.0, 3.0, 4.0, 5.0],
                "mem_used_mib": [10.0, 10.0, 10.0, 20.0, 20.0],
                "temp_c": [50.0, 51.0, 52.0, 40.0, None],
            }
        )
        # the second run: 100 W at 0 s, no power at 1 s, 200 W at 3 s
        traces = pl.concat(
            [
                traces,
                pl.DataFrame(
                    {
                        "run_id": ["local-v2-vgg16-00"],
                        "timestamp": [datetime(2023, 3, 10, 9, 0, 3)],
                        "power_w": [200.0],
                        "gpu_util_pct": [6.0],
                        "mem_util_pct": [6.0],
                        "mem_used_mib": [20.0],
                        "temp_c": [41.0],
                    }
                ),
            ]
        )
    runs.write_parquet(folder / "runs.parquet")
    traces.write_parquet(folder / "traces.parquet")
    return folder


def test_slug() -> None:
    assert slug("Local ML Engineer/Gamer") == "local-ml-engineer-gamer"
    assert slug("Cloud") == "cloud"
    assert slug("Local Normal User") == "local-normal-user"


def test_seaa2023_mapping_and_idempotence(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds")
    store = Store(tmp_path / "store")
    summary = import_seaa2023(store, folder, progress=False)
    assert (summary.samples_new, summary.samples_total, summary.runs_changed) == (6, 6, 3)

    runs = store.runs()
    cloud = store.run("cloud-vgg16-00")
    assert cloud["node_type"] == "cloud" and cloud["job_name"] == "cloud-vgg16-00"
    assert cloud["energy_j"] == pytest.approx(150.0 + 250.0)  # trapezoids of 100, 200, 300 W
    assert cloud["energy_source"] == "measured"
    assert cloud["start"] == utc(2023, 3, 9, 13) and cloud["end"] == utc(2023, 3, 9, 13, 0, 2)
    assert cloud["duration_s"] == 2.5  # as reported
    assert (cloud["gpu_count"], cloud["planned_epochs"], cloud["status"]) == (1, None, "finished")
    assert (cloud["batch_size"], cloud["trained_epochs"], cloud["gflops_forward"]) == (32, 40, 15.5)
    # Not in the dataset: every run trained on 128 x 128 images (the authors' code).
    assert (cloud["image_height"], cloud["image_width"]) == (128, 128)
    config = json.loads(str(cloud["config"]))
    assert config == {
        "environment": "Cloud",
        "run": 0,
        "gpu_energy_j": 405.0,
        "avg_power_w": 200.0,
        "power_limit_w": 350.0,
        "f1_score": 0.98,
        "accuracy": 0.981,
        "has_trace": True,
    }
    gamer = store.run("local-v2-vgg16-00")
    assert gamer["node_type"] == "local-ml-engineer-gamer"
    # the null-power sample is skipped: 100 W at 0 s to 200 W at 3 s, trapezoid 450 J
    assert gamer["energy_j"] == pytest.approx(450.0)
    untraced = store.run("local-v1-vgg16-00")
    assert (untraced["energy_j"], untraced["energy_source"], untraced["start"]) == (
        99000.0,
        "reported",
        None,
    )
    assert runs.height == 3

    samples = store.samples("cloud-vgg16-00")
    assert samples["node"].to_list() == ["cloud"] * 3
    assert samples["model"].to_list() == ["NVIDIA GeForce RTX 3090"] * 3
    assert samples["timestamp"][0] == utc(2023, 3, 9, 13)  # naive -> read as UTC
    assert set(samples["source"]) == {"nvidia-smi"} and set(samples["device"]) == {"0"}

    rel = {r.run_id: r.relative_error for r in summary.runs}
    assert rel["cloud-vgg16-00"] == pytest.approx(400.0 / 405.0 - 1)
    assert rel["local-v1-vgg16-00"] is None

    before = snapshot(store.root)
    again = import_seaa2023(store, folder, progress=False)
    assert (again.samples_new, again.runs_changed) == (0, 0)
    assert snapshot(store.root) == before


def _bad_traces(kind: str) -> pl.DataFrame:
    ts = [datetime(2023, 3, 9, 13, 0, s) for s in (0, 1, 2)]
    df = pl.DataFrame(
        {"run_id": ["cloud-vgg16-00"] * 3, "timestamp": ts, "power_w": [1.0, 2.0, 3.0]}
    )
    if kind == "negative power":
        return df.with_columns(pl.Series("power_w", [1.0, -2.0, 3.0]))
    if kind == "unsorted":
        return df.with_columns(pl.Series("timestamp", [ts[0], ts[2], ts[1]]))
    if kind == "duplicated":
        return df.with_columns(pl.Series("timestamp", [ts[0], ts[1], ts[1]]))
    if kind == "orphan":
        return df.with_columns(pl.Series("run_id", ["cloud-vgg16-00", "nobody-00", "nobody-00"]))
    if kind == "no power column":
        return df.drop("power_w")
    if kind == "text power":
        return df.with_columns(pl.col("power_w").cast(pl.String))
    raise AssertionError(kind)


BAD_SEAA = {
    "negative power": r"traces\.parquet, row 2, 'power_w': expected a power >= 0 W; found -2\.0",
    "unsorted": r"traces\.parquet, row 3, 'timestamp': unsorted timestamps: .* \(row 2\) for "
    r"run_id 'cloud-vgg16-00'",
    "duplicated": r"traces\.parquet, row 3, 'timestamp': duplicated timestamps",
    "orphan": r"traces\.parquet, row 2, 'run_id': run 'nobody-00' has samples but no row in "
    r"runs\.parquet",
    "no power column": r"traces\.parquet: expected column\(s\) \['power_w'\] in traces",
    "text power": r"traces\.parquet, 'power_w': expected numbers; found String",
}


@pytest.mark.parametrize("kind", list(BAD_SEAA))
def test_seaa2023_bad_input_leaves_store_unchanged(tmp_path: Path, kind: str) -> None:
    store = Store(tmp_path / "store")
    import_seaa2023(store, make_dataset(tmp_path / "good"), progress=False)
    before = snapshot(store.root)
    folder = make_dataset(tmp_path / "bad", traces=_bad_traces(kind))
    with pytest.raises(BadInputError, match=BAD_SEAA[kind]):
        import_seaa2023(store, folder, progress=False)
    assert snapshot(store.root) == before


def test_seaa2023_missing_files(tmp_path: Path) -> None:
    with pytest.raises(
        BadInputError, match=r"runs\.parquet: expected the dataset's runs file; no such"
    ):
        import_seaa2023(Store(tmp_path / "s"), tmp_path, progress=False)
    folder = make_dataset(tmp_path / "ds")
    pl.read_parquet(folder / "runs.parquet").drop("gpu_energy_j").write_parquet(
        folder / "runs.parquet"
    )
    with pytest.raises(BadInputError, match=r"expected column\(s\) \['gpu_energy_j'\] in runs"):
        import_seaa2023(Store(tmp_path / "s"), folder, progress=False)


def test_seaa2023_conflict_with_stored_sample_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    folder = make_dataset(tmp_path / "ds")
    import_seaa2023(store, folder, progress=False)
    before = snapshot(store.root)
    traces = pl.read_parquet(folder / "traces.parquet")
    changed = traces.with_columns(
        pl.when(pl.col("run_id") == "local-v2-vgg16-00")
        .then(pl.col("power_w") + 1)
        .otherwise(pl.col("power_w"))
        .alias("power_w")
    )
    changed.write_parquet(folder / "traces.parquet")
    with pytest.raises(BadInputError, match=r"run 'local-v2-vgg16-00'.*already in the store"):
        import_seaa2023(store, folder, progress=False)
    assert snapshot(store.root) == before


def mig_line(metric: str, value: str, instance: str, profile: str = "3g.40gb") -> str:
    labels = (
        f'gpu="0",UUID="GPU-a",device="nvidia0",{H100},GPU_I_PROFILE="{profile}",'
        f'GPU_I_ID="{instance}",Hostname="n1"'
    )
    return dcgm_line(metric, value, labels)


def test_dcgm_mig_instances_make_one_sample_of_their_gpu() -> None:
    """Regression: a GPU in MIG mode, whose instances' lines carry different frame-buffer
    use, was refused as 'the metric appears twice', so the whole scrape was lost."""
    text = "\n".join(
        [
            mig_line("DCGM_FI_DEV_POWER_USAGE", "212.5", "1"),
            mig_line("DCGM_FI_DEV_POWER_USAGE", "212.5", "2"),
            mig_line("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "5000000", "1"),
            mig_line("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "5000000", "2"),
            mig_line("DCGM_FI_DEV_FB_USED", "30000", "1"),
            mig_line("DCGM_FI_DEV_FB_USED", "1200", "2"),
            mig_line("DCGM_FI_DEV_GPU_TEMP", "50", "1"),
            mig_line("DCGM_FI_DEV_GPU_TEMP", "NaN", "2"),
            dcgm_line(
                "DCGM_FI_DEV_POWER_USAGE", "90", f'gpu="1",UUID="GPU-b",{H100},Hostname="n1"'
            ),
        ]
    )
    df = parse_dcgm_text(text, timestamp=AT)
    assert df["device"].to_list() == ["GPU-a", "GPU-b"]
    a = df.row(0, named=True)
    assert (a["power_w"], a["energy_j"], a["mem_used_mib"], a["temp_c"]) == (
        212.5,
        5000.0,
        31200.0,
        50.0,
    )
    assert df.row(1, named=True)["power_w"] == 90.0


def test_dcgm_whole_gpu_line_wins_over_its_mig_instances() -> None:
    text = "\n".join(
        [
            mig_line("DCGM_FI_DEV_FB_USED", "30000", "1"),
            dcgm_line("DCGM_FI_DEV_FB_USED", "40000"),
            mig_line("DCGM_FI_DEV_FB_USED", "1200", "2"),
        ]
    )
    assert parse_dcgm_text(text, timestamp=AT)["mem_used_mib"].to_list() == [40000.0]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [mig_line("DCGM_FI_DEV_POWER_USAGE", "200", "1"),
             mig_line("DCGM_FI_DEV_POWER_USAGE", "210", "2")],
            r'line 2 DCGM_FI_DEV_POWER_USAGE\{gpu="0",UUID="GPU-a",GPU_I_ID="2",Hostname="n1"\}: '
            r"this reading of the whole GPU differs between its MIG instances \(200\.0 at "
            r'scrape\.txt, line 1 .*GPU_I_ID="1".*, 210\.0 here\); expected one value',
        ),
        (
            [mig_line("DCGM_FI_DEV_FB_USED", "100", "1"),
             mig_line("DCGM_FI_DEV_FB_USED", "101", "1")],
            r"line 2 .*appears twice for MIG instance 1 of this device and time, with 100\.0 and "
            r"101\.0",
        ),
    ],
)  # fmt: skip
def test_dcgm_mig_disagreements_are_refused_with_the_place(lines: list[str], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        parse_dcgm_text("\n".join(lines), timestamp=AT, file="scrape.txt")
