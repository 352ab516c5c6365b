from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest

from conftest import SHARED_DATA
from estimators.features import JobDescription, runs_features
from estimators.pre import PREModel
from estimators.recommend import (
    NodeType,
    load_inventory,
    placement,
    recommend,
)
from profiler.errors import BadInputError
from tests.test_pre import SMALL, synthetic

JOB = JobDescription("arch0", 32, 20000, 5000, gflops_forward=5.0, layers=50, planned_epochs=10)


@pytest.fixture(scope="module")
def model() -> PREModel:
    return PREModel(**SMALL).fit(synthetic(4, 5, sigma=0.02, seed=5))


def test_ranks_by_energy_cost_and_deadline(model: PREModel) -> None:
    inv = [
        NodeType("slow-cheap", "Tesla T4", price_per_hour=0.1, default=True),
        NodeType("big", "NVIDIA A100-SXM4-40GB", price_per_hour=10.0),
        NodeType("gamer", "NVIDIA GeForce RTX 3090", price_per_hour=1.0),
    ]
    rec = recommend(model, JOB, inv)
    t = rec.table
    # ranked by predicted energy, ascending
    assert t["total_energy_kwh"].to_list() == sorted(t["total_energy_kwh"].to_list())
    e = dict(zip(t["node_type"], t["total_energy_kwh"], strict=True))
    assert rec.chosen == t["node_type"][0]
    assert rec.savings_vs_worst_pct == pytest.approx(
        100 * (max(e.values()) - e[rec.chosen]) / max(e.values())
    )
    assert rec.savings_vs_default_pct == pytest.approx(
        100 * (e["slow-cheap"] - e[rec.chosen]) / e["slow-cheap"]
    )
    assert rec.placement["ray_resources"] == {f"node_type:{rec.chosen}": 0.001}
    # energy per epoch J * 10 epochs / 3.6e6 = kWh
    assert t["total_energy_kwh"][0] == pytest.approx(t["epoch_energy_j"][0] * 10 / 3.6e6)

    by_cost = recommend(model, JOB, inv, objective="cost")
    costs = by_cost.table["cost"].to_list()
    assert costs == sorted(costs)
    # a deadline shorter than the slow node's training time pushes it last
    times = dict(zip(t["node_type"], t["total_time_h"], strict=True))
    slowest = max(times, key=times.__getitem__)
    dl = recommend(model, JOB, inv, deadline_s=(sorted(times.values())[-2] * 3600) * 1.01)
    assert dl.table["node_type"][-1] == slowest
    assert dl.table.filter(pl.col("node_type") == slowest)["meets_deadline"][0] is False


def test_recommendation_says_whether_the_architecture_was_seen(model: PREModel) -> None:
    inv = [NodeType("gamer", "NVIDIA GeForce RTX 3090"), NodeType("t4", "Tesla T4")]
    data = synthetic(4, 5, sigma=0.02, seed=5)
    row = data.filter(pl.col("architecture") == "arch0").row(0, named=True)
    seen_job = JobDescription(
        "arch0", 32, 20000, 5000, gflops_forward=row["gflops_forward"], layers=int(row["layers"])
    )
    other = JobDescription(
        "arch0",
        32,
        20000,
        5000,
        gflops_forward=row["gflops_forward"] * 3,
        layers=int(row["layers"]),
    )
    a = recommend(model, seen_job, inv).table
    b = recommend(model, other, inv).table
    assert a["seen_architecture"].all() and not b["seen_architecture"].any()
    assert ((b["upper_j"] / b["lower_j"]) > (a["upper_j"] / a["lower_j"]).max()).all()


