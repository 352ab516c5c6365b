"""NVML source: NVIDIA GPU energy counters (Volta and newer) or power, through ``pynvml``.

NVML reports power in mW and the total-energy counter in mJ; both are
converted to W and J here, once. ``pynvml.NVMLError`` is mapped at this
boundary (always ``raise ... from err``)::

    NVMLError_LibraryNotFound, DriverNotLoaded  -> SourceUnavailableError
    NVMLError_NoPermission                      -> PermissionDeniedError
    NVMLError_NotSupported                      -> NotSupportedError
    any other NVMLError                         -> SourceUnavailableError

MIG: NVML measures power and energy per physical GPU only. A GPU in MIG mode
is reported as the whole GPU (shared by all its instances) with a warning;
asking for a MIG instance (a ``MIG-...`` id) is refused with
``NotSupportedError``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from profiler.errors import (
    NotSupportedError,
    PermissionDeniedError,
    SourceUnavailableError,
    WattwiseError,
)
from profiler.sources.base import PowerSample, utc_now

log = logging.getLogger(__name__)
T = TypeVar("T")


def nvml_error(err: Exception, what: str) -> WattwiseError:
    """The wattwise error for an ``NVMLError`` raised while doing ``what``."""
    import pynvml

    msg = f"NVML: {what} failed: {err}"
    if isinstance(err, pynvml.NVMLError_LibraryNotFound):
        return SourceUnavailableError(
            f"{msg}; the NVIDIA driver library libnvidia-ml.so is not installed or not on the "
            "library path: install the NVIDIA driver, or choose another source (--source replay "
            "on machines without a GPU)"
        )
    if isinstance(err, pynvml.NVMLError_DriverNotLoaded):
        return SourceUnavailableError(
            f"{msg}; the NVIDIA kernel driver is not loaded (is there a GPU? try `nvidia-smi`)"
        )
    if isinstance(err, pynvml.NVMLError_NoPermission):
        return PermissionDeniedError(
            f"{msg}; the driver refuses this user: run as a user with access to /dev/nvidia*"
        )
    if isinstance(err, pynvml.NVMLError_NotSupported):
        return NotSupportedError(f"{msg}; this GPU or driver does not support it")
    return SourceUnavailableError(msg)


def _call(what: str, fn: Callable[..., T], *args: Any) -> T:
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        raise nvml_error(err, what) from err


def _text(x: str | bytes) -> str:
    return x.decode() if isinstance(x, bytes) else x


@dataclass(slots=True)
class _Gpu:
    """One GPU handle and what it supports (mutable: optional readings switch off)."""

    index: int
    handle: Any
    model: str
    uuid: str
    counter: bool
    mig: bool
    extras: bool = True
    failing: bool = False  # its last read raised; logged once until it reads again


class NvmlSource:
    """Every visible NVIDIA GPU (or those chosen), read through NVML.

    Each reading has the power in W (``nvmlDeviceGetPowerUsage``) and, on
    Volta and newer, the total-energy counter in J
    (``nvmlDeviceGetTotalEnergyConsumption``), plus utilisation, memory and
    temperature where the GPU reports them.

    Args:
        indices: GPU indices to read; ``None`` for all. ``MIG-...`` ids are refused.
        use_counter: ``None`` uses the energy counter where supported; ``False``
            never reads it (power only).

    Raises:
        SourceUnavailableError: No NVML library or driver, or no GPU.
        PermissionDeniedError: The driver refuses access.
        NotSupportedError: A MIG instance was asked for.

    """

    name = "nvml"

    def __init__(
        self, indices: Sequence[int | str] | None = None, *, use_counter: bool | None = None
    ) -> None:
        import pynvml

        for i in indices or ():
            if isinstance(i, str) and i.startswith("MIG-"):
                raise NotSupportedError(
                    f"NVML: asked for MIG instance {i!r}; NVML measures power and energy per "
                    "physical GPU only, so a MIG instance cannot be measured on its own: give "
                    "the parent GPU's index instead (its figures cover all of its instances)"
                )
        _call("initialising NVML (nvmlInit)", pynvml.nvmlInit)
        self._open = True
        try:
            count = _call("counting GPUs", pynvml.nvmlDeviceGetCount)
            if count == 0:
                raise SourceUnavailableError("NVML: the driver is loaded but sees no GPU")
            chosen = list(range(count)) if indices is None else [int(i) for i in indices]
            bad = [i for i in chosen if not 0 <= i < count]
            if bad:
                raise SourceUnavailableError(
                    f"NVML: expected GPU indices in 0..{count - 1}; found {bad}"
                )
            self._gpus = [self._open_gpu(i, use_counter) for i in chosen]
        except BaseException:
            self.close()
            raise
        self.devices = [str(g.index) for g in self._gpus]
        # Ray may name a job's GPUs by UUID: the sidecar maps them to these device ids.
        self.device_aliases = {g.uuid: str(g.index) for g in self._gpus}

    @staticmethod
    def _open_gpu(index: int, use_counter: bool | None) -> _Gpu:
        import pynvml

        h = _call(f"opening GPU {index}", pynvml.nvmlDeviceGetHandleByIndex, index)
        model = _text(_call(f"reading the name of GPU {index}", pynvml.nvmlDeviceGetName, h))
        uuid = _text(_call(f"reading the UUID of GPU {index}", pynvml.nvmlDeviceGetUUID, h))
        mig = False
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(h)
            mig = current == pynvml.NVML_DEVICE_MIG_ENABLE
        except pynvml.NVMLError:
            pass  # pre-Ampere GPUs have no MIG at all
        if mig:
            log.warning(
                "GPU %d (%s) is in MIG mode: NVML reports power and energy for the whole GPU, "
                "shared by all its MIG instances; wattwise attributes them to the GPU",
                index,
                model,
            )
        counter = False
        if use_counter is not False:
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
                counter = True
            except pynvml.NVMLError_NotSupported:
                log.info("GPU %d (%s) has no energy counter (pre-Volta); using power", index, model)
            except pynvml.NVMLError as err:
                raise nvml_error(err, f"reading the energy counter of GPU {index}") from err
        return _Gpu(index, h, model, uuid, counter, mig)

    def read(self) -> list[PowerSample]:
        """One sample per GPU: power in W, energy counter in J where supported.

        A GPU whose NVML reading fails (``NVMLError_GpuIsLost`` after an Xid 79,
        say) gets a sample with null power and counter and a note naming the
        error, so the other GPUs keep their measurements; the failure is logged
        once, and again when the GPU reads again.

        Raises:
            WattwiseError: Every GPU failed; the error is the first GPU's, so the
                sidecar's handling of a failed source applies.

        """
        out: list[PowerSample] = []
        failed: list[tuple[_Gpu, WattwiseError]] = []
        for g in self._gpus:
            try:
                out.append(self._read_gpu(g))
            except WattwiseError as err:
                failed.append((g, err))
                out.append(
                    PowerSample(
                        device=str(g.index),
                        model=g.model,
                        timestamp=utc_now(),
                        power_w=None,
                        energy_j=None,
                        source="nvml",
                        note=str(err),
                    )
                )
        if failed and len(failed) == len(self._gpus):
            raise failed[0][1]
        bad = {id(g) for g, _ in failed}
        for g, error in failed:
            if not g.failing:
                log.warning(
                    "GPU %d (%s): %s; its samples are stored with null power and counter "
                    "until it reads again",
                    g.index,
                    g.model,
                    error,
                )
            g.failing = True
        for g in self._gpus:
            if g.failing and id(g) not in bad:
                g.failing = False
                log.info("GPU %d (%s): NVML readings are good again", g.index, g.model)
        return out

    @staticmethod
    def _read_gpu(g: _Gpu) -> PowerSample:
        """One GPU's sample.

        Raises:
            WattwiseError: NVML failed to give its power or counter.

        """
        import pynvml

        h = g.handle
        energy_j = None
        if g.counter:
            energy_j = (
                _call(
                    f"reading the energy counter of GPU {g.index}",
                    pynvml.nvmlDeviceGetTotalEnergyConsumption,
                    h,
                )
                / 1000.0
            )
        power_w = (
            _call(f"reading the power of GPU {g.index}", pynvml.nvmlDeviceGetPowerUsage, h) / 1000.0
        )
        ts = utc_now()
        util = mem_util = mem_mib = temp = None
        if g.extras:
            try:
                rates = pynvml.nvmlDeviceGetUtilizationRates(h)
                util, mem_util = float(rates.gpu), float(rates.memory)
                mem_mib = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                temp = float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            except pynvml.NVMLError_NotSupported:
                g.extras = False  # MIG and some boards refuse these; stop asking
            except pynvml.NVMLError as err:
                log.debug("GPU %d: optional readings failed: %s", g.index, err)
        return PowerSample(
            device=str(g.index),
            model=g.model,
            timestamp=ts,
            power_w=power_w,
            energy_j=energy_j,
            gpu_util_pct=util,
            mem_util_pct=mem_util,
            mem_used_mib=mem_mib,
            temp_c=temp,
            source="nvml",
        )

    def close(self) -> None:
        """Shut NVML down (once)."""
        import pynvml

        if getattr(self, "_open", False):
            self._open = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as err:
                log.debug("nvmlShutdown failed: %s", err)
