"""The main job on the embedded default: a local Ray cluster of two node types, end to end.

:func:`live` starts a real Ray cluster on this one machine (a head node plus
one worker node per simulated node type, each carrying its ``node_type:<name>``
resource), the aggregator actor with a sidecar on every node, and runs short
real training jobs (torchvision on the CPU) through the job runner
(:func:`cluster.runner.run_job`, the code behind ``wattwise run``). Without a
GPU the sidecars read the ``modelled`` CPU source (utilisation times the node
type's board power): every number built on it is stored and shown as
modelled. When the jobs are done it retrains PRE on the store, recommends a
node type for a new job and runs that job with ``--node-type auto``.

:func:`replay` plays recorded runs instead (a SEAA 2023 style folder with
``runs.parquet`` and ``traces.parquet``, or a wattwise store): one sidecar per
run replays its power trace through the same aggregator, STEP and PRE path,
at ``speed`` times real time, and the run's epoch marks (recorded ones from a
store; for the SEAA traces, which have none, ``trained_epochs`` equal slices
of the run's time, said so in the output) reach the aggregator when the
replayed clock passes them.

Both return a summary dict (the ``--json`` output of ``wattwise demo``) and
write per-run HTML reports and ``summary.json`` under
``<store>/reports/demo-<UTC time>/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profiler.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl

    from profiler.store import Store

log = logging.getLogger(__name__)

#: Called with a progress event: ("job", run summary) while jobs run, ("note", text) otherwise.
Progress = Callable[[str, Any], object]


@dataclass(frozen=True, slots=True)
class DemoNodeType:
    """A simulated node type of the demo cluster.

    Attributes:
        name: Node type name (Ray resource ``node_type:<name>``).
        cpus: Logical CPUs of its node; the job's torch uses as many threads.
        board_power_w: Board power of the modelled CPU source in W (at 100 % utilisation).
        fp32_tflops: Peak FP32 throughput in TFLOPS, for PRE's features.
        memory_gb: Memory in GB, for PRE's features.
        bandwidth_gbs: Memory bandwidth in GB/s, for PRE's features.

    """

    name: str
    cpus: int
    board_power_w: float
    fp32_tflops: float
    memory_gb: float
    bandwidth_gbs: float

    def spec(self) -> dict[str, Any]:
        """The node's device described by its numbers (PRE's user-described GPU columns)."""
        return {
            "name": f"{self.name} (modelled CPU)",
            "kind": "cpu",
            "gpu_board_power_w": self.board_power_w,
            "gpu_memory_gb": self.memory_gb,
            "gpu_bandwidth_gbs": self.bandwidth_gbs,
            "gpu_sms": float(self.cpus),
            "gpu_cuda_cores": float(self.cpus),
            "gpu_fp32_tflops": self.fp32_tflops,
            "gpu_fp16_tflops": None,
            "gpu_generation": 0.0,
        }


#: Two node types that differ the way real pools do: a frugal one-core node and a
#: faster two-core node with a bigger power budget.
NODE_TYPES: tuple[DemoNodeType, ...] = (
    DemoNodeType("cpu-eco", cpus=1, board_power_w=35.0, fp32_tflops=0.05, memory_gb=8,
                 bandwidth_gbs=20.0),
    DemoNodeType("cpu-perf", cpus=2, board_power_w=95.0, fp32_tflops=0.1, memory_gb=16,
                 bandwidth_gbs=40.0),
)  # fmt: skip

#: The head node's sidecar models this board power (it runs no job).
HEAD_BOARD_POWER_W = 35.0

#: The jobs of the live demo: architectures, each run once on every node type.
ARCHITECTURES: tuple[str, ...] = ("mobilenet_v3_small", "resnet18")

#: The built-in workload's size in the demo: about 2 s per epoch on one core.
TRAIN_SIZE, IMAGE_SIZE, BATCH_SIZE = 512, 32, 32


def demo_sources(node: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A demo node's sidecar source: the modelled CPU with its node type's board power."""
    resources = node.get("Resources") or {}
    power = HEAD_BOARD_POWER_W
    for nt in NODE_TYPES:
        if f"node_type:{nt.name}" in resources:
            power = nt.board_power_w
    return [("modelled", {"board_power_w": power})]


