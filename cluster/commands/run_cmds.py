"""``wattwise run``, ``train``, ``placement`` and ``probe``: measured jobs on a Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cluster.commands.common import add_store_option, check_positive, console, open_store
from profiler.errors import BadInputError

if TYPE_CHECKING:
    from estimators.features import JobDescription
    from estimators.recommend import NodeType


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``train``, ``placement`` and ``probe``."""
    from cluster.train import add_train_arguments

    run = subparsers.add_parser(
        "run",
        help="run a training command on a node type of the Ray cluster, measured per epoch",
        description=(
            "Places the command on a node of the chosen node type (Ray resource "
            "node_type:<name>), records it as a run, measures it with the node's sidecar and "
            "the command's epoch hooks ($WATTWISE_RUN_ID, $WATTWISE_STORE). Works as the "
            "entrypoint of 'ray job submit'. Exits with the command's status."
        ),
        # Options must be spelt out: an abbreviation would take an option meant for the
        # command, or a mistyped one (--job for --job-name), silently.
        allow_abbrev=False,
    )
    run.add_argument(
        "--node-type", required=True, metavar="TYPE|auto", help="node type, or auto (PRE)"
    )
    _common_run_options(run)
    run.add_argument("--run-id", default=None, help="run id (default: a new one)")
    run.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="program and arguments"
    )
    run.set_defaults(func=run_run)

    train = subparsers.add_parser(
        "train",
        help="the built-in training workload (torchvision model on generated images)",
        description=(
            "Trains a torchvision model (random weights) on FakeData images, marking epochs. "
            "Under 'wattwise run' the run id and store come from the environment."
        ),
    )
    add_train_arguments(train)
    train.add_argument("--run-id", default=None, help="run id (default $WATTWISE_RUN_ID or new)")
    add_store_option(train)
    train.set_defaults(func=run_train)

    place = subparsers.add_parser(
        "placement",
        help="placement hints for a job: Ray resources, label selector, k8s nodeSelector",
    )
    _job_options(place)
    place.add_argument(
        "--inventory", default=None, metavar="FILE", help="node types JSON (default: the cluster)"
    )
    place.add_argument("--address", default="auto", help="Ray cluster address (without FILE)")
    place.add_argument("--model", default=None, metavar="FILE", help="PRE model (default latest)")
    place.add_argument("--objective", choices=("energy", "cost", "carbon"), default="energy")
    place.add_argument("--json", action="store_true", help="print the hints as JSON")
    add_store_option(place)
    place.set_defaults(func=run_placement)

    probe = subparsers.add_parser(
        "probe",
        help="run a job briefly on each node type in parallel; project and recommend",
        description=(
            "Starts the command on each node type at once, stops each when STEP calls it "
            "stable (or at --time-limit), projects the full run per node type with bands, "
            "recommends the node type needing least energy, and keeps the probe runs as "
            "training data for PRE."
        ),
    )
    probe.add_argument(
        "--node-types",
        default="all",
        metavar="all|A,B",
        help="node types to probe (default all: every node type with alive nodes, or with "
        "--inventory those of the inventory)",
    )
    probe.add_argument(
        "--time-limit", type=float, default=300.0, metavar="S", help="longest probe in s (300)"
    )
    _common_run_options(
        probe,
        inventory_help="node types JSON: the node types to probe (with --node-types all) and "
        "their GPU models and selectors, recorded with the probe runs for PRE "
        "(default: what the cluster reports)",
    )
    probe.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="program and arguments"
    )
    probe.set_defaults(func=run_probe)


def _common_run_options(
    p: argparse.ArgumentParser, *, inventory_help: str = "node types JSON for auto placement"
) -> None:
    p.add_argument("--epochs", type=int, default=None, help="planned epochs (for STEP)")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for the job (1)")
    p.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs reserved (default 1 on GPU nodes)"
    )
    p.add_argument("--job-name", default=None, help="human name of the job")
    p.add_argument("--inventory", default=None, metavar="FILE", help=inventory_help)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_store_option(p)


def _job_options(p: argparse.ArgumentParser) -> None:
    """``recommend``'s job options (with defaults for a quick hint) plus ``--node-type``."""
    from cluster.commands.pre_cmds import add_job_options

    add_job_options(p, batch_size=32, image_size=224, train_size=50_000)
    p.add_argument("--node-type", default=None, help="give hints for this node type instead")


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.argv)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise BadInputError(
            "expected a command after '--', e.g. wattwise run --node-type gpu-a -- "
            "wattwise train --arch resnet18 --dataset fake"
        )
    return cmd


