"""``wattwise demo``: the main job end to end on the embedded default (local Ray, local store)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.commands.common import add_store_option, open_store, print_whole
from cluster.demo import ARCHITECTURES
from profiler.errors import BadInputError

if TYPE_CHECKING:
    from rich.console import Console

    from profiler.store import Store

#: The real traces, relative to the repository root (the demo runs from there).
SHARED_DATA = Path("..") / "shared" / "data" / "seaa2023"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser(
        "demo",
        help="run the main job end to end on a local Ray cluster (no GPU needed)",
        description=(
            "Starts a local Ray cluster with two simulated node types (cpu-eco: 1 CPU, "
            "cpu-perf: 2 CPUs), the aggregator and a sidecar on every node (power modelled "
            "from CPU utilisation without a GPU, and labelled so), runs short torchvision "
            "training jobs through the job runner, shows per-epoch energy and STEP's "
            "projection against the measured total, retrains PRE, recommends a node type and "
            "runs one job with --node-type auto. With the real SEAA 2023 traces (--data) it "
            "also imports them, checks the importers against the dataset's own figures and "
            "compares STEP with today's rules on 189 recorded runs. --replay plays recorded "
            "runs through the same sidecar, aggregator, STEP and PRE path instead."
        ),
    )
    p.add_argument(
        "--epochs", type=int, default=10, help="planned epochs of every live job (default 10)"
    )
    p.add_argument(
        "--archs",
        default=",".join(ARCHITECTURES),
        metavar="A,B",
        help=f"torchvision models of the live jobs, each run on every node type "
        f"(default {','.join(ARCHITECTURES)})",
    )
    p.add_argument(
        "--no-auto", action="store_true", help="skip the last job placed by PRE (--node-type auto)"
    )
    p.add_argument(
        "--data",
        default=str(SHARED_DATA),
        metavar="DIR",
        help=f"folder of the SEAA 2023 dataset (default: {SHARED_DATA})",
    )
    p.add_argument(
        "--replay",
        metavar="STORE_OR_TRACES",
        help="replay recorded runs from a SEAA 2023 style folder or a wattwise store instead",
    )
    p.add_argument(
        "--speed", type=float, default=100.0, help="replay speed, 1 = real time (default 100)"
    )
    p.add_argument(
        "--runs", metavar="ID,ID", help="run ids to replay (default: a few covering every GPU)"
    )
    p.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object on stdout"
    )
    add_store_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``wattwise demo``."""
    import json
    import logging
    import sys

    from rich.console import Console

    from cluster import demo

    logging.getLogger("ray").setLevel(logging.ERROR)
    # Wide enough for the tables when the output is a file or a pipe.
    wide = None if (sys.stderr if args.json else sys.stdout).isatty() else 140
    out = Console(stderr=args.json, highlight=False, width=wide)
    store = open_store(args)
    out.rule("[bold]wattwise demo")
    out.print(f"store: {store.root}")
    if args.epochs < 1:
        raise BadInputError(f"--epochs must be at least 1; found {args.epochs}")
    data = Path(args.data)
    has_data = (data / "runs.parquet").is_file() and (data / "traces.parquet").is_file()
    show = _Show(out)
    if args.replay:
        runs = [r for r in (args.runs or "").split(",") if r] or None
        summary = demo.replay(store, args.replay, speed=args.speed, runs=runs, progress=show.event)
        show.close()
        _show_summary(summary, out)
    else:
        archs = [a.strip() for a in args.archs.split(",") if a.strip()]
        demo.check_architectures(archs)  # before the import and the cluster
        if has_data:
            _import_dataset(store, data, out)
        else:
            out.print(
                f"[yellow]The real traces are not at {data} (pass --data DIR for the SEAA 2023 "
                "dataset): the live part only; PRE needs at least 10 finished runs.[/]"
            )
        out.rule("Local Ray cluster")
        out.print(
            "head node + "
            + ", ".join(
                f"{nt.name} ({nt.cpus} CPU{'s' if nt.cpus > 1 else ''}, "
                f"modelled {nt.board_power_w:.0f} W)"
                for nt in demo.NODE_TYPES
            )
            + "; a sidecar on every node. [yellow]No GPU here: power is MODELLED from CPU "
            "utilisation x board power, stored as source 'modelled'.[/]"
        )
        summary = demo.live(
            store, epochs=args.epochs, architectures=archs, auto_job=not args.no_auto,
            progress=show.event,
        )  # fmt: skip
        show.close()
        _show_summary(summary, out)
        if has_data:
            summary["recorded"] = {
                "raw_csv_difference_pct": _check_raw_csvs(store, data, out),
                "gpu_savings": _savings(store, out),
                "step_vs_baselines": _step_recorded(data, out),
                "gpu_recommendation": _pre(store, out),
            }
            (Path(summary["reports"]["dir"]) / "summary.json").write_text(
                json.dumps(summary, indent=2, default=str), encoding="utf-8"
            )
    out.rule("Report files")
    for f in summary["reports"]["files"]:
        out.print(f"  {f}")
    out.print(f"done in {summary['elapsed_s']:.0f} s")
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