def test_placement_hints() -> None:
    p = placement(NodeType("gpu-a100", "NVIDIA A100-SXM4-80GB", gpu_count=2))
    assert p["accelerator_type"] == "A100"
    assert p["label_selector"] == {"ray.io/accelerator-type": "A100"}
    assert p["k8s_node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert p["num_gpus"] == 2


def test_bad_inventory_and_objective(model: PREModel, tmp_path) -> None:
    with pytest.raises(BadInputError, match="unknown GPU model 'RTX 9999'"):
        recommend(model, JOB, [NodeType("x", "RTX 9999")])
    with pytest.raises(BadInputError, match="needs price_per_hour.*'x'"):
        recommend(model, JOB, [NodeType("x", "RTX 3090")], objective="cost")
    f = tmp_path / "inv.json"
    f.write_text(json.dumps({"node_types": [{"name": "a", "gpu": "RTX 3090"}]}))
    with pytest.raises(BadInputError, match="'name' and 'gpu_model'"):
        load_inventory(f)
    f.write_text(json.dumps([{"name": "a", "gpu_model": "RTX 3090", "colour": "red"}]))
    with pytest.raises(BadInputError, match=r"unknown key\(s\) \['colour'\]"):
        load_inventory(f)
    user_gpu = {
        "name": "MyCard",
        "gpu_board_power_w": 100,
        "gpu_fp32_tflops": 10,
        "gpu_memory_gb": 24,
        "gpu_bandwidth_gbs": 900,
    }
    rec = recommend(model, JOB, [NodeType("mine", user_gpu), NodeType("b", "RTX 3090")])
    assert set(rec.table["node_type"]) == {"mine", "b"}
    assert not rec.table.filter(pl.col("node_type") == "mine")["seen_gpu"][0]


@pytest.fixture(scope="module")
def loao() -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    """Per architecture: its runs and PRE's predictions by a model fitted without it."""
    if not (SHARED_DATA / "runs.parquet").is_file():
        pytest.skip(f"real traces not found at {SHARED_DATA} (../shared/data/seaa2023)")
    df = runs_features(pl.read_parquet(SHARED_DATA / "runs.parquet"))
    out = {}
    for arch in sorted(set(df["architecture"].to_list())):
        m = PREModel().fit(df.filter(pl.col("architecture") != arch))
        held = df.filter(pl.col("architecture") == arch)
        out[arch] = (held, m.predict(held))
    return out


@pytest.mark.parametrize(
    ("arch", "max_mape"),
    # measured with the defaults (2-core x86): 13.4 %, 10.7 %, 10.2 %
    [("mobilenet_v2", 14.0), ("nasnet_mobile", 11.5), ("vgg16", 11.0)],
)
def test_real_runs_loao_picks_the_lower_energy_gpu(loao, arch: str, max_mape: float) -> None:
    """Regression (vgg16): the additive prior picked the RTX 3070, 3 % worse than the 3090."""
    held, pred = loao[arch]
    p = held.with_columns(pred["predicted_epoch_energy_j"].alias("pred"))
    cells = p.group_by("gpu_model").agg(pl.col("epoch_energy_j").mean(), pl.col("pred").mean())
    assert cells.sort("pred")["gpu_model"][0] == cells.sort("epoch_energy_j")["gpu_model"][0]
    y = held["epoch_energy_j"].to_numpy()
    assert 100 * np.mean(np.abs(p["pred"].to_numpy() - y) / y) < max_mape
    cover = np.mean((y >= pred["lower_j"].to_numpy()) & (y <= pred["upper_j"].to_numpy()))
    assert cover >= 0.8  # the goal for unseen architectures


def test_real_runs_loao_pooled_meets_the_goal(loao) -> None:
    """The issue's goal: every run predicted by a model that never saw its architecture,
    MAPE at most 12 % (measured 11.62 %; 12.06 % without the run-length feature)."""
    y = np.concatenate([h["epoch_energy_j"].to_numpy() for h, _ in loao.values()])
    p = np.concatenate([q["predicted_epoch_energy_j"].to_numpy() for _, q in loao.values()])
    assert len(y) == 249
    assert 100 * np.mean(np.abs(p - y) / y) <= 12.0


@pytest.mark.parametrize(
    ("change", "deadline_s", "match"),
    [
        ({"planned_epochs": -5}, None, "planned_epochs must be an integer > 0; found -5"),
        ({"planned_epochs": 0}, None, "planned_epochs must be an integer > 0; found 0"),
        ({"layers": -50}, None, r"layers \(with parameters\) must be a number > 0; found -50"),
        ({}, -3600.0, r"deadline_s must be a number > 0 \(s\); found -3600.0"),
        ({}, 0.0, r"deadline_s must be a number > 0 \(s\); found 0.0"),
    ],
)
def test_job_numbers_are_refused(
    model: PREModel, change: dict, deadline_s: float | None, match: str
) -> None:
    """Regression: --epochs -5 ranked the worst GPU first with negative energies, --epochs 0
    ran as 1 epoch, --layers -50 passed, and a negative deadline made every node late."""
    job = JobDescription(**{**{f: getattr(JOB, f) for f in JOB.__dataclass_fields__}, **change})
    inv = [NodeType("t4", "Tesla T4"), NodeType("gamer", "RTX 3090")]
    with pytest.raises(BadInputError, match=match):
        recommend(model, job, inv, deadline_s=deadline_s)


_T4 = {"name": "t4", "gpu_model": "Tesla T4"}
_MINE = {"name": "custom", "gpu_model": {"name": "MyCard", "gpu_fp32_tflops": 20}}


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({**_T4, "price_per_hour": "0.5"}, r"'t4': price_per_hour: expected a number >= 0.*'0.5'"),
        ({**_T4, "price_per_hour": -3}, r"'t4': price_per_hour: expected a number >= 0.*found -3"),
        ({**_T4, "carbon_g_per_kwh": -1}, r"'t4': carbon_g_per_kwh: expected a number >= 0"),
        ({**_T4, "gpu_count": "2"}, r"'t4': gpu_count: expected an integer > 0; found '2'"),
        ({**_T4, "gpu_count": 0}, r"'t4': gpu_count: expected an integer > 0; found 0"),
        ({**_T4, "gpu_count": 1.5}, r"'t4': gpu_count: expected an integer > 0; found 1.5"),
        ({**_T4, "default": "yes"}, r"'t4': default: expected true or false; found 'yes'"),
        ({**_T4, "gpu_model": 3090}, r"'t4': gpu_model: expected a GPU name or an object"),
        ({**_T4, "name": ""}, r"1: name: expected a non-empty string; found ''"),
        (
            {**_MINE, "gpu_model": {**_MINE["gpu_model"], "gpu_board_power_w": -200}},
            r"'custom': gpu_model: user-described GPU: gpu_board_power_w: expected a number > 0"
            r".*found -200",
        ),
        (
            {**_MINE, "gpu_model": {**_MINE["gpu_model"], "gpu_board_power_w": "300W"}},
            r"'custom': gpu_model: .*gpu_board_power_w: expected a number > 0.*found '300W'",
        ),
    ],
)
def test_inventory_values_are_checked(tmp_path, node: dict, match: str) -> None:
    """Regression: string values raised TypeError/ValueError (exit 1); negative power or price
    gave negative energy or cost and savings over 100 %."""
    f = tmp_path / "inv.json"
    f.write_text(json.dumps([node, {"name": "other", "gpu_model": "RTX 3090"}]))
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(f))}, node type {match}"):
        load_inventory(f)


