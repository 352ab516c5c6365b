"""``wattwise retrain`` on the real runs: versioned model files, a card, refusal of tampering."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from profiler.importers.seaa2023 import import_seaa2023
from profiler.store import Store


@pytest.fixture
def store_with_runs(shared_data, tmp_path):
    store = Store(tmp_path / "store")
    import_seaa2023(store, shared_data, progress=False)
    return store


def test_retrain_writes_a_versioned_model_and_card(store_with_runs, capsys):
    root = store_with_runs.root
    assert main(["retrain", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "accepted pre-v1.json" in out
    card = json.loads((root / "models" / "pre-v1.card.json").read_text())
    assert card["version"] == 1 and card["accepted"] is True
    assert card["training_rows"] == 249
    assert sorted(card["architectures"]) == ["mobilenet_v2", "nasnet_mobile", "vgg16"]
    assert len(card["sha256"]) == 64
    # The model file is XGBoost's own JSON, not a pickle.
    model = json.loads((root / "models" / "pre-v1.json").read_text())
    assert isinstance(model, dict)


def test_a_tampered_model_is_refused(store_with_runs, capsys):
    root = store_with_runs.root
    assert main(["retrain", "--store", str(root)]) == 0
    capsys.readouterr()
    path = root / "models" / "pre-v1.json"
    path.write_text(path.read_text().replace("1", "2", 1))
    args = [
        "recommend",
        "--arch",
        "vgg16",
        "--batch-size",
        "32",
        "--image-size",
        "224",
        "--train-size",
        "23807",
        "--epochs",
        "10",
        "--model",
        str(path),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sha256" in err or "checksum" in err
