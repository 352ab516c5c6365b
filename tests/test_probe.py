"""Probes: one short run per node type in parallel, stopped early, projected and ranked."""

from __future__ import annotations

from typing import Any

import pytest
from test_runner import SIDECAR, TINY, WATTWISE, ray_cluster  # noqa: F401 - a fixture

from cluster.probe import format_probe
from profiler.errors import BadInputError

pytestmark = pytest.mark.slow
PLANNED = 40


def test_probes_on_two_node_types_stop_early_project_and_recommend(
    ray_cluster: dict[str, Any],  # noqa: F811 - the fixture imported above
) -> None:
    import json

    from cluster.probe import probe
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


def test_a_probe_needs_the_planned_epochs(ray_cluster: dict[str, Any]) -> None:  # noqa: F811
    from cluster.probe import probe

    with pytest.raises(BadInputError, match="needs the planned epochs; pass --epochs N"):
        probe(["python", "train.py"], store_root=ray_cluster["store"])
    with pytest.raises(BadInputError, match="unknown node type 'gpu-q'"):
        probe(["python", "train.py"], node_types=["gpu-q"], epochs=3)
