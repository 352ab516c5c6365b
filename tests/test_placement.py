"""Placement hints from node-type resources and inventories (no Ray cluster needed)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.placement import (
    check_node_type,
    hints_for,
    inventory_from_ray,
    node_types,
    recommend_hints,
    simple_hints,
)
from estimators.features import JobDescription
from estimators.recommend import NodeType, placement
from profiler.errors import BadInputError


def _node(node_id: str, alive: bool, **resources: float) -> dict[str, Any]:
    """A ``ray.nodes()`` record with the fields placement reads."""
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": 1.0, **resources}}


NODES = [
    _node("h", True),  # the head: no node type
    _node("a1", True, **{"node_type:gpu-a": 1.0, "accelerator_type:A100": 1.0, "GPU": 2.0}),
    _node("a2", False, **{"node_type:gpu-a": 1.0}),
    _node("t1", True, **{"node_type:gpu-t4": 1.0, "accelerator_type:T4": 1.0, "GPU": 1.0}),
    _node("c1", False, **{"node_type:cpu": 1.0}),
]


def test_node_types_group_alive_and_dead_nodes_by_their_resource() -> None:
    types = node_types(NODES)
    assert list(types) == ["cpu", "gpu-a", "gpu-t4"]
    assert types["gpu-a"]["alive"] == ["a1"] and types["gpu-a"]["dead"] == ["a2"]
    assert types["gpu-a"]["gpu_model"] == "A100" and types["gpu-a"]["gpus"] == 2.0
    assert types["cpu"]["alive"] == [] and types["cpu"]["gpu_model"] is None


def test_a_label_names_the_gpu_when_no_accelerator_resource_does() -> None:
    rec = _node("l1", True, **{"node_type:l4": 1.0})
    rec["Labels"] = {"ray.io/accelerator-type": "L4"}
    assert node_types([rec])["l4"]["gpu_model"] == "L4"


def test_unknown_node_type_lists_the_known_ones() -> None:
    with pytest.raises(BadInputError, match=r"unknown node type 'gpu-h100'.*gpu-a \(1 alive\)"):
        check_node_type("gpu-h100", node_types(NODES))
    assert check_node_type("gpu-t4", node_types(NODES)) == ["t1"]


def test_a_node_type_whose_nodes_are_all_dead_is_refused() -> None:
    with pytest.raises(BadInputError, match=r"node type 'cpu' has no alive nodes \(its 1 node"):
        check_node_type("cpu", node_types(NODES))


def test_inventory_from_ray_keeps_alive_types_with_a_gpu_model() -> None:
    inv = inventory_from_ray(NODES)
    assert [(n.name, n.gpu_model, n.gpu_count) for n in inv] == [
        ("gpu-a", "A100", 2),
        ("gpu-t4", "T4", 1),
    ]
    with pytest.raises(BadInputError, match="names its GPU model"):
        inventory_from_ray([_node("x", True, **{"node_type:cpu": 1.0})])


def test_hints_reuse_the_recommender_placement_and_add_ray_options() -> None:
    node = NodeType(name="gpu-a", gpu_model="NVIDIA A100-SXM4-80GB", gpu_count=2)
    hints = hints_for(node)
    base = placement(node)
    assert {k: hints[k] for k in base} == base
    assert hints["ray_resources"] == {"node_type:gpu-a": 0.001}
    assert hints["label_selector"] == {"ray.io/accelerator-type": "A100"}
    assert hints["k8s_node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert hints["ray_options"] == {
        "resources": {"node_type:gpu-a": 0.001},
        "num_cpus": 1.0,
        "num_gpus": 2.0,
    }


def test_simple_hints_request_only_the_node_type_resource() -> None:
    hints = simple_hints("sim-a")
    assert hints["ray_options"] == {
        "resources": {"node_type:sim-a": 0.001},
        "num_cpus": 1.0,
        "num_gpus": 0.0,
    }


JOB = JobDescription(
    architecture="resnet18",
    batch_size=32,
    training_size=1000,
    image_height=32,
    image_width=32,
    planned_epochs=5,
)
INVENTORY = [
    NodeType(name="gpu-t4", gpu_model="T4"),
    NodeType(name="gpu-a", gpu_model="A100", default=True),
]


def test_without_a_model_the_default_node_type_is_used_and_said_so() -> None:
    hints = recommend_hints(JOB, INVENTORY, None)
    assert hints["node_type"] == "gpu-a"
    assert hints["source"].startswith("default node type (no PRE model")
    named = recommend_hints(JOB, INVENTORY, None, node_type="gpu-t4")
    assert (named["node_type"], named["source"]) == ("gpu-t4", "named")
    with pytest.raises(BadInputError, match=r"unknown node type 'v100'; the inventory has"):
        recommend_hints(JOB, INVENTORY, None, node_type="v100")


def test_placement_cli_prints_json_hints_from_an_inventory_file(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from cluster.cli import main

    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps([{"name": "gpu-t4", "gpu_model": "T4", "default": True}]))
    rc = main(["placement", "--arch", "resnet18", "--inventory", str(inv), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["node_type"] == "gpu-t4"
    assert out["ray_resources"] == {"node_type:gpu-t4": 0.001}
    assert out["label_selector"] == {"ray.io/accelerator-type": "T4"}


CPU_INVENTORY = [
    {"name": "cpu-pool", "gpu_model": "cpu", "default": True},
    {"name": "g", "gpu_model": "RTX 3090"},
]
#: What a CPU node type is placed with: its node-type resource, no accelerator to select on.
CPU_HINTS = {
    "node_type": "cpu-pool",
    "ray_resources": {"node_type:cpu-pool": 0.001},
    "accelerator_type": None,
    "label_selector": {},
    "k8s_node_selector": {},
    "num_gpus": 0,
    "gpu": False,
    "ray_options": {"resources": {"node_type:cpu-pool": 0.001}, "num_cpus": 1.0, "num_gpus": 0.0},
}


@pytest.mark.parametrize("model", ["cpu", "CPU", {"name": "modelled CPU", "kind": "cpu"}])
def test_a_cpu_node_type_gets_hints_without_an_accelerator(model: Any) -> None:
    assert hints_for(NodeType(name="cpu-pool", gpu_model=model)) == CPU_HINTS


@pytest.mark.parametrize("named", [True, False])
def test_placement_cli_places_on_a_cpu_node_type_named_or_default(
    named: bool, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from cluster.cli import main

    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps(CPU_INVENTORY))
    argv = ["placement", "--arch", "resnet18", "--inventory", str(inv), "--json"]
    rc = main(argv + (["--node-type", "cpu-pool"] if named else []))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    source = out.pop("source")
    assert source == "named" if named else source.startswith("default node type (no PRE model")
    assert out == CPU_HINTS
    # the human-readable form says the same
    assert main(argv[:-1] + (["--node-type", "cpu-pool"] if named else [])) == 0
    text = capsys.readouterr().out
    assert "node type: cpu-pool" in text and "k8s nodeSelector: {}" in text


def test_pre_refuses_a_cpu_node_type_it_has_no_numbers_for() -> None:
    from estimators.pre import PREModel
    from tests.test_pre import SMALL, synthetic

    model = PREModel(**SMALL).fit(synthetic(4, 5, sigma=0.02, seed=5))
    inv = [NodeType(name="cpu-pool", gpu_model="cpu"), NodeType(name="g", gpu_model="RTX 3090")]
    with pytest.raises(
        BadInputError, match=r"node type 'cpu-pool'.*'cpu'.*\"kind\": \"cpu\".*--node-type"
    ):
        recommend_hints(JOB, inv, model)
    # naming it needs no prediction
    assert recommend_hints(JOB, inv, model, node_type="cpu-pool")["gpu"] is False
