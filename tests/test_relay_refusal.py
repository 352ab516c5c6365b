"""The mark relay against a real aggregator actor that refuses one of the run's marks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from conftest import at, typed_ray_cluster

pytestmark = pytest.mark.slow

RID = "relay-r1"


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A head-only local Ray cluster with the aggregator actor and its own store."""
    pytest.importorskip("ray")
    with typed_ray_cluster("wattwise-relay-tests", kinds=()):
        from cluster.actors import aggregator

        root = tmp_path_factory.mktemp("relay") / "agg-store"
        yield {"handle": aggregator(root), "root": root}


def _marks(rows: list[tuple[int, float, float]]) -> pl.DataFrame:
    """Epoch marks of RID: (epoch, start s, end s) after 2024-01-01."""
    return pl.DataFrame(
        {
            "run_id": [RID] * len(rows),
            "epoch": [e for e, _, _ in rows],
            "start": [at(s) for _, s, _ in rows],
            "end": [at(t) for _, _, t in rows],
        }
    )


def _counting_clock() -> tuple[Callable[[], datetime], list[datetime]]:
    """The real UTC clock, remembering each reading (the relay reads it once per ingest call)."""
    from profiler.sources.base import utc_now

    calls: list[datetime] = []

    def clock() -> datetime:
        calls.append(utc_now())
        return calls[-1]

    return clock, calls


def test_one_refused_mark_does_not_keep_later_marks_from_the_aggregator(
    agg: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: one refused mark made the relay resend the whole batch on every forward,
    so the good marks after it never reached the aggregator's live view."""
    import ray

    from cluster.runner import MarkRelay
    from profiler.store import Store

    handle = agg["handle"]
    ray.get(handle.start_run.remote({"run_id": RID, "node_type": "cpu", "planned_epochs": 4}))
    ray.get(handle.ingest_epochs.remote(_marks([(0, 0, 10), (1, 10, 20)])), timeout=60)
    # The store the relay reads: epoch 0 as the aggregator has it, epoch 1 restarted at 5 s
    # (overlapping epoch 0), then good epochs 2 and 3.
    relay_store = Store(tmp_path / "relay-store")
    relay_store.write_epochs(_marks([(0, 0, 10), (1, 5, 20), (2, 20, 30), (3, 30, 40)]))
    clock, calls = _counting_clock()
    relay = MarkRelay(RID, str(relay_store.root), node="n1", clock=clock)

    with caplog.at_level(logging.WARNING, logger="cluster.runner"):
        assert relay.forward() == 3  # 0 (no change), 2 and 3
    held = Store(agg["root"]).epochs(RID).sort("epoch")
    assert held["epoch"].to_list() == [0, 1, 2, 3]
    assert held["start"].to_list() == [at(0), at(10), at(20), at(30)]  # epoch 1 kept its start
    assert (relay.sent, relay.refused) == (3, 1)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert "epoch 1" in refusals[0] and "is marked already" in refusals[0]
    assert "Traceback" not in refusals[0]  # the aggregator's reason, not Ray's wrapper

    # The refused mark is not sent again: no ingest call at all (one clock read per call).
    n_calls = len(calls)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.runner"):
        assert relay.forward() == 0
        assert relay.forward(final=True) == 0
    assert len(calls) == n_calls
    assert relay.refused == 1 and not caplog.records

    # The store's copy of epoch 1 corrected: a new mark, tried and taken.
    relay_store.write_epochs(_marks([(1, 10, 20)]))
    assert relay.forward() == 1
    assert len(calls) == n_calls + 1
    assert (relay.sent, relay.refused) == (4, 1)


def test_only_the_aggregators_bad_input_counts_as_a_refusal() -> None:
    """A timeout or a lost actor is transient (marks resent next forward), never a refusal."""
    ray = pytest.importorskip("ray")

    from cluster.runner import MarkRelay
    from profiler.errors import BadInputError, SchemaError

    bad = BadInputError("run 'r' has ended")
    wrapped = ray.exceptions.RayTaskError("ingest_epochs", "Traceback ...", bad)
    assert MarkRelay._refusal(wrapped) is bad
    assert MarkRelay._refusal(wrapped.as_instanceof_cause()) is bad
    assert isinstance(MarkRelay._refusal(SchemaError("no column 'end'")), SchemaError)
    other = ray.exceptions.RayTaskError("ingest_epochs", "Traceback ...", OSError("disk full"))
    for err in (ray.exceptions.GetTimeoutError("10 s"), ray.exceptions.RayActorError(), other):
        assert MarkRelay._refusal(err) is None
