"""Placement hints: a job's node type as Ray options, a label selector and a k8s nodeSelector.

The hints for one node type come from :func:`estimators.recommend.placement`
(resource request ``{"node_type:<name>": 0.001}``, ``accelerator_type``,
label selector ``{"ray.io/accelerator-type": ...}``, nodeSelector
``{"nvidia.com/gpu.product": ...}``; a CPU node type gets no selectors, and a
GPU described by its numbers only those its inventory entry gives), the same
hints :class:`estimators.recommend.Recommendation` carries. This module adds
where the node types come from (an inventory file or the live Ray cluster's
resources and labels) and which one to pick (the PRE recommendation, else the
named or default one).

A Ray node's type is its ``node_type:<name>`` custom resource (``ray start
--resources '{"node_type:gpu-a100": 1}'``); its GPU model is Ray's own
``accelerator_type:<X>`` resource or ``ray.io/accelerator-type`` label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from estimators.recommend import NodeType, is_cpu, is_label_value, placement
from profiler.errors import BadInputError

if TYPE_CHECKING:
    from estimators.features import JobDescription
    from estimators.pre import PREModel

NODE_TYPE_PREFIX = "node_type:"
ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_LABEL = "ray.io/accelerator-type"


def node_type_of(node: Mapping[str, Any]) -> str | None:
    """The node type of a ``ray.nodes()`` record (its ``node_type:<name>`` resource), if any."""
    for res in node.get("Resources") or {}:
        if res.startswith(NODE_TYPE_PREFIX):
            return str(res[len(NODE_TYPE_PREFIX) :])
    return None


def accelerator_of(node: Mapping[str, Any]) -> str | None:
    """The GPU model of a ``ray.nodes()`` record: ``accelerator_type:<X>`` resource, else label."""
    for res in node.get("Resources") or {}:
        if res.startswith(ACCELERATOR_PREFIX):
            return str(res[len(ACCELERATOR_PREFIX) :])
    labels = node.get("Labels") or {}
    value = labels.get(ACCELERATOR_LABEL)
    return None if value is None else str(value)


def node_types(nodes: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Node types of a cluster from ``ray.nodes()`` records.

    Returns:
        Name -> ``{"alive": [node ids], "dead": [node ids], "gpu_model": str | None,
        "gpus": GPUs per node (float)}``, sorted by name.

    """
    out: dict[str, dict[str, Any]] = {}
    for n in nodes:
        name = node_type_of(n)
        if name is None:
            continue
        entry = out.setdefault(name, {"alive": [], "dead": [], "gpu_model": None, "gpus": 0.0})
        entry["alive" if n.get("Alive") else "dead"].append(n["NodeID"])
        entry["gpu_model"] = entry["gpu_model"] or accelerator_of(n)
        entry["gpus"] = max(entry["gpus"], float((n.get("Resources") or {}).get("GPU", 0.0)))
    return dict(sorted(out.items()))


