"""Fuzzing every parser with Hypothesis: no crash, no hang, only wattwise's documented errors.

Parsers under test: nvidia-smi CSV files, dcgm-exporter text, store parquet
files, HTTP API payloads and CLI arguments. A case passes when the parser
returns a result in the documented form, or raises ``BadInputError`` /
``SchemaError`` / ``StoreError`` with a message; any other exception, a hang
longer than ``CASE_TIMEOUT_S``, or (for the HTTP API) a status other than 200
and 400 fails the test.

Cases per parser: ``FUZZ_DEFAULT`` (300, so ``make test`` stays fast), or
10,000 with ``WATTWISE_FUZZ_FULL=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiler.errors import BadInputError, SchemaError, StoreError
from profiler.schema import schema

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
FUZZ_DEFAULT = 300
FUZZ_FULL = 10_000
#: Longest any single parser call may take before the case counts as a hang, in s.
CASE_TIMEOUT_S = 20.0

settings.register_profile(
    "wattwise-fuzz",
    max_examples=FUZZ_FULL if os.environ.get("WATTWISE_FUZZ_FULL") == "1" else FUZZ_DEFAULT,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    derandomize=False,
    print_blob=True,
)
FUZZ = settings.get_profile("wattwise-fuzz")
#: The documented errors; anything else escaping a parser is a bug.
CLEAR = (BadInputError, StoreError)


class Hang(Exception):  # noqa: N818 - it names what happened
    """A parser call ran longer than ``CASE_TIMEOUT_S``."""


@contextlib.contextmanager
def time_limit(seconds: float = CASE_TIMEOUT_S) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds``."""

    def _alarm(signum: int, frame: object) -> None:
        raise Hang(f"parser call ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def expect_clear(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call ``fn``; return its result, or ``None`` after a documented error with a message."""
    with time_limit():
        try:
            return fn(*args, **kwargs)
        except CLEAR as err:
            assert str(err).strip(), f"{type(err).__name__} without a message"
            return None


# ---------------------------------------------------------------------------- nvidia-smi CSV
NATIVE_HEADER = (
    "timestamp, name, index, uuid, pci.bus_id, utilization.gpu [%], utilization.memory [%], "
    "memory.total [MiB], memory.used [MiB], power.draw [W], power.max_limit [W], temperature.gpu"
)
RENAMED_HEADER = (
    "timestamp,gpu_name,gpu_usage,gpu_memory_usage,gpu_total_memory,gpu_memory_used,"
    "gpu_power_draw,gpu_max_power,gpu_temperature"
)
UNITS = {
    "utilization.gpu [%]": "%",
    "utilization.memory [%]": "%",
    "memory.total [MiB]": "MiB",
    "memory.used [MiB]": "MiB",
    "power.draw [W]": "W",
    "power.max_limit [W]": "W",
    "gpu_usage": "%",
    "gpu_memory_usage": "%",
    "gpu_total_memory": "MiB",
    "gpu_memory_used": "MiB",
    "gpu_power_draw": "W",
    "gpu_max_power": "W",
}
NOTES = ["[N/A]", "[Not Supported]", "N/A", "", "[Unknown Error]", "NA", "[GPU is lost]"]
ODD_CELLS = st.one_of(
    st.sampled_from(NOTES),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["47.60 W", "47.60W", "0 %", "1e3", "-5 W", ".5", "5.", "1 kW", "12 MiB"]),
)


def _timestamp(t: datetime, slash: bool, frac: int | None) -> str:
    s = t.strftime("%Y/%m/%d %H:%M:%S" if slash else "%Y-%m-%d %H:%M:%S")
    return s if frac is None else f"{s}.{frac:03d}"


