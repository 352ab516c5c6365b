"""``wattwise retrain``, ``recommend`` and ``bench pre``: PRE on the command line."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.commands import bench_subparsers
from cluster.commands.common import add_store_option, console, open_store, read_parquet
from profiler.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl

    from estimators.pre import PREModel

_MODEL_RE = re.compile(r"^pre-v(\d+)\.json$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``retrain``, ``recommend`` and ``bench pre``."""
    p = sub.add_parser(
        "retrain",
        help="fit a new PRE model version from the store's finished runs",
        description=(
            "Fit PRE from every finished run with energy and trained_epochs; keep the new "
            "version only if its grouped-CV energy MAPE is not worse than the current one's "
            "on the same runs. The card records why."
        ),
    )
    add_store_option(p)
    p.add_argument("--models", metavar="DIR", help="model directory (default <store>/models)")
    p.set_defaults(func=run_retrain)

    p = sub.add_parser(
        "recommend",
        help="rank node types for a job by predicted energy, cost or carbon",
        description="Predict per-epoch energy and time per node type (PRE) and rank them.",
    )
    p.add_argument("--arch", required=True, help="torchvision model name or a known architecture")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--image-size", type=int, help="square input size in pixels")
    p.add_argument("--train-size", type=int, required=True, help="training samples per epoch")
    p.add_argument("--val-size", type=int, default=0, help="validation samples per epoch")
    p.add_argument("--epochs", type=int, default=1, help="planned epochs")
    p.add_argument("--gflops", type=float, help="forward GFLOPs per sample (numbers-only job)")
    p.add_argument("--layers", type=int, help="layers with parameters (numbers-only job)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16, bf16 or amp")
    p.add_argument("--inventory", metavar="FILE.json", help="node types (default: trained GPUs)")
    p.add_argument("--objective", choices=("energy", "cost", "carbon"), default="energy")
    p.add_argument("--deadline-h", type=float, help="longest acceptable training time in hours")
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
    p.add_argument("--out", required=True, metavar="PRED.parquet")
    p.set_defaults(func=run_bench)


# ----------------------------------------------------------------------------- models dir


def models_dir(args: argparse.Namespace) -> Path:
    """``--models``, else ``<store>/models``."""
    if getattr(args, "models", None):
        return Path(args.models)
    return open_store(args).root / "models"


def versions(folder: Path) -> list[int]:
    """Model versions present in ``folder``, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MODEL_RE.match(p.name)))


def latest_model(folder: Path) -> PREModel:
    """The newest accepted model in ``folder``.

    Raises:
        BadInputError: No model there, or the model fails its checks.

    """
    from estimators.pre import PREModel, card_path

    for v in reversed(versions(folder)):
        path = folder / f"pre-v{v}.json"
        card = card_path(path)
        if card.is_file():
            try:
                accepted = json.loads(card.read_text()).get("accepted", True)
            except json.JSONDecodeError:
                accepted = True  # let load() report the broken card
            if not accepted:
                continue
        return PREModel.load(path)
    raise BadInputError(
        f"{folder}: no PRE model found (expected pre-v<N>.json with its card); run "
        "'wattwise retrain' after importing finished runs, or pass --model FILE.json"
    )


# ----------------------------------------------------------------------------- retrain


def training_rows(runs: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Feature rows of finished runs with energy and epochs, and counts of runs left out."""
    import polars as pl

    from estimators.features import runs_features

    counts = {"not_finished": int(runs.filter(pl.col("status") != "finished").height)}
    done = runs.filter(pl.col("status") == "finished")
    usable = done.filter(
        pl.col("energy_j").is_not_null()
        & (pl.col("energy_j") > 0)
        & pl.col("trained_epochs").is_not_null()
        & (pl.col("trained_epochs") > 0)
        & pl.col("duration_s").is_not_null()
        & pl.col("gflops_forward").is_not_null()
        & pl.col("batch_size").is_not_null()
        & pl.col("training_size").is_not_null()
    )
    counts["without_energy_epochs_or_job"] = done.height - usable.height
    return runs_features(usable.drop("energy_source", strict=False), file="runs"), counts


