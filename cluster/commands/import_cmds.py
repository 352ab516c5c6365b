"""``wattwise import``: nvidia-smi CSV, dcgm-exporter scrapes and SEAA 2023 into the store."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.commands.common import add_store_option, console, open_store, print_whole
from profiler.errors import BadInputError

if TYPE_CHECKING:
    from profiler.importers import ImportSummary

#: Where ``wattwise import seaa2023`` looks without a FOLDER, relative to the current directory.
DEFAULT_SEAA2023 = Path("..") / "shared" / "data" / "seaa2023"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``import nvidia-smi``, ``import dcgm`` and ``import seaa2023``."""
    parser = subparsers.add_parser(
        "import",
        help="import recorded power traces into the run store",
        description="Import recorded power traces into the run store. Nothing is written "
        "unless the whole input is valid; importing the same input again changes nothing.",
    )
    sub = parser.add_subparsers(dest="import_command", required=True, metavar="FORMAT")

    smi = sub.add_parser(
        "nvidia-smi",
        help="CSV written by nvidia-smi --query-gpu=... --format=csv",
        description="Import nvidia-smi CSV files (timestamp and power.draw columns needed; "
        "index/uuid tell several GPUs apart). Each file becomes a finished run whose energy "
        "is integrated from its samples.",
    )
    smi.add_argument("files", nargs="+", metavar="FILE", help="nvidia-smi CSV file(s)")
    smi.add_argument(
        "--run",
        metavar="RUN_ID",
        help="run id for every file (default: the file name without extension and without a "
        "leading 'nvidia-smi-', e.g. nvidia-smi-cloud-vgg16-00.csv -> cloud-vgg16-00)",
    )
    smi.add_argument(
        "--node",
        metavar="NODE",
        help="node (host) the file was recorded on (default: the file's default run id, so "
        "every file is its own stream)",
    )
    smi.add_argument(
        "--tz",
        default="UTC",
        metavar="TZ",
        help="IANA time zone of the file's timestamps (default: UTC)",
    )
    add_store_option(smi)
    smi.set_defaults(func=run_nvidia_smi)

    dcgm = sub.add_parser(
        "dcgm",
        help="dcgm-exporter scrape(s) (Prometheus text)",
        description="Import dcgm-exporter output: one scrape (give --timestamp) or a series "
        "of scrapes, each preceded by a line '# scrape <ISO 8601 time>'.",
    )
    dcgm.add_argument("file", metavar="FILE", help="file of dcgm-exporter text exposition")
    dcgm.add_argument("--run", metavar="RUN_ID", help="run id (default: the file name stem)")
    dcgm.add_argument(
        "--node", metavar="NODE", help="node name (default: the Hostname/hostname label)"
    )
    dcgm.add_argument(
        "--timestamp",
        metavar="ISO",
        help="time of a scrape without a '# scrape' marker, e.g. 2024-05-01T12:00:00Z "
        "(no offset means UTC)",
    )
    add_store_option(dcgm)
    dcgm.set_defaults(func=run_dcgm)

    seaa = sub.add_parser(
        "seaa2023",
        help="the SEAA 2023 dataset (runs.parquet + traces.parquet)",
        description="Import the SEAA 2023 dataset: every run into the runs table, every "
        "trace into samples.",
    )
    seaa.add_argument(
        "folder",
        nargs="?",
        default=None,
        metavar="FOLDER",
        help=f"folder with runs.parquet and traces.parquet (default: {DEFAULT_SEAA2023})",
    )
    seaa.add_argument(
        "--per-run", action="store_true", help="one table row per run (default: per node type)"
    )
    add_store_option(seaa)
    seaa.set_defaults(func=run_seaa2023)


def default_run_id(path: str | Path, prefix: str = "nvidia-smi-") -> str:
    """The run id a file gets without ``--run``: its stem, less a leading ``prefix``."""
    stem = Path(path).stem
    return stem[len(prefix) :] if prefix and stem.startswith(prefix) and stem != prefix else stem


def _check_default_id(path: str, run_id: str) -> str:
    from profiler.schema import check_run_id

    try:
        return check_run_id(run_id)
    except BadInputError as err:
        raise BadInputError(
            f"{path}: the file name gives no usable run id ({err}); pass --run"
        ) from err


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _kj(joules: float | None) -> str:
    return "-" if joules is None else f"{joules / 1000:,.1f}"


