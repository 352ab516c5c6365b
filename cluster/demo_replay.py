"""``wattwise demo --replay``: recorded runs through sidecars, the aggregator, STEP and PRE.

Each picked run gets its own sidecar actor, pinned to the worker node of its
GPU's node type, whose only source replays the run's recorded power trace
(:class:`profiler.sources.replay.ReplaySource`: the recorded samples with
their own spacing, released ``speed`` times faster than they were taken, so
the energy is exactly the recorded energy). A driver thread per run hands the
run's epoch marks to the aggregator once the replayed clock has passed them:
the marks recorded in a wattwise store, or, for the SEAA 2023 traces, which
have none, ``trained_epochs`` equal slices of the run's time (said so in the
summary). The aggregator integrates, aligns and projects exactly as for a live
run; at the end the runs are finished, PRE is retrained on the store and asked
to recommend a node type for the first replayed job.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.demo import Progress, _Watch, band_cap_w, local_cluster, write_reports
from profiler.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl

    from profiler.store import Store

log = logging.getLogger(__name__)


def _node_type_name(gpu_model: str) -> str:
    """A node type name for a GPU model: ``NVIDIA GeForce RTX 3090`` -> ``rtx3090``."""
    from estimators.features import gpu_key

    try:
        name = gpu_key(gpu_model)
    except BadInputError:
        name = gpu_model
    return "".join(c for c in name.lower() if c.isalnum()) or "gpu"


def _load(source: Path) -> tuple[pl.DataFrame, str]:
    """The recorded runs of ``source`` and its kind (``seaa2023`` or ``store``)."""
    import polars as pl

    if (source / "traces.parquet").is_file() and (source / "runs.parquet").is_file():
        runs = pl.read_parquet(source / "runs.parquet")
        if "has_trace" in runs.columns:
            runs = runs.filter(pl.col("has_trace"))
        return runs, "seaa2023"
    if (source / "runs.parquet").is_file() and (source / "samples").is_dir():
        from profiler.store import Store

        runs = Store(source).runs().filter(pl.col("status") == "finished")
        return runs, "store"
    raise BadInputError(
        f"{source}: expected a SEAA 2023 style folder (runs.parquet and traces.parquet) or a "
        "wattwise store (runs.parquet and samples/); found neither"
    )


def _pick(
    runs: pl.DataFrame,
    wanted: Sequence[str] | None,
    count: int,
    has_samples: Callable[[str], bool] | None = None,
) -> pl.DataFrame:
    """The runs to replay: ``wanted``, else per (architecture, GPU) the median-length run.

    Args:
        runs: The recorded runs (:func:`_load`).
        wanted: Run ids asked for (``--runs``), or ``None`` to pick.
        count: Runs to pick when ``wanted`` is not given.
        has_samples: Whether a run has recorded power samples (default: every
            run has). A run without any cannot be replayed: it is never picked,
            and asking for one is refused.

    Raises:
        BadInputError: An unknown run id or one without samples in ``wanted``;
            ``count`` < 1; no run with samples to pick.

    """
    import polars as pl

    replayable = has_samples or (lambda _run_id: True)
    if wanted:
        known = set(runs["run_id"].to_list())
        missing = [r for r in wanted if r not in known]
        if missing:
            raise BadInputError(
                f"--runs: unknown run ids {missing}; the source has {len(known)} runs, e.g. "
                f"{sorted(known)[:5]}"
            )
        empty = [r for r in wanted if not replayable(r)]
        if empty:
            raise BadInputError(
                f"--runs: expected runs with recorded power samples to replay; {empty} have "
                "none (runs imported without a power trace, such as the SEAA 2023 GTX 750 Ti "
                "runs, cannot be replayed)"
            )
        return runs.filter(pl.col("run_id").is_in(list(wanted)))
    if count < 1:
        raise BadInputError(f"expected at least one run to replay; found count={count}")
    gpus = runs["gpu_model"].drop_nulls().unique().sort().to_list()
    picked: list[str] = []
    # Architectures recorded on every GPU first, so the replay compares GPUs for one job.
    archs = (
        runs.group_by("architecture")
        .agg(pl.col("gpu_model").n_unique().alias("n"))
        .sort(["n", "architecture"], descending=[True, False])["architecture"]
        .to_list()
    )
    for arch in archs:
        for gpu in gpus:
            part = runs.filter((pl.col("architecture") == arch) & (pl.col("gpu_model") == gpu))
            if part.height == 0 or len(picked) >= count:
                continue
            med = part["duration_s"].median()
            if med is not None:
                part = part.with_columns(
                    (pl.col("duration_s") - float(med)).abs().alias("_d")  # type: ignore[arg-type]
                ).sort("_d", nulls_last=True)
            # The median-length run, else the nearest one to it that has samples.
            best = next((str(r) for r in part["run_id"] if replayable(str(r))), None)
            if best is not None:
                picked.append(best)
    if not picked:
        raise BadInputError(
            f"expected a run with recorded power samples to replay; none of the source's "
            f"{runs.height} runs has any"
        )
    return runs.filter(pl.col("run_id").is_in(picked))


def _plan(
    source: Path, wanted: Sequence[str] | None, count: int
) -> tuple[str, pl.DataFrame, list[dict[str, Any]]]:
    """Everything a replay needs before Ray starts: the picked runs, their traces and marks.

    Returns:
        The source's kind, the picked runs, and per picked run a dict with its
        ``row``, ``trace`` and epoch ``marks`` (and ``marks_from``).

    Raises:
        BadInputError: No usable source, a bad ``--runs`` id (unknown, or
            without samples), a run without epoch marks or ``trained_epochs``.

    """
    recorded, kind = _load(source)
    traces: dict[str, pl.DataFrame] = {}

    def samples_of(run_id: str) -> pl.DataFrame:
        if run_id not in traces:
            traces[run_id] = _trace(source, kind, run_id)
        return traces[run_id]

    picked = _pick(recorded, wanted, count, has_samples=lambda r: samples_of(r).height > 0)
    plans = []
    for row in picked.iter_rows(named=True):
        trace = samples_of(str(row["run_id"]))
        marks, marks_from = _marks(source, kind, row, trace)
        plans.append({"row": row, "trace": trace, "marks": marks, "marks_from": marks_from})
    return kind, picked, plans


def _trace(source: Path, kind: str, run_id: str) -> pl.DataFrame:
    from profiler.sources.replay import load_trace

    if kind == "seaa2023":
        return load_trace(source / "traces.parquet", run_ids=[run_id])
    from profiler.store import Store

    return (
        Store(source).samples(run_id).select("device", "model", "timestamp", "power_w", "energy_j")
    )


def _bounds(trace: pl.DataFrame, run_id: Any) -> tuple[datetime, datetime]:
    """A trace's first and last sample times; BadInputError for a trace without samples."""
    t0, t1 = trace["timestamp"].min(), trace["timestamp"].max()
    if not (isinstance(t0, datetime) and isinstance(t1, datetime)):
        raise BadInputError(
            f"run {run_id!r}: expected recorded power samples to replay; found {trace.height} "
            "samples with a time"
        )
    return t0, t1


