"""Benchmark: per-epoch energy of 10 million samples over 1,000 epochs.

Times, in one process and on the same data:

* ``numpy (arrays)``: a plain numpy computation of the same numbers
  (trapezoids, cumulative sum, exact split at epoch marks) on per-device
  arrays already in memory: the floor, with no parsing, grouping or checks;
* ``numpy (from parquet)``: the same, starting like the file mode does from
  the parquet file (pyarrow read, timestamps to seconds, one boolean mask per
  device) and writing the result with pyarrow;
* ``epoch_energy``: wattwise's function on polars frames in memory (with its
  input validation);
* ``file mode``: ``wattwise energy --samples S --epochs E --out OUT``, parquet
  read and write included.

Run: ``.venv/bin/python bench/energy.py [--samples N] [--epochs K] [--devices D] [--threads T]``.
By default polars runs on one thread, so the figures are per core.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from cluster.commands.common import whole_arg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=whole_arg(1), default=10_000_000)
    ap.add_argument("--epochs", type=whole_arg(1), default=1_000)
    ap.add_argument("--devices", type=whole_arg(1), default=4)
    ap.add_argument("--threads", type=whole_arg(1), default=1, help="polars threads (default 1)")
    ap.add_argument("--repeat", type=whole_arg(1), default=3)
    args = ap.parse_args()
    if args.samples < 2 * args.devices:
        ap.error(
            f"--samples ({args.samples}) must be at least 2 per device (--devices "
            f"{args.devices}: at least {2 * args.devices}) to integrate anything"
        )
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)

    import numpy as np
    import polars as pl

    from cluster.cli import main as cli
    from estimators.energy import epoch_energy

    rng = np.random.default_rng(1)
    per_dev = args.samples // args.devices
    t_s = np.arange(per_dev, dtype=np.float64)  # 1 Hz
    t0_us = 1_700_000_000_000_000
    frames = []
    powers = []
    for d in range(args.devices):
        p = rng.uniform(50, 400, per_dev)
        powers.append(p)
        frames.append(
            pl.DataFrame(
                {
                    "run_id": "bench",
                    "device": str(d),
                    "timestamp": pl.Series(t0_us + (t_s * 1e6).astype(np.int64)).cast(
                        pl.Datetime("us", "UTC")
                    ),
                    "power_w": p,
                }
            )
        )
    samples = pl.concat(frames)
    edges = np.linspace(0, per_dev - 1, args.epochs + 1)
    epochs = pl.DataFrame(
        {
            "run_id": "bench",
            "epoch": np.arange(args.epochs),
            "start": pl.Series(t0_us + (edges[:-1] * 1e6).astype(np.int64)).cast(
                pl.Datetime("us", "UTC")
            ),
            "end": pl.Series(t0_us + (edges[1:] * 1e6).astype(np.int64)).cast(
                pl.Datetime("us", "UTC")
            ),
        }
    )
    a = (t0_us + (edges[:-1] * 1e6).astype(np.int64) - t0_us) / 1e6
    b = (t0_us + (edges[1:] * 1e6).astype(np.int64) - t0_us) / 1e6

    def numpy_way() -> np.ndarray:
        total = np.zeros(args.epochs)
        for p in powers:
            dt = np.diff(t_s)
            cum = np.concatenate(([0.0], np.cumsum(0.5 * (p[:-1] + p[1:]) * dt)))

            def at(x: np.ndarray, p: np.ndarray = p, cum: np.ndarray = cum) -> np.ndarray:
                i = np.clip(np.searchsorted(t_s, x, side="right") - 1, 0, len(t_s) - 2)
                s = x - t_s[i]
                slope = (p[i + 1] - p[i]) / (t_s[i + 1] - t_s[i])
                return cum[i] + p[i] * s + 0.5 * slope * s * s

            total += at(b) - at(a)
        return total

    def best(fn) -> tuple[float, object]:
        times, out = [], None
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    t_np, ref = best(numpy_way)
    t_ww, res = best(lambda: epoch_energy(samples, epochs))
    err = float(np.max(np.abs(res["energy_j"].to_numpy() - ref) / ref))

    with tempfile.TemporaryDirectory() as tmp:
        sp, ep, op = (Path(tmp) / n for n in ("s.parquet", "e.parquet", "o.parquet"))
        samples.write_parquet(sp)
        epochs.write_parquet(ep)
        argv = ["energy", "--samples", str(sp), "--epochs", str(ep), "--out", str(op), "--json"]
        devnull = open(os.devnull, "w")  # noqa: SIM115
        real = sys.stdout

        def file_mode() -> None:
            sys.stdout = devnull
            try:
                assert cli(argv) == 0
            finally:
                sys.stdout = real

        t_file, _ = best(file_mode)
        n_out = pl.read_parquet(op).height

        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        def numpy_from_parquet() -> np.ndarray:
            tab = pq.read_table(sp)
            ts = tab["timestamp"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
            # Integer device codes: comparing Python strings would make numpy look slow.
            dev = pc.dictionary_encode(tab["device"]).combine_chunks().indices.to_numpy()
            pw = tab["power_w"].to_numpy()
            et = pq.read_table(ep)
            a = et["start"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
            b = et["end"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
            total = np.zeros(len(a))
            for d in np.unique(dev):
                m = dev == d
                t, p = ts[m], pw[m]
                cum = np.concatenate(([0.0], np.cumsum(0.5 * (p[:-1] + p[1:]) * np.diff(t))))

                def at(x: np.ndarray, t=t, p=p, cum=cum) -> np.ndarray:
                    i = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 2)
                    s = x - t[i]
                    return cum[i] + p[i] * s + 0.5 * (p[i + 1] - p[i]) / (t[i + 1] - t[i]) * s * s

                total += at(b) - at(a)
            pq.write_table(pa.table({"energy_j": total}), Path(tmp) / "np.parquet")
            return total

        t_np_file, ref_file = best(numpy_from_parquet)
        assert np.allclose(ref_file, ref)

    n = samples.height
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"polars threads={args.threads}, python {platform.python_version()}"
    )
    print(f"{n:,} samples, {args.devices} devices, {args.epochs:,} epochs (best of {args.repeat})")
    print(f"{'method':<30}{'seconds':>9}{'M samples/s':>13}  compared with")
    for name, t, base, base_name in (
        ("numpy (arrays)", t_np, None, ""),
        ("epoch_energy (in memory)", t_ww, t_np, "numpy (arrays)"),
        ("numpy (from parquet)", t_np_file, None, ""),
        ("wattwise energy file mode", t_file, t_np_file, "numpy (from parquet)"),
    ):
        ratio = f"{t / base:.2f}x {base_name}" if base else ""
        print(f"{name:<30}{t:>9.3f}{n / t / 1e6:>13.2f}  {ratio}")
    print(f"max relative difference to numpy: {err:.2e}; rows written: {n_out}")


if __name__ == "__main__":
    main()