@contextlib.contextmanager
def local_cluster(node_types: Sequence[tuple[str, int]], *, head_cpus: int = 1) -> Iterator[Any]:
    """A real local Ray cluster: a head plus one worker node per (node type, CPUs).

    The driver connects in the ``wattwise`` namespace without forwarding the
    workers' output (the demo shows its own progress); everything started,
    the detached aggregator included, ends with the cluster.
    """
    import ray
    from ray.cluster_utils import Cluster

    from cluster.actors import NAMESPACE

    if ray.is_initialized():
        raise BadInputError(
            "the demo starts its own local Ray cluster; this process is already connected to one"
        )
    saved = os.environ.pop("RAY_ADDRESS", None)
    small: dict[str, Any] = {"object_store_memory": 80 * 1024 * 1024, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args={**small, "num_cpus": head_cpus})
    try:
        for name, cpus in node_types:
            c.add_node(**small, num_cpus=cpus, resources={f"node_type:{name}": cpus})
        c.wait_for_nodes()
        ray.init(
            address=c.address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()  # type: ignore[no-untyped-call]
        os.environ.pop("RAY_ADDRESS", None)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def train_command(arch: str, epochs: int, *, train_size: int = TRAIN_SIZE) -> list[str]:
    """The built-in workload as the job runner starts it (``wattwise train ...`` on the CPU)."""
    return [
        sys.executable,
        "-m",
        "cluster.cli",
        "train",
        "--arch",
        arch,
        "--epochs",
        str(epochs),
        "--train-size",
        str(train_size),
        "--image-size",
        str(IMAGE_SIZE),
        "--batch-size",
        str(BATCH_SIZE),
        "--device",
        "cpu",
    ]


def check_architectures(architectures: Sequence[str]) -> None:
    """Refuse, before anything starts, architectures the demo's jobs cannot train.

    Raises:
        BadInputError: No architecture, or one that is not a torchvision
            classification model (the message names it and lists the known ones).

    """
    from estimators.features import torchvision_names

    if not architectures:
        raise BadInputError("the demo needs at least one architecture (--archs A,B)")
    names = torchvision_names()
    unknown = [a for a in architectures if a not in names]
    if unknown:
        raise BadInputError(
            f"--archs: unknown architecture{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(a) for a in unknown)}; expected torchvision classification models: "
            + ", ".join(names)
        )


def fifth(planned: int) -> int:
    """Epochs after which the demo reports STEP's projection: a fifth of the plan, at least 1."""
    return max(1, math.ceil(planned / 5))


class _Watch:
    """Polls the aggregator about one running job; keeps STEP's answer after a fifth of it."""

    def __init__(self, agg: Any, planned: int, progress: Progress | None) -> None:
        self.agg = agg
        self.planned = planned
        self.progress = progress
        self.run_id: str | None = None
        self.at_fifth: dict[str, Any] | None = None
        self.done = threading.Event()

    def start(self, run_id: str, _hints: Mapping[str, Any]) -> None:
        self.run_id = run_id
        threading.Thread(target=self._loop, name=f"watch-{run_id}", daemon=True).start()

    def _loop(self) -> None:
        import ray

        k = fifth(self.planned)
        while not self.done.is_set():
            try:
                s = ray.get(self.agg.status.remote(self.run_id), timeout=30)
            except Exception as err:  # the aggregator restarting: try again
                log.debug("status of %s: %s", self.run_id, err)
                time.sleep(0.5)
                continue
            if self.at_fifth is None and (s.get("epochs_done") or 0) >= k:
                proj = dict(s.get("projection") or {})
                self.at_fifth = {**proj, "after_epochs": int(s["epochs_done"])}
            if self.progress is not None:
                self.progress("job", s)
            self.done.wait(0.25)


def _run_one(
    command: list[str],
    *,
    node: DemoNodeType | None,
    node_type: str,
    planned: int,
    store_root: str,
    inventory: list[Any],
    progress: Progress | None,
) -> dict[str, Any]:
    """One job through the runner; returns its row of the summary."""
    import ray

    from cluster.actors import aggregator
    from cluster.runner import run_job
    from profiler.store import Store

    agg = aggregator(store_root)
    watch = _Watch(agg, planned, progress)
    threads = str(node.cpus) if node is not None else "1"
    try:
        result = run_job(
            command,
            node_type=node_type,
            epochs=planned,
            store_root=store_root,
            inventory=inventory,
            num_cpus=float(node.cpus) if node is not None else 1.0,
            num_gpus=0,
            sources=demo_sources,
            sidecar_options={"interval_s": 0.5, "batch_interval_s": 1.0},
            # Threads that sleep when idle: spinning would bill the job for waiting on the
            # other job's core.
            extra_env={
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "OMP_WAIT_POLICY": "PASSIVE",
            },
            on_start=watch.start,
            job_name="wattwise demo",
            extra_config={"demo": True},
        )
    finally:
        watch.done.set()
    summary = result.summary
    chosen = next(nt for nt in NODE_TYPES if nt.name == result.node_type)
    # The run as the runner started it, before _describe_device renames its device: the
    # aggregator's projector (and so every band of this run) took its power cap from it.
    started = Store(store_root).run(result.run_id)
    cap_w = band_cap_w(started)
    _describe_device(store_root, result.run_id, chosen)
    at = watch.at_fifth
    how = "aggregator"
    if at is None or at.get("energy_j") is None:  # too fast to catch live: replay the same update
        at = _projection_after(ray.get(agg.epochs.remote(result.run_id)), planned, started)
        how = "recomputed from the stored epochs"
    return {
        "run_id": result.run_id,
        "node_type": result.node_type,
        "architecture": command[command.index("--arch") + 1],
        "status": result.status,
        "placement": result.placement.get("source"),
        "planned_epochs": planned,
        "epochs": int(summary.get("epochs_done") or 0),
        "measured_energy_j": summary.get("measured_energy_j"),
        "duration_s": summary.get("duration_s"),
        "energy_source": "modelled",
        "projected_energy_j": at.get("energy_j"),
        "lower_j": at.get("lower_j"),
        "upper_j": at.get("upper_j"),
        "stable_at_fifth": bool(at.get("stable")),
        "projected_after_epochs": at.get("after_epochs"),
        "projection_from": how,
        "band_cap_w": cap_w,
    }


def _describe_device(store_root: str, run_id: str, node: DemoNodeType) -> None:
    """Record the run's device by its numbers (``gpu_model`` and ``config.gpu_spec``) for PRE."""
    import polars as pl

    from profiler.store import Store

    store = Store(store_root)
    row = store.run(run_id)
    config = json.loads(str(row.get("config") or "{}"))
    config["gpu_spec"] = node.spec()
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": [run_id],
                "status": [row["status"]],
                "gpu_model": [node.spec()["name"]],
                "config": [json.dumps(config)],
            }
        )
    )


