"""The HTTP API's ``/placement`` route against a real server: the CLI's JSON, clear 400s."""

from __future__ import annotations

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
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


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