def run_retrain(args: argparse.Namespace) -> int:
    """Run ``wattwise retrain``."""
    from estimators.pre import PREModel

    store = open_store(args)
    rows, counts = training_rows(store.runs())
    out = console()
    out.print(
        f"training on {rows.height} finished runs; left out {counts['not_finished']} not "
        f"finished and {counts['without_energy_epochs_or_job']} without energy, "
        "trained_epochs or job description"
    )
    folder = models_dir(args)
    new = PREModel().fit(rows)
    new_score = new.cv_["energy"]["grouped_mape_pct"]
    if new_score is None:
        new_score = new.cv_["energy"]["random_mape_pct"]
    decision, accepted, old_score = "first model", True, None
    old_versions = versions(folder)
    if old_versions:
        try:
            accepted, decision, old_score, new_score = _compare(folder, rows, new, new_score)
        except BadInputError as err:
            decision = f"current model unusable ({err}); replaced"
    version = (old_versions[-1] + 1) if old_versions else 1
    path = folder / f"pre-v{version}.json"
    new.save(
        path,
        card={
            "version": version,
            "accepted": accepted,
            "decision": decision,
            "previous_score_mape_pct": old_score,
            "score_mape_pct": new_score,
            "excluded_runs": counts,
            "run_ids": rows["run_id"].to_list(),
        },
    )
    out.print(f"{'accepted' if accepted else 'rejected'} {path.name}: {decision}")
    return 0


def _compare(
    folder: Path, rows: pl.DataFrame, new: PREModel, new_score: float
) -> tuple[bool, str, float, float]:
    """Held-out energy MAPE of the current and the new model, and the verdict.

    Runs added since the current model are held out for it: the current
    model's predictions of them are compared with the new model's grouped
    out-of-fold predictions of the same runs. With fewer than 5 new runs both
    models' grouped-CV scores (same runs, so comparable) are compared.
    """
    import numpy as np

    from estimators.pre import card_path

    current = latest_model(folder)
    v = max(v for v in versions(folder) if _accepted(folder / f"pre-v{v}.json"))
    card = json.loads(card_path(folder / f"pre-v{v}.json").read_text())
    known = set(card.get("run_ids") or [])
    fresh = ~rows["run_id"].is_in(list(known)).to_numpy()
    y = rows["epoch_energy_j"].to_numpy()
    if fresh.sum() >= 5:
        p_old = current.predict(rows.filter(fresh))["predicted_epoch_energy_j"].to_numpy()
        old_score = float(100 * np.mean(np.abs(p_old - y[fresh]) / y[fresh]))
        p_new = new.oof_["energy"][fresh]
        new_score = float(100 * np.mean(np.abs(p_new - y[fresh]) / y[fresh]))
        basis = f"on {int(fresh.sum())} runs new since v{v}"
    else:
        cv = card.get("cv", {}).get("energy", {})
        old_score = cv.get("grouped_mape_pct") or cv.get("random_mape_pct") or float("inf")
        basis = f"grouped CV (v{v} on {card.get('training_rows')} runs)"
    ok = new_score <= old_score * 1.0001
    verdict = "not worse than" if ok else "worse than"
    decision = (
        f"held-out energy MAPE {new_score:.2f} % {verdict} current v{v}'s {old_score:.2f} % "
        f"({basis})" + ("" if ok else "; kept current")
    )
    return ok, decision, float(old_score), float(new_score)


def _accepted(path: Path) -> bool:
    from estimators.pre import card_path

    try:
        return bool(json.loads(card_path(path).read_text()).get("accepted", True))
    except (OSError, json.JSONDecodeError):
        return False


# ----------------------------------------------------------------------------- recommend