class _Show:
    """Live progress of the demo's jobs: one bar per job, epochs done of planned."""

    def __init__(self, out: Console) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.out = out
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} epochs"),
            TextColumn("{task.fields[proj]}"),
            TimeElapsedColumn(),
            console=out,
        )
        self.tasks: dict[str, Any] = {}
        self.started = False

    def event(self, kind: str, obj: Any) -> None:
        if kind == "note":
            self.out.print(obj)
            return
        if kind != "job":
            return
        if not self.started:
            self.bar.start()
            self.started = True
        rid = obj["run_id"]
        if rid not in self.tasks:
            self.tasks[rid] = self.bar.add_task(
                f"{obj.get('node_type')}: {rid}", total=obj.get("planned_epochs") or 1, proj=""
            )
        p = obj.get("projection") or {}
        proj = ""
        if p.get("energy_j") is not None:
            proj = f"STEP {p['energy_j']:,.0f} J" + (" stable" if p.get("stable") else "")
        self.bar.update(self.tasks[rid], completed=obj.get("epochs_done") or 0, proj=proj)

    def close(self) -> None:
        if self.started:
            self.bar.stop()


def _fmt_j(v: Any) -> str:
    return "-" if v is None else f"{float(v):,.0f}"


def _fmt_kj(v: Any) -> str:
    if v is None:
        return "-"
    kj = float(v) / 1e3
    return f"{kj:,.1f}" if kj >= 10 else f"{kj:,.3f}"


