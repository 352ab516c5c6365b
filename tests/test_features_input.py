"""Runs and jobs that features must refuse or tell apart, found in review.

GPUs described by numbers (``config.gpu_spec``) that shared one name, infinite
numbers that passed validation and crashed XGBoost, NaN in count columns that
crashed ``int()``, and half-precision modules that could not be measured. The
runs are small hand-made frames with the SEAA 2023 vgg16 job (see
``tests.conftest.RUN``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from cluster.cli import main
from estimators.features import (
    JobDescription,
    complete_job,
    feature_frame,
    measure_module,
    runs_features,
)
from profiler.errors import BadInputError
from profiler.store import Store
from tests.conftest import RUN

#: Two GPUs described by their numbers: a big and a small card.
BIG = {
    "gpu_board_power_w": 300,
    "gpu_fp32_tflops": 20,
    "gpu_memory_gb": 24,
    "gpu_bandwidth_gbs": 900,
}
SMALL = {
    "gpu_board_power_w": 70,
    "gpu_fp32_tflops": 8,
    "gpu_memory_gb": 16,
    "gpu_bandwidth_gbs": 300,
}


def _run(run_id: str, **change: Any) -> dict[str, Any]:
    """One finished vgg16 run in the shared layout: 5 epochs of 100 s at 300 W."""
    row: dict[str, Any] = {
        **RUN,
        "run_id": run_id,
        "trained_epochs": 5,
        "duration_s": 500.0,
        "gpu_energy_j": 150_000.0,
        "config": None,
    }
    row.update(change)
    return row


def _frame(rows: list[dict[str, Any]], **dtypes: pl.DataType) -> pl.DataFrame:
    return pl.DataFrame(rows, infer_schema_length=None).with_columns(
        pl.col(c).cast(t) for c, t in dtypes.items()
    )


def _spec_run(run_id: str, gpu_model: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _run(run_id, gpu_model=gpu_model, config=json.dumps({"gpu_spec": spec}))


# ------------------------------------------------------------------------ GPUs by numbers


def test_two_unnamed_gpu_specs_keep_their_own_numbers_and_names() -> None:
    """Bug: every spec without a name was cached as "user-described GPU": the second card
    got the first one's numbers (300 W, 20 TFLOPS for a 70 W, 8 TFLOPS card) and both
    were pooled by PRE's prior under one name; the runs' own gpu_model was dropped."""
    f = runs_features(
        _frame([_spec_run("r1", "big-box", BIG), _spec_run("r2", "small-box", SMALL)])
    )
    names = ("big-box", "small-box")
    for row, spec, name in zip(f.iter_rows(named=True), (BIG, SMALL), names, strict=True):
        for key, value in spec.items():
            assert row[key] == pytest.approx(value), (row["run_id"], key)
        assert name in row["gpu_model"]
    assert f["gpu_model"].n_unique() == 2


def test_one_name_with_other_numbers_is_another_gpu() -> None:
    """Two specs of one name but other numbers are two GPUs to PRE's prior (it pools per
    gpu_model); the same numbers written differently (200 or 200.0) are one GPU."""
    f = runs_features(
        _frame(
            [
                _spec_run("a", "box", {**BIG, "name": "box"}),
                _spec_run("b", "box", {**SMALL, "name": "box"}),
                _spec_run("c", "box", {**{k: float(v) for k, v in BIG.items()}, "name": "box"}),
            ]
        )
    )
    names = dict(zip(f["run_id"], f["gpu_model"], strict=True))
    assert names["a"] != names["b"]
    assert names["a"] == names["c"]
    assert f.filter(pl.col("run_id") == "b")["gpu_board_power_w"][0] == 70.0
    # What recommend gives PRE for the same card (an inventory spec) is the name it trained on.
    job = JobDescription("vgg16", 32, 23807, gflops_forward=10.03)
    assert feature_frame([(job, {**BIG, "name": "box"})])["gpu_model"][0] == names["a"]


@pytest.mark.parametrize("spec_first", [True, False])
def test_a_spec_named_like_a_table_gpu_is_not_that_gpu(spec_first: bool) -> None:
    """Bug: a spec named "NVIDIA GeForce RTX 3090" shared the cache entry of the table's
    RTX 3090 runs: whichever came first gave its numbers to the other."""
    table = _run("table", gpu_model="NVIDIA GeForce RTX 3090")
    spec = _spec_run(
        "spec", "NVIDIA GeForce RTX 3090", {**SMALL, "name": "NVIDIA GeForce RTX 3090"}
    )
    f = runs_features(_frame([spec, table] if spec_first else [table, spec]))
    by_id = {r["run_id"]: r for r in f.iter_rows(named=True)}
    assert by_id["table"]["gpu_model"] == "RTX 3090"
    assert by_id["table"]["gpu_board_power_w"] == 350.0
    assert by_id["spec"]["gpu_board_power_w"] == 70.0
    assert by_id["spec"]["gpu_fp32_tflops"] == 8.0
    assert by_id["spec"]["gpu_model"] != by_id["table"]["gpu_model"]
    assert "RTX 3090" in by_id["spec"]["gpu_model"]


# ------------------------------------------------------------------------ infinite numbers


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("gpu_energy_j", math.inf),
        ("duration_s", math.inf),
        ("gflops_forward", math.inf),
        ("gflops_forward", 1e308),  # finite, but 3x it (training FLOPs) is not
    ],
)
def test_infinite_numbers_of_a_run_are_refused_by_file_row_and_column(
    column: str, value: float
) -> None:
    """Bug: inf energy, duration or FLOPs passed and crashed XGBoost (exit 1) later."""
    rows = _frame([_run("ok"), _run("bad", **{column: value})])
    with pytest.raises(BadInputError, match=rf"^runs\.parquet, row 2\b.*{column}") as err:
        runs_features(rows, file="runs.parquet")
    assert "run 'bad'" in str(err.value) and "finite" in str(err.value)
    assert f"found {value!r}" in str(err.value) or "found inf" in str(err.value)


@pytest.mark.parametrize("gflops", [math.inf, 1e308])
def test_a_job_with_infinite_flops_is_refused(gflops: float) -> None:
    """Bug: ``--gflops 1e308`` overflowed to inf training FLOPs and crashed XGBoost."""
    with pytest.raises(BadInputError, match=r"job vgg16: gflops_(forward|train).*finite.*found"):
        complete_job(JobDescription("vgg16", 32, 23807, gflops_forward=gflops))


def test_a_job_with_infinite_training_flops_is_refused() -> None:
    with pytest.raises(BadInputError, match=r"gflops_train.*finite.*found inf"):
        complete_job(JobDescription("vgg16", 32, 23807, gflops_forward=10.0, gflops_train=math.inf))


# ------------------------------------------------------------------------ NaN in counts


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("batch_size", math.nan),
        ("training_size", math.nan),
        ("training_size", math.inf),
        ("validation_size", math.nan),
        ("batch_size", 32.5),
    ],
)
def test_a_count_that_is_not_a_whole_number_is_refused(column: str, value: float) -> None:
    """Bug: a pandas-written file's missing integers (NaN in a float column) raised
    "ValueError: cannot convert float NaN to integer" (exit 1) in runs_features."""
    rows = _frame([_run("ok"), _run("bad", **{column: value})], **{column: pl.Float64()})
    with pytest.raises(
        BadInputError, match=rf"^runs\.parquet, row 2, '{column}': run 'bad': expected a whole"
    ) as err:
        runs_features(rows, file="runs.parquet")
    assert f"found {value!r}" in str(err.value)
    # A whole number in the float column is that count.
    assert runs_features(rows.head(1))[column][0] == float(_run("ok")[column])


# ------------------------------------------------------------------------ retrain


def _store_runs(bad: dict[str, Any]) -> pl.DataFrame:
    """12 finished runs on two table GPUs and three architectures, plus ``bad``.

    Per-epoch time and energy are the SEAA 2023 means of each GPU and architecture.
    """
    flops = {"vgg16": 10.0288, "mobilenet_v2": 0.0640, "nasnet_mobile": 0.3716}
    per_epoch = {  # (s, J)
        ("NVIDIA GeForce RTX 3070", "mobilenet_v2"): (17.0, 2111.0),
        ("NVIDIA GeForce RTX 3070", "nasnet_mobile"): (37.7, 5289.0),
        ("NVIDIA GeForce RTX 3070", "vgg16"): (56.2, 12227.0),
        ("NVIDIA GeForce RTX 3090", "mobilenet_v2"): (27.2, 4040.0),
        ("NVIDIA GeForce RTX 3090", "nasnet_mobile"): (51.4, 10049.0),
        ("NVIDIA GeForce RTX 3090", "vgg16"): (35.4, 11855.0),
    }
    rows = []
    for k, ((gpu, arch), (t, e)) in enumerate(per_epoch.items()):
        for j, epochs in enumerate((60, 100)):
            wobble = 1.0 + 0.02 * (j - 0.5)
            rows.append(
                {
                    "run_id": f"run-{k}-{j}",
                    "status": "finished",
                    "gpu_model": gpu,
                    "architecture": arch,
                    "batch_size": 32,
                    "training_size": 23807,
                    "validation_size": 10203,
                    "gflops_forward": flops[arch],
                    "trained_epochs": epochs,
                    "duration_s": t * epochs * wobble,
                    "energy_j": e * epochs * wobble,
                }
            )
    return pl.DataFrame([*rows, {**rows[0], **bad}], infer_schema_length=None)


@pytest.mark.parametrize(
    ("bad", "column"),
    [
        ({"run_id": "bad-duration", "duration_s": math.inf}, "duration_s"),
        ({"run_id": "bad-flops", "gflops_forward": math.inf}, "gflops_forward"),
    ],
)
def test_retrain_leaves_out_a_run_with_an_infinite_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: dict[str, Any], column: str
) -> None:
    """Bug: one run with an infinite duration or FLOPs made ``wattwise retrain`` fail
    (XGBoostError, exit 1) instead of training on the other runs."""
    store = Store(tmp_path / "store")
    store.write_runs(_store_runs(bad))
    code = main(["retrain", "--store", str(store.root)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    card = json.loads((store.root / "models" / "pre-v1.card.json").read_text())
    run_id = bad["run_id"]
    assert run_id not in card["run_ids"] and len(card["run_ids"]) == 12
    assert card["excluded_runs"]["features_failed"] == 1
    reason = card["excluded_run_reasons"][run_id]
    assert column in reason and "inf" in reason
    assert run_id not in reason  # the key says which run


# ------------------------------------------------------------------------ half precision


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_module_is_measured_like_its_fp32_self(dtype: torch.dtype) -> None:
    """Bug: a fp16/bf16 module failed on the float32 random input, and the message
    advised passing a shape."""
    torch.manual_seed(0)
    fp32 = measure_module(_Small(), (3, 16, 16))
    module = _Small().to(dtype)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    half = measure_module(module, (3, 16, 16))
    assert half.gflops_forward == pytest.approx(fp32.gflops_forward)
    assert half.gflops_train == pytest.approx(fp32.gflops_train)
    assert (half.params, half.layers) == (fp32.params, fp32.layers)
    # The user's module comes back as it was: same dtype, same weights and statistics.
    assert all(p.dtype == dtype for p in module.parameters())
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_torchvision_model_the_table_also_names_is_measured_when_flops_are_given(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """resnet50 at 224 px with --gflops 4.1 (GMACs): measured as torchvision's, with the
    warning and its train/forward ratio; the SEAA configuration itself stays the table's."""
    import logging

    from estimators.features import KNOWN_ARCHITECTURES, JobDescription, complete_job

    with caplog.at_level(logging.WARNING):
        got = complete_job(JobDescription("resnet50", 64, 50000, 0, 224, 224, gflops_forward=4.1))
    assert "multiply-add as 2 FLOPs" in caplog.text
    assert got.layers != KNOWN_ARCHITECTURES["resnet50"].layers  # torchvision's count
    seaa = KNOWN_ARCHITECTURES["mobilenet_v2"]
    same = complete_job(
        JobDescription("mobilenet_v2", 32, 23807, 0, 128, 128, gflops_forward=seaa.gflops_forward)
    )
    assert same.layers == seaa.layers


