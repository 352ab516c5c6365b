"""The power-source interface: a ``PowerSource`` protocol, its ``PowerSample`` and shared helpers.

Every backend (``nvml``, ``dcgm``, ``rapl``, ``replay``, ``modelled``) lives in
its own module beside this one and converts its native units (NVML mW and mJ,
RAPL µJ, DCGM mJ) to watts and joules once, inside the source. Errors raised by
sources come from :mod:`profiler.errors`::

    WattwiseError
    ├── SourceUnavailableError   library, driver, sysfs tree or server not there
    ├── NotSupportedError        the device lacks the asked-for measurement (MIG, counters)
    └── PermissionDeniedError    the OS or driver refuses access (RAPL as non-root)

Bad readings (negative or non-finite power, a counter going backwards) are not
errors: :class:`SampleGuard` marks the sample (the value becomes null, nothing
is invented) and logs once per incident.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

import polars as pl

from profiler.schema import conform

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PowerSample:
    """One reading of one device.

    Attributes:
        device: Device id on its node ("0" for GPU 0, "package-0" for a CPU socket).
        model: Device model, e.g. "NVIDIA H100 80GB HBM3"; ``None`` when unknown.
        timestamp: When the reading was taken, timezone-aware UTC.
        power_w: Power draw in W; ``None`` when the source gave none or the value was bad.
        energy_j: Cumulative energy counter in J where the hardware has one, else ``None``.
        gpu_util_pct: Utilisation in percent (0-100).
        mem_util_pct: Memory-controller utilisation in percent (0-100).
        mem_used_mib: Device memory in use in MiB.
        temp_c: Temperature in degrees Celsius.
        source: Which source produced it: one of ``profiler.schema.SOURCES``.
        note: Why a value is missing (a bad reading, a timeout); not stored.

    """

    device: str
    model: str | None
    timestamp: datetime
    power_w: float | None
    energy_j: float | None = None
    gpu_util_pct: float | None = None
    mem_util_pct: float | None = None
    mem_used_mib: float | None = None
    temp_c: float | None = None
    source: str = "replay"
    note: str | None = None


@runtime_checkable
class PowerSource(Protocol):
    """Anything that can be read for power samples.

    Attributes:
        name: The ``source`` label its samples carry (``nvml``, ``rapl``, ...).

    """

    name: str

    def read(self) -> list[PowerSample]:
        """Samples taken since the previous call: usually one per device, possibly several.

        Raises:
            WattwiseError: The source failed; the sidecar logs it and goes on.

        """
        ...

    def close(self) -> None:
        """Release the library, files or connections the source holds."""
        ...


class UtcClock:
    """UTC wall time that never goes backwards.

    The wall clock is read once at construction; later times add the elapsed
    ``time.monotonic()``, so an NTP step or a manual clock change can neither
    reorder samples nor stretch the intervals energy is integrated over.
    """

    __slots__ = ("_wall0", "_mono0")

    def __init__(self) -> None:
        self._wall0 = datetime.now(UTC)
        self._mono0 = time.monotonic()

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        return self._wall0 + timedelta(seconds=time.monotonic() - self._mono0)


#: One process-wide clock, so samples of every source share a time base.
CLOCK = UtcClock()


def utc_now() -> datetime:
    """Monotonic-safe UTC now (see :class:`UtcClock`)."""
    return CLOCK.now()


_FRAME_FIELDS = (
    "device",
    "model",
    "timestamp",
    "power_w",
    "energy_j",
    "gpu_util_pct",
    "mem_util_pct",
    "mem_used_mib",
    "temp_c",
    "source",
)


def samples_frame(
    samples: Sequence[PowerSample],
    *,
    node: str,
    run_id: str | None = None,
    run_ids: Sequence[str | None] | None = None,
) -> pl.DataFrame:
    """Turn samples into a frame in the store's ``samples`` schema.

    Args:
        samples: Readings, any order.
        node: Host name the samples were taken on.
        run_id: Run they belong to, or ``None`` while unassigned.
        run_ids: The run of each sample (same length as ``samples``); overrides ``run_id``.

    Returns:
        A frame with exactly the ``samples`` columns, sorted by device and time.

    """
    cols: dict[str, list[object]] = {f: [] for f in _FRAME_FIELDS}
    for s in samples:
        for f in _FRAME_FIELDS:
            cols[f].append(getattr(s, f))
    n = len(samples)
    df = pl.DataFrame(
        {
            "run_id": pl.Series(
                list(run_ids) if run_ids is not None else [run_id] * n, dtype=pl.String
            ),
            "node": pl.Series([node] * n, dtype=pl.String),
            "device": pl.Series(cols["device"], dtype=pl.String),
            "model": pl.Series(cols["model"], dtype=pl.String),
            "timestamp": pl.Series(cols["timestamp"], dtype=pl.Datetime("us", "UTC")),
            **{
                f: pl.Series(cols[f], dtype=pl.Float64)
                for f in (
                    "power_w",
                    "energy_j",
                    "gpu_util_pct",
                    "mem_util_pct",
                    "mem_used_mib",
                    "temp_c",
                )
            },
            "source": pl.Series(cols["source"], dtype=pl.String),
        }
    )
    return conform(df, "samples").sort("device", "timestamp")


def frame_samples(df: pl.DataFrame, *, source: str | None = None) -> list[PowerSample]:
    """Turn a frame with at least ``device``, ``timestamp`` and ``power_w`` into samples.

    Args:
        df: Rows in (a subset of) the ``samples`` schema; timestamps timezone-aware.
        source: Label to put on every sample; default the frame's ``source`` column,
            else ``"replay"``.

    Returns:
        One sample per row, in row order.

    """
    out = []
    has = set(df.columns)
    for row in df.iter_rows(named=True):
        out.append(
            PowerSample(
                device=str(row["device"]),
                model=row.get("model") if "model" in has else None,
                timestamp=row["timestamp"],
                power_w=row["power_w"],
                energy_j=row.get("energy_j") if "energy_j" in has else None,
                gpu_util_pct=row.get("gpu_util_pct"),
                mem_util_pct=row.get("mem_util_pct"),
                mem_used_mib=row.get("mem_used_mib"),
                temp_c=row.get("temp_c"),
                source=source or (row.get("source") or "replay"),
            )
        )
    return out


def _bad_number(x: float | None) -> bool:
    return x is not None and (not math.isfinite(x) or x < 0)


class SampleGuard:
    """Checks one source's readings; marks bad ones and reports each incident once.

    An incident starts with the first bad reading of a kind on a device and ends
    with the next good one; only its start is logged (at WARNING), with the value
    seen. Marking means the bad value becomes ``None`` and ``note`` says why;
    nothing is interpolated or invented.

    Checks, per device: power finite and >= 0; counter finite, >= 0 and never
    below the previous counter (a lower counter is treated as a reset: that
    sample's counter is dropped and the next readings count from the new value);
    timestamps strictly increasing (a reading not after the previous one is
    dropped entirely).

    Args:
        source: Name of the source, for messages.
        logger: Where incidents are logged.

    Attributes:
        incidents: How many incidents have started so far.

    """

    def __init__(self, source: str, logger: logging.Logger | None = None) -> None:
        self.source = source
        self.log = logger or log
        self.incidents = 0
        self._open: set[tuple[str, str]] = set()
        self._last_ts: dict[str, datetime] = {}
        self._last_energy: dict[str, float] = {}

    def report(self, device: str, kind: str, message: str) -> None:
        """Log ``message`` if no incident of ``kind`` is open on ``device``, and open one."""
        key = (device, kind)
        if key not in self._open:
            self._open.add(key)
            self.incidents += 1
            self.log.warning("source %s, device %s: %s", self.source, device, message)

    def resolve(self, device: str, kind: str) -> None:
        """Close an open incident (the readings of this kind are good again)."""
        if (device, kind) in self._open:
            self._open.discard((device, kind))
            self.log.info(
                "source %s, device %s: %s readings are good again", self.source, device, kind
            )

    def check(self, samples: Iterable[PowerSample]) -> list[PowerSample]:
        """Return the samples with bad values marked and out-of-order ones dropped."""
        out = []
        for s in samples:
            dev = s.device
            last = self._last_ts.get(dev)
            if last is not None and s.timestamp <= last:
                self.report(
                    dev,
                    "time",
                    f"expected timestamps to increase; got {s.timestamp.isoformat()} after "
                    f"{last.isoformat()}; the reading is dropped",
                )
                continue
            self.resolve(dev, "time")
            self._last_ts[dev] = s.timestamp
            notes = [s.note] if s.note else []
            power, energy = s.power_w, s.energy_j
            if _bad_number(power):
                self.report(
                    dev, "power", f"expected a finite power >= 0 W; got {power}; stored as null"
                )
                notes.append(f"bad power {power}")
                power = None
            elif power is not None:
                self.resolve(dev, "power")
            if energy is not None:
                prev = self._last_energy.get(dev)
                if _bad_number(energy):
                    self.report(
                        dev,
                        "energy",
                        f"expected a finite energy counter >= 0 J; got {energy}; stored as null",
                    )
                    notes.append(f"bad energy counter {energy}")
                    energy = None
                elif prev is not None and energy < prev:
                    self.report(
                        dev,
                        "energy",
                        f"energy counter went backwards from {prev} J to {energy} J (reset?); "
                        "this reading's counter is stored as null and counting restarts",
                    )
                    notes.append(f"counter went back from {prev} to {energy}")
                    self._last_energy[dev] = energy
                    energy = None
                else:
                    self.resolve(dev, "energy")
                    self._last_energy[dev] = energy
            if power is not s.power_w or energy is not s.energy_j:
                s = replace(s, power_w=power, energy_j=energy, note="; ".join(notes))
            out.append(s)
        return out
