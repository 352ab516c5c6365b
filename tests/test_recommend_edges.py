"""Edges of the recommender and its placement hints found in review.

A deadline without planned epochs, a deadline nobody meets, CPU node types and
GPUs described by their numbers in the hints, Ray's accelerator type names, the
``placement`` command's job numbers and inventory specs with missing or misspelt
keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.placement import hints_for, inventory_from_ray
from estimators import gpus
from estimators.features import JobDescription
from estimators.pre import PREModel
from estimators.recommend import NodeType, parse_inventory, placement, recommend
from profiler.errors import BadInputError
from tests.test_pre import SMALL, synthetic

#: The synthetic runs' own architecture, described by numbers (no torchvision model).
JOB = JobDescription("arch0", 32, 20000, 5000, gflops_forward=5.0, layers=50, planned_epochs=10)
NO_EPOCHS = JobDescription("arch0", 32, 20000, 5000, gflops_forward=5.0, layers=50)
INVENTORY = [
    NodeType("t4", "Tesla T4", price_per_hour=0.5, default=True),
    NodeType("gamer", "NVIDIA GeForce RTX 3090", price_per_hour=1.0),
    NodeType("a100", "NVIDIA A100-SXM4-80GB", price_per_hour=3.0),
]
#: A card described by all the numbers a GPU spec needs (an RTX 4090-like card).
SPEC = {
    "gpu_board_power_w": 450,
    "gpu_fp32_tflops": 82.6,
    "gpu_memory_gb": 24,
    "gpu_bandwidth_gbs": 1008,
}
#: A CPU node type described by its numbers (as the demo's modelled CPUs are).
CPU_SPEC = {"name": "Xeon 8380", "kind": "cpu", **SPEC, "gpu_board_power_w": 150}
#: A Kubernetes label value (what a nodeSelector or label selector may hold).
LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


@pytest.fixture(scope="module")
def model() -> PREModel:
    return PREModel(**SMALL).fit(synthetic(4, 5, sigma=0.02, seed=5))


@pytest.fixture(scope="module")
def model_file(model: PREModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("edges") / "pre-v1.json"
    model.save(path, card={"version": 1})
    return path


# ----------------------------------------------------------------------------- deadlines


def test_a_deadline_without_planned_epochs_is_refused(model: PREModel) -> None:
    """Found in review: without epochs the times are one epoch's, so a 24 h job "met" a 1 h
    deadline."""
    with pytest.raises(BadInputError, match=r"deadline \(1 h\) needs the job's planned epochs"):
        recommend(model, NO_EPOCHS, INVENTORY, deadline_s=3600.0)


def test_the_cli_refuses_a_deadline_without_epochs_with_exit_2(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    args = ["recommend", "--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
    args += ["--gflops", "5", "--layers", "50", "--model", str(model_file)]
    assert main([*args, "--deadline-h", "1"]) == 2
    assert "needs the job's planned epochs (--epochs" in capsys.readouterr().err


def _times(model: PREModel) -> dict[str, float]:
    t = recommend(model, JOB, INVENTORY).table
    return dict(zip(t["node_type"], t["total_time_h"], strict=True))


def test_deadline_met_says_whether_the_chosen_node_type_meets_it(model: PREModel) -> None:
    """Found in review: when no node type met the deadline the result still said "choose X"
    and the JSON had no overall flag."""
    times = _times(model)
    fastest = min(times, key=times.__getitem__)
    assert recommend(model, JOB, INVENTORY).to_json()["deadline_met"] is None
    easy = recommend(model, JOB, INVENTORY, deadline_s=max(times.values()) * 3600 * 2)
    assert easy.deadline_met is True and easy.to_json()["deadline_met"] is True
    assert easy.summary().startswith(f"choose {easy.chosen}: saves ")

    late = recommend(model, JOB, INVENTORY, deadline_s=min(times.values()) * 3600 / 2)
    assert late.deadline_met is False and late.to_json()["deadline_met"] is False
    assert not late.table["meets_deadline"].any()
    # still the best by the objective, said plainly to be late
    assert late.chosen == recommend(model, JOB, INVENTORY).chosen
    text = late.summary()
    assert text.startswith("no node type meets the deadline of ")
    assert f"the fastest, {fastest}, needs {times[fastest]:.2f} h" in text
    assert f"best by energy: {late.chosen} (late, {times[late.chosen]:.2f} h)" in text


def test_recommend_json_carries_deadline_met(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    args = ["recommend", "--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
    args += ["--gflops", "5", "--layers", "50", "--epochs", "10", "--model", str(model_file)]
    assert main([*args, "--deadline-h", "0.0001", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deadline_met"] is False
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deadline_met"] is None
    # Found in review: every row "met" the deadline that was never given.
    assert [r["meets_deadline"] for r in out["node_types"]] == [None] * len(out["node_types"])
    assert main(args) == 0
    assert "(late)" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- CPU node types


def test_the_recommendation_places_a_cpu_node_type_without_gpus(model: PREModel) -> None:
    """Found in review: Recommendation.placement asked for a GPU and selected on a 'Xeon-8380'
    accelerator for a kind: cpu node type, unlike cluster.placement.hints_for."""
    node = NodeType("cpu-pool", CPU_SPEC)
    rec = recommend(model, JOB, [node])
    hints = hints_for(node)
    assert rec.placement == {k: v for k, v in hints.items() if k not in ("gpu", "ray_options")}
    assert rec.placement["num_gpus"] == 0 and rec.placement["accelerator_type"] is None
    assert rec.placement["k8s_node_selector"] == {} and rec.placement["label_selector"] == {}
    assert rec.to_json()["placement"] == rec.placement


def test_a_cpu_node_type_without_numbers_is_placed_but_not_ranked(model: PREModel) -> None:
    inv = parse_inventory([{"name": "cpu-pool", "gpu_model": {"kind": "cpu"}}, {**_T4}])
    assert placement(inv[0])["num_gpus"] == 0
    with pytest.raises(BadInputError, match=r"PRE cannot rank node type 'cpu-pool'.*numbers"):
        recommend(model, JOB, inv)


# ----------------------------------------------------------------------------- spec GPUs


@pytest.mark.parametrize("name", ["My Card X", None])
def test_a_gpu_described_by_numbers_gets_no_invented_selectors(
    model: PREModel, name: str | None
) -> None:
    """Found in review: the nodeSelector was 'My Card X' (spaces: not a label value) or the
    placeholder 'user-described GPU'; neither GPU feature discovery nor Ray reports either."""
    spec = SPEC if name is None else {"name": name, **SPEC}
    rec = recommend(model, JOB, [NodeType("custom", spec, gpu_count=2)])
    p = rec.placement
    assert (p["accelerator_type"], p["label_selector"], p["k8s_node_selector"]) == (None, {}, {})
    assert p["num_gpus"] == 2 and p["ray_resources"] == {"node_type:custom": 0.001}
    # the runner records the GPU under the name PRE files it (a run's gpu_model is needed)
    assert p["gpu_model"] == (name or "user-described GPU")
    assert hints_for(NodeType("custom", spec))["ray_options"]["num_gpus"] == 1.0


def test_a_gpu_spec_uses_the_selectors_its_inventory_entry_gives(model: PREModel) -> None:
    node = parse_inventory(
        [
            {
                "name": "custom",
                "gpu_model": {"name": "My Card X", **SPEC},
                "gpu_product": "Acme-My-Card-X",
                "accelerator_type": "My-Card-X",
            }
        ]
    )[0]
    p = placement(node)
    assert p["label_selector"] == {"ray.io/accelerator-type": "My-Card-X"}
    assert p["k8s_node_selector"] == {"nvidia.com/gpu.product": "Acme-My-Card-X"}


@pytest.mark.parametrize("key", ["gpu_product", "accelerator_type"])
@pytest.mark.parametrize("value", ["My Card X", "-x", "x" * 64, 3])
def test_selector_values_must_be_label_values(key: str, value: Any) -> None:
    with pytest.raises(
        BadInputError, match=rf"^inv.json, node type 't4': {key}: expected a Kubernetes label"
    ):
        parse_inventory([{**_T4, key: value}], file="inv.json")


def test_every_selector_of_the_gpu_table_is_a_label_value() -> None:
    for g in gpus.GPUS:
        p = placement(NodeType("n", g.name))
        for value in (*p["label_selector"].values(), *p["k8s_node_selector"].values()):
            assert LABEL_VALUE.fullmatch(value), (g.name, value)


# ----------------------------------------------------------------------------- Ray's names


#: Names as nvidia-smi (NVML) prints them, for Ray's own rule.
SMI_NAMES = [
    "NVIDIA GeForce RTX 3090",
    "NVIDIA GeForce RTX 3070",
    "NVIDIA GeForce RTX 4090",
    "NVIDIA GeForce GTX 750 Ti",
    "Tesla T4",
    "Tesla V100-SXM2-16GB",
    "Tesla V100-PCIE-32GB",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA A100-PCIE-40GB",
    "NVIDIA A10G",
    "NVIDIA L4",
    "NVIDIA L40S",
    "NVIDIA H100 80GB HBM3",
    "NVIDIA H100 PCIe",
    "NVIDIA H200",
]


def test_accelerator_type_follows_rays_rule_for_geforce_cards() -> None:
    """Found in review: our hints said 'RTX-3090'; Ray names the card 'GeForce-RTX-3090'."""
    from estimators.recommend import accelerator_type

    assert accelerator_type("RTX 3090") == "GeForce-RTX-3090"
    assert accelerator_type("NVIDIA GeForce GTX 750 Ti") == "GeForce-GTX-750-Ti"
    assert placement(NodeType("g", "RTX 3070"))["label_selector"] == {
        "ray.io/accelerator-type": "GeForce-RTX-3070"
    }


def test_accelerator_type_agrees_with_rays_own_function() -> None:
    """Our copy of Ray's rule against Ray's (installed) function, for every card we know."""
    nvidia = pytest.importorskip("ray._private.accelerators.nvidia_gpu")
    from estimators.recommend import accelerator_type, device_name, ray_accelerator_type

    ray_rule = nvidia.NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type
    for g in gpus.GPUS:
        smi = device_name(g.name)
        assert gpus.lookup(smi) is g  # the name we apply the rule to is this card's
        assert accelerator_type(g.name) == ray_rule(smi) == ray_accelerator_type(smi), g.name
    for smi in SMI_NAMES:
        assert accelerator_type(smi) == ray_rule(smi), smi


def test_hints_keep_the_accelerator_type_ray_reports() -> None:
    """An inventory read from Ray keeps Ray's value, even for a card our table lacks."""
    nodes = [
        {
            "NodeID": "p1",
            "Alive": True,
            "Resources": {"node_type:pro": 1.0, "accelerator_type:RTX-PRO-6000": 1.0, "GPU": 1.0},
        },
        {
            "NodeID": "g1",
            "Alive": True,
            "Resources": {"node_type:gamer": 1.0, "GPU": 1.0},
            "Labels": {"ray.io/accelerator-type": "GeForce-RTX-3090"},
        },
        {  # a hand-made resource that cannot be a label value: derived from the name instead
            "NodeID": "s1",
            "Alive": True,
            "Resources": {"node_type:spaced": 1.0, "accelerator_type:RTX 3070": 1.0, "GPU": 1.0},
        },
    ]
    hints = {n.name: hints_for(n) for n in inventory_from_ray(nodes)}
    assert hints["pro"]["label_selector"] == {"ray.io/accelerator-type": "RTX-PRO-6000"}
    assert hints["gamer"]["accelerator_type"] == "GeForce-RTX-3090"
    assert hints["spaced"]["accelerator_type"] == "GeForce-RTX-3070"
    # Ray's accelerator name is not GPU feature discovery's product label
    # (NVIDIA-A100-SXM4-80GB): no nodeSelector that no node has.
    assert all(h["k8s_node_selector"] == {} for h in hints.values())


