"""GPU check: train torchvision models on an NVIDIA GPU, NVML sidecar at 0.1 s and epoch hooks.

For each (model, batch size) it trains on random tensors for a few short,
time-boxed epochs while a sidecar samples NVML every 0.1 s into a run store
under ``--out``, then compares the energy from the GPU's counter
(``nvmlDeviceGetTotalEnergyConsumption``) with the energy integrated from
its power readings, per run and per epoch. Writes ``--out/store`` (the
samples, epochs and runs in the store format), ``--out/summary.json`` and
prints a table. About 4 minutes on an H100 with the defaults.

    python bench/gpu_check.py --out gpu-check          # on a GPU machine
    python bench/gpu_check.py --device cpu --dry-run   # exercise the code anywhere

Exits 2 with a message when no usable NVIDIA GPU is present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class RunResult:
    run_id: str
    model: str
    batch_size: int
    epochs: int
    steps: int
    images_per_s: float
    duration_s: float
    n_samples: int
    sample_hz: float
    counter_energy_j: float | None
    power_energy_j: float
    diff_pct: float | None
    max_epoch_diff_pct: float | None
    mean_power_w: float
    gap_s: float
    sidecar_lost: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check-out", help="output folder (store + summary)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--models", default="resnet18,mobilenet_v3_small")
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--epoch-s", type=float, default=12.0, help="seconds per epoch")
    p.add_argument("--interval", type=float, default=0.1, help="sampling interval in s")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny: 2 epochs of 3 steps, 32x32 images, batch sizes 2 and 4",
    )
    return p.parse_args(argv)


def no_gpu(reason: str) -> int:
    print(
        f"gpu_check: no usable NVIDIA GPU: {reason}. This check needs a machine with an NVIDIA "
        "GPU and its driver (run it on an H100 node); to exercise the code without one, use "
        "`python bench/gpu_check.py --device cpu --dry-run`.",
        file=sys.stderr,
    )
    return 2


def open_source(device: str) -> tuple[Any, str]:
    """The NVML source for the training GPU (or the modelled CPU source), and its model name."""
    if device == "cpu":
        from profiler.sources.modelled import ModelledCpuSource

        src = ModelledCpuSource(100.0)
        return src, src.model or "cpu"
    from profiler.sources.nvml import NvmlSource

    index = int(device.split(":")[1]) if ":" in device else 0
    src = NvmlSource([index])
    return src, src._gpus[0].model


def train_run(
    arch: str, bs: int, args: argparse.Namespace, store: Any, source: Any, gpu_model: str
) -> RunResult:
    import polars as pl
    import torch
    import torchvision

    from estimators.energy import epoch_energy, run_energy
    from profiler.hooks import EpochHooks
    from profiler.sidecar import Sidecar, StoreReceiver

    dev = torch.device(args.device)
    run_id = f"gpucheck-{arch}-bs{bs}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    size = args.image_size
    model = getattr(torchvision.models, arch)(weights=None, num_classes=1000).to(dev)
    model = model.to(memory_format=torch.channels_last) if dev.type == "cuda" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(bs, 3, size, size, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (bs,), device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    side = Sidecar(
        [source],
        node="gpu-check",
        run_id=run_id,
        interval_s=args.interval,
        batch_interval_s=2.0,
        receiver=StoreReceiver(store),
        journal=Path(args.out) / "journal",
    )
    hooks = EpochHooks(run_id, store=store)
    started = datetime.now(UTC)
    side.start()
    for _ in range(2 if args.dry_run else 5):  # warm-up (cuDNN autotune) outside the epochs
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    steps = 0
    t_train = 0.0
    for _epoch in range(args.epochs):
        with hooks.epoch():
            t = time.perf_counter()
            n = 0
            while True:
                step()
                n += 1
                if args.dry_run and n >= 3:
                    break
                if not args.dry_run and n % 10 == 0:
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if time.perf_counter() - t >= args.epoch_s:
                        break
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_train += time.perf_counter() - t
            steps += n
    time.sleep(max(0.3, 3 * args.interval))  # let the last epoch's samples land
    stats = side.stop()
    ended = datetime.now(UTC)
    samples = store.samples(run_id)
    epochs = store.epochs(run_id)
    has_counter = samples["energy_j"].null_count() < samples.height
    power_only = samples.with_columns(energy_j=pl.lit(None, dtype=pl.Float64))
    # Energy within the epoch marks only, so warm-up and tear-down do not count.
    e_cnt = epoch_energy(samples, epochs) if has_counter else None
    e_pow = epoch_energy(power_only, epochs)
    counter_j = float(e_cnt["energy_j"].sum()) if e_cnt is not None else None
    power_j = float(e_pow["energy_j"].sum())
    diffs = (
        [
            100.0 * (p - c) / c
            for c, p in zip(e_cnt["energy_j"], e_pow["energy_j"], strict=True)
            if c > 0
        ]
        if e_cnt is not None
        else []
    )
    whole = run_energy(samples)
    span = (samples["timestamp"].max() - samples["timestamp"].min()).total_seconds()
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": [run_id],
                "job_name": ["gpu_check"],
                "node_type": [gpu_model],
                "gpu_model": [gpu_model],
                "gpu_count": [1 if dev.type == "cuda" else 0],
                "architecture": [arch],
                "batch_size": [bs],
                "image_height": [size],
                "image_width": [size],
                "planned_epochs": [args.epochs],
                "trained_epochs": [args.epochs],
                "precision": ["fp32"],
                "status": ["finished"],
                "start": [started],
                "end": [ended],
                "duration_s": [(ended - started).total_seconds()],
                "energy_j": [counter_j if counter_j is not None else power_j],
                "energy_source": ["measured" if dev.type == "cuda" else "modelled"],
                "config": [json.dumps({"interval_s": args.interval, "epoch_s": args.epoch_s})],
            }
        )
    )
    return RunResult(
        run_id=run_id,
        model=arch,
        batch_size=bs,
        epochs=args.epochs,
        steps=steps,
        images_per_s=steps * bs / t_train if t_train > 0 else 0.0,
        duration_s=(ended - started).total_seconds(),
        n_samples=samples.height,
        sample_hz=(samples.height - 1) / span if span > 0 else 0.0,
        counter_energy_j=counter_j,
        power_energy_j=power_j,
        diff_pct=100.0 * (power_j - counter_j) / counter_j if counter_j else None,
        max_epoch_diff_pct=max(diffs, key=abs) if diffs else None,
        mean_power_w=float(whole["mean_power_w"][0]) if whole.height else 0.0,
        gap_s=float(e_pow["gap_s"].max()) if e_pow.height else 0.0,
        sidecar_lost=stats.lost,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.epochs, args.image_size = 2, 32
        if args.batch_sizes == "64,256":
            args.batch_sizes = "2,4"
    t_start = time.monotonic()
    import torch

    if args.device != "cpu":
        if not torch.cuda.is_available():
            return no_gpu("torch.cuda.is_available() is False")
    from profiler.errors import WattwiseError
    from profiler.store import Store

    try:
        source, gpu_model = open_source(args.device)
    except WattwiseError as err:
        return no_gpu(str(err)) if args.device != "cpu" else _fail(err)
    if args.device != "cpu":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "store")
    results: list[RunResult] = []
    try:
        for arch in args.models.split(","):
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                r = train_run(arch, bs, args, store, source, gpu_model)
                results.append(r)
                print(
                    f"  {r.run_id}: {r.images_per_s:.0f} img/s, counter {r.counter_energy_j} J, "
                    f"power {r.power_energy_j:.1f} J",
                    flush=True,
                )
    finally:
        source.close()
    total = time.monotonic() - t_start
    summary = {
        "device": args.device,
        "gpu_model": gpu_model,
        "interval_s": args.interval,
        "dry_run": args.dry_run,
        "total_s": total,
        "store": str(out / "store"),
        "runs": [asdict(r) for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nGPU check on {gpu_model} ({args.device}), sampling every {args.interval} s; "
        f"{total:.0f} s in all"
    )
    head = (
        f"{'model':<20} {'bs':>4} {'img/s':>8} {'samples':>7} {'Hz':>5} {'counter J':>11} "
        f"{'power J':>11} {'diff %':>7} {'max ep %':>8} {'W':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        c = f"{r.counter_energy_j:.1f}" if r.counter_energy_j is not None else "n/a"
        d = f"{r.diff_pct:+.2f}" if r.diff_pct is not None else "n/a"
        m = f"{r.max_epoch_diff_pct:+.2f}" if r.max_epoch_diff_pct is not None else "n/a"
        print(
            f"{r.model:<20} {r.batch_size:>4} {r.images_per_s:>8.0f} {r.n_samples:>7} "
            f"{r.sample_hz:>5.1f} {c:>11} {r.power_energy_j:>11.1f} {d:>7} {m:>8} "
            f"{r.mean_power_w:>7.1f}"
        )
    print(f"\nstore: {out / 'store'}   summary: {out / 'summary.json'}")
    return 0


def _fail(err: Exception) -> int:
    print(f"gpu_check: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
