"""GPU specification table: coverage, lookup by nvidia-smi names, user specs, errors."""

from __future__ import annotations

import pytest

from estimators.gpus import GPUS, GpuSpec, known_models, lookup, normalise
from profiler.errors import BadInputError

REQUIRED = [
    "GTX 750 Ti",
    "RTX 3070",
    "RTX 3090",
    "RTX 4090",
    "T4",
    "V100 SXM2",
    "A10G",
    "L4",
    "L40S",
    "A100 40GB",
    "A100 80GB",
    "H100 SXM",
    "H100 PCIe",
    "H200",
]


def test_table_covers_the_required_models() -> None:
    assert set(REQUIRED) <= set(known_models())


@pytest.mark.parametrize(
    ("smi_name", "canonical", "watts"),
    [
        ("NVIDIA GeForce GTX 750 Ti", "GTX 750 Ti", 60),
        ("NVIDIA GeForce RTX 3070", "RTX 3070", 220),
        ("NVIDIA GeForce RTX 3090", "RTX 3090", 350),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 450),
        ("Tesla T4", "T4", 70),
        ("Tesla V100-SXM2-16GB", "V100 SXM2", 300),
        ("Tesla V100-PCIE-32GB", "V100 PCIe", 250),
        ("NVIDIA A10G", "A10G", 300),
        ("NVIDIA L4", "L4", 72),
        ("NVIDIA L40S", "L40S", 350),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 400),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe", 250),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB", 400),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 300),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 700),
        ("NVIDIA H100 PCIe", "H100 PCIe", 350),
        ("NVIDIA H200", "H200", 700),
    ],
)
def test_lookup_by_nvidia_smi_name(smi_name: str, canonical: str, watts: float) -> None:
    spec = lookup(smi_name)
    assert spec.name == canonical
    assert spec.board_power_w == watts


def test_lookup_ignores_case_dashes_and_vendor_words() -> None:
    assert lookup("nvidia geforce rtx-3090") is lookup("RTX 3090")
    assert normalise("NVIDIA A100-SXM4-80GB") == "a100 sxm4 80gb"


def test_lookup_accepts_a_known_prefix_with_extra_words() -> None:
    assert lookup("NVIDIA L4 24GB").name == "L4"


def test_specs_are_self_consistent() -> None:
    for g in GPUS:
        assert g.cuda_cores > 0 and g.sms > 0
        assert g.fp16_tflops is None or g.fp16_tflops >= g.fp32_tflops
        # peak FP32 is 2 FLOPs per core per clock at a plausible boost clock (1 to 2.6 GHz)
        ghz = g.fp32_tflops * 1e3 / (2 * g.cuda_cores)
        assert 0.9 < ghz < 2.6, g.name


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(
        BadInputError, match=r"unknown GPU model 'Radeon VII'; known models: .*RTX 3090"
    ):
        lookup("Radeon VII")


def test_user_spec_passes_through_and_is_validated() -> None:
    mine = GpuSpec("B200", 1000, 192, 8000, 148, 18944, 80.0, 2250.0, "Blackwell", "10.0")
    assert lookup(mine) is mine
    with pytest.raises(BadInputError, match="board_power_w must be > 0; found 0"):
        GpuSpec("bad", 0, 1, 1, 1, 1, 1.0, None, "x", "1.0")
