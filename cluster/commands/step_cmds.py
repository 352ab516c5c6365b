"""``wattwise estimate``, ``wattwise report`` and ``wattwise bench step``: STEP projections.

``bench`` is a shared group: this module adds ``bench step`` through
:func:`cluster.commands.bench_subparsers`, which creates the ``bench`` parser
on first use and returns its sub-parsers to every later caller (``bench pre``
adds itself the same way).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.commands import bench_subparsers
from cluster.commands.common import add_store_option, console, print_whole, read_parquet
from cluster.commands.energy_cmds import check_out_file, load_run, write_out_parquet
from profiler.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from estimators.step import Projection, RunPlan


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``estimate``, ``report`` and ``bench step``."""
    from estimators.step import DETECTORS

    p = sub.add_parser(
        "estimate",
        help="STEP projection of a stored run's total energy, with band and stable point",
        description=(
            "Projects a run's total energy from its stable epochs (STEP): energy measured so "
            "far plus the stable energy per epoch times the epochs still planned, with a band. "
            "A finished run's answer is its measured total."
        ),
    )
    p.add_argument("--run", metavar="RUN_ID", required=True, help="a run in the store")
    _add_step_options(p, DETECTORS)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_store_option(p)
    p.set_defaults(func=run_estimate)

    p = sub.add_parser(
        "report",
        help="HTML or PNG report of a run: power, epochs, stable point, projection over time",
    )
    p.add_argument("--run", metavar="RUN_ID", required=True, help="a run in the store")
    p.add_argument("--out", metavar="FILE", required=True, help="FILE.html or FILE.png")
    _add_step_options(p, DETECTORS)
    add_store_option(p)
    p.set_defaults(func=run_report)

    b = bench_subparsers(sub).add_parser(
        "step",
        help="STEP and baselines on recorded traces cut at a fraction of each run",
        description=(
            "Gives every method only the first F of each traced run, plus its total duration "
            "and trained_epochs (no epoch marks: time is the unit of progress), and compares "
            "the projected total with the integral of the whole trace."
        ),
    )
    b.add_argument("--runs", metavar="RUNS.parquet", required=True)
    b.add_argument("--traces", metavar="TRACES.parquet", required=True)
    b.add_argument(
        "--observe-fraction",
        metavar="F",
        type=float,
        required=True,
        help="fraction of each run's duration the methods see, in (0, 1]",
    )
    b.add_argument("--out", metavar="PRED.parquet", help="one row per (run_id, method)")
    b.add_argument(
        "--methods",
        metavar="M[,M...]",
        default=None,
        help="comma-separated methods (default: step,carbontracker,mlco2,green_algorithms,naive; "
        "also flops, step-pelt, step-fluss, step-none)",
    )
    b.add_argument(
        "--duration",
        choices=("trace", "runs"),
        default="trace",
        help="total duration: span of the trace (default, the truth's span) or runs.duration_s",
    )
    b.set_defaults(func=run_bench_step)


def _add_step_options(p: argparse.ArgumentParser, detectors: tuple[str, ...]) -> None:
    p.add_argument("--detector", choices=detectors, default="online", help="stable-point detector")
    p.add_argument("--confidence", type=float, default=0.9, help="band coverage (default 0.9)")
    p.add_argument(
        "--planned-epochs",
        type=int,
        default=None,
        metavar="N",
        help="planned epochs, at least those recorded (default: the run record's "
        "planned_epochs, else trained_epochs, when not fewer than the epochs recorded)",
    )


# ----------------------------------------------------------------------------------- estimate
def _check_step_options(args: argparse.Namespace) -> None:
    """Refuse a ``--confidence`` outside (0, 1) and a ``--planned-epochs`` below 1.

    Raises:
        BadInputError: Either option is out of range (NaN included).

    """
    if not 0.0 < args.confidence < 1.0:
        raise BadInputError(f"--confidence must be in (0, 1); found {args.confidence}")
    if args.planned_epochs is not None and args.planned_epochs < 1:
        raise BadInputError(f"--planned-epochs must be at least 1; found {args.planned_epochs}")