def _span_s(trace: pl.DataFrame) -> float:
    """Seconds from a trace's first sample to its last."""
    t0, t1 = _bounds(trace, None)
    return (t1 - t0).total_seconds()


def _marks(
    source: Path, kind: str, row: dict[str, Any], trace: pl.DataFrame
) -> tuple[list[tuple[float, float]], str]:
    """Epoch (start, end) offsets in s from the trace's first sample, and where they came from."""
    t0, t1 = _bounds(trace, row["run_id"])
    if kind == "store":
        from profiler.store import Store

        ep = Store(source).epochs(str(row["run_id"])).sort("epoch")
        if ep.height:
            return [
                ((s - t0).total_seconds(), (e - t0).total_seconds())
                for s, e in zip(ep["start"], ep["end"], strict=True)
            ], "recorded epoch marks"
    n = int(row.get("trained_epochs") or 0)
    if n < 1:
        raise BadInputError(
            f"run {row['run_id']!r}: no epoch marks and no trained_epochs to slice its time by"
        )
    span = (t1 - t0).total_seconds()
    return [
        (span * k / n, span * (k + 1) / n) for k in range(n)
    ], f"no epoch marks recorded: {n} equal slices of the run's time"


def replay_runs(
    store: Store,
    source: Path,
    *,
    speed: float,
    runs: Sequence[str] | None,
    count: int,
    progress: Progress | None,
) -> dict[str, Any]:
    """See :func:`cluster.demo.replay`."""
    import ray

    from cluster.actors import aggregator, sidecar_actor
    from cluster.demo import _retrain

    if not (speed > 0 and math.isfinite(speed)):
        raise BadInputError(f"--speed must be a number > 0 (1 = real time); found {speed}")
    t_start = time.monotonic()
    note = progress or (lambda *_: None)
    # Every refusal (no source, bad --runs, a run without samples or marks) before Ray starts.
    kind, picked, plans = _plan(Path(source), runs, count)
    if kind == "seaa2023":  # PRE learns from the whole dataset, as after `wattwise import`
        from profiler.importers.seaa2023 import import_seaa2023

        import_seaa2023(store, Path(source))
    types = sorted({_node_type_name(str(g)) for g in picked["gpu_model"].to_list()})
    per_type = {t: 0 for t in types}
    for g in picked["gpu_model"].to_list():
        per_type[_node_type_name(str(g))] += 1
    root = str(store.root.resolve())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    summary: dict[str, Any] = {
        "mode": "replay",
        "store": root,
        "source": str(source),
        "speed": speed,
        "cluster": {"nodes": 1 + len(types), "node_types": types},
        "jobs": [],
    }
    with local_cluster([(t, per_type[t]) for t in types]):
        note("note", f"Ray cluster up: head + {', '.join(types)}; replaying at {speed:g}x")
        agg = aggregator(root)
        nodes = {
            next(k.split(":", 1)[1] for k in n["Resources"] if k.startswith("node_type:")): n
            for n in ray.nodes()  # type: ignore[no-untyped-call]
            if n.get("Alive") and any(k.startswith("node_type:") for k in n["Resources"])
        }
        plays = []
        for plan in plans:
            row, trace, marks, marks_from = (
                plan["row"], plan["trace"], plan["marks"], plan["marks_from"]
            )  # fmt: skip
            orig = str(row["run_id"])
            nt = _node_type_name(str(row["gpu_model"]))
            run_id = f"replay-{orig}-{stamp}"[:120]
            recorded_j = row.get("gpu_energy_j") or row.get("energy_j")
            start_row = {
                "run_id": run_id,
                "job_name": f"replay of {orig}",
                "node_type": nt,
                "gpu_model": row.get("gpu_model"),
                "gpu_count": 1,
                "architecture": row.get("architecture"),
                "batch_size": row.get("batch_size"),
                "training_size": row.get("training_size"),
                "validation_size": row.get("validation_size"),
                "gflops_forward": row.get("gflops_forward"),
                "planned_epochs": len(marks),
                "status": "running",
                "start": datetime.now(UTC),
                "config": json.dumps(
                    {"replay_of": orig, "speed": speed, "epoch_marks": marks_from}
                ),
            }
            ray.get(agg.start_run.remote(start_row), timeout=60)
            node = nodes[nt]
            anchor = datetime.now(UTC)
            side = sidecar_actor(
                node["NodeID"],
                f"{nt}-{orig}",
                [("replay", {"trace": trace, "speed": speed, "anchor": anchor})],
                name=f"wattwise-replay-{run_id}"[:100],
                run_id=run_id,
                interval_s=0.5,
                batch_interval_s=1.0,
                journal_dir=str(store.root / "journal" / run_id),
            )
            watch = _Watch(agg, len(marks), progress)
            watch.start(run_id, {})
            plays.append(
                {
                    "orig": orig,
                    "row": row,
                    "run_id": run_id,
                    "node_type": nt,
                    "marks": marks,
                    "marks_from": marks_from,
                    "anchor": anchor,
                    "sidecar": side,
                    "watch": watch,
                    "recorded_j": recorded_j,
                    "rows": trace.height,
                    "band_cap_w": band_cap_w(start_row),
                    "span_s": _span_s(trace),
                }
            )
        threads = [threading.Thread(target=_play, args=(agg, p, speed), daemon=True) for p in plays]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in plays:
            p["watch"].done.set()
            s = p["final"]
            at = p["watch"].at_fifth or {}
            summary["jobs"].append(
                {
                    "run_id": p["run_id"],
                    "replay_of": p["orig"],
                    "node_type": p["node_type"],
                    "gpu_model": p["row"].get("gpu_model"),
                    "architecture": p["row"].get("architecture"),
                    "status": s.get("status"),
                    "planned_epochs": len(p["marks"]),
                    "epochs": int(s.get("epochs_done") or 0),
                    "epoch_marks": p["marks_from"],
                    "measured_energy_j": s.get("measured_energy_j"),
                    "recorded_energy_j": p["recorded_j"],
                    "duration_s": s.get("duration_s"),
                    "energy_source": "measured (replayed recording)",
                    "projected_energy_j": at.get("energy_j"),
                    "lower_j": at.get("lower_j"),
                    "upper_j": at.get("upper_j"),
                    "stable_at_fifth": bool(at.get("stable")),
                    "projected_after_epochs": at.get("after_epochs"),
                    "projection_from": "aggregator",
                    "band_cap_w": p["band_cap_w"],
                    "samples_sent": p.get("sent"),
                }
            )
        try:
            summary["model"], model = _retrain(store)
        except BadInputError as err:
            summary["model"], model = {"version": None, "rows": 0, "reason": str(err)}, None
        summary["recommendation"] = _recommend(model, picked)
    summary["reports"] = write_reports(store, summary)
    summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return summary


