"""``wattwise metrics``: serve the aggregator's Prometheus metrics."""

from __future__ import annotations

import argparse
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from cluster.commands.common import add_store_option, open_store
from profiler.errors import BadInputError

log = logging.getLogger(__name__)

#: Default port of ``wattwise metrics`` (dcgm-exporter uses 9400).
DEFAULT_PORT = 9401


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``metrics``."""
    p = sub.add_parser(
        "metrics",
        help="serve Prometheus metrics (job energy, STEP, PRE, sidecars) at /metrics",
        description=(
            "Serve the aggregator's metrics for Prometheus. Without --ray, an aggregator is "
            "rebuilt from the store (running runs replayed) every --refresh seconds, and runs "
            "that ended within a day of the store's newest run are served as stored; of the "
            "aggregator counters only finished runs (from the store). For a single node or "
            "tests. With --ray, the cluster's aggregator actors (every shard) "
            "and its sidecar actors are queried at each scrape."
        ),
    )
    add_store_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)"
    )
    p.add_argument(
        "--refresh",
        type=float,
        default=15.0,
        help="seconds between rebuilds from the store (default 15; not with --ray)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        nargs="?",
        const="auto",
        default=None,
        help="read the aggregator actors of the Ray cluster at ADDRESS (default 'auto': "
        "the local one)",
    )
    p.add_argument(
        "--once", action="store_true", help="print the metrics once in the text format and exit"
    )
    p.set_defaults(func=run_metrics)


#: Ended runs ``wattwise metrics`` serves without ``--ray``: those whose latest recorded time
#: (start or end) lies within this many seconds (s) of the latest such time of all runs (the
#: store's own clock: replayed and imported runs carry their recorded times, not today's).
ENDED_SHOWN_S = 86_400.0
#: Most ended runs served, most recent first (as many as a live aggregator keeps).
ENDED_SHOWN_MAX = 1024
#: Run statuses that mean the run has ended.
_ENDED = ("finished", "failed")


class _Rebuilding:
    """An aggregator rebuilt from the store at most every ``refresh_s`` seconds.

    Besides the running runs the rebuilt aggregator holds, it serves the runs
    that ended recently (see :data:`ENDED_SHOWN_S`) with their figures as
    stored: total energy, epochs, final STEP figure (the total), last epoch
    (:meth:`cluster.aggregator.Aggregator.epochs` reads it from the store).
    A live aggregator holds them after they end; a rebuilt one does not, so
    without this they vanished at the next refresh.

    Of the aggregator's counters it gives only ``finished_runs``, counted from
    the store (runs finished or failed); the others (samples received, late,
    flushed, epoch marks taken...) exist only in a live aggregator and are left
    out rather than reported as zeros.
    """

    def __init__(self, store: Any, refresh_s: float) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._agg, self._ended, self._ended_count = self._build()
        self._at = time.monotonic()

    def _build(self) -> tuple[Any, list[dict[str, Any]], int]:
        """The rebuilt aggregator, the recently ended runs' summaries, how many runs ended."""
        import polars as pl

        from cluster.aggregator import Aggregator

        agg = Aggregator.rebuild(self.store)
        runs = self.store.runs()  # after the rebuild: a run that ended meanwhile is ended here
        # A run's start is the aggregator's clock when it began, its end the time of its last
        # sample: the later of the two says how recent the run is. Kept in polars: a time
        # stored before times were checked may lie beyond Python's datetime.
        latest = pl.max_horizontal("start", "end")
        runs = runs.with_columns(
            _latest=latest, _cutoff=latest.max() - pl.duration(seconds=ENDED_SHOWN_S)
        )
        ended = runs.filter(pl.col("status").is_in(_ENDED))
        recent = (
            ended.filter(
                (pl.col("_latest") >= pl.col("_cutoff")) & ~pl.col("run_id").is_in(agg.running())
            )
            .sort("_latest", descending=True)
            .head(ENDED_SHOWN_MAX)
        )
        return agg, [_ended_summary(r) for r in _summary_rows(recent)], ended.height

    def _current(self) -> Any:
        with self._lock:
            if time.monotonic() - self._at >= self.refresh_s:
                self._agg, self._ended, self._ended_count = self._build()
                self._at = time.monotonic()
            return self._agg

    def _state(self) -> tuple[Any, list[dict[str, Any]], int]:
        agg = self._current()
        with self._lock:
            return agg, self._ended, self._ended_count

    def status(self) -> Any:
        agg, ended, _ = self._state()
        held = list(agg.status())
        seen = {s["run_id"] for s in held}
        return held + [s for s in ended if s["run_id"] not in seen]

    def running(self) -> list[str]:
        return list(self._current().running())

    def epochs(self, run_id: str) -> Any:
        return self._current().epochs(run_id)

    def stats(self) -> dict[str, Any]:
        _, _, ended = self._state()
        return {"finished_runs": ended}


