from __future__ import annotations

import copy

import polars as pl
import pytest
import torch

from conftest import RUN
from estimators.features import (
    FEATURES,
    KNOWN_ARCHITECTURES,
    JobDescription,
    complete_job,
    feature_frame,
    gpu_features,
    measure_module,
    measure_torchvision,
    runs_features,
    same_configuration,
)
from profiler.errors import BadInputError


@pytest.fixture
def seaa_runs(shared_data):
    import polars as pl

    return pl.read_parquet(shared_data / "runs.parquet")


def test_flops_of_a_tiny_module_match_a_hand_count() -> None:
    # conv 3->4, 3x3, pad 1 on 3x8x8: 4*8*8 outputs * 27 MACs = 6912 MACs = 13824 FLOPs
    # depthwise conv 4->4 groups 4, 3x3, pad 1: 4*8*8 * 9 MACs = 2304 MACs = 4608 FLOPs
    # linear 256->10: 2560 MACs = 5120 FLOPs
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 10, bias=False),
    )
    s = measure_module(model, (3, 8, 8))
    assert s.gflops_forward * 1e9 == pytest.approx(13824 + 4608 + 5120)
    # backward: first conv only its weight gradient (input needs none); the others
    # both gradients, each costing the forward's FLOPs (grouped conv counted per group).
    assert s.gflops_train * 1e9 == pytest.approx(2 * 13824 + 3 * 4608 + 3 * 5120)
    assert s.params == 3 * 4 * 9 + 4 * 9 + 2560
    assert s.layers == 3
    assert s.activation_mb > 0


def test_torchvision_resnet18_small_image() -> None:
    s = measure_torchvision("resnet18", 32, 32)
    assert s.params == 11_689_512
    assert s.layers == 20 + 20 + 1  # 20 convs, 20 batch norms, 1 fc
    # ~1.82 GFLOPs at 224x224 scales with pixels (the fc is negligible)
    assert s.gflops_forward == pytest.approx(3.64 * (32 / 224) ** 2, rel=0.05)
    assert 2.0 < s.gflops_train / s.gflops_forward < 3.01


def test_numbers_only_job_uses_known_table() -> None:
    job = complete_job(JobDescription("vgg16", 32, 23807, 10203, gflops_forward=10.0))
    # The SEAA 2023 configuration: no ImageNet top, 128x128 input.
    assert job.layers == 14 and job.params == 14_715_201
    assert job.gflops_train == pytest.approx(30.0102)
    # Activation memory measured on Keras is not comparable with torch's: not tabulated.
    assert job.activation_mb is None
    assert (job.image_height, job.image_width) == (128, 128)
    row = feature_frame([(job, "NVIDIA GeForce RTX 3090")]).row(0, named=True)
    assert row["gpu_model"] == "RTX 3090"
    assert row["batches_per_epoch"] == 744 + 319
    assert row["tflop_per_epoch"] == pytest.approx((30.0102 * 23807 + 10.0 * 10203) / 1e3)
    assert row["gpu_board_power_w"] == 350


def test_other_configuration_of_a_known_name_takes_only_its_depth() -> None:
    # VGG16 at 224x224 has 3x the FLOPs of the tabulated 128x128 model: its
    # parameters, activations and image size are not the table's.
    job = complete_job(JobDescription("vgg16", 32, 1000, gflops_forward=30.9))
    assert job.layers == 14
    assert job.params is None and job.activation_mb is None and job.image_height is None
    assert job.gflops_train == pytest.approx(3 * 30.9)
    # Same FLOPs but another stated image size: not the table's configuration either; at
    # a stated size it is torchvision's VGG16, measured (its parameters and 16 layers),
    # the given FLOPs kept.
    job = complete_job(
        JobDescription("vgg16", 32, 1000, image_height=224, image_width=224, gflops_forward=10.0)
    )
    assert job.image_height == 224 and job.gflops_forward == 10.0
    assert job.params == 138_357_544 and job.layers == 16


