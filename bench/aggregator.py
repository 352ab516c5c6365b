"""Aggregator ingest benchmark: samples/s of batched input on one core, and time to projection.

Synthetic fleet: R runs of 8 GPUs each sampled at 10 Hz; every batch holds
``--batch-seconds`` of samples of ``--runs-per-batch`` runs (a sidecar per
node sends one node's batch; an ingest tier that concatenates sends many).
Every run has an epoch mark every ``--epoch-s`` seconds, delivered just
before the batch that carries its end, so each epoch is finished (energy,
STEP update) inside the timed loop. Batch construction is not timed.

Latency is measured per finished epoch: from the moment the batch carrying
the samples that complete the epoch is handed to the aggregator to the moment
its projection reflects that epoch (here the aggregator finishes epochs
synchronously, so this is the ingest call's duration plus any queueing).

Two cases run by default: batches of all runs' samples of one second
(100,000 rows for 1,250 runs), and per-node batches (one node's 8 GPUs for
``--node-batch-seconds``, 400 rows for 5 s) as a sidecar sends them.

Usage::

    POLARS_MAX_THREADS=1 .venv/bin/python bench/aggregator.py
    .venv/bin/python bench/aggregator.py --runs 1250 --runs-per-batch 25 --seconds 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # one core: set before polars is imported
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.aggregator import Aggregator  # noqa: E402
from cluster.commands.common import whole_arg  # noqa: E402
from profiler.schema import UTC_US, schema  # noqa: E402

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
GPUS = 8
HZ = 10


def make_batches(runs: int, per_batch: int, seconds: int, batch_s: int) -> list[pl.DataFrame]:
    rng = np.random.default_rng(0)
    out = []
    groups = [list(range(a, min(a + per_batch, runs))) for a in range(0, runs, per_batch)]
    for s in range(0, seconds, batch_s):
        for g in groups:
            n_t = batch_s * HZ
            t_us = (s * 1_000_000 + np.arange(n_t) * (1_000_000 // HZ)).astype(np.int64)
            r = np.repeat(np.array(g), GPUS * n_t)
            d = np.tile(np.repeat(np.arange(GPUS), n_t), len(g))
            t = np.tile(t_us, len(g) * GPUS)
            n = len(t)
            idx = np.repeat(np.arange(len(g)), GPUS * n_t)
            t0_us = int(T0.timestamp() * 1e6)
            df = (
                pl.DataFrame(
                    {
                        "run_id": pl.Series([f"r{i:05d}" for i in g]).gather(idx),
                        "node": pl.Series([f"n{i:05d}" for i in g]).gather(idx),
                        "device": pl.Series(d).cast(pl.String),
                        "timestamp": pl.Series(t + t0_us).cast(UTC_US),
                        "power_w": 200.0 + 50.0 * rng.random(n),
                        "source": ["replay"] * n,
                    }
                )
                .with_columns(
                    pl.lit(None, dtype=dtype).alias(name)
                    for name, dtype in schema("samples").items()
                    if name not in ("run_id", "node", "device", "timestamp", "power_w", "source")
                )
                .select(list(schema("samples")))
            )
            del r
            out.append(df)
    return out


def marks_for(run_ids: list[str], epochs: list[int], epoch_s: int) -> pl.DataFrame:
    """Epoch marks of ``epochs`` (each ``epoch_s`` seconds long, from T0) for every run."""
    n = len(run_ids)
    return pl.DataFrame(
        {
            "run_id": run_ids * len(epochs),
            "epoch": [e for e in epochs for _ in range(n)],
            "start": [T0 + dt.timedelta(seconds=e * epoch_s) for e in epochs for _ in range(n)],
            "end": [T0 + dt.timedelta(seconds=(e + 1) * epoch_s) for e in epochs for _ in range(n)],
        },
        schema_overrides={"start": UTC_US, "end": UTC_US},
    )


def span(values: list[int]) -> str:
    """``"N"`` when every value is N, else ``"lo-hi"`` (formatted with thousands separators)."""
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def run_case(
    runs: int, per_batch: int, seconds: int, batch_s: int, epoch_s: int
) -> dict[str, float]:
    """Feed one synthetic fleet through a fresh aggregator and print its figures."""
    batches = make_batches(runs, per_batch, seconds, batch_s)
    groups = [
        [f"r{i:05d}" for i in range(a, min(a + per_batch, runs))] for a in range(0, runs, per_batch)
    ]
    rows = sum(b.height for b in batches)
    run_ids = [f"r{i:05d}" for i in range(runs)]
    agg = Aggregator(None, max_lag_s=30.0, retain_s=5.0)
    for rid in run_ids:
        agg.start_run({"run_id": rid, "planned_epochs": 100}, write=False)
    per_second = len(groups)
    latencies: list[float] = []
    busy = 0.0
    epoch = 0  # the next epoch to mark
    start = time.perf_counter()
    for i, b in enumerate(batches):
        second = (i // per_second) * batch_s
        group = [agg._runs[r] for r in groups[i % per_second]]
        done_before = sum(len(s.done) for s in group)
        t_a = time.perf_counter()
        if i % per_second == 0:
            # The marks of every epoch that ends within [second, second + batch_s) arrive
            # before the samples that close it (the batch holds a sample at each such end).
            ending = []
            while (epoch + 1) * epoch_s < second + batch_s:
                ending.append(epoch)
                epoch += 1
            if ending:
                agg.ingest_epochs(marks_for(run_ids, ending, epoch_s), write=False)
        agg.ingest_samples(b, write=False)
        t_b = time.perf_counter()
        busy += t_b - t_a
        if sum(len(s.done) for s in group) > done_before:
            latencies.append(t_b - t_a)
    wall = time.perf_counter() - start
    done = sum(len(s.done) for s in agg._runs.values())
    held = sum(
        (s.window.height if s.window is not None else 0) + sum(c.height for c in s.chunks)
        for s in agg._runs.values()
    )
    print(
        f"fleet: {runs} runs x {GPUS} GPUs at {HZ} Hz = {runs * GPUS * HZ:,} "
        f"samples/s of real time; {len(batches):,} batches of {span([b.height for b in batches])} "
        f"rows ({span([len(g) for g in groups])} run(s), {batch_s} s each), epochs of {epoch_s} s"
    )
    print(
        f"  ingested {rows:,} samples in {wall:.2f} s: {rows / wall:,.0f} samples/s "
        f"({rows / busy:,.0f} samples/s counting only ingest calls)"
    )
    print(
        f"  epochs finished: {done:,} of {epoch * runs:,} marked (STEP updated for each); "
        f"samples held in memory at the end: {held:,} of {rows:,}"
    )
    out = {"samples_per_s": rows / wall}
    if latencies:
        lat = np.array(latencies)
        print(
            f"  arrival -> updated projection: median {np.median(lat) * 1e3:.1f} ms, "
            f"max {lat.max() * 1e3:.1f} ms over {len(lat):,} epoch-closing batches "
            "(the whole ingest call, marks included)"
        )
        out["latency_max_s"] = float(lat.max())
    print(
        f"  real-time factor: {rows / wall / (runs * GPUS * HZ):.2f}x "
        "(>= 1 keeps up with the fleet)"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=whole_arg(1), default=1250, help="concurrent runs (8 GPUs each)")
    ap.add_argument("--runs-per-batch", type=whole_arg(1), default=1250)
    ap.add_argument("--seconds", type=whole_arg(1), default=70, help="seconds of data")
    ap.add_argument("--batch-seconds", type=whole_arg(1), default=1)
    ap.add_argument("--epoch-s", type=whole_arg(1), default=30)
    ap.add_argument(
        "--node-batch-seconds",
        type=whole_arg(0),
        default=5,
        help="also run the per-node case: one node's batch of this many s (0: skip)",
    )
    args = ap.parse_args()
    if args.epoch_s >= args.seconds:
        ap.error(
            f"--epoch-s ({args.epoch_s} s) must be shorter than --seconds ({args.seconds} s): "
            "no epoch would end within the data"
        )
    print(
        f"machine: {os.cpu_count()} CPUs, pinned to 1 core, POLARS_MAX_THREADS="
        f"{os.environ['POLARS_MAX_THREADS']}"
    )
    run_case(args.runs, args.runs_per_batch, args.seconds, args.batch_seconds, args.epoch_s)
    if args.node_batch_seconds:
        print("per-node batches (a sidecar's batch sent straight to the aggregator):")
        run_case(args.runs, 1, args.seconds, args.node_batch_seconds, args.epoch_s)


if __name__ == "__main__":
    main()
