"""Feature rows for PRE: a job description and a GPU specification turned into numbers.

A job is either a model PRE can build and measure (a torchvision model name or
a user ``torch.nn.Module``: FLOPs per sample are counted with
``torch.utils.flop_counter.FlopCounterMode``, parameters, layers and
activation memory are measured), or a job described only by numbers (like the
rows of the SEAA 2023 runs, whose Keras architectures torchvision lacks:
``gflops_forward`` given, the rest from :data:`KNOWN_ARCHITECTURES` or given).

``layers`` counts the modules that own parameters (convolutions, batch norms,
dense layers): close to what the Keras applications table calls *depth*
(ImageNet models: ResNet50 107, VGG16 16, MobileNetV2 105 both ways), so
measured and tabulated numbers agree.

The SEAA 2023 models are not the Keras defaults: the authors' training code
(GAISSA-UPC/seaa2023_ect, ``src/models``) trains every architecture on
128x128 images, without the ImageNet top and with a small dense head, and
MobileNetV2 with width 0.5. :data:`KNOWN_ARCHITECTURES` holds those models
as trained (measured here on the Keras definitions); their forward FLOPs agree
with the dataset's ``gflops_forward`` within 1 %.

Units: FLOPs in GFLOPs per sample (one multiply-add = 2 FLOPs), memory in MB
(10^6 bytes) or GB, power in W, bandwidth in GB/s, throughput in TFLOPS.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeGuard

import polars as pl

from profiler.errors import BadInputError, where

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Training FLOPs per sample as a multiple of forward FLOPs when not measured
#: (forward + backward through activations and weights: about 1 + 2).
TRAIN_FLOPS_FACTOR = 3.0


@dataclass(frozen=True, slots=True)
class ArchitectureInfo:
    """Known numbers of an architecture PRE cannot build (for example a Keras model).

    The numbers describe one configuration (input size, width, head). A job
    whose forward FLOPs differ from :attr:`gflops_forward` by more than
    :data:`SAME_CONFIG_TOLERANCE`, or whose image size is not
    :attr:`image_size`, is another configuration of that name and takes only
    :attr:`layers` (depth does not change with input size or width).

    Attributes:
        params: Trainable and frozen parameters.
        layers: Layers with parameters (Keras "depth").
        source: Where the numbers come from.
        gflops_forward: Forward GFLOPs per sample of the configuration.
        gflops_train: Training (forward + backward) GFLOPs per sample.
        image_size: Input height and width in pixels.

    Activation memory is not tabulated: measured on the Keras definitions it
    comes out about 3x what :func:`measure_module` reports for the same
    network built in torch (VGG16 at 128 px: 71 against 24 MB per sample), so
    it would not be comparable with measured jobs.

    """

    params: float
    layers: int
    source: str
    gflops_forward: float | None = None
    gflops_train: float | None = None
    image_size: int | None = None


#: Relative difference of forward FLOPs within which a job is the tabulated configuration.
SAME_CONFIG_TOLERANCE = 0.05
_SEAA = (
    "SEAA 2023 models as trained (GAISSA-UPC/seaa2023_ect src/models: 128x128 input, "
    "include_top=False plus its dense head, MobileNetV2 alpha=0.5), built with Keras 3.15 "
    "(weights=None, torch backend) and measured with measure_module"
)
#: Architectures known by name for numbers-only jobs: SEAA 2023 and its held-out pair,
#: in the configuration that study trained them.
KNOWN_ARCHITECTURES: dict[str, ArchitectureInfo] = {
    "mobilenet_v2": ArchitectureInfo(1_362_609, 106, _SEAA, 0.0639, 0.1882, 128),
    "nasnet_mobile": ArchitectureInfo(4_811_413, 390, _SEAA, 0.3684, 1.0982, 128),
    "vgg16": ArchitectureInfo(14_715_201, 14, _SEAA, 10.0223, 30.0102, 128),
    "resnet50": ArchitectureInfo(26_211_201, 109, _SEAA, 2.5234, 7.4931, 128),
    "xception": ArchitectureInfo(22_960_681, 82, _SEAA, 2.9560, 8.8612, 128),
}


@dataclass(frozen=True, slots=True)
class ModelStats:
    """What PRE measures on a model, per sample.

    Attributes:
        gflops_forward: Forward GFLOPs of one sample.
        gflops_train: Forward + backward GFLOPs of one sample.
        params: Parameters.
        layers: Modules owning parameters (see module docstring).
        activation_mb: Bytes autograd saves for backward per sample, in MB.

    """

    gflops_forward: float
    gflops_train: float
    params: int
    layers: int
    activation_mb: float


@dataclass(frozen=True, slots=True)
class JobDescription:
    """A training job as PRE sees it before it runs.

    Attributes:
        architecture: Name (torchvision model or a known/numbers-only name).
        batch_size: Samples per batch.
        training_size: Training samples per epoch.
        validation_size: Validation samples per epoch.
        image_height: Input height in pixels, if an image model.
        image_width: Input width in pixels, if an image model.
        planned_epochs: Epochs planned (for totals), if known.
        precision: ``fp32``, ``fp16``, ``bf16`` or ``amp``.
        gpu_count: GPUs the job uses on one node.
        gflops_forward: Forward GFLOPs per sample (measured when null).
        gflops_train: Training GFLOPs per sample (when null: measured, scaled to a given
            ``gflops_forward`` by the measured train/forward ratio, else 3x forward).
        params: Parameters (measured or looked up when null).
        layers: Layers with parameters (measured or looked up when null).
        activation_mb: Activation memory per sample in MB (may stay null).

    """

    architecture: str | None
    batch_size: int
    training_size: int
    validation_size: int = 0
    image_height: int | None = None
    image_width: int | None = None
    planned_epochs: int | None = None
    precision: str = "fp32"
    gpu_count: int = 1
    gflops_forward: float | None = None
    gflops_train: float | None = None
    params: float | None = None
    layers: int | None = None
    activation_mb: float | None = None


#: Columns of a feature row, in order. Nulls are allowed where a job does not say.
JOB_COLUMNS: tuple[str, ...] = (
    "gflops_forward",
    "gflops_train",
    "params",
    "layers",
    "activation_mb",
    "batch_size",
    "image_height",
    "image_width",
    "training_size",
    "validation_size",
    "gpu_count",
    "precision_bits",
    "batches_per_epoch",
    "tflop_per_epoch",
    "epochs",
)
GPU_COLUMNS: tuple[str, ...] = (
    "gpu_board_power_w",
    "gpu_memory_gb",
    "gpu_bandwidth_gbs",
    "gpu_sms",
    "gpu_cuda_cores",
    "gpu_fp32_tflops",
    "gpu_fp16_tflops",
    "gpu_generation",
)
#: Numeric model inputs (job then GPU).
FEATURES: tuple[str, ...] = JOB_COLUMNS + GPU_COLUMNS
_PRECISION_BITS = {"fp32": 32, "tf32": 32, "fp16": 16, "bf16": 16, "amp": 16, "fp64": 64}


def _count_layers(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))


def _conv_backward_flop(
    grad_out_shape: Any,
    x_shape: Any,
    w_shape: Any,
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: Any,
    output_mask: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    # torch's own formula ignores ``groups`` on the backward pass and counts a
    # depthwise convolution's gradients as if it were dense (MobileNetV2: 20x
    # forward). Each gradient of a convolution costs what its forward costs.
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return int(fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1]))))


def measure_module(
    model: torch.nn.Module, input_shape: tuple[int, ...], *, batch: int = 2
) -> ModelStats:
    """Measure FLOPs, parameters, layers and activation memory of a module on CPU.

    The input takes the dtype and device of the module's first floating
    parameter (a fp16 or bf16 module is measured as it is; its FLOPs are the
    fp32 module's, its activation memory in its own dtype).

    The module comes back as it was: a copy of it is run (a module that cannot
    be deep-copied is run itself, and its buffers, gradients and training
    modes are restored afterwards), so a pretrained model keeps its batch norm
    statistics.

    Args:
        model: The module; a copy of it is run once forward and backward in
            training mode on random input.
        input_shape: Shape of one sample, e.g. ``(3, 224, 224)``.
        batch: Samples in the measuring batch (2, so batch norm works); the
            figures are divided by it.

    Returns:
        Per-sample statistics.

    Raises:
        BadInputError: The module fails on an input of that shape.

    """
    try:
        scratch = copy.deepcopy(model)
    except Exception:  # e.g. torch.nn.utils.weight_norm's non-leaf weight
        log.debug("cannot copy %s to measure it: measuring it in place", type(model).__name__)
    else:
        return _measure(scratch, input_shape, batch)
    with _restored(model):
        return _measure(model, input_shape, batch)


@contextlib.contextmanager
def _restored(model: torch.nn.Module) -> Iterator[None]:
    """Restore the buffers, gradients and training modes of ``model`` on exit."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for p, grad in grads:
            p.grad = grad
        for m, training in modes:
            m.training = training


def _measure(model: torch.nn.Module, input_shape: tuple[int, ...], batch: int) -> ModelStats:
    """:func:`measure_module` on a module it may change (buffers, gradients, modes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    layers = _count_layers(model)
    # The input takes the dtype and device of the module's weights (a fp16 or bf16 module
    # fails on float32 input); FLOPs do not depend on the dtype.
    like = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    x = (
        torch.randn(batch, *input_shape)
        if like is None
        else torch.randn(batch, *input_shape, dtype=like.dtype, device=like.device)
    )
    saved: dict[int, int] = {}
    param_ptrs = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    model.train()
    try:
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(x)
        fix = {torch.ops.aten.convolution_backward: _conv_backward_flop}
        with FlopCounterMode(display=False, custom_mapping=fix) as full:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
            out = out[0] if isinstance(out, tuple | list) else out
            if not isinstance(out, torch.Tensor):
                out = next(iter(out.values()))  # torchvision dict outputs
            out.float().sum().backward()
    except Exception as err:  # any failure inside user code is bad input here
        raise BadInputError(
            f"model {type(model).__name__} failed on {x.dtype} input of shape "
            f"{(batch, *input_shape)} on {x.device}: {err}; pass the shape of one sample "
            "(channels, height, width)"
        ) from err
    return ModelStats(
        gflops_forward=fwd.get_total_flops() / batch / 1e9,
        gflops_train=full.get_total_flops() / batch / 1e9,
        params=int(params),
        layers=layers,
        activation_mb=sum(saved.values()) / batch / 1e6,
    )


def torchvision_names() -> list[str]:
    """Classification model names torchvision can build (sorted)."""
    from torchvision import models

    return sorted(models.list_models(module=models))


@functools.lru_cache(maxsize=64)
def measure_torchvision(name: str, image_height: int, image_width: int) -> ModelStats:
    """Build a torchvision classifier with ``weights=None`` and measure it.

    Raises:
        BadInputError: Unknown model name (the message lists known ones).

    """
    from torchvision import models

    names = torchvision_names()
    if name not in names:
        raise BadInputError(
            f"unknown architecture {name!r}: not a torchvision classification model and not in "
            f"the known numbers-only table {sorted(KNOWN_ARCHITECTURES)}; torchvision knows "
            f"{', '.join(names)}. Describe other models by numbers (--gflops, --layers)"
        )
    model = models.get_model(name, weights=None)  # built here: measured without a copy
    return _measure(model, (3, image_height, image_width), 2)


def complete_job(job: JobDescription) -> JobDescription:
    """Fill FLOPs, parameters and layers of a job: measured, looked up, or refused.

    Order: numbers given in the job win; then a torchvision model of that name
    is measured (needs the image size); then :data:`KNOWN_ARCHITECTURES`.
    Given forward FLOPs keep the measured train/forward ratio; ones that differ
    from the measured forward FLOPs are logged as a warning.

    Raises:
        BadInputError: A required number is missing and cannot be found, or a
            number (FLOPs, training TFLOPs per epoch, parameters, activation
            memory, image size) is not finite or out of range; the message names
            what is missing or wrong and what is known.

    """
    _check_positive(job)
    got = {f.name: getattr(job, f.name) for f in fields(job)}
    name = job.architecture
    info = KNOWN_ARCHITECTURES.get(name) if name is not None else None
    sized = job.image_height is not None and job.image_width is not None
    if (got["gflops_forward"] is None or got["layers"] is None) and name is not None:
        if sized and got["gflops_forward"] is None and info is not None and not _torchvision(name):
            # Known only from the table: its numbers hold at the table's size alone.
            if (job.image_height, job.image_width) != (info.image_size, info.image_size):
                raise BadInputError(
                    f"architecture {name!r} is known only at {info.image_size}x"
                    f"{info.image_size} ({info.source}); found image size "
                    f"{job.image_height}x{job.image_width}. Give gflops_forward for other sizes"
                )
            got["gflops_forward"] = info.gflops_forward
        elif sized and (
            got["gflops_forward"] is None
            or info is None
            # A torchvision model that the table also names (resnet50, vgg16,
            # mobilenet_v2) at other FLOPs or another size is torchvision's: measured,
            # so given FLOPs keep its train/forward ratio and get the GMAC warning.
            or (
                _torchvision(name)
                and not same_configuration(
                    info, got["gflops_forward"], job.image_height, job.image_width
                )
            )
        ):
            _check_measurable(name, job.image_height, job.image_width)
            stats = measure_torchvision(name, int(job.image_height or 0), int(job.image_width or 0))
            if got["gflops_forward"] is not None:
                got["gflops_train"] = _given_forward_train(job, stats)
            for k in ("gflops_forward", "gflops_train", "params", "layers", "activation_mb"):
                if got[k] is None:
                    got[k] = getattr(stats, k)
        elif info is None and not sized:
            raise BadInputError(
                f"architecture {name!r}: measuring FLOPs and layers needs image_height and "
                "image_width; found none. Give the image size, or gflops_forward and layers"
            )
    if info is not None:
        got["layers"] = got["layers"] if got["layers"] is not None else info.layers
        if same_configuration(info, got["gflops_forward"], got["image_height"], got["image_width"]):
            for k in ("gflops_train", "params"):
                got[k] = got[k] if got[k] is not None else getattr(info, k)
            if got["image_height"] is None and got["image_width"] is None:
                got["image_height"] = got["image_width"] = info.image_size
    missing = [k for k in ("gflops_forward", "layers") if got[k] is None]
    if missing and info is not None and got["gflops_forward"] is None and not sized:
        # The table's FLOPs hold at its image size only: ask for that size, not for the name.
        size = f"{info.image_size}x{info.image_size}"
        if _torchvision(str(name)):
            # An image size alone measures torchvision's model of that name, which is not the
            # table's (its own head; MobileNetV2 at full width: 0.198 GFLOPs at 128 px, not
            # the table's 0.0639): only the table's FLOPs reach the table's model.
            raise BadInputError(
                f"job {name}: architecture {name!r} is known at image size {size} (the SEAA "
                "2023 table: the Keras model that study trained); found no image size. An image "
                f"size alone (--image-size {info.image_size}) measures torchvision's {name}, "
                "another network; for the table's model give its FLOPs: --gflops "
                f"{info.gflops_forward:g} --image-size {info.image_size} (gflops_forward "
                f"{info.gflops_forward:g}, image_height and image_width {info.image_size})"
            )
        raise BadInputError(
            f"job {name}: architecture {name!r} is known at image size {size}; found no image "
            f"size. Give image_height and image_width {info.image_size} (--image-size "
            f"{info.image_size}) or gflops_forward (--gflops)"
        )
    if missing:
        raise BadInputError(
            f"job {name or '(unnamed)'}: missing {missing}; give them as numbers, or name a "
            f"torchvision model (with the image size) or one of {sorted(KNOWN_ARCHITECTURES)}"
        )
    label = f"job {name or '(unnamed)'}"
    if not is_number(got["gflops_forward"]):
        raise BadInputError(
            f"{label}: gflops_forward must be a finite number > 0; found {got['gflops_forward']!r}"
        )
    if not float(got["gflops_forward"]) > 0:
        raise BadInputError(
            f"{label}: gflops_forward must be > 0; found "
            f"{got['gflops_forward']!r} (a model whose layers the FLOP counter does not know "
            "measures 0: give the FLOPs as a number)"
        )
    derived = ""
    if got["gflops_train"] is None:
        got["gflops_train"] = TRAIN_FLOPS_FACTOR * float(got["gflops_forward"])
        derived = f" ({TRAIN_FLOPS_FACTOR:g} x gflops_forward {got['gflops_forward']!r})"
    elif job.gflops_train is None:  # scaled from the given forward FLOPs by the measured ratio
        derived = f" (scaled from gflops_forward {got['gflops_forward']!r})"
    if not (is_number(got["gflops_train"]) and float(got["gflops_train"]) > 0):
        raise BadInputError(
            f"{label}: gflops_train must be a finite number > 0; found "
            f"{got['gflops_train']!r}{derived}"
        )
    for k in ("params", "activation_mb"):
        if got[k] is not None and not (is_number(got[k]) and float(got[k]) >= 0):
            raise BadInputError(f"{label}: {k} must be a finite number >= 0; found {got[k]!r}")
    per_epoch = _tflop_per_epoch(
        float(got["gflops_train"]),
        float(got["gflops_forward"]),
        job.training_size,
        job.validation_size,
    )
    if not math.isfinite(per_epoch):
        raise BadInputError(
            f"{label}: training TFLOPs per epoch (gflops_train {got['gflops_train']!r} x "
            f"training_size {job.training_size!r} + gflops_forward {got['gflops_forward']!r} x "
            f"validation_size {job.validation_size!r}) must be a finite number; found {per_epoch!r}"
        )
    return JobDescription(**got)


def _tflop_per_epoch(gflops_train: float, gflops_forward: float, train: float, val: float) -> float:
    """Training TFLOPs of one epoch: training samples forward and backward, validation forward."""
    return (gflops_train * float(train) + gflops_forward * float(val)) / 1e3


def _given_forward_train(job: JobDescription, stats: ModelStats) -> float | None:
    """Training GFLOPs of a job that gives its forward GFLOPs, its model measured as ``stats``.

    The measured train/forward ratio applied to the given forward FLOPs
    (:data:`TRAIN_FLOPS_FACTOR` if the counter measured none), or the job's own
    training FLOPs if it gives them. Warns when the given forward FLOPs are not
    the measured ones of the same model and image size (often a figure in
    multiply-adds).
    """
    given = float(job.gflops_forward or 0.0)
    measured = stats.gflops_forward
    if measured > 0 and not same_flops(given, measured):
        log.warning(
            "job %s: gflops_forward %.4g given, but %s at %sx%s measures %.4g GFLOPs per sample "
            "(more than %.0f%% apart); wattwise counts one multiply-add as 2 FLOPs (ResNet50 at "
            "224 px is 8.2 GFLOPs, often quoted as 4.1 GMACs). Training FLOPs are scaled from "
            "the given figure",
            job.architecture,
            given,
            job.architecture,
            job.image_height,
            job.image_width,
            measured,
            100 * SAME_CONFIG_TOLERANCE,
        )
    if job.gflops_train is not None:
        return job.gflops_train
    ratio = stats.gflops_train / measured if measured > 0 else TRAIN_FLOPS_FACTOR
    return ratio * given


def _torchvision(name: str) -> bool:
    """Whether torchvision can build a classification model of this name."""
    return name in torchvision_names()


#: Largest image side measured by running the model on CPU (as the HTTP API's cap): a
#: 2048 px ResNet50 pass needs more than 14 GB and minutes.
MAX_MEASURED_IMAGE_SIDE = 1024


def _check_measurable(name: str, height: Any, width: Any) -> None:
    """Refuse to measure ``name`` on an input larger than :data:`MAX_MEASURED_IMAGE_SIDE`.

    Raises:
        BadInputError: An image side above the cap; the message says what to give instead.

    """
    big = [v for v in (height, width) if is_number(v) and float(v) > MAX_MEASURED_IMAGE_SIDE]
    if big:
        raise BadInputError(
            f"architecture {name!r}: measuring FLOPs runs the model once on this CPU, up to "
            f"{MAX_MEASURED_IMAGE_SIDE} px a side; found image size {height}x{width}. Give "
            "gflops_forward and layers for larger inputs (convolutional FLOPs grow with the "
            "pixel count)"
        )


def same_configuration(
    info: ArchitectureInfo,
    gflops_forward: float | None,
    image_height: int | None = None,
    image_width: int | None = None,
) -> bool:
    """Whether a job is the configuration ``info`` describes.

    Only FLOPs identify the configuration: a job without them is not taken
    to be it (its image size and width are unknown). A job that names an
    image size other than the table's is another configuration.

    Args:
        info: The table entry.
        gflops_forward: The job's forward GFLOPs per sample, if known.
        image_height: The job's input height, if given.
        image_width: The job's input width, if given.

    Returns:
        True when the FLOPs are within :data:`SAME_CONFIG_TOLERANCE` of the
        table's and no other image size is given.

    """
    if gflops_forward is None or info.gflops_forward is None:
        return False
    for side in (image_height, image_width):
        if side is not None and info.image_size is not None and int(side) != info.image_size:
            return False
    return same_flops(float(gflops_forward), info.gflops_forward)


def same_flops(gflops: float, reference: float) -> bool:
    """Whether ``gflops`` is within :data:`SAME_CONFIG_TOLERANCE` of ``reference`` (> 0)."""
    return reference > 0 and abs(gflops / reference - 1.0) <= SAME_CONFIG_TOLERANCE


def is_number(v: object) -> TypeGuard[numbers.Real]:
    """Whether ``v`` is a finite real number (numpy scalars included; not a bool or a string)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_positive(job: JobDescription) -> None:
    """Refuse a job whose counts are not numbers in range (the message names the field)."""
    name = job.architecture
    for k in ("batch_size", "training_size", "gpu_count"):
        v = getattr(job, k)
        if not (is_number(v) and float(v) > 0):
            raise BadInputError(f"job {name}: {k} must be a number > 0; found {v!r}")
    if not (is_number(job.validation_size) and float(job.validation_size) >= 0):
        raise BadInputError(
            f"job {name}: validation_size must be a number >= 0; found {job.validation_size!r}"
        )
    # Optional: a job need not plan its epochs or know its depth, but given ones must make sense
    # (0 epochs used to be computed as 1, negative ones gave negative energies).
    epochs = job.planned_epochs
    if epochs is not None and not (
        is_number(epochs) and float(epochs) > 0 and float(epochs).is_integer()
    ):
        raise BadInputError(f"job {name}: planned_epochs must be an integer > 0; found {epochs!r}")
    for k in ("image_height", "image_width"):
        v = getattr(job, k)
        if v is not None and not (is_number(v) and float(v) > 0):
            raise BadInputError(f"job {name}: {k} must be a number > 0 (pixels); found {v!r}")
    if job.layers is not None and not (is_number(job.layers) and float(job.layers) > 0):
        raise BadInputError(
            f"job {name}: layers (with parameters) must be a number > 0; found {job.layers!r}"
        )
    if job.precision not in _PRECISION_BITS:
        raise BadInputError(
            f"job {name}: precision must be one of {sorted(_PRECISION_BITS)}; "
            f"found {job.precision!r}"
        )


def gpu_features(gpu: Any) -> dict[str, float | None]:
    """The GPU columns of a feature row from a spec (see :mod:`estimators.gpus`) or a name.

    Args:
        gpu: A GPU name as ``nvidia-smi`` prints it, a spec object of
            :mod:`estimators.gpus`, or a mapping with the keys of
            :data:`GPU_COLUMNS` (a user-described GPU).

    Raises:
        BadInputError: Unknown GPU name, or a mapping missing board power or
            FP32 TFLOPS, or with a value that is not a number > 0 (the
            generation: a name of :data:`GENERATIONS` or its index).

    """
    if isinstance(gpu, Mapping):
        out = user_gpu_columns(gpu)
        missing = [k for k in ("gpu_board_power_w", "gpu_fp32_tflops") if out[k] is None]
        if missing:
            raise BadInputError(
                f"user-described GPU: missing {missing}; expected keys {list(GPU_COLUMNS)}"
            )
        return out
    from estimators import gpus

    spec = gpus.lookup(gpu) if isinstance(gpu, str) else gpu
    return _spec_columns(spec)


def user_gpu_columns(gpu: Mapping[str, Any]) -> dict[str, float | None]:
    """The :data:`GPU_COLUMNS` of a user-described GPU, each checked (absent ones are null).

    Args:
        gpu: A mapping with some keys of :data:`GPU_COLUMNS` (others are ignored).

    Returns:
        Column -> value (``gpu_generation`` as its index in :data:`GENERATIONS`).

    Raises:
        BadInputError: A value that is not a number > 0 (a generation: not one of
            :data:`GENERATIONS` nor a whole index into it); the message names the key.

    """
    return {k: _user_gpu_value(k, gpu.get(k)) for k in GPU_COLUMNS}


def _user_gpu_value(key: str, value: object) -> float | None:
    """One column of a user-described GPU, checked: a number > 0, or a generation name."""
    if value is None:
        return None
    if key == "gpu_generation":
        # The GPU table's form ("ampere") or its index in GENERATIONS.
        gen = _generation_number(value) if isinstance(value, str) else value
        if not (is_number(gen) and float(gen).is_integer() and 0 <= float(gen) < len(GENERATIONS)):
            raise BadInputError(
                f"user-described GPU: {key}: expected a generation name (one of "
                f"{list(GENERATIONS)}) or its index 0-{len(GENERATIONS) - 1}; found {value!r}"
            )
        return float(gen)
    if not (is_number(value) and float(value) > 0):
        raise BadInputError(f"user-described GPU: {key}: expected a number > 0; found {value!r}")
    return float(value)


def _spec_columns(spec: Any) -> dict[str, float | None]:
    def num(*names: str) -> float | None:
        for n in names:
            v = getattr(spec, n, None)
            if v is not None:
                return float(v)
        return None

    gen = getattr(spec, "generation", None) or getattr(spec, "architecture", None)
    return {
        "gpu_board_power_w": num("board_power_w", "tdp_w"),
        "gpu_memory_gb": num("memory_gb", "memory_gib"),
        "gpu_bandwidth_gbs": num("bandwidth_gbs", "memory_bandwidth_gbs"),
        "gpu_sms": num("sms", "sm_count"),
        "gpu_cuda_cores": num("cuda_cores"),
        "gpu_fp32_tflops": num("fp32_tflops"),
        "gpu_fp16_tflops": num("fp16_tflops"),
        "gpu_generation": _generation_number(gen),
    }


#: NVIDIA architecture generations in order (numeric feature: later = newer).
GENERATIONS: tuple[str, ...] = (
    "kepler",
    "maxwell",
    "pascal",
    "volta",
    "turing",
    "ampere",
    "ada",
    "hopper",
    "blackwell",
)


def _generation_number(gen: object) -> float | None:
    if gen is None:
        return None
    if isinstance(gen, int | float):
        return float(gen)
    text = str(getattr(gen, "value", gen)).lower()
    for i, g in enumerate(GENERATIONS):
        if g in text:
            return float(i)
    return None


def job_row(job: JobDescription) -> dict[str, Any]:
    """The job part of a feature row (complete the job first)."""
    bs = int(job.batch_size)
    train, val = int(job.training_size), int(job.validation_size)
    assert job.gflops_forward is not None and job.gflops_train is not None
    return {
        "architecture": job.architecture,
        "gflops_forward": float(job.gflops_forward),
        "gflops_train": float(job.gflops_train),
        "params": None if job.params is None else float(job.params),
        "layers": None if job.layers is None else float(job.layers),
        "activation_mb": job.activation_mb,
        "batch_size": float(bs),
        "image_height": None if job.image_height is None else float(job.image_height),
        "image_width": None if job.image_width is None else float(job.image_width),
        "training_size": float(train),
        "validation_size": float(val),
        "gpu_count": float(job.gpu_count),
        "precision_bits": float(_PRECISION_BITS[job.precision]),
        "batches_per_epoch": float(math.ceil(train / bs) + math.ceil(val / bs)),
        # Training samples pass forward and backward, validation samples forward only.
        "tflop_per_epoch": _tflop_per_epoch(job.gflops_train, job.gflops_forward, train, val),
        # The run's length: per-epoch energy is an average over the run, and schedules
        # (frozen-base epochs first, warm-up, one-off start-up costs) make it depend on it.
        "epochs": None if job.planned_epochs is None else float(job.planned_epochs),
    }


def feature_frame(pairs: Iterable[tuple[JobDescription, Any]]) -> pl.DataFrame:
    """Feature rows for (job, GPU) pairs; jobs are completed (measured) first.

    Returns:
        One row per pair: ``architecture``, ``gpu_model`` and :data:`FEATURES`.

    """
    rows = []
    for job, gpu in pairs:
        full = complete_job(job)
        row = job_row(full)
        row["gpu_model"] = spec_name(gpu) if isinstance(gpu, Mapping) else gpu_key(gpu)
        row.update(gpu_features(gpu))
        rows.append(row)
    return _frame(rows)


def gpu_key(gpu: Any) -> str:
    """A GPU's name: the table's canonical name, else the user's name (for placement).

    PRE files a GPU described by numbers under :func:`spec_name`, which tells
    apart specs of one name but other numbers.

    Raises:
        BadInputError: An unknown GPU name.

    """
    if isinstance(gpu, Mapping):
        return str(gpu.get("name") or gpu.get("gpu_model") or "user-described GPU")
    if isinstance(gpu, str):
        from estimators import gpus

        return gpus.lookup(gpu).name
    return str(getattr(gpu, "name", gpu))


def spec_name(spec: Mapping[str, Any], fallback: str | None = None) -> str:
    """The name PRE files a GPU described by numbers under: its name and a digest of its numbers.

    PRE's prior pools runs per ``gpu_model``, so two specs with other numbers
    must not share a name, nor may a spec share a GPU table name: the digest
    of the spec's :data:`GPU_COLUMNS` (as :func:`user_gpu_columns` checks them,
    so ``200`` and ``200.0`` are one GPU) follows the name, e.g.
    ``"cpu-eco (modelled CPU) [spec 1f0c2a9e]"``.

    Args:
        spec: A user-described GPU (keys of :data:`GPU_COLUMNS`, optional ``name``).
        fallback: The name of a spec without ``name`` or ``gpu_model`` (a run's own
            ``gpu_model``); without it, ``"user-described GPU"``.

    Raises:
        BadInputError: A value of the spec is not a number > 0 (see :func:`user_gpu_columns`).

    """
    numbers_ = json.dumps(user_gpu_columns(spec), sort_keys=True)
    digest = hashlib.sha256(numbers_.encode()).hexdigest()[:8]
    base = spec.get("name") or spec.get("gpu_model") or fallback or "user-described GPU"
    return f"{base} [spec {digest}]"


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    sch: dict[str, pl.DataType] = {"architecture": pl.String(), "gpu_model": pl.String()}
    sch.update({c: pl.Float64() for c in FEATURES})
    return pl.DataFrame(rows, schema=sch, orient="row") if rows else pl.DataFrame(schema=sch)


#: Columns a runs file (shared layout or the store's runs table) must have for training.
RUN_NEEDS: tuple[str, ...] = (
    "run_id",
    "gpu_model",
    "architecture",
    "batch_size",
    "training_size",
    "gflops_forward",
)


def runs_features(
    runs: pl.DataFrame,
    *,
    file: str | None = None,
    with_truth: bool = True,
    planned_rows: bool = False,
) -> pl.DataFrame:
    """Feature rows (and truths) for runs in the shared layout or the store's runs table.

    Truth per run: ``epoch_energy_j`` = ``gpu_energy_j`` (else ``energy_j``)
    / ``trained_epochs`` and ``epoch_time_s`` = ``duration_s`` / ``trained_epochs``.
    Image size, precision and GPU count come from the columns when present,
    else from the store's ``config`` JSON, else stay null / fp32 / 1. Board
    power is the spec's (a configured power limit in the runs is ignored: it
    made leave-one-architecture-out worse on the shared runs). The ``epochs``
    feature is ``trained_epochs`` (the run's length, which the per-epoch truth
    averages over), else ``planned_epochs`` (column, else ``config`` JSON),
    else null; the one used must be a whole number > 0 (``42.0`` is taken as
    42; a fraction, 0, a negative, NaN, inf or a string is refused). Counts
    (``batch_size``, ``training_size``, ``validation_size``, ``gpu_count``)
    must be whole numbers (a float column's ``32.0`` is 32; NaN is refused),
    truths finite numbers > 0. A GPU described by its numbers (``config``'s
    ``gpu_spec``) is filed under :func:`spec_name` (named after the run's
    ``gpu_model`` when the spec has no name).

    Args:
        runs: The runs.
        file: Their file, for messages.
        with_truth: Require and compute the truth columns.
        planned_rows: With ``with_truth``, a row whose truth columns are all
            null is a planned job: its truths are null, not refused (a row with
            some of them null is still refused).

    Returns:
        ``run_id``, ``architecture``, ``gpu_model``, :data:`FEATURES` and,
        with truth, ``epoch_energy_j`` and ``epoch_time_s``.

    Raises:
        BadInputError: A needed column is missing, a value is null, not
            positive or not finite, a count is not a whole number, the run
            length used (``trained_epochs``, else ``planned_epochs``) is not a
            whole number > 0, an architecture lacks layers, or a GPU is
            unknown. The message names the file, row, column and value.

    """
    need = list(RUN_NEEDS)
    energy_col = "gpu_energy_j" if "gpu_energy_j" in runs.columns else "energy_j"
    if with_truth:
        need += [energy_col, "trained_epochs", "duration_s"]
    missing = [c for c in need if c not in runs.columns]
    if missing:
        raise BadInputError(
            f"{where(file)}runs need column(s) {missing}; found {runs.columns}. Expected the "
            "shared runs layout (run_id, gpu_model, architecture, batch_size, training_size, "
            "validation_size, gflops_forward, trained_epochs, duration_s, gpu_energy_j)"
        )
    # By the run's GPU name, or by a spec's numbers and the run's name (see spec_name).
    gpu_cache: dict[tuple[str, ...], dict[str, Any]] = {}
    rows = []
    for i, r in enumerate(runs.iter_rows(named=True), start=1):
        cfg = _config(r.get("config"))

        def pick(key: str, r: dict[str, Any] = r, cfg: dict[str, Any] = cfg) -> Any:
            v = r.get(key)
            return cfg.get(key) if v is None else v

        truth_keys = (energy_col, "trained_epochs", "duration_s")
        planned = planned_rows and with_truth and all(r.get(k) is None for k in truth_keys)
        for k in need:
            if r.get(k) is None and not (planned and k in truth_keys):
                raise BadInputError(
                    f"{where(file, i, repr(k))}run {r.get('run_id')!r}: expected a value; "
                    "found null"
                )
        # The run's length as a feature: the epochs it trained (what the per-epoch truth
        # averages over), else the epochs it planned, else unknown (null). A count that is
        # not a whole number > 0 is refused, not taken as unknown.
        ep_feature = r.get("trained_epochs")
        ep_label = "'trained_epochs'"
        if ep_feature is None:
            ep_feature = pick("planned_epochs")
            in_column = r.get("planned_epochs") is not None
            ep_label = "'planned_epochs'" if in_column else "config 'planned_epochs'"
        if ep_feature is not None and not is_epoch_count(ep_feature):
            raise BadInputError(
                f"{where(file, i, ep_label)}run {r['run_id']!r}: expected a whole number of "
                f"epochs > 0 (or null: unknown); found {ep_feature!r}"
            )

        def count(key: str, r: dict[str, Any] = r, i: int = i) -> int | None:
            # A count as an int, null if unset; NaN (a missing integer in a float column of a
            # pandas-written file), inf or a fraction is refused, not truncated.
            v = pick(key)
            if v is None:
                return None
            if not _whole(v):
                label = repr(key) if r.get(key) is not None else f"config {key!r}"
                raise BadInputError(
                    f"{where(file, i, label)}run {r['run_id']!r}: expected a whole number; "
                    f"found {v!r}"
                )
            return int(float(v))

        job = JobDescription(
            architecture=r["architecture"],
            batch_size=int(count("batch_size") or 0),
            training_size=int(count("training_size") or 0),
            validation_size=count("validation_size") or 0,
            image_height=pick("image_height"),
            image_width=pick("image_width"),
            precision=str(pick("precision") or "fp32"),
            gpu_count=count("gpu_count") or 1,
            gflops_forward=float(r["gflops_forward"]),
            gflops_train=pick("gflops_train"),
            params=pick("params"),
            layers=pick("layers"),
            activation_mb=pick("activation_mb"),
            planned_epochs=None if ep_feature is None else int(float(ep_feature)),
        )
        try:
            row = job_row(complete_job(job))
            spec = cfg.get("gpu_spec")  # a device described by its numbers (see gpu_features)
            gm = str(r["gpu_model"])
            if isinstance(spec, Mapping):
                key: tuple[str, ...] = ("spec", json.dumps(spec, sort_keys=True, default=str), gm)
                if key not in gpu_cache:
                    gpu_cache[key] = {**gpu_features(spec), "gpu_model": spec_name(spec, gm)}
            else:
                key = ("name", gm)
                if key not in gpu_cache:
                    gpu_cache[key] = {**gpu_features(gm), "gpu_model": gpu_key(gm)}
        except BadInputError as err:
            raise BadInputError(f"{where(file, i)}run {r['run_id']!r}: {err}") from err
        row.update(gpu_cache[key])
        row["run_id"] = r["run_id"]
        if planned:
            row["epoch_energy_j"] = row["epoch_time_s"] = None
        elif with_truth:
            for k in ("trained_epochs", energy_col, "duration_s"):
                if not (is_number(r[k]) and float(r[k]) > 0):
                    raise BadInputError(
                        f"{where(file, i, repr(k))}run {r['run_id']!r}: expected a finite "
                        f"number > 0; found {r[k]!r}"
                    )
            ep = float(r["trained_epochs"])
            row["epoch_energy_j"] = float(r[energy_col]) / ep
            row["epoch_time_s"] = float(r["duration_s"]) / ep
        rows.append(row)
    df = _frame([{k: v for k, v in r.items() if k not in ("run_id",)} for r in rows])
    extra = {"run_id": pl.Series([r["run_id"] for r in rows], dtype=pl.String)}
    if with_truth:
        extra["epoch_energy_j"] = pl.Series([r["epoch_energy_j"] for r in rows], dtype=pl.Float64)
        extra["epoch_time_s"] = pl.Series([r["epoch_time_s"] for r in rows], dtype=pl.Float64)
    return df.with_columns(**extra).select("run_id", *df.columns, *list(extra)[1:])


def _whole(v: object) -> TypeGuard[numbers.Real]:
    """Whether ``v`` is a finite whole number (``32`` or ``32.0``; not NaN, inf or ``32.5``)."""
    return is_number(v) and float(v).is_integer()


def is_epoch_count(v: object) -> bool:
    """Whether ``v`` is a number of epochs: a finite whole number > 0 (``42`` or ``42.0``)."""
    return _whole(v) and float(v) > 0


def _config(raw: object) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        val = json.loads(str(raw))
    except json.JSONDecodeError:
        return {}
    return val if isinstance(val, dict) else {}
