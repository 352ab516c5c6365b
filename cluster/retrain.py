"""PRE model versions in the store: retrain from finished runs, keep only if not worse.

Versions live in ``<store>/models`` as ``pre-v<N>.json`` (XGBoost JSON inside
wattwise's envelope) beside ``pre-v<N>.card.json``. Used by ``wattwise
retrain``, the demo and the aggregator's background retrain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from profiler.errors import BadInputError

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from estimators.pre import PREModel
    from profiler.store import Store

_MODEL_RE = re.compile(r"^pre-v(\d+)\.json$")


def versions(folder: Path) -> list[int]:
    """Model versions present in ``folder``, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MODEL_RE.match(p.name)))


def latest_model(folder: Path) -> PREModel:
    """The newest accepted model in ``folder``.

    Raises:
        BadInputError: No model there, the model fails its checks (see
            :meth:`estimators.pre.PREModel.load`: checksummed XGBoost JSON only), or it
            is a symlink to a file outside ``folder``.

    """
    from estimators.pre import PREModel, card_path, read_card

    for v in reversed(versions(folder)):
        path = folder / f"pre-v{v}.json"
        card = card_path(path)
        for p in (path, card):
            # A model or card linked from outside the folder is not the store's to load.
            if p.is_symlink() and p.resolve().parent != folder.resolve():
                raise BadInputError(
                    f"{p}: is a symlink to {p.resolve()}, outside {folder}; models load only "
                    "from their own folder. Remove the link or copy the model in"
                )
        if card.is_file():
            try:
                accepted = read_card(card).get("accepted", True)
            except BadInputError:
                accepted = True  # let load() report the broken card
            if not accepted:
                continue
        return PREModel.load(path)
    raise BadInputError(
        f"{folder}: no PRE model found (expected pre-v<N>.json with its card); run "
        "'wattwise retrain' after importing finished runs, or pass --model FILE.json"
    )