@st.composite
def smi_valid(draw: st.DrawFn) -> tuple[str, list[list[str]], int]:
    """A valid nvidia-smi CSV: header line, rows (as cells), and the number of data rows."""
    native = draw(st.booleans())
    header = [h.strip() for h in (NATIVE_HEADER if native else RENAMED_HEADER).split(",")]
    n = draw(st.integers(1, 8))
    start = draw(st.datetimes(datetime(1971, 1, 1), datetime(2100, 1, 1)))
    slash = draw(st.booleans())
    rows = []
    for i in range(n):
        cells = []
        for h in header:
            if h == "timestamp":
                t = datetime.fromtimestamp(start.replace(microsecond=0).timestamp() + i)
                cells.append(_timestamp(t, slash, draw(st.none() | st.integers(0, 999))))
            elif h in ("name", "gpu_name"):
                cells.append("NVIDIA GeForce RTX 3090")
            elif h == "index":
                cells.append("0")
            elif h == "uuid":
                cells.append("GPU-5a1e0f3c-0000-4000-8000-000000000000")
            elif h == "pci.bus_id":
                cells.append("00000000:01:00.0")
            else:
                unit = UNITS.get(h)
                top = 100.0 if unit == "%" else 1e4  # utilisations lie in 0-100 %
                value = draw(st.floats(0, top, allow_nan=False).map(lambda v: f"{v:.2f}"))
                cells.append(
                    draw(
                        st.sampled_from(
                            [
                                value,
                                f"{value} {unit}" if unit else value,
                                "[N/A]",
                                "[Not Supported]",
                            ]
                        )
                    )
                )
        rows.append(cells)
    sep = ", " if native else ","
    return sep.join(header), [[c for c in r] for r in rows], n


def _render(header: str, rows: list[list[str]], native: bool) -> str:
    sep = ", " if native else ","
    return header + "\n" + "".join(sep.join(r) + "\n" for r in rows)


@st.composite
def smi_mutated(draw: st.DrawFn) -> bytes:
    """A valid nvidia-smi file with a few random mutations applied."""
    header, rows, _ = draw(smi_valid())
    native = ", " in header
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(
            st.sampled_from(
                ["cell", "timestamp", "drop-cell", "extra-cell", "dup-row", "swap", "header"]
            )
        )
        r = draw(st.integers(0, len(rows) - 1))
        if kind == "cell":
            rows[r][draw(st.integers(0, len(rows[r]) - 1))] = draw(ODD_CELLS)
        elif kind == "timestamp":
            t = draw(st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31)))
            rows[r][0] = draw(
                st.one_of(
                    st.just(
                        _timestamp(t, draw(st.booleans()), draw(st.none() | st.integers(0, 999)))
                    ),
                    st.text(max_size=25),
                    st.just("2023/02/30 12:00:00.000"),
                    st.just("2023-03-26 02:30:00"),
                )
            )
        elif kind == "drop-cell" and len(rows[r]) > 1:
            rows[r].pop(draw(st.integers(0, len(rows[r]) - 1)))
        elif kind == "extra-cell":
            rows[r].append(draw(ODD_CELLS))
        elif kind == "dup-row":
            rows.insert(r, list(rows[r]))
        elif kind == "swap" and len(rows) > 1:
            rows[0], rows[-1] = rows[-1], rows[0]
        elif kind == "header":
            cols = header.split(",")
            cols[draw(st.integers(0, len(cols) - 1))] = draw(st.text(max_size=15))
            header = ",".join(cols)
    data = _render(header, rows, native).encode("utf-8", "surrogatepass")
    cut = draw(st.none() | st.integers(0, len(data)))
    if cut is not None:
        data = data[:cut]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    if draw(st.integers(0, 9)) == 0:
        data = data.replace(b"\n", b"\r\n")
    return data


