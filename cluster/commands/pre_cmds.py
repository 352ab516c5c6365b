"""``wattwise retrain``, ``recommend`` and ``bench pre``: PRE on the command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.commands import bench_subparsers
from cluster.commands.common import (
    add_store_option,
    check_positive,
    console,
    open_store,
    read_parquet,
    widen,
)
from profiler.errors import BadInputError, StoreError

if TYPE_CHECKING:
    from estimators.features import JobDescription


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``retrain``, ``recommend`` and ``bench pre``."""
    p = sub.add_parser(
        "retrain",
        help="fit a new PRE model version from the store's finished runs",
        description=(
            "Fit PRE from every finished run with energy and trained_epochs; keep the new "
            "version only if it is not worse than the current one: on the runs new since the "
            "current model (5 or more), the new model predicting each from a refit without "
            "it, the current one as it predicts them now; with fewer, by cross-validation "
            "MAPEs of the same kind. The card records what was compared. A second retrain "
            "of the same model folder waits for the first."
        ),
    )
    add_store_option(p)
    p.add_argument("--models", metavar="DIR", help="model directory (default <store>/models)")
    p.add_argument(
        "--if-new-runs",
        action="store_true",
        help="only retrain when a usable finished run is not in the newest model's card "
        "(the nightly entry); print what changed",
    )
    p.set_defaults(func=run_retrain)

    p = sub.add_parser(
        "recommend",
        help="rank node types for a job by predicted energy, cost or carbon",
        description="Predict per-epoch energy and time per node type (PRE) and rank them.",
    )
    add_job_options(p)
    p.add_argument("--inventory", metavar="FILE.json", help="node types (default: trained GPUs)")
    p.add_argument("--objective", choices=("energy", "cost", "carbon"), default="energy")
    p.add_argument("--model", metavar="FILE.json", help="PRE model (default: newest in store)")
    p.add_argument("--json", action="store_true", help="print JSON with a placement field")
    add_store_option(p)
    p.set_defaults(func=run_recommend)

    p = bench_subparsers(sub).add_parser(
        "pre",
        help="train PRE on one runs file, predict another",
        description="Train on TRAIN (shared runs layout), predict TEST, write one row per run.",
    )
    p.add_argument("--train", required=True, metavar="TRAIN.parquet")
    p.add_argument("--test", required=True, metavar="TEST.parquet")
    p.add_argument(
        "--out", required=True, metavar="PRED.parquet", help="predictions (.parquet or .csv)"
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw predicted against measured J per epoch, with intervals (PNG)",
    )
    p.set_defaults(func=run_bench)


def add_job_options(
    p: argparse.ArgumentParser,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    train_size: int | None = None,
) -> None:
    """Add the job options of ``recommend`` (and, with defaults, ``placement``).

    ``--val-size`` and ``--validation-size`` are one option (``args.validation_size``).
    Read them back with :func:`job_from_args`.

    Args:
        p: The subcommand's parser.
        batch_size: Default ``--batch-size``; ``None`` makes it required.
        image_size: Default ``--image-size``; ``None`` leaves it unset (a job
            described by its numbers needs none).
        train_size: Default ``--train-size``; ``None`` makes it required.

    """

    def default(value: int | None) -> str:
        return "" if value is None else f" (default {value})"

    p.add_argument("--arch", required=True, help="torchvision model name or a known architecture")
    p.add_argument(
        "--batch-size",
        type=int,
        required=batch_size is None,
        default=batch_size,
        help=f"samples per batch{default(batch_size)}",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=image_size,
        help=f"square input size in pixels{default(image_size)}",
    )
    p.add_argument(
        "--train-size",
        type=int,
        required=train_size is None,
        default=train_size,
        help=f"training samples per epoch{default(train_size)}",
    )
    p.add_argument(
        "--val-size",
        "--validation-size",
        dest="validation_size",
        type=int,
        default=0,
        metavar="N",
        help="validation samples per epoch (default 0)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="planned epochs: totals are per-epoch figures times this, and the run's length "
        "is a PRE feature (default: totals for 1 epoch, predicted without a length)",
    )
    p.add_argument(
        "--gflops",
        type=float,
        help="forward GFLOPs per sample, 1 multiply-add = 2 FLOPs (numbers-only job)",
    )
    p.add_argument("--layers", type=int, help="layers with parameters (numbers-only job)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16, bf16 or amp")
    p.add_argument(
        "--deadline-h",
        type=float,
        help="longest acceptable training time in hours (needs --epochs)",
    )