def training_rows(runs: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Feature rows of finished runs with energy and epochs, and counts of runs left out.

    See :func:`training_rows_why` for the reasons behind the counts.
    """
    rows, counts, _ = training_rows_why(runs)
    return rows, counts


def training_rows_why(
    runs: pl.DataFrame,
) -> tuple[pl.DataFrame, dict[str, int], dict[str, str]]:
    """Feature rows of the usable finished runs, the runs left out, and why.

    A finished run is left out, not fatal to the retrain, when it lacks energy,
    epochs or its job (counted in ``without_energy_epochs_or_job``), has no
    ``gpu_model`` (``without_gpu_model``), or its features or truths cannot be
    built (``features_failed``: an unknown GPU model, an architecture without
    layers, an infinite or NaN duration, energy or FLOPs, a count that is not a
    whole number...; the reason per run is returned).

    Args:
        runs: The store's runs table.

    Returns:
        (feature rows of :func:`estimators.features.runs_features`, counts of
        runs left out by reason, reason per run id for the runs left out
        because of their GPU or features).

    """
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
    usable = usable.drop("energy_source", strict=False)
    no_gpu = usable.filter(pl.col("gpu_model").is_null())
    why = {str(r): "gpu_model is null; expected the GPU's model name" for r in no_gpu["run_id"]}
    counts["without_gpu_model"] = no_gpu.height
    usable = usable.filter(pl.col("gpu_model").is_not_null())
    counts["features_failed"] = 0
    try:
        rows = runs_features(usable, file="runs")
    except BadInputError:
        # One run's failure must not stop the retrain: find the failing runs (only
        # on this slow path) and train on the others.
        good = _describable(usable, 0, usable.height, why)
        if not good:
            raise  # no run left at all: the first run's reason says it best
        counts["features_failed"] = usable.height - len(good)
        rows = runs_features(usable[good], file="runs")
    return rows, counts, why


def _describable(runs: pl.DataFrame, start: int, stop: int, why: dict[str, str]) -> list[int]:
    """Row indices in ``[start, stop)`` whose features can be built; reasons of the others.

    Halves the range until each failing run is alone, so a few bad runs among
    thousands cost a few passes, not one pass per run.

    Args:
        runs: Usable finished runs.
        start: First row index (0-based).
        stop: One past the last row index.
        why: Filled with the reason per run id left out.

    Returns:
        The row indices that can be described, ascending.

    """
    from estimators.features import runs_features

    try:
        runs_features(runs.slice(start, stop - start))
    except BadInputError as err:
        if stop - start == 1:
            # runs_features numbers rows within the slice; the run id says which.
            run_id = str(runs["run_id"][start])
            msg = str(err).removeprefix("row 1: ").removeprefix("row 1, ")
            # "'duration_s': run 'r': expected ..." names the column first: drop the run id.
            why[run_id] = msg.replace(f"run {run_id!r}: ", "", 1)
            return []
        mid = (start + stop) // 2
        return _describable(runs, start, mid, why) + _describable(runs, mid, stop, why)
    return list(range(start, stop))


#: Fewest runs new since the current model for the comparison on them; with
#: fewer, both models' cross-validation scores of the same kind are compared.
MIN_NEW_RUNS = 5


@dataclass(frozen=True, slots=True)
class RetrainResult:
    """What one retrain did.

    Attributes:
        version: Version number written.
        path: The model file written (its card beside it).
        accepted: Whether it became the current model.
        decision: Why it was accepted or rejected, and which finished runs were
            left out because their GPU or features could not be described.
        rows: Runs it was trained on.
        excluded: Runs left out, by reason (see :func:`training_rows_why`).
        excluded_why: Reason per run id, for runs left out because of their GPU
            or features.

    """

    version: int
    path: Path
    accepted: bool
    decision: str
    rows: int
    excluded: dict[str, int]
    excluded_why: dict[str, str] = field(default_factory=dict)


def retrain(store: Store, folder: Path | None = None) -> RetrainResult:
    """Fit PRE on every usable finished run of the store and keep it if not worse.

    Args:
        store: The run store; failed, running and incomplete runs, and runs whose
            GPU or job cannot be described, are left out (counted, with reasons).
        folder: Where versions live; default ``<store>/models``.

    Returns:
        What was written and why it was kept or not.

    """
    from estimators.pre import PREModel

    folder = folder if folder is not None else store.root / "models"
    rows, counts, why = training_rows_why(store.runs())
    new = PREModel().fit(rows)
    new_score = new.cv_["energy"]["grouped_mape_pct"]
    if new_score is None:
        new_score = new.cv_["energy"]["random_mape_pct"]
    decision, accepted, old_score = "first model", True, None
    old_versions = versions(folder)
    if old_versions:
        try:
            accepted, decision, old_score, new_score = _compare(folder, rows, new)
        except BadInputError as err:
            decision = f"current model unusable ({err}); replaced"
    if why:
        shown = "; ".join(f"{r}: {m}" for r, m in list(why.items())[:3])
        more = f"; ... ({len(why) - 3} more in the card)" if len(why) > 3 else ""
        decision += (
            f"; left out {len(why)} finished run(s) whose GPU or job could not be "
            f"described ({shown}{more})"
        )
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
            "excluded_run_reasons": why,
            "run_ids": rows["run_id"].to_list(),
        },
    )
    return RetrainResult(version, path, accepted, decision, rows.height, counts, why)


def _compare(folder: Path, rows: pl.DataFrame, new: PREModel) -> tuple[bool, str, float, float]:
    """Held-out energy MAPE of the current and the new model, and the verdict.

    Both models are scored the same way. On the runs added since the current
    model (at least :data:`MIN_NEW_RUNS`), the current model predicts each as
    the architecture it has or has not seen (at the same FLOPs per sample);
    the new model's prediction of the same run comes from a fit in the same
    situation: one without that run but with its architecture (the new
    model's recipe refitted on random folds of those runs, see
    :func:`_held_out_seen`) for an architecture the current model had seen,
    one without its architecture (the new model's architecture-grouped
    out-of-fold prediction) for an architecture it had not. New runs whose
    architecture the current model had not seen cannot be scored that way
    when the new model has a single architecture; they are left out of the
    comparison. With fewer than :data:`MIN_NEW_RUNS` scorable new runs both
    models' cross-validation MAPEs of the same kind are compared: grouped by
    architecture when both have one, else random folds.

    Returns:
        (accepted, decision naming what was compared, current model's MAPE in
        %, new model's MAPE in %).

    """
    import numpy as np

    from estimators.pre import card_path, read_card

    current = latest_model(folder)
    v = max(v for v in versions(folder) if _accepted(folder / f"pre-v{v}.json"))
    card = read_card(card_path(folder / f"pre-v{v}.json"))
    known = card.get("run_ids")
    # A card without its runs cannot tell new runs from the ones it was fitted on.
    fresh = (
        ~rows["run_id"].is_in(list(known)).to_numpy()
        if known is not None
        else np.zeros(rows.height, dtype=bool)
    )
    y = rows["epoch_energy_j"].to_numpy().astype(float)
    grouped_new = new.cv_["energy"]["grouped_mape_pct"] is not None
    seen = np.zeros(rows.height, dtype=bool)
    p_old = np.full(rows.height, np.nan)
    if fresh.any():
        pred = current.predict(rows.filter(fresh))
        p_old[fresh] = pred["predicted_epoch_energy_j"].to_numpy()
        seen[fresh] = pred["seen_architecture"].to_numpy()
    unseen = fresh & ~seen
    scored = seen | (unseen if grouped_new else np.zeros_like(unseen))
    if scored.sum() >= MIN_NEW_RUNS:
        p_new = np.full(rows.height, np.nan)
        if seen.any():
            p_new[seen] = _held_out_seen(rows, seen, new)
        p_new[scored & ~seen] = new.oof_["energy"][scored & ~seen]
        old_score = float(100 * np.mean(np.abs(p_old[scored] - y[scored]) / y[scored]))
        new_score = float(100 * np.mean(np.abs(p_new[scored] - y[scored]) / y[scored]))
        n_seen, n_unseen = int(seen.sum()), int((scored & ~seen).sum())
        what = f"held-out energy MAPE on {int(scored.sum())} runs new since v{v}"
        parts = [
            f"{n} of architectures {how}"
            for n, how in (
                (n_seen, f"v{v} had seen, the new model refitted without them (random folds)"),
                (n_unseen, f"new to v{v}, the new model refitted without their architecture"),
            )
            if n
        ]
        left = int((unseen & ~scored).sum())
        if left:
            parts.append(
                f"{left} of architectures new to v{v} not scored: the new model has one "
                "architecture, so no fit without theirs"
            )
        basis = "; ".join(parts)
    else:
        old_cv = card.get("cv", {}).get("energy", {})
        # Like with like: grouped CV only when both have one (two or more architectures).
        kind = "grouped" if grouped_new and old_cv.get("grouped_mape_pct") is not None else "random"
        old_score = old_cv.get(f"{kind}_mape_pct")
        old_score = float("inf") if old_score is None else float(old_score)
        new_score = float(new.cv_["energy"][f"{kind}_mape_pct"])
        folds = "folds grouped by architecture" if kind == "grouped" else "random folds"
        what = f"cross-validated energy MAPE ({folds})"
        basis = (
            f"new model on {rows.height} runs, v{v} on {card.get('training_rows')}; "
            f"{int(scored.sum())} scorable run(s) new since v{v}, fewer than {MIN_NEW_RUNS} "
            "to compare on"
        )
    ok = new_score <= old_score * 1.0001
    verdict = "not worse than" if ok else "worse than"
    decision = f"{what}: {new_score:.2f} % {verdict} current v{v}'s {old_score:.2f} % ({basis})" + (
        "" if ok else "; kept current"
    )
    return ok, decision, float(old_score), float(new_score)


def _held_out_seen(rows: pl.DataFrame, held: np.ndarray, new: PREModel) -> np.ndarray:
    """The new model's energy predictions of ``rows[held]``, each from a fit without it.

    The held rows are split into random folds (the new model's ``cv_folds`` and
    ``seed``); each fold is predicted by the new model's recipe (its prior's
    efficiency and overlap and its tree depth, as chosen on all rows, the
    shortcut PRE's own cross-validation takes) fitted on all the other rows, so
    every other run of the same architecture stays in the fit. Only the
    energy target is refitted: at most ``cv_folds`` fits, not a full retrain.

    Args:
        rows: The new model's training rows.
        held: Boolean mask of the rows to predict.
        new: The model fitted on ``rows``.

    Returns:
        Predicted per-epoch energy (J) of the held rows, in row order.

    """
    import numpy as np

    from estimators.pre import _arrays, random_folds

    cv = new.cv_["energy"]
    depth = int(cv["max_depth"])
    idx = np.flatnonzero(held)
    everything = np.arange(rows.height)
    folds = [
        (np.setdiff1d(everything, idx[va]), idx[va])
        for _, va in random_folds(len(idx), new.cv_folds, seed=new.seed)
    ]
    y = rows["epoch_energy_j"].to_numpy().astype(float)
    choice = (float(cv["efficiency"]), float(cv["overlap"]))
    oof = new._oof(_arrays(rows), new._x(rows), y, True, (depth,), folds, choice)
    return np.asarray(oof[depth][idx], dtype=float)


def _accepted(path: Path) -> bool:
    from estimators.pre import card_path, read_card

    try:
        return bool(read_card(card_path(path)).get("accepted", True))
    except (OSError, BadInputError):
        return False
