"""Probes: one short run per node type in parallel, stopped early, projected and ranked."""

from __future__ import annotations

from typing import Any

import pytest
from test_runner import SIDECAR, TINY, WATTWISE, ray_cluster  # noqa: F401 - a fixture

from cluster.probe import format_probe, probe
from profiler.errors import BadInputError

PLANNED = 200  # more than a 25 s probe can train, even on a quiet machine (0.3 s per epoch)


@pytest.mark.slow
def test_probes_on_two_node_types_stop_early_project_and_recommend(
    ray_cluster: dict[str, Any],  # noqa: F811 - the fixture imported above
) -> None:
    import json

    from profiler.store import Store

    result = probe(
        [WATTWISE, "train", *TINY, "--epochs", str(PLANNED)],
        time_limit_s=25.0,
        store_root=ray_cluster["store"],
        sidecar_options=SIDECAR,
    )
    rows = {r["node_type"]: r for r in result["node_types"]}
    assert sorted(rows) == ["gpu-a", "gpu-b"] and result["planned_epochs"] == PLANNED
    store = Store(ray_cluster["store"])
    for kind, r in rows.items():
        assert r.get("stopped_by") in ("stable", "time limit"), r
        assert r["status"] == "finished"
        assert 1 <= r["epochs_done"] < PLANNED, r
        # The full run is projected beyond what the short probe measured.
        assert r["projected_energy_j"] > r["measured_energy_j"] > 0, r
        assert r["lower_j"] <= r["projected_energy_j"] <= r["upper_j"], r
        run = store.run(r["run_id"])
        assert run["status"] == "finished" and run["node_type"] == kind
        assert run["trained_epochs"] == r["epochs_done"] and run["planned_epochs"] == PLANNED
        assert json.loads(str(run["config"]))["probe"] is True  # kept as PRE training data
    rec = result["recommendation"]
    ranked = sorted(rows.values(), key=lambda r: (not r["stable"], r["projected_energy_j"]))
    assert rec["node_type"] == ranked[0]["node_type"]
    assert f"recommended: {rec['node_type']}" in format_probe(result)


@pytest.mark.slow
def test_a_probe_needs_the_planned_epochs(ray_cluster: dict[str, Any]) -> None:  # noqa: F811
    with pytest.raises(BadInputError, match="needs the planned epochs; pass --epochs N"):
        probe(["python", "train.py"], store_root=ray_cluster["store"])
    with pytest.raises(BadInputError, match="unknown node type 'gpu-q'"):
        probe(["python", "train.py"], node_types=["gpu-q"], epochs=3)


# ------------------------------------------------- probe outcomes, with Ray's part replaced


def _ray_node(node_id: str, node_type: str) -> dict[str, Any]:
    """A ``ray.nodes()`` record of an alive node of ``node_type`` with one T4."""
    return {
        "NodeID": node_id,
        "Alive": True,
        "Resources": {"CPU": 8.0, "GPU": 1.0, f"node_type:{node_type}": 1.0},
    }


def test_a_crashed_probe_has_no_projection_and_is_not_stable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cluster.runner as runner
    from cluster.placement import node_types
    from cluster.runner import RunResult

    nodes = [_ray_node("a" * 56, "gpu-a"), _ray_node("b" * 56, "gpu-b")]
    monkeypatch.setattr(runner, "cluster_node_types", lambda: node_types(nodes))

    def run_job(command: list[str], *, node_type: str, **kw: Any) -> RunResult:
        """Stands in for the Ray actor: gpu-a crashes after 2 of 30 epochs (CUDA OOM)."""
        if node_type == "gpu-a":
            summary = {"epochs_done": 2, "measured_energy_j": 8400.0, "duration_s": 125.0}
            return RunResult("a1", node_type, "a" * 56, "failed", 1, False, summary)
        kw["stop_when"](
            {
                "epochs_done": 5,
                "projection": {
                    "energy_j": 126_000.0,
                    "lower_j": 120_000.0,
                    "upper_j": 133_000.0,
                    "stable": True,
                },
            }
        )
        summary = {"epochs_done": 5, "measured_energy_j": 21_000.0, "duration_s": 300.0}
        return RunResult("b1", node_type, "b" * 56, "finished", 0, True, summary)

    monkeypatch.setattr(runner, "run_job", run_job)
    result = probe(["python", "train.py"], epochs=30)
    rows = {r["node_type"]: r for r in result["node_types"]}
    crashed = rows["gpu-a"]
    assert crashed["status"] == "failed" and crashed["stopped_by"] == "failed"
    assert crashed["measured_energy_j"] == 8400.0  # what it measured is still shown
    assert crashed["projected_energy_j"] is None and crashed["stable"] is False
    assert crashed["lower_j"] is None and crashed["upper_j"] is None
    assert "failed (exit status 1) after 2 of the 30 planned epochs" in crashed["reason"]
    assert rows["gpu-b"]["projected_energy_j"] == 126_000.0 and rows["gpu-b"]["stable"]
    assert result["recommendation"]["node_type"] == "gpu-b"
    text = format_probe(result)
    crashed_line = "gpu-a: run a1, 2 epochs (failed), measured 8400 J, projected n/a, not stable: "
    assert crashed_line + "the probe failed" in text
    assert "projected 8400 J" not in text


def test_a_node_type_whose_result_cannot_be_read_is_reported_not_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: an exception after run_job returned (here: the aggregator's summary
    was missing) ended that node type's thread, and the node type vanished from the output."""
    import cluster.runner as runner
    from cluster.placement import node_types
    from cluster.runner import RunResult

    nodes = [_ray_node("a" * 56, "gpu-a"), _ray_node("b" * 56, "gpu-b")]
    monkeypatch.setattr(runner, "cluster_node_types", lambda: node_types(nodes))

    def run_job(command: list[str], *, node_type: str, **kw: Any) -> RunResult:
        summary = {"epochs_done": 30, "measured_energy_j": 9000.0, "duration_s": 60.0}
        if node_type == "gpu-a":
            summary = None  # type: ignore[assignment]
        return RunResult(f"{node_type}-run", node_type, "a" * 56, "finished", 0, False, summary)

    monkeypatch.setattr(runner, "run_job", run_job)
    result = probe(["python", "train.py"], epochs=30)
    rows = {r["node_type"]: r for r in result["node_types"]}
    assert set(rows) == {"gpu-a", "gpu-b"}
    assert rows["gpu-a"]["status"] == "error" and "AttributeError" in rows["gpu-a"]["error"]
    assert result["recommendation"]["node_type"] == "gpu-b"
