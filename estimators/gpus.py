"""GPU specification table: board power, memory, bandwidth, cores and peak throughput.

Figures are the vendor's published specifications (NVIDIA product pages and
architecture white papers; TechPowerUp's database where NVIDIA publishes none,
as for the AWS-only A10G). ``fp16_tflops`` is the dense FP16 tensor-core peak
without sparsity (the FP16-accumulate figure on GeForce cards); ``None`` where
the chip has no FP16 tensor path. Board power is the default power limit
(TDP/TGP), the cap ``nvidia-smi`` reports on a stock card.

Look a card up by the name ``nvidia-smi`` prints (``NVIDIA GeForce RTX 3090``,
``Tesla T4``, ``NVIDIA A100-SXM4-80GB``, ``NVIDIA H100 80GB HBM3``); or pass a
:class:`GpuSpec` of your own wherever a model name is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from profiler.errors import BadInputError


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Specification of one GPU model.

    Attributes:
        name: Canonical name, e.g. ``RTX 3090``.
        board_power_w: Default board power limit in W.
        memory_gb: Device memory in GB.
        bandwidth_gbs: Memory bandwidth in GB/s.
        sms: Streaming multiprocessors.
        cuda_cores: FP32 CUDA cores.
        fp32_tflops: Peak FP32 (non-tensor) throughput in TFLOPS at boost clock.
        fp16_tflops: Dense FP16 tensor-core peak in TFLOPS, ``None`` without tensor cores.
        architecture: Micro-architecture, e.g. ``Ampere``.
        compute_capability: CUDA compute capability, e.g. ``8.6``.
        aliases: Further names that identify the model (matched after normalising).

    """

    name: str
    board_power_w: float
    memory_gb: float
    bandwidth_gbs: float
    sms: int
    cuda_cores: int
    fp32_tflops: float
    fp16_tflops: float | None
    architecture: str
    compute_capability: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for attr in ("board_power_w", "memory_gb", "bandwidth_gbs", "fp32_tflops"):
            value = getattr(self, attr)
            if not value > 0:
                raise BadInputError(f"GPU spec {self.name!r}: {attr} must be > 0; found {value}")


GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("GTX 750 Ti", 60, 2, 86.4, 5, 640, 1.389, None, "Maxwell", "5.0"),
    GpuSpec("RTX 3070", 220, 8, 448.0, 46, 5888, 20.31, 81.3, "Ampere", "8.6"),
    GpuSpec("RTX 3090", 350, 24, 936.2, 82, 10496, 35.58, 142.3, "Ampere", "8.6"),
    GpuSpec("RTX 4090", 450, 24, 1008.0, 128, 16384, 82.58, 330.3, "Ada Lovelace", "8.9"),
    GpuSpec("T4", 70, 16, 320.0, 40, 2560, 8.141, 65.0, "Turing", "7.5"),
    GpuSpec(
        "V100 SXM2",
        300,
        16,
        900.0,
        80,
        5120,
        15.7,
        125.0,
        "Volta",
        "7.0",
        aliases=("V100", "V100 SXM2 16GB"),
    ),
    GpuSpec("V100 SXM2 32GB", 300, 32, 900.0, 80, 5120, 15.7, 125.0, "Volta", "7.0"),
    GpuSpec(
        "V100 PCIe",
        250,
        16,
        900.0,
        80,
        5120,
        14.0,
        112.0,
        "Volta",
        "7.0",
        aliases=("V100 PCIE 16GB",),
    ),
    GpuSpec("V100 PCIe 32GB", 250, 32, 900.0, 80, 5120, 14.0, 112.0, "Volta", "7.0"),
    GpuSpec("A10G", 300, 24, 600.2, 80, 10240, 31.52, 70.0, "Ampere", "8.6"),
    GpuSpec("L4", 72, 24, 300.0, 58, 7424, 30.29, 121.0, "Ada Lovelace", "8.9"),
    GpuSpec("L40S", 350, 48, 864.0, 142, 18176, 91.61, 362.05, "Ada Lovelace", "8.9"),
    GpuSpec(
        "A100 40GB",
        400,
        40,
        1555.0,
        108,
        6912,
        19.5,
        312.0,
        "Ampere",
        "8.0",
        # Bare "A100" (Ray's accelerator type) means this, the original 40 GB SXM4 part.
        aliases=("A100 SXM4 40GB", "A100"),
    ),
    GpuSpec(
        "A100 40GB PCIe",
        250,
        40,
        1555.0,
        108,
        6912,
        19.5,
        312.0,
        "Ampere",
        "8.0",
        aliases=("A100 PCIE 40GB",),
    ),
    GpuSpec(
        "A100 80GB",
        400,
        80,
        2039.0,
        108,
        6912,
        19.5,
        312.0,
        "Ampere",
        "8.0",
        aliases=("A100 SXM4 80GB", "A100 SXM 80GB"),
    ),
    GpuSpec(
        "A100 80GB PCIe",
        300,
        80,
        1935.0,
        108,
        6912,
        19.5,
        312.0,
        "Ampere",
        "8.0",
        aliases=("A100 PCIE 80GB",),
    ),
    GpuSpec(
        "H100 SXM",
        700,
        80,
        3350.0,
        132,
        16896,
        66.9,
        989.4,
        "Hopper",
        "9.0",
        aliases=("H100 80GB HBM3", "H100 SXM5", "H100 SXM5 80GB", "H100"),
    ),
    GpuSpec(
        "H100 PCIe",
        350,
        80,
        2000.0,
        114,
        14592,
        51.2,
        756.0,
        "Hopper",
        "9.0",
        aliases=("H100 PCIE 80GB",),
    ),
    GpuSpec(
        "H200",
        700,
        141,
        4800.0,
        132,
        16896,
        66.9,
        989.4,
        "Hopper",
        "9.0",
        aliases=("H200 SXM", "H200 141GB HBM3E"),
    ),
)