def test_table_only_architecture_at_its_size_and_refused_at_others() -> None:
    # NASNet-Mobile is not in torchvision: at the table's 128 px its FLOPs come from the
    # table; at another size there is nothing to measure, and the message says so.
    job = complete_job(JobDescription("nasnet_mobile", 32, 1000, image_height=128, image_width=128))
    assert job.gflops_forward == pytest.approx(0.3684) and job.layers == 390
    assert job.params == 4_811_413
    with pytest.raises(BadInputError, match=r"known only at 128x128.*found image size 224x224"):
        complete_job(JobDescription("nasnet_mobile", 32, 1000, image_height=224, image_width=224))


def test_zero_flops_are_refused() -> None:
    with pytest.raises(BadInputError, match=r"gflops_forward must be > 0; found 0"):
        complete_job(JobDescription("mine", 32, 1000, gflops_forward=0.0, layers=3))


def test_known_table_is_the_configuration_the_seaa_runs_trained(seaa_runs) -> None:
    # The table's FLOPs were measured on the Keras models as the authors built
    # them; they must agree with the dataset's own figures.
    got = seaa_runs.group_by("architecture").agg(pl.col("gflops_forward").first())
    assert got.height == 3
    for name, gflops in got.iter_rows():
        info = KNOWN_ARCHITECTURES[name]
        assert info.gflops_forward == pytest.approx(gflops, rel=0.01), name
        assert same_configuration(info, gflops)
        assert info.image_size == 128


def test_bad_input_is_refused_with_what_is_known() -> None:
    with pytest.raises(BadInputError, match="unknown architecture 'notanet'.*resnet18"):
        complete_job(JobDescription("notanet", 32, 100, image_height=32, image_width=32))
    with pytest.raises(BadInputError, match="needs image_height"):
        complete_job(JobDescription("resnet18", 32, 100))
    with pytest.raises(BadInputError, match=r"missing \['layers'\]"):
        complete_job(JobDescription(None, 32, 100, gflops_forward=1.0))
    with pytest.raises(BadInputError, match="batch_size must be"):
        complete_job(JobDescription("vgg16", 0, 100, gflops_forward=1.0))
    with pytest.raises(BadInputError, match="unknown GPU model 'RTX 9999'.*RTX 3090"):
        gpu_features("RTX 9999")
    with pytest.raises(BadInputError, match="missing.*gpu_fp32_tflops"):
        gpu_features({"gpu_board_power_w": 100})
    user = gpu_features({"gpu_board_power_w": 100, "gpu_fp32_tflops": 10})
    assert user["gpu_board_power_w"] == 100 and user["gpu_memory_gb"] is None


def test_runs_features_from_shared_layout(seaa_runs) -> None:
    df = runs_features(seaa_runs)
    assert df.height == 249
    assert set(FEATURES) <= set(df.columns)
    r = df.filter(df["run_id"] == "cloud-mobilenet_v2-00").row(0, named=True)
    assert r["epoch_energy_j"] == pytest.approx(415170.4675 / 98)
    assert r["epoch_time_s"] == pytest.approx(2645.101 / 98)
    assert r["layers"] == 106 and r["image_height"] == 128 and r["params"] == 1_362_609


def test_runs_features_names_the_missing_column(seaa_runs) -> None:
    with pytest.raises(BadInputError, match=r"need column\(s\) \['gflops_forward'\]"):
        runs_features(seaa_runs.drop("gflops_forward"), file="r.parquet")


def _runs(column: str, value: object, **extra: object) -> pl.DataFrame:
    """Two runs: 42 (null beside a string), then ``value``, in ``column`` typed as parquet does."""
    dtype = {str: pl.String, float: pl.Float64}.get(type(value), pl.Int64)
    return pl.DataFrame(
        [
            {**RUN, "run_id": "a", column: None if isinstance(value, str) else 42, **extra},
            {**RUN, "run_id": "b", column: value, **extra},
        ],
        schema_overrides={column: dtype},
    )


