"""Times outside 1970..2262 UTC are refused at the gates (schema.conform, the HTTP API)."""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.aggregator import Aggregator
from cluster.api import ApiServer, serve
from cluster.cli import main
from profiler.errors import SchemaError
from profiler.schema import UTC_US, conform
from profiler.store import Store
from tests.conftest import at

#: A valid ISO 8601 time that is year 10000 once in UTC: beyond Python's datetime.
YEAR_10000 = "9999-12-31T23:59:59-05:00"
#: The first time allowed and the first refused (hand-written, not imported: the test says
#: what the range is).
FIRST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
END = dt.datetime(2262, 4, 11, tzinfo=dt.UTC)
RANGE = r"expected a time from 1970-01-01T00:00:00Z up to \(not including\) 2262-04-11T00:00:00Z"


def _post(url: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _sample(ts: str, run_id: str = "r1") -> dict[str, Any]:
    return {
        "run_id": run_id,
        "node": "n1",
        "device": "0",
        "timestamp": ts,
        "power_w": 100.0,
        "source": "nvml",
    }


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = serve(Aggregator(Store(tmp_path / "store")))
    try:
        yield server
    finally:
        server.close()


def _times(*texts: str | None) -> pl.Series:
    """Times parsed by polars (Python's datetime cannot hold year 10000)."""
    return pl.Series(texts, dtype=pl.String).str.to_datetime(time_unit="us", time_zone="UTC")


# ------------------------------------------------------------------------------ HTTP API
def test_api_refuses_a_sample_in_year_10000_utc_with_400(api: ApiServer) -> None:
    """Regression: POST /samples answered 500 (OverflowError) for a time past 9999-12-31 UTC."""
    rows = [_sample("2024-01-01T00:00:00Z", "r2"), _sample(YEAR_10000, "r2")]
    code, got = _post(api.url + "/samples", {"samples": rows})
    assert code == 400
    assert got["error"] == (
        "samples, row 2, 'timestamp': expected a time from 1970-01-01T00:00:00Z up to (not "
        f"including) 2262-04-11T00:00:00Z (UTC); found '{YEAR_10000}' "
        "(+10000-01-01T04:59:59+00:00 in UTC)"
    )
    api.server.agg.flush()
    assert api.server.agg.store.samples("r2").height == 0  # type: ignore[union-attr]


def test_api_refuses_an_epoch_end_in_year_10000_and_the_run_still_ends(
    api: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: POST /epochs took such an end (200); finish_run then raised ValueError
    forever and ``wattwise energy --run`` exited 1 with a traceback."""
    agg = api.server.agg
    store = agg.store
    assert store is not None
    samples = [_sample(f"2024-01-01T00:00:{i:02d}Z") for i in range(11)]
    assert _post(api.url + "/samples", {"samples": samples}) == (200, {"accepted": 11})
    mark = {"run_id": "r1", "epoch": 0, "start": "2024-01-01T00:00:00Z", "end": YEAR_10000}
    code, got = _post(api.url + "/epochs", {"epochs": [mark]})
    assert code == 400
    assert got["error"].startswith("epochs, row 1, 'end': expected a time from 1970-01-01")
    assert f"found '{YEAR_10000}'" in got["error"]
    agg.flush()
    assert store.epochs("r1").height == 0
    good = dict(mark, end="2024-01-01T00:00:10Z")
    assert _post(api.url + "/epochs", {"epochs": [good]}) == (200, {"accepted": 1})
    assert agg.finish_run("r1")["status"] == "finished"
    assert main(["energy", "--run", "r1", "--json", "--store", str(store.root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][0]["energy_j"] == pytest.approx(10 * 100.0)  # 10 s at 100 W


def test_api_refuses_a_time_before_1970(api: ApiServer) -> None:
    code, got = _post(api.url + "/samples", {"samples": [_sample("1969-12-31T23:59:59Z")]})
    assert code == 400
    assert got["error"] == (
        "samples, row 1, 'timestamp': expected a time from 1970-01-01T00:00:00Z up to (not "
        "including) 2262-04-11T00:00:00Z (UTC); found '1969-12-31T23:59:59Z' "
        "(1969-12-31T23:59:59+00:00 in UTC)"
    )


def test_api_reads_lower_case_t_and_z_as_upper_case(api: ApiServer) -> None:
    """Regression: '2024-01-01t00:00:01z' passed the API's time check, then polars refused it
    with a 400 that named no row nor field."""
    rows = [_sample("2024-01-01T00:00:00Z"), _sample("2024-01-01t00:00:01z")]
    rows.append(_sample("2024-01-01t01:00:02+01:00"))
    assert _post(api.url + "/samples", {"samples": rows}) == (200, {"accepted": 3})
    api.server.agg.flush()
    stored = api.server.agg.store.samples("r1")["timestamp"].to_list()  # type: ignore[union-attr]
    assert stored == [at(0), at(1), at(2)]


def test_api_refuses_a_date_that_does_not_exist_naming_row_and_field(api: ApiServer) -> None:
    rows = [_sample("2024-02-28T00:00:00Z"), _sample("2024-02-30T00:00:00Z")]
    code, got = _post(api.url + "/samples", {"samples": rows})
    assert code == 400
    assert got["error"].startswith("samples, row 2, 'timestamp': expected an ISO 8601 time")
    assert got["error"].endswith("a date and time that exist; found '2024-02-30T00:00:00Z'")


# ------------------------------------------------------------------------------ conform
def test_conform_refuses_a_sample_in_year_10000_naming_file_row_and_value() -> None:
    df = pl.DataFrame(
        {
            "node": ["n1", "n1"],
            "device": ["0", "0"],
            "timestamp": _times("2024-01-01T00:00:00Z", YEAR_10000),
            "power_w": [100.0, 100.0],
            "source": ["nvml", "nvml"],
        }
    )
    with pytest.raises(
        SchemaError,
        match=rf"^s\.parquet, row 2, 'timestamp': {RANGE} \(UTC\); found "
        r"\+10000-01-01T04:59:59\+00:00$",
    ):
        conform(df, "samples", file="s.parquet")


def test_conform_refuses_an_epoch_start_before_1970_in_utc() -> None:
    df = pl.DataFrame(
        {
            "run_id": ["r1"],
            "epoch": [0],
            # 1969 on the clock, but 1970-01-01T00:00:00Z, the first time allowed.
            "start": _times("1969-12-31T23:00:00-01:00"),
            "end": _times("2024-01-01T00:00:00Z"),
        }
    )
    assert conform(df, "epochs")["start"].to_list() == [FIRST]
    df = df.with_columns(start=_times("1969-12-31T23:59:59.999999Z"))
    with pytest.raises(
        SchemaError, match=rf"^row 1, 'start': {RANGE} \(UTC\); found 1969-12-31T23:59:59\.999999"
    ):
        conform(df, "epochs")


def test_conform_checks_the_runs_times_but_leaves_a_null_end() -> None:
    df = pl.DataFrame(
        {
            "run_id": ["r1", "r2"],
            "status": ["running", "finished"],
            "start": _times("2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"),
            "end": _times(None, "2262-04-11T00:00:00Z"),
        }
    )
    with pytest.raises(SchemaError, match=rf"^runs\.parquet, row 2, 'end': {RANGE}"):
        conform(df, "runs", file="runs.parquet")
    last = pl.Series([END], dtype=UTC_US).dt.offset_by("-1us")
    ok = conform(df.with_columns(end=pl.Series([None, last[0]], dtype=UTC_US)), "runs")
    assert ok["end"].to_list() == [None, last[0]]


def test_store_writes_nothing_of_a_batch_with_a_time_out_of_range(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    df = pl.DataFrame(
        {
            "run_id": ["r1", "r1"],
            "node": ["n1", "n1"],
            "device": ["0", "0"],
            "timestamp": _times("2024-01-01T00:00:00Z", "2300-01-01T00:00:00Z"),
            "power_w": [100.0, 100.0],
            "source": ["nvml", "nvml"],
        }
    )
    with pytest.raises(SchemaError, match=rf"row 2, 'timestamp': {RANGE}"):
        store.write_samples(df)
    assert store.samples("r1").height == 0


def test_import_of_a_scrape_in_2300_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: a dcgm scrape timed 2300 was imported (readers then fail on ns tools)."""
    path = tmp_path / "s.txt"
    path.write_text(
        '# scrape 2300-01-01T00:00:00Z\nDCGM_FI_DEV_POWER_USAGE{gpu="0",Hostname="h"} 70\n'
    )
    store = tmp_path / "store"
    assert main(["import", "dcgm", str(path), "--run", "r1", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, row 1, 'timestamp': expected a time from 1970-01-01T00:00:00Z" in err
    assert "found 2300-01-01T00:00:00+00:00" in err


def test_a_typed_sample_batch_sent_straight_to_the_aggregator_is_checked_too(
    tmp_path: Path,
) -> None:
    """Found in review: a batch already in the samples schema skipped ``conform`` (the fast
    path), so a year-10000 time sent straight to ``ingest_samples`` reached the store."""
    from datetime import UTC, datetime

    from profiler.schema import schema

    store = Store(tmp_path / "s")
    agg = Aggregator(store)
    agg.start_run({"run_id": "r1"})
    late = pl.Series([datetime(2262, 4, 11, tzinfo=UTC)]).cast(pl.Datetime("us", "UTC"))
    ok = pl.Series([datetime(2024, 1, 1, tzinfo=UTC)]).cast(pl.Datetime("us", "UTC"))
    rows = {"run_id": ["r1"] * 2, "node": "n", "device": "0", "power_w": [1.0, 1.0]}
    rows |= {"source": "replay", "timestamp": pl.concat([ok, late])}
    full = schema("samples")
    batch = (
        pl.DataFrame(rows)
        .with_columns(pl.lit(None, full[c]).alias(c) for c in full if c not in rows)
        .select([pl.col(c).cast(t) for c, t in full.items()])
    )
    assert batch.schema == schema("samples")
    with pytest.raises(SchemaError, match="2262-04-11"):
        agg.ingest_samples(batch)
    agg.flush()
    assert store.samples("r1").height == 0