_VENDOR_WORDS = ("nvidia", "geforce", "tesla", "quadro")


def normalise(name: str) -> str:
    """Reduce a device name to a comparable key.

    Lower-cases, drops vendor and brand words (NVIDIA, GeForce, Tesla), and
    treats dashes, underscores and repeated spaces as one space, so
    ``NVIDIA A100-SXM4-80GB`` and ``a100 sxm4 80gb`` compare equal.
    """
    words = re.split(r"[\s_\-]+", name.strip().lower())
    return " ".join(w for w in words if w and w not in _VENDOR_WORDS)


def _index() -> dict[str, GpuSpec]:
    table: dict[str, GpuSpec] = {}
    for spec in GPUS:
        for key in (spec.name, *spec.aliases):
            table[normalise(key)] = spec
    return table


_MEMORY_TYPES = frozenset({"hbm2e", "hbm3", "hbm3e"})


def _form_factors(spec: GpuSpec) -> set[str]:
    """Form-factor words (``pcie``, ``sxm2``, ...) in a spec's name and aliases."""
    words = {w for key in (spec.name, *spec.aliases) for w in normalise(key).split()}
    found = {w for w in words if w == "pcie" or re.fullmatch(r"sxm\d?", w)}
    if any(w.startswith("sxm") for w in found):
        found.add("sxm")  # a plain "SXM" agrees with any SXM variant of the spec
    return found


def _harmless(word: str, spec: GpuSpec) -> bool:
    """Whether a word after a known name still describes ``spec`` (not another card).

    Harmless are the spec's own memory size (``80gb`` for an 80 GB spec), a
    form factor the spec has (``pcie``, ``sxm4``) and a memory type (``hbm3``).
    Anything else (``ti``, ``nvl``, ``laptop``, ``sxm3``, ``d``) may name a
    different product.
    """
    size = re.fullmatch(r"(\d+(?:\.\d+)?)gb", word)
    if size is not None:
        return float(size.group(1)) == spec.memory_gb
    return word in _MEMORY_TYPES or word in _form_factors(spec)


_INDEX = _index()


def is_known(name: str) -> bool:
    """Whether :func:`lookup` knows ``name`` (a card of the table, by any of its names)."""
    try:
        lookup(name)
    except BadInputError:
        return False
    return True


def known_models() -> list[str]:
    """Canonical names of every model in the table."""
    return [g.name for g in GPUS]


def lookup(model: str | GpuSpec) -> GpuSpec:
    """The specification of a GPU model.

    Args:
        model: Name as ``nvidia-smi`` prints it (or a canonical or alias name),
            or a :class:`GpuSpec` given by the user, returned unchanged.

    Returns:
        The model's specification.

    Raises:
        BadInputError: The model is unknown, or is a known name followed by a
            word other than that card's memory size, form factor or memory type
            (``RTX 3090 Ti``, ``H100 NVL``); the message lists known models and
            says how to give a specification of one's own.

    """
    if isinstance(model, GpuSpec):
        return model
    if not isinstance(model, str) or not model.strip():
        raise BadInputError(
            f"expected a GPU model name such as 'NVIDIA GeForce RTX 3090'; found {model!r}"
        )
    key = normalise(model)
    if key in _INDEX:
        return _INDEX[key]
    # nvidia-smi sometimes appends the memory size or form factor: take the longest known
    # prefix, but only if every word after it still describes that card (a "Ti", "NVL",
    # "Laptop" or another memory size is a different product with other numbers).
    best = max((k for k in _INDEX if key.startswith(k + " ")), key=len, default=None)
    note = ""
    if best is not None:
        spec = _INDEX[best]
        extra = key[len(best) + 1 :].split()
        odd = [w for w in extra if not _harmless(w, spec)]
        if not odd:
            return spec
        note = (
            f" (it starts like {spec.name!r}, but {' '.join(odd)!r} is not that card's "
            "memory size or form factor, so it may be a different card)"
        )
    raise BadInputError(
        f"unknown GPU model {model!r}{note}; known models: {', '.join(known_models())}. "
        "Pass a GpuSpec (board power, memory, bandwidth, cores, TFLOPS) for other cards"
    )
