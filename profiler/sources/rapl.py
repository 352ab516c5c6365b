"""RAPL source: CPU package and DRAM energy from ``/sys/class/powercap`` (µJ counters, wrapping).

Layout read (Linux powercap, Intel and AMD)::

    /sys/class/powercap/intel-rapl:0/name                 "package-0"
    /sys/class/powercap/intel-rapl:0/energy_uj            cumulative µJ, wraps
    /sys/class/powercap/intel-rapl:0/max_energy_range_uj  wrap point in µJ
    /sys/class/powercap/intel-rapl:0:1/name               "dram" (a sub-zone of package 0)

Packages and their ``dram`` sub-zones are reported; ``core`` and ``uncore``
sub-zones are left out because the package already contains them. Top-level
zones not named ``package-*`` are skipped with their sub-zones: on Intel
clients ``intel-rapl:1`` is ``psys``, the whole platform (packages included),
which would be counted twice if reported beside the packages. Since 2020
kernels make ``energy_uj`` readable by root only.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from profiler.errors import PermissionDeniedError, SourceUnavailableError
from profiler.sources.base import PowerSample, utc_now

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/class/powercap"
_ZONE_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")


@dataclass(slots=True)
class _Zone:
    """One RAPL zone and its running counter state (mutable on purpose)."""

    device: str
    path: Path
    max_range_uj: int
    last_raw_uj: int
    last_mono: float
    total_uj: int


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as err:
        raise PermissionDeniedError(
            f"RAPL: permission denied reading {path}; since Linux 5.10 energy_uj is readable by "
            "root only: run the sidecar as root, or grant read access "
            "(e.g. a udev rule or `chmod o+r` on the energy_uj files)"
        ) from err
    except (OSError, ValueError) as err:
        raise SourceUnavailableError(f"RAPL: cannot read an integer from {path} ({err})") from err


class RaplSource:
    """CPU package and DRAM power from the powercap RAPL counters.

    The µJ counter of each zone is turned into a cumulative counter in J
    that starts at 0 when the source is opened and never wraps; power is the
    counter delta over the time since the previous reading.

    Args:
        root: The powercap directory (replaceable for tests).

    Raises:
        SourceUnavailableError: No RAPL zone is present or a file is unreadable.
        PermissionDeniedError: The counters are not readable by this user.

    """

    name = "rapl"

    def __init__(self, root: str | Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        zones = []
        skipped: list[str] = []
        not_packages: set[str] = set()
        dirs = sorted(self.root.glob("intel-rapl:*")) if self.root.is_dir() else []
        for d in dirs:
            m = _ZONE_RE.match(d.name)
            if not m or not (d / "energy_uj").exists():
                continue
            try:
                label = (d / "name").read_text().strip()
            except OSError:
                label = d.name
            pkg, sub = m.group(1), m.group(2)
            if sub is None and not label.startswith("package"):
                # psys (Intel clients) covers the whole platform, packages included:
                # summing it with them would count the CPU twice.
                log.debug("RAPL: skipping top-level zone %s (%r): not a CPU package", d.name, label)
                skipped.append(f"{d.name} ({label})")
                not_packages.add(pkg)
                continue
            if sub is None:
                device = label
            elif pkg in not_packages:
                log.debug("RAPL: skipping zone %s (%r): under a skipped zone", d.name, label)
                continue
            elif label == "dram":
                device = f"dram-{pkg}"
            else:
                continue
            raw = _read_int(d / "energy_uj")
            max_range = _read_int(d / "max_energy_range_uj")
            zones.append(_Zone(device, d, max_range, raw, time.monotonic(), 0))
        if not zones:
            raise SourceUnavailableError(
                f"RAPL: no readable intel-rapl zones under {self.root}; this CPU or kernel does "
                "not expose RAPL through powercap (virtual machines usually do not); use "
                "--source modelled for an estimate"
                + (f" (skipped, not CPU packages: {', '.join(skipped)})" if skipped else "")
            )
        self._zones = zones
        self.devices = [z.device for z in zones]

    def read(self) -> list[PowerSample]:
        """One sample per zone: counter in J since opening, power in W since the previous read."""
        out = []
        for z in self._zones:
            raw = _read_int(z.path / "energy_uj")
            mono = time.monotonic()
            ts = utc_now()
            delta = raw - z.last_raw_uj
            if delta < 0:  # wrapped at max_energy_range_uj
                delta += z.max_range_uj
            dt = mono - z.last_mono
            z.total_uj += max(delta, 0)
            z.last_raw_uj, z.last_mono = raw, mono
            out.append(
                PowerSample(
                    device=z.device,
                    model=None,
                    timestamp=ts,
                    power_w=delta / 1e6 / dt if dt > 0 and delta >= 0 else None,
                    energy_j=z.total_uj / 1e6,
                    source="rapl",
                )
            )
        return out

    def close(self) -> None:
        """Nothing to release."""