def band_cap_w(run: Mapping[str, Any]) -> float | None:
    """The power cap in W of a run's STEP band: the one the aggregator's projector uses.

    The aggregator builds the projector from the run record given to
    ``start_run``; ``None`` when that record names no device of known board
    power (a not-stable band then runs to twice the highest epoch's energy).
    """
    from cluster.aggregator import _new_projector

    projector = _new_projector({**run, "planned_epochs": run.get("planned_epochs") or 1})
    cap = None if projector is None else projector.power_cap_w
    return None if cap is None else float(cap)


def _projection_after(epochs: pl.DataFrame, planned: int, run: Mapping[str, Any]) -> dict[str, Any]:
    """STEP's projection after a fifth of the planned epochs, by the aggregator's own update.

    Args:
        epochs: The run's finished epochs (``energy_j``, ``duration_s``).
        planned: Its planned epochs.
        run: Its record as given to the aggregator's ``start_run`` (the
            projector's power cap comes from it, as in the aggregator).

    """
    from estimators.step import OnlineStep

    step = OnlineStep(planned_epochs=planned, power_cap_w=band_cap_w(run))
    k = fifth(planned)
    out: dict[str, Any] = {"energy_j": None, "after_epochs": 0}
    for i, r in enumerate(epochs.sort("epoch").iter_rows(named=True), start=1):
        p = step.update(float(r["energy_j"]), float(r["duration_s"]))
        out = {**p.as_row(), "after_epochs": i}
        if i >= k:
            break
    return out


def _inventory() -> list[Any]:
    from estimators.recommend import NodeType

    return [
        NodeType(nt.name, nt.spec(), gpu_count=1, default=(i == 0))
        for i, nt in enumerate(NODE_TYPES)
    ]