def test_recommend_without_an_inventory_leaves_out_gpus_described_by_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: the default inventory (the model's GPUs) failed on a spec GPU's name.

    A model trained on a card described by its numbers keeps its name, not its
    numbers: without --inventory the table GPUs are ranked and the spec GPU is
    named as left out; a model with only spec GPUs asks for --inventory (exit 2).
    """
    from cluster.cli import main
    from estimators.features import feature_frame

    runs = synthetic(3, 4, sigma=0.02, seed=8)
    box = {"name": "box", **SPEC}
    spec_rows = feature_frame([(JOB, box)] * 12).with_columns(
        epoch_energy_j=pl.Series([5_000.0 + 10 * i for i in range(12)]),
        epoch_time_s=pl.Series([20.0 + 0.1 * i for i in range(12)]),
        run_id=pl.Series([f"s{i}" for i in range(12)]),
    )
    both = pl.concat([runs, spec_rows.select(runs.columns)], how="vertical_relaxed")
    path = tmp_path / "pre-v1.json"
    PREModel(**SMALL).fit(both).save(path)
    args = ["recommend", "--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
    args += ["--gflops", "5", "--layers", "50", "--epochs", "10", "--json", "--model", str(path)]
    assert main(args) == 0
    out = capsys.readouterr()
    names = {r["gpu_model"] for r in json.loads(out.out)["node_types"]}
    assert names == set(runs["gpu_model"].unique().to_list())
    assert "left out ['box [spec" in out.err and "--inventory" in out.err
    only = tmp_path / "only" / "pre-v1.json"
    PREModel(**SMALL).fit(spec_rows).save(only)
    assert main([*args[:-1], str(only)]) == 2
    assert "all described by their numbers; give them with --inventory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- placement CLI


_T4 = {"name": "t4", "gpu_model": "Tesla T4", "default": True}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "-3"], "--epochs must be an integer > 0; found -3"),
        (["--epochs", "0"], "--epochs must be an integer > 0; found 0"),
        (["--batch-size", "-5"], "--batch-size must be an integer > 0; found -5"),
        (["--image-size", "0"], "--image-size must be an integer > 0; found 0"),
        (["--train-size", "-1"], "--train-size must be an integer > 0; found -1"),
        (["--validation-size", "-1"], "--validation-size must be an integer >= 0; found -1"),
        # Found in review: placement had none of these options the README says it refuses.
        (["--layers", "0"], "--layers must be an integer > 0; found 0"),
        (["--gflops", "nan"], "--gflops must be a finite number of GFLOPs > 0; found nan"),
        (["--epochs", "9", "--deadline-h", "-1"], "--deadline-h must be a number of hours > 0"),
        (["--deadline-h", "1"], "--deadline-h needs --epochs"),
    ],
)
@pytest.mark.parametrize("named", [False, True])
def test_placement_refuses_bad_job_numbers_without_a_model(
    extra: list[str],
    message: str,
    named: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found in review: without a model, or with --node-type, 'placement --epochs -3' answered
    with exit 0 (the README says it refuses epochs that are not > 0)."""
    from cluster.cli import main

    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps([_T4]))
    argv = ["placement", "--arch", "resnet18", "--inventory", str(inv), "--json", *extra]
    assert main(argv + (["--node-type", "t4"] if named else [])) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- inventories


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            {k: v for k, v in SPEC.items() if k != "gpu_bandwidth_gbs"},
            r"gpu_model: missing \['gpu_bandwidth_gbs'\]; a GPU described by its numbers needs",
        ),
        (
            {"gpu_board_power_w": 300},
            r"gpu_model: missing \['gpu_fp32_tflops', 'gpu_memory_gb', 'gpu_bandwidth_gbs'\]",
        ),
        (
            {
                **{k: v for k, v in SPEC.items() if k != "gpu_bandwidth_gbs"},
                "gpu_bandwith_gbs": 900,
            },
            r"gpu_model: unknown key\(s\) \['gpu_bandwith_gbs'\].*'gpu_bandwidth_gbs'",
        ),
        (
            {**SPEC, "kind": "tpu"},
            r"gpu_model: kind: expected one of \['gpu', 'cpu'\]; found 'tpu'",
        ),
        ({**SPEC, "name": ""}, r"gpu_model: name: expected a non-empty string; found ''"),
        ({"kind": "cpu", "gpu_board_power_w": 35}, r"gpu_model: missing \['gpu_fp32_tflops'"),
    ],
)
def test_a_gpu_spec_needs_its_numbers_and_known_keys(spec: dict[str, Any], match: str) -> None:
    """Found in review: a spec without bandwidth (or with it misspelt) was accepted and ranked,
    one without TFLOPS failed later without naming the file or node type."""
    with pytest.raises(BadInputError, match=rf"^inv.json, node type 'custom': {match}"):
        parse_inventory([{"name": "custom", "gpu_model": spec}, _T4], file="inv.json")