SMI_INPUTS = st.one_of(
    smi_mutated(),
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


def _check_samples(df: pl.DataFrame) -> None:
    assert df.schema == schema("samples")
    assert df["timestamp"].null_count() == 0
    assert (df["power_w"].drop_nulls() >= 0).all()


@FUZZ
@given(data=SMI_INPUTS, tz=st.sampled_from(["UTC", "Europe/Madrid", "Etc/GMT-1", "Nowhere/X"]))
def test_fuzz_nvidia_smi_csv(tmp_path: Path, data: bytes, tz: str) -> None:
    """Mutated and random nvidia-smi files give samples or a BadInputError naming the problem."""
    from profiler.importers.nvidia_smi import read_nvidia_smi_csv

    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    df = expect_clear(read_nvidia_smi_csv, path, node="n1", run_id="r1", tz=tz)
    if df is not None:
        _check_samples(df)


@settings(FUZZ, max_examples=max(FUZZ.max_examples // 3, 100))  # a property, not the fuzzing
@given(case=smi_valid())
def test_fuzz_valid_nvidia_smi_files_are_read_whole(
    tmp_path: Path, case: tuple[str, list[list[str]], int]
) -> None:
    """Every valid generated file is read with one sample per data row (both layouts)."""
    from profiler.importers.nvidia_smi import read_nvidia_smi_csv

    header, rows, n = case
    path = tmp_path / "ok.csv"
    path.write_text(_render(header, rows, ", " in header))
    with time_limit():
        df = read_nvidia_smi_csv(path, node="n1", run_id="r1")
    assert df.height == n
    _check_samples(df)


# ---------------------------------------------------------------------------- dcgm-exporter
DCGM_METRICS = [
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_SM_CLOCK",
    "OTHER_METRIC",
]
LABEL_NAMES = ["gpu", "UUID", "Hostname", "hostname", "modelName", "device", "x", "0bad"]
LABEL_VALUES = st.one_of(
    st.sampled_from(["0", "1", "GPU-aaaa", "node-1", "", 'a"b', "a\\nb", "\\"]),
    st.text(max_size=10),
)
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**25), 10**25).map(str),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e400", "71.2", "0x10", "", "abc"]),
)


@st.composite
def dcgm_line(draw: st.DrawFn) -> str:
    """One exposition line, mostly well-formed, sometimes not."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=60))
    if kind == 1:
        return (
            "# "
            + draw(st.sampled_from(["HELP", "TYPE", "scrape", "x"]))
            + " "
            + draw(st.text(max_size=30))
        )
    labels = draw(st.lists(st.tuples(st.sampled_from(LABEL_NAMES), LABEL_VALUES), max_size=5))
    text = ",".join(f'{k}="{v}"' for k, v in labels)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    line = draw(st.sampled_from(DCGM_METRICS)) + (
        "{" + text + "}" if draw(st.integers(0, 5)) else ""
    )
    line += " " + draw(VALUES)
    if draw(st.booleans()):
        line += " " + draw(st.one_of(st.integers(-(10**17), 10**17).map(str), st.text(max_size=6)))
    return line


DCGM_TEXTS = st.one_of(
    st.lists(dcgm_line(), max_size=12).map("\n".join),
    st.text(max_size=200),
)


@FUZZ
@given(
    text=DCGM_TEXTS,
    ts=st.none() | st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)),
    node=st.none() | st.sampled_from(["n1", ""]),
)
def test_fuzz_dcgm_text(text: str, ts: datetime | None, node: str | None) -> None:
    """Random exposition text gives dcgm samples or a BadInputError."""
    from profiler.importers.dcgm import parse_dcgm_text

    df = expect_clear(parse_dcgm_text, text, timestamp=ts, node=node, file="fuzz.txt")
    if df is not None:
        _check_samples(df)
        assert set(df["source"].to_list()) <= {"dcgm"}


@FUZZ
@given(
    body=st.one_of(
        st.lists(
            st.one_of(
                dcgm_line(),
                st.tuples(
                    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31)),
                    st.sampled_from(["Z", "+00:00", "+14:00", "-12:00", ""]),
                ).map(lambda t: f"# scrape {t[0].isoformat()}{t[1]}"),
                st.text(max_size=30).map(lambda s: "# scrape " + s),
            ),
            max_size=12,
        )
        .map("\n".join)
        .map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.binary(max_size=100),
    ),
)
def test_fuzz_dcgm_file(tmp_path: Path, body: bytes) -> None:
    """Random scrape files ('# scrape' markers, random bytes) give samples or BadInputError."""
    from profiler.importers.dcgm import read_dcgm_file

    path = tmp_path / "scrapes.txt"
    path.write_bytes(body)
    df = expect_clear(read_dcgm_file, path, run_id="r1")
    if df is not None:
        _check_samples(df)
        assert set(df["run_id"].to_list()) == {"r1"}


# ---------------------------------------------------------------------------- schema.conform
CELLS = (
    st.none(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=6),
    st.booleans(),
    st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)),
    st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=st.just(UTC)),
)


@st.composite
def frames(draw: st.DrawFn, table: str) -> pl.DataFrame:
    """A frame with some of a table's columns (and sometimes a stranger), one type per column."""
    names = [c for c in schema(table)] + ["bogus"]
    cols = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    n = draw(st.integers(0, 4))
    data = {}
    for c in cols:
        cell = draw(st.sampled_from(CELLS))  # one value type per column, as in a real frame
        data[c] = draw(st.lists(cell, min_size=n, max_size=n))
    try:
        return pl.DataFrame(data, strict=False)
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        return pl.DataFrame({c: [None] * n for c in cols})