def run_recommend(args: argparse.Namespace) -> int:
    """Run ``wattwise recommend``."""
    from estimators.features import JobDescription
    from estimators.pre import PREModel
    from estimators.recommend import NodeType, load_inventory, recommend

    model = PREModel.load(args.model) if args.model else latest_model(models_dir(args))
    job = JobDescription(
        architecture=args.arch,
        batch_size=args.batch_size,
        training_size=args.train_size,
        validation_size=args.val_size,
        image_height=args.image_size,
        image_width=args.image_size,
        planned_epochs=args.epochs,
        precision=args.precision,
        gflops_forward=args.gflops,
        layers=args.layers,
    )
    if args.inventory:
        inventory = load_inventory(args.inventory)
    else:
        inventory = [NodeType(name=g.replace(" ", "-").lower(), gpu_model=g) for g in model.gpus_]
    rec = recommend(
        model,
        job,
        inventory,
        objective=args.objective,
        deadline_s=None if args.deadline_h is None else args.deadline_h * 3600,
    )
    if args.json:
        print(json.dumps(rec.to_json(), indent=2, default=str))
        return 0
    _print_table(rec, args)
    return 0


def _print_table(rec: Any, args: argparse.Namespace) -> None:
    from rich.table import Table

    t = Table(
        title=f"PRE recommendation for {args.arch} ({args.epochs} epochs, by {rec.objective}); "
        "predicted, 90 % intervals"
    )
    for c in ("rank", "node type", "GPU", "energy kWh", "interval kWh", "time h", "cost", "gCO2e"):
        t.add_column(c, justify="right" if c not in ("node type", "GPU") else "left")
    for r in rec.table.iter_rows(named=True):
        lo, hi = r["total_lower_kwh"], r["total_upper_kwh"]
        t.add_row(
            str(r["rank"]),
            r["node_type"] + ("" if r["seen_gpu"] else " *"),
            f"{r['gpu_count']}x {r['gpu_model']}",
            f"{r['total_energy_kwh']:.3f}",
            "n/a" if lo is None else f"{lo:.3f}-{hi:.3f}",
            f"{r['total_time_h']:.2f}" + ("" if r["meets_deadline"] else " (late)"),
            "" if r["cost"] is None else f"{r['cost']:.2f}",
            "" if r["carbon_g"] is None else f"{r['carbon_g']:.0f}",
        )
    out = console()
    out.print(t)
    out.print(
        f"choose {rec.chosen}: saves {rec.savings_vs_worst_pct:.1f} % vs the worst"
        + (
            ""
            if rec.savings_vs_default_pct is None
            else f", {rec.savings_vs_default_pct:.1f} % vs the default"
        )
        + (
            "; * = GPU not in the training runs (extrapolated)"
            if not rec.table["seen_gpu"].all()
            else ""
        )
    )


# ----------------------------------------------------------------------------- bench


def run_bench(args: argparse.Namespace) -> int:
    """Run ``wattwise bench pre``."""
    import numpy as np
    import polars as pl

    from estimators.features import runs_features
    from estimators.pre import PREModel
    from profiler.store import atomic_write_parquet

    train = runs_features(read_parquet(args.train, "training runs"), file=args.train)
    test_raw = read_parquet(args.test, "test runs")
    has_truth = all(c in test_raw.columns for c in ("gpu_energy_j", "trained_epochs", "duration_s"))
    test = runs_features(test_raw, file=args.test, with_truth=has_truth)
    model = PREModel().fit(train)
    p = model.predict(test)
    out = pl.DataFrame({"run_id": test["run_id"]}).with_columns(
        p.select(
            "predicted_epoch_energy_j",
            "lower_j",
            "upper_j",
            "predicted_epoch_time_s",
            "seen_architecture",
        )
    )
    atomic_write_parquet(out, Path(args.out))
    msg = f"wrote {out.height} predictions to {args.out}"
    if has_truth:
        y = test["epoch_energy_j"].to_numpy()
        pe = out["predicted_epoch_energy_j"].to_numpy()
        lo = out["lower_j"].to_numpy()
        hi = out["upper_j"].to_numpy()
        mape = 100 * np.mean(np.abs(pe - y) / y)
        cover = np.mean((y >= lo) & (y <= hi))
        msg += f"; per-epoch energy MAPE {mape:.2f} %, 90 % interval coverage {100 * cover:.1f} %"
    console().print(msg)
    return 0
