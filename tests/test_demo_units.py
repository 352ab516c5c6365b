"""``wattwise demo`` without Ray: what it decides and refuses before its cluster starts.

The store here is the real SEAA 2023 dataset imported as ``wattwise demo``
imports it (the GTX 750 Ti runs come without samples), plus one run recorded
the way the live demo records it (modelled CPU power, ``gpu_spec`` in its
config). A guard stands in for the local Ray cluster: a test that reaches it
has gone past the point where the demo should have refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest

from cluster import demo, demo_replay
from cluster.aggregator import _new_projector
from cluster.cli import main
from cluster.commands import demo_cmds
from cluster.retrain import latest_model, retrain
from profiler.errors import BadInputError
from profiler.importers.seaa2023 import import_seaa2023
from profiler.store import Store
from tests.conftest import SHARED_DATA, at

#: A live demo run as the store holds it after ``_run_one``: the cpu-eco node's modelled CPU.
LIVE_ID = "cpu-eco-20240101T000000-abcd"
ECO = demo.NODE_TYPES[0]


def _live_run(store: Store) -> None:
    """One finished live-demo run: 10 epochs of 2 s, power modelled at 35 W x utilisation."""
    rng = np.random.default_rng(7)
    times = [at(0.5 * i) for i in range(41)]
    util = np.clip(rng.normal(85.0, 6.0, len(times)), 0.0, 100.0)
    store.write_samples(
        pl.DataFrame(
            {
                "run_id": LIVE_ID,
                "node": "node-eco",
                "device": "cpu",
                "model": ECO.spec()["name"],
                "timestamp": times,
                "power_w": util / 100.0 * ECO.board_power_w,
                "gpu_util_pct": util,
                "source": "modelled",
            }
        )
    )
    store.write_epochs(
        pl.DataFrame(
            {
                "run_id": LIVE_ID,
                "epoch": list(range(10)),
                "start": [at(2.0 * k) for k in range(10)],
                "end": [at(2.0 * k + 2.0) for k in range(10)],
            }
        )
    )
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": [LIVE_ID],
                "job_name": ["wattwise demo"],
                "node_type": [ECO.name],
                "gpu_model": [ECO.spec()["name"]],
                "gpu_count": [1],
                "architecture": ["mobilenet_v3_small"],
                "batch_size": [demo.BATCH_SIZE],
                "image_height": [demo.IMAGE_SIZE],
                "image_width": [demo.IMAGE_SIZE],
                "training_size": [demo.TRAIN_SIZE],
                "validation_size": [0],
                "planned_epochs": [10],
                "trained_epochs": [10],
                "status": ["finished"],
                "start": [at(0)],
                "end": [at(20)],
                "duration_s": [20.0],
                "energy_j": [595.0],
                "energy_source": ["modelled"],
                "config": [json.dumps({"demo": True, "gpu_spec": ECO.spec()})],
            }
        )
    )


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Any]:
    """The demo's store after a live demo: SEAA 2023 imported, one live run, PRE retrained."""
    if not (SHARED_DATA / "runs.parquet").is_file():
        pytest.skip(f"real traces not found at {SHARED_DATA} (../shared/data/seaa2023)")
    store = Store(tmp_path_factory.mktemp("demo") / "store")
    import_seaa2023(store, SHARED_DATA)
    _live_run(store)
    retrain(store)
    return store, latest_model(store.root / "models")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail where the demo would start its local Ray cluster."""

    def refuse(*_args: Any, **_kw: Any) -> Any:
        raise AssertionError("the demo started its Ray cluster before refusing")

    monkeypatch.setattr(demo, "local_cluster", refuse)
    monkeypatch.setattr(demo_replay, "local_cluster", refuse)
    yield


# ------------------------------------------------------------------------------------ replay


def test_replay_of_the_demo_store_picks_only_runs_with_samples(demo_store) -> None:
    store, _ = demo_store
    kind, picked, plans = demo_replay._plan(store.root, None, 4)
    assert kind == "store" and len(plans) == picked.height == 4
    no_samples = set(
        store.runs().filter(pl.col("gpu_model") == "NVIDIA GeForce GTX 750 Ti")["run_id"]
    )
    for plan in plans:
        row = plan["row"]
        assert row["run_id"] not in no_samples
        assert plan["trace"].height > 0
        assert plan["trace"].height == store.samples(row["run_id"]).height
        assert len(plan["marks"]) == (row["trained_epochs"] or 0) > 0


def test_replay_of_a_live_demo_run_uses_its_recorded_marks(demo_store) -> None:
    store, _ = demo_store
    _, _, plans = demo_replay._plan(store.root, [LIVE_ID], 4)
    assert plans[0]["marks_from"] == "recorded epoch marks" and len(plans[0]["marks"]) == 10
    assert plans[0]["trace"].height == 41


def test_replay_refuses_runs_without_samples_before_ray(
    demo_store, no_ray, tmp_path, capsys
) -> None:
    store, _ = demo_store
    with pytest.raises(
        BadInputError, match=r"samples to replay; \['local-mobilenet_v2-08'\] have none"
    ):
        demo.replay(Store(tmp_path / "out"), store.root, runs=["local-mobilenet_v2-08"])
    # The same through the CLI: exit status 2 and the run named, nothing started.
    ids = "cloud-mobilenet_v2-00,local-nasnet_mobile-15"
    code = main(
        ["demo", "--replay", str(store.root), "--runs", ids, "--store", str(tmp_path / "o")]
    )
    assert code == 2
    assert "['local-nasnet_mobile-15'] have none" in capsys.readouterr().err


def test_replay_recommends_for_a_live_demo_run_by_its_spec_and_image_size(demo_store) -> None:
    store, model = demo_store
    runs = store.runs()
    # The live run first, as `--runs <live id>,cloud-mobilenet_v2-00` picks it.
    live_first = pl.concat(
        [
            runs.filter(pl.col("run_id") == LIVE_ID),
            runs.filter(pl.col("run_id") == "cloud-mobilenet_v2-00"),
        ]
    )
    rec = demo_replay._recommend(model, live_first)
    assert rec["node_type"] in {"cpuecomodelledcpu", "rtx3090"}, rec
    assert rec["job"]["architecture"] == "mobilenet_v3_small"
    assert rec["job"]["image_size"] == demo.IMAGE_SIZE
    assert 0 < rec["predicted_energy_j"] and rec["lower_j"] <= rec["upper_j"]
    assert {r["node_type"] for r in rec["ranking"]} == {"cpuecomodelledcpu", "rtx3090"}


def test_replay_recommendation_that_pre_cannot_make_is_reported_not_raised(demo_store) -> None:
    store, model = demo_store
    live = store.runs().filter(pl.col("run_id") == LIVE_ID)
    no_spec = live.with_columns(pl.lit(json.dumps({"demo": True})).alias("config"))
    rec = demo_replay._recommend(model, no_spec)
    assert rec["node_type"] is None and rec["predicted_energy_j"] is None
    assert "unknown GPU model 'cpu-eco (modelled CPU)'" in rec["reason"]
    assert LIVE_ID in rec["reason"]


# ------------------------------------------------------------------------------------ live


def test_live_refuses_an_unknown_architecture_before_ray(no_ray, tmp_path, capsys) -> None:
    with pytest.raises(BadInputError, match=r"unknown architecture 'resnet19'.*resnet18"):
        demo.live(Store(tmp_path / "s"), epochs=2, architectures=["mobilenet_v3_small", "resnet19"])
    # The CLI refuses it before importing the dataset as well.
    code = main(["demo", "--archs", "resnet19", "--store", str(tmp_path / "s2"),
                 "--data", str(SHARED_DATA)])  # fmt: skip
    assert code == 2
    assert "unknown architecture 'resnet19'" in capsys.readouterr().err
    assert not (tmp_path / "s2" / "runs.parquet").exists()


# ------------------------------------------------------------------------------------ band


def _epochs(values: list[float], duration_s: float = 2.0) -> pl.DataFrame:
    t0 = at(0)
    return pl.DataFrame(
        {
            "epoch": list(range(len(values))),
            "start": [t0 + timedelta(seconds=duration_s * k) for k in range(len(values))],
            "energy_j": values,
            "duration_s": [duration_s] * len(values),
        }
    )


@pytest.mark.parametrize(
    ("run", "cap"),
    [
        # What run_job records for a demo CPU node: no GPU model, so no known cap.
        ({"run_id": "r", "planned_epochs": 10, "gpu_model": None, "gpu_count": 1}, None),
        # A replayed RTX 3090 run: the GPU table's board power.
        ({"run_id": "r", "planned_epochs": 10, "gpu_model": "NVIDIA GeForce RTX 3090"}, 350.0),
    ],
)
def test_demo_band_uses_the_aggregators_cap_on_every_path(run, cap) -> None:
    """The band at a fifth is the same whether caught live or recomputed after the run."""
    energies = [60.0, 62.0]  # two 2 s epochs of the cpu-eco node, J
    live = _new_projector(run)
    for e in energies:
        caught = live.update(e, 2.0)
    recomputed = demo._projection_after(_epochs(energies), 10, run)
    assert demo.band_cap_w(run) == live.power_cap_w == cap
    assert recomputed["after_epochs"] == 2 and recomputed["stable"] is False
    for key in ("energy_j", "lower_j", "upper_j"):
        assert recomputed[key] == pytest.approx(getattr(caught, key), rel=1e-12)


def test_band_footnote_names_the_cap_the_band_used() -> None:
    uncapped = demo_cmds._band_note([{"band_cap_w": None}, {"band_cap_w": None}])
    assert "twice the highest epoch energy" in uncapped and "power cap x" not in uncapped
    assert "no power cap known to the aggregator" in uncapped
    capped = demo_cmds._band_note([{"band_cap_w": 350.0}, {"band_cap_w": 220.0}])
    assert "power cap x the epoch time (cap 220 W, 350 W)" in capped and "twice" not in capped
    both = demo_cmds._band_note([{"band_cap_w": 350.0}, {"band_cap_w": None}])
    assert "cap 350 W" in both and "twice the highest epoch energy" in both


def test_summary_shows_a_recommendation_that_is_not_available() -> None:
    import io

    from rich.console import Console

    job = {
        "run_id": "replay-cloud-mobilenet_v2-00", "node_type": "rtx3090",
        "architecture": "mobilenet_v2", "status": "finished", "epochs": 98,
        "planned_epochs": 98, "measured_energy_j": 1.2e6, "recorded_energy_j": 1.2e6,
        "projected_energy_j": 1.19e6, "lower_j": 1.1e6, "upper_j": 1.4e6,
        "stable_at_fifth": True, "energy_source": "measured (replayed recording)",
        "band_cap_w": 350.0,
    }  # fmt: skip
    summary = {
        "jobs": [job],
        "model": {"version": 1, "rows": 250,
                  "retrained": {"version": 1, "rows": 250, "accepted": True, "decision": "first"}},
        "recommendation": {"node_type": None, "predicted_energy_j": None,
                           "reason": "no recommendation for 'x': unknown GPU model 'cpu-eco'"},
    }  # fmt: skip
    buf = io.StringIO()
    demo_cmds._show_summary(summary, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "no recommendation for 'x': unknown GPU model 'cpu-eco'" in text
    assert "cap 350 W" in text
