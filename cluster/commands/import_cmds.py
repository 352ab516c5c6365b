"""``wattwise import``: nvidia-smi CSV, dcgm-exporter scrapes and SEAA 2023 into the store."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.commands.common import add_store_option, console, open_store, print_whole
from profiler.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl

    from profiler.importers import ImportSummary
    from profiler.importers.nvidia_smi import NvidiaSmiFile
    from profiler.store import Store

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
        "is integrated from its samples. A last line without its newline (nvidia-smi was "
        "still writing it) is left out and reported; import the file again once it is "
        "finished.",
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
        help="node (host) the file was recorded on (default: the run's node when the run is "
        "already stored with samples of one node, else the file name as for the run id, so "
        "every file is its own stream; files whose names give the same node are refused)",
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


def _print(
    summary: ImportSummary,
    store_root: Path,
    title: str,
    *,
    notes: list[str] | None = None,
    left_out: str = "",
) -> None:
    """Print the per-run table, the totals line (with ``left_out`` appended) and ``notes``."""
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
        f"in {store_root}{left_out}",
        markup=False,
        soft_wrap=True,
    )
    for note in notes or ():
        out.print(note, markup=False, soft_wrap=True)


@dataclass(frozen=True, slots=True)
class _SmiInput:
    """One file of ``wattwise import nvidia-smi`` and where its samples go.

    Attributes:
        path: The file as given.
        run_id: Run its samples belong to.
        node: Node they are stored under.
        node_from_name: ``node`` is the file name's default (no ``--node``, no stored node).
        read: The file's samples and data rows.

    """

    path: str
    run_id: str
    node: str
    node_from_name: bool
    read: NvidiaSmiFile


def _stored_streams(store: Store, run_id: str, cache: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Node, device and timestamp of every stored sample of ``run_id`` (read once)."""
    if run_id not in cache:
        cache[run_id] = store.samples(run_id).select("node", "device", "timestamp")
    return cache[run_id]


def _default_node(
    path: str, run_id: str, stored: pl.DataFrame, notes: list[str]
) -> tuple[str, bool]:
    """The node a file gets without ``--node``: the run's stored node, else its name.

    Returns:
        The node, and whether it comes from the file name (not from the store).

    Raises:
        BadInputError: The run is stored with samples of several nodes and the
            file name gives none of them; or the file name is no usable node name.

    """
    own = default_run_id(path)
    nodes = sorted(stored["node"].unique().to_list())
    if len(nodes) == 1 and own != nodes[0]:
        notes.append(
            f"{path}: stored under node {nodes[0]!r}, the only node of run {run_id!r} in the "
            "store; pass --node to store it under another node"
        )
        return str(nodes[0]), False
    if len(nodes) > 1 and own not in nodes:
        raise BadInputError(
            f"{path}: run {run_id!r} is stored with samples of nodes "
            f"{', '.join(repr(n) for n in nodes)}, and the file name gives node {own!r}, none "
            "of them; pass --node NODE: one of those to add to its trace, or a new name for a "
            "GPU of another host"
        )
    from profiler.schema import RUN_ID_RE

    if not RUN_ID_RE.fullmatch(own):
        raise BadInputError(
            f"{path}: the file name gives no usable node name: expected letters, digits, '.', "
            f"'_' and '-' as in a run id; found {own!r}; pass --node NODE"
        )
    return own, True


def _check_name_clashes(inputs: list[_SmiInput]) -> None:
    """Refuse two files whose names give them the same run and node.

    Their samples would become one stream: two GPUs' samples interleaved, their
    energy about halved.
    """
    seen: dict[tuple[str, str], str] = {}
    for f in inputs:
        if not f.node_from_name:
            continue
        first = seen.get((f.run_id, f.node))
        if first is not None:
            raise BadInputError(
                f"{first} and {f.path} both get node {f.node!r} from their file name, so their "
                f"samples would be stored as one GPU's trace in run {f.run_id!r}; expected one "
                "node per file: import each host's file with its own --node NODE, or pass "
                "--node for both if they are parts of one GPU's log"
            )
        seen[f.run_id, f.node] = f.path


def _labelled(inputs: list[_SmiInput]) -> pl.DataFrame:
    """Every file's samples (stream and timestamp) with the file's index and data row."""
    import polars as pl

    frames = [
        f.read.samples.select("run_id", "node", "device", "timestamp").with_columns(
            pl.lit(i).alias("file"), f.read.rows.alias("row")
        )
        for i, f in enumerate(inputs)
    ]
    return pl.concat(frames)


