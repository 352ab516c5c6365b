"""Rank a cluster's node types for a job by predicted energy, cost or carbon, with placement hints.

For each node type of an inventory PRE predicts per-epoch energy and time
(with intervals); totals are per-epoch figures times the planned epochs. The
ranking objective is energy (default), cost (price per hour times time) or
carbon (energy times the node type's grid intensity); with a deadline (which
needs the job's planned epochs: without them the times are for one epoch), node
types whose predicted total time exceeds it rank after all that meet it, and
:attr:`Recommendation.deadline_met` says whether the chosen one meets it.

Inventory JSON: a list of node types, or ``{"node_types": [...]}``; each::

    {"name": "gpu-a100", "gpu_model": "NVIDIA A100-SXM4-80GB", "gpu_count": 1,
     "price_per_hour": 3.2, "carbon_g_per_kwh": 350, "default": true,
     "gpu_product": "NVIDIA-A100-SXM4-80GB"}

``gpu_model`` may instead be an object describing an unknown card by its
numbers (the keys of :data:`estimators.features.GPU_COLUMNS`, ``name`` and
``kind``; ``gpu_generation`` as a name such as ``"ampere"`` or its index): it
needs :data:`REQUIRED_GPU_NUMBERS`, each > 0 (a ``kind: cpu`` object without
any numbers is placed by its node type alone and not ranked). Prices and
carbon intensities are numbers >= 0, ``gpu_count`` an integer > 0, at most one
node type is the default, ``gpu_product`` and ``accelerator_type`` are valid
Kubernetes label values; anything else is refused with the file, node type
and key.

Placement hints (:func:`placement`) select on the GPU the way Ray and GPU
feature discovery name it: ``accelerator_type`` follows Ray's own rule for the
name ``nvidia-smi`` prints (``NVIDIA GeForce RTX 3090`` -> ``GeForce-RTX-3090``,
``NVIDIA A100-SXM4-80GB`` -> ``A100``) unless the node type gives it (the live
cluster's inventory gives the value Ray reports). A GPU described by its numbers
has no name Ray or GPU feature discovery would report, so it gets accelerator
selectors only where the inventory gives ``accelerator_type`` or
``gpu_product``; the node-type resource pins it either way. A CPU node type gets
neither selectors nor GPUs.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from estimators.features import (
    GPU_COLUMNS,
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

#: Numbers a GPU described by its numbers must give (each > 0).
REQUIRED_GPU_NUMBERS: tuple[str, ...] = (
    "gpu_board_power_w",
    "gpu_fp32_tflops",
    "gpu_memory_gb",
    "gpu_bandwidth_gbs",
)
#: Keys of a GPU described by its numbers: its numbers, its ``name`` and its ``kind``.
GPU_SPEC_KEYS: frozenset[str] = frozenset({*GPU_COLUMNS, "name", "kind"})
_KINDS = ("gpu", "cpu")
#: A Kubernetes label value: at most 63 characters, alphanumeric at both ends, ``-_.`` inside.
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
#: Ray's rule for the accelerator type of an NVIDIA device name (Ray 2.60,
#: ``ray._private.accelerators.nvidia_gpu``): the leading all-caps words up to the
#: first word with a digit (``Tesla V100-SXM2-16GB`` -> ``V100``); names without one
#: (``NVIDIA GeForce RTX 3090``) fall back to the name without ``NVIDIA``, hyphenated.
_RAY_NVIDIA_NAME = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")
#: Canonical names of the GPU table's GeForce cards (``RTX 3090``, ``GTX 750 Ti``).
_GEFORCE = re.compile(r"(?:RTX|GTX) \d")


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
        gpu_product: Value of the k8s ``nvidia.com/gpu.product`` label, if known
            (``""``: no such label to select on).
        accelerator_type: Ray's accelerator type of its GPU (``accelerator_type:<X>``
            resource, ``ray.io/accelerator-type`` label), if known; else derived
            from ``gpu_model`` (see :func:`accelerator_type`).

    """

    name: str
    gpu_model: Any
    gpu_count: int = 1
    price_per_hour: float | None = None
    carbon_g_per_kwh: float | None = None
    default: bool = False
    gpu_product: str | None = None
    accelerator_type: str | None = None


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
        deadline_s: The deadline the ranking honours, in s (``None``: none).
        deadline_met: Whether the chosen node type meets the deadline (then some
            does); ``None`` without a deadline.

    """

    table: pl.DataFrame
    chosen: str
    objective: str
    savings_vs_worst_pct: float
    savings_vs_default_pct: float | None
    placement: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    reference_epochs: float | None = None
    deadline_s: float | None = None
    deadline_met: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (the table as a list of rows, and the run length the figures assume)."""
        return {
            "chosen": self.chosen,
            "deadline_met": self.deadline_met,
            "objective": self.objective,
            "savings_vs_worst_pct": self.savings_vs_worst_pct,
            "savings_vs_default_pct": self.savings_vs_default_pct,
            "placement": self.placement,
            "node_types": self.table.to_dicts(),
            "source": "predicted (PRE, conformal interval)",
            "epochs": self.epochs,
            "reference_epochs": self.reference_epochs,
        }

    def summary(self) -> str:
        """The recommendation in one line: what to choose and what it saves.

        When no node type meets the deadline it says so first, names the fastest
        and still names the best by the objective, marked as late.
        """
        saves = f"saves {self.savings_vs_worst_pct:.1f} % vs the worst" + (
            ""
            if self.savings_vs_default_pct is None
            else f", {self.savings_vs_default_pct:.1f} % vs the default"
        )
        if self.deadline_met is not False or self.deadline_s is None:
            return f"choose {self.chosen}: {saves}"
        fastest = self.table.sort("total_time_h").row(0, named=True)
        best = self.table.row(0, named=True)
        return (
            f"no node type meets the deadline of {self.deadline_s / 3600:g} h (the fastest, "
            f"{fastest['node_type']}, needs {fastest['total_time_h']:.2f} h); best by "
            f"{self.objective}: {self.chosen} (late, {best['total_time_h']:.2f} h): {saves}"
        )


