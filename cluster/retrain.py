"""PRE model versions in the store: retrain from finished runs, keep only if not worse.

Versions live in ``<store>/models`` as ``pre-v<N>.json`` (XGBoost JSON inside
wattwise's envelope) beside ``pre-v<N>.card.json``. Used by ``wattwise
retrain``, the demo and the aggregator's background retrain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from profiler.errors import BadInputError, StoreError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    import polars as pl

    from estimators.pre import PREModel
    from profiler.store import Store

log = logging.getLogger(__name__)

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

    A second retrain of the same folder waits for the first to write its
    version (see :func:`versions_lock`), then compares against it.

    Args:
        store: The run store; failed, running and incomplete runs, and runs whose
            GPU or job cannot be described, are left out (counted, with reasons).
        folder: Where versions live; default ``<store>/models``.

    Returns:
        What was written and why it was kept or not.

    Raises:
        BadInputError: No usable run, too few to fit, or a file where the model
            folder should be (refused before the fit).
        StoreError: The model folder cannot be created, locked or written.

    """
    from estimators.pre import PREModel

    folder = folder if folder is not None else store.root / "models"
    rows, counts, why = training_rows_why(store.runs())
    _make_folder(folder)  # before the fit: a folder that cannot be made fails in seconds
    new = PREModel().fit(rows)
    new_score = new.cv_["energy"]["grouped_mape_pct"]
    if new_score is None:
        new_score = new.cv_["energy"]["random_mape_pct"]
    # From reading the current version to writing this one's card and model: another
    # retrain (the aggregator's, the nightly job) waits, so it neither takes the same
    # version number nor compares against a model that is being replaced.
    with versions_lock(folder):
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


#: Lock file in the model folder, held by a retrain while it picks and writes a version.
LOCK_FILE = ".retrain.lock"


def _make_folder(folder: Path) -> None:
    """Create the model folder, or refuse it before anything is trained.

    Raises:
        BadInputError: A file stands where the folder (or one above it) should be.
        StoreError: The folder cannot be created otherwise (no permission...).

    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise BadInputError(
            f"{folder}: cannot hold PRE models: a file of that name (or above it) is in the "
            f"way ({err}); nothing was trained. Give another model folder"
        ) from err
    except OSError as err:
        raise StoreError(
            f"{folder}: cannot create the model folder ({err}); nothing was trained"
        ) from err


@contextlib.contextmanager
def versions_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``folder``'s versions (:data:`LOCK_FILE`, ``flock``).

    A second holder, in this process or another on the same host, waits; it
    logs a warning that it waits, once. The lock goes with the file
    descriptor, so a crashed retrain leaves none behind.

    Raises:
        StoreError: The lock file cannot be opened or locked.

    """
    import fcntl

    lock = folder / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise StoreError(f"{lock}: cannot open the retrain lock ({err})") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(
                "%s: another retrain is writing a model version; waiting for it to finish",
                folder,
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                raise StoreError(f"{lock}: cannot lock the model folder ({err})") from err
        except OSError as err:
            raise StoreError(f"{lock}: cannot lock the model folder ({err})") from err
        yield
    finally:
        os.close(fd)


def _compare(folder: Path, rows: pl.DataFrame, new: PREModel) -> tuple[bool, str, float, float]:
    """Held-out energy MAPE of the current and the new model, and the verdict.

    Each model is scored on what its users get. On the runs added since the
    current model (at least :data:`MIN_NEW_RUNS`), the current model predicts
    each as it does now: as a seen architecture, or as a new one when it has
    not seen that architecture. The new model predicts each from a refit
    without that run (random folds of the new runs, see
    :func:`_held_out_seen`); every other run stays in the fit, those of the
    same architecture included, as they are in the new model. So a retrain
    that learns an architecture the current model never saw is scored as a
    user of it will be served (before, it was refitted without that
    architecture, scored worse than it is, rejected, and the model never
    learnt the architecture). With fewer than :data:`MIN_NEW_RUNS` new runs
    both models' cross-validation MAPEs of the same kind are compared:
    grouped by architecture when both have one, else random folds.

    Returns:
        (accepted, decision naming what was compared, current model's MAPE in
        %, new model's MAPE in %).

    """
    import numpy as np
    import polars as pl

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
    if fresh.sum() >= MIN_NEW_RUNS:
        pred = current.predict(rows.filter(pl.Series(fresh)))
        p_old = pred["predicted_epoch_energy_j"].to_numpy().astype(float)
        seen = pred["seen_architecture"].to_numpy().astype(bool)
        p_new = _held_out_seen(rows, fresh, new)
        yf = y[fresh]
        old_score = float(100 * np.mean(np.abs(p_old - yf) / yf))
        new_score = float(100 * np.mean(np.abs(p_new - yf) / yf))
        n_seen, n_unseen = int(seen.sum()), int((~seen).sum())
        what = f"held-out energy MAPE on {int(fresh.sum())} runs new since v{v}"
        counts = [
            f"{n} of architectures {how}"
            for n, how in (
                (n_seen, "it had seen"),
                (n_unseen, "new to it, predicted as new architectures"),
            )
            if n
        ]
        basis = (
            "new model: refitted without each run on random folds, the other runs, of its "
            f"architecture too, kept as in the new model; v{v}: as it predicts now, "
            + " and ".join(counts)
        )
    else:
        old_cv = card.get("cv", {}).get("energy", {})
        # Like with like: grouped CV only when both have one (two or more architectures).
        grouped_new = new.cv_["energy"]["grouped_mape_pct"] is not None
        kind = "grouped" if grouped_new and old_cv.get("grouped_mape_pct") is not None else "random"
        old_score = old_cv.get(f"{kind}_mape_pct")
        old_score = float("inf") if old_score is None else float(old_score)
        new_score = float(new.cv_["energy"][f"{kind}_mape_pct"])
        folds = "folds grouped by architecture" if kind == "grouped" else "random folds"
        what = f"cross-validated energy MAPE ({folds})"
        basis = (
            f"new model on {rows.height} runs, v{v} on {card.get('training_rows')}; "
            f"{int(fresh.sum())} run(s) new since v{v}, fewer than {MIN_NEW_RUNS} "
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