def _play(agg: Any, p: dict[str, Any], speed: float) -> None:
    """Send one run's marks as its replayed clock passes them; then flush, finish, stop."""
    import polars as pl
    import ray

    wall0 = time.monotonic()
    anchor: datetime = p["anchor"]
    for k, (s, e) in enumerate(p["marks"]):
        due = wall0 + e / speed
        time.sleep(max(0.0, due - time.monotonic()))
        ray.get(
            agg.ingest_epochs.remote(
                pl.DataFrame(
                    {
                        "run_id": [p["run_id"]],
                        "epoch": [k],
                        "start": [anchor + timedelta(seconds=s)],
                        "end": [anchor + timedelta(seconds=e)],
                    },
                    schema={
                        "run_id": pl.String,
                        "epoch": pl.Int64,
                        "start": pl.Datetime("us", "UTC"),
                        "end": pl.Datetime("us", "UTC"),
                    },
                )
            ),
            timeout=60,
        )
    # The source's clock started when its actor came up: wait until it has played every row.
    deadline = time.monotonic() + 120 + p["span_s"] / speed
    while ray.get(p["sidecar"].stats.remote(), timeout=60)["samples"] < p["rows"]:
        if time.monotonic() > deadline:
            log.warning("replay of %s: not every recorded sample was played", p["orig"])
            break
        time.sleep(0.2)
    stats = ray.get(p["sidecar"].stop.remote(), timeout=120)
    p["sent"] = stats.get("sent")
    ray.kill(p["sidecar"])
    p["final"] = ray.get(agg.finish_run.remote(p["run_id"], "finished"), timeout=120)