def job_from_args(args: argparse.Namespace) -> JobDescription:
    """The job described by the options of :func:`add_job_options`."""
    from estimators.features import JobDescription

    return JobDescription(
        architecture=args.arch,
        batch_size=args.batch_size,
        training_size=args.train_size,
        validation_size=args.validation_size,
        image_height=args.image_size,
        image_width=args.image_size,
        planned_epochs=args.epochs,
        precision=args.precision,
        gflops_forward=args.gflops,
        layers=args.layers,
    )


def models_dir(args: argparse.Namespace) -> Path:
    """``--models``, else ``<store>/models``."""
    if getattr(args, "models", None):
        return Path(args.models)
    return open_store(args).root / "models"


def check_writable(path: Path, option: str, *, folder: bool = False, work: str = "trained") -> None:
    """Refuse, before any work, an output path that cannot be written.

    Missing folders are fine (the write creates them); a file where a folder
    must be, a folder where the file must be, or a folder without write
    permission is not.

    Args:
        path: The output file, or the output folder when ``folder``.
        option: The option that named it, for the message (``--out``).
        folder: Whether ``path`` is a folder to write files in.
        work: What was not done, for the message (``trained``, ``computed``).

    Raises:
        BadInputError: The path cannot be written; nothing was done.

    """
    # os.path's tests, not Path's: a name the system refuses (too long) is not a
    # traceback here; the write reports it.
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise BadInputError(f"{option} {path}: is a file; expected a folder (nothing was {work})")
    if not folder and os.path.isdir(path):
        raise BadInputError(
            f"{option} {path}: is a folder; expected a file name (nothing was {work})"
        )
    above = path if folder else path.parent
    # The nearest folder that exists: the write creates the others below it.
    while not os.path.exists(above) and above != above.parent:
        above = above.parent
    if not os.path.isdir(above):
        raise BadInputError(
            f"{option} {path}: {above} is a file, not a folder, so {path} cannot be written "
            f"(nothing was {work}); give a path in a folder"
        )
    if not os.access(above, os.W_OK | os.X_OK):
        raise BadInputError(
            f"{option} {path}: no permission to write in {above} (nothing was {work})"
        )


def run_retrain(args: argparse.Namespace) -> int:
    """Run ``wattwise retrain``."""
    from cluster.retrain import retrain

    folder = models_dir(args)
    label = "--models" if getattr(args, "models", None) else "the model folder"
    check_writable(folder, label, folder=True)
    if getattr(args, "if_new_runs", False):
        from cluster.commands.ops_cmds import retrain_if_new_runs

        return retrain_if_new_runs(open_store(args), folder, console())
    result = retrain(open_store(args), folder)
    out = console()
    ex = result.excluded
    out.print(
        f"training on {result.rows} finished runs; left out {ex['not_finished']} not finished, "
        f"{ex['without_energy_epochs_or_job']} without energy, trained_epochs or job "
        f"description, {ex.get('without_gpu_model', 0)} without a GPU model and "
        f"{ex.get('features_failed', 0)} whose GPU or job could not be described"
    )
    out.print(
        f"{'accepted' if result.accepted else 'rejected'} {result.path.name}: {result.decision}"
    )
    return 0


# ----------------------------------------------------------------------------- recommend


def run_recommend(args: argparse.Namespace) -> int:
    """Run ``wattwise recommend``."""
    from cluster.retrain import latest_model
    from estimators import gpus
    from estimators.pre import PREModel
    from estimators.recommend import NodeType, load_inventory, recommend

    if args.deadline_h is not None:
        check_positive(args.deadline_h, "--deadline-h", "a number of hours")
    model = PREModel.load(args.model) if args.model else latest_model(models_dir(args))
    job = job_from_args(args)
    left_out: list[str] = []
    if args.inventory:
        inventory = load_inventory(args.inventory)
    else:
        # The GPUs PRE was trained on; one described by its numbers is not in the GPU
        # table (the model keeps its name, not its numbers): it needs an inventory.
        known = [g for g in model.gpus_ if gpus.is_known(g)]
        left_out = [g for g in model.gpus_ if g not in known]
        if not known:
            raise BadInputError(
                f"the model's GPUs {model.gpus_} are all described by their numbers; give "
                "them with --inventory FILE (a GPU's numbers as its gpu_model)"
            )
        inventory = [NodeType(name=g.replace(" ", "-").lower(), gpu_model=g) for g in known]
    try:
        rec = recommend(
            model,
            job,
            inventory,
            objective=args.objective,
            deadline_s=None if args.deadline_h is None else args.deadline_h * 3600,
        )
    except BadInputError as err:
        if args.inventory and str(err).startswith("node type "):
            raise BadInputError(f"{args.inventory}, {err}") from None  # say which file
        raise
    if left_out:
        # On stderr: the JSON on stdout stays one document.
        print(
            f"left out {left_out}: GPUs described by their numbers are ranked only with "
            "--inventory FILE",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(rec.to_json(), indent=2, default=str))
        return 0
    _print_table(rec, args, model.architecture_gflops_.get(args.arch, []), model.reference_epochs_)
    return 0


