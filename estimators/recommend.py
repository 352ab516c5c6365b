"""Rank a cluster's node types for a job by predicted energy, cost or carbon, with placement hints.

For each node type of an inventory PRE predicts per-epoch energy and time
(with intervals); totals are per-epoch figures times the planned epochs. The
ranking objective is energy (default), cost (price per hour times time) or
carbon (energy times the node type's grid intensity); with a deadline, node
types whose predicted total time exceeds it rank after all that meet it.

Inventory JSON: a list of node types, or ``{"node_types": [...]}``; each::

    {"name": "gpu-a100", "gpu_model": "NVIDIA A100-SXM4-80GB", "gpu_count": 1,
     "price_per_hour": 3.2, "carbon_g_per_kwh": 350, "default": true,
     "gpu_product": "NVIDIA-A100-SXM4-80GB"}

``gpu_model`` may instead be an object describing an unknown card by its
numbers (the keys of :data:`estimators.features.GPU_COLUMNS` and ``name``;
``gpu_generation`` as a name such as ``"ampere"`` or its index). Prices and
carbon intensities are numbers >= 0, ``gpu_count`` an integer > 0, the GPU's
numbers > 0; anything else is refused with the file, node type and key.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from estimators.features import (
    JobDescription,
    complete_job,
    feature_frame,
    gpu_key,
    is_number,
    user_gpu_columns,
)
from profiler.errors import BadInputError

if TYPE_CHECKING:
    from estimators.pre import PREModel

Objective = Literal["energy", "cost", "carbon"]


@dataclass(frozen=True, slots=True)
class NodeType:
    """One node type of a cluster inventory.

    Attributes:
        name: Node type name (Ray ``node_type:<name>`` resource, k8s pool).
        gpu_model: GPU name as ``nvidia-smi`` prints it, or a dict of numbers.
        gpu_count: GPUs the job would use on it.
        price_per_hour: Price of the node per hour (any currency), if known.
        carbon_g_per_kwh: Grid carbon intensity in gCO2e/kWh, if known.
        default: Whether jobs land here when nobody chooses.
        gpu_product: Value of the k8s ``nvidia.com/gpu.product`` label, if known.

    """

    name: str
    gpu_model: Any
    gpu_count: int = 1
    price_per_hour: float | None = None
    carbon_g_per_kwh: float | None = None
    default: bool = False
    gpu_product: str | None = None


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A ranking of node types for one job.

    Attributes:
        table: One row per node type, best first (see :func:`recommend`).
        chosen: Name of the best node type.
        objective: What was minimised.
        savings_vs_worst_pct: Saving of the objective against the worst node type, in %.
        savings_vs_default_pct: Saving against the default node type, in %
            (null without a default).
        placement: Scheduler hints for the chosen node type.
        epochs: The planned epochs the totals are for; ``None`` when the job
            gave none (totals are then for one epoch).
        reference_epochs: Without ``epochs``, the median length of the runs PRE
            was trained on (its model without the length then answers, for runs
            like those; ``None`` when its runs had none); ``None`` when
            ``epochs`` is given.

    """

    table: pl.DataFrame
    chosen: str
    objective: str
    savings_vs_worst_pct: float
    savings_vs_default_pct: float | None
    placement: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    reference_epochs: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (the table as a list of rows, and the run length the figures assume)."""
        return {
            "chosen": self.chosen,
            "objective": self.objective,
            "savings_vs_worst_pct": self.savings_vs_worst_pct,
            "savings_vs_default_pct": self.savings_vs_default_pct,
            "placement": self.placement,
            "node_types": self.table.to_dicts(),
            "source": "predicted (PRE, conformal interval)",
            "epochs": self.epochs,
            "reference_epochs": self.reference_epochs,
        }


def load_inventory(path: str | Path) -> list[NodeType]:
    """Read an inventory JSON file (see the module docstring).

    Raises:
        BadInputError: Missing file, bad JSON, or a node type without
            ``name`` or ``gpu_model``.

    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: expected an inventory JSON file; no such file")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{p}: expected JSON; {err}") from err
    return parse_inventory(raw, file=str(p))


def parse_inventory(raw: Any, *, file: str = "inventory") -> list[NodeType]:
    """Node types from parsed inventory JSON.

    Raises:
        BadInputError: Not a non-empty list of objects with ``name`` and
            ``gpu_model``, an unknown key, repeated names, or a value of the
            wrong type or sign (see :func:`check_node_type`).

    """
    items = raw.get("node_types") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise BadInputError(
            f"{file}: expected a non-empty list of node types (or {{'node_types': [...]}})"
        )
    allowed = set(NodeType.__dataclass_fields__)
    out = []
    for i, it in enumerate(items, start=1):
        if not isinstance(it, dict) or "name" not in it or "gpu_model" not in it:
            raise BadInputError(
                f"{file}, node type {i}: expected an object with 'name' and 'gpu_model'; "
                f"found {it!r}"
            )
        extra = set(it) - allowed
        if extra:
            raise BadInputError(
                f"{file}, node type {it['name']!r}: unknown key(s) {sorted(extra)}; "
                f"known keys {sorted(allowed)}"
            )
        node = NodeType(**it)
        check_node_type(node, file=file, index=i)
        out.append(node)
    names = [n.name for n in out]
    if len(set(names)) != len(names):
        raise BadInputError(f"{file}: node type names must be unique; found {names}")
    return out