def live(
    store: Store,
    *,
    epochs: int = 10,
    architectures: Sequence[str] = ARCHITECTURES,
    auto_job: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The live demo on a local Ray cluster of :data:`NODE_TYPES` (see the module docstring).

    Args:
        store: The run store (the aggregator writes here).
        epochs: Planned epochs of every job.
        architectures: torchvision models to train, each on every node type.
        auto_job: Also run one job with ``--node-type auto`` after PRE is retrained.
        progress: Called with progress events.

    Returns:
        The summary: ``cluster``, ``jobs``, ``model``, ``recommendation``,
        ``auto_job``, ``reports``, ``elapsed_s``.

    Raises:
        BadInputError: ``epochs`` < 1, no architecture or an unknown one (all
            before the cluster starts).

    """
    if epochs < 1:
        raise BadInputError(f"--epochs must be at least 1; found {epochs}")
    check_architectures(architectures)
    import ray

    from cluster.actors import aggregator

    t0 = time.monotonic()
    note = progress or (lambda *_: None)
    root = str(store.root.resolve())
    inventory = _inventory()
    summary: dict[str, Any] = {
        "mode": "live",
        "store": root,
        "cluster": {
            "nodes": 1 + len(NODE_TYPES),
            "node_types": [
                {"name": nt.name, "cpus": nt.cpus, "board_power_w": nt.board_power_w}
                for nt in NODE_TYPES
            ],
            "power_source": "modelled (CPU utilisation x board power; no GPU here)",
        },
        "jobs": [],
    }
    with local_cluster([(nt.name, nt.cpus) for nt in NODE_TYPES]):
        note("note", f"Ray cluster up: head + {', '.join(nt.name for nt in NODE_TYPES)}")
        # One queue per node type: jobs on different node types run at the same time (the
        # sidecars attribute each job's own processes), those of one node type in turn.
        results: dict[tuple[int, int], dict[str, Any]] = {}
        errors: list[BaseException] = []

        def queue(k: int, nt: DemoNodeType) -> None:
            try:
                for i, arch in enumerate(architectures):
                    results[(i, k)] = row = _run_one(
                        train_command(arch, epochs),
                        node=nt,
                        node_type=nt.name,
                        planned=epochs,
                        store_root=root,
                        inventory=inventory,
                        progress=progress,
                    )
                    note("done", row)
            except BaseException as err:  # re-raised in the caller's thread
                errors.append(err)

        workers = [
            threading.Thread(target=queue, args=(k, nt), name=f"demo-{nt.name}", daemon=True)
            for k, nt in enumerate(NODE_TYPES)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        summary["jobs"] = [results[key] for key in sorted(results)]
        agg = aggregator(root)
        summary["per_epoch"] = {
            j["run_id"]: ray.get(agg.epochs.remote(j["run_id"]), timeout=60)["energy_j"].to_list()
            for j in summary["jobs"]
        }
        summary["sidecars"] = ray.get(agg.stats.remote(), timeout=60).get("sidecars")
        try:
            summary["model"], model = _retrain(store)
        except BadInputError as err:  # too few finished runs in this store
            summary["model"], model = {"version": None, "rows": 0, "reason": str(err)}, None
        # A job not run yet: the first architecture on 1.5 times the images.
        job_arch, job_size = architectures[0], TRAIN_SIZE * 3 // 2
        summary["recommendation"] = (
            _recommend(model, job_arch, epochs, inventory, job_size)
            if model is not None
            else {"node_type": None, "predicted_energy_j": None, "reason": "no PRE model"}
        )
        note("recommendation", summary["recommendation"])
        if auto_job and summary["recommendation"]["node_type"] is not None:
            expected = next(
                nt for nt in NODE_TYPES if nt.name == summary["recommendation"]["node_type"]
            )
            row = _run_one(
                train_command(job_arch, epochs, train_size=job_size),
                node=expected,  # its threads; the runner makes its own choice with PRE
                node_type="auto",
                planned=epochs,
                store_root=root,
                inventory=inventory,
                progress=progress,
            )
            row["predicted_energy_j"] = summary["recommendation"]["predicted_energy_j"]
            summary["auto_job"] = row
            note("done", row)
    summary["reports"] = write_reports(store, summary)
    summary["elapsed_s"] = round(time.monotonic() - t0, 1)
    return summary


def _retrain(store: Store) -> tuple[dict[str, Any], Any]:
    from cluster.retrain import latest_model, retrain, versions
    from estimators.pre import card_path

    result = retrain(store)
    model = latest_model(store.root / "models")
    # The model in use: this retrain's if accepted, else the newest accepted one before it.
    version, rows = result.version, result.rows
    if not result.accepted:
        for v in reversed(versions(store.root / "models")):
            card = json.loads(card_path(store.root / "models" / f"pre-v{v}.json").read_text())
            if card.get("accepted", True):
                version, rows = v, len(card.get("run_ids") or [])
                break
    return {
        "version": version,
        "rows": rows,
        "retrained": {
            "version": result.version,
            "rows": result.rows,
            "accepted": result.accepted,
            "decision": result.decision,
            "path": str(result.path),
        },
    }, model


def _recommend(
    model: Any, arch: str, epochs: int, inventory: list[Any], train_size: int
) -> dict[str, Any]:
    """PRE's recommendation for a new demo job; when PRE cannot answer, ``reason`` says why."""
    from estimators.features import JobDescription

    job = JobDescription(
        architecture=arch,
        batch_size=BATCH_SIZE,
        image_height=IMAGE_SIZE,
        image_width=IMAGE_SIZE,
        training_size=train_size,
        validation_size=0,
        planned_epochs=epochs,
    )
    try:
        return recommendation_summary(model, job, inventory)
    except BadInputError as err:  # the summary and reports are still written
        return {"node_type": None, "predicted_energy_j": None, "reason": str(err)}


def recommendation_summary(model: Any, job: Any, inventory: list[Any]) -> dict[str, Any]:
    """PRE's ranking of ``inventory`` for ``job`` as the demo's JSON (totals over its epochs)."""
    from cluster.placement import hints_for
    from estimators.recommend import recommend

    epochs = int(job.planned_epochs or 1)
    rec = recommend(model, job, inventory)
    best = rec.table.row(0, named=True)
    hints = hints_for(next(n for n in inventory if n.name == rec.chosen))
    return {
        "job": {"architecture": job.architecture, "epochs": epochs,
                "batch_size": job.batch_size, "image_size": job.image_height,
                "train_size": job.training_size},
        "node_type": rec.chosen,
        "predicted_energy_j": float(best["epoch_energy_j"]) * epochs,
        "lower_j": float(best["lower_j"]) * epochs,
        "upper_j": float(best["upper_j"]) * epochs,
        "savings_vs_worst_pct": rec.savings_vs_worst_pct,
        "ranking": [
            {
                "node_type": r["node_type"],
                "energy_j": float(r["epoch_energy_j"]) * epochs,
                "lower_j": float(r["lower_j"]) * epochs,
                "upper_j": float(r["upper_j"]) * epochs,
                "time_s": float(r["epoch_time_s"]) * epochs,
            }
            for r in rec.table.iter_rows(named=True)
        ],
        "placement": {k: v for k, v in hints.items() if k != "ray_options"},
    }  # fmt: skip


def write_reports(store: Store, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Per-run HTML reports (power, epochs, STEP as it evolved) and ``summary.json``."""
    from estimators.report import write_report
    from estimators.step import RunPlan

    folder = store.root / "reports" / ("demo-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S"))
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    rows = list(summary.get("jobs", []))
    if summary.get("auto_job"):
        rows.append(summary["auto_job"])
    for row in rows:
        run_id = row["run_id"]
        samples, marks = store.samples(run_id), store.epochs(run_id)
        if samples.height == 0:
            continue
        plan = RunPlan(
            planned_epochs=int(row.get("planned_epochs") or max(marks.height, 1)),
            finished=True,
            power_cap_w=row.get("band_cap_w"),  # the cap of the summary's (aggregator's) band
            gpu_model=row.get("gpu_model"),
            total_duration_s=row.get("duration_s"),
        )
        try:
            path = write_report(
                samples,
                marks if marks.height else None,
                plan,
                folder / f"{run_id}.html",
                title=f"{run_id}: {row.get('architecture')} on {row['node_type']}",
            )
        except BadInputError as err:
            log.warning("no report for %s: %s", run_id, err)
            continue
        files.append(str(path))
    out = folder / "summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    files.append(str(out))
    return {"dir": str(folder), "files": files}


# ------------------------------------------------------------------------------------ replay


def replay(
    store: Store,
    source: str | Path,
    *,
    speed: float = 100.0,
    runs: Sequence[str] | None = None,
    count: int = 4,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Replay recorded runs through sidecars, the aggregator, STEP and PRE (module docstring).

    Args:
        store: The store the aggregator writes to (replayed runs get new ids
            ``replay-<original>-<time>``).
        source: A SEAA 2023 style folder (``runs.parquet``, ``traces.parquet``)
            or a wattwise store (``runs.parquet``, ``samples/``, ``epochs.parquet``).
        speed: Replay speed (1.0 = real time).
        runs: Run ids to replay; default ``count`` runs covering every GPU model.
        count: Runs to pick when ``runs`` is not given.
        progress: Called with progress events.

    Raises:
        BadInputError: No usable source there, an unknown run id, a bad speed.

    """
    from cluster.demo_replay import replay_runs

    out: dict[str, Any] = replay_runs(
        store, Path(source), speed=speed, runs=runs, count=count, progress=progress
    )
    return out