@pytest.mark.parametrize("column", ["trained_epochs", "planned_epochs"])
@pytest.mark.parametrize("value", [-5, 0, 45.5, "45", float("nan"), float("inf")])
def test_a_run_length_that_is_not_a_whole_number_above_0_is_refused(
    column: str, value: object
) -> None:
    """Bug: such a ``trained_epochs`` or ``planned_epochs`` silently became a null (unknown)
    ``epochs`` feature, while ``recommend --epochs 0`` is refused. A fractional
    ``trained_epochs`` (the denominator of the per-epoch truth) is refused too."""
    with pytest.raises(BadInputError) as err:
        runs_features(_runs(column, value), file="runs.parquet", with_truth=False)
    assert str(err.value) == (
        f"runs.parquet, row 2, {column!r}: run 'b': expected a whole number of epochs > 0 "
        f"(or null: unknown); found {value!r}"
    )


def test_a_bad_planned_length_in_the_config_json_is_refused() -> None:
    # the store's runs table: a run without planned_epochs in its column keeps it in config
    runs = pl.DataFrame([{**RUN, "run_id": "a", "config": '{"planned_epochs": 0}'}])
    with pytest.raises(
        BadInputError, match=r"^r, row 1, config 'planned_epochs': run 'a'.*found 0$"
    ):
        runs_features(runs, file="r", with_truth=False)


def test_an_unknown_or_whole_float_run_length_is_accepted() -> None:
    got = runs_features(_runs("planned_epochs", None), with_truth=False)["epochs"].to_list()
    assert got == [42.0, None]  # null: the run's length is unknown
    got = runs_features(_runs("planned_epochs", 98.0), with_truth=False)["epochs"].to_list()
    assert got == [42.0, 98.0]
    truth = _runs("trained_epochs", 98.0, gpu_energy_j=9800.0, duration_s=980.0)
    rows = runs_features(truth)
    assert rows["epochs"].to_list() == [42.0, 98.0]
    assert rows["epoch_energy_j"].to_list() == pytest.approx([9800 / 42, 100.0])


@pytest.mark.parametrize(
    ("field", "value", "found"),
    [
        ("planned_epochs", 0, "found 0"),
        ("planned_epochs", -5, "found -5"),
        ("planned_epochs", 2.5, "found 2.5"),
        ("layers", -50, "found -50"),
        ("layers", 0, "found 0"),
        ("gpu_count", "2", "found '2'"),
        ("batch_size", "32", "found '32'"),
        ("layers", True, "found True"),
    ],
)
def test_job_numbers_must_be_positive(field: str, value: object, found: str) -> None:
    """Regression: --epochs -5 gave negative energies, --epochs 0 ran as 1, --layers -50 passed,
    and a string gpu_count raised TypeError."""
    given: dict = {"batch_size": 32, "training_size": 1000, "gflops_forward": 1.0, "layers": 3}
    job = JobDescription("mine", **{**given, field: value})
    with pytest.raises(BadInputError, match=rf"job mine: {field} .*must be .*> 0; {found}"):
        complete_job(job)


def test_unset_planned_epochs_and_float_layers_are_accepted() -> None:
    # runs read from parquet carry layers as floats, and a job need not plan its epochs
    job = complete_job(JobDescription("mine", 32, 1000, gflops_forward=1.0, layers=3.0))
    assert job.planned_epochs is None and job.layers == 3.0


@pytest.mark.parametrize("arch", ["vgg16", "nasnet_mobile"])
def test_known_architecture_without_image_size_asks_for_its_size(arch: str) -> None:
    """Regression: the message asked to name one of the table's architectures, already named."""
    with pytest.raises(
        BadInputError,
        match=rf"architecture '{arch}' is known at image size 128x128.*found no image size.*"
        r"--image-size 128.*--gflops",
    ):
        complete_job(JobDescription(arch, 32, 100))


