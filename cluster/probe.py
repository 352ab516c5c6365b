"""Probes: a job briefly on each node type at once, its full run projected per type, recommended.

Each probe is an ordinary run (:func:`cluster.runner.run_job`) planned for the
full number of epochs; it is stopped as soon as the aggregator's STEP
projection calls it stable, or at the time limit. The last live projection
(with its band) stands for the full run on that node type; the node type
with the least projected energy is recommended. Probe runs are stored as
``finished`` with the epochs they trained (``config.probe = true``), so the
next PRE retrain learns from them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from profiler.errors import BadInputError


def probe(
    command: Sequence[str],
    *,
    node_types: Sequence[str] | None = None,
    time_limit_s: float = 300.0,
    epochs: int | None = None,
    min_epochs: int = 3,
    **run_options: Any,
) -> dict[str, Any]:
    """Probe ``command`` on several node types in parallel (needs a connected Ray cluster).

    Args:
        command: The job (planned for the full run).
        node_types: Node types to probe (default: every node type with alive nodes).
        time_limit_s: Longest probe per node type in s (from its start).
        epochs: Planned epochs of the full run (default from a ``wattwise
            train`` command's ``--epochs``).
        min_epochs: Finished epochs needed before a stable projection may stop a probe.
        **run_options: Passed to :func:`cluster.runner.run_job` (``store_root``,
            ``num_cpus``, ``sidecar_options``, ...).

    Returns:
        ``{"planned_epochs", "node_types": [{node_type, run_id, status,
        stopped_by, epochs_done, measured_energy_j, projected_energy_j,
        lower_j, upper_j, stable, reason}], "recommendation": {node_type,
        projected_energy_j, lower_j, upper_j, stable} | None}``; energies in J,
        projected by STEP. A probe whose command failed has no projection
        (``projected_energy_j``, ``lower_j`` and ``upper_j`` are ``None``,
        ``stable`` is false) and its ``reason`` says why; one that ended on its
        own is projected at its measured total.

    Raises:
        BadInputError: Unknown node types, none alive, or no planned epochs.

    """
    from cluster.placement import check_node_type
    from cluster.runner import cluster_node_types, job_from_command, run_job

    types = cluster_node_types()
    if node_types is None:
        chosen = [k for k, v in types.items() if v["alive"]]
        if not chosen:
            raise BadInputError(
                "probe: this Ray cluster has no node types with alive nodes; give nodes a "
                "'node_type:<name>' resource (ray start --resources)"
            )
    else:
        chosen = list(dict.fromkeys(node_types))
        for t in chosen:
            check_node_type(t, types)
    if epochs is None:
        job = job_from_command(command)
        epochs = job.planned_epochs if job is not None else None
    if epochs is None or epochs <= 0:
        raise BadInputError(
            "probe: STEP projects the full run, so it needs the planned epochs; pass --epochs N"
        )

    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, BaseException] = {}

    def one(node_type: str) -> None:
        last: dict[str, Any] = {}

        def watch(status: dict[str, Any]) -> bool:
            proj = status.get("projection") or {}
            if proj.get("energy_j") is not None:
                last.clear()
                last.update(proj, epochs_done=status.get("epochs_done"))
            return bool(proj.get("stable")) and int(status.get("epochs_done") or 0) >= min_epochs

        res = run_job(
            command,
            node_type=node_type,
            epochs=epochs,
            stop_when=watch,
            time_limit_s=time_limit_s,
            extra_config={"probe": True},
            **run_options,
        )
        s = res.summary
        reason = ""
        if not res.stopped and res.status == "finished":
            # The command ended on its own: the whole run was measured.
            proj = {"energy_j": s.get("measured_energy_j"), "stable": True}
            proj.update(lower_j=proj["energy_j"], upper_j=proj["energy_j"])
            stopped_by = "completed"
        elif not res.stopped:
            # It crashed: what it measured is part of a run, not the full run's energy.
            proj = {}
            stopped_by = "failed"
            reason = (
                f"the probe failed (exit status {res.returncode}) after "
                f"{s.get('epochs_done') or 0} of the {epochs} planned epochs"
                + (f": {res.error}" if res.error else "")
                + "; its measured energy is not the full run's, so nothing is projected"
            )
        else:
            proj = last
            stopped_by = "stable" if last.get("stable") else "time limit"
        results[node_type] = {
            "node_type": node_type,
            "run_id": res.run_id,
            "status": res.status,
            "stopped_by": stopped_by,
            "epochs_done": s.get("epochs_done"),
            "measured_energy_j": s.get("measured_energy_j"),
            "duration_s": s.get("duration_s"),
            "projected_energy_j": proj.get("energy_j"),
            "lower_j": proj.get("lower_j"),
            "upper_j": proj.get("upper_j"),
            "stable": bool(proj.get("stable")),
            "reason": reason,
        }

    def guarded(node_type: str) -> None:
        # Any failure, in the run or in reading its result, is reported per node type
        # below (a thread's exception would otherwise drop the node type silently).
        try:
            one(node_type)
        except BaseException as err:
            errors[node_type] = err

    threads = [threading.Thread(target=guarded, args=(t,), name=f"probe-{t}") for t in chosen]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors and not results:
        first = next(iter(errors.values()))
        raise first
    rows = [results[t] for t in chosen if t in results]
    for t, err in errors.items():
        rows.append({"node_type": t, "status": "error", "error": f"{type(err).__name__}: {err}"})
    ranked = sorted(
        (r for r in rows if r.get("projected_energy_j") is not None and r["status"] == "finished"),
        key=lambda r: (not r["stable"], r["projected_energy_j"]),
    )
    best = ranked[0] if ranked else None
    return {
        "planned_epochs": epochs,
        "node_types": rows,
        "recommendation": None
        if best is None
        else {
            k: best[k]
            for k in ("node_type", "projected_energy_j", "lower_j", "upper_j", "stable", "run_id")
        },
        "source": "projected (STEP) from probe runs",
    }


def format_probe(result: dict[str, Any]) -> str:
    """A plain-text table of a probe's result."""
    lines = [f"probe of a {result['planned_epochs']}-epoch job, projected by STEP:"]
    for r in result["node_types"]:
        if r.get("status") == "error":
            lines.append(f"  {r['node_type']}: {r['error']}")
            continue
        e, lo, hi = r.get("projected_energy_j"), r.get("lower_j"), r.get("upper_j")
        band = f" [{lo:.0f}, {hi:.0f}]" if lo is not None and hi is not None else ""
        proj = f"{e:.0f} J{band}" if e is not None else "n/a"
        if e is None and r.get("reason"):
            proj += f", not stable: {r['reason']}"
        elif not r["stable"]:
            proj += " (not stable)"
        lines.append(
            f"  {r['node_type']}: run {r['run_id']}, {r['epochs_done']} epochs "
            f"({r['stopped_by']}), measured {(r['measured_energy_j'] or 0):.0f} J, "
            f"projected {proj}"
        )
    rec = result.get("recommendation")
    lines.append(
        f"recommended: {rec['node_type']} ({rec['projected_energy_j']:.0f} J projected)"
        if rec
        else "no recommendation: no probe produced a projection"
    )
    return "\n".join(lines)