@FUZZ
@given(data=st.data(), table=st.sampled_from(["samples", "epochs", "runs"]))
def test_fuzz_schema_conform(data: st.DataObject, table: str) -> None:
    """Random frames are conformed to the table's schema or refused with a SchemaError."""
    from profiler.schema import conform

    df = data.draw(frames(table))
    out = expect_clear(conform, df, table, file="fuzz")
    if out is not None:
        assert out.schema == schema(table)
        assert out.height == df.height


# ---------------------------------------------------------------------------- store files
def _good_samples() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": "r1",
            "node": "n1",
            "device": "0",
            "timestamp": [datetime(2024, 1, 1, 0, 0, s, tzinfo=UTC) for s in range(3)],
            "power_w": [100.0, 110.0, 120.0],
            "source": "replay",
        }
    )


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


GOOD_PARQUET = _parquet_bytes(pl.DataFrame({"x": [1, 2, 3]}))
SAMPLES_PARQUET = _parquet_bytes(_good_samples())


@st.composite
def bad_parquet(draw: st.DrawFn) -> bytes:
    """Corrupted or foreign bytes where the store expects one of its parquet files."""
    base = draw(st.sampled_from([SAMPLES_PARQUET, GOOD_PARQUET]))
    kind = draw(st.sampled_from(["random", "truncate", "flip", "foreign", "wrong-types"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "foreign":
        return GOOD_PARQUET
    cols = {
        "run_id": draw(st.sampled_from([pl.Int64, pl.String])),
        "timestamp": draw(st.sampled_from([pl.String, pl.Datetime("us"), pl.Int64])),
        "power_w": draw(st.sampled_from([pl.String, pl.Float64, pl.Int32])),
    }
    return _parquet_bytes(pl.DataFrame({k: [None] for k in cols}, schema=cols))


@FUZZ
@given(data=bad_parquet(), where=st.sampled_from(["part", "runs", "epochs"]))
def test_fuzz_corrupt_store_files_raise_store_error(
    tmp_path: Path, data: bytes, where: str
) -> None:
    """A corrupt or foreign file in the store is a StoreError naming it, never a raw polars error.

    Regression: the store let polars' ComputeError / pyarrow errors (and, for a
    foreign parquet file, a ColumnNotFoundError later on) escape from reads.
    """
    from profiler.store import Store

    root = tmp_path / "store"
    store = Store(root)
    if where == "part":
        target = root / "samples" / "r1" / "part-000000000000.parquet"
    else:
        target = root / f"{where}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)

    def all_reads() -> None:
        # Reads and the reads inside writes: each must succeed or say what is wrong.
        for read in (
            lambda: store.samples(),
            lambda: store.samples("r1"),
            lambda: store.runs(),
            lambda: store.epochs(),
            lambda: store.epochs("r1"),
            lambda: store.run("r1"),
            lambda: store.write_samples(_good_samples().with_columns(power_w=pl.lit(1.0))),
            lambda: store.write_epochs(
                pl.DataFrame(
                    {
                        "run_id": ["r1"],
                        "epoch": [0],
                        "start": [datetime(2024, 1, 1, tzinfo=UTC)],
                        "end": [datetime(2024, 1, 1, 0, 1, tzinfo=UTC)],
                    }
                )
            ),
            lambda: store.write_runs(pl.DataFrame({"run_id": ["r1"], "status": ["running"]})),
        ):
            with time_limit():
                try:
                    out = read()
                except CLEAR as err:
                    assert str(err).strip()
                    continue
            if isinstance(out, pl.DataFrame):
                assert out.columns[0] == "run_id"

    all_reads()


# ---------------------------------------------------------------------------- HTTP API
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(
        ["2024-01-01T00:00:00+00:00", "2024-01-01T00:00:00", "2024-13-01T00:00:00Z", "r1", "n1"]
    ),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SAMPLE_KEYS = [
    "run_id", "node", "device", "model", "timestamp", "power_w", "energy_j",
    "gpu_util_pct", "source", "bogus",
]  # fmt: skip
EPOCH_KEYS = ["run_id", "epoch", "start", "end", "bogus"]


def _row(keys: list[str]) -> st.SearchStrategy[dict[str, object]]:
    good = {
        "run_id": st.sampled_from(["r1", "r2", "../x", ""]),
        "node": st.sampled_from(["n1", "n2"]),
        "device": st.sampled_from(["0", "1"]),
        "timestamp": st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)).map(
            lambda t: t.isoformat() + "+00:00"
        ),
        "start": st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)).map(
            lambda t: t.isoformat() + "Z"
        ),
        "end": st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)).map(
            lambda t: t.isoformat() + "+01:00"
        ),
        "power_w": st.floats(-10, 1e4),
        "energy_j": st.floats(0, 1e9),
        "epoch": st.integers(-5, 2**64),
        "source": st.sampled_from(["replay", "nvml", "bogus"]),
    }
    return st.fixed_dictionaries(
        {},
        optional={k: st.one_of(good.get(k, JSON_SCALARS), JSON_SCALARS, JSON) for k in keys},
    )