def check_node_type(node: NodeType, *, file: str = "inventory", index: int | None = None) -> None:
    """Refuse a node type whose values have the wrong type or sign.

    Args:
        node: The node type.
        file: Where it comes from, for messages.
        index: Its 1-based place in the inventory, named when the name itself is bad.

    Raises:
        BadInputError: ``name`` not a non-empty string; ``gpu_model`` neither a
            non-empty string nor an object (or an object with a GPU number that
            is not > 0, see :func:`estimators.features.user_gpu_columns`);
            ``gpu_count`` not an integer > 0; ``price_per_hour`` or
            ``carbon_g_per_kwh`` not a number >= 0; ``default`` not a bool;
            ``gpu_product`` not a string. The message names the file, the node
            type, the key, what was expected and what was found.

    """
    if not isinstance(node.name, str) or not node.name.strip():
        at = f"node type {index}" if index is not None else "a node type"
        raise BadInputError(f"{file}, {at}: name: expected a non-empty string; found {node.name!r}")

    def bad(key: str, expected: str) -> BadInputError:
        found = getattr(node, key)
        return BadInputError(
            f"{file}, node type {node.name!r}: {key}: expected {expected}; found {found!r}"
        )

    gm = node.gpu_model
    if isinstance(gm, Mapping):
        try:
            user_gpu_columns(gm)
        except BadInputError as err:
            raise BadInputError(f"{file}, node type {node.name!r}: gpu_model: {err}") from err
    elif not isinstance(gm, str) or not gm.strip():
        raise bad("gpu_model", "a GPU name or an object describing the GPU by its numbers")
    c = node.gpu_count
    if not isinstance(c, numbers.Integral) or isinstance(c, bool) or int(c) <= 0:
        raise bad("gpu_count", "an integer > 0")
    for key in ("price_per_hour", "carbon_g_per_kwh"):
        v = getattr(node, key)
        if v is None:
            continue
        if not (is_number(v) and float(v) >= 0):
            raise bad(key, "a number >= 0 (or null)")
    if not isinstance(node.default, bool):
        raise bad("default", "true or false")
    if node.gpu_product is not None and not isinstance(node.gpu_product, str):
        raise bad("gpu_product", "a string (the k8s nvidia.com/gpu.product label)")


def accelerator_type(gpu_name: str) -> str:
    """Ray accelerator type of a canonical GPU name (``A100 80GB`` -> ``A100``)."""
    first = gpu_name.split()[0]
    if first[:1] in "AHLTVB" and any(ch.isdigit() for ch in first):
        return first
    return gpu_name.replace(" ", "-")


def placement(node: NodeType) -> dict[str, Any]:
    """Scheduler hints that put a job on ``node``."""
    name = gpu_key(node.gpu_model)
    acc = accelerator_type(name)
    product = node.gpu_product or (
        node.gpu_model.replace(" ", "-") if isinstance(node.gpu_model, str) else name
    )
    return {
        "node_type": node.name,
        # A tiny amount of the node type's custom resource pins the task there.
        "ray_resources": {f"node_type:{node.name}": 0.001},
        "accelerator_type": acc,
        "label_selector": {"ray.io/accelerator-type": acc},
        "k8s_node_selector": {"nvidia.com/gpu.product": product},
        "num_gpus": node.gpu_count,
    }