def _recommend(model: Any, picked: pl.DataFrame) -> dict[str, Any]:
    """PRE's node-type recommendation for the first replayed job among the replay's GPUs.

    A GPU described by its run's ``config.gpu_spec`` (the live demo's modelled
    CPUs) is given to PRE by those numbers. When PRE cannot answer (a GPU it
    does not know, a job it cannot describe), the recommendation is not
    available and ``reason`` says why: the replay's summary and reports are
    still written.
    """
    from cluster.demo import recommendation_summary
    from estimators.features import JobDescription
    from estimators.recommend import NodeType

    if model is None:
        return {"node_type": None, "predicted_energy_j": None, "reason": "no PRE model"}
    first = picked.row(0, named=True)
    try:
        inventory = [
            NodeType(_node_type_name(g), _gpu_spec(picked, g) or g)
            for g in sorted({str(g) for g in picked["gpu_model"].to_list()})
        ]
        missing = [
            k for k in ("architecture", "batch_size", "training_size") if first.get(k) is None
        ]
        if missing:
            raise BadInputError(
                f"run {first['run_id']!r}: expected {', '.join(missing)} to describe the job to "
                "PRE; the run does not record them"
            )
        gflops = first.get("gflops_forward")
        height, width = first.get("image_height"), first.get("image_width")
        job = JobDescription(
            architecture=str(first["architecture"]),
            batch_size=int(first["batch_size"]),
            training_size=int(first["training_size"]),
            validation_size=int(first.get("validation_size") or 0),
            image_height=None if height is None else int(height),
            image_width=None if width is None else int(width),
            gflops_forward=None if gflops is None else float(gflops),
            planned_epochs=int(first.get("trained_epochs") or 1),
        )
        return recommendation_summary(model, job, inventory)
    except BadInputError as err:
        return {
            "node_type": None,
            "predicted_energy_j": None,
            "reason": f"no recommendation for {first['run_id']!r}: {err}",
        }


def _gpu_spec(picked: pl.DataFrame, gpu_model: str) -> dict[str, Any] | None:
    """The device numbers a run of ``gpu_model`` recorded in ``config.gpu_spec``, if any."""
    if "config" not in picked.columns:
        return None
    for row in picked.iter_rows(named=True):
        if str(row["gpu_model"]) != gpu_model or not row.get("config"):
            continue
        try:
            spec = json.loads(str(row["config"])).get("gpu_spec")
        except (ValueError, AttributeError):  # not a JSON object: no spec recorded
            continue
        if isinstance(spec, dict):
            # Unnamed, PRE filed it under the run's gpu_model: the same name here.
            return spec if spec.get("name") else {**spec, "name": gpu_model}
    return None