def _check_overlaps(inputs: list[_SmiInput], samples: pl.DataFrame) -> None:
    """Refuse files whose samples of one stream overlap in time.

    Files of one GPU may follow one another in time, in any order; overlapping
    ones are two GPUs' traces (or one file twice) under the same run, node and device.
    """
    import polars as pl

    stream = ["run_id", "node", "device"]
    spans = (
        samples.group_by(*stream, "file")
        .agg(
            pl.col("timestamp").min().alias("lo"),
            pl.col("timestamp").max().alias("hi"),
            pl.col("row").sort_by("timestamp").first().alias("first_row"),
            pl.col("row").sort_by("timestamp").last().alias("last_row"),
        )
        .sort(*stream, "lo", "file")
    )
    prev = [
        pl.col(c).shift(1).over(stream).alias(f"prev_{c}")
        for c in ("file", "lo", "hi", "first_row", "last_row")
    ]
    bad = spans.with_columns(prev).filter(pl.col("lo") <= pl.col("prev_hi")).head(1)
    if bad.height:
        r = bad.row(0, named=True)
        raise BadInputError(
            f"{inputs[r['file']].path}, row {r['first_row']}: its sample at {r['lo']} lies in "
            f"the time span of {inputs[r['prev_file']].path} (rows {r['prev_first_row']}-"
            f"{r['prev_last_row']}, {r['prev_lo']} to {r['prev_hi']}) for run {r['run_id']!r}, "
            f"node {r['node']!r}, device {r['device']!r}; expected one GPU's samples in one "
            "file, or in files that follow one another in time. Files of different hosts "
            "need different nodes: import each with its own --node NODE"
        )


def _check_against_store(
    inputs: list[_SmiInput], samples: pl.DataFrame, stored: dict[str, pl.DataFrame]
) -> None:
    """Refuse a file that would interleave with a stored stream instead of repeating it.

    Where a file's time span covers stored samples of its stream, it must hold
    them too (a re-import, a log that grew); a stored sample it lacks means the
    file is another GPU's trace landing in the same stream.
    """
    import polars as pl

    stream = ["run_id", "node", "device"]
    old = pl.concat(
        [df.with_columns(pl.lit(run_id).alias("run_id")) for run_id, df in stored.items()]
    ).select(*stream, "timestamp")
    if old.height == 0:
        return
    spans = samples.group_by(*stream, "file").agg(
        pl.col("timestamp").min().alias("lo"), pl.col("timestamp").max().alias("hi")
    )
    inside = (
        old.join(spans, on=stream)
        .filter(pl.col("timestamp").is_between("lo", "hi"))
        .join(samples, on=[*stream, "file", "timestamp"], how="anti")
        .sort("file", "timestamp")
        .head(1)
    )
    if inside.height == 0:
        return
    r = inside.row(0, named=True)
    mine = samples.filter(
        (pl.col("file") == r["file"])
        & (pl.col("run_id") == r["run_id"])
        & (pl.col("node") == r["node"])
        & (pl.col("device") == r["device"])
    )
    before = mine.filter(pl.col("timestamp") < r["timestamp"]).select(pl.col("row").max()).item()
    after = mine.filter(pl.col("timestamp") > r["timestamp"]).select(pl.col("row").min()).item()
    raise BadInputError(
        f"{inputs[r['file']].path}, row {after}: run {r['run_id']!r}, node {r['node']!r}, "
        f"device {r['device']!r} has a sample at {r['timestamp']} in the store that this file "
        f"does not hold (between its rows {before} and {after}); expected the file to repeat "
        "the stored samples where their times overlap (a re-import, or a log that grew). A "
        "trace of another GPU or host needs its own --node NODE"
    )


def run_nvidia_smi(args: argparse.Namespace) -> int:
    """``wattwise import nvidia-smi``."""
    import polars as pl

    from profiler.importers import import_samples
    from profiler.importers.nvidia_smi import read_nvidia_smi_file

    store = open_store(args)
    stored: dict[str, pl.DataFrame] = {}
    notes: list[str] = []
    inputs: list[_SmiInput] = []
    for path in args.files:
        # A default is derived (and must be usable) only for what --run/--node leave open.
        run_id = args.run or _check_default_id(path, default_run_id(path))
        old = _stored_streams(store, run_id, stored)
        node, from_name = (
            (args.node, False) if args.node else _default_node(path, run_id, old, notes)
        )
        read = read_nvidia_smi_file(path, node=node, run_id=run_id, tz=args.tz)
        inputs.append(_SmiInput(path, run_id, node, from_name, read))
        if read.cut_off_row is not None:
            notes.append(
                f"{path}, row {read.cut_off_row}: left out the last line, which has no newline "
                f"at its end (nvidia-smi was still writing it): {read.cut_off_text!r}; import "
                "the file again once it is finished"
            )
    _check_name_clashes(inputs)
    samples = _labelled(inputs)
    _check_overlaps(inputs, samples)
    _check_against_store(inputs, samples, stored)
    label = args.files[0] if len(args.files) == 1 else None
    summary = import_samples(store, pl.concat([f.read.samples for f in inputs]), file=label)
    cut = sum(f.read.cut_off_row is not None for f in inputs)
    _print(
        summary,
        store.root,
        "nvidia-smi import",
        notes=notes,
        left_out=f"; {cut} cut-off last line{'s' if cut > 1 else ''} left out" if cut else "",
    )
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
