"""Generate wattwise's Grafana dashboards (plain Python and json, no other dependency).

Run ``python deploy/grafana/generate.py`` after changing a panel; it rewrites
``deploy/grafana/dashboards/*.json``. ``--check`` exits 1 when the files on
disk differ from what this script produces (CI and the tests use it).

Every panel queries the Prometheus data source chosen by the ``datasource``
variable. Template variables used in expressions: ``$run_id`` (job view) and
Grafana's built-in ``$__range`` (the dashboard's time range, for "today").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}

RUN = 'run_id="$run_id"'


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> dict[str, Any]:
    """One PromQL query of a panel."""
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "refId": ref, "legendFormat": legend}
    if instant:
        t["instant"] = True
        t["range"] = False
        t["format"] = "table"
    return t


def panel(
    pid: int,
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    pos: tuple[int, int, int, int],
    *,
    unit: str = "short",
    overrides: list[dict[str, Any]] | None = None,
    custom: dict[str, Any] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A panel: ``pos`` is (x, y, width, height) on Grafana's 24-column grid."""
    x, y, w, h = pos
    refs = "ABCDEFGH"
    for i, t in enumerate(targets):
        t["refId"] = refs[i]
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": custom or {}, "mappings": mappings or []},
            "overrides": overrides or [],
        },
        "options": options or {},
    }


def datasource_var() -> dict[str, Any]:
    """The Prometheus data source picker."""
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    *,
    variables: list[dict[str, Any]] | None = None,
    time_from: str = "now-6h",
) -> dict[str, Any]:
    """A whole dashboard."""
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["wattwise", "energy"],
        "editable": True,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": time_from, "to": "now"},
        "timezone": "utc",
        "templating": {"list": [datasource_var(), *(variables or [])]},
        "annotations": {"list": []},
        "links": [
            {"title": "wattwise", "type": "dashboards", "tags": ["wattwise"], "asDropdown": True}
        ],
        "panels": panels,
    }


def band_overrides() -> list[dict[str, Any]]:
    """Shade the STEP band: the lower line fills up to the upper one."""
    return [
        {
            "matcher": {"id": "byName", "options": "STEP lower"},
            "properties": [
                {"id": "custom.fillBelowTo", "value": "STEP upper"},
                {"id": "custom.lineWidth", "value": 0},
                {"id": "custom.fillOpacity", "value": 20},
            ],
        },
        {
            "matcher": {"id": "byName", "options": "STEP upper"},
            "properties": [{"id": "custom.lineWidth", "value": 0}],
        },
        {
            "matcher": {"id": "byName", "options": "measured"},
            "properties": [{"id": "custom.lineWidth", "value": 2}],
        },
    ]