def test_a_complete_gpu_spec_is_accepted_and_ranked(model: PREModel) -> None:
    inv = parse_inventory(
        [
            {"name": "custom", "gpu_model": {"name": "MyCard", "kind": "gpu", **SPEC}},
            _T4,
        ]
    )
    rec = recommend(model, JOB, inv)
    assert set(rec.table["node_type"]) == {"custom", "t4"}
    assert not rec.table.filter(pl.col("node_type") == "custom")["seen_gpu"][0]


def test_only_one_node_type_may_be_the_default() -> None:
    """Found in review: several default: true were accepted; the first silently won."""
    with pytest.raises(
        BadInputError, match=r"^inv.json: expected at most one node type with default: true.*"
    ) as err:
        parse_inventory(
            [_T4, {"name": "g", "gpu_model": "RTX 3090", "default": True}], file="inv.json"
        )
    assert "found 2: ['t4', 'g']" in str(err.value)


def test_the_replays_inventory_names_an_unnamed_spec_as_training_did() -> None:
    """A run on a card described by unnamed numbers is filed under its own gpu_model.

    Found in review: the replay's inventory named it "user-described GPU", so PRE
    saw its own training GPU as a new one (extrapolated, wider interval).
    """
    from cluster.demo_replay import _gpu_spec
    from estimators.features import feature_frame, runs_features

    runs = pl.DataFrame(
        {
            "run_id": ["r1"],
            "gpu_model": ["big-box"],
            "architecture": ["arch0"],
            "batch_size": [32],
            "training_size": [20000],
            "validation_size": [5000],
            "gflops_forward": [5.0],
            "layers": [50],
            "config": [json.dumps({"gpu_spec": SPEC})],
        }
    )
    trained = runs_features(runs, with_truth=False)["gpu_model"][0]
    spec = _gpu_spec(runs, "big-box")
    assert spec is not None
    assert feature_frame([(JOB, spec)])["gpu_model"][0] == trained


