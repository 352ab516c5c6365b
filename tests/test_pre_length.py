"""The run length (epochs) PRE's figures assume, in ``recommend`` and ``placement`` output."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cluster.placement import length_note, recommend_hints
from estimators.features import JobDescription
from estimators.pre import PREModel
from estimators.recommend import NodeType, recommend
from tests.test_pre import SMALL, synthetic

JOB = JobDescription(
    architecture="resnet18",
    batch_size=32,
    training_size=1000,
    image_height=32,
    image_width=32,
    planned_epochs=120,
)
INVENTORY = [
    NodeType(name="gpu-t4", gpu_model="T4", default=True),
    NodeType(name="gpu-3090", gpu_model="RTX 3090"),
]


@pytest.fixture(scope="module")
def model() -> PREModel:
    """PRE fitted on runs of 10 to 90 epochs (median 40)."""
    runs = synthetic(4, 5, sigma=0.02, seed=5)
    lengths = np.random.default_rng(5).choice([10, 40, 90], runs.height).astype(float)
    m = PREModel(**SMALL).fit(runs.with_columns(pl.Series("epochs", lengths)))
    assert m.reference_epochs_ == 40.0
    return m


def test_recommend_json_says_which_run_length_its_figures_are_for(model: PREModel) -> None:
    """Bug: ``recommend --json`` did not say whether its totals were for the planned epochs
    or for one epoch of a run of the model's reference length."""
    planned = recommend(model, JOB, INVENTORY).to_json()
    assert (planned["epochs"], planned["reference_epochs"]) == (120, None)
    top = planned["node_types"][0]
    assert top["total_energy_kwh"] == pytest.approx(top["epoch_energy_j"] * 120 / 3.6e6)
    unplanned = recommend(model, replace(JOB, planned_epochs=None), INVENTORY).to_json()
    assert (unplanned["epochs"], unplanned["reference_epochs"]) == (None, 40.0)
    top = unplanned["node_types"][0]
    assert top["total_energy_kwh"] == pytest.approx(top["epoch_energy_j"] / 3.6e6)
    # the existing fields are unchanged
    assert set(planned) == {
        "chosen",
        "objective",
        "savings_vs_worst_pct",
        "savings_vs_default_pct",
        "placement",
        "node_types",
        "source",
        "epochs",
        "reference_epochs",
        "deadline_met",
    }


def test_placement_hints_say_which_run_length_the_predicted_energy_is_for(
    model: PREModel,
) -> None:
    """Bug: ``placement --json`` and HTTP ``/placement`` gave ``predicted_energy_j`` without
    the run length it assumes (the planned epochs, else one epoch)."""
    hints = recommend_hints(JOB, INVENTORY, model)
    per_epoch = hints["recommendation"]["node_types"][0]["epoch_energy_j"]
    assert hints["predicted_energy_j"] == pytest.approx(per_epoch * 120)
    assert (hints["epochs"], hints["reference_epochs"]) == (120, None)
    assert hints["recommendation"]["epochs"] == 120
    assert length_note(hints) == "120 epochs"
    one = recommend_hints(replace(JOB, planned_epochs=None), INVENTORY, model)
    per_epoch = one["recommendation"]["node_types"][0]["epoch_energy_j"]
    assert one["predicted_energy_j"] == pytest.approx(per_epoch)
    assert (one["epochs"], one["reference_epochs"]) == (None, 40.0)
    assert length_note(one) == "1 epoch, length unknown (trained runs: median 40); give --epochs"
    assert length_note({**one, "reference_epochs": None}) == "1 epoch; give --epochs"
    assert length_note({**hints, "epochs": 1}) == "1 epoch"


@pytest.mark.parametrize("epochs", [None, 120])
def test_placement_cli_prints_the_run_length_next_to_the_predicted_energy(
    epochs: int | None,
    model: PREModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cluster.cli import main

    path = tmp_path / "pre-v1.json"
    model.save(path, card={"version": 1})
    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps([{"name": "gpu-t4", "gpu_model": "T4", "default": True}]))
    argv = ["placement", "--arch", "resnet18", "--batch-size", "32", "--train-size", "1000"]
    argv += ["--image-size", "32", "--inventory", str(inv), "--model", str(path)]
    argv += [] if epochs is None else ["--epochs", str(epochs)]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["epochs"], out["reference_epochs"]) == (epochs, None if epochs else 40.0)
    assert main(argv) == 0
    text = capsys.readouterr().out
    length = (
        "120 epochs"
        if epochs
        else "1 epoch, length unknown (trained runs: median 40); give --epochs"
    )
    assert f"J ({length})" in text, text
