"""``wattwise energy``: per-epoch energy of a stored run, or of parquet files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.commands.common import (
    add_store_option,
    check_positive,
    console,
    open_store,
    print_whole,
    read_parquet,
)
from profiler.errors import BadInputError, StoreError

if TYPE_CHECKING:
    import polars as pl


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``energy`` command."""
    p = sub.add_parser(
        "energy",
        help="per-epoch energy of a run (store) or of sample/epoch parquet files",
        description=(
            "Per-epoch energy: counter deltas where a cumulative counter exists, else "
            "trapezoids of power; samples straddling an epoch mark are split at the mark; "
            "intervals longer than --gap-threshold are not integrated and reported as gap_s."
        ),
    )
    p.add_argument("--run", metavar="RUN_ID", help="a run in the store")
    p.add_argument("--samples", metavar="S.parquet", help="file mode: samples parquet")
    p.add_argument("--epochs", metavar="E.parquet", help="file mode: epoch marks parquet")
    p.add_argument("--out", metavar="OUT.parquet", help="file mode: where to write the result")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--gap-threshold",
        type=float,
        default=5.0,
        metavar="S",
        help="longest sample interval in s integrated from power (default 5; a device "
        "sampled more slowly uses 3 x its own interval)",
    )
    add_store_option(p)
    p.set_defaults(func=run)


def check_out_file(path: str, option: str = "--out") -> Path:
    """Refuse, before any input is read, an output file that cannot be written.

    As ``bench pre`` does (:func:`cluster.commands.pre_cmds.check_writable`):
    a folder where the file must be, a file where a folder must be, a folder
    without write permission. A file written outside the store says nothing
    about a store, nor about training.

    Raises:
        BadInputError: The path cannot be written; nothing was computed.

    """
    from cluster.commands.pre_cmds import check_writable

    out = Path(path)
    check_writable(out, option, work="computed")
    return out


def write_out_parquet(df: pl.DataFrame, out: Path) -> None:
    """Write ``df`` to the ``--out`` file ``out`` atomically.

    Raises:
        StoreError: The write failed; the message says ``out`` is unchanged
            (the store's writer would say the store is, and there is none here).

    """
    from profiler.store import UNCHANGED, atomic_write_parquet

    try:
        atomic_write_parquet(df, out)
    except StoreError as err:
        raise StoreError(str(err).replace(UNCHANGED, f"{out} is unchanged")) from err


def load_run(args: argparse.Namespace) -> tuple[dict[str, Any], pl.DataFrame, pl.DataFrame]:
    """The run record, samples and epoch marks of ``--run`` from the store, on one clock.

    Nodes' clocks differ: samples and marks are shifted onto the run's home
    clock by the offsets the aggregator recorded in the run's config
    (:func:`cluster.aggregator.align`), as the aggregator does, so that
    ``energy``, ``estimate`` and ``report`` integrate the same samples.

    Raises:
        BadInputError: Unknown run, a run without samples, or one whose samples
            have neither power_w nor energy_j.

    """
    import polars as pl

    from cluster.aggregator import align

    store = open_store(args)
    record = store.run(args.run)
    samples = store.samples(args.run)
    if samples.height == 0:
        raise BadInputError(f"run {args.run!r} has no samples in the store at {store.root}")
    if samples.filter(
        pl.col("power_w").is_not_null() | pl.col("energy_j").is_not_null()
    ).is_empty():
        raise BadInputError(
            f"run {args.run!r} has {samples.height} samples in the store at {store.root}, none "
            "with power_w or energy_j; expected at least one measured value to integrate"
        )
    samples, epochs = align(samples, store.epochs(args.run), record)
    return record, samples, epochs


def run(args: argparse.Namespace) -> int:
    """Run ``wattwise energy``."""
    check_positive(args.gap_threshold, "--gap-threshold")
    file_mode = any((args.samples, args.epochs, args.out))
    if file_mode == bool(args.run) or (file_mode and not (args.samples and args.epochs)):
        raise BadInputError(
            "expected either --run RUN_ID, or --samples S.parquet --epochs E.parquet "
            "[--out OUT.parquet]"
        )
    if file_mode:
        return _file_mode(args)
    return _run_mode(args)


def _file_mode(args: argparse.Namespace) -> int:
    from estimators.energy import epoch_energy

    out = check_out_file(args.out) if args.out else None
    samples = read_parquet(args.samples, "samples (run_id, timestamp, power_w[, energy_j])")
    epochs = read_parquet(args.epochs, "epoch marks (run_id, epoch, start, end)")
    if epochs.height == 0:
        raise BadInputError(
            f"{args.epochs}: expected epoch marks (run_id, epoch, start, end); found no rows"
        )
    result = epoch_energy(
        samples,
        epochs,
        gap_threshold_s=args.gap_threshold,
        samples_file=args.samples,
        epochs_file=args.epochs,
    )
    _check_every_run_sampled(result, samples, args)
    if out is not None:
        write_out_parquet(result, out)
    _show(result, args, title=f"Per-epoch energy ({args.samples})")
    return 0


