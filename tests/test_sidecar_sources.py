"""Which sources a node's sidecar opens, and how a sidecar that cannot start is reported (no Ray).

Regression: ``wattwise aggregator start --sidecars nvml`` (deploy/kuberay) put an
NVML sidecar on the CPU-only head too; there ``open_source("nvml")`` raised in
the actor's ``__init__`` and :meth:`SidecarManager.reconcile` restarted it every
10 s for ever, warning each time.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import pytest

from cluster.actors import SidecarManager, SourceSpec, init_failure_reason, sources_for_node
from profiler.errors import SourceUnavailableError

#: ``ray.nodes()[i]["Resources"]`` of the KubeRay head (num-cpus 0) and an L4 worker.
HEAD = {"memory": 8.0e9, "object_store_memory": 2.0e9, "node:10.0.0.2": 1.0}
HEAD["node:__internal_head__"] = 1.0
L4 = {"CPU": 8.0, "GPU": 1.0, "memory": 3.2e10, "node:10.0.0.7": 1.0}
L4["accelerator_type:L4"] = 1.0


@pytest.mark.parametrize(
    ("resources", "requested", "use", "left_out"),
    [
        (HEAD, [("nvml", {})], [], ["nvml"]),
        (L4, [("nvml", {})], ["nvml"], []),
        (
            {"GPU": 0.0, "CPU": 4.0},
            [("dcgm", {}), ("dcgm-exporter", {})],
            [],
            ["dcgm", "dcgm-exporter"],
        ),
        (HEAD, [("nvml", {}), ("rapl", {})], ["rapl"], ["nvml"]),
        (L4, [("nvml", {}), ("rapl", {})], ["nvml", "rapl"], []),
        (HEAD, [("modelled", {}), ("replay", {})], ["modelled", "replay"], []),
        ({}, [], [], []),
    ],
)
def test_gpu_sources_only_where_ray_sees_gpus(
    resources: dict[str, float], requested: list[SourceSpec], use: list[str], left_out: list[str]
) -> None:
    got_use, got_left_out = sources_for_node(resources, requested)
    assert [s[0] for s in got_use] == use
    assert [s[0] for s in got_left_out] == left_out


def test_kwargs_travel_with_the_source() -> None:
    use, _ = sources_for_node(L4, [("dcgm", {"url": "http://prom:9090"}), ("rapl", {})])
    assert use == [("dcgm", {"url": "http://prom:9090"}), ("rapl", {})]


def _nodes() -> list[dict[str, Any]]:
    return [
        {"NodeID": "a" * 56, "Alive": True, "Resources": HEAD},
        {"NodeID": "b" * 56, "Alive": True, "Resources": L4},
    ]


def test_cpu_head_gets_no_nvml_sidecar_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """The KubeRay deployment's case: ``--sidecars nvml`` with a CPU-only head."""
    mgr = SidecarManager([("nvml", {})])
    head, l4 = _nodes()
    with caplog.at_level(logging.INFO, logger="cluster.actors"):
        for _ in range(3):  # three reconciles
            assert mgr.plan(head, "head") == []
            assert mgr.plan(l4, "l4") == [("nvml", {})]
    notes = [r for r in caplog.records if "head" in r.getMessage()]
    assert len(notes) == 1
    assert notes[0].levelno == logging.INFO
    assert "not opening nvml" in notes[0].getMessage()
    assert "no sidecar on this node" in notes[0].getMessage()
    assert mgr.skipped == {head["NodeID"]: ["nvml"]}


def test_plan_filters_a_callable_too() -> None:
    mgr = SidecarManager(lambda node: [("nvml", {}), ("modelled", {"board_power_w": 65.0})])
    head, l4 = _nodes()
    assert mgr.plan(head, "head") == [("modelled", {"board_power_w": 65.0})]
    assert mgr.plan(l4, "l4") == [("nvml", {}), ("modelled", {"board_power_w": 65.0})]


def _init_failed(exc: Exception) -> Exception:
    """The error Ray raises on calling an actor whose ``__init__`` raised ``exc``."""
    from ray.exceptions import ActorDiedError, RayTaskError

    try:
        raise exc
    except Exception as err:
        task_error = RayTaskError(
            "_SidecarActorImpl.__init__", traceback.format_exc(), err, pid=4242, ip="10.0.0.7"
        )
    return ActorDiedError(task_error)


def test_init_failure_reason_is_the_source_error() -> None:
    pytest.importorskip("ray")
    err = _init_failed(SourceUnavailableError("NVML: the driver is loaded but sees no GPU"))
    assert init_failure_reason(err) == (
        "profiler.errors.SourceUnavailableError: NVML: the driver is loaded but sees no GPU"
    )
    from ray.exceptions import ActorDiedError

    assert init_failure_reason(ActorDiedError()) is None  # died otherwise: restart it
    assert init_failure_reason(TimeoutError("no answer")) is None


def test_start_failure_warns_once_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    mgr = SidecarManager([("nvml", {})], retry_s=60.0, max_retry_s=200.0)
    node = "b" * 56
    reason = "profiler.errors.SourceUnavailableError: NVML: the driver is loaded but sees no GPU"
    with caplog.at_level(logging.DEBUG, logger="cluster.actors"):
        delays = [mgr.note_start_failure(node, "l4", reason).delay_s for _ in range(4)]
    assert delays == [60.0, 120.0, 200.0, 200.0]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert reason in warnings[0].getMessage() and "l4" in warnings[0].getMessage()
    assert mgr.failed[node].tries == 4
    assert mgr.restarts == 0  # a source that will not open is not a crash to restart
    # A different reason is news: warned again.
    with caplog.at_level(logging.WARNING, logger="cluster.actors"):
        mgr.note_start_failure(node, "l4", "PermissionDeniedError: NVML: no permission")
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