def _inventory(path: str | None) -> list[NodeType] | None:
    if path is None:
        return None
    from estimators.recommend import load_inventory

    return load_inventory(path)


def _store_root(args: argparse.Namespace) -> str:
    return str(open_store(args).root.resolve())


def run_run(args: argparse.Namespace) -> int:
    """Run ``wattwise run``.

    The command, numbers, run id and inventory are checked before connecting
    to Ray, so bad input is refused (exit 2) with or without a cluster.
    """
    from cluster.runner import check_job_numbers, check_new_run_id, connect, run_job

    cmd = _command(args)
    check_job_numbers(epochs=args.epochs, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    store_root = _store_root(args)
    if args.run_id is not None:
        check_new_run_id(args.run_id, store_root)
    inventory = _inventory(args.inventory)
    connect(args.address)
    result = run_job(
        cmd,
        node_type=args.node_type,
        run_id=args.run_id,
        epochs=args.epochs,
        store_root=store_root,
        job_name=args.job_name,
        inventory=inventory,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )
    _print_result(result, args.json)
    return result.returncode if result.returncode >= 0 else 128 - result.returncode


def _print_result(result: Any, as_json: bool) -> None:
    from cluster.aggregator import _jsonable

    s = result.summary
    if as_json:
        print(
            json.dumps(
                _jsonable(
                    {
                        "run_id": result.run_id,
                        "node_type": result.node_type,
                        "node_id": result.node_id,
                        "status": result.status,
                        "returncode": result.returncode,
                        "stopped": result.stopped,
                        "summary": s,
                        "placement_source": result.placement.get("source"),
                        "error": result.error,
                        "end_error": result.end_error,
                    }
                )
            )
        )
        return
    proj = s.get("projection") or {}
    e = proj.get("energy_j")
    console().print(
        f"run {result.run_id} on {result.node_type}: {result.status} (exit {result.returncode}), "
        f"{s.get('epochs_done')} epochs, {s.get('samples')} samples, measured "
        f"{(s.get('measured_energy_j') or 0):.1f} J over {(s.get('duration_s') or 0):.1f} s"
        + (f"; STEP projected {e:.1f} J" if e is not None else "")
    )
    if result.error:
        print(f"wattwise run: error: {result.error}", file=sys.stderr)
    if result.end_error:
        print(f"wattwise run: warning: {result.end_error}", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    """Run ``wattwise train``."""
    from cluster.train import main

    return main(args)


def _job(args: argparse.Namespace) -> JobDescription:
    from cluster.commands.pre_cmds import job_from_args

    return job_from_args(args)


def _check_job_args(args: argparse.Namespace) -> None:
    """Refuse job numbers no job can have, naming the option (``--epochs -3``, ``--batch-size 0``).

    Checked before anything is chosen: without a PRE model, or with
    ``--node-type``, the job is never measured, so nothing else would refuse them.

    Raises:
        BadInputError: ``--batch-size``, ``--image-size``, ``--train-size`` or a
            given ``--epochs`` or ``--layers`` not > 0, ``--validation-size`` < 0,
            a given ``--gflops`` or ``--deadline-h`` not a finite number > 0, or a
            deadline without ``--epochs``.

    """
    for option, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--image-size", args.image_size, 1),
        ("--train-size", args.train_size, 1),
        ("--validation-size", args.validation_size, 0),
        ("--epochs", args.epochs, 1),
        ("--layers", args.layers, 1),
    ):
        if value is not None and value < least:
            expected = "> 0" if least else ">= 0"
            raise BadInputError(f"{option} must be an integer {expected}; found {value}")
    if args.gflops is not None:
        check_positive(args.gflops, "--gflops", "a finite number of GFLOPs")
    if args.deadline_h is not None:
        check_positive(args.deadline_h, "--deadline-h", "a number of hours")
        if args.epochs is None:
            raise BadInputError(
                "--deadline-h needs --epochs: without the planned epochs the predicted times "
                "are one epoch's"
            )


def run_placement(args: argparse.Namespace) -> int:
    """Run ``wattwise placement``.

    The job's numbers and the inventory are checked before connecting to Ray
    or choosing, so bad input is refused (exit 2) with or without a model.
    """
    from pathlib import Path

    from cluster.placement import inventory_from_ray, length_note, recommend_hints
    from cluster.retrain import latest_model

    _check_job_args(args)
    inventory = _inventory(args.inventory)
    if inventory is None:
        import ray

        from cluster.runner import connect

        connect(args.address)
        inventory = inventory_from_ray(ray.nodes())  # type: ignore[no-untyped-call]
    model = None
    if args.node_type is None:
        if args.model is not None:
            from estimators.pre import PREModel

            model = PREModel.load(Path(args.model))
        else:
            try:
                model = latest_model(open_store(args).root / "models")
            except BadInputError as err:
                print(f"wattwise placement: note: {err}", file=sys.stderr)
    hints = recommend_hints(
        _job(args),
        inventory,
        model,
        objective=args.objective,
        node_type=args.node_type,
        deadline_s=None if args.deadline_h is None else args.deadline_h * 3600,
    )
    if args.json:
        from cluster.aggregator import _jsonable

        print(json.dumps(_jsonable(hints)))
        return 0
    out = console()
    # A pipe or file gets whole lines (rich would break them at 80 columns).
    out.print(f"node type: {hints['node_type']} ({hints['source']})", soft_wrap=True)
    out.print(f"  Ray resources:   {json.dumps(hints['ray_resources'])}", soft_wrap=True)
    out.print(f"  label selector:  {json.dumps(hints['label_selector'])}", soft_wrap=True)
    out.print(f"  k8s nodeSelector: {json.dumps(hints['k8s_node_selector'])}", soft_wrap=True)
    if "predicted_energy_j" in hints:
        energy = f"{hints['predicted_energy_j']:.0f} J ({length_note(hints)})"
        out.print(f"  predicted energy (PRE): {energy}", soft_wrap=True)
    return 0


def probe_candidates(
    inventory: list[NodeType], types: Mapping[str, Mapping[str, Any]], file: str
) -> list[str]:
    """The node types of ``inventory`` to probe: those with alive nodes in the cluster.

    The others are named on stderr (never dropped silently).

    Args:
        inventory: The ``--inventory`` node types, in the file's order.
        types: The cluster's node types (:func:`cluster.placement.node_types`).
        file: The inventory file, for the messages.

    Raises:
        BadInputError: No node type of the inventory has alive nodes here.

    """
    chosen = [n.name for n in inventory if n.name in types and types[n.name]["alive"]]
    left = [
        f"{n.name} ({'no alive nodes' if n.name in types else 'not in this cluster'})"
        for n in inventory
        if n.name not in chosen
    ]
    if not chosen:
        raise BadInputError(
            f"probe --inventory {file}: no node type of the inventory has alive nodes in this "
            f"cluster ({', '.join(left)}); cluster node types: {sorted(types)}"
        )
    if left:
        print(f"wattwise probe: note: not probed: {', '.join(left)}", file=sys.stderr)
    return chosen


def run_probe(args: argparse.Namespace) -> int:
    """Run ``wattwise probe``.

    The command, numbers and inventory are checked before connecting to Ray,
    so bad input is refused (exit 2) with or without a cluster. The inventory
    gives the node types to probe (with ``--node-types all``) and each one's
    GPU model and selectors, which the probe runs are placed and recorded with
    (as ``wattwise run --node-type TYPE --inventory FILE`` does).
    """
    from cluster.probe import format_probe, probe
    from cluster.runner import check_job_numbers, cluster_node_types, connect

    cmd = _command(args)
    check_job_numbers(epochs=args.epochs, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    check_positive(args.time_limit, "--time-limit", "a number of seconds")
    inventory = _inventory(args.inventory)
    store_root = _store_root(args)
    connect(args.address)
    types = None if args.node_types == "all" else [t for t in args.node_types.split(",") if t]
    if types is None and inventory is not None:
        types = probe_candidates(inventory, cluster_node_types(), args.inventory)
    result = probe(
        cmd,
        node_types=types,
        time_limit_s=args.time_limit,
        epochs=args.epochs,
        store_root=store_root,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        job_name=args.job_name,
        inventory=inventory,
    )
    if args.json:
        from cluster.aggregator import _jsonable

        print(json.dumps(_jsonable(result)))
    else:
        console().print(format_probe(result))
    return 0 if result.get("recommendation") else 1