def test_found_in_the_user_flow_review(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown card in an inventory file names the file and node type and the inventory
    keys; a short table name gets no nodeSelector (GPU feature discovery labels the name
    the card reports); --gflops beyond float32 is refused with exit 2, not a traceback."""
    from cluster.cli import main

    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps([{"name": "new", "gpu_model": "NVIDIA GeForce RTX 5090"}]))
    args = ["recommend", "--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
    args += ["--layers", "50", "--epochs", "10", "--model", str(model_file)]
    assert main([*args, "--gflops", "5", "--inventory", str(inv)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{inv}, node type 'new': gpu_model: unknown GPU model" in err
    assert '"gpu_board_power_w": ...' in err
    assert placement(NodeType("g", "RTX 3090"))["k8s_node_selector"] == {}
    full = placement(NodeType("g", "NVIDIA GeForce RTX 3090"))["k8s_node_selector"]
    assert full == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-3090"}
    assert main([*args, "--gflops", "1e40"]) == 2
    assert "must be at most 3.4e+38 (the model reads float32)" in capsys.readouterr().err


def test_recommend_takes_the_validation_size_under_placements_name_too(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: ``recommend`` took ``--val-size`` and ``placement``
    ``--validation-size``; both names now work, through one function that adds the job
    options (with ``--gflops``, ``--layers`` and ``--deadline-h``)."""
    import argparse

    from cluster.cli import main

    args = ["recommend", "--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
    args += ["--gflops", "5", "--layers", "50", "--epochs", "10", "--model", str(model_file)]
    out = []
    for name in ("--val-size", "--validation-size"):
        assert main([*args, name, "5000", "--json"]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[0] == out[1]
    from cluster.commands.pre_cmds import add_job_options, job_from_args

    # placement's defaults, the same options: a numbers-only job with a deadline parses
    parser = argparse.ArgumentParser()
    add_job_options(parser, batch_size=32, image_size=224, train_size=50_000)
    ns = parser.parse_args(
        ["--arch", "arch0", "--gflops", "5", "--layers", "50", "--validation-size", "5000"]
        + ["--epochs", "10", "--deadline-h", "2"]
    )
    assert ns.deadline_h == 2.0
    assert job_from_args(ns) == JobDescription(
        "arch0", 32, 50_000, 5000, 224, 224, 10, gflops_forward=5.0, layers=50
    )


def test_placement_takes_recommends_job_options_and_deadline(
    model: PREModel, model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: placement had no --gflops, --layers or --deadline-h, so a job described
    by its numbers could not be placed, and a deadline could not steer the choice."""
    from cluster.cli import main

    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps([{"name": n.name, "gpu_model": n.gpu_model} for n in INVENTORY]))
    job = ["--arch", "arch0", "--batch-size", "32", "--train-size", "20000", "--gflops", "5"]
    job += ["--layers", "50", "--epochs", "10", "--model", str(model_file), "--inventory", str(inv)]
    assert main(["placement", *job, "--json"]) == 0
    free = json.loads(capsys.readouterr().out)
    assert free["node_type"] == recommend(model, JOB, INVENTORY).chosen
    assert free["recommendation"]["deadline_met"] is None
    times = _times(model)
    # A deadline only the fastest node type meets moves the choice there.
    fastest = min(times, key=times.__getitem__)
    assert fastest != free["node_type"]  # else the deadline would change nothing
    tight = min(t for n, t in times.items() if n != fastest) * 0.99
    assert main(["placement", *job, "--deadline-h", str(tight), "--json"]) == 0
    hinted = json.loads(capsys.readouterr().out)
    assert hinted["node_type"] == fastest
    assert hinted["recommendation"]["deadline_met"] is True
    assert main(["recommend", *job[:-2], "--inventory", str(inv), "--deadline-h", str(tight)]) == 0
    assert f"choose {fastest}" in capsys.readouterr().out