def _check_every_run_sampled(
    result: pl.DataFrame, samples: pl.DataFrame, args: argparse.Namespace
) -> None:
    """Refuse epochs of a run without a single sample (as ``--run`` refuses such a run).

    A run with samples over only part of its epochs is fine: the rest is gap.

    Raises:
        BadInputError: Naming the samples file, the runs without samples and
            the runs it has samples of.

    """
    import polars as pl

    # epoch_energy counts every device with a sample, even one that measured nothing.
    missing = result.filter(pl.col("devices") == 0)["run_id"].unique(maintain_order=True)
    if missing.len() == 0:
        return
    have = samples["run_id"].cast(pl.String).unique().sort().to_list() if samples.height else []
    found = f"found samples of run(s) {have}" if have else "found no samples"
    raise BadInputError(
        f"{args.samples}: no samples of run(s) {missing.to_list()} of the epoch marks in "
        f"{args.epochs}; expected samples of every run with epoch marks, {found}"
    )


def _run_mode(args: argparse.Namespace) -> int:
    from estimators.energy import epoch_energy, run_energy, run_total_j

    record, samples, epochs = load_run(args)
    run_j = None
    if epochs.height == 0:
        result = run_energy(samples, gap_threshold_s=args.gap_threshold)
        note = "no epoch marks recorded: whole run from first to last sample"
    else:
        result = epoch_energy(samples, epochs, gap_threshold_s=args.gap_threshold)
        note = f"{epochs.height} epochs"
        # The whole run: its epochs and the time outside them (loading, saving...).
        run_j = run_total_j(samples, epochs, gap_threshold_s=args.gap_threshold)
    where = f"{record.get('node_type') or '?'} ({record.get('gpu_model') or '?'})"
    title = f"Run {args.run} on {where}: {note}"
    _show(result, args, title=title, run_j=run_j)
    return 0


def _show(
    result: pl.DataFrame, args: argparse.Namespace, *, title: str, run_j: float | None = None
) -> None:
    totals = {
        # sum() of an all-null column is None in some polars versions: count it as 0.
        "energy_j": float(result["energy_j"].sum() or 0.0),
        "duration_s": float(result["duration_s"].sum() or 0.0),
        "gap_s": float(result["gap_s"].sum() or 0.0),
        "n_skipped": int(result["n_skipped"].fill_null(0).max() or 0),  # type: ignore[arg-type]
    }
    # The run's whole measured energy (run mode): with epochs, theirs plus the time outside
    # them; without, the whole run already. File mode has epochs only.
    if run_j is not None or "epoch" not in result.columns:
        totals["run_energy_j"] = totals["energy_j"] if run_j is None else run_j
        totals["outside_epochs_j"] = totals["run_energy_j"] - totals["energy_j"]
    if args.json:
        rows: list[dict[str, Any]] = result.with_columns(
            *(result[c].dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ") for c in ("start", "end"))
        ).to_dicts()
        print(json.dumps({"rows": rows, "total": totals}, indent=1))
        return
    from rich.table import Table

    has_epoch = "epoch" in result.columns
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("run" if not has_epoch else "epoch", "right"),
        ("start (UTC)", "left"),
        ("duration s", "right"),
        ("energy kJ", "right"),
        ("mean W", "right"),
        ("gap s", "right"),
        ("samples", "right"),
        ("method", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in result.iter_rows(named=True):
        table.add_row(
            str(r["epoch"] if has_epoch else r["run_id"]),
            r["start"].strftime("%Y-%m-%d %H:%M:%S"),
            f"{r['duration_s']:.1f}",
            f"{r['energy_j'] / 1e3:.3f}",
            "-" if r["mean_power_w"] is None else f"{r['mean_power_w']:.1f}",
            f"{r['gap_s']:.1f}" if r["gap_s"] else "0",
            str(r["n_samples"]),
            r["method"],
        )
    table.add_section()
    table.add_row(
        "total",
        "",
        f"{totals['duration_s']:.1f}",
        f"{totals['energy_j'] / 1e3:.3f}",
        "",
        f"{totals['gap_s']:.1f}",
        "",
        "",
    )
    out = console()
    print_whole(out, table)
    if run_j is not None:
        out.print(
            f"run total {run_j / 1e3:.3f} kJ: the epochs' {totals['energy_j'] / 1e3:.3f} kJ plus "
            f"{totals['outside_epochs_j'] / 1e3:.3f} kJ outside them (before the first, between, "
            "after the last)",
            soft_wrap=True,
        )
    if totals["gap_s"]:
        out.print(f"[yellow]{totals['gap_s']:.1f} s had no measurement and add no energy.[/]")
    if totals["n_skipped"]:
        out.print(
            f"[yellow]{totals['n_skipped']} samples had neither power nor a counter "
            "and were skipped.[/]"
        )