def _bodies(table: str, keys: list[str]) -> st.SearchStrategy[bytes]:
    structured = st.lists(_row(keys), max_size=5).map(lambda rows: {table: rows})
    return st.one_of(
        structured.map(lambda b: json.dumps(b).encode()),
        JSON.map(lambda b: json.dumps(b).encode()),
        JSON.map(lambda b: json.dumps({table: b}).encode()),
        st.binary(max_size=60),
        st.sampled_from(
            [b"", b"[" * 100_000, b'{"samples": [' + b"[" * 5000 + b"]" * 5000 + b"]}"]
        ),
    )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A served aggregator on a store of its own; yields the base URL."""
    from cluster.aggregator import Aggregator
    from cluster.api import serve
    from profiler.store import Store

    server = serve(Aggregator(Store(tmp_path_factory.mktemp("api") / "store"), flush_rows=50))
    try:
        yield server.url
    finally:
        server.close()


def _post(url: str, body: bytes) -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        # The socket timeout is the hang guard: no answer within it fails the case.
        with urllib.request.urlopen(req, timeout=CASE_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@FUZZ
@given(
    route=st.sampled_from(["samples", "epochs"]),
    data=st.data(),
)
def test_fuzz_http_api_payloads(api: str, route: str, data: st.DataObject) -> None:
    """Random bodies to POST /samples and /epochs get 200 or a 400 with a JSON error, never 500.

    Regression: bodies that were not UTF-8, nested too deep, or whose rows mixed
    types in one column made the handler die without an answer (the client
    saw the connection drop).
    """
    keys = SAMPLE_KEYS if route == "samples" else EPOCH_KEYS
    body = data.draw(_bodies(route, keys))
    code, answer = _post(f"{api}/{route}", body)
    assert code in (200, 400), (code, answer)
    assert isinstance(answer, dict)
    if code == 400:
        assert isinstance(answer.get("error"), str) and answer["error"].strip()
    else:
        assert isinstance(answer.get("accepted"), int)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files the fuzzed command lines may name: valid, broken, missing, a directory."""
    root = tmp_path_factory.mktemp("cli")
    (root / "garbage.parquet").write_bytes(b"PAR1 not really")
    (root / "text.csv").write_text("timestamp, power.draw [W]\nnot a time, 5 W\n")
    _good_samples().write_parquet(root / "samples.parquet")
    pl.DataFrame(
        {
            "run_id": ["r1"],
            "epoch": [0],
            "start": [datetime(2024, 1, 1, tzinfo=UTC)],
            "end": [datetime(2024, 1, 1, 0, 0, 2, tzinfo=UTC)],
        }
    ).write_parquet(root / "epochs.parquet")
    return {
        "csv": str(DATA / "nvidia-smi-native.csv"),
        "csv2": str(DATA / "nvidia-smi-two-gpus.csv"),
        "dcgm": str(DATA / "dcgm-scrapes.txt"),
        "garbage": str(root / "garbage.parquet"),
        "text": str(root / "text.csv"),
        "samples": str(root / "samples.parquet"),
        "epochs": str(root / "epochs.parquet"),
        "missing": str(root / "missing.csv"),
        "dir": str(root),
        "out": str(root / "out.parquet"),
    }