def cluster_overview() -> dict[str, Any]:
    """Power by node type, running jobs, energy today, sidecar health."""
    panels = [
        panel(
            1,
            "timeseries",
            "Power by node type (jobs, measured)",
            "Sum of the current power of running wattwise jobs per node type (W), derived by "
            "the aggregator from measured samples.",
            [target("sum by (node_type) (wattwise_job_power_watts)", "{{node_type}}")],
            (0, 0, 12, 8),
            unit="watt",
        ),
        panel(
            2,
            "timeseries",
            "GPU power by host (dcgm-exporter)",
            "Board power of every GPU as dcgm-exporter reports it (W), summed per host; "
            "includes GPUs not running a wattwise job.",
            [target("sum by (Hostname) (DCGM_FI_DEV_POWER_USAGE)", "{{Hostname}}")],
            (12, 0, 12, 8),
            unit="watt",
        ),
        panel(
            3,
            "stat",
            "Running jobs",
            "Runs the aggregator holds as running, all node types.",
            [target("sum(wattwise_jobs_running) or vector(0)", "running")],
            (0, 8, 4, 5),
        ),
        panel(
            4,
            "bargauge",
            "Running jobs by node type",
            "Runs the aggregator holds as running, per node type.",
            [target("sum by (node_type) (wattwise_jobs_running)", "{{node_type}}")],
            (4, 8, 8, 5),
        ),
        panel(
            5,
            "stat",
            "Energy today (jobs, measured)",
            "Energy measured for wattwise jobs over the dashboard's range (default: today so "
            "far), in kWh: increase of wattwise_job_energy_joules_total.",
            [
                target(
                    "sum(increase(wattwise_job_energy_joules_total[$__range])) / 3.6e6",
                    "kWh",
                )
            ],
            (12, 8, 6, 5),
            unit="kwatth",
        ),
        panel(
            6,
            "stat",
            "GPU energy today (dcgm-exporter)",
            "Energy of every GPU over the dashboard's range from dcgm-exporter's energy counter "
            "(mJ), in kWh.",
            [
                target(
                    "sum(increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[$__range])) / 3.6e9",
                    "kWh",
                )
            ],
            (18, 8, 6, 5),
            unit="kwatth",
        ),
        panel(
            7,
            "table",
            "Jobs",
            "Every run the aggregator holds, with its status and measured energy so far (kWh).",
            [
                target(
                    "sum by (run_id, job_name, node_type) "
                    "(wattwise_job_energy_joules_total) / 3.6e6",
                    "",
                    instant=True,
                )
            ],
            (0, 13, 12, 8),
            unit="kwatth",
        ),
        panel(
            8,
            "timeseries",
            "Sidecar health",
            "Rows per second each node's sidecar delivered (sent), wrote to its spill journal "
            "(spilled: the aggregator was unreachable) and lost (neither took them).",
            [
                target(
                    "sum by (node) (rate(wattwise_sidecar_sent_samples_total[1m]))",
                    "{{node}} sent",
                ),
                target(
                    "sum by (node) (rate(wattwise_sidecar_spilled_samples_total[1m]))",
                    "{{node}} spilled",
                ),
                target(
                    "sum by (node) (rate(wattwise_sidecar_lost_samples_total[1m]))",
                    "{{node}} lost",
                ),
            ],
            (12, 13, 12, 8),
            unit="rowsps",
        ),
        panel(
            9,
            "timeseries",
            "Aggregator backlog and node lag",
            "Samples waiting for the store, and per node the delay (s) between its newest "
            "sample and its arrival (negative: the node's clock is ahead).",
            [
                target("wattwise_aggregator_pending_samples", "pending samples"),
                target("max by (node) (wattwise_aggregator_node_lag_seconds)", "{{node}} lag s"),
            ],
            (0, 21, 24, 7),
        ),
    ]
    return dashboard(
        "wattwise-cluster",
        "wattwise / Cluster overview",
        "Power by node type, running jobs, energy today, sidecar health.",
        panels,
        time_from="now/d",
    )


def job_view() -> dict[str, Any]:
    """One job: power trace, per-epoch energy, STEP band against measured, stable point."""
    run_var = {
        "name": "run_id",
        "label": "Run",
        "type": "query",
        "datasource": DS,
        "query": {"query": "label_values(wattwise_job_info, run_id)", "refId": "runs"},
        "definition": "label_values(wattwise_job_info, run_id)",
        "refresh": 2,
        "sort": 1,
        "current": {},
        "hide": 0,
    }
    panels = [
        panel(
            1,
            "timeseries",
            "Power",
            "The run's current power (W): all its devices, measured.",
            [target(f"wattwise_job_power_watts{{{RUN}}}", "power")],
            (0, 0, 12, 8),
            unit="watt",
        ),
        panel(
            2,
            "timeseries",
            "Energy: measured against the STEP projection",
            "Measured energy so far (J) and STEP's projection of the whole run with its band "
            "(shaded). The band narrows once a stable regime is found.",
            [
                target(f"wattwise_job_energy_joules_total{{{RUN}}}", "measured"),
                target(f"wattwise_job_projected_energy_joules{{{RUN}}}", "STEP projection"),
                target(f"wattwise_job_projected_energy_lower_joules{{{RUN}}}", "STEP lower"),
                target(f"wattwise_job_projected_energy_upper_joules{{{RUN}}}", "STEP upper"),
            ],
            (12, 0, 12, 8),
            unit="joule",
            overrides=band_overrides(),
        ),
        panel(
            3,
            "timeseries",
            "Per-epoch energy",
            "Energy of the last finished epoch (J), a step per epoch; and its duration (s).",
            [
                target(f"wattwise_job_last_epoch_energy_joules{{{RUN}}}", "epoch energy J"),
                target(f"wattwise_job_last_epoch_duration_seconds{{{RUN}}}", "epoch duration s"),
            ],
            (0, 8, 12, 8),
            unit="joule",
            custom={"drawStyle": "line", "lineInterpolation": "stepAfter"},
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "epoch duration s"},
                    "properties": [
                        {"id": "unit", "value": "s"},
                        {"id": "custom.axisPlacement", "value": "right"},
                    ],
                }
            ],
        ),
        panel(
            4,
            "stat",
            "Stable",
            "Whether STEP found and trusts a stable regime (1) or not yet (0).",
            [target(f"wattwise_job_stable{{{RUN}}}", "stable")],
            (12, 8, 4, 4),
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "not yet", "color": "orange"},
                        "1": {"text": "stable", "color": "green"},
                    },
                }
            ],
        ),
        panel(
            5,
            "stat",
            "Stable from epoch",
            "First epoch (0-based, in the order seen) of the stable regime STEP projects from.",
            [target(f"wattwise_job_stable_epoch{{{RUN}}}", "epoch")],
            (16, 8, 4, 4),
        ),
        panel(
            6,
            "gauge",
            "Epochs done",
            "Finished epochs as a percentage of the planned epochs.",
            [
                target(
                    f"100 * wattwise_job_epochs_done{{{RUN}}}"
                    f" / wattwise_job_epochs_planned{{{RUN}}}",
                    "done %",
                )
            ],
            (20, 8, 4, 4),
            unit="percent",
        ),
        panel(
            7,
            "stat",
            "Projected energy still to come",
            "STEP projection minus measured energy (J): what the rest of the run will use.",
            [
                target(
                    f"wattwise_job_projected_energy_joules{{{RUN}}} - "
                    f"wattwise_job_energy_joules_total{{{RUN}}}",
                    "remaining",
                )
            ],
            (12, 12, 6, 4),
            unit="joule",
        ),
        panel(
            8,
            "stat",
            "Epochs",
            "Epochs finished and planned.",
            [
                target(f"wattwise_job_epochs_done{{{RUN}}}", "done"),
                target(f"wattwise_job_epochs_planned{{{RUN}}}", "planned"),
            ],
            (18, 12, 6, 4),
        ),
    ]
    return dashboard(
        "wattwise-job",
        "wattwise / Job",
        "One run: power, per-epoch energy, STEP projection band against measured, stable point.",
        panels,
        variables=[run_var],
        time_from="now-1h",
    )


