"""The HTTP API's ``/placement`` route against a real server: the CLI's JSON, clear 400s."""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.aggregator import Aggregator
from cluster.api import ApiServer, serve
from cluster.cli import main
from estimators.recommend import NodeType
from profiler.store import Store

#: The issue's example job, as query fields and as ``wattwise placement`` options.
JOB = {"arch": "resnet50", "batch_size": 64, "image_size": 224, "train_size": 50000, "epochs": 90}
JOB_ARGS = ["--arch", "resnet50", "--batch-size", "64", "--image-size", "224"]
JOB_ARGS += ["--train-size", "50000", "--epochs", "90"]
#: Two node types of GPUs the SEAA 2023 runs trained on; the second is the default.
INVENTORY = [
    {"name": "gpu-3090", "gpu_model": "RTX 3090"},
    {"name": "gpu-3070", "gpu_model": "RTX 3070", "default": True},
]
SMALL = {"n_estimators": 60, "max_depths": (2,), "cv_folds": 3, "nthread": 1}


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post(url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    return _post_raw(url, json.dumps(body).encode(), token)


def _cli(store: Path, inventory: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    argv = ["placement", *JOB_ARGS, *extra, "--inventory", str(inventory), "--json"]
    assert main([*argv, "--store", str(store)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps({"node_types": INVENTORY}))
    return path


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    store = Store(tmp_path / "store")
    server = serve(Aggregator(store), inventory=[NodeType(**n) for n in INVENTORY])
    try:
        yield server
    finally:
        server.close()


def test_placement_without_a_model_answers_what_the_cli_prints(
    api: ApiServer, inventory_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, got = _get(api.url + "/placement?" + urllib.parse.urlencode(JOB))
    assert code == 200
    store = api.server.agg.store
    assert store is not None
    assert got == _cli(store.root, inventory_file, capsys=capsys)
    assert got["node_type"] == "gpu-3070"  # the inventory's default: no model yet
    assert got["source"].startswith("default node type (no PRE model yet")
    assert got["ray_resources"] == {"node_type:gpu-3070": 0.001}
    # POST with the job as JSON gives the same answer; '-' and '_' are interchangeable.
    assert _post(api.url + "/placement", JOB) == (200, got)
    dashed = {k.replace("_", "-"): v for k, v in JOB.items()}
    assert _get(api.url + "/placement?" + urllib.parse.urlencode(dashed)) == (200, got)


def test_placement_for_a_named_node_type(
    api: ApiServer, inventory_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    query = urllib.parse.urlencode({**JOB, "node_type": "gpu-3090"})
    code, got = _get(api.url + "/placement?" + query)
    assert code == 200 and got["node_type"] == "gpu-3090" and got["source"] == "named"
    store = api.server.agg.store
    assert store is not None
    assert got == _cli(store.root, inventory_file, "--node-type", "gpu-3090", capsys=capsys)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({}, "expected 'arch', the architecture"),
        ({"arch": ""}, "expected 'arch', the architecture"),
        ({"arch": "resnet50", "batch_size": "abc"}, "'batch_size' must be an integer >= 1"),
        (
            {"arch": "resnet50", "batch_size": "0"},
            "'batch_size' must be an integer >= 1; found '0'",
        ),
        ({"arch": "resnet50", "epochs": "-3"}, "'epochs' must be an integer >= 1"),
        ({"arch": "resnet50", "validation_size": "-1"}, "'validation_size' must be an integer"),
        ({"arch": "resnet50", "gpus": "8"}, r"unknown field(s) ['gpus']; expected some of"),
        ({"arch": "resnet50", "objective": "speed"}, "'objective' must be one of"),
        ({"arch": "resnet50", "node_type": "gpu-h100"}, "unknown node type 'gpu-h100'"),
        ({"arch": "resnet50", "layers": "0"}, "'layers' must be an integer >= 1; found '0'"),
        ({"arch": "resnet50", "gflops": "inf"}, "'gflops' must be a finite number > 0"),
        ({"arch": "resnet50", "deadline_h": "1"}, "'deadline_h' needs 'epochs'"),
        (
            {"arch": "resnet50", "epochs": "9", "deadline_h": "0"},
            "'deadline_h' must be a finite number > 0; found '0'",
        ),
    ],
)
def test_bad_placement_input_is_a_400_with_the_reason(
    api: ApiServer, query: dict[str, str], message: str
) -> None:
    code, got = _get(api.url + "/placement?" + urllib.parse.urlencode(query))
    assert code == 400
    assert message in got["error"]


def test_bad_placement_bodies_and_query_strings_are_400s(api: ApiServer) -> None:
    code, got = _get(api.url + "/placement?arch=a&arch=b")
    assert (code, got["error"]) == (400, "placement: field 'arch' given twice; give it once")
    code, got = _get(api.url + "/placement?arch")
    assert (code, got["error"]) == (
        400,
        "placement: could not read the query string (bad query field: 'arch')",
    )
    code, got = _get(api.url + "/placement?%%%")
    assert code == 400 and "could not read the query string" in got["error"]
    code, got = _post(api.url + "/placement", ["resnet50"])
    assert (code, got["error"]) == (400, "placement: expected a JSON object describing the job")
    code, got = _post(api.url + "/placement", {"arch": "resnet50", "batch_size": 6.5})
    assert code == 400 and "'batch_size' must be an integer >= 1; found 6.5" in got["error"]
    code, got = _post(api.url + "/placement", {"arch": "resnet50", "batch_size": True})
    assert code == 400 and "'batch_size' must be an integer" in got["error"]


def test_placement_without_an_inventory_outside_ray_says_how_to_get_one(tmp_path: Path) -> None:
    server = serve(Aggregator(Store(tmp_path / "store")))
    try:
        code, got = _get(server.url + "/placement?arch=resnet50")
    finally:
        server.close()
    assert code == 503
    assert "started without an inventory and outside a Ray cluster" in got["error"]


def test_placement_on_an_exposed_api_needs_the_token_to_post_but_not_to_get(
    tmp_path: Path,
) -> None:
    token = "t" * 32
    server = serve(
        Aggregator(Store(tmp_path / "store")),
        host="0.0.0.0",
        token=token,
        inventory=lambda: [NodeType(**n) for n in INVENTORY],
    )
    url = f"http://127.0.0.1:{server.server.server_address[1]}"
    try:
        assert _post(url + "/placement", JOB)[0] == 401
        assert _post(url + "/placement", JOB, token)[0] == 200
        assert _get(url + "/placement?arch=resnet50")[0] == 200
    finally:
        server.close()


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with the real SEAA 2023 runs and a small PRE model fitted on them."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "runs.parquet").is_file():
        pytest.skip(f"real traces not found at {SHARED_DATA} (../shared/data/seaa2023)")
    from cluster.retrain import training_rows
    from estimators.pre import PREModel
    from profiler.importers.seaa2023 import import_seaa2023

    store = Store(tmp_path_factory.mktemp("api") / "store")
    import_seaa2023(store, SHARED_DATA, progress=False)
    rows, _ = training_rows(store.runs())
    PREModel(**SMALL).fit(rows).save(
        store.root / "models" / "pre-v1.json", card={"version": 1, "accepted": True}
    )
    return store.root


@pytest.mark.shared_data
@pytest.mark.slow
def test_placement_with_the_stores_model_answers_what_the_cli_prints(
    trained_store: Path, inventory_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(Aggregator(Store(trained_store)), inventory=[NodeType(**n) for n in INVENTORY])
    try:
        code, got = _get(server.url + "/placement?" + urllib.parse.urlencode(JOB))
        again = _post(server.url + "/placement", JOB)
    finally:
        server.close()
    assert code == 200
    assert got["source"] == "predicted (PRE)"
    assert got["node_type"] in ("gpu-3090", "gpu-3070")
    assert got["predicted_energy_j"] > 0
    assert got["recommendation"]["chosen"] == got["node_type"]
    assert {r["node_type"] for r in got["recommendation"]["node_types"]} == {"gpu-3090", "gpu-3070"}
    assert got == _cli(trained_store, inventory_file, capsys=capsys)
    assert again == (200, got)


#: A valid power sample as a sidecar would post it.
SAMPLE = {
    "run_id": "r1",
    "node": "n1",
    "device": "0",
    "timestamp": "2024-01-01T00:00:00+00:00",
    "power_w": 100.0,
    "source": "nvml",
}
EPOCH = {"run_id": "r1", "epoch": 0, "start": "2024-01-01T00:00:00Z", "end": "2024-01-01T00:01:00Z"}
TIME_EXPECTED = "expected an ISO 8601 time with an offset, as a string such as"


@pytest.mark.parametrize(
    ("value", "found"),
    [
        (1704067200, "found number 1704067200"),  # Unix seconds: was stored as 1970-01-01 00:28
        (1704067200.5, "found number 1704067200.5"),
        (True, "found boolean true"),
        (-5, "found number -5"),
        ([1], "found array [1]"),
        ("2024-01-01T00:00:00", "found '2024-01-01T00:00:00'"),  # no offset: was taken as UTC
        ("2024-01-01", "found '2024-01-01'"),
    ],
)
def test_a_sample_time_that_is_not_an_iso_string_with_an_offset_is_a_400(
    api: ApiServer, value: Any, found: str
) -> None:
    rows = [SAMPLE, {**SAMPLE, "timestamp": value}]
    code, got = _post(api.url + "/samples", {"samples": rows})
    assert code == 400
    assert got["error"].startswith(f"samples, row 2, 'timestamp': {TIME_EXPECTED}")
    assert got["error"].endswith(found)
    code, got = _post(api.url + "/samples", {"samples": [{**SAMPLE, "timestamp": value}] * 2})
    assert code == 400 and got["error"].startswith("samples, row 1, 'timestamp': ")
    store = api.server.agg.store
    assert store is not None
    api.server.agg.flush()
    assert store.samples("r1").height == 0  # the batch is refused whole


def test_an_epoch_time_that_is_a_number_is_a_400(api: ApiServer) -> None:
    code, got = _post(api.url + "/epochs", {"epochs": [{**EPOCH, "start": 1, "end": 2}]})
    assert code == 400
    assert got["error"] == (
        f"epochs, row 1, 'start': {TIME_EXPECTED} '2024-01-01T00:00:00+00:00'; found number 1"
    )
    code, got = _post(api.url + "/epochs", {"epochs": [EPOCH, {**EPOCH, "epoch": 1, "end": 2}]})
    assert code == 400 and got["error"].startswith("epochs, row 2, 'end': ")
    store = api.server.agg.store
    assert store is not None
    assert store.epochs("r1").height == 0


def test_iso_times_with_an_offset_are_taken(api: ApiServer) -> None:
    rows = [
        SAMPLE,
        {**SAMPLE, "timestamp": "2024-01-01T00:00:01.5Z"},
        {**SAMPLE, "timestamp": "2024-01-01 05:00:02+05:00"},
    ]
    assert _post(api.url + "/samples", {"samples": rows}) == (200, {"accepted": 3})
    api.server.agg.flush()
    store = api.server.agg.store
    assert store is not None
    utc = dt.UTC
    assert store.samples("r1")["timestamp"].to_list() == [
        dt.datetime(2024, 1, 1, 0, 0, 0, tzinfo=utc),
        dt.datetime(2024, 1, 1, 0, 0, 1, 500_000, tzinfo=utc),
        dt.datetime(2024, 1, 1, 0, 0, 2, tzinfo=utc),
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", 100_000, "'image_size' must be an integer from 1 to 1024 through the API"),
        ("image_size", 1025, "'image_size' must be an integer from 1 to 1024"),
        ("batch_size", 10**9, "'batch_size' must be an integer from 1 to 65536 through the API"),
        ("train_size", 10**400, "'train_size' must be an integer from 1 to 1000000000000"),
        ("epochs", 10**7, "'epochs' must be an integer from 1 to 1000000 through the API"),
    ],
)
def test_placement_sizes_beyond_the_apis_bounds_are_400s(
    api: ApiServer, field: str, value: int, message: str
) -> None:
    # With a PRE model, image_size=100000 made the aggregator allocate 240 GB for one GET.
    job = {"arch": "resnet50", field: value}
    code, got = _get(api.url + "/placement?" + urllib.parse.urlencode(job))
    assert code == 400 and message in got["error"] and got["error"].endswith(f"found '{value}'")
    code, got = _post(api.url + "/placement", job)
    assert code == 400 and message in got["error"] and got["error"].endswith(f"found {value}")


def test_placement_at_the_apis_largest_sizes_is_answered_and_the_cli_has_no_bound(
    api: ApiServer, inventory_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = {"arch": "resnet50", "image_size": 1024, "batch_size": 65536}
    assert _get(api.url + "/placement?" + urllib.parse.urlencode(job))[0] == 200
    store = api.server.agg.store
    assert store is not None
    # argparse keeps the last --image-size: the CLI places a 2048-pixel job (no model: no run).
    got = _cli(store.root, inventory_file, "--image-size", "2048", capsys=capsys)
    assert got["node_type"] == "gpu-3070"


def _failing_inventory() -> list[NodeType]:
    raise RuntimeError("the inventory service is down")


def test_an_unexpected_exception_is_a_500_with_the_reason_not_a_dropped_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(Aggregator(Store(tmp_path / "store")), inventory=_failing_inventory)
    try:
        with caplog.at_level("ERROR", logger="cluster.api"):
            code, got = _get(server.url + "/placement?arch=resnet50")
            posted = _post(server.url + "/placement", {"arch": "resnet50"})
        assert _get(server.url + "/runs") == (200, [])  # the server still answers
    finally:
        server.close()
    assert code == 500
    assert got["error"] == (
        "internal error in GET /placement: RuntimeError: the inventory service is down; "
        "the aggregator's log has the traceback"
    )
    assert posted == (500, {"error": got["error"].replace("GET", "POST")})
    failures = [r for r in caplog.records if r.getMessage().startswith("api: ")]
    assert [r.getMessage() for r in failures] == [
        "api: GET /placement failed",
        "api: POST /placement failed",
    ]
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in failures)


def _post_raw(url: str, data: bytes, token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_urllib_gets_the_413_for_a_body_over_the_limit(api: ApiServer) -> None:
    from cluster.api import MAX_BODY

    size = MAX_BODY + 2 * 1024 * 1024
    for _ in range(2):  # was a broken pipe every time
        code, got = _post_raw(api.url + "/samples", b" " * size)
        assert (code, got) == (413, {"error": f"request body of {size} bytes exceeds {MAX_BODY}"})
    assert _post(api.url + "/samples", {"samples": [SAMPLE]}) == (200, {"accepted": 1})


def test_urllib_gets_the_401_for_a_large_body_without_the_token(tmp_path: Path) -> None:
    token = "t" * 32
    server = serve(Aggregator(Store(tmp_path / "store")), host="0.0.0.0", token=token)
    url = f"http://127.0.0.1:{server.server.server_address[1]}/samples"
    body = json.dumps({"samples": [SAMPLE] * 50_000}).encode()  # 6 MB: was a broken pipe
    try:
        code, got = _post_raw(url, body)
        assert (code, got) == (401, {"error": "writes need 'Authorization: Bearer <token>'"})
        assert _post_raw(url, body, token)[0] == 200
    finally:
        server.close()


def test_a_client_expecting_100_continue_gets_the_413_before_sending_the_body(
    api: ApiServer,
) -> None:
    import http.client

    from cluster.api import MAX_BODY

    host, port = api.server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=10)
    try:
        conn.putrequest("POST", "/samples")
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()  # no body: the server must answer without waiting for it
        r = conn.getresponse()
        assert r.status == 413 and "exceeds" in json.loads(r.read())["error"]
    finally:
        conn.close()
