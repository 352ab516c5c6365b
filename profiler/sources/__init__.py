"""Power sources: one module per backend, one registry line each.

A new source is a new module with a class following
:class:`profiler.sources.base.PowerSource` plus one line in :data:`REGISTRY`;
nothing else changes. Backends are imported on first use so the CLI and the
sidecar start fast and a node without ``pynvml`` can still use RAPL.
"""

from __future__ import annotations

import importlib
from typing import Any

from profiler.errors import BadInputError
from profiler.sources.base import PowerSample, PowerSource, samples_frame, utc_now

#: Source name -> "module:Class".
REGISTRY: dict[str, str] = {
    "nvml": "profiler.sources.nvml:NvmlSource",
    "dcgm": "profiler.sources.dcgm:DcgmPrometheusSource",
    "dcgm-exporter": "profiler.sources.dcgm:DcgmExporterSource",
    "rapl": "profiler.sources.rapl:RaplSource",
    "replay": "profiler.sources.replay:ReplaySource",
    "modelled": "profiler.sources.modelled:ModelledCpuSource",
    "process": "profiler.sources.process:ProcessCpuSource",
}


def source_class(name: str) -> type[Any]:
    """The class registered under ``name``.

    Raises:
        BadInputError: No source has that name.

    """
    try:
        target = REGISTRY[name]
    except KeyError:
        raise BadInputError(
            f"unknown power source {name!r}; expected one of {sorted(REGISTRY)}"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def open_source(name: str, *args: Any, **kwargs: Any) -> PowerSource:
    """Open the source registered under ``name`` with the given arguments."""
    return source_class(name)(*args, **kwargs)  # type: ignore[no-any-return]


__all__ = [
    "REGISTRY",
    "PowerSample",
    "PowerSource",
    "open_source",
    "samples_frame",
    "source_class",
    "utc_now",
]
