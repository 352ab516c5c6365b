"""Modelled CPU power: ``/proc/stat`` utilisation times a board power; an estimate, not measured.

Used only when nothing measured exists on a node. Its samples always carry
``source="modelled"`` so every number built on them is shown as modelled.
"""

from __future__ import annotations

import math
from pathlib import Path

from profiler.errors import BadInputError, SourceUnavailableError
from profiler.sources.base import PowerSample, utc_now


def _cpu_times(path: Path) -> tuple[int, int]:
    """(busy, total) jiffies summed over all CPUs from the first line of ``/proc/stat``."""
    try:
        with open(path, encoding="ascii") as fh:
            line = fh.readline()
    except OSError as err:
        raise SourceUnavailableError(
            f"modelled source: cannot read {path} ({err}); it needs Linux /proc/stat"
        ) from err
    parts = line.split()
    if not parts or parts[0] != "cpu" or len(parts) < 5:
        raise SourceUnavailableError(
            f"modelled source: expected a 'cpu user nice system idle ...' line in {path}; "
            f"found {line.strip()!r}"
        )
    vals = [int(x) for x in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice; leave it out of the total.
    total = sum(vals[:8])
    return total - idle, total


def _cpu_model(cpuinfo: Path) -> str | None:
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


class ModelledCpuSource:
    """CPU power estimated as ``idle_w + utilisation × (board_power_w - idle_w)``.

    With the default ``idle_w = 0`` this is utilisation × board power. The
    first reading primes the utilisation counters, so every reading covers the
    time since the previous one.

    Args:
        board_power_w: Power of the CPU board at full load in W (for example the TDP).
        idle_w: Power at zero utilisation in W.
        proc_stat: Path of ``/proc/stat`` (replaceable for tests).
        cpuinfo: Path of ``/proc/cpuinfo`` for the model name.
        device: Device id of the samples.

    Raises:
        BadInputError: Powers not finite (inf or nan), board power not positive,
            idle power negative or above the board power.
        SourceUnavailableError: ``/proc/stat`` cannot be read.

    """

    name = "modelled"

    def __init__(
        self,
        board_power_w: float = 100.0,
        *,
        idle_w: float = 0.0,
        proc_stat: str | Path = "/proc/stat",
        cpuinfo: str | Path = "/proc/cpuinfo",
        device: str = "cpu",
    ) -> None:
        finite = math.isfinite(board_power_w) and math.isfinite(idle_w)
        if not (finite and board_power_w > 0 and 0 <= idle_w <= board_power_w):
            # An infinite board power made every sample nan (stored null) while the run
            # went on as if measured: refuse it with the finite range instead.
            raise BadInputError(
                f"modelled source needs finite powers in W with board_power_w > 0 and "
                f"0 <= idle_w <= board_power_w; found board_power_w={board_power_w}, "
                f"idle_w={idle_w}"
            )
        self.board_power_w = float(board_power_w)
        self.idle_w = float(idle_w)
        self.proc_stat = Path(proc_stat)
        self.device = device
        self.model = _cpu_model(Path(cpuinfo))
        self._last = _cpu_times(self.proc_stat)

    def read(self) -> list[PowerSample]:
        """One modelled sample for the CPU; utilisation over the time since the previous read."""
        busy, total = _cpu_times(self.proc_stat)
        d_busy, d_total = busy - self._last[0], total - self._last[1]
        self._last = (busy, total)
        util = min(max(d_busy / d_total, 0.0), 1.0) if d_total > 0 else 0.0
        return [
            PowerSample(
                device=self.device,
                model=self.model,
                timestamp=utc_now(),
                power_w=self.idle_w + util * (self.board_power_w - self.idle_w),
                energy_j=None,
                gpu_util_pct=100.0 * util,
                source="modelled",
            )
        ]

    def close(self) -> None:
        """Nothing to release."""