def load_inventory(path: str | Path) -> list[NodeType]:
    """Read an inventory JSON file (see the module docstring).

    Raises:
        BadInputError: Missing or unreadable file (no permission), bad JSON,
            or a node type without ``name`` or ``gpu_model``.

    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: expected an inventory JSON file; no such file")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{p}: expected JSON; {err}") from err
    except OSError as err:
        raise BadInputError(
            f"{p}: expected a readable inventory JSON file; could not read it "
            f"({err.strerror or err}); check its permissions"
        ) from err
    return parse_inventory(raw, file=str(p))


def parse_inventory(raw: Any, *, file: str = "inventory") -> list[NodeType]:
    """Node types from parsed inventory JSON.

    Raises:
        BadInputError: Not a non-empty list of objects with ``name`` and
            ``gpu_model``, an unknown key, repeated names, more than one
            default, or a value of the wrong type or sign (see
            :func:`check_node_type`).

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
    defaults = [n.name for n in out if n.default]
    if len(defaults) > 1:
        raise BadInputError(
            f"{file}: expected at most one node type with default: true (where jobs land when "
            f"nobody chooses); found {len(defaults)}: {defaults}"
        )
    return out


def check_node_type(node: NodeType, *, file: str = "inventory", index: int | None = None) -> None:
    """Refuse a node type whose values have the wrong type or sign.

    Args:
        node: The node type.
        file: Where it comes from, for messages.
        index: Its 1-based place in the inventory, named when the name itself is bad.

    Raises:
        BadInputError: ``name`` not a non-empty string; ``gpu_model`` neither a
            non-empty string nor an object (or an object with a key other than
            :data:`GPU_SPEC_KEYS`, a GPU number that is not > 0, see
            :func:`estimators.features.user_gpu_columns`, or without one of
            :data:`REQUIRED_GPU_NUMBERS` unless it is a ``kind: cpu`` object
            without numbers); ``gpu_count`` not an integer > 0;
            ``price_per_hour`` or ``carbon_g_per_kwh`` not a number >= 0;
            ``default`` not a bool; ``gpu_product`` or ``accelerator_type`` not
            a Kubernetes label value. The message names the file, the node type,
            the key, what was expected and what was found.

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
        _check_gpu_spec(gm, f"{file}, node type {node.name!r}: gpu_model")
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
    for key, what in (
        ("gpu_product", "the k8s nvidia.com/gpu.product label"),
        ("accelerator_type", "Ray's accelerator type, the ray.io/accelerator-type label"),
    ):
        v = getattr(node, key)
        if v is not None and not is_label_value(v):
            raise bad(
                key,
                f"a Kubernetes label value ({what}: up to 63 letters, digits, '-', '_' or '.', "
                "beginning and ending with a letter or digit)",
            )


def is_label_value(value: Any) -> bool:
    """Whether ``value`` can be a Kubernetes label's value (and so a selector's).

    That is a non-empty string of at most 63 letters, digits, ``-``, ``_`` or
    ``.``, beginning and ending with a letter or digit.
    """
    return isinstance(value, str) and bool(value) and _LABEL_VALUE.fullmatch(value) is not None


def _check_gpu_spec(spec: Mapping[str, Any], where: str) -> None:
    """Refuse a GPU described by its numbers with an unknown key, a bad value or a missing number.

    A ``kind: cpu`` object without any number is allowed: it is placed by its
    node type alone (:func:`recommend` refuses to rank it).

    Raises:
        BadInputError: The message starts with ``where`` and names the key.

    """
    unknown = sorted(str(k) for k in spec if k not in GPU_SPEC_KEYS)
    if unknown:
        raise BadInputError(
            f"{where}: unknown key(s) {unknown} of a GPU described by its numbers; known keys "
            f"{sorted(GPU_SPEC_KEYS)}"
        )
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise BadInputError(f"{where}: name: expected a non-empty string; found {name!r}")
    kind = spec.get("kind")
    if kind is not None and not (isinstance(kind, str) and kind.lower() in _KINDS):
        raise BadInputError(f"{where}: kind: expected one of {list(_KINDS)}; found {kind!r}")
    try:
        values = user_gpu_columns(spec)
    except BadInputError as err:
        raise BadInputError(f"{where}: {err}") from err
    if is_cpu(spec) and all(v is None for v in values.values()):
        return
    missing = [k for k in REQUIRED_GPU_NUMBERS if values[k] is None]
    if missing:
        raise BadInputError(
            f"{where}: missing {missing}; a GPU described by its numbers needs "
            f"{', '.join(REQUIRED_GPU_NUMBERS)} (each > 0)"
        )


def is_cpu(model: Any) -> bool:
    """Whether a node type's device is a CPU: the name ``cpu`` or a spec with ``kind: cpu``."""
    if isinstance(model, str):
        return model.strip().lower() == "cpu"
    return isinstance(model, Mapping) and str(model.get("kind", "")).lower() == "cpu"


