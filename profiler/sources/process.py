"""Modelled CPU power of one process tree: its share of the node's CPU time times a board power.

An **estimate**, not a measurement: Linux counts CPU time per process but
no power, so the share of the node's CPU capacity a job's processes used is
multiplied by the board power of the whole CPU. It is what lets two jobs on
one CPU-only node each get their own samples (system-wide ``/proc/stat``
utilisation cannot be split between them). Samples carry
``source="modelled"`` so every number built on them is shown as modelled.

Over an interval of wall time ``dt`` (s) on a node with ``cpus`` CPUs, a
tree that used ``cpu_s`` seconds of CPU (user + system, every process in
it) is given

    power_w = (board_power_w - idle_w) * cpu_s / (dt * cpus)

and a cumulative counter ``energy_j`` (the same model integrated exactly),
so the energy of a run does not depend on the sampling interval. Idle power
is a property of the node, not of a job, and is not attributed. The tree is
the root process and every descendant found by walking the parent ids of
``/proc/<pid>/stat``; CPU time of children reaped by a process of the tree
is counted through its ``cutime``/``cstime`` (without counting it twice).
Not counted: the CPU time of a process between the last read and its exit
when nothing of the tree is left to reap it (at most one interval at the
end of a job), and descendants that were re-parented out of the tree.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from profiler.errors import BadInputError, SourceUnavailableError
from profiler.sources.base import PowerSample, utc_now
from profiler.sources.modelled import _cpu_model


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What this source needs from one ``/proc/<pid>/stat`` line.

    Attributes:
        pid: Process id.
        ppid: Parent process id.
        self_ticks: User + system CPU time of the process itself, in clock ticks.
        child_ticks: User + system CPU time of its reaped children, in clock ticks.
        start_ticks: Start time after boot, in clock ticks (tells a reused pid apart).

    """

    pid: int
    ppid: int
    self_ticks: int
    child_ticks: int
    start_ticks: int

    @property
    def total(self) -> int:
        """Own and reaped children's CPU time, in clock ticks."""
        return self.self_ticks + self.child_ticks


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line (the command name may hold spaces and parentheses).

    Raises:
        ValueError: The line is not a stat line.

    """
    head, sep, tail = text.rpartition(")")
    if not sep:
        raise ValueError(f"expected 'pid (comm) state ppid ...'; found {text[:80]!r}")
    pid = int(head.split("(", 1)[0])
    f = tail.split()
    # After the command: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17)
    # ... starttime(22), numbered from 1 as in proc(5); f[0] is field 3.
    return ProcStat(
        pid=pid,
        ppid=int(f[1]),
        self_ticks=int(f[11]) + int(f[12]),
        child_ticks=int(f[13]) + int(f[14]),
        start_ticks=int(f[19]),
    )


def _read_stat(proc: Path, pid: int) -> ProcStat | None:
    try:
        return parse_stat((proc / str(pid) / "stat").read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError, IndexError):
        return None  # gone between the listing and the read, or not a process


def _boot_clock() -> float:
    """Seconds since boot (the clock ``starttime`` counts on)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class ProcessCpuSource:
    """Modelled power of the process tree rooted at ``pid`` (see the module docstring).

    The first reading is a sample at the moment the root process started, with
    the counter at 0 J and no power, so a source attached just after the job
    started still counts the job's CPU time from its very beginning; every
    later reading covers the time since the previous one.

    Args:
        pid: Root process of the tree (the job's command).
        board_power_w: Power of the CPU board at full load in W.
        idle_w: Power at zero utilisation in W (not attributed to the process).
        cpus: CPUs of the node (default ``os.cpu_count()``).
        device: Device id of the samples (default ``cpu:<pid>``).
        proc: Path of ``/proc`` (replaceable for tests).
        cpuinfo: Path of ``/proc/cpuinfo`` for the model name.
        since_start: Count from the root's start (True) or from now (False).

    Raises:
        BadInputError: Powers negative, idle above board power, or ``cpus`` < 1.
        SourceUnavailableError: No process ``pid`` (or no ``/proc``).

    """

    name = "modelled"

    def __init__(
        self,
        pid: int,
        board_power_w: float = 100.0,
        *,
        idle_w: float = 0.0,
        cpus: int | None = None,
        device: str | None = None,
        proc: str | Path = "/proc",
        cpuinfo: str | Path = "/proc/cpuinfo",
        since_start: bool = True,
    ) -> None:
        if not (board_power_w > 0 and 0 <= idle_w <= board_power_w):
            raise BadInputError(
                f"process source needs board_power_w > 0 and 0 <= idle_w <= board_power_w; "
                f"found board_power_w={board_power_w}, idle_w={idle_w}"
            )
        ncpu = (os.cpu_count() or 1) if cpus is None else int(cpus)
        if ncpu < 1:
            raise BadInputError(f"process source needs cpus >= 1; found {cpus}")
        self.pid = int(pid)
        self.proc = Path(proc)
        self.cpus = ncpu
        self.dynamic_w = float(board_power_w) - float(idle_w)
        self.board_power_w = float(board_power_w)
        self.idle_w = float(idle_w)
        self.device = device or f"cpu:{self.pid}"
        self.model = _cpu_model(Path(cpuinfo))
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        root = _read_stat(self.proc, self.pid)
        if root is None:
            raise SourceUnavailableError(
                f"process source: no process {self.pid} under {self.proc} (it has ended, or "
                "this is not Linux); attach the source while the job runs"
            )
        self._root_start = root.start_ticks
        now_mono, now_utc = time.monotonic(), utc_now()
        if since_start:
            age_s = max(0.0, _boot_clock() - root.start_ticks / self.hz)
            self._t0_mono = now_mono - age_s
            self._t0_utc = now_utc - timedelta(seconds=age_s)
            self._seen: dict[tuple[int, int], ProcStat] = {}
        else:
            self._t0_mono, self._t0_utc = now_mono, now_utc
            self._seen = {(s.pid, s.start_ticks): s for s in self._tree()}
        self._first = True
        self._last_mono = self._t0_mono
        self._ticks = 0  # CPU ticks counted so far
        self._last_ts: datetime | None = None
        self.ended = False

    def _tree(self) -> list[ProcStat]:
        """Every live process of the tree (one pass over ``/proc``)."""
        try:
            names = os.listdir(self.proc)
        except OSError as err:
            raise SourceUnavailableError(f"process source: cannot list {self.proc}: {err}") from err
        stats = [s for n in names if n.isdigit() and (s := _read_stat(self.proc, int(n)))]
        children: dict[int, list[ProcStat]] = {}
        root = None
        for s in stats:
            if s.pid == self.pid:
                if s.start_ticks == self._root_start:
                    root = s
            else:
                children.setdefault(s.ppid, []).append(s)
        if root is None:
            return []
        out, todo = [], [root]
        while todo:
            s = todo.pop()
            out.append(s)
            todo.extend(children.get(s.pid, ()))
        return out

    def read(self) -> list[PowerSample]:
        """One modelled sample for the tree (two on the first call: the start, then now)."""
        out: list[PowerSample] = []
        if self._first:
            self._first = False
            self._last_ts = self._t0_utc
            out.append(self._sample(self._t0_utc, None, 0.0))
        live = {} if self.ended else {(s.pid, s.start_ticks): s for s in self._tree()}
        if not live:
            self.ended = True
        delta = 0
        for key, s in live.items():
            prev = self._seen.get(key)
            delta += s.total - (prev.total if prev is not None else 0)
        # A process that is gone was reaped by its parent (its time moved into the
        # parent's child ticks, counted above) if its nearest surviving ancestor is
        # in the tree: take back what was already counted for it.
        gone = {k: s for k, s in self._seen.items() if k not in live}
        live_pids = {k[0] for k in live}
        by_pid = {k[0]: s for k, s in gone.items()}
        for s in gone.values():
            p, hops = s.ppid, 0
            while p in by_pid and p not in live_pids and hops < 64:
                p, hops = by_pid[p].ppid, hops + 1
            if p in live_pids:
                delta -= s.total
        self._seen = live
        delta = max(delta, 0)
        self._ticks += delta
        now_mono = time.monotonic()
        dt = now_mono - self._last_mono
        self._last_mono = now_mono
        ts = utc_now()
        if self._last_ts is not None and ts <= self._last_ts:
            ts = self._last_ts + timedelta(microseconds=1)
        self._last_ts = ts
        share = min(delta / self.hz / (dt * self.cpus), 1.0) if dt > 0 else 0.0
        energy = self.dynamic_w * self._ticks / self.hz / self.cpus
        out.append(self._sample(ts, share * self.dynamic_w, energy, share))
        return out

    def _sample(
        self, ts: datetime, power_w: float | None, energy_j: float, share: float | None = None
    ) -> PowerSample:
        return PowerSample(
            device=self.device,
            model=self.model,
            timestamp=ts,
            power_w=power_w,
            energy_j=energy_j,
            gpu_util_pct=None if share is None else 100.0 * share,
            source="modelled",
        )

    @property
    def cpu_s(self) -> float:
        """CPU time of the tree counted so far, in s."""
        return self._ticks / self.hz

    def close(self) -> None:
        """Nothing to release."""
