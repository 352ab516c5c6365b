"""Aggregator shards on a real local Ray cluster: runs split by run id, each shard rebuilt alone."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest

from conftest import typed_ray_cluster

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with typed_ray_cluster("wattwise-shard-tests", kinds=("gpu-a",)) as c:
        yield {"cluster": c, "root": tmp_path_factory.mktemp("shards")}


def _ids_on_both_shards() -> tuple[str, str]:
    from cluster.actors import shard_of

    ids = [f"shard-run-{i}" for i in range(20)]
    a = next(r for r in ids if shard_of(r, 2) == 0)
    b = next(r for r in ids if shard_of(r, 2) == 1)
    return a, b


def _batch(run_ids: list[str], t0: dt.datetime, n: int) -> pl.DataFrame:
    from profiler.schema import conform

    rows = [
        {
            "run_id": rid,
            "node": "node-1",
            "device": str(k),
            "timestamp": t0 + dt.timedelta(seconds=i),
            "power_w": 100.0 + 50.0 * k,
            "source": "replay",
        }
        for k, rid in enumerate(run_ids)
        for i in range(n)
    ]
    return conform(pl.DataFrame(rows), "samples")


def test_shard_of_is_stable_and_spreads_runs():
    from cluster.actors import shard_of

    # CRC-32 ("run-a" -> 0x4107f917; mod 4 = 3), not Python's salted hash: every process agrees.
    assert shard_of("run-a", 4) == 3
    ids = [f"run-{i}" for i in range(50)]
    code = f"from cluster.actors import shard_of; print([shard_of(r, 4) for r in {ids!r}])"
    other = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert other.stdout.strip() == str([shard_of(r, 4) for r in ids])
    assert shard_of("anything", 1) == 0
    counts = [0, 0, 0, 0]
    for i in range(400):
        counts[shard_of(f"cpu-eco-20261127-{i:06d}", 4)] += 1
    assert min(counts) > 70  # roughly even


def test_two_shards_split_runs_and_rebuild_only_their_own(cluster):
    from cluster.actors import AggregatorReceiver, Router, aggregators, shard_name
    from profiler.store import Store

    root = cluster["root"]
    handles = aggregators(root, shards=2)
    assert [ray.get(h.stats.remote())["shard"] for h in handles] == [0, 1]
    assert ray.get_actor(shard_name(1), namespace="wattwise") is not None
    a, b = _ids_on_both_shards()
    router = Router()
    assert router.for_run(a) is not None
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for rid in (a, b):
        row = {"run_id": rid, "node_type": "gpu-a", "planned_epochs": 2, "status": "running"}
        ray.get(router.for_run(rid).start_run.remote(row))
    # One sidecar batch holding both runs' rows: each shard gets its own part only.
    AggregatorReceiver().send(_batch([a, b], t0, 30))
    marks = pl.DataFrame(
        {
            "run_id": [a, a, b, b],
            "epoch": [0, 1, 0, 1],
            "start": [t0, t0 + dt.timedelta(seconds=10)] * 2,
            "end": [t0 + dt.timedelta(seconds=10), t0 + dt.timedelta(seconds=20)] * 2,
        }
    )
    for rid in (a, b):
        ray.get(router.for_run(rid).ingest_epochs.remote(marks.filter(pl.col("run_id") == rid)))
    held = [{r["run_id"] for r in ray.get(h.status.remote())} for h in handles]
    assert held == [{a}, {b}]
    counts = [ray.get(h.stats.remote())["samples"] for h in handles]
    assert counts == [30, 30]
    # Device 0 draws 100 W, device 1 150 W: 10 s epochs hold 1,000 J and 1,500 J.
    for rid, watts in ((a, 100.0), (b, 150.0)):
        ep = ray.get(router.for_run(rid).epochs.remote(rid))
        assert ep["energy_j"].to_list() == pytest.approx([10 * watts, 10 * watts])
    for h in handles:
        ray.get(h.flush.remote())
    # Shard 1 dies; Ray restarts it and it rebuilds run b alone from the store.
    pid = ray.get(handles[1].ping.remote())["pid"]
    ray.kill(handles[1], no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            if ray.get(handles[1].ping.remote(), timeout=10)["pid"] != pid:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "shard 1 did not come back"
        time.sleep(0.5)
    assert {r["run_id"] for r in ray.get(handles[1].status.remote())} == {b}
    ep = ray.get(handles[1].epochs.remote(b))
    assert ep["energy_j"].to_list() == pytest.approx([1500.0, 1500.0])
    for rid in (a, b):
        ray.get(router.for_run(rid).finish_run.remote(rid, "finished"))
    store = Store(root)
    assert store.run(a)["status"] == store.run(b)["status"] == "finished"
    assert store.samples(a).height == store.samples(b).height == 30
    # Asking for a different shard count than the running one is refused, not ignored.
    from profiler.errors import BadInputError

    with pytest.raises(BadInputError, match="runs 2 shard"):
        aggregators(root, shards=3)


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_api_answers_for_every_shard(cluster):
    """The API lives in shard 0; a run owned by shard 1 is posted, read and projected through it."""
    from cluster.actors import Router, aggregators, shard_of

    handles = aggregators(cluster["root"], shards=2)
    ids = [f"api-run-{i}" for i in range(40)]
    a = next(r for r in ids if shard_of(r, 2) == 0)
    b = next(r for r in ids if shard_of(r, 2) == 1)
    router = Router()
    for rid in (a, b):
        row = {"run_id": rid, "node_type": "gpu-a", "planned_epochs": 4, "status": "running"}
        ray.get(router.for_run(rid).start_run.remote(row))
    url = ray.get(handles[0].start_api.remote())
    t0 = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    batch = _batch([a, b], t0, 40).with_columns(pl.col("timestamp").dt.to_string("%+"))
    before = [ray.get(h.stats.remote())["samples"] for h in handles]
    code, ans = _http("POST", url + "/samples", {"samples": batch.to_dicts()})
    assert (code, ans) == (200, {"accepted": 80})
    # Each shard took its own run's rows only.
    after = [ray.get(h.stats.remote())["samples"] for h in handles]
    assert [x - y for x, y in zip(after, before, strict=True)] == [40, 40]
    marks = [
        {
            "run_id": rid,
            "epoch": e,
            "start": (t0 + dt.timedelta(seconds=10 * e)).isoformat(),
            "end": (t0 + dt.timedelta(seconds=10 * e + 10)).isoformat(),
        }
        for rid in (a, b)
        for e in range(3)
    ]
    assert _http("POST", url + "/epochs", {"epochs": marks}) == (200, {"accepted": 6})
    # Run b lives on shard 1: its status, epochs and projection come from there.
    code, st = _http("GET", url + f"/runs/{b}")
    assert code == 200 and st["run_id"] == b and st["status"] == "running"
    code, ep = _http("GET", url + f"/runs/{b}/epochs")
    assert code == 200 and [round(e["energy_j"]) for e in ep] == [1500, 1500, 1500]
    code, pr = _http("GET", url + f"/runs/{b}/projection")
    assert code == 200 and pr["energy_j"] == pytest.approx(4 * 1500, rel=0.05)
    code, ep = _http("GET", url + f"/runs/{a}/epochs")
    assert code == 200 and [round(e["energy_j"]) for e in ep] == [1000, 1000, 1000]
    code, listed = _http("GET", url + "/runs")
    assert code == 200 and {a, b} <= {r["run_id"] for r in listed}
    # An unknown run is still a 404 with the shard's own message, not Ray's wrapper.
    missing = next(r for r in (f"nope-{i}" for i in range(40)) if shard_of(r, 2) == 1)
    code, err = _http("GET", url + f"/runs/{missing}")
    assert code == 404 and err["error"].startswith("no run") and "ray" not in err["error"].lower()
    for rid in (a, b):
        ray.get(router.for_run(rid).finish_run.remote(rid, "finished"))
