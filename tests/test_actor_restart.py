"""A restarted aggregator actor runs again the sidecars and the API the operator asked for.

Regression: ``wattwise aggregator start --sidecars ... --port ...`` reached the
detached actor only through ``start_sidecars``/``start_api`` calls, so when Ray
restarted the actor (node loss, OOM, crash) its ``__init__`` came back with no
sidecar manager and no HTTP API.
"""

from __future__ import annotations

import json
import stat
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.cli import main
from profiler.errors import BadInputError

SOURCES = [("modelled", {"board_power_w": 65.0})]
SIDECAR = {"interval_s": 0.25, "batch_interval_s": 0.5, "send_timeout_s": 5.0}


def _get(url: str, headers: dict[str, str] | None = None, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    """``check()`` once it is truthy; exceptions count as not yet (a restarting actor)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as err:
            last = err
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


# ------------------------------------------------------------------------------ without Ray


def test_the_api_comes_back_on_the_same_port_with_the_same_token(tmp_path: Path) -> None:
    """A second construction with the same launch id (what Ray does on restart) serves again."""
    from cluster.actors import _AggregatorActorImpl, settings_path

    root = str(tmp_path / "store")
    token = "t" * 24
    first = _AggregatorActorImpl(root, options={"flush_interval_s": 0.0}, launch_id="L1")
    try:
        url = first.start_api("0.0.0.0", 0, token)
    finally:
        first._stop.set()
        first._api.close()
        first.agg.close()
    saved = settings_path(root, 0)
    text = saved.read_text()
    assert token not in text  # the token is kept apart, readable by the owner only
    token_file = saved.parent / "api-token"
    assert token_file.read_text() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    again = _AggregatorActorImpl(root, options={"flush_interval_s": 0.0}, launch_id="L1")
    try:
        assert again.stats()["api"] == url  # the port the first one bound, though 0 was asked
        local = url.replace("0.0.0.0", "127.0.0.1")
        assert _get(local + "/runs")[0] == 200
        # Off loopback, writes still need the operator's token.
        assert _get(local + "/samples", body={"samples": []})[0] == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert _get(local + "/samples", auth, {"samples": []})[0] == 200
        assert again.stats()["settings"]["api"] == {"host": "0.0.0.0", "port": 0, "token": True}
        # An explicit stop forgets it: the next restart serves nothing.
        assert again.stop_api() is True
        assert not token_file.exists()
    finally:
        again._stop.set()
        again.agg.close()
    third = _AggregatorActorImpl(root, options={"flush_interval_s": 0.0}, launch_id="L1")
    try:
        assert third.stats()["api"] is None
        assert third.stats()["settings"] == {"sidecars": None, "api": None, "errors": {}}
    finally:
        third._stop.set()
        third.agg.close()


def test_a_new_aggregator_does_not_inherit_an_earlier_ones_settings(tmp_path: Path) -> None:
    """A fresh actor (new launch id: the old one was killed for good) starts with nothing."""
    from cluster.actors import _AggregatorActorImpl, settings_path

    root = str(tmp_path / "store")
    first = _AggregatorActorImpl(root, options={"flush_interval_s": 0.0}, launch_id="L1")
    try:
        first.start_api("127.0.0.1", 0)
    finally:
        first._stop.set()
        first._api.close()
        first.agg.close()
    assert settings_path(root, 0).is_file()
    fresh = _AggregatorActorImpl(root, options={"flush_interval_s": 0.0}, launch_id="L2")
    try:
        assert fresh.stats()["api"] is None
        assert not settings_path(root, 0).exists()  # not restored by a later restart either
    finally:
        fresh._stop.set()
        fresh.agg.close()


def test_sidecar_sources_round_trip_through_the_settings_file(tmp_path: Path) -> None:
    """Frames, datetimes, paths, tuples and module-level functions come back equal."""
    from cluster.actors import decode_setting, encode_setting
    from cluster.runner import default_sources

    trace = pl.DataFrame(
        {"device": ["0", "0"], "timestamp": [datetime(2024, 1, 1, tzinfo=UTC)] * 2},
    ).with_columns(power_w=pl.Series([101.5, 99.0]))
    value = {
        "sources": [("replay", {"trace": trace, "anchor": datetime(2024, 5, 1, 12, tzinfo=UTC)})],
        "fn": default_sources,
        "path": tmp_path / "j",
        "odd": {"$frame": 1},
        "n": [1, 2.5, None, True, "x"],
    }
    back = decode_setting(json.loads(json.dumps(encode_setting(value, "sidecars"))))
    assert back["fn"] is default_sources
    assert back["path"] == tmp_path / "j"
    assert back["odd"] == {"$frame": 1}
    assert back["n"] == [1, 2.5, None, True, "x"]
    name, kwargs = back["sources"][0]
    assert name == "replay" and isinstance(back["sources"][0], tuple)
    assert kwargs["anchor"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert kwargs["trace"].equals(trace) and kwargs["trace"].schema == trace.schema


def test_sources_a_restart_could_not_rebuild_are_refused(tmp_path: Path) -> None:
    from cluster.actors import _AggregatorActorImpl, settings_path

    root = str(tmp_path / "store")
    impl = _AggregatorActorImpl(root, options={"flush_interval_s": 0.0}, launch_id="L1")
    try:
        with pytest.raises(BadInputError, match="module-level function.*found .*<lambda>"):
            impl.start_sidecars(lambda node: SOURCES)  # type: ignore[arg-type]
        with pytest.raises(BadInputError, match=r"sidecars.sources\[0\]\[1\]\['x'\].*found set"):
            impl.start_sidecars([("modelled", {"x": {1}})])
        assert impl.manager is None and not settings_path(root, 0).exists()
    finally:
        impl._stop.set()
        impl.agg.close()


# ------------------------------------------------------------------------------ real Ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A head node plus one worker node, one CPU each."""
    pytest.importorskip("ray")
    from conftest import typed_ray_cluster

    with typed_ray_cluster("wattwise-restart-tests", kinds=("cpu-a",)) as c:
        yield c


def _sidecars_back(agg: Any, want: dict[str, str]) -> bool:
    import ray

    from cluster.actors import SIDECAR_PREFIX

    stats = ray.get(agg.stats.remote(), timeout=30)
    if stats["sidecars"] != want:
        return False
    for node_id in want:  # each one alive and sampling
        h = ray.get_actor(SIDECAR_PREFIX + node_id[:16], namespace="wattwise")
        if ray.get(h.stats.remote(), timeout=30)["samples"] < 1:
            return False
    return True


@pytest.mark.slow
def test_a_restarted_aggregator_runs_the_same_sidecars_and_api(
    ray_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from cluster.actors import aggregator

    agg = aggregator(tmp_path / "store", options={"flush_interval_s": 0.5})
    try:
        pid = ray.get(agg.ping.remote(), timeout=120)["pid"]
        options = {**SIDECAR, "journal_dir": str(tmp_path / "journal")}
        started = ray.get(agg.start_sidecars.remote(SOURCES, options), timeout=120)
        url = ray.get(agg.start_api.remote("127.0.0.1", 0), timeout=60)
        assert _get(url + "/runs")[0] == 200
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert set(started) == nodes and len(nodes) == 2
        want = ray.get(agg.stats.remote(), timeout=30)["sidecars"]
        _wait("the first sidecars to sample", lambda: _sidecars_back(agg, want))

        ray.kill(agg, no_restart=False)  # Ray restarts it, as after a crash or a lost node
        _wait("a new incarnation", lambda: ray.get(agg.ping.remote(), timeout=10)["pid"] != pid)
        _wait("the sidecars to come back", lambda: _sidecars_back(agg, want))
        stats = ray.get(agg.stats.remote(), timeout=30)
        assert stats["settings"]["sidecars"] == {"sources": ["modelled"], "options": options}
        assert stats["settings"]["errors"] == {}
        assert stats["api"] == url  # same address: clients keep working
        assert _get(url + "/runs")[0] == 200

        # An explicit stop is remembered too: the next restart starts neither.
        # (through the CLI an operator types: `wattwise aggregator stop --sidecars --api`)
        assert main(["aggregator", "stop", "--sidecars", "--api"]) == 0
        said = capsys.readouterr().out
        assert "stopped the sidecars of 2 node(s)" in said and "stopped the HTTP API" in said
        assert ray.get(agg.stats.remote(), timeout=30)["settings"]["sidecars"] is None
        pid = ray.get(agg.ping.remote(), timeout=30)["pid"]
        ray.kill(agg, no_restart=False)
        _wait("a third incarnation", lambda: ray.get(agg.ping.remote(), timeout=10)["pid"] != pid)
        time.sleep(2.0)  # several flush-loop rounds: time enough to start sidecars, were any kept
        stats = ray.get(agg.stats.remote(), timeout=30)
        assert stats["sidecars"] is None and stats["api"] is None
    finally:
        ray.kill(agg, no_restart=True)


def test_aggregator_stop_without_what_to_stop_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["aggregator", "stop"]) == 2
    assert "--sidecars, --api or both" in capsys.readouterr().err