def _plan(
    record: dict[str, Any], args: argparse.Namespace, epochs: pl.DataFrame
) -> tuple[RunPlan, str]:
    """The run's plan from its record and the options, and why its stored plan was set aside.

    A ``--planned-epochs`` below the epochs already recorded is refused. A
    stored ``planned_epochs`` (else ``trained_epochs``) below them, as when a
    second training phase numbers its epochs on, is not the run's plan: the
    plan has no planned epochs, so a running run gets no projection (STEP's
    :data:`~estimators.step.PLANNED_UNKNOWN` answer) rather than a measured
    total called finished, and the second value says why (empty otherwise).

    Raises:
        BadInputError: ``--planned-epochs`` is below the epochs recorded.

    """
    from estimators.step import RunPlan

    recorded = epochs.height
    planned = args.planned_epochs
    stale = ""
    if planned is not None and planned < recorded:
        raise BadInputError(
            f"--planned-epochs is below the epochs run {args.run!r} has already recorded; "
            f"expected >= {recorded} recorded epochs, found {planned}"
        )
    if planned is None:
        field = "planned_epochs" if record.get("planned_epochs") else "trained_epochs"
        planned = record.get(field)
        if planned is not None and int(planned) < recorded:
            stale = (
                f"the run record's {field} ({planned}) are fewer than the {recorded} epochs "
                "recorded; give --planned-epochs"
            )
            planned = None
    config: dict[str, Any] = {}
    if record.get("config"):
        try:
            config = json.loads(str(record["config"]))
        except json.JSONDecodeError:
            config = {}
    cap = config.get("power_limit_w")
    plan = RunPlan(
        total_duration_s=record.get("duration_s") if epochs.height == 0 else None,
        planned_epochs=int(planned) if planned is not None else None,
        finished=record.get("status") == "finished",
        gpu_model=record.get("gpu_model"),
        power_cap_w=float(cap) if isinstance(cap, int | float) else None,
        gpu_count=int(record.get("gpu_count") or 1),
    )
    return plan, "" if plan.finished else stale


def _projection(args: argparse.Namespace) -> tuple[Projection, pl.DataFrame, str]:
    """STEP's projection of ``--run``, its epoch marks (by start) and its status.

    A run that has ended without epoch marks (finished or failed) gets its
    measured total; a failed run with marks is projected to its plan.
    """
    from dataclasses import replace

    from estimators.step import PLANNED_UNKNOWN, Step

    _check_step_options(args)
    record, samples, epochs = load_run(args)
    plan, stale = _plan(record, args, epochs)
    status = str(record.get("status"))
    if epochs.height == 0 and status == "failed":
        plan = replace(plan, finished=True)  # its energy is measured, as report shows it
    if (
        epochs.height == 0
        and not plan.finished
        and not (plan.total_duration_s and plan.planned_epochs)
    ):
        raise BadInputError(
            f"run {args.run!r} has no epoch marks, and STEP without them needs the total "
            "duration and planned epochs; record epochs (wattwise hooks) or give --planned-epochs "
            "for a run with a known duration"
        )
    step = Step(detector=args.detector, confidence=args.confidence)
    proj = step.fit(samples, epochs if epochs.height else None, plan=plan).predict()
    if stale and proj.reason.startswith(PLANNED_UNKNOWN):
        # STEP's reason asks for the planned epochs; say why the stored ones do not count.
        rest = proj.reason[len(PLANNED_UNKNOWN) :]
        proj = replace(proj, reason=f"planned epochs unknown: {stale}{rest}")
    return proj, epochs.sort("start") if epochs.height else epochs, status


