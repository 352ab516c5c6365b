"""PRE model versions in the store: retrain from finished runs, keep only if not worse.

Versions live in ``<store>/models`` as ``pre-v<N>.json`` (XGBoost JSON inside
wattwise's envelope) beside ``pre-v<N>.card.json``. Used by ``wattwise
retrain``, the demo and the aggregator's background retrain.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from profiler.errors import BadInputError

if TYPE_CHECKING:
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
    from estimators.pre import PREModel, card_path

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


@dataclass(frozen=True, slots=True)
class RetrainResult:
    """What one retrain did.

    Attributes:
        version: Version number written.
        path: The model file written (its card beside it).
        accepted: Whether it became the current model.
        decision: Why it was accepted or rejected.
        rows: Runs it was trained on.
        excluded: Runs left out, by reason.

    """

    version: int
    path: Path
    accepted: bool
    decision: str
    rows: int
    excluded: dict[str, int]


def retrain(store: Store, folder: Path | None = None) -> RetrainResult:
    """Fit PRE on every finished run of the store and keep it if not worse.

    Args:
        store: The run store; failed, running and incomplete runs are left out.
        folder: Where versions live; default ``<store>/models``.

    Returns:
        What was written and why it was kept or not.

    """
    from estimators.pre import PREModel

    folder = folder if folder is not None else store.root / "models"
    rows, counts = training_rows(store.runs())
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
    return RetrainResult(version, path, accepted, decision, rows.height, counts)


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