def _summary_rows(runs: Any) -> list[dict[str, Any]]:
    """The fields of a status summary, as Python values (no times: they may not fit Python)."""
    cols = ["run_id", "status", "node_type", "planned_epochs", "trained_epochs"]
    cols += ["energy_j", "duration_s"]
    return list(runs.select(cols).iter_rows(named=True))


def _ended_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A run's summary as the live aggregator gives it once the run has ended.

    Its STEP figure is final: the stored total, with a band of zero width
    (what :meth:`estimators.step.OnlineStep.finish` gives), when its planned
    epochs are known.
    """
    from estimators.step import Projection

    total, planned = row["energy_j"], row["planned_epochs"]
    if total is not None and planned is not None and planned > 0:
        projection = Projection(
            method="step",
            energy_j=total,
            lower_j=total,
            upper_j=total,
            stable=True,
            measured_j=total,
            elapsed_s=row["duration_s"] or 0.0,
            remaining_s=0.0,
            remaining_epochs=0.0,
            finished=True,
        ).as_row()
    else:
        why = "planned_epochs unknown: STEP needs it" if total is not None else "no stored energy"
        projection = {"method": "step", "energy_j": None, "stable": False, "reason": why}
    return {
        "run_id": row["run_id"],
        "status": row["status"],
        "node_type": row["node_type"],
        "planned_epochs": planned,
        "epochs_done": row["trained_epochs"],
        "measured_energy_j": total,
        "duration_s": row["duration_s"],
        "projection": projection,
    }


def run_metrics(args: argparse.Namespace) -> int:
    """Run ``wattwise metrics``."""
    from cluster.metrics import (
        ActorAggregator,
        ShardedAggregator,
        ray_sidecar_stats,
        registry_for,
        serve_metrics,
    )

    if not (math.isfinite(args.refresh) and args.refresh > 0):
        raise BadInputError(
            f"--refresh must be > 0 s; found {args.refresh} (expected a finite number of seconds)"
        )
    if not 0 <= args.port <= 65535:
        raise BadInputError(f"--port must be 0..65535; found {args.port}")
    store = open_store(args)
    kwargs: dict[str, Any] = {"store_root": store.root}
    if args.ray:
        from cluster.actors import Router, aggregator
        from cluster.commands.cluster_cmds import _connect

        _connect(args.ray)
        aggregator(create=False)  # a clear message when none runs
        # Every shard: each holds only the runs it owns (shard_of).
        source: Any = ShardedAggregator([ActorAggregator(h) for h in Router().handles()])
        kwargs["sidecar_stats"] = ray_sidecar_stats
    else:
        source = _Rebuilding(store, args.refresh)
    if args.once:
        from prometheus_client import generate_latest

        print(generate_latest(registry_for(source, **kwargs)).decode(), end="")
        return 0
    port = serve_metrics(source, host=args.host, port=args.port, **kwargs)
    print(f"serving metrics at http://{args.host}:{port}/metrics (store {store.root})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------------------ retrain --if-new-runs

#: Least usable finished runs PRE trains on (:meth:`estimators.pre.PREModel.fit` refuses fewer).
PRE_MIN_RUNS = 10


def retrain_if_new_runs(store: Any, folder: Path, out: Any) -> int:
    """``wattwise retrain --if-new-runs``: retrain only when a usable finished run is new.

    A run is new when it is among the runs a retrain would train on
    (:func:`cluster.retrain.training_rows`) but not in the ``run_ids`` of the
    newest card (accepted or not: a rejected retrain has seen its runs too).
    Without new runs it also retrains when the current model cannot be loaded
    (:func:`cluster.retrain.latest_model` refuses it, e.g. an older format
    version), and says why; the retrain replaces it.
    With fewer usable finished runs than PRE needs (:data:`PRE_MIN_RUNS`) it
    does nothing and succeeds, so the nightly job of a new deployment does not fail;
    finished runs whose GPU or job cannot be described (say, a GPU missing from
    PRE's table) are not usable, and it prints why for the first few of them.

    Args:
        store: The run store.
        folder: The model directory.
        out: Console to print to.

    Returns:
        0 (nothing new and the current model loads, fewer usable runs than PRE
        needs to train, or a retrain ran, whatever its verdict).

    """
    from cluster.metrics import pre_cards
    from cluster.retrain import latest_model, retrain

    cards = pre_cards(folder)
    newest = cards[-1] if cards else None
    usable, why = _usable_runs(store.runs())
    known = set(newest.get("run_ids") or []) if newest else set()
    added = [r for r in usable if r not in known]
    if newest is not None and not added:
        try:
            latest_model(folder)
        except BadInputError as err:
            # An unloadable model (say, of an older format) leaves placement on the default
            # node type and recommend failing: replace it rather than wait for a new run.
            out.print(
                f"no new finished runs since v{newest['version']}, but the current model "
                f"cannot be loaded ({err}); retraining",
                soft_wrap=True,
            )
        else:
            out.print(
                f"no new finished runs since v{newest['version']} "
                f"({len(usable)} usable finished runs, all in its card); nothing to do"
            )
            return 0
    if len(usable) < PRE_MIN_RUNS:
        # A young store: waiting for runs is not a failure of the nightly job.
        out.print(
            f"{len(usable)} usable finished runs; PRE needs at least {PRE_MIN_RUNS}: nothing to do"
        )
        if why:
            out.print(
                f"{len(why)} finished run(s) left out because their GPU or job cannot be "
                "described:",
                soft_wrap=True,
            )
            for run_id, reason in list(why.items())[:_SHOWN_REASONS]:
                out.print(f"  {run_id}: {reason}", soft_wrap=True, markup=False)
            if len(why) > _SHOWN_REASONS:
                out.print(f"  ... ({len(why) - _SHOWN_REASONS} more)")
        return 0
    result = retrain(store, folder)
    card = json.loads(result.path.with_name(f"pre-v{result.version}.card.json").read_text())
    before, after = card.get("previous_score_mape_pct"), card.get("score_mape_pct")
    verdict = "accepted" if result.accepted else "rejected"
    was = f" (current was v{newest['version']})" if newest is not None else ""
    mape = (
        f"energy MAPE {_pct(before)} -> {_pct(after)}"
        if before is not None
        else f"validation energy MAPE {_pct(after)}"
    )
    shown = ", ".join(added[:5]) + (f", ... ({len(added) - 5} more)" if len(added) > 5 else "")
    out.print(f"v{result.version} {verdict}{was}: {mape}; {result.decision}", soft_wrap=True)
    out.print(
        f"runs added: {len(added)}"
        + (f" ({shown})" if added else "")
        + f"; trained on {result.rows} finished runs",
        soft_wrap=True,
    )
    dropped = sorted(known - set(usable))
    if dropped:
        out.print(f"runs in v{newest['version']} no longer usable: {len(dropped)}")  # type: ignore[index]
    return 0


#: Runs left out whose reason ``retrain --if-new-runs`` prints (the others are counted).
_SHOWN_REASONS = 5


def _usable_runs(runs: Any) -> tuple[list[str], dict[str, str]]:
    """Ids of the runs a retrain would train on, and why the others with their job are not.

    :func:`cluster.retrain.training_rows_why` raises when not one finished run
    can be described (say, all on a GPU PRE's table does not know); for the
    nightly job that is a store with no usable run, not a failure, so each run
    is then described alone to name every reason.

    Args:
        runs: The store's runs table.

    Returns:
        (usable finished run ids, reason per finished run id left out because
        its GPU or features cannot be described).

    """
    import polars as pl

    from cluster.retrain import training_rows_why

    try:
        rows, _, why = training_rows_why(runs)
    except BadInputError:
        why = {}
        for run_id in runs.filter(pl.col("status") == "finished")["run_id"].to_list():
            try:
                training_rows_why(runs.filter(pl.col("run_id") == run_id))
            except BadInputError as err:
                # "runs, row 1: run 'r': unknown GPU ..." names the frame and row of the
                # one-run slice, and the run: drop both, the run id is printed beside it.
                msg = str(err).removeprefix("runs, row 1: ").removeprefix("runs, row 1, ")
                why[run_id] = msg.replace(f"run {run_id!r}: ", "", 1)
        return [], why
    return rows["run_id"].to_list(), why


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"
