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
        ("Tesla V100-PCIE-32GB", "V100 PCIe 32GB", 250),
        ("Tesla V100-SXM2-32GB", "V100 SXM2 32GB", 300),
        ("NVIDIA A10G", "A10G", 300),
        ("NVIDIA L4", "L4", 72),
        ("NVIDIA L40S", "L40S", 350),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 400),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe", 250),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB", 400),
        ("NVIDIA A100-SXM-80GB", "A100 80GB", 400),
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


@pytest.mark.parametrize(
    ("smi_name", "canonical"),
    [
        ("NVIDIA A100-SXM-40GB", "A100 40GB"),
        ("NVIDIA A100-SXM4-80GB HBM2e", "A100 80GB"),
        ("NVIDIA H100 SXM5 80GB HBM3", "H100 SXM"),
        ("NVIDIA H200 141GB HBM3e", "H200"),
        ("NVIDIA GeForce RTX 4090 24GB", "RTX 4090"),
    ],
)
def test_lookup_accepts_the_cards_own_memory_size_form_factor_and_memory_type(
    smi_name: str, canonical: str
) -> None:
    assert lookup(smi_name).name == canonical


@pytest.mark.parametrize(
    ("smi_name", "looks_like", "odd"),
    [
        ("NVIDIA GeForce RTX 3090 Ti", "RTX 3090", "ti"),
        ("NVIDIA GeForce RTX 3070 Ti", "RTX 3070", "ti"),
        ("NVIDIA GeForce RTX 3070 Laptop GPU", "RTX 3070", "laptop gpu"),
        ("NVIDIA GeForce RTX 4090 D", "RTX 4090", "d"),
        ("NVIDIA GeForce RTX 3090 SUPER", "RTX 3090", "super"),
        ("NVIDIA H100 NVL", "H100 SXM", "nvl"),
        ("NVIDIA H200 NVL", "H200", "nvl"),
        ("Tesla V100-SXM3-32GB", "V100 SXM2", "sxm3 32gb"),
        ("NVIDIA H100 80GB PCIe", "H100 SXM", "pcie"),
        ("NVIDIA L4 48GB", "L4", "48gb"),
    ],
)
def test_lookup_refuses_a_known_prefix_followed_by_another_product(
    smi_name: str, looks_like: str, odd: str
) -> None:
    """Regression: a 3090 Ti got the 3090's 350 W, an H100 NVL the SXM's 700 W."""
    with pytest.raises(
        BadInputError,
        match=rf"unknown GPU model '{smi_name}' \(it starts like '{looks_like}', but '{odd}' "
        r"is not that card's memory size or form factor.*Pass a GpuSpec",
    ):
        lookup(smi_name)


def test_v100_32gb_variants_have_32gb_and_their_siblings_numbers() -> None:
    """Regression: the 32 GB V100s were filed under the 16 GB specs."""
    for small, big in [
        ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"),
        ("V100 PCIe", "V100 PCIE 32GB"),
    ]:
        a, b = lookup(small), lookup(big)
        assert (a.memory_gb, b.memory_gb) == (16, 32)
        assert a.name != b.name
        for attr in ("board_power_w", "bandwidth_gbs", "sms", "cuda_cores", "fp32_tflops"):
            assert getattr(a, attr) == getattr(b, attr), attr


def test_a100_sxm_80gb_has_the_80gb_numbers() -> None:
    """Regression: 'NVIDIA A100-SXM-80GB' matched the bare alias 'A100' (the 40 GB part)."""
    spec = lookup("NVIDIA A100-SXM-80GB")
    assert (spec.memory_gb, spec.bandwidth_gbs, spec.board_power_w) == (80, 2039.0, 400)
    assert lookup("A100").name == "A100 40GB"  # Ray's bare accelerator type, as before


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
