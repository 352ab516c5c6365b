"""Sidecar cost benchmark: CPU per device at 1 Hz and 10 Hz, memory, and hook + sidecar overhead.

    .venv/bin/python bench/sidecar.py [--devices 4] [--seconds 20]

Prints the sidecar's CPU time as a share of one core per device (goals: under
0.5 % at 1 Hz, under 2 % at 10 Hz), its resident memory at the start and end
(goal: flat), and the throughput of a small CPU training loop with epoch hooks
and a 1 Hz sidecar running, next to the same loop without them (goal: within 1 %).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from cluster.commands.common import positive_arg, whole_arg  # noqa: E402
from profiler.hooks import EpochHooks  # noqa: E402
from profiler.sidecar import Sidecar, StoreReceiver  # noqa: E402
from profiler.sources.replay import ReplaySource, load_trace  # noqa: E402
from profiler.store import Store  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "seaa2023" / "traces.parquet"


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def trace(devices: int) -> pl.DataFrame:
    if SHARED.is_file():
        return load_trace(SHARED, max_runs=devices)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    n = 4000
    return pl.DataFrame(
        {
            "device": [str(d) for d in range(devices) for _ in range(n)],
            "timestamp": [t0 + timedelta(seconds=i) for _ in range(devices) for i in range(n)],
            "power_w": [200.0 + (i % 50) for _ in range(devices) for i in range(n)],
        }
    )


def sidecar_cost(devices: int, hz: float, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        src = ReplaySource(
            trace(devices),
            speed=hz,  # one new sample per device per tick
            device_prefix="",
            loop=True,
        )
        side = Sidecar(
            [src],
            node="bench",
            run_id="bench",
            interval_s=1 / hz,
            batch_interval_s=5.0,
            receiver=StoreReceiver(Store(Path(tmp) / "s")),
            journal=Path(tmp) / "j",
        )
        rss0 = rss_mib()
        c0, w0 = time.process_time(), time.monotonic()
        side.start()
        time.sleep(seconds)
        stats = side.stop()
        cpu, wall = time.process_time() - c0, time.monotonic() - w0
        side.close()
        return {
            "hz": hz,
            "devices": devices,
            "wall_s": wall,
            "cpu_s": cpu,
            "pct_core_per_device": 100 * cpu / wall / devices,
            "ticks": stats.ticks,
            "skipped": stats.skipped_ticks,
            "sent": stats.sent,
            "rss_start_mib": rss0,
            "rss_end_mib": rss_mib(),
        }


def training_overhead(rounds: int, steps: int) -> tuple[float, float]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # 2-core machine: leave a core to the sidecar, cut noise
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def epoch() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return time.perf_counter() - t

    epoch()  # warm-up
    plain, hooked = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s")
        src = ReplaySource(trace(1), device_prefix="", loop=True)
        side = Sidecar(
            [src],
            node="bench",
            run_id="bench",
            interval_s=1.0,
            receiver=StoreReceiver(store),
            journal=Path(tmp) / "j",
        )
        hooks = EpochHooks("bench", store=store)
        for _ in range(rounds):  # alternate, so drift in machine speed hits both alike
            plain.append(epoch())
            side.start()
            with hooks.epoch():
                hooked.append(epoch())
            side.stop()
        side.close()
    return sorted(plain)[len(plain) // 2], sorted(hooked)[len(hooked) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=whole_arg(1), default=4)
    p.add_argument("--seconds", type=positive_arg, default=20.0)
    p.add_argument("--rounds", type=whole_arg(1), default=7)
    p.add_argument("--steps", type=whole_arg(1), default=60)
    a = p.parse_args()
    print(f"sidecar cost, replay source with {a.devices} fake devices, {a.seconds:.0f} s each:")
    for hz in (1.0, 10.0):
        r = sidecar_cost(a.devices, hz, a.seconds)
        goal = 0.5 if hz == 1 else 2.0
        print(
            f"  {hz:>4.0f} Hz: {r['pct_core_per_device']:.3f} % of one core per device "
            f"(goal < {goal} %), {r['ticks']} ticks, {r['skipped']} skipped, {r['sent']} rows "
            f"stored, RSS {r['rss_start_mib']:.0f} -> {r['rss_end_mib']:.0f} MiB"
        )
    plain, hooked = training_overhead(a.rounds, a.steps)
    print(f"CPU training loop, median epoch of {a.steps} steps over {a.rounds} rounds:")
    print(
        f"  plain {plain * 1e3:.1f} ms, with hooks + 1 Hz sidecar {hooked * 1e3:.1f} ms: "
        f"{100 * (hooked / plain - 1):+.2f} % (goal within 1 %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