def ray_accelerator_type(device_name: str) -> str | None:
    """The accelerator type Ray gives an NVIDIA device by the name ``nvidia-smi`` prints.

    Ray's own rule (2.60, ``NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type``),
    replicated so that no Ray import is needed: ``Tesla T4`` -> ``T4``, ``NVIDIA
    A100-SXM4-80GB`` -> ``A100``, ``NVIDIA GeForce RTX 3090`` -> ``GeForce-RTX-3090``.
    """
    match = _RAY_NVIDIA_NAME.match(device_name)
    result = match.group(1).replace(" ", "-") if match else None
    if result and len(result) > 1:
        return result
    cleaned = re.sub(r"^NVIDIA\s+", "", device_name).strip()
    return cleaned.replace(" ", "-") if cleaned else None


def device_name(canonical: str) -> str:
    """The name ``nvidia-smi`` prints for a card of the GPU table, by its canonical name.

    ``NVIDIA GeForce <name>`` for the GeForce cards (``RTX 3090``, ``GTX 750 Ti``),
    else ``NVIDIA <name>`` (all Ray's rule needs of a data-centre card).
    """
    return f"NVIDIA GeForce {canonical}" if _GEFORCE.match(canonical) else f"NVIDIA {canonical}"


def accelerator_type(gpu_name: str) -> str:
    """Ray's accelerator type of a known GPU, by any of its names.

    The GPU is looked up in :mod:`estimators.gpus` and Ray's rule (see
    :func:`ray_accelerator_type`) applied to the name its card reports:
    ``RTX 3090`` -> ``GeForce-RTX-3090``, ``NVIDIA A100-SXM4-80GB`` -> ``A100``.

    Raises:
        BadInputError: An unknown GPU name.

    """
    from estimators import gpus

    canonical = gpus.lookup(gpu_name).name
    acc = ray_accelerator_type(device_name(canonical))
    assert acc is not None  # a canonical name is never empty
    return acc