def test_user_described_gpu_generation_by_name() -> None:
    """Regression: "gpu_generation": "ampere" raised ValueError (float('ampere'))."""
    spec = {"gpu_board_power_w": 200, "gpu_fp32_tflops": 20}
    by_name = gpu_features({**spec, "gpu_generation": "Ampere"})
    assert by_name["gpu_generation"] == gpu_features("RTX 3090")["gpu_generation"] == 5.0
    assert gpu_features({**spec, "gpu_generation": 5})["gpu_generation"] == 5.0


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("gpu_board_power_w", "300W", "a number > 0"),
        ("gpu_board_power_w", -200, "a number > 0"),
        ("gpu_fp32_tflops", 0, "a number > 0"),
        ("gpu_memory_gb", True, "a number > 0"),
        ("gpu_bandwidth_gbs", -1.0, "a number > 0"),
        ("gpu_generation", "martian", r"a generation name \(one of .*ampere"),
        ("gpu_generation", -1, "a generation name"),
        ("gpu_generation", 99, r"a generation name .* or its index 0-8; found 99"),
        ("gpu_generation", 2.5, "a generation name"),
    ],
)
def test_user_described_gpu_values_are_checked(key: str, value: object, expected: str) -> None:
    """Regression: "300W" raised ValueError and -200 W gave negative energy."""
    spec = {"gpu_board_power_w": 200, "gpu_fp32_tflops": 20, key: value}
    with pytest.raises(BadInputError, match=rf"user-described GPU: {key}: expected {expected}"):
        gpu_features(spec)


def _bn_model() -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten()
    )
    bn = model[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    with torch.no_grad():
        bn.running_mean.fill_(5.0)  # like a pretrained model's statistics
        bn.running_var.fill_(9.0)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a gradient the user keeps
    return model


@pytest.mark.parametrize("mixed_modes", [False, True])
def test_measure_module_leaves_the_module_as_it_was(mixed_modes: bool) -> None:
    """Regression: measuring ran the model in train mode and overwrote batch norm statistics
    (running_mean 5.0 -> 4.07, num_batches_tracked 0 -> 2) and cleared the user's gradients."""
    model = _bn_model()
    model.eval()
    if mixed_modes:  # a model training with its batch norm frozen
        model.train()
        model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    stats = measure_module(model, (3, 8, 8))
    assert stats.gflops_forward > 0 and stats.activation_mb > 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[0].bias.grad is None


def test_given_forward_flops_scale_the_measured_training_flops(caplog) -> None:
    """Regression: resnet18 given 1.82 GFLOPs (a MAC figure) got the 10.65 training GFLOPs
    measured for 3.64 forward: a train/forward ratio of 5.85 instead of about 2.9."""
    measured = measure_torchvision("resnet18", 32, 32)
    ratio = measured.gflops_train / measured.gflops_forward
    given = measured.gflops_forward / 2  # the same model quoted in multiply-adds
    with caplog.at_level("WARNING", logger="estimators.features"):
        job = complete_job(
            JobDescription(
                "resnet18", 32, 1000, image_height=32, image_width=32, gflops_forward=given
            )
        )
    assert job.gflops_forward == given
    assert job.gflops_train == pytest.approx(ratio * given)
    assert job.layers == measured.layers and job.params == measured.params
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{given:.4g}" in warning and f"{measured.gflops_forward:.4g}" in warning
    assert "one multiply-add as 2 FLOPs" in warning
    # Within SAME_CONFIG_TOLERANCE of the measurement: no warning, still scaled.
    caplog.clear()
    close = measured.gflops_forward * 1.02
    with caplog.at_level("WARNING", logger="estimators.features"):
        job = complete_job(
            JobDescription(
                "resnet18", 32, 1000, image_height=32, image_width=32, gflops_forward=close
            )
        )
    assert job.gflops_train == pytest.approx(ratio * close)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_measure_module_restores_a_module_it_cannot_copy() -> None:
    """A module deepcopy refuses (the old weight_norm's non-leaf weight) is measured in place
    and its batch norm statistics, gradients and modes restored."""
    import warnings

    model = _bn_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still used
        torch.nn.utils.weight_norm(model[0])
    model.eval()
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert measure_module(model, (3, 8, 8)).gflops_forward > 0
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not any(m.training for m in model.modules())
    assert model[0].weight_v.grad is None