def test_measuring_refuses_images_larger_than_1024_px() -> None:
    from estimators.features import JobDescription, complete_job

    with pytest.raises(BadInputError, match="up to 1024 px a side; found image size 2048x2048"):
        complete_job(JobDescription("resnet50", 8, 1000, 0, 2048, 2048))


@pytest.mark.parametrize("arch", ["mobilenet_v2", "vgg16", "resnet50"])
def test_the_flags_a_missing_image_size_asks_for_reach_the_tables_model(arch: str) -> None:
    """Found in review: without an image size the message for mobilenet_v2 said "known at
    image size 128x128 ... (--image-size 128)", but following it measured torchvision's
    full-width MobileNetV2 (0.198 GFLOPs) instead of SEAA's alpha=0.5 model (0.0639), so PRE
    took it for an unseen architecture (2276 J predicted instead of 2133 J)."""
    import re

    from estimators.features import KNOWN_ARCHITECTURES

    info = KNOWN_ARCHITECTURES[arch]
    with pytest.raises(BadInputError) as caught:
        complete_job(JobDescription(arch, 32, 100))
    msg = str(caught.value)
    assert f"--image-size 128) measures torchvision's {arch}, another network" in msg
    flags = re.search(r"--gflops (\S+) --image-size (\d+)", msg)
    assert flags is not None, msg
    gflops, size = float(flags[1]), int(flags[2])
    job = complete_job(JobDescription(arch, 32, 100, 0, size, size, gflops_forward=gflops))
    assert (job.gflops_forward, job.gflops_train) == (info.gflops_forward, info.gflops_train)
    assert (job.layers, job.params) == (info.layers, info.params)


def test_an_image_size_alone_still_measures_torchvisions_model() -> None:
    """The earlier behaviour the message describes: a torchvision name with an image size and
    no FLOPs is torchvision's model (here full-width MobileNetV2, not the table's)."""
    job = complete_job(JobDescription("mobilenet_v2", 32, 100, 0, 128, 128))
    assert job.gflops_forward == pytest.approx(0.198, rel=0.01)