def placement(node: NodeType) -> dict[str, Any]:
    """Scheduler hints that put a job on ``node``.

    Every node type is pinned by a tiny amount of its ``node_type:<name>``
    resource. A GPU node type adds ``num_gpus``, ``gpu_model`` (its GPU as the
    inventory names it; a spec by its name) and its accelerator selectors:
    ``accelerator_type`` (the node type's own, e.g. read from Ray, else
    :func:`accelerator_type`) as the label selector ``ray.io/accelerator-type``,
    and ``gpu_product`` (else the GPU name hyphenated; ``""``: none, as for an
    inventory read from a Ray cluster, whose GPU names are Ray's accelerator
    types) as the nodeSelector ``nvidia.com/gpu.product``. A GPU described by
    its numbers has no name Ray or GPU feature discovery reports: it gets only
    the selectors the node type gives. A CPU node type (:func:`is_cpu`) gets
    no selectors and no GPUs.

    Raises:
        BadInputError: A GPU name that is not in :mod:`estimators.gpus` and no
            ``accelerator_type`` for it.

    """
    out: dict[str, Any] = {
        "node_type": node.name,
        # A tiny amount of the node type's custom resource pins the task there.
        "ray_resources": {f"node_type:{node.name}": 0.001},
        "accelerator_type": None,
        "label_selector": {},
        "k8s_node_selector": {},
        "num_gpus": 0,
    }
    if is_cpu(node.gpu_model):
        return out
    gm = node.gpu_model
    if isinstance(gm, Mapping):
        acc, product, name = node.accelerator_type, node.gpu_product, gpu_key(gm)
    else:
        from estimators import gpus

        acc = node.accelerator_type or accelerator_type(gm)
        # "" (an inventory read from a Ray cluster): the GPU is named by Ray's accelerator
        # type ("A100"), which is not GPU feature discovery's product label.
        # GPU feature discovery labels the name the card reports ("NVIDIA-GeForce-RTX-3090",
        # "NVIDIA-A100-SXM4-80GB"); a short table name ("RTX 3090", "A100") is not it, and
        # for a data-centre card does not even say which variant: no selector then.
        # A card the table lacks is placed by its accelerator_type: not a short name.
        short = gpus.is_known(gm) and gpus.lookup(gm).name == gm.strip()
        product = (
            (None if short else gm.strip().replace(" ", "-"))
            if node.gpu_product is None
            else node.gpu_product or None
        )
        name = gm
    out.update(
        accelerator_type=acc,
        label_selector={} if acc is None else {"ray.io/accelerator-type": acc},
        k8s_node_selector={} if not product else {"nvidia.com/gpu.product": product},
        num_gpus=node.gpu_count,
        gpu_model=name,
    )
    return out


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
        deadline_s: Longest acceptable total training time in s (> 0), if any;
            it needs the job's planned epochs (totals are for one epoch without them).

    Returns:
        The ranking, with the run length its figures assume (``epochs``, else
        ``reference_epochs``) and, with a deadline, whether the chosen node
        type meets it (``deadline_met``). Table columns: ``rank``, ``node_type``, ``gpu_model``,
        ``gpu_count``, ``epoch_energy_j``, ``lower_j``, ``upper_j``,
        ``epoch_time_s``, ``total_energy_kwh`` (with ``total_lower_kwh`` and
        ``total_upper_kwh``), ``total_time_h``, ``cost``, ``carbon_g``,
        ``meets_deadline`` (null without a deadline), ``gflops_forward`` (the job's, per sample),
        ``seen_gpu``, ``seen_architecture`` (the
        architecture at these FLOPs per sample was in the training runs; else
        the interval is the wider one of a new architecture), ``default``.

    Raises:
        BadInputError: Empty inventory, unknown GPU, a node type with a value
            of the wrong type or sign, a cost/carbon objective with a node type
            lacking price/intensity, a deadline <= 0 or without planned epochs,
            a CPU node type without the numbers PRE predicts from, or a bad job
            (planned epochs or layers <= 0 included).

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
    if deadline_s is not None and job.planned_epochs is None:
        # Without a length the totals are one epoch's: a 24 h job would "meet" a 1 h deadline.
        raise BadInputError(
            f"a deadline ({float(deadline_s) / 3600:g} h) needs the job's planned epochs "
            "(--epochs, planned_epochs): without them the predicted times are for one epoch"
        )
    for n in inventory:  # node types built in code (Ray's, the HTTP API's) skip parse_inventory
        check_node_type(n)
        if is_cpu(n.gpu_model) and (
            isinstance(n.gpu_model, str)
            or all(v is None for v in user_gpu_columns(n.gpu_model).values())
        ):
            raise BadInputError(
                f"PRE cannot rank node type {n.name!r}: its device is a CPU without the numbers "
                f"PRE predicts from; describe it by {', '.join(REQUIRED_GPU_NUMBERS)} with "
                '"kind": "cpu", or leave it out of the ranking'
            )
    attr = {"cost": "price_per_hour", "carbon": "carbon_g_per_kwh"}.get(objective)
    if attr:
        lacking = [n.name for n in inventory if getattr(n, attr) is None]
        if lacking:
            raise BadInputError(
                f"objective {objective!r} needs {attr} for every node type; missing for {lacking}"
            )
    full = complete_job(job)
    from estimators import gpus

    for n in inventory:
        if isinstance(n.gpu_model, str):
            try:
                gpus.lookup(n.gpu_model)
            except BadInputError as err:
                raise BadInputError(
                    f"node type {n.name!r}: gpu_model: {err}. In an inventory, describe the "
                    f'card by its numbers instead: {{"name": ..., '
                    + ", ".join(f'"{k}": ...' for k in REQUIRED_GPU_NUMBERS)
                    + "}"
                ) from None
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
        # Null without a deadline: nothing to meet (true would claim a check that never ran).
        (
            pl.lit(None, pl.Boolean)
            if deadline_s is None
            else pl.col("total_time_h") * 3600 <= deadline_s
        ).alias("meets_deadline"),
    )
    key = {"energy": "total_energy_kwh", "cost": "cost", "carbon": "carbon_g"}[objective]
    t = t.sort(["meets_deadline", key], descending=[True, False]).with_row_index("rank", offset=1)
    best = t.row(0, named=True)
    worst = float(t[key].max())  # type: ignore[arg-type]
    dflt = t.filter(pl.col("default"))
    vs_default = None if dflt.height == 0 else _saving(float(dflt[key][0]), float(best[key]))
    chosen = next(n for n in inventory if n.name == best["node_type"])
    # Node types that meet the deadline rank first: the best one meets it, or none does.
    met = None if deadline_s is None else bool(best["meets_deadline"])
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
        deadline_s=None if deadline_s is None else float(deadline_s),
        deadline_met=met,
    )


def _saving(ref: float, best: float) -> float:
    return 0.0 if ref <= 0 else 100.0 * (ref - best) / ref


def _asdict(job: JobDescription) -> dict[str, Any]:
    return {f: getattr(job, f) for f in JobDescription.__dataclass_fields__}