def test_inventory_gpu_generation_by_name(model: PREModel, tmp_path) -> None:
    """Regression: "gpu_generation": "ampere" raised ValueError; it is the GPU table's form."""
    mine = {
        "name": "MyCard",
        "gpu_board_power_w": 200,
        "gpu_fp32_tflops": 20,
        "gpu_memory_gb": 24,
        "gpu_bandwidth_gbs": 900,
    }
    f = tmp_path / "inv.json"
    f.write_text(
        json.dumps([{"name": "custom", "gpu_model": {**mine, "gpu_generation": "ampere"}}])
    )
    by_name = recommend(model, JOB, load_inventory(f)).table
    by_number = recommend(model, JOB, [NodeType("custom", {**mine, "gpu_generation": 5})]).table
    assert by_name["epoch_energy_j"][0] == pytest.approx(by_number["epoch_energy_j"][0])


def test_node_types_built_in_code_are_checked(model: PREModel) -> None:
    # node types that do not come from a file (Ray's inventory, the HTTP API) are checked too
    with pytest.raises(BadInputError, match=r"inventory, node type 'x': price_per_hour"):
        recommend(model, JOB, [NodeType("x", "RTX 3090", price_per_hour=-1.0)])


@pytest.mark.parametrize("card", ["[1]", '"pre"', "null"])
def test_model_card_must_be_an_object(model: PREModel, tmp_path, card: str) -> None:
    """Regression: a card of valid JSON but not an object raised AttributeError (exit 1)."""
    path = tmp_path / "pre-v1.json"
    cpath = model.save(path)
    cpath.write_text(card)
    with pytest.raises(BadInputError, match=r"pre-v1.card.json: expected a JSON object.*found"):
        PREModel.load(path)


def test_cli_refuses_bad_job_numbers_with_exit_2(model: PREModel, tmp_path, capsys) -> None:
    from cluster.cli import main

    path = tmp_path / "pre-v1.json"
    model.save(path)
    args = ["recommend", "--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
    args += ["--gflops", "5", "--layers", "50", "--model", str(path)]
    assert main([*args, "--epochs", "-5"]) == 2
    assert "planned_epochs must be an integer > 0; found -5" in capsys.readouterr().err
    assert main([*args, "--deadline-h", "-1"]) == 2
    assert "--deadline-h must be a number of hours > 0; found -1.0" in capsys.readouterr().err