def _show_summary(summary: dict[str, Any], out: Console) -> None:
    """Tables: jobs with STEP at a fifth, per-epoch energy, PRE and the recommendation."""
    from rich.table import Table

    jobs = list(summary["jobs"]) + ([summary["auto_job"]] if summary.get("auto_job") else [])
    out.rule("Jobs: measured energy, and STEP's projection after a fifth of the epochs")
    replayed = any(j.get("recorded_energy_j") for j in jobs)
    t = Table(title_justify="left")
    cols = ["run", "node type", "model", "epochs", "measured kJ"]
    cols += ["recorded kJ"] if replayed else ["seconds"]
    cols += ["STEP kJ at 1/5", "90 % band kJ", "error"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("run", "node type", "model") else "right")
    for j in jobs:
        m, p = j.get("measured_energy_j"), j.get("projected_energy_j")
        err = f"{(p / m - 1) * 100:+.1f} %" if m and p else "-"
        band = f"{_fmt_kj(j.get('lower_j'))}-{_fmt_kj(j.get('upper_j'))}"
        status = "" if j["status"] == "finished" else f" [red]{j['status']}[/]"
        extra = (
            _fmt_kj(j.get("recorded_energy_j"))
            if replayed
            else ("-" if j.get("duration_s") is None else f"{j['duration_s']:.1f}")
        )
        t.add_row(
            j["run_id"] + status, j["node_type"], str(j.get("architecture")),
            f"{j['epochs']}/{j['planned_epochs']}", _fmt_kj(m), extra,
            _fmt_kj(p) + ("" if j.get("stable_at_fifth") else " *"), band, err,
        )  # fmt: skip
    print_whole(out, t)
    out.print(
        "Energy is source "
        + ", ".join(sorted({str(j.get("energy_source")) for j in jobs}))
        + ". "
        + _band_note(jobs)
    )
    if summary.get("per_epoch"):
        out.rule("Per-epoch energy (J)")
        t = Table(title_justify="left")
        t.add_column("epoch", justify="right")
        ids = list(summary["per_epoch"])
        for rid in ids:
            t.add_column(rid, justify="right")
        n = max(len(v) for v in summary["per_epoch"].values())
        for e in range(n):
            t.add_row(
                str(e),
                *[
                    _fmt_j(v[e]) if e < len(v) else ""
                    for v in (summary["per_epoch"][r] for r in ids)
                ],
            )
        print_whole(out, t)
    model, rec = summary.get("model") or {}, summary.get("recommendation") or {}
    out.rule("PRE: retrained on the store's finished runs, then asked about a new job")
    if model.get("version") is None:
        out.print(f"[yellow]no PRE model: {model.get('reason')}[/]")
        return
    new = model["retrained"]
    out.print(
        f"retrained PRE v{new['version']} on {new['rows']} runs: "
        f"{'accepted' if new['accepted'] else 'rejected'} ({new['decision']}); "
        f"in use: v{model['version']} ({model['rows']} runs)"
    )
    if rec.get("node_type") is None:
        out.print(f"[yellow]no recommendation: {rec.get('reason')}[/]")
        return
    job = rec["job"]
    out.print(
        f"new job: {job['architecture']}, {job['train_size']:,} images"
        + (f" {job['image_size']} px" if job.get("image_size") else "")
        + f", batch {job['batch_size']}, {job['epochs']} epochs"
    )
    t = Table(title_justify="left")
    for col in ("node type", "predicted J", "90 % interval J", "predicted s"):
        t.add_column(col, justify="left" if col == "node type" else "right")
    for r in rec["ranking"]:
        t.add_row(
            ("[bold green]" if r["node_type"] == rec["node_type"] else "") + r["node_type"],
            _fmt_j(r["energy_j"]), f"{_fmt_j(r['lower_j'])} - {_fmt_j(r['upper_j'])}",
            f"{r['time_s']:.1f}",
        )  # fmt: skip
    print_whole(out, t)
    out.print(
        f"recommended: {rec['node_type']} (saves {rec['savings_vs_worst_pct']:.0f} % against "
        f"the worst); placement: {rec['placement']}"
    )
    auto = summary.get("auto_job")
    if auto:
        m = auto.get("measured_energy_j")
        pred = auto.get("predicted_energy_j")
        miss = f" ({(pred / m - 1) * 100:+.1f} % off)" if m and pred else ""
        out.print(
            f"ran it with --node-type auto: placed on {auto['node_type']} "
            f"({auto['placement']}), measured {_fmt_j(m)} J against {_fmt_j(pred)} J "
            f"predicted{miss}"
        )


def _band_note(jobs: list[dict[str, Any]]) -> str:
    """The footnote on the not-stable bands, saying which cap each one ran to.

    ``band_cap_w`` of a job is the power cap of its band (the aggregator's);
    ``None`` when none is known, and the band's upper end is then twice the
    highest epoch energy seen.
    """
    if not jobs:
        return ""
    capped = sorted({float(j["band_cap_w"]) for j in jobs if j.get("band_cap_w") is not None})
    uncapped = any(j.get("band_cap_w") is None for j in jobs)
    ends = []
    if capped:
        ends.append(
            "the power cap x the epoch time (cap " + ", ".join(f"{c:,.0f} W" for c in capped) + ")"
        )
    if uncapped:
        ends.append(
            "twice the highest epoch energy seen (no power cap known to the aggregator"
            + (" for some runs)" if capped else ")")
        )
    return (
        "* not stable yet at a fifth: the band is the energy measured so far plus, per "
        "remaining epoch, from the lowest epoch energy seen up to "
        + ", or ".join(ends)
        + "; each run's report shows how it narrowed."
    )


