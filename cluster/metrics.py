"""Prometheus exposition of the aggregator: a custom collector over its public queries.

:class:`WattwiseCollector` reads an :class:`~cluster.aggregator.Aggregator`
(or :class:`ActorAggregator`, the same queries over the Ray actor, and
:class:`ShardedAggregator`, those of every shard together) at every scrape;
nothing is pushed, so the aggregator needs no hook. Metric families (units
in the names, ``_total`` on counters; labels ``run_id``, ``job_name``,
``node_type`` on the per-job ones)::

    wattwise_job_info{run_id,job_name,node_type,architecture,gpu_model,status}  1
    wattwise_job_energy_joules_total        measured energy so far (J)
    wattwise_job_power_watts                current power (W), 0 once ended
    wattwise_job_last_epoch_energy_joules   energy of the last finished epoch (J)
    wattwise_job_last_epoch_duration_seconds
    wattwise_job_last_epoch                 its number, as the training code counts
    wattwise_job_projected_energy_joules    STEP projection of the whole run (J)
    wattwise_job_projected_energy_lower_joules / _upper_joules   its band (J)
    wattwise_job_stable                     1 when STEP found and trusts a stable regime
    wattwise_job_stable_epoch               first epoch (0-based, order seen) of it
    wattwise_job_epochs_done / wattwise_job_epochs_planned
    wattwise_jobs_running{node_type}
    wattwise_node_type_energy_per_sample_joules{node_type,architecture}
    wattwise_node_type_finished_runs{node_type,architecture}
    wattwise_pre_model_version              newest accepted PRE version
    wattwise_pre_validation_mape_percent    newest card's validation error (%)
    wattwise_pre_last_retrain_version / _accepted / _timestamp_seconds / wattwise_pre_training_runs
    wattwise_sidecar_{samples,sent_samples,spilled_samples,lost_samples}_total{node}
    wattwise_sidecar_pending_samples{node}
    wattwise_aggregator_{samples,late_samples,flushed_samples,epochs,finished_runs}_total
    wattwise_aggregator_{recomputed_runs,rejected_samples,after_finish_samples}_total
    wattwise_aggregator_pending_samples, wattwise_aggregator_node_lag_seconds{node}

**Current power** is not one of the aggregator's queries, so it is derived
here: the increase of the run's measured energy divided by the increase of
its sample time span between two scrapes at least 1 s of samples apart
(sample clock, not scrape clock); before the second such scrape it is the
last finished epoch's mean power, else the run's mean power.

**Energy per sample** comes from the store's finished runs: their energy
divided by ``trained_epochs * training_size`` (training samples seen), per
node type and architecture. The store's runs table is re-read at most every
``store_refresh_s`` seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

#: Labels of every per-job metric.
JOB_LABELS = ("run_id", "job_name", "node_type")
#: Sidecar counters exported, as (SidecarStats field, metric stem).
SIDECAR_COUNTERS = (
    ("samples", "samples"),
    ("sent", "sent_samples"),
    ("spilled", "spilled_samples"),
    ("lost", "lost_samples"),
)
#: Least growth of a run's sample span, in s, before current power is re-derived.
MIN_POWER_SPAN_S = 1.0

SidecarStatsFn = Callable[[], Mapping[str, Mapping[str, int]]]


@dataclass(slots=True)
class _PowerAnchor:
    energy_j: float
    span_s: float
    power_w: float | None


@dataclass(slots=True)
class _EndedEpoch:
    """The last finished epoch of an ended run, with the summary it was computed for."""

    key: tuple[Any, ...]
    last: dict[str, Any] | None


class WattwiseCollector:
    """Builds wattwise's metric families from an aggregator at each scrape.

    Args:
        aggregator: An :class:`~cluster.aggregator.Aggregator` or anything with
            its ``status()``, ``running()``, ``epochs(run_id)`` and ``stats()``
            queries (:class:`ActorAggregator`).
        store_root: Store directory for finished runs and PRE cards; default
            the aggregator's store (``None`` when it has none: those families
            are left out).
        models_dir: PRE model directory; default ``<store_root>/models``.
        sidecar_stats: Returns node name -> sidecar counters
            (:class:`profiler.sidecar.SidecarStats` fields); ``None`` leaves
            the sidecar families out.
        store_refresh_s: Longest age, in s, of the cached runs table.

    """

    def __init__(
        self,
        aggregator: Any,
        *,
        store_root: str | Path | None = None,
        models_dir: str | Path | None = None,
        sidecar_stats: SidecarStatsFn | None = None,
        store_refresh_s: float = 30.0,
    ) -> None:
        self.aggregator = aggregator
        if store_root is None and getattr(aggregator, "store", None) is not None:
            store_root = aggregator.store.root
        self.store_root = None if store_root is None else Path(store_root)
        if models_dir is None and self.store_root is not None:
            models_dir = self.store_root / "models"
        self.models_dir = None if models_dir is None else Path(models_dir)
        self.sidecar_stats = sidecar_stats
        self.store_refresh_s = store_refresh_s
        self._lock = threading.Lock()
        self._power: dict[str, _PowerAnchor] = {}
        self._last_epoch: dict[str, _EndedEpoch] = {}
        self._epochs_failing: set[str] = set()
        self._runs: pl.DataFrame | None = None
        self._runs_at = 0.0

    # ------------------------------------------------------------------------ store reads
    def _store_runs(self, *, force: bool = False) -> pl.DataFrame | None:
        """The store's runs table, cached for ``store_refresh_s``."""
        if self.store_root is None:
            return None
        now = time.monotonic()
        if force or self._runs is None or now - self._runs_at >= self.store_refresh_s:
            from profiler.errors import StoreError
            from profiler.store import Store

            try:
                self._runs = Store(self.store_root).runs()
            except StoreError as err:
                log.warning("metrics: could not read runs from %s: %s", self.store_root, err)
                return self._runs
            self._runs_at = now
        return self._runs

    def _job_names(self, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        runs = self._store_runs()
        if runs is None or runs.height == 0:
            return {}
        known = set(runs["run_id"].to_list())
        if any(r not in known for r in run_ids):
            runs = self._store_runs(force=True)
            assert runs is not None
        cols = [c for c in ("run_id", "job_name", "architecture", "gpu_model") if c in runs.columns]
        return {r["run_id"]: r for r in runs.select(cols).iter_rows(named=True)}

    # ------------------------------------------------------------------------ collect
    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on what runs (avoids a scrape at registration)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (called by the registry at each scrape)."""
        with self._lock:
            families: list[Metric] = []
            # A failing query must not break the other families.
            try:
                families += self._jobs()
            except Exception as err:
                log.warning("metrics: job queries failed: %s: %s", type(err).__name__, err)
            try:
                families += self._aggregator_stats()
            except Exception as err:
                log.warning("metrics: aggregator stats failed: %s: %s", type(err).__name__, err)
            families += self._fleet()
            families += self._pre()
            families += self._sidecars()
        yield from families

    def _jobs(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=JOB_LABELS)

        info = GaugeMetricFamily(
            "wattwise_job_info",
            "Runs held by the aggregator (always 1), with their description as labels.",
            labels=(*JOB_LABELS, "architecture", "gpu_model", "status"),
        )
        energy = CounterMetricFamily(
            "wattwise_job_energy_joules",
            "Energy measured so far for the run, all its devices, in J.",
            labels=JOB_LABELS,
        )
        power = gauge("wattwise_job_power_watts", "Current power of the run in W (0 once ended).")
        last_e = gauge(
            "wattwise_job_last_epoch_energy_joules", "Energy of the last finished epoch in J."
        )
        last_d = gauge(
            "wattwise_job_last_epoch_duration_seconds", "Duration of the last finished epoch in s."
        )
        last_n = gauge(
            "wattwise_job_last_epoch", "Number of the last finished epoch (as the job counts)."
        )
        proj = gauge(
            "wattwise_job_projected_energy_joules",
            "STEP projection of the run's total energy in J.",
        )
        lower = gauge(
            "wattwise_job_projected_energy_lower_joules", "Lower end of STEP's band in J."
        )
        upper = gauge(
            "wattwise_job_projected_energy_upper_joules", "Upper end of STEP's band in J."
        )
        stable = gauge("wattwise_job_stable", "1 when STEP found and trusts a stable regime.")
        stable_ep = gauge(
            "wattwise_job_stable_epoch", "First epoch (0-based, order seen) of the stable regime."
        )
        done = gauge("wattwise_job_epochs_done", "Epochs finished so far.")
        planned = gauge("wattwise_job_epochs_planned", "Epochs the run was configured for.")
        running_by_type = GaugeMetricFamily(
            "wattwise_jobs_running", "Runs running now, per node type.", labels=("node_type",)
        )

        agg = self.aggregator
        summaries = agg.status()
        running = set(agg.running())
        extra = self._job_names([s["run_id"] for s in summaries])
        by_type: dict[str, int] = {}
        seen = set()
        for s in summaries:
            rid = str(s["run_id"])
            seen.add(rid)
            row = extra.get(rid, {})
            node_type = s.get("node_type") or ""
            labels = [rid, row.get("job_name") or "", node_type]
            is_running = rid in running
            if is_running:
                by_type[node_type] = by_type.get(node_type, 0) + 1
            info.add_metric(
                [
                    *labels,
                    row.get("architecture") or "",
                    row.get("gpu_model") or "",
                    str(s.get("status") or ""),
                ],
                1.0,
            )
            e_j = float(s.get("measured_energy_j") or 0.0)
            energy.add_metric(labels, e_j)
            last = self._last_epoch_of(rid, s, is_running)
            power.add_metric(labels, self._power_of(rid, s, last) if is_running else 0.0)
            if last is not None:
                last_e.add_metric(labels, float(last["energy_j"]))
                last_d.add_metric(labels, float(last["duration_s"]))
                last_n.add_metric(labels, float(last["epoch"]))
            p = s.get("projection") or {}
            if p.get("energy_j") is not None:
                proj.add_metric(labels, float(p["energy_j"]))
            if p.get("lower_j") is not None:
                lower.add_metric(labels, float(p["lower_j"]))
            if p.get("upper_j") is not None:
                upper.add_metric(labels, float(p["upper_j"]))
            stable.add_metric(labels, 1.0 if p.get("stable") else 0.0)
            if p.get("stable") and p.get("stable_unit") is not None:
                stable_ep.add_metric(labels, float(p["stable_unit"]))
            done.add_metric(labels, float(s.get("epochs_done") or 0))
            if s.get("planned_epochs") is not None:
                planned.add_metric(labels, float(s["planned_epochs"]))
        for node_type, n in sorted(by_type.items()):
            running_by_type.add_metric([node_type], float(n))
        # Forget runs the aggregator no longer holds (bounded memory).
        for rid in [r for r in self._power if r not in seen]:
            del self._power[rid]
        for rid in [r for r in self._last_epoch if r not in seen]:
            del self._last_epoch[rid]
        self._epochs_failing &= seen
        return [
            info,
            energy,
            power,
            last_e,
            last_d,
            last_n,
            proj,
            lower,
            upper,
            stable,
            stable_ep,
            done,
            planned,
            running_by_type,
        ]

    def _last_epoch_of(
        self, run_id: str, summary: Mapping[str, Any], running: bool
    ) -> dict[str, Any] | None:
        """The run's last finished epoch, or ``None`` (none yet, or ``epochs()`` failed).

        A running run's is read at every scrape. An ended run's is read once
        after it ended (its final epoch and the store's figures are only there
        then) and kept while its summary (status, epochs done, energy) stays
        the same. When ``epochs()`` raises, only this run's last-epoch series
        are left out; the failure is logged once until the run's query works
        again.
        """
        key = (summary.get("status"), summary.get("epochs_done"), summary.get("measured_energy_j"))
        cached = self._last_epoch.get(run_id)
        if not running and cached is not None and cached.key == key:
            return cached.last
        try:
            ep = self.aggregator.epochs(run_id)
            last = None if ep.height == 0 else ep.sort("end").row(-1, named=True)
        except Exception as err:
            if run_id not in self._epochs_failing:
                self._epochs_failing.add(run_id)
                log.warning(
                    "metrics: run %s: epochs() failed, its last-epoch series are left out "
                    "until it works: %s: %s",
                    run_id,
                    type(err).__name__,
                    err,
                )
            self._last_epoch.pop(run_id, None)
            return None
        self._epochs_failing.discard(run_id)
        if last is not None and last.get("energy_j") is None:
            last = None
        if running:
            self._last_epoch.pop(run_id, None)
        else:
            self._last_epoch[run_id] = _EndedEpoch(key, last)
        return last

    def _power_of(self, run_id: str, s: Mapping[str, Any], last: dict[str, Any] | None) -> float:
        """Current power in W from the growth of measured energy over sample time."""
        e_j = float(s.get("measured_energy_j") or 0.0)
        span = s.get("duration_s")
        if span is None:
            return 0.0
        span = float(span)
        anchor = self._power.get(run_id)
        if anchor is None:
            if last is not None and last.get("mean_power_w") is not None:
                fallback: float | None = float(last["mean_power_w"])
            else:
                fallback = e_j / span if span > 0 else None
            self._power[run_id] = _PowerAnchor(e_j, span, None)
            return fallback or 0.0
        if span - anchor.span_s >= MIN_POWER_SPAN_S:
            anchor.power_w = max((e_j - anchor.energy_j) / (span - anchor.span_s), 0.0)
            anchor.energy_j, anchor.span_s = e_j, span
        if anchor.power_w is not None:
            return anchor.power_w
        if last is not None and last.get("mean_power_w") is not None:
            return float(last["mean_power_w"])
        return e_j / span if span > 0 else 0.0

    def _aggregator_stats(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.aggregator.stats()
        out: list[Metric] = []
        for key, stem, doc in (
            ("samples", "samples", "Samples received in batches."),
            (
                "late",
                "late_samples",
                "Samples that came after their epoch had closed (resent copies included).",
            ),
            (
                "recomputed_runs",
                "recomputed_runs",
                "Runs rebuilt from the store because a node's first samples (or samples "
                "older than them) came after an epoch had closed.",
            ),
            ("flushed", "flushed_samples", "Samples new to the store when written."),
            ("rejected", "rejected_samples", "Samples dropped because they conflict."),
            (
                "after_finish",
                "after_finish_samples",
                "Samples of runs that had ended (stored; the run's stored energy is updated).",
            ),
            ("epochs", "epochs", "Epoch marks taken."),
            ("finished_runs", "finished_runs", "Runs ended."),
        ):
            if key in st:
                c = CounterMetricFamily(f"wattwise_aggregator_{stem}", doc)
                c.add_metric([], float(st[key]))
                out.append(c)
        pending = GaugeMetricFamily(
            "wattwise_aggregator_pending_samples", "Samples waiting to be written to the store."
        )
        if "pending_rows" in st:  # only a live aggregator knows (not a store rebuild)
            pending.add_metric([], float(st["pending_rows"]))
        lag = GaugeMetricFamily(
            "wattwise_aggregator_node_lag_seconds",
            "Delay between a node's newest sample and its arrival, in s (negative: skewed clock).",
            labels=("node",),
        )
        for node, v in sorted((st.get("node_lag_s") or {}).items()):
            lag.add_metric([str(node)], float(v))
        return [*out, pending, lag]

    def _fleet(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        runs = self._store_runs()
        if runs is None or runs.height == 0:
            return []
        try:
            table = energy_per_sample(runs)
        except Exception as err:
            log.warning("metrics: energy per sample failed: %s", err)
            return []
        per = GaugeMetricFamily(
            "wattwise_node_type_energy_per_sample_joules",
            "Measured energy per training sample seen (finished runs), in J.",
            labels=("node_type", "architecture"),
        )
        count = GaugeMetricFamily(
            "wattwise_node_type_finished_runs",
            "Finished runs behind the energy per sample.",
            labels=("node_type", "architecture"),
        )
        for r in table.iter_rows(named=True):
            per.add_metric([r["node_type"], r["architecture"]], float(r["energy_per_sample_j"]))
            count.add_metric([r["node_type"], r["architecture"]], float(r["runs"]))
        return [per, count]

    def _pre(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        if self.models_dir is None:
            return []
        cards = pre_cards(self.models_dir)
        if not cards:
            return []
        newest = cards[-1]
        accepted = [c for c in cards if c.get("accepted", True)]
        out: list[Metric] = []

        def add(name: str, doc: str, value: float | None) -> None:
            if value is None:
                return
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            out.append(g)

        add(
            "wattwise_pre_model_version",
            "Version of the PRE model in use (newest accepted).",
            accepted[-1].get("version") if accepted else None,
        )
        add(
            "wattwise_pre_validation_mape_percent",
            "Validation error (energy MAPE, %) of the newest retrain.",
            newest.get("score_mape_pct"),
        )
        add(
            "wattwise_pre_last_retrain_version",
            "Version written by the newest retrain.",
            newest.get("version"),
        )
        add(
            "wattwise_pre_last_retrain_accepted",
            "1 when the newest retrain was accepted.",
            1.0 if newest.get("accepted", True) else 0.0,
        )
        add(
            "wattwise_pre_last_retrain_timestamp_seconds",
            "When the newest card was written (Unix time, s).",
            newest.get("_mtime"),
        )
        add(
            "wattwise_pre_training_runs",
            "Runs the newest retrain was trained on.",
            len(newest.get("run_ids") or []),
        )
        return out

    def _sidecars(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self.sidecar_stats is None:
            return []
        try:
            stats = dict(self.sidecar_stats())
        except Exception as err:
            log.warning("metrics: sidecar stats failed: %s: %s", type(err).__name__, err)
            return []
        families = {
            key: CounterMetricFamily(
                f"wattwise_sidecar_{stem}", f"Sidecar rows: {key}.", labels=("node",)
            )
            for key, stem in SIDECAR_COUNTERS
        }
        pending = GaugeMetricFamily(
            "wattwise_sidecar_pending_samples", "Rows waiting to be delivered.", labels=("node",)
        )
        for node, st in sorted(stats.items()):
            for key, _ in SIDECAR_COUNTERS:
                if key in st:
                    families[key].add_metric([str(node)], float(st[key]))
            if "pending" in st:
                pending.add_metric([str(node)], float(st["pending"]))
        return [*families.values(), pending]


# ------------------------------------------------------------------------------ helpers


def energy_per_sample(runs: pl.DataFrame) -> pl.DataFrame:
    """Energy per training sample of finished runs, per node type and architecture.

    Args:
        runs: The store's ``runs`` table.

    Returns:
        Columns ``node_type``, ``architecture``, ``energy_per_sample_j`` (J:
        total energy over ``trained_epochs * training_size``) and ``runs``.

    """
    import polars as pl

    need = ("node_type", "architecture", "energy_j", "trained_epochs", "training_size", "status")
    if any(c not in runs.columns for c in need):
        return pl.DataFrame(
            schema={
                "node_type": pl.String,
                "architecture": pl.String,
                "energy_per_sample_j": pl.Float64,
                "runs": pl.UInt32,
            }
        )
    seen = pl.col("trained_epochs") * pl.col("training_size")
    return (
        runs.filter(
            (pl.col("status") == "finished")
            & pl.col("node_type").is_not_null()
            & pl.col("architecture").is_not_null()
            & (pl.col("energy_j") > 0)
            & (seen > 0)
        )
        .group_by("node_type", "architecture")
        .agg(
            (pl.col("energy_j").sum() / seen.sum()).alias("energy_per_sample_j"),
            pl.len().alias("runs"),
        )
        .sort("node_type", "architecture")
    )


def pre_cards(folder: Path) -> list[dict[str, Any]]:
    """PRE cards in ``folder`` by ascending version (unreadable ones skipped), with ``_mtime``."""
    from cluster.retrain import versions
    from estimators.pre import card_path

    out = []
    for v in versions(folder):
        path = card_path(folder / f"pre-v{v}.json")
        try:
            card = json.loads(path.read_text())
            card["_mtime"] = path.stat().st_mtime
        except (OSError, json.JSONDecodeError) as err:
            log.warning("metrics: skipping PRE card %s: %s", path, err)
            continue
        card.setdefault("version", v)
        out.append(card)
    return out


def sidecar_stats_of(sidecars: Mapping[str, Any]) -> SidecarStatsFn:
    """A ``sidecar_stats`` function over in-process :class:`profiler.sidecar.Sidecar` objects.

    Args:
        sidecars: Node name -> sidecar.

    """
    from dataclasses import asdict

    def read() -> dict[str, dict[str, int]]:
        out = {}
        for node, sc in sidecars.items():
            d = asdict(sc.stats)
            d["pending"] = sc.pending_rows
            out[node] = d
        return out

    return read


def ray_sidecar_stats(timeout_s: float = 5.0) -> dict[str, dict[str, int]]:
    """Counters of every wattwise sidecar actor in the connected Ray cluster, by node name.

    A sidecar that does not answer within ``timeout_s`` is left out (and logged).
    """
    import ray

    from cluster.actors import NAMESPACE, SIDECAR_PREFIX

    out: dict[str, dict[str, int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name, ns = entry["name"], entry["namespace"]
        if ns != NAMESPACE or not name.startswith(SIDECAR_PREFIX):
            continue
        try:
            handle = ray.get_actor(name, namespace=ns)
            answers: list[Any] = ray.get(
                [handle.ping.remote(), handle.stats.remote()], timeout=timeout_s
            )
            node, stats = answers
        except Exception as err:
            log.warning("metrics: sidecar %s did not answer: %s", name, err)
            continue
        out[str(node)] = stats
    return out


class ActorAggregator:
    """The aggregator's queries over its Ray actor (for ``wattwise metrics --ray``).

    Args:
        handle: The actor handle (:func:`cluster.actors.aggregator`).
        timeout_s: Longest wait for an answer, in s.

    """

    def __init__(self, handle: Any, timeout_s: float = 10.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.store = None

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref, timeout=self.timeout_s)

    def status(self) -> list[dict[str, Any]]:
        """Every run held (see :meth:`Aggregator.status`)."""
        out: list[dict[str, Any]] = self._get(self.handle.status.remote())
        return out

    def running(self) -> list[str]:
        """Ids of the running runs."""
        return sorted(s["run_id"] for s in self.status() if s.get("status") == "running")

    def epochs(self, run_id: str) -> pl.DataFrame:
        """Per-epoch energy (see :meth:`Aggregator.epochs`)."""
        return self._get(self.handle.epochs.remote(run_id))  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        """Counters (see :meth:`Aggregator.stats`)."""
        out: dict[str, Any] = self._get(self.handle.stats.remote())
        return out


class ShardedAggregator:
    """Every aggregator shard's queries answered as one aggregator's (``wattwise metrics --ray``).

    Runs are split among shards by :func:`cluster.actors.shard_of` and each shard
    holds only its own, so reading shard 0 alone loses the others' jobs. As
    ``wattwise aggregator status`` and the HTTP API do, this lists every shard's
    runs, asks a run's epochs of the shard that owns it and sums the counters.

    Args:
        shards: Each shard's queries (``status()``, ``running()``, ``epochs(run_id)``,
            ``stats()``), shard 0 first: an :class:`ActorAggregator` per shard actor,
            or in-process aggregators.

    Raises:
        BadInputError: No shard given.

    """

    #: Integer stats that number a shard rather than count something: shard 0's are kept.
    NOT_SUMMED = frozenset({"shard", "shards"})

    def __init__(self, shards: Sequence[Any]) -> None:
        if not shards:
            from profiler.errors import BadInputError

            raise BadInputError("ShardedAggregator needs at least one shard; found none")
        self.shards = list(shards)
        self.store = getattr(self.shards[0], "store", None)

    def status(self) -> list[dict[str, Any]]:
        """Every run held by any shard."""
        out: list[dict[str, Any]] = []
        for shard in self.shards:
            out.extend(shard.status())
        return out

    def running(self) -> list[str]:
        """Ids of the running runs of every shard."""
        return sorted(r for shard in self.shards for r in shard.running())

    def epochs(self, run_id: str) -> pl.DataFrame:
        """Per-epoch energy of the run, from the shard that owns it."""
        from cluster.actors import shard_of

        return self.shards[shard_of(run_id, len(self.shards))].epochs(run_id)  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        """Shard 0's stats with every integer counter summed over the shards.

        ``node_lag_s`` holds, per node, the largest lag any shard saw (a node
        sends to each shard that owns one of its runs).
        """
        each = [shard.stats() for shard in self.shards]
        out = dict(each[0])
        keys = {k for st in each for k in st}
        for key in keys - self.NOT_SUMMED:
            values = [st[key] for st in each if key in st]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                out[key] = sum(values)
        lag: dict[str, float] = {}
        for st in each:
            for node, v in (st.get("node_lag_s") or {}).items():
                lag[node] = max(float(v), lag.get(node, float("-inf")))
        out["node_lag_s"] = lag
        return out


# ------------------------------------------------------------------------------ serving


def registry_for(aggregator: Any, **kwargs: Any) -> CollectorRegistry:
    """A fresh registry holding a :class:`WattwiseCollector` (kwargs as for it)."""
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(WattwiseCollector(aggregator, **kwargs))
    return registry


_SERVERS: dict[int, tuple[Any, threading.Thread]] = {}


def serve_metrics(aggregator: Any, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> int:
    """Serve the aggregator's metrics at ``http://host:port/metrics`` in a background thread.

    Args:
        aggregator: What :class:`WattwiseCollector` reads.
        host: Address to bind (loopback by default; the metrics are read-only).
        port: TCP port; 0 picks a free one.
        **kwargs: Passed to :class:`WattwiseCollector` (``sidecar_stats``, ...).

    Returns:
        The bound port (stop it with :func:`stop_metrics`).

    """
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry_for(aggregator, **kwargs))
    bound = int(server.server_address[1])
    _SERVERS[bound] = (server, thread)
    return bound


def stop_metrics(port: int) -> None:
    """Stop the metrics server started by :func:`serve_metrics` on ``port`` (no-op if none)."""
    entry = _SERVERS.pop(port, None)
    if entry is None:
        return
    server, thread = entry
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