def _unique_run_ids(runs: Any, file: str) -> None:
    """Refuse a runs file that holds a run twice (it would count twice in fits and scores).

    Raises:
        BadInputError: A repeated ``run_id``; the message names the file and the ids.

    """
    import polars as pl

    if "run_id" not in runs.columns:
        return  # runs_features names the missing column
    dup = runs.filter(pl.col("run_id").is_duplicated())["run_id"].unique().sort()
    if dup.len():
        raise BadInputError(
            f"{file}: expected each run once; found {dup.len()} run id(s) more than once "
            f"(first: {dup.head(5).to_list()})"
        )


#: Units of ``recommend``'s energy columns, largest first: (name, how many make 1 kWh).
ENERGY_UNITS = (("kWh", 1.0), ("Wh", 1e3), ("J", 3.6e6))
#: Units of ``recommend``'s time column, largest first: (name, how many make 1 h).
TIME_UNITS = (("h", 1.0), ("min", 60.0), ("s", 3600.0))


def column_unit(
    values: list[float | None], units: tuple[tuple[str, float], ...]
) -> tuple[str, float]:
    """The largest unit in which the column's largest value is at least 1, else the smallest.

    Args:
        values: The column's values in the first unit (``None`` ignored).
        units: (name, how many of it make one of the first unit), largest unit first.

    Returns:
        (unit name, factor from the first unit to it).

    """
    top = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    for name, factor in units:
        if top * factor >= 1:
            return name, factor
    return units[-1]


def sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures without an exponent.

    Whole digits are never dropped: 1234.5 is ``1235``, 0.0001234 is ``0.000123``,
    12.345 is ``12.3``.
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def money(value: float) -> str:
    """A cost: cents from 1 up, else 3 significant figures (a small job's cost is not 0.00)."""
    return f"{value:.2f}" if abs(value) >= 1 else sig(value)


def _print_table(
    rec: Any, args: argparse.Namespace, trained_gflops: list[float], reference: float | None
) -> None:
    from rich.table import Table

    if args.epochs is not None:
        length = f"{args.epochs} epochs"
    elif reference is not None:
        length = f"1 epoch, length unknown (trained runs: median {reference:g}); give --epochs"
    else:
        length = "1 epoch; give --epochs"
    t = Table(
        title=f"PRE recommendation for {args.arch} ({length}, by {rec.objective}); "
        "predicted, 90 % intervals"
    )
    rows = list(rec.table.iter_rows(named=True))
    # One unit per column, chosen so that its largest figure is >= 1 where it can be: a small
    # job's kWh and hours printed with fixed decimals read 0.000 and 0.00 on every row.
    energy = [r[k] for r in rows for k in ("total_energy_kwh", "total_upper_kwh")]
    e_unit, e_per_kwh = column_unit(energy, ENERGY_UNITS)
    t_unit, t_per_h = column_unit([r["total_time_h"] for r in rows], TIME_UNITS)
    columns = ("rank", "node type", "GPU", f"energy {e_unit}", f"interval {e_unit}")
    for c in (*columns, f"time {t_unit}", "cost", "gCO2e"):
        # fold, never cut: a narrow terminal wraps a number or name but keeps all of it
        t.add_column(
            c, justify="right" if c not in ("node type", "GPU") else "left", overflow="fold"
        )
    for r in rows:
        lo, hi = r["total_lower_kwh"], r["total_upper_kwh"]
        t.add_row(
            str(r["rank"]),
            r["node_type"] + ("" if r["seen_gpu"] else " *"),
            f"{r['gpu_count']}x {r['gpu_model']}",
            sig(r["total_energy_kwh"] * e_per_kwh),
            "n/a" if lo is None else f"{sig(lo * e_per_kwh)}-{sig(hi * e_per_kwh)}",
            sig(r["total_time_h"] * t_per_h) + (" (late)" if r["meets_deadline"] is False else ""),
            "" if r["cost"] is None else money(r["cost"]),
            "" if r["carbon_g"] is None else sig(r["carbon_g"]),
        )
    out = widen(console(), t)
    out.print(t)
    out.print(
        rec.summary()
        + (
            "; * = GPU not in the training runs (extrapolated)"
            if not rec.table["seen_gpu"].all()
            else ""
        )
    )
    if not rec.table["seen_architecture"].all():
        at = ", ".join(f"{g:.3g}" for g in trained_gflops) or "none"
        out.print(
            f"{args.arch} at {rec.table['gflops_forward'][0]:.3g} GFLOPs per sample is new to PRE "
            f"(trained on {args.arch} at: {at}): predicted as a new architecture, with the "
            "wider interval"
        )