def check_node_type(name: str, types: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The alive node ids of node type ``name``.

    Raises:
        BadInputError: Unknown node type, or none of its nodes is alive; the
            message lists the known node types and how to add one.

    """
    known = {k: len(v["alive"]) for k, v in types.items()}
    listing = ", ".join(f"{k} ({n} alive)" for k, n in known.items()) or "none"
    if name not in types:
        raise BadInputError(
            f"unknown node type {name!r}; this Ray cluster's node types: {listing}. A node "
            f"gets a type from its resources: ray start --resources "
            f"'{{\"{NODE_TYPE_PREFIX}{name}\": 1}}'"
        )
    alive = list(types[name]["alive"])
    if not alive:
        raise BadInputError(
            f"node type {name!r} has no alive nodes (its {len(types[name]['dead'])} node(s) "
            f"are dead); node types: {listing}"
        )
    return alive


def inventory_from_ray(nodes: Iterable[Mapping[str, Any]]) -> list[NodeType]:
    """Node types with alive nodes and a known GPU model, as an inventory for the recommender.

    Each keeps the accelerator type Ray reports (its ``accelerator_type:<X>``
    resource or label) for its placement hints, so they select on what Ray
    itself calls the GPU.

    Raises:
        BadInputError: No node type has a GPU model (``accelerator_type:<X>``
            resource or ``ray.io/accelerator-type`` label).

    """
    types = node_types(nodes)
    inv = [
        NodeType(
            name=k,
            gpu_model=v["gpu_model"],
            gpu_count=max(int(v["gpus"]), 1),
            # Ray's own name for the GPU, where it can be a label selector's value.
            accelerator_type=v["gpu_model"] if is_label_value(v["gpu_model"]) else None,
            # Ray's name ("A100") is not GPU feature discovery's product label
            # ("NVIDIA-A100-SXM4-80GB"): no nodeSelector no node would match.
            gpu_product="",
        )
        for k, v in types.items()
        if v["alive"] and v["gpu_model"]
    ]
    if not inv:
        raise BadInputError(
            f"no node type of this Ray cluster names its GPU model (node types: "
            f"{sorted(types) or 'none'}); give the nodes an '{ACCELERATOR_PREFIX}<model>' "
            f"resource or '{ACCELERATOR_LABEL}' label, or pass --inventory FILE"
        )
    return inv


def ray_options(hints: Mapping[str, Any], *, num_cpus: float = 1.0) -> dict[str, Any]:
    """Keyword arguments for ``.options()`` of a Ray task or actor that follow ``hints``.

    The node-type resource request alone pins the node type; the label
    selector is left to Ray versions that schedule on labels.
    """
    num_gpus = float(hints.get("num_gpus") or 0) if hints.get("gpu") else 0.0
    return {"resources": dict(hints["ray_resources"]), "num_cpus": num_cpus, "num_gpus": num_gpus}


def hints_for(node: NodeType) -> dict[str, Any]:
    """Hints for one node type: :func:`estimators.recommend.placement` plus Ray options.

    A CPU node type (see :func:`estimators.recommend.is_cpu`) has no accelerator
    to select on: its hints are :func:`simple_hints`, the node-type resource alone
    and no GPUs (:func:`estimators.recommend.placement` gives it the same).
    """
    if is_cpu(node.gpu_model):
        return simple_hints(node.name)
    out = placement(node)
    out["gpu"] = True
    out["ray_options"] = ray_options(out)
    return out


def simple_hints(node_type: str) -> dict[str, Any]:
    """Hints for a node type whose GPU model is unknown: the node-type resource only."""
    hints: dict[str, Any] = {
        "node_type": node_type,
        "ray_resources": {f"{NODE_TYPE_PREFIX}{node_type}": 0.001},
        "accelerator_type": None,
        "label_selector": {},
        "k8s_node_selector": {},
        "num_gpus": 0,
        "gpu": False,
    }
    hints["ray_options"] = ray_options(hints)
    return hints


def recommend_hints(
    job: JobDescription,
    inventory: list[NodeType],
    model: PREModel | None = None,
    *,
    objective: str = "energy",
    node_type: str | None = None,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """Placement hints for ``job``: the PRE recommendation, or a named/default node type.

    Args:
        job: The job.
        inventory: Candidate node types.
        model: A fitted PRE model; without one the named node type, else the
            inventory's default (else its first) is used, and said so.
        objective: ``energy``, ``cost`` or ``carbon`` (with a model).
        node_type: Use this node type instead of recommending.
        deadline_s: Longest acceptable training time in s (with a model): node
            types that meet it rank first (see :func:`estimators.recommend.recommend`).

    Returns:
        The hints (see :func:`hints_for`) plus ``source`` (why this node type)
        and, with a model, ``recommendation`` (the ranking as JSON),
        ``predicted_energy_j`` (the chosen node type's per-epoch energy times
        the planned epochs, else one epoch), ``epochs`` (the planned epochs,
        ``None`` if not given) and ``reference_epochs`` (without them, the
        median length of the runs PRE was trained on; see :func:`length_note`).

    Raises:
        BadInputError: An unknown named node type, an empty inventory, or a
            model and a node type whose ``gpu_model`` is just ``cpu`` (PRE needs
            its numbers; name it, or describe it as a spec with ``kind: cpu``).

    """
    from estimators.recommend import recommend

    if not inventory:
        raise BadInputError("placement needs at least one node type; the inventory is empty")
    by_name = {n.name: n for n in inventory}
    if node_type is not None:
        if node_type not in by_name:
            raise BadInputError(
                f"unknown node type {node_type!r}; the inventory has {sorted(by_name)}"
            )
        return {**hints_for(by_name[node_type]), "source": "named"}
    if model is None:
        chosen = next((n for n in inventory if n.default), inventory[0])
        return {
            **hints_for(chosen),
            "source": "default node type (no PRE model yet: run 'wattwise retrain')",
        }
    bare_cpu = [n.name for n in inventory if isinstance(n.gpu_model, str) and is_cpu(n.gpu_model)]
    if bare_cpu:
        raise BadInputError(
            f"PRE cannot rank node type {bare_cpu[0]!r}: its gpu_model is just 'cpu', without "
            'the numbers PRE predicts from; describe it as a spec, e.g. {"kind": "cpu", '
            '"gpu_board_power_w": ..., "gpu_fp32_tflops": ..., ...} (as the demo does), '
            f"or pick a node type with --node-type (CPU node types: {bare_cpu})"
        )
    rec = recommend(
        model,
        job,
        inventory,
        objective=objective,  # type: ignore[arg-type]
        deadline_s=deadline_s,
    )
    best = rec.table.row(0, named=True)
    return {
        **hints_for(by_name[rec.chosen]),
        "source": "predicted (PRE)",
        "predicted_energy_j": float(best["epoch_energy_j"]) * float(job.planned_epochs or 1),
        "epochs": rec.epochs,
        "reference_epochs": rec.reference_epochs,
        "recommendation": rec.to_json(),
    }


def length_note(hints: Mapping[str, Any]) -> str:
    """The run length ``predicted_energy_j`` of :func:`recommend_hints` is for, in words.

    ``120 epochs`` with planned epochs; else ``1 epoch, length unknown (trained runs:
    median 45); give --epochs`` (PRE's model without the length answered, for runs
    like those it was trained on) or ``1 epoch; give --epochs``.
    """
    epochs, reference = hints.get("epochs"), hints.get("reference_epochs")
    if epochs is not None:
        return f"{epochs} epoch{'' if epochs == 1 else 's'}"
    if reference is not None:
        return f"1 epoch, length unknown (trained runs: median {float(reference):g}); give --epochs"
    return "1 epoch; give --epochs"
