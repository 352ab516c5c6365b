"""Load benchmark: many concurrent jobs and simulated devices at 1 Hz on a local Ray cluster.

A local Ray cluster (head plus ``--workers`` worker nodes) runs the real
aggregator actor and ``--sidecars`` sidecar actors (simulated nodes, spread
over the Ray nodes). Each sidecar replays a real recorded 1 Hz power trace
(the longest run of ../shared/data/seaa2023/traces.parquet, else a made-up
one, said so) on its share of ``--devices`` devices, every device shifted in
time so that they differ, looping, in real time. ``--jobs`` runs are started
on the aggregator and each is given its share of one sidecar's devices, as
the job runner attaches the GPUs Ray gives a job. Every job gets an epoch mark
every ``--epoch-s`` seconds, so its per-epoch energy and STEP projection keep
being updated.

Printed, every ``--every`` seconds: resident memory (MiB) of the aggregator,
all sidecars and this driver, the store's size, and the rows the sidecars
sent so far; at the end, samples produced by the sources vs stored (each
(run, node, device, time) once), lost and duplicated, epochs finished per
job, and the projection latency. That latency is measured with one more
simulated device driven from here: every ``--probe-s`` seconds it closes an
epoch and its samples are handed to the aggregator; the latency is from that
hand-over to the moment a query returns the updated projection, i.e. while
the aggregator takes the other devices' batches.

Usage::

    .venv/bin/python bench/load.py                 # 50 jobs, 1,000 devices, 10 minutes
    .venv/bin/python bench/load.py --minutes 3 --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.commands.common import positive_arg, whole_arg  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "seaa2023" / "traces.parquet"
UTC = dt.UTC
UTC_US = pl.Datetime("us", "UTC")


def real_trace(seconds: int) -> tuple[pl.DataFrame, str]:
    """A 1 Hz trace of ``seconds`` rows: the longest shared run, else a made-up one."""
    if SHARED.is_file():
        from profiler.sources.replay import load_trace

        runs = pl.read_parquet(SHARED, columns=["run_id"])["run_id"].value_counts(sort=True)
        longest = str(runs["run_id"][0])
        tr = load_trace(SHARED, run_ids=[longest]).head(seconds)
        return tr.select("device", "timestamp", "power_w"), f"real trace {longest} ({SHARED})"
    t0 = dt.datetime(2024, 1, 1, tzinfo=UTC)
    p = 150 + 80 * np.sin(np.arange(seconds) / 30.0)
    made_up = pl.DataFrame(
        {
            "device": ["0"] * seconds,
            "timestamp": [t0 + dt.timedelta(seconds=i) for i in range(seconds)],
            "power_w": p,
        }
    )
    return made_up, "made-up sine trace (shared traces absent)"


def device_trace(base: pl.DataFrame, devices: int) -> pl.DataFrame:
    """``devices`` devices "0".."N-1", each the base trace rotated by its own shift."""
    n = base.height
    power = base["power_w"].to_numpy()
    ts = base["timestamp"]
    parts = [
        pl.DataFrame(
            {"device": [str(d)] * n, "timestamp": ts, "power_w": np.roll(power, (37 * d) % n)}
        )
        for d in range(devices)
    ]
    return pl.concat(parts).with_columns(model=pl.lit("replayed GPU"))


def rss_mib(pid: int | None) -> float:
    """Resident memory of process ``pid`` in MiB (0 when gone or unknown)."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def dir_mib(path: Path) -> float:
    """Size of the files under ``path`` in MiB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _pid_of(_actor: object) -> int:
    return os.getpid()


def _instrument(actor: Any) -> None:
    """Inside the aggregator actor: time its store flushes and its ingest calls (server side)."""
    agg = actor.agg
    actor.bench_times = {"flush_s": [], "ingest_s": []}

    def wrap(name: str, key: str) -> None:
        fn = getattr(agg, name, None)
        if fn is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                actor.bench_times[key].append(time.perf_counter() - t)

        setattr(agg, name, timed)

    wrap("_flush_locked", "flush_s")  # the store write of one flush
    wrap("ingest_samples", "ingest_s")


def _warm(_actor: Any) -> None:
    """Inside the aggregator actor: load scipy.stats, which STEP's first band imports (~1.2 s)."""
    from estimators.step import _t_quantile

    _t_quantile(0.975, 2)