def _print(summary: ImportSummary, store_root: Path, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    width = max((len(r.run_id) for r in summary.runs), default=3)
    table.add_column("run", no_wrap=True, min_width=width)
    table.add_column("samples new/total", justify="right")
    table.add_column("energy (kJ)", justify="right")
    table.add_column("source")
    table.add_column("duration", justify="right")
    for r in summary.runs:
        table.add_row(
            r.run_id,
            f"{r.samples_new:,}/{r.samples_total:,}",
            _kj(r.energy_j),
            r.energy_source or "-",
            _duration(r.duration_s),
        )
    out = console()
    print_whole(out, table)
    out.print(
        f"{summary.samples_new:,} new samples, {summary.runs_changed} runs added or changed "
        f"in {store_root}"
    )


def run_nvidia_smi(args: argparse.Namespace) -> int:
    """``wattwise import nvidia-smi``."""
    import polars as pl

    from profiler.importers import import_samples
    from profiler.importers.nvidia_smi import read_nvidia_smi_csv

    frames = []
    for path in args.files:
        own = _check_default_id(path, default_run_id(path))
        run_id = args.run or own
        frames.append(read_nvidia_smi_csv(path, node=args.node or own, run_id=run_id, tz=args.tz))
    store = open_store(args)
    label = args.files[0] if len(args.files) == 1 else None
    summary = import_samples(store, pl.concat(frames), file=label)
    _print(summary, store.root, "nvidia-smi import")
    return 0


def _parse_time(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadInputError(
            f"--timestamp: expected an ISO 8601 time such as 2024-05-01T12:00:00Z; found {text!r}"
        ) from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def run_dcgm(args: argparse.Namespace) -> int:
    """``wattwise import dcgm``."""
    from profiler.importers import import_samples
    from profiler.importers.dcgm import read_dcgm_file

    run_id = args.run or _check_default_id(args.file, default_run_id(args.file, prefix=""))
    ts = _parse_time(args.timestamp) if args.timestamp else None
    samples = read_dcgm_file(args.file, timestamp=ts, node=args.node, run_id=run_id)
    store = open_store(args)
    summary = import_samples(store, samples, file=args.file)
    _print(summary, store.root, "dcgm import")
    return 0


def run_seaa2023(args: argparse.Namespace) -> int:
    """``wattwise import seaa2023``."""
    from rich.table import Table

    from profiler.importers.seaa2023 import import_seaa2023

    folder = Path(args.folder) if args.folder else DEFAULT_SEAA2023
    if not folder.is_dir():
        raise BadInputError(
            f"{folder}: expected the SEAA 2023 dataset folder (runs.parquet, traces.parquet); "
            "no such folder" + ("" if args.folder else f" relative to {Path.cwd()}; give FOLDER")
        )
    store = open_store(args)
    summary = import_seaa2023(store, folder, progress=True)
    if args.per_run:
        _print(summary, store.root, f"seaa2023 import from {folder}")
        return 0
    import polars as pl

    per_run = pl.DataFrame(
        [
            {
                "run_id": r.run_id,
                "new": r.samples_new,
                "total": r.samples_total,
                "energy_j": r.energy_j,
                "duration_s": r.duration_s,
                "rel": None if r.relative_error is None else abs(r.relative_error),
            }
            for r in summary.runs
        ],
        schema={
            "run_id": pl.String,
            "new": pl.Int64,
            "total": pl.Int64,
            "energy_j": pl.Float64,
            "duration_s": pl.Float64,
            "rel": pl.Float64,
        },
    )
    groups = (
        per_run.join(store.runs().select("run_id", "node_type"), on="run_id", how="left")
        .group_by("node_type")
        .agg(
            pl.len().alias("runs"),
            pl.col("new").sum(),
            pl.col("total").sum(),
            pl.col("energy_j").sum(),
            pl.col("duration_s").sum(),
            pl.col("rel").max(),
        )
        .sort("node_type")
    )
    table = Table(title=f"seaa2023 import from {folder}")
    table.add_column("node type", no_wrap=True, min_width=23)
    for name in ("runs", "samples new/total", "energy (kJ)", "duration", "max dev."):
        table.add_column(name, justify="right")
    for g in groups.iter_rows(named=True):
        table.add_row(
            str(g["node_type"]),
            str(g["runs"]),
            f"{g['new']:,}/{g['total']:,}",
            _kj(g["energy_j"]),
            _duration(g["duration_s"]),
            "-" if g["rel"] is None else f"{g['rel']:.2%}",
        )
    out = console()
    print_whole(out, table)
    out.print(
        f"{len(summary.runs)} runs, {summary.samples_new:,} new samples of "
        f"{summary.samples_total:,}, {summary.runs_changed} runs added or changed in "
        f"{store.root}.\nEnergy is measured (trace integral) where a trace exists, else the "
        "dataset's reported gpu_energy_j; max dev. is the largest |measured / reported - 1| "
        "of a node type.\nData: del Rey et al., SEAA 2023 (GAISSA-UPC/seaa2023_ect), CC BY 4.0"
    )
    return 0