CLI_COMMANDS = [
    ["energy"],
    ["import", "nvidia-smi"],
    ["import", "dcgm"],
    ["import"],
    ["runs"],
    ["estimate"],
]
CLI_OPTIONS = [
    "--run", "--samples", "--epochs", "--out", "--json", "--gap-threshold", "--node", "--tz",
    "--timestamp", "--detector", "--confidence", "--planned-epochs", "--store", "-v", "--help",
    "--bogus", "-",
]  # fmt: skip


@st.composite
def cli_argv(draw: st.DrawFn, files: dict[str, str], store: str) -> list[str]:
    argv = list(draw(st.sampled_from(CLI_COMMANDS)))
    values = st.one_of(
        st.sampled_from(list(files.values())),
        st.sampled_from(["r1", "nvidia-smi-native", "../etc", "", "-1", "0", "nan", "1e309"]),
        st.sampled_from(["UTC", "Mars/Olympus", "2024-05-01T12:00:00Z", "online", "0.5"]),
        st.text(max_size=10).filter(lambda s: "\x00" not in s),
    )
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(CLI_OPTIONS)))
        argv.append(draw(values))
    if draw(st.integers(0, 3)):
        argv += ["--store", store]
    return argv


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store holding one imported run (``r1``, from the native nvidia-smi file)."""
    from cluster.cli import main

    root = tmp_path_factory.mktemp("cli-store") / "store"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(
            ["import", "nvidia-smi", str(DATA / "nvidia-smi-native.csv"), "--run", "r1",
             "--store", str(root)]
        )  # fmt: skip
    assert code == 0
    return str(root)


@FUZZ
@given(data=st.data())
def test_fuzz_cli_arguments(cli_files: dict[str, str], cli_store: str, data: st.DataObject) -> None:
    """Random command lines exit 0 or 2 with a one-line error or usage, never a traceback."""
    from cluster.cli import main

    argv = data.draw(cli_argv(cli_files, cli_store))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit():
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
            code = exc.code if isinstance(exc.code, int) else 2
    assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
    if code == 2:
        msg = err.getvalue()
        assert "Traceback" not in msg
        assert msg.startswith(("usage:", "wattwise ")), msg[:300]


# ---------------------------------------------------------------------------- regressions
def test_dcgm_line_timestamp_outside_datetime_range_is_bad_input() -> None:
    """Regression: a dcgm line timestamp before year 1 or after 9999 raised a raw ValueError.

    Found by ``test_fuzz_dcgm_text`` (``DCGM_FI_DEV_POWER_USAGE 0.0 -62135596800001``).
    """
    from profiler.importers.dcgm import parse_dcgm_text

    for ms in ("-62135596800001", "253402300800000000"):
        line = f'DCGM_FI_DEV_POWER_USAGE{{gpu="0",Hostname="h1"}} 71.2 {ms}'
        with pytest.raises(BadInputError, match=rf"line 1 .*between years 1 and 9999; found {ms}"):
            parse_dcgm_text(line, file="s.txt")


def test_dcgm_scrape_time_shifted_out_of_range_is_bad_input(tmp_path: Path) -> None:
    """Regression: '# scrape 0001-01-01T00:00:00+01:00' raised a raw OverflowError (to UTC)."""
    from profiler.importers.dcgm import read_dcgm_file

    path = tmp_path / "s.txt"
    path.write_text(
        '# scrape 0001-01-01T00:00:00+01:00\nDCGM_FI_DEV_POWER_USAGE{gpu="0",Hostname="h"} 7\n'
    )
    with pytest.raises(BadInputError, match=r"line 1: expected an ISO 8601 time .*0001-01-01"):
        read_dcgm_file(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x80", "not UTF-8"),
        (b'{"samples": [' + b"[" * 100_000 + b"]}", "nests too deep"),
    ],
)
def test_api_answers_400_to_undecodable_bodies(api: str, body: bytes, message: str) -> None:
    """Regression: a non-UTF-8 or too deeply nested body killed the handler with no answer.

    ``json.loads`` raises UnicodeDecodeError / RecursionError there, not
    JSONDecodeError, and the handler only caught the latter.
    """
    code, answer = _post(f"{api}/samples", body)
    assert code == 400
    assert isinstance(answer, dict) and message in answer["error"]


@pytest.mark.parametrize(
    "rows",
    [
        [{"run_id": None, "source": [False, 0]}],
        [{"node": "n1", "power_w": [True, "x"]}],
    ],
)
def test_api_answers_400_to_rows_mixing_types(api: str, rows: list[dict[str, object]]) -> None:
    """Regression: rows mixing JSON types in one field made polars raise TypeError: no answer."""
    code, answer = _post(f"{api}/samples", json.dumps({"samples": rows}).encode())
    assert code == 400
    assert isinstance(answer, dict) and "one JSON type per field" in answer["error"]


def test_corrupt_store_files_are_store_errors_naming_the_file(tmp_path: Path) -> None:
    """Regression: a corrupt part file or a foreign runs.parquet leaked polars' ComputeError,
    SchemaError or ColumnNotFoundError out of the store's reads (and of writes that read first).
    """
    from profiler.store import Store

    store = Store(tmp_path / "store")
    assert store.write_samples(_good_samples()) == 3
    part = next((store.root / "samples" / "r1").glob("part-*.parquet"))
    part.write_bytes(SAMPLES_PARQUET[:-20])  # cut short
    for call in (lambda: store.samples(), lambda: store.write_samples(_good_samples())):
        with pytest.raises(StoreError, match=rf"{part.name}: expected a parquet file .*'samples'"):
            call()
    (store.root / "runs.parquet").write_bytes(GOOD_PARQUET)  # parquet, but not a runs table
    with pytest.raises(StoreError, match=r"runs.parquet: .*other columns .*Move it out"):
        store.runs()
    with pytest.raises(StoreError, match="runs.parquet"):
        store.write_runs(pl.DataFrame({"run_id": ["r1"], "status": ["running"]}))


def test_conform_refuses_integers_too_large_for_the_column() -> None:
    """Regression: an epoch of 2**64 (Int128 from JSON) raised polars' InvalidOperationError."""
    from profiler.schema import conform

    df = pl.DataFrame({"run_id": ["r1"], "epoch": [2**64]}, schema_overrides={"epoch": pl.Int128})
    t = pl.lit(datetime(2024, 1, 1, tzinfo=UTC))
    df = df.with_columns(start=t, end=t)
    with pytest.raises(SchemaError, match=r"f, 'epoch': expected Int64 .*Int128 that do not fit"):
        conform(df, "epochs", file="f")


def test_corrupt_data_page_does_not_abort_the_reader(tmp_path: Path) -> None:
    """Regression: a part file with a few bytes flipped in a data page made polars' parquet
    reader panic twice and abort the whole Python process (found by
    ``test_fuzz_corrupt_store_files_raise_store_error``); the store now decodes with pyarrow.

    The read runs in a child process so that an abort fails this test instead of killing pytest.
    """
    import subprocess
    import sys
    from random import Random

    rng = Random(269)  # the seed of the flips that aborted polars 2.1.0
    data = bytearray(SAMPLES_PARQUET)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    part = tmp_path / "store" / "samples" / "r1" / "part-000000000000.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(bytes(data))
    code = (
        "import sys\nfrom profiler.store import Store\nfrom profiler.errors import StoreError\n"
        "try:\n    Store(sys.argv[1]).samples()\nexcept StoreError as e:\n    print(e)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "part-000000000000.parquet: expected a parquet file" in res.stdout