# ----------------------------------------------------------------------------- bench


def run_bench(args: argparse.Namespace) -> int:
    """Run ``wattwise bench pre``."""
    import numpy as np
    import polars as pl

    from estimators.features import runs_features
    from estimators.pre import PREModel
    from profiler.store import UNCHANGED, atomic_write_parquet

    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise BadInputError(f"--plot must name a .png file; found {args.plot!r}")
    if Path(args.out).suffix.lower() not in (".parquet", ".csv"):
        raise BadInputError(f"--out must name a .parquet or .csv file; found {args.out!r}")
    check_writable(Path(args.out), "--out")
    if args.plot:
        check_writable(Path(args.plot), "--plot")
    train_raw = read_parquet(args.train, "training runs")
    test_raw = read_parquet(args.test, "test runs")
    for raw, file in ((train_raw, args.train), (test_raw, args.test)):
        _unique_run_ids(raw, file)
    train = runs_features(train_raw, file=args.train)
    # Truth: the shared layout's gpu_energy_j, else the store's energy_j (as training
    # reads it); a row whose truth columns are all null is a planned job, predicted and
    # not scored.
    energy = "gpu_energy_j" if "gpu_energy_j" in test_raw.columns else "energy_j"
    truth_cols = (energy, "trained_epochs", "duration_s")
    has_truth = all(c in test_raw.columns for c in truth_cols)
    test = runs_features(test_raw, file=args.test, with_truth=has_truth, planned_rows=True)
    scored = (
        test["epoch_energy_j"].is_not_null().to_numpy()
        if has_truth
        else np.zeros(test.height, dtype=bool)
    )
    has_truth = bool(scored.any())
    model = PREModel().fit(train)
    p = model.predict(test)
    out = pl.DataFrame({"run_id": test["run_id"]}).with_columns(
        p.select(
            "predicted_epoch_energy_j",
            "lower_j",
            "upper_j",
            "predicted_epoch_time_s",
            "seen_architecture",
            "seen_gpu",
        )
    )
    if Path(args.out).suffix.lower() == ".csv":
        from profiler.store import atomic_write_bytes

        atomic_write_bytes(out.write_csv().encode(), Path(args.out))
    else:
        try:
            atomic_write_parquet(out, Path(args.out))
        except StoreError as err:
            # The store's writer says "the store is unchanged"; bench pre has no store.
            raise StoreError(str(err).replace(UNCHANGED, f"{args.out} is unchanged")) from err
    msg = f"wrote {out.height} predictions to {args.out}"
    if has_truth:
        y = test["epoch_energy_j"].to_numpy()[scored]
        pe = out["predicted_epoch_energy_j"].to_numpy()[scored]
        lo = out["lower_j"].to_numpy()[scored]
        hi = out["upper_j"].to_numpy()[scored]
        mape = 100 * np.mean(np.abs(pe - y) / y)
        msg += f"; per-epoch energy MAPE {mape:.2f} %"
        if not scored.all():
            msg += f" over the {len(y)} measured runs ({int((~scored).sum())} planned: not scored)"
        # A run without an interval (training could not say) is not a miss: counted apart.
        has = ~np.isnan(lo)
        if has.any():
            cover = np.mean((y[has] >= lo[has]) & (y[has] <= hi[has]))
            msg += f", 90 % interval coverage {100 * cover:.1f} %"
        if not has.all():
            msg += f" ({int((~has).sum())} of {len(y)} runs without an interval: not counted)"
    if args.plot:
        from estimators.report import figure_png, pre_figure
        from profiler.store import atomic_write_bytes

        # With truth the plot shows the measured runs (predicted against measured).
        keep = scored if has_truth else np.ones(test.height, dtype=bool)
        fig = pre_figure(
            p.filter(pl.Series(keep)),
            [g for g, k in zip(test["gpu_model"].to_list(), keep, strict=True) if k],
            test["epoch_energy_j"].to_numpy()[keep] if has_truth else None,
            title=f"PRE trained on {Path(args.train).name}, tested on {Path(args.test).name}",
        )
        atomic_write_bytes(figure_png(fig), Path(args.plot))
        msg += f"; plot: {args.plot}"
    console().print(msg)
    return 0