def _import_dataset(store: Store, data: Path, out: Console) -> None:
    from profiler.importers.seaa2023 import import_seaa2023

    out.rule("Real traces (SEAA 2023): import into the store")
    summary = import_seaa2023(store, data, progress=True)
    out.print(
        f"{len(summary.runs)} runs, {summary.samples_total:,} samples "
        f"({summary.samples_new:,} new) in {store.root}"
    )


def _check_raw_csvs(store: Store, data: Path, out: Console) -> dict[str, float | None]:
    """Integrate the raw nvidia-smi CSVs and compare with the dataset's reported energy."""
    import json

    from rich.table import Table

    from estimators.energy import run_energy
    from profiler.importers.nvidia_smi import read_nvidia_smi_csv

    out.rule("Recorded: raw nvidia-smi CSVs against the dataset's own figures")
    diffs: dict[str, float | None] = {}
    runs = {r["run_id"]: r for r in store.runs().iter_rows(named=True)}
    table = Table(title_justify="left")
    for col in ("run", "samples", "wattwise kJ", "reported kJ", "difference"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for csv in sorted(data.glob("nvidia-smi-*.csv")):
        run_id = csv.stem.removeprefix("nvidia-smi-")
        samples = read_nvidia_smi_csv(csv, node="demo", run_id=run_id)
        energy = float(run_energy(samples)["energy_j"].item())
        config = json.loads(runs[run_id]["config"] or "{}") if run_id in runs else {}
        reported = config.get("gpu_energy_j")
        diffs[run_id] = (energy / reported - 1) * 100 if reported else None
        diff = f"{(energy / reported - 1) * 100:+.2f} %" if reported else "-"
        table.add_row(
            run_id,
            f"{samples.height:,}",
            f"{energy / 1e3:,.1f}",
            "-" if not reported else f"{reported / 1e3:,.1f}",
            diff,
        )
    print_whole(out, table)
    out.print(
        "The dataset's figure sums integer-watt samples; wattwise integrates the "
        "centiwatt readings with trapezoids."
    )
    return diffs


def _savings(store: Store, out: Console) -> dict[str, dict[str, Any]]:
    """Per-epoch energy by architecture and GPU: what picking the right GPU saves."""
    import polars as pl
    from rich.table import Table

    out.rule("Recorded: per-epoch energy by architecture and GPU (measured)")
    best: dict[str, dict[str, Any]] = {}
    runs = store.runs().filter(
        (pl.col("status") == "finished")
        & (pl.col("energy_source").fill_null("measured") != "modelled")
        & pl.col("energy_j").is_not_null()
        & (pl.col("trained_epochs") > 0)
    )
    per = (
        runs.with_columns((pl.col("energy_j") / pl.col("trained_epochs")).alias("epoch_j"))
        .group_by("architecture", "gpu_model")
        .agg(pl.col("epoch_j").mean(), pl.len().alias("runs"))
        .sort("architecture", "epoch_j")
    )
    table = Table(title_justify="left")
    for col in ("architecture", "GPU", "runs", "kJ per epoch", "saving vs worst"):
        table.add_column(col, justify="left" if col in ("architecture", "GPU") else "right")
    for (arch,), part in per.partition_by("architecture", as_dict=True).items():
        worst = float(part["epoch_j"].max())  # type: ignore[arg-type]
        top = part.row(0, named=True)
        best[str(arch)] = {
            "gpu_model": top["gpu_model"],
            "saving_vs_worst_pct": (1 - top["epoch_j"] / worst) * 100,
        }
        for i, r in enumerate(part.iter_rows(named=True)):
            saving = 1 - r["epoch_j"] / worst
            table.add_row(
                str(arch) if i == 0 else "",
                ("[bold green]" if i == 0 else "") + str(r["gpu_model"]).removeprefix("NVIDIA "),
                str(r["runs"]),
                f"{r['epoch_j'] / 1e3:,.1f}",
                f"{saving * 100:.1f} %" if saving > 0 else "-",
            )
        table.add_section()
    print_whole(out, table)
    out.print("Data: del Rey et al., SEAA 2023 (GAISSA-UPC/seaa2023_ect), CC BY 4.0")
    return best


def _step_recorded(data: Path, out: Console) -> dict[str, float]:
    """STEP and the baselines on every recorded run, seeing only its first 20 %."""
    import polars as pl

    from cluster.commands.step_cmds import print_summary
    from estimators.baselines import bench_step, summarise

    out.rule("Recorded: STEP against today's rules on 189 runs, after 20 % of each")
    runs = pl.read_parquet(data / "runs.parquet").filter(pl.col("has_trace"))
    traces = pl.read_parquet(data / "traces.parquet")
    pred = bench_step(runs, traces, fraction=0.2)
    table = summarise(pred)
    print_summary(table, title="absolute percentage error of the projected total", out=out)
    out.print(
        "step = wattwise; carbontracker = first epoch x epochs; mlco2 = board power x time; "
        "green_algorithms = board power x utilisation x time; naive = mean power so far x time"
    )
    return {
        str(r["method"]): float(r["median_ape_pct"])
        for r in table.iter_rows(named=True)
        if r["median_ape_pct"] is not None
    }


def _pre(store: Store, out: Console) -> dict[str, Any]:
    """Recommend a GPU node type for a bigger job with the model the live part retrained."""
    from rich.table import Table

    from cluster.retrain import latest_model
    from estimators.features import JobDescription
    from estimators.recommend import NodeType, recommend

    out.rule("Recorded: PRE recommends a GPU node type for a bigger job")
    try:
        model = latest_model(store.root / "models")
    except BadInputError as err:
        out.print(f"[yellow]no PRE model: {err}[/]")
        return {}
    job = JobDescription(
        architecture="resnet18",
        batch_size=64,
        image_height=224,
        image_width=224,
        training_size=50_000,
        validation_size=10_000,
        planned_epochs=30,
    )
    inventory = [
        NodeType("cloud", "NVIDIA GeForce RTX 3090", default=True),
        NodeType("local-ml-engineer-gamer", "NVIDIA GeForce RTX 3070"),
        NodeType("a100-pool", "NVIDIA A100-SXM4-80GB"),
    ]
    rec = recommend(model, job, inventory)
    table = Table(title_justify="left")
    for col in ("node type", "GPU", "kWh (30 epochs)", "90 % interval", "hours"):
        table.add_column(col, justify="left" if col in ("node type", "GPU") else "right")
    for r in rec.table.iter_rows(named=True):
        table.add_row(
            r["node_type"],
            str(r["gpu_model"]).removeprefix("NVIDIA "),
            f"{r['total_energy_kwh']:.2f}",
            f"{r['total_lower_kwh']:.2f} - {r['total_upper_kwh']:.2f}",
            f"{r['total_time_h']:.1f}",
        )
    out.print("job: resnet18, batch 64, 224x224, 50,000 images, 30 epochs")
    print_whole(out, table)
    default = rec.savings_vs_default_pct
    out.print(
        f"recommended: {rec.chosen} (saves {rec.savings_vs_worst_pct:.0f} % against the worst"
        + (f", {default:.0f} % against the default" if default is not None else "")
        + f"); placement: {rec.placement}"
    )
    return {"node_type": rec.chosen, "savings_vs_worst_pct": rec.savings_vs_worst_pct}
