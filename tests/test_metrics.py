"""The Prometheus collector over the aggregator: values worked out by hand, served over HTTP."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.aggregator import Aggregator
from cluster.cli import main
from cluster.metrics import (
    energy_per_sample,
    registry_for,
    serve_metrics,
    sidecar_stats_of,
    stop_metrics,
)
from conftest import at
from profiler.schema import UTC_US
from profiler.sidecar import Sidecar
from profiler.sources.replay import ReplaySource
from profiler.store import Store


def samples(run_id: str | None, times: list[float], power: list[float], node: str = "n1"):
    n = len(times)
    return pl.DataFrame(
        {
            "run_id": [run_id] * n,
            "node": [node] * n,
            "device": ["0"] * n,
            "timestamp": [at(t) for t in times],
            "power_w": power,
            "energy_j": [None] * n,
            "source": ["replay"] * n,
        },
        schema_overrides={"timestamp": UTC_US, "energy_j": pl.Float64, "run_id": pl.String},
    )


def marks(run_id: str, spans: list[tuple[int, float, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": [run_id] * len(spans),
            "epoch": [e for e, _, _ in spans],
            "start": [at(s) for _, s, _ in spans],
            "end": [at(t) for _, _, t in spans],
        },
        schema_overrides={"start": UTC_US, "end": UTC_US},
    )


def scrape(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def job(run_id: str = "r1", name: str = "resnet-a", node_type: str = "a100"):
    return (("job_name", name), ("node_type", node_type), ("run_id", run_id))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def agg(store: Store) -> Aggregator:
    a = Aggregator(store)
    a.start_run(
        {
            "run_id": "r1",
            "job_name": "resnet-a",
            "node_type": "a100",
            "architecture": "resnet50",
            "planned_epochs": 5,
        }
    )
    # Epoch 0: 0..4 s at 100 W (400 J); epoch 1: 4..8 s at 100 W then 200 W.
    a.ingest_epochs(marks("r1", [(0, 0.0, 4.0), (1, 4.0, 8.0)]))
    a.ingest_samples(samples("r1", [float(t) for t in range(11)], [100.0] * 6 + [200.0] * 5))
    return a


def test_job_families_match_hand_computed_energies(agg: Aggregator) -> None:
    m = scrape(registry_for(agg))
    # 0..5 s at 100 W = 500 J, 5..6 s ramp 100 -> 200 W = 150 J, 6..10 s at 200 W = 800 J.
    assert m[("wattwise_job_energy_joules_total", job())] == pytest.approx(1450.0)
    # Epoch 1 = 4..5 s (100 J) + ramp (150 J) + 6..8 s (400 J) = 650 J over 4 s.
    assert m[("wattwise_job_last_epoch_energy_joules", job())] == pytest.approx(650.0)
    assert m[("wattwise_job_last_epoch_duration_seconds", job())] == pytest.approx(4.0)
    assert m[("wattwise_job_last_epoch", job())] == 1.0
    assert m[("wattwise_job_epochs_done", job())] == 2.0
    assert m[("wattwise_job_epochs_planned", job())] == 5.0
    assert m[("wattwise_job_stable", job())] == 0.0  # two epochs: STEP cannot trust a regime
    # First scrape: power is the last epoch's mean power, 650 J / 4 s.
    assert m[("wattwise_job_power_watts", job())] == pytest.approx(162.5)
    assert m[("wattwise_jobs_running", (("node_type", "a100"),))] == 1.0
    info = (
        ("architecture", "resnet50"),
        ("gpu_model", ""),
        ("job_name", "resnet-a"),
        ("node_type", "a100"),
        ("run_id", "r1"),
        ("status", "running"),
    )
    assert m[("wattwise_job_info", info)] == 1.0
    assert m[("wattwise_aggregator_samples_total", ())] == 11.0


def test_current_power_follows_the_newest_samples(agg: Aggregator) -> None:
    registry = registry_for(agg)
    scrape(registry)
    # 10..20 s at 300 W: after the 200 -> 300 W ramp second (250 J) that is 9 s x 300 W.
    agg.ingest_samples(samples("r1", [float(t) for t in range(11, 21)], [300.0] * 10))
    m = scrape(registry)
    assert m[("wattwise_job_power_watts", job())] == pytest.approx((250 + 9 * 300) / 10)
    agg.ingest_samples(samples("r1", [float(t) for t in range(21, 26)], [300.0] * 5))
    assert scrape(registry)[("wattwise_job_power_watts", job())] == pytest.approx(300.0)


def test_a_finished_run_keeps_its_energy_and_draws_no_power(agg: Aggregator) -> None:
    agg.finish_run("r1")
    m = scrape(registry_for(agg))
    assert m[("wattwise_job_energy_joules_total", job())] == pytest.approx(1450.0)
    assert m[("wattwise_job_power_watts", job())] == 0.0
    assert ("wattwise_jobs_running", (("node_type", "a100"),)) not in m


def test_sharded_aggregator_exports_the_runs_and_counters_of_every_shard(store: Store) -> None:
    """Bug: ``wattwise metrics --ray --shards 2`` read shard 0's actor only, so the jobs held by
    the other shard were missing from Prometheus (runs {0: ['run-4'], 1: ['run-0']}: only
    run-4 exported). Two shards, each holding the runs shard_of gives it, must export what
    one aggregator holding every run exports, counters summed."""
    from cluster.actors import shard_of, split_by_shard
    from cluster.metrics import ShardedAggregator

    ids = [f"run-{i}" for i in range(20)]
    r0 = next(r for r in ids if shard_of(r, 2) == 0)
    r1 = next(r for r in ids if shard_of(r, 2) == 1)
    shards = [Aggregator(store), Aggregator(store)]
    whole = Aggregator(store)
    batch = pl.concat(
        [
            samples(r0, [float(t) for t in range(11)], [100.0] * 11),
            samples(r1, [float(t) for t in range(9)], [50.0] * 4 + [250.0] * 5),
        ]
    )
    epochs = pl.concat([marks(r0, [(0, 0.0, 5.0)]), marks(r1, [(0, 0.0, 4.0), (1, 4.0, 8.0)])])
    for rid, node_type in ((r0, "a100"), (r1, "l4")):
        run = {"run_id": rid, "job_name": f"job-{rid}", "node_type": node_type}
        shards[shard_of(rid, 2)].start_run({**run, "planned_epochs": 4})
        whole.start_run({**run, "planned_epochs": 4})
    for k, part in split_by_shard(epochs, 2).items():
        shards[k].ingest_epochs(part)
    for k, part in split_by_shard(batch, 2).items():
        shards[k].ingest_samples(part)
    whole.ingest_epochs(epochs)
    whole.ingest_samples(batch)
    assert [s.running() for s in shards] == [[r0], [r1]]

    got = scrape(registry_for(ShardedAggregator(shards)))
    want = scrape(registry_for(whole))
    lag = "wattwise_aggregator_node_lag_seconds"
    jobs = {k: v for k, v in want.items() if k[0].startswith(("wattwise_job", "wattwise_jobs"))}
    assert {k: got[k] for k in jobs} == pytest.approx(jobs)
    assert got[("wattwise_job_energy_joules_total", job(r1, f"job-{r1}", "l4"))] == pytest.approx(
        3 * 50.0 + 150.0 + 4 * 250.0  # 0..3 s at 50 W, the 3..4 s ramp, 4..8 s at 250 W
    )
    assert got[("wattwise_job_last_epoch", job(r1, f"job-{r1}", "l4"))] == 1.0  # from shard 1
    for name in ("samples", "epochs"):
        key = (f"wattwise_aggregator_{name}_total", ())
        assert got[key] == want[key]
    assert got[("wattwise_aggregator_samples_total", ())] == 20.0
    # A node sends to every shard owning one of its runs: its largest lag is exported.
    per_shard = [s.stats()["node_lag_s"]["n1"] for s in shards]
    assert got[(lag, (("node", "n1"),))] == pytest.approx(max(per_shard), abs=1.0)


def test_energy_per_sample_by_node_type_and_architecture() -> None:
    runs = pl.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "node_type": ["a100", "a100", "l4", "l4"],
            "architecture": ["vgg16"] * 4,
            "status": ["finished", "finished", "finished", "running"],
            "energy_j": [1000.0, 3000.0, 500.0, 9.0],
            "trained_epochs": [2, 2, 1, 1],
            "training_size": [100, 100, 100, 100],
        }
    )
    t = energy_per_sample(runs)
    # a100: 4000 J over 400 samples; l4: 500 J over 100 (the running run is left out).
    assert t.rows() == [("a100", "vgg16", 10.0, 2), ("l4", "vgg16", 5.0, 1)]


def test_pre_card_and_fleet_families(agg: Aggregator, store: Store) -> None:
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": ["old-1"],
                "node_type": ["a100"],
                "architecture": ["resnet50"],
                "status": ["finished"],
                "energy_j": [6000.0],
                "trained_epochs": [3],
                "training_size": [1000],
            }
        )
    )
    models = store.root / "models"
    models.mkdir()
    for v, accepted, score in ((1, True, 12.5), (2, False, 14.0)):
        (models / f"pre-v{v}.json").write_text("{}")
        card = {"version": v, "accepted": accepted, "score_mape_pct": score, "run_ids": ["old-1"]}
        (models / f"pre-v{v}.card.json").write_text(json.dumps(card))
    m = scrape(registry_for(agg))
    assert m[("wattwise_pre_model_version", ())] == 1.0  # v2 was rejected
    assert m[("wattwise_pre_validation_mape_percent", ())] == 14.0  # the newest card's
    assert m[("wattwise_pre_last_retrain_accepted", ())] == 0.0
    assert m[("wattwise_pre_training_runs", ())] == 1.0
    key = (("architecture", "resnet50"), ("node_type", "a100"))
    assert m[("wattwise_node_type_energy_per_sample_joules", key)] == pytest.approx(2.0)


def test_sidecar_counters_are_the_sidecars_own(agg: Aggregator, tmp_path: Path) -> None:
    trace = Path(__file__).parent / "data" / "nvidia-smi-native.csv"
    sc = Sidecar(
        [ReplaySource.from_file(str(trace), speed=100.0)],
        node="n2",
        interval_s=0.1,
        receiver=agg.ingest_samples,
        journal=tmp_path / "journal",
    )
    for _ in range(3):
        sc.tick()
    sc.cut()
    sc.ship()
    m = scrape(registry_for(agg, sidecar_stats=sidecar_stats_of({"n2": sc})))
    assert sc.stats.sent == sc.stats.samples > 0
    assert m[("wattwise_sidecar_sent_samples_total", (("node", "n2"),))] == sc.stats.sent
    assert m[("wattwise_sidecar_samples_total", (("node", "n2"),))] == sc.stats.samples
    assert m[("wattwise_sidecar_spilled_samples_total", (("node", "n2"),))] == 0.0
    assert m[("wattwise_sidecar_lost_samples_total", (("node", "n2"),))] == 0.0


def test_serve_metrics_answers_on_loopback_and_stops(agg: Aggregator) -> None:
    port = serve_metrics(agg)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'wattwise_job_energy_joules_total{job_name="resnet-a"' in text
        assert "# TYPE wattwise_job_energy_joules_total counter" in text
    finally:
        stop_metrics(port)
    time.sleep(0.1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_cli_rebuilds_running_runs_from_the_store(
    agg: Aggregator, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    agg.flush()
    assert main(["metrics", "--store", str(store.root), "--once"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("wattwise_job_energy_joules_total{"))
    assert 'run_id="r1"' in line and float(line.split()[-1]) == pytest.approx(1450.0)


def test_metrics_cli_refuses_a_bad_refresh(store: Store, capsys: pytest.CaptureFixture[str]):
    assert main(["metrics", "--store", str(store.root), "--refresh", "0", "--once"]) == 2
    assert "--refresh must be > 0 s; found 0.0" in capsys.readouterr().err


class EpochsFailFor(Aggregator):
    """A real aggregator whose ``epochs()`` fails for some runs, as it does for a run whose
    stored marks overlap (a relayed mark resent with other times after the run ended)."""

    def __init__(self, store: Store, failing: set[str]) -> None:
        super().__init__(store)
        self.failing = failing
        self.epoch_calls: list[str] = []

    def epochs(self, run_id: str) -> pl.DataFrame:
        self.epoch_calls.append(run_id)
        if run_id in self.failing:
            from profiler.errors import BadInputError

            raise BadInputError(
                f"row 2, run {run_id!r}: epoch 1 starts before the previous epoch ends; "
                "expected epochs that do not overlap"
            )
        return super().epochs(run_id)


def test_one_run_whose_epochs_fail_leaves_out_only_its_last_epoch(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug: one run whose ``epochs()`` raised removed every ``wattwise_job_*`` and
    ``wattwise_aggregator_*`` series, on every scrape."""
    a = EpochsFailFor(store, {"bad"})
    for rid in ("good", "bad"):
        a.start_run({"run_id": rid, "job_name": rid, "node_type": "a100", "planned_epochs": 4})
        a.ingest_epochs(marks(rid, [(0, 0.0, 4.0)]))
        a.ingest_samples(samples(rid, [float(t) for t in range(6)], [100.0] * 6))
    registry = registry_for(a)
    with caplog.at_level("WARNING", logger="cluster.metrics"):
        m = scrape(registry)
        scrape(registry)
    good, bad = job("good", "good"), job("bad", "bad")
    assert m[("wattwise_job_energy_joules_total", good)] == pytest.approx(500.0)
    assert m[("wattwise_job_energy_joules_total", bad)] == pytest.approx(500.0)
    assert m[("wattwise_job_last_epoch_energy_joules", good)] == pytest.approx(400.0)
    assert ("wattwise_job_last_epoch_energy_joules", bad) not in m
    assert ("wattwise_job_last_epoch", bad) not in m
    assert m[("wattwise_job_epochs_done", bad)] == 1.0
    assert m[("wattwise_aggregator_samples_total", ())] == 12.0
    failures = [r for r in caplog.records if "'bad'" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]  # once, not per scrape