def _times(actor: Any) -> dict[str, list[float]]:
    return dict(getattr(actor, "bench_times", {}))


def actor_pid(handle: Any) -> int | None:
    """Process id of a Ray actor (run inside it with ``__ray_call__``); None if unavailable."""
    import ray

    try:
        return int(ray.get(handle.__ray_call__.remote(_pid_of), timeout=120))
    except Exception:
        return None


def layout_problem(jobs: int, devices: int, sidecars: int) -> str | None:
    """Why ``jobs`` runs sharing ``devices`` devices do not fit ``sidecars``; None if they do."""
    if min(jobs, devices, sidecars) < 1:
        return (
            f"--jobs, --devices and --sidecars must be at least 1; got {jobs}, {devices} "
            f"and {sidecars}"
        )
    if jobs % sidecars or devices % jobs:
        return (
            f"--jobs must be a multiple of --sidecars and --devices a multiple of --jobs; got "
            f"{jobs} jobs, {devices} devices, {sidecars} sidecars"
        )
    return None


def run_load(
    *,
    jobs: int = 50,
    devices: int = 1000,
    sidecars: int = 10,
    seconds: float = 600.0,
    epoch_s: float = 60.0,
    every_s: float = 30.0,
    probe_s: float = 10.0,
    workers: int = 2,
    root: Path | None = None,
    echo: bool = True,
    warm: bool = False,
) -> dict[str, Any]:
    """Run the load and return its figures (see the module docstring).

    Args:
        jobs: Concurrent runs (a multiple of ``sidecars``).
        devices: Simulated devices (a multiple of ``jobs``), sampled at 1 Hz.
        sidecars: Sidecar actors (simulated nodes).
        seconds: How long the devices are sampled, in s.
        epoch_s: Seconds between two epoch marks of a job.
        every_s: Seconds between two memory readings.
        probe_s: Seconds between two projection-latency probes.
        workers: Ray worker nodes besides the head.
        root: Folder for the store and journals (default a temporary one).
        echo: Print the readings as they come.
        warm: Load the estimators' lazy imports (scipy.stats) in the aggregator
            before the load starts, as an aggregator that warms up at start would.

    Returns:
        ``memory`` (list of readings), ``produced``, ``sent``, ``stored``,
        ``duplicates``, ``lost``, ``epochs_done`` (finished per job: min, max),
        ``latency_s`` (probe latencies, s), ``probe_ingest_s`` (their ingest
        calls alone, s), ``probe_at_s`` (when each probe started, s),
        ``loadavg`` (1, 5, 15-minute load averages at the start and the end),
        ``flush_s`` and ``ingest_server_s`` (durations of the aggregator's
        store flushes and ingest calls, timed inside its actor, s),
        ``trace`` and the set-up.

    Raises:
        ValueError: A size below 1, ``jobs`` not a multiple of ``sidecars`` or
            ``devices`` not a multiple of ``jobs`` (before any Ray node starts).

    """
    import ray
    from ray.cluster_utils import Cluster

    from cluster.actors import SIDECAR_PREFIX, aggregator, journal_dir_for, sidecar_actor
    from profiler.store import Store

    problem = layout_problem(jobs, devices, sidecars)
    if problem:
        raise ValueError(problem)
    per_job = devices // jobs
    jobs_per_sidecar = jobs // sidecars
    root = root or Path(tempfile.mkdtemp(prefix="wattwise-load-"))
    store_root = root / "store"
    base, trace_note = real_trace(max(int(seconds) + 120, 600))
    trace = device_trace(base, per_job * jobs_per_sidecar)

    def say(msg: str) -> None:
        if echo:
            print(msg, flush=True)

    saved = os.environ.pop("RAY_ADDRESS", None)
    small: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    for k in range(workers):
        cluster.add_node(**small, resources={f"node_type:sim-{k}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="wattwise-load", include_dashboard=False)
    try:
        agg = aggregator(store_root, options={"flush_interval_s": 2.0}, retrain_delay_s=3600)
        agg_pid = int(ray.get(agg.ping.remote(), timeout=120)["pid"])
        ray.get(agg.__ray_call__.remote(_instrument), timeout=120)
        if warm:
            ray.get(agg.__ray_call__.remote(_warm), timeout=120)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
        handles = []
        for s in range(sidecars):
            name = f"sim-{s:02d}"
            handles.append(
                sidecar_actor(
                    nodes[s % len(nodes)],
                    name,
                    # Anchored when the source opens in its actor: sample times follow the clock.
                    [("replay", {"trace": trace, "speed": 1.0, "loop": True})],
                    name=SIDECAR_PREFIX + name,
                    interval_s=1.0,
                    batch_interval_s=5.0,
                    journal_dir=journal_dir_for(root / "journal", name),
                    send_timeout_s=60.0,
                )
            )
        run_ids = []
        for j in range(jobs):
            rid = f"load-{j:03d}"
            run_ids.append(rid)
            ray.get(
                agg.start_run.remote({"run_id": rid, "node_type": "sim", "planned_epochs": 999})
            )
            s, k = divmod(j, jobs_per_sidecar)
            gpus = [str(k * per_job + d) for d in range(per_job)]
            ray.get(handles[s].attach_job.remote(rid, gpus, None), timeout=120)
        # Epoch 0 of every job starts once all jobs hold their devices (a stream must have
        # a sample at its epoch's start for the epoch to be complete).
        started = dt.datetime.now(UTC) + dt.timedelta(seconds=2)
        probe = "load-probe"
        ray.get(agg.start_run.remote({"run_id": probe, "node_type": "sim", "planned_epochs": 999}))
        sidecar_pids = [actor_pid(h) for h in handles]
        say(
            f"load: {jobs} jobs x {per_job} devices = {devices} devices at 1 Hz on {sidecars} "
            f"sidecars, {workers + 1} Ray nodes, {seconds:.0f} s; {trace_note}"
        )
        say(f"{'t_s':>6} {'agg_MiB':>8} {'sidecars_MiB':>12} {'driver_MiB':>10} "
            f"{'store_MiB':>9} {'sent_rows':>10} {'agg_rows':>9}")  # fmt: skip
        memory: list[dict[str, float]] = []
        latency: list[float] = []
        ingest_s: list[float] = []  # of those, the ingest call alone (queueing included)
        probe_at: list[float] = []  # when each probe started, s after the start
        load_before = os.getloadavg()
        marks_sent = 0
        t0 = time.monotonic()
        next_mem = t0
        next_probe = t0 + probe_s
        next_epoch = t0 + epoch_s
        epoch = 0
        probe_epoch = 0
        probe_last = dt.datetime.now(UTC).replace(microsecond=0)
        probe_mark_start: dt.datetime | None = None  # epoch 0 starts on the first sample
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            # Every job closes epoch `epoch` (not in the last 7 s: its samples need a batch
            # interval to arrive before the sidecars stop).
            if now >= next_epoch and now - t0 <= seconds - 7:
                end = started + dt.timedelta(seconds=(epoch + 1) * epoch_s)
                marks = pl.DataFrame(
                    {
                        "run_id": run_ids,
                        "epoch": [epoch] * jobs,
                        "start": [started + dt.timedelta(seconds=epoch * epoch_s)] * jobs,
                        "end": [end] * jobs,
                    },
                    schema_overrides={"start": UTC_US, "end": UTC_US},
                )
                ray.get(agg.ingest_epochs.remote(marks), timeout=120)
                marks_sent += jobs
                epoch += 1
                next_epoch += epoch_s
            if now >= next_probe:  # one epoch of the probe device, timed
                wall = dt.datetime.now(UTC)
                n = max(2, int((wall - probe_last).total_seconds()))
                ts = [probe_last + dt.timedelta(seconds=i) for i in range(1, n + 1)]
                batch = pl.DataFrame(
                    {
                        "run_id": probe,
                        "node": "probe",
                        "device": "0",
                        "timestamp": ts,
                        "power_w": 100.0,
                        "source": "replay",
                    },
                    schema_overrides={"timestamp": UTC_US},
                )
                # The epoch ends just before the batch's last sample, so this batch finishes it.
                mark = pl.DataFrame(
                    {"run_id": [probe], "epoch": [probe_epoch],
                     "start": [probe_mark_start or ts[0]], "end": [ts[-2]]},
                    schema_overrides={"start": UTC_US, "end": UTC_US},
                )  # fmt: skip
                ray.get(agg.ingest_epochs.remote(mark), timeout=120)
                tp = time.perf_counter()
                ray.get(agg.ingest_samples.remote(batch), timeout=120)
                ingest_s.append(time.perf_counter() - tp)
                while ray.get(agg.status.remote(probe), timeout=120)["epochs_done"] <= probe_epoch:
                    if time.perf_counter() - tp > 60:
                        break
                latency.append(time.perf_counter() - tp)
                probe_at.append(round(now - t0, 1))
                probe_epoch += 1
                probe_last = ts[-1]
                probe_mark_start = ts[-2]
                next_probe += probe_s
            if now >= next_mem:
                sent = sum(int(ray.get(h.stats.remote(), timeout=120)["sent"]) for h in handles)
                st = ray.get(agg.stats.remote(), timeout=120)
                row = {
                    "t_s": round(now - t0, 1),
                    "aggregator_mib": round(rss_mib(agg_pid), 1),
                    "sidecars_mib": round(sum(rss_mib(p) for p in sidecar_pids), 1),
                    "driver_mib": round(rss_mib(os.getpid()), 1),
                    "store_mib": round(dir_mib(store_root), 1),
                    "sent_rows": sent,
                    "aggregator_rows": int(st["samples"]),
                }
                memory.append(row)
                say(
                    f"{row['t_s']:>6.0f} {row['aggregator_mib']:>8.1f} "
                    f"{row['sidecars_mib']:>12.1f} {row['driver_mib']:>10.1f} "
                    f"{row['store_mib']:>9.1f} {sent:>10} {row['aggregator_rows']:>9}"
                )
                next_mem += every_s
            time.sleep(max(0.05, min(next_mem, next_probe, next_epoch) - time.monotonic()))
        # Stop sampling and deliver everything; then count what reached the store.
        final = [ray.get(h.stop.remote(), timeout=300) for h in handles]
        ray.get(agg.flush.remote(), timeout=300)
        held = {r: ray.get(agg.status.remote(r), timeout=120) for r in run_ids}
        inside = ray.get(agg.__ray_call__.remote(_times), timeout=120)
        store = Store(store_root)
        stored = store.samples(unassigned=True).filter(pl.col("node") != "probe")
        keys = stored.select("run_id", "node", "device", "timestamp")
        produced = sum(int(f["samples"]) for f in final)
        out: dict[str, Any] = {
            "setup": {
                "jobs": jobs,
                "devices": devices,
                "sidecars": sidecars,
                "seconds": seconds,
                "epoch_s": epoch_s,
                "ray_nodes": workers + 1,
            },
            "trace": trace_note,
            "memory": memory,
            "produced": produced,
            "sent": sum(int(f["sent"]) for f in final),
            "lost": sum(int(f["lost"]) for f in final),
            "pending": sum(int(f["pending"]) for f in final),
            "stored": stored.height,
            "duplicates": stored.height - keys.n_unique(),
            "unassigned": int(stored["run_id"].null_count()),
            "per_run_min": min(
                stored.drop_nulls("run_id").group_by("run_id").len()["len"].to_list() or [0]
            ),
            "epochs_marked": epoch,
            "epochs_done": [
                min(h["epochs_done"] for h in held.values()),
                max(h["epochs_done"] for h in held.values()),
            ],  # fmt: skip
            "projected_jobs": sum(
                1 for h in held.values() if h["projection"].get("energy_j") is not None
            ),
            "latency_s": latency,
            "probe_ingest_s": ingest_s,
            "probe_at_s": probe_at,
            "flush_s": inside.get("flush_s", []),
            "ingest_server_s": inside.get("ingest_s", []),
            "loadavg": {"start": list(load_before), "end": list(os.getloadavg())},
            "store": str(store_root),
        }
        ray.kill(agg, no_restart=True)
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def main() -> int:
    """Run the benchmark and print its figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=positive_arg, default=10.0, help="sampling time (10)")
    p.add_argument("--jobs", type=whole_arg(1), default=50, help="a multiple of --sidecars")
    p.add_argument("--devices", type=whole_arg(1), default=1000, help="a multiple of --jobs")
    p.add_argument("--sidecars", type=whole_arg(1), default=10)
    p.add_argument(
        "--workers", type=whole_arg(0), default=2, help="Ray worker nodes besides the head"
    )
    p.add_argument(
        "--epoch-s", type=positive_arg, default=60.0, help="seconds per epoch of each job"
    )
    p.add_argument(
        "--every", type=positive_arg, default=30.0, help="seconds between memory readings"
    )
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.add_argument(
        "--warm",
        action="store_true",
        help="import scipy.stats in the aggregator first (else the first STEP band pays ~1 s)",
    )
    args = p.parse_args()
    problem = layout_problem(args.jobs, args.devices, args.sidecars)
    if problem:
        p.error(problem)
    t = time.monotonic()
    r = run_load(
        jobs=args.jobs,
        devices=args.devices,
        sidecars=args.sidecars,
        seconds=args.minutes * 60,
        epoch_s=args.epoch_s,
        every_s=args.every,
        workers=args.workers,
        warm=args.warm,
    )
    mem = r["memory"]
    lat = np.array(r["latency_s"]) if r["latency_s"] else np.array([np.nan])
    quarter = mem[len(mem) // 4] if mem else {}
    print()
    print(f"samples produced by the sources: {r['produced']}")
    print(f"samples stored (unique):         {r['stored'] - r['duplicates']} "
          f"(duplicates {r['duplicates']}, lost {r['lost']}, still pending {r['pending']}, "
          f"unassigned {r['unassigned']})")  # fmt: skip
    print(f"rows sent (incl. resends):       {r['sent']}")
    print(f"epochs marked per job: {r['epochs_marked']}; finished per job: "
          f"{r['epochs_done'][0]}..{r['epochs_done'][1]}; jobs with a STEP projection: "
          f"{r['projected_jobs']}/{r['setup']['jobs']}")  # fmt: skip
    print(f"projection latency over {len(r['latency_s'])} probes: p50 {np.median(lat):.3f} s, "
          f"p95 {np.percentile(lat, 95):.3f} s, max {lat.max():.3f} s")  # fmt: skip
    if mem:
        for key in ("aggregator_mib", "sidecars_mib"):
            print(f"{key}: at {quarter['t_s']:.0f} s {quarter[key]:.1f}, at the end "
                  f"{mem[-1][key]:.1f} (min {min(m[key] for m in mem):.1f}, "
                  f"max {max(m[key] for m in mem):.1f})")  # fmt: skip
    ing = np.array(r["probe_ingest_s"]) if r["probe_ingest_s"] else np.array([np.nan])
    print(f"  of which the probe's ingest call: p50 {np.median(ing):.3f} s, max {ing.max():.3f} s; "
          f"probes over 1 s: {int((lat > 1).sum())}")  # fmt: skip
    when = zip(r["probe_at_s"], r["latency_s"], strict=True)
    slow = [f"{a:.0f} s: {x:.2f} s" for a, x in when if x > 1]
    if slow:
        print(f"  probes over 1 s (when: latency): {', '.join(slow)}")
    for key, what in (("flush_s", "store flushes"), ("ingest_server_s", "ingest calls")):
        x = np.array(r[key]) if r[key] else np.array([np.nan])
        print(f"aggregator {what} (inside the actor): {len(r[key])}, p50 {np.median(x):.3f} s, "
              f"p95 {np.percentile(x, 95):.3f} s, max {x.max():.3f} s")  # fmt: skip
    la = r["loadavg"]
    print(f"load average (1, 5, 15 min) at the start {la['start']}, at the end {la['end']}")
    print(f"wall time {time.monotonic() - t:.0f} s; machine: {os.cpu_count()} CPUs")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