def recommend(
    model: PREModel,
    job: JobDescription,
    inventory: list[NodeType],
    *,
    objective: Objective = "energy",
    deadline_s: float | None = None,
) -> Recommendation:
    """Rank the inventory's node types for ``job``.

    Args:
        model: A fitted PRE model.
        job: The job (``planned_epochs`` defaults to 1 when not given; a given
            one, like ``layers``, must be > 0).
        inventory: Node types.
        objective: ``energy`` (J), ``cost`` (price) or ``carbon`` (g CO2e).
        deadline_s: Longest acceptable total training time in s (> 0), if any.

    Returns:
        The ranking, with the run length its figures assume (``epochs``, else
        ``reference_epochs``). Table columns: ``rank``, ``node_type``, ``gpu_model``,
        ``gpu_count``, ``epoch_energy_j``, ``lower_j``, ``upper_j``,
        ``epoch_time_s``, ``total_energy_kwh`` (with ``total_lower_kwh`` and
        ``total_upper_kwh``), ``total_time_h``, ``cost``, ``carbon_g``,
        ``meets_deadline``, ``gflops_forward`` (the job's, per sample),
        ``seen_gpu``, ``seen_architecture`` (the
        architecture at these FLOPs per sample was in the training runs; else
        the interval is the wider one of a new architecture), ``default``.

    Raises:
        BadInputError: Empty inventory, unknown GPU, a node type with a value
            of the wrong type or sign, a cost/carbon objective with a node type
            lacking price/intensity, a deadline <= 0, or a bad job (planned
            epochs or layers <= 0 included).

    """
    if not inventory:
        raise BadInputError("recommendation needs at least one node type; the inventory is empty")
    if objective not in ("energy", "cost", "carbon"):
        raise BadInputError(f"objective must be one of energy, cost, carbon; found {objective!r}")
    if deadline_s is not None and not (
        isinstance(deadline_s, numbers.Real)
        and not isinstance(deadline_s, bool)
        and float(deadline_s) > 0
    ):
        # A deadline <= 0 would mark every node type late and rank by nothing.
        raise BadInputError(f"deadline_s must be a number > 0 (s); found {deadline_s!r}")
    for n in inventory:  # node types built in code (Ray's, the HTTP API's) skip parse_inventory
        check_node_type(n)
    attr = {"cost": "price_per_hour", "carbon": "carbon_g_per_kwh"}.get(objective)
    if attr:
        lacking = [n.name for n in inventory if getattr(n, attr) is None]
        if lacking:
            raise BadInputError(
                f"objective {objective!r} needs {attr} for every node type; missing for {lacking}"
            )
    full = complete_job(job)
    jobs = [
        (
            JobDescription(**{**_asdict(full), "gpu_count": n.gpu_count}),
            n.gpu_model,
        )
        for n in inventory
    ]
    rows = feature_frame(jobs)
    pred = model.predict(rows)
    # complete_job refused planned epochs <= 0: only an unset count falls back to 1.
    epochs = 1.0 if full.planned_epochs is None else float(full.planned_epochs)
    t = pl.DataFrame(
        {
            "node_type": [n.name for n in inventory],
            "gpu_model": rows["gpu_model"].to_list(),
            "gpu_count": [n.gpu_count for n in inventory],
            "default": [n.default for n in inventory],
            "price_per_hour": [n.price_per_hour for n in inventory],
            "carbon_g_per_kwh": [n.carbon_g_per_kwh for n in inventory],
            "gflops_forward": [float(full.gflops_forward or 0.0)] * len(inventory),
        },
        schema_overrides={"price_per_hour": pl.Float64, "carbon_g_per_kwh": pl.Float64},
    ).with_columns(
        pred.select(
            pl.col("predicted_epoch_energy_j").alias("epoch_energy_j"),
            "lower_j",
            "upper_j",
            pl.col("predicted_epoch_time_s").alias("epoch_time_s"),
            "seen_gpu",
            "seen_architecture",
        )
    )
    kwh = epochs / 3.6e6
    t = t.with_columns(
        (pl.col("epoch_energy_j") * kwh).alias("total_energy_kwh"),
        (pl.col("lower_j") * kwh).alias("total_lower_kwh"),
        (pl.col("upper_j") * kwh).alias("total_upper_kwh"),
        (pl.col("epoch_time_s") * epochs / 3600).alias("total_time_h"),
    ).with_columns(
        (pl.col("total_time_h") * pl.col("price_per_hour")).alias("cost"),
        (pl.col("total_energy_kwh") * pl.col("carbon_g_per_kwh")).alias("carbon_g"),
        (pl.lit(True) if deadline_s is None else pl.col("total_time_h") * 3600 <= deadline_s).alias(
            "meets_deadline"
        ),
    )
    key = {"energy": "total_energy_kwh", "cost": "cost", "carbon": "carbon_g"}[objective]
    t = t.sort(["meets_deadline", key], descending=[True, False]).with_row_index("rank", offset=1)
    best = t.row(0, named=True)
    worst = float(t[key].max())  # type: ignore[arg-type]
    dflt = t.filter(pl.col("default"))
    vs_default = None if dflt.height == 0 else _saving(float(dflt[key][0]), float(best[key]))
    chosen = next(n for n in inventory if n.name == best["node_type"])
    return Recommendation(
        table=t,
        chosen=chosen.name,
        objective=objective,
        savings_vs_worst_pct=_saving(worst, float(best[key])),
        savings_vs_default_pct=vs_default,
        placement=placement(chosen),
        epochs=None if full.planned_epochs is None else int(full.planned_epochs),
        # Without a length PRE predicts one epoch of a run of its reference length.
        reference_epochs=model.reference_epochs_ if full.planned_epochs is None else None,
    )


def _saving(ref: float, best: float) -> float:
    return 0.0 if ref <= 0 else 100.0 * (ref - best) / ref


def _asdict(job: JobDescription) -> dict[str, Any]:
    return {f: getattr(job, f) for f in JobDescription.__dataclass_fields__}