def fleet_view() -> dict[str, Any]:
    """Energy per sample by architecture and node type, savings, PRE error over time."""
    eps = "wattwise_node_type_energy_per_sample_joules"
    panels = [
        panel(
            1,
            "bargauge",
            "Energy per training sample",
            "Measured energy of finished runs divided by the training samples they saw "
            "(trained epochs x training set size), per architecture and node type (J).",
            [target(f"{eps}", "{{architecture}} on {{node_type}}")],
            (0, 0, 12, 9),
            unit="joule",
        ),
        panel(
            2,
            "bargauge",
            "Recommendation savings",
            "How much energy per sample each architecture would save on the best measured "
            "node type for it instead of this one (%); 0 on the recommended node type.",
            [
                target(
                    f"100 * (1 - (min by (architecture) ({eps}) "
                    f"/ on (architecture) group_right {eps}))",
                    "{{architecture}} on {{node_type}}",
                )
            ],
            (12, 0, 12, 9),
            unit="percent",
        ),
        panel(
            3,
            "timeseries",
            "PRE validation error over time",
            "Energy MAPE (%) of the newest PRE retrain on held-out runs, and the version in use.",
            [
                target("wattwise_pre_validation_mape_percent", "validation MAPE %"),
                target("wattwise_pre_model_version", "model version"),
            ],
            (0, 9, 12, 8),
            unit="percent",
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "model version"},
                    "properties": [
                        {"id": "unit", "value": "none"},
                        {"id": "custom.axisPlacement", "value": "right"},
                    ],
                }
            ],
        ),
        panel(
            4,
            "stat",
            "Last retrain",
            "Whether the newest PRE retrain was accepted (1) or kept the old model (0), and the "
            "runs it trained on.",
            [
                target("wattwise_pre_last_retrain_accepted", "accepted"),
                target("wattwise_pre_training_runs", "training runs"),
            ],
            (12, 9, 6, 8),
        ),
        panel(
            5,
            "bargauge",
            "Finished runs per node type",
            "Finished runs behind the energy per sample.",
            [target("sum by (node_type) (wattwise_node_type_finished_runs)", "{{node_type}}")],
            (18, 9, 6, 8),
        ),
        panel(
            6,
            "timeseries",
            "Mean GPU power by model (dcgm-exporter)",
            "Average board power per GPU model across the fleet (W).",
            [target("avg by (modelName) (DCGM_FI_DEV_POWER_USAGE)", "{{modelName}}")],
            (0, 17, 24, 8),
            unit="watt",
        ),
    ]
    return dashboard(
        "wattwise-fleet",
        "wattwise / Fleet",
        "Energy per sample by architecture and node type, recommendation savings, PRE error.",
        panels,
        time_from="now-7d",
    )


DASHBOARDS = {
    "cluster-overview.json": cluster_overview,
    "job.json": job_view,
    "fleet.json": fleet_view,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(fn(), indent=2) + "\n" for name, fn in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards (or, with ``--check``, compare them with the files)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards {stale}: run python deploy/grafana/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
