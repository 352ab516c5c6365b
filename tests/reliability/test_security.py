"""Security: where the API listens, who may write, where paths lead, what loads, what is logged.

Threats covered, each by a test that fails if the defence goes:

* the HTTP API listens on 127.0.0.1 unless told otherwise; off loopback it
  refuses to start without a token (of at least 16 characters), and every
  POST needs ``Authorization: Bearer <token>``, compared with
  :func:`hmac.compare_digest`;
* run ids and store paths cannot leave the store: ``../x``, ``a/b``, absolute
  paths, a trailing line break, symlinks planted in the store folder, API
  paths and bodies, CLI ``--run``;
* model files load only as checksummed XGBoost JSON: no pickle, joblib,
  ``torch.load``, ``eval`` or ``exec`` anywhere in the package, and a pickle
  dressed as a model with a matching checksum is refused without running;
* no token appears in logs, on stdout/stderr, or in any API answer.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import logging
import pickle
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.aggregator import Aggregator
from cluster.api import MIN_TOKEN_CHARS, ApiServer, serve
from cluster.cli import main
from profiler.errors import BadInputError, SchemaError, StoreError
from profiler.store import Store

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "profiler", "estimators")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
#: Run ids that must never name a place: traversal, separators, absolute, hidden, line break.
BAD_IDS = ["../x", "..", "a/b", "a/../../x", "/etc/passwd", ".hidden", "a\\b", "a\n", "", "x" * 129]


def _samples(run_id: str, n: int = 3, node: str = "n1") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": [run_id] * n,
            "node": [node] * n,
            "device": ["0"] * n,
            "timestamp": [T0 + timedelta(seconds=i) for i in range(n)],
            "power_w": [100.0] * n,
            "source": ["replay"] * n,
        }
    )


def _json_rows(run_id: str, n: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "run_id": run_id,
            "node": "n1",
            "device": "0",
            "timestamp": (T0 + timedelta(seconds=i)).isoformat(),
            "power_w": 100.0,
            "source": "replay",
        }
        for i in range(n)
    ]


def _request(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _raw_get(api: ApiServer, path: str) -> tuple[int, str]:
    """GET ``path`` exactly as written (urllib would normalise ``..`` and quote characters)."""
    host, port = api.server.server_address[:2]
    conn = http.client.HTTPConnection("127.0.0.1" if host == "0.0.0.0" else host, port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def exposed(store: Store, token: str) -> Iterator[tuple[ApiServer, Aggregator]]:
    """The API bound to every interface (off loopback) with a token; reached over 127.0.0.1."""
    agg = Aggregator(store, flush_interval_s=0.0)
    api = serve(agg, host="0.0.0.0", token=token)
    api.url = f"http://127.0.0.1:{api.server.server_address[1]}"
    try:
        yield api, agg
    finally:
        api.close()


# ------------------------------------------------------------------------------ where it listens


def test_the_api_listens_on_loopback_unless_configured(store: Store) -> None:
    api = serve(Aggregator(store))
    try:
        assert api.server.server_address[0] == "127.0.0.1"
        assert api.url.startswith("http://127.0.0.1:")
        assert api.server.token is None  # loopback: no token needed
    finally:
        api.close()
    from cluster.cli import build_parser

    args = build_parser().parse_args(["aggregator", "start", "--port", "0"])
    assert args.host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::"])
def test_off_loopback_the_api_refuses_to_start_without_a_token(store: Store, host: str) -> None:
    agg = Aggregator(store)
    with pytest.raises(BadInputError, match="give a token"):
        serve(agg, host=host)
    with pytest.raises(BadInputError, match="give a token"):
        serve(agg, host=host, token="")
    with pytest.raises(BadInputError, match=f"expected at least {MIN_TOKEN_CHARS}"):
        serve(agg, host=host, token="s3cret")


def test_the_cli_refuses_an_exposed_api_without_a_token_before_touching_ray(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATTWISE_API_TOKEN", raising=False)
    assert main(["aggregator", "start", "--port", "0", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "wattwise aggregator: error: --host 0.0.0.0 accepts API writes" in err
    assert "set $WATTWISE_API_TOKEN" in err
    # A short token is refused there too, before Ray is touched, and a flag is warned about.
    monkeypatch.setenv("WATTWISE_API_TOKEN", "short")
    assert main(["aggregator", "start", "--port", "0", "--host", "0.0.0.0"]) == 2
    assert "at least 16 characters; found 5" in capsys.readouterr().err
    assert main(["aggregator", "start", "--port", "0", "--host", "0.0.0.0", "--token", "x"]) == 2
    err = capsys.readouterr().err
    assert "prefer the environment variable WATTWISE_API_TOKEN" in " ".join(err.split())
    assert "found 1" in err


# ------------------------------------------------------------------------------ who may write


def test_every_write_route_needs_the_token(
    exposed: tuple[ApiServer, Aggregator], token: str, store: Store
) -> None:
    api, agg = exposed
    bodies = {
        "/samples": {"samples": _json_rows("r-1")},
        "/epochs": {
            "epochs": [
                {"run_id": "r-1", "epoch": 0, "start": T0.isoformat(), "end": T0.isoformat()}
            ]
        },
        "/placement": {"arch": "resnet18"},
        "/nowhere": {},
    }
    wrong = [
        {},
        {"Authorization": ""},
        {"Authorization": token},  # no scheme
        {"Authorization": f"bearer {token}"},  # scheme is case-sensitive here
        {"Authorization": f"Bearer {token[:-1]}"},  # a prefix
        {"Authorization": f"Bearer {token}x"},  # an extension
        {"Authorization": f"Bearer {token[:-1]}{'A' if token[-1] != 'A' else 'B'}"},  # 1 char off
        {"Authorization": "Bearer \u00e9" * 3},  # non-ASCII must not crash the comparison
    ]
    for path, body in bodies.items():
        for headers in wrong:
            code, text = _request(api.url + path, "POST", body, headers)
            assert code == 401, (path, headers)
            assert json.loads(text) == {"error": "writes need 'Authorization: Bearer <token>'"}
    # Nothing was taken by the refused writes.
    assert agg.stats()["samples"] == 0 and agg.stats()["epochs"] == 0
    assert store.runs().height == 0
    auth = {"Authorization": f"Bearer {token}"}
    code, text = _request(api.url + "/samples", "POST", bodies["/samples"], auth)
    assert (code, json.loads(text)) == (200, {"accepted": 3})
    # Reads need no token.
    code, text = _request(api.url + "/runs/r-1")
    assert code == 200 and json.loads(text)["samples"] == 3


def test_the_token_is_compared_with_hmac_compare_digest(
    exposed: tuple[ApiServer, Aggregator], token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    real = hmac.compare_digest
    calls: list[tuple[Any, Any]] = []

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    api, _ = exposed
    assert _request(api.url + "/samples", "POST", {"samples": []}, {})[0] == 401
    code, _ = _request(
        api.url + "/samples", "POST", {"samples": []}, {"Authorization": f"Bearer {token}"}
    )
    assert code == 200
    assert len(calls) == 2
    assert calls[0] == (b"", f"Bearer {token}".encode())
    assert calls[1] == (f"Bearer {token}".encode(),) * 2


def test_a_negative_content_length_is_refused_instead_of_hanging(
    exposed: tuple[ApiServer, Aggregator], token: str
) -> None:
    """Regression: ``rfile.read(-1)`` waited for the client to close the connection."""
    api, _ = exposed
    conn = http.client.HTTPConnection("127.0.0.1", api.server.server_address[1], timeout=10)
    conn.putrequest("POST", "/samples")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", "-1")
    conn.endheaders()
    resp = conn.getresponse()  # a hang would raise TimeoutError here
    assert resp.status == 400
    assert json.loads(resp.read()) == {"error": "Content-Length must be >= 0; found -1"}
    conn.close()


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_run_id_cannot_name_a_path_outside_the_store(
    store: Store, tmp_path: Path, bad: str
) -> None:
    before = _tree(tmp_path)
    with pytest.raises(SchemaError, match="run_id must match"):
        store.write_samples(_samples(bad))
    with pytest.raises(SchemaError, match="run_id must match"):
        store.samples(bad)
    with pytest.raises(SchemaError, match="run_id must match"):
        store.run(bad)
    with pytest.raises(SchemaError, match="run_id must match"):
        store.epochs(bad)
    with pytest.raises(SchemaError, match="run_id must match"):
        store.write_runs(pl.DataFrame({"run_id": [bad], "status": ["running"]}))
    # Nothing was created anywhere (the store directory itself may hold its lock file).
    assert _tree(tmp_path) - before <= {"store", "store/.lock"}


@pytest.mark.parametrize("bad", BAD_IDS)
def test_the_aggregator_refuses_a_run_id_that_names_a_path(
    store: Store, tmp_path: Path, bad: str
) -> None:
    before = _tree(tmp_path)
    frame = _samples(bad).with_columns(
        model=pl.lit("m"),
        energy_j=pl.lit(1.0),
        gpu_util_pct=pl.lit(1.0),
        mem_util_pct=pl.lit(1.0),
        mem_used_mib=pl.lit(1.0),
        temp_c=pl.lit(1.0),
    )
    from profiler.schema import schema

    frame = frame.select(list(schema("samples"))).cast(dict(schema("samples")))
    agg = Aggregator(store, wal=tmp_path / "wal")
    with pytest.raises(SchemaError, match="run_id must match"):
        agg.ingest_samples(frame)
    # The refused batch must not poison the journal: a restart rebuilds cleanly.
    Aggregator.rebuild(store, wal=tmp_path / "wal")
    assert _tree(tmp_path) - before <= {"store", "store/.lock", "wal"}


def test_a_symlink_planted_in_the_store_is_neither_followed_nor_written_through(
    store: Store, tmp_path: Path
) -> None:
    outside = Store(tmp_path / "elsewhere")
    assert outside.write_samples(_samples("victim", 5)) == 5
    victim_dir = tmp_path / "elsewhere" / "samples" / "victim"
    keep = victim_dir / ".tmp-keep"
    keep.write_bytes(b"not the store's to delete")
    store.write_samples(_samples("r-1"))
    (store.root / "samples" / "evil").symlink_to(victim_dir)  # to a run dir outside
    (store.root / "samples" / "alias").symlink_to(store.root / "samples" / "r-1")  # inside
    before = _tree(victim_dir)
    # Reading every run skips the symlinked directories; reading one refuses them.
    assert store.samples()["run_id"].unique().to_list() == ["r-1"]
    for rid in ("evil", "alias"):
        with pytest.raises(SchemaError, match="would leave the store"):
            store.samples(rid)
        with pytest.raises(SchemaError, match="would leave the store"):
            store.write_samples(_samples(rid))
    # A write elsewhere in the store (which sweeps temporaries) deletes nothing outside.
    assert store.write_samples(_samples("r-2")) == 3
    assert keep.is_file() and _tree(victim_dir) == before
    assert outside.samples("victim").height == 5


def test_a_symlinked_lock_file_is_not_followed(store: Store, tmp_path: Path) -> None:
    store.root.mkdir(parents=True)
    target = tmp_path / "planted-target"
    (store.root / ".lock").symlink_to(target)
    with pytest.raises(StoreError, match="cannot open the store"):
        store.write_samples(_samples("r-1"))
    assert not target.exists()


def test_api_paths_and_bodies_cannot_reach_outside_the_store(
    exposed: tuple[ApiServer, Aggregator], token: str, tmp_path: Path
) -> None:
    api, agg = exposed
    before = _tree(tmp_path)
    for path in (
        "/runs/../x",
        "/runs/..",
        "/runs/%2e%2e%2fx",
        "/runs/..%2F..%2Fetc%2Fpasswd",
        "/runs/%2Fetc%2Fpasswd",
        "/runs/a%0A",
        "/runs/.hidden/epochs",
        "/runs/..%5C..%5Cx/projection",
        "//etc/passwd",
        "/runs/r-1/../../../etc/passwd",
    ):
        code, text = _raw_get(api, path)
        assert code in (400, 404), path
        assert "error" in json.loads(text), path
    auth = {"Authorization": f"Bearer {token}"}
    for bad in ("../x", "a/b", "/abs", "a\n", ".hidden"):
        code, text = _request(api.url + "/samples", "POST", {"samples": _json_rows(bad)}, auth)
        assert code == 400, bad
        assert "run_id must match" in json.loads(text)["error"], bad
        epochs = [{"run_id": bad, "epoch": 0, "start": T0.isoformat(), "end": T0.isoformat()}]
        code, text = _request(api.url + "/epochs", "POST", {"epochs": epochs}, auth)
        assert code == 400 and "run_id must match" in json.loads(text)["error"], bad
    assert agg.stats()["samples"] == 0
    assert _tree(tmp_path) - before <= {"store", "store/.lock"}


def test_a_full_schema_batch_with_a_trailing_line_break_is_refused_before_the_wal(
    exposed: tuple[ApiServer, Aggregator], token: str, store: Store
) -> None:
    """Regression: ``check_run_id`` (``re.match`` with ``$``) let ``"r-1\\n"`` through.

    A batch carrying every samples column in its storage type skipped the
    aggregator's full check, so such an id reached the write-ahead journal and
    the store made a directory named with a line break. The API now checks
    run ids in full before anything is taken.
    """
    api, _ = exposed
    rows = [
        {
            **r,
            "model": "m",
            "energy_j": 1.0 + i,
            "gpu_util_pct": 1.0,
            "mem_util_pct": 1.0,
            "mem_used_mib": 1.0,
            "temp_c": 1.0,
        }
        for i, r in enumerate(_json_rows("r-1\n"))
    ]
    code, text = _request(
        api.url + "/samples", "POST", {"samples": rows}, {"Authorization": f"Bearer {token}"}
    )
    assert code == 400 and "'r-1\\n'" in json.loads(text)["error"]
    assert not (store.root / "samples").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["energy", "--run", "../x"],
        ["energy", "--run", "a/b"],
        ["energy", "--run", "/etc/passwd"],
        ["estimate", "--run", "../../x"],
        ["report", "--run", "../x", "--out", "r.html"],
    ],
)
def test_cli_run_ids_cannot_name_a_path(
    argv: list[str], store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write_samples(_samples("r-1"))
    before = _tree(tmp_path)
    assert main([*argv, "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert f"wattwise {argv[0]}: error: run_id must match" in err
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------------------ model files

#: Calls that can run code from a file's content: module.function, and builtins.
DANGEROUS_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("cPickle", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("joblib", "load"),
    ("torch", "load"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("np", "load"),
    ("numpy", "load"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}
DANGEROUS_BUILTINS = {"eval", "exec", "compile", "__import__"}
DANGEROUS_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dangerous(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for name in [*names, *([mod] if mod else [])]:
                if name.split(".")[0] in DANGEROUS_MODULES:
                    found.append(f"{path}:{node.lineno}: import {name}")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in DANGEROUS_BUILTINS:
                found.append(f"{path}:{node.lineno}: {f.id}()")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if (f.value.id, f.attr) in DANGEROUS_CALLS:
                    found.append(f"{path}:{node.lineno}: {f.value.id}.{f.attr}()")
    return found


def test_no_code_path_unpickles_or_evaluates_file_content() -> None:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    assert len(files) > 40  # the scan really covers the package
    found = [hit for p in files for hit in _dangerous(p)]
    assert found == []
    # The scanner itself finds what it looks for.
    probe = REPO / "tests" / "reliability" / "test_security.py"
    assert any("import pickle" in h for h in _dangerous(probe))


def test_pyarrow_does_not_unpickle_extension_types_from_parquet() -> None:
    """Store and journal files are read with pyarrow; before 14.0.1 a parquet file's
    metadata could make it unpickle a ``PyExtensionType`` (CVE-2023-47248)."""
    import pyarrow

    major, minor, patch = (int(x) for x in pyarrow.__version__.split(".")[:3])
    assert (major, minor, patch) >= (14, 0, 1)


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_dressed_as_a_model_with_a_matching_checksum_never_runs(tmp_path: Path) -> None:
    from cluster.retrain import latest_model
    from estimators.pre import FORMAT, FORMAT_VERSION, PREModel

    marker = tmp_path / "pickle-ran"
    body = pickle.dumps(_Payload(marker))
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "pre-v1.json").write_bytes(body)
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sha256": hashlib.sha256(body).hexdigest(),
        "accepted": True,
    }
    (folder / "pre-v1.card.json").write_text(json.dumps(card))
    with pytest.raises(BadInputError, match="malformed PRE model file"):
        PREModel.load(folder / "pre-v1.json")
    with pytest.raises(BadInputError, match="malformed PRE model file"):
        latest_model(folder)
    assert not marker.exists()
    # And with a checksum that does not match, nothing is even parsed.
    (folder / "pre-v1.card.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    with pytest.raises(BadInputError, match="checksum mismatch"):
        PREModel.load(folder / "pre-v1.json")
    assert not marker.exists()


def test_a_model_only_loads_through_its_json_card(tmp_path: Path) -> None:
    from estimators.pre import PREModel

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "pre-v1.json").write_text("{}")
    with pytest.raises(BadInputError, match="expected a PRE model card; no such file"):
        PREModel.load(folder / "pre-v1.json")
    (folder / "pre-v1.card.json").write_text("\x80 not json")
    with pytest.raises(BadInputError, match="expected a JSON model card"):
        PREModel.load(folder / "pre-v1.json")


# ------------------------------------------------------------------------------ no secret logged


def test_no_token_is_logged_printed_or_answered(
    store: Store,
    token: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from cluster.actors import _AggregatorActorImpl

    caplog.set_level(logging.DEBUG)  # everything, from every logger
    impl = _AggregatorActorImpl(str(store.root), options={"flush_interval_s": 0.0})
    try:
        url = impl.start_api("0.0.0.0", 0, token)
        url = url.replace("0.0.0.0", "127.0.0.1")
        answers = []
        auth = {"Authorization": f"Bearer {token}"}
        near = {"Authorization": f"Bearer {token[:-1]}#"}
        for headers in (auth, near, {"Authorization": token}, {}):
            for path, body in (
                ("/samples", {"samples": _json_rows("r-1")}),
                ("/samples", {"samples": _json_rows("../x")}),
                ("/samples", {"samples": [{"power_w": "x"}]}),
                ("/epochs", {"epochs": "nope"}),
                ("/placement", {"arch": ""}),
                ("/nowhere", {}),
            ):
                answers.append(_request(url + path, "POST", body, headers)[1])
            for path in ("/runs", "/runs/r-1", "/runs/nope", "/runs/../x", "/placement?x=1"):
                answers.append(_request(url + path, "GET", None, headers)[1])
        # A malformed request line and headers with the token in them.
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
        conn.putrequest("POST", "/samples")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Length", "nope")
        conn.endheaders()
        answers.append(conn.getresponse().read().decode())
        conn.close()
        stats = impl.stats()
        assert stats["api"] == url.replace("127.0.0.1", "0.0.0.0")
        shown = [json.dumps(stats), repr(impl._api.server), repr(impl._api)]
    finally:
        impl._stop.set()
        impl._api.close()
        impl.agg.close()
    assert impl.agg.stats()["samples"] == 3  # the authorised write went through
    out, err = capfd.readouterr()
    seen = "\n".join([caplog.text, out, err, *answers, *shown])
    assert "api: " in caplog.text  # the request log was captured (without headers)
    assert token not in seen
    assert token[:-1] not in seen


def test_a_model_linked_from_outside_the_models_folder_is_refused(tmp_path: Path) -> None:
    from cluster.retrain import latest_model

    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "pre-v1.json").symlink_to(outside)
    (folder / "pre-v1.card.json").write_text("{}")
    with pytest.raises(BadInputError, match="outside .*models load only from their own folder"):
        latest_model(folder)