def test_an_ended_run_shows_its_final_epoch_from_the_store(store: Store) -> None:
    """Bug: the last epoch seen while the run ran was kept forever, so the epoch finished by
    ``finish_run`` (and the store's recomputed figures) never appeared."""
    a = EpochsFailFor(store, set())
    a.start_run({"run_id": "r1", "job_name": "resnet-a", "node_type": "a100", "planned_epochs": 3})
    a.ingest_epochs(marks("r1", [(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 20.0, 30.0)]))
    # 0..29.5 s: 100 W, 200 W, 300 W per 10 s; no samples past the last epoch's end.
    times = [t / 2 for t in range(60)]
    a.ingest_samples(samples("r1", times, [100.0] * 20 + [200.0] * 20 + [300.0] * 20))
    registry = registry_for(a)
    running = scrape(registry)
    assert running[("wattwise_job_last_epoch", job())] == 1.0  # epoch 2 waits for later samples
    a.finish_run("r1")
    ended = scrape(registry)
    stored = a.epochs("r1").sort("end").row(-1, named=True)
    assert (stored["epoch"], stored["energy_j"]) == (2, pytest.approx(3000.0))  # 10 s x 300 W
    assert ended[("wattwise_job_last_epoch", job())] == 2.0
    assert ended[("wattwise_job_last_epoch_energy_joules", job())] == pytest.approx(
        stored["energy_j"]
    )
    assert ended[("wattwise_job_last_epoch_duration_seconds", job())] == pytest.approx(
        stored["duration_s"]
    )
    # Read once after the run ended, then kept: the store is not re-read at every scrape.
    calls = len(a.epoch_calls)
    assert scrape(registry)[("wattwise_job_last_epoch", job())] == 2.0
    assert len(a.epoch_calls) == calls