def run_estimate(args: argparse.Namespace) -> int:
    """Run ``wattwise estimate``."""
    proj, epochs, status = _projection(args)
    stable_epoch = None
    if proj.stable_unit is not None and epochs.height > proj.stable_unit:
        stable_epoch = int(epochs["epoch"][proj.stable_unit])
    row = proj.as_row() | {"run_id": args.run, "stable_epoch": stable_epoch}
    if args.json:
        print(json.dumps(row, indent=1, default=str))
        return 0
    from rich.table import Table

    def kj(x: float | None) -> str:
        return "-" if x is None else f"{x / 1e3:,.1f} kJ"

    kind = f"measured total (run {status})" if proj.finished else "projected (STEP)"
    t = Table(show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("energy", kj(proj.energy_j))
    if not proj.finished:
        band = f"{kj(proj.lower_j)} .. {kj(proj.upper_j)}"
        t.add_row(f"{proj.confidence:.0%} band", band)
        t.add_row("measured so far", kj(proj.measured_j))
        t.add_row("stable", "yes" if proj.stable else "not yet")
        t.add_row("stable from epoch", "-" if stable_epoch is None else str(stable_epoch))
        if proj.stable_power_w is not None:
            t.add_row("stable power", f"{proj.stable_power_w:.1f} W")
        t.add_row("energy per remaining epoch", kj(proj.energy_per_epoch_j))
        t.add_row(
            "time per remaining epoch", "-" if proj.epoch_s is None else f"{proj.epoch_s:.1f} s"
        )
        if proj.remaining_epochs is not None:
            t.add_row("epochs remaining", f"{proj.remaining_epochs:g}")
        if proj.remaining_s is not None:
            t.add_row("time remaining", f"{proj.remaining_s / 60:.1f} min")
    out = console()
    out.print(f"Run {args.run}: {kind}")
    print_whole(out, t)
    if proj.reason:
        out.print(f"[yellow]{proj.reason}[/]")
    return 0


# ----------------------------------------------------------------------------------- report
def run_report(args: argparse.Namespace) -> int:
    """Run ``wattwise report``.

    A run that has ended (finished or failed) without epoch marks, and without
    the total duration and planned epochs of a time replay, is reported with
    its measured total (``estimate``'s figure) and power trace only; a running
    one is refused with what it needs.
    """
    from dataclasses import replace

    from estimators.report import write_report

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".png"):
        raise BadInputError(f"--out must end in .html or .png; found {args.out!r}")
    _check_step_options(args)
    record, samples, epochs = load_run(args)
    plan, stale = _plan(record, args, epochs)
    if stale:
        raise BadInputError(f"run {args.run!r} not finished and planned epochs unknown: {stale}")
    status = str(record.get("status"))
    if epochs.height == 0 and not (plan.total_duration_s and plan.planned_epochs):
        if status not in ("finished", "failed"):
            raise BadInputError(_no_marks_message(args.run, plan))
        # The run has ended: its energy is measured, and the report shows that total.
        plan = replace(plan, finished=True)
    if epochs.height == 0 and plan.total_duration_s and plan.planned_epochs:
        from estimators.step import Trace, time_unit_problem

        # Checked on the whole trace: the replay's first prefixes hold too few samples to
        # tell, and it would refit once per epoch (10**15 times).
        interval = Trace.from_samples(samples).sample_interval_s()
        problem = time_unit_problem(plan.total_duration_s, plan.planned_epochs, interval)
        if problem:
            raise BadInputError(f"run {args.run!r} has no epoch marks, and {problem}")
    write_report(
        samples,
        epochs if epochs.height else None,
        plan,
        out,
        title=f"Run {args.run}",
        detector=args.detector,
        confidence=args.confidence,
        status=status,
    )
    console().print(f"wrote {out}")
    return 0


def _no_marks_message(run: str, plan: RunPlan) -> str:
    """Why ``report`` cannot replay a running run without epoch marks, and what to pass.

    The report replays STEP over time in units of one mean epoch (the run's
    duration over its planned epochs), so it needs both. (A run that has
    ended is reported with its measured total instead.)
    """
    missing = []
    if not plan.total_duration_s:
        missing.append("its total duration (the run record has none)")
    if not plan.planned_epochs:
        missing.append("its planned epochs (give --planned-epochs N)")
    return (
        f"run {run!r} is not finished and has no epoch marks; the report replays STEP in units "
        f"of one mean epoch (duration / epochs) and needs {' and '.join(missing)}"
    )


# ----------------------------------------------------------------------------------- bench step
def run_bench_step(args: argparse.Namespace) -> int:
    """Run ``wattwise bench step``."""
    from estimators.baselines import DEFAULT_METHODS, bench_step, summarise

    out = check_out_file(args.out) if args.out else None
    runs = read_parquet(args.runs, "runs (run_id, duration_s, trained_epochs, ...)")
    traces = read_parquet(args.traces, "power traces (run_id, timestamp, power_w)")
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else DEFAULT_METHODS
    pred = bench_step(
        runs,
        traces,
        fraction=args.observe_fraction,
        methods=methods,
        duration=args.duration,
        file=args.traces,
    )
    if out is not None:
        write_out_parquet(pred, out)
    print_summary(summarise(pred), title=f"STEP bench at F = {args.observe_fraction:g}")
    return 0


def print_summary(summary: pl.DataFrame, *, title: str, out: Console | None = None) -> None:
    """Print :func:`estimators.baselines.summarise` output as a rich table (on ``out``)."""
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    t = Table(title=title, title_justify="left")
    t.add_column("method", no_wrap=True)
    for name in ("runs", "med APE %", "P90 APE %", "in band", "med ± %", "stable"):
        t.add_column(name, justify="right")
    for r in summary.iter_rows(named=True):
        t.add_row(
            r["method"],
            str(r["runs"] - r["no_answer"])
            + ("" if not r["no_answer"] else f" (+{r['no_answer']} none)"),
            pct(r["median_ape_pct"]),
            pct(r["p90_ape_pct"]),
            "-" if r["coverage"] is None else f"{r['coverage']:.1%}",
            pct(r["median_half_width_pct"]),
            "-" if r["stable_share"] is None else f"{r['stable_share']:.0%}",
        )
    print_whole(out or console(), t)
