"""``wattwise demo``: the main job end to end on the embedded default (local store, no GPU)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.commands.common import add_store_option, console, open_store

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from profiler.store import Store

#: The real traces, relative to the repository root (the demo runs from there).
SHARED_DATA = Path("..") / "shared" / "data" / "seaa2023"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded default (no GPU needed)",
        description=(
            "Imports the real SEAA 2023 traces into the store, checks the importers against the "
            "dataset's own energy figures, shows per-epoch energy by architecture and GPU, then "
            "trains a small torchvision model on the CPU while the sidecar measures a replayed "
            "RTX 3090 (a real recorded trace) and the epoch hooks mark its epochs."
        ),
    )
    p.add_argument(
        "--epochs", type=int, default=14, help="epochs of the live training run (default 14)"
    )
    p.add_argument(
        "--data",
        default=str(SHARED_DATA),
        metavar="DIR",
        help=f"folder of the SEAA 2023 dataset (default: {SHARED_DATA})",
    )
    add_store_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``wattwise demo``."""
    out = console()
    store = open_store(args)
    out.rule("[bold]wattwise demo")
    out.print(f"store: {store.root}")
    data = Path(args.data)
    if not (data / "runs.parquet").is_file():
        # Still a complete measured run: the CPU's own power, modelled from utilisation.
        out.print(
            f"[yellow]The real traces are not at {data} (pass --data DIR for the SEAA 2023 "
            "dataset). Running the live part only, with power modelled from CPU "
            "utilisation (stored as source 'modelled').[/]"
        )
        per_epoch = _live_run(store, None, out, epochs=args.epochs)
        _step_live(per_epoch, out, power_cap_w=100.0)
        out.print("Recorded-run comparison and PRE need the real traces: skipped.")
        return 0
    _import_dataset(store, data, out)
    _check_raw_csvs(store, data, out)
    _savings(store, out)
    per_epoch = _live_run(store, data, out, epochs=args.epochs)
    _step_live(per_epoch, out, power_cap_w=350.0)  # the replayed RTX 3090's board power
    _step_recorded(data, out)
    _pre(store, out)
    return 0


def _import_dataset(store: Store, data: Path, out: Console) -> None:
    from profiler.importers.seaa2023 import import_seaa2023

    out.rule("1. Import the real traces")
    summary = import_seaa2023(store, data, progress=True)
    out.print(
        f"{len(summary.runs)} runs, {summary.samples_total:,} samples "
        f"({summary.samples_new:,} new) in {store.root}"
    )


def _check_raw_csvs(store: Store, data: Path, out: Console) -> None:
    """Integrate the raw nvidia-smi CSVs and compare with the dataset's reported energy."""
    import json

    from rich.table import Table

    from estimators.energy import run_energy
    from profiler.importers.nvidia_smi import read_nvidia_smi_csv

    out.rule("2. Raw nvidia-smi CSVs against the dataset's own figures")
    runs = {r["run_id"]: r for r in store.runs().iter_rows(named=True)}
    table = Table(title_justify="left")
    for col in ("run", "samples", "wattwise kJ", "reported kJ", "difference"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for csv in sorted(data.glob("nvidia-smi-*.csv")):
        run_id = csv.stem.removeprefix("nvidia-smi-")
        samples = read_nvidia_smi_csv(csv, node="demo", run_id=run_id)
        energy = float(run_energy(samples)["energy_j"].item())
        config = json.loads(runs[run_id]["config"] or "{}") if run_id in runs else {}
        reported = config.get("gpu_energy_j")
        diff = f"{(energy / reported - 1) * 100:+.2f} %" if reported else "-"
        table.add_row(
            run_id,
            f"{samples.height:,}",
            f"{energy / 1e3:,.1f}",
            "-" if not reported else f"{reported / 1e3:,.1f}",
            diff,
        )
    out.print(table)
    out.print(
        "The dataset's figure sums integer-watt samples; wattwise integrates the "
        "centiwatt readings with trapezoids."
    )


def _savings(store: Store, out: Console) -> None:
    """Per-epoch energy by architecture and GPU: what picking the right GPU saves."""
    import polars as pl
    from rich.table import Table

    out.rule("3. Per-epoch energy by architecture and GPU (measured)")
    runs = store.runs().filter(
        (pl.col("status") == "finished")
        & pl.col("energy_j").is_not_null()
        & (pl.col("trained_epochs") > 0)
    )
    per = (
        runs.with_columns((pl.col("energy_j") / pl.col("trained_epochs")).alias("epoch_j"))
        .group_by("architecture", "gpu_model")
        .agg(pl.col("epoch_j").mean(), pl.len().alias("runs"))
        .sort("architecture", "epoch_j")
    )
    table = Table(title_justify="left")
    for col in ("architecture", "GPU", "runs", "kJ per epoch", "saving vs worst"):
        table.add_column(col, justify="left" if col in ("architecture", "GPU") else "right")
    for (arch,), part in per.partition_by("architecture", as_dict=True).items():
        worst = float(part["epoch_j"].max())  # type: ignore[arg-type]
        for i, r in enumerate(part.iter_rows(named=True)):
            saving = 1 - r["epoch_j"] / worst
            table.add_row(
                str(arch) if i == 0 else "",
                ("[bold green]" if i == 0 else "") + str(r["gpu_model"]).removeprefix("NVIDIA "),
                str(r["runs"]),
                f"{r['epoch_j'] / 1e3:,.1f}",
                f"{saving * 100:.1f} %" if saving > 0 else "-",
            )
        table.add_section()
    out.print(table)
    out.print("Data: del Rey et al., SEAA 2023 (GAISSA-UPC/seaa2023_ect), CC BY 4.0")


def _live_run(store: Store, data: Path | None, out: Console, *, epochs: int) -> pl.DataFrame:
    """Train on the CPU with epoch hooks while the sidecar samples a replayed GPU.

    Without recorded traces (``data`` is ``None``) the sidecar samples the
    modelled CPU source instead, and every sample says so.
    """
    import json
    import tempfile
    from datetime import UTC, datetime

    import polars as pl
    import torchvision  # noqa: F401  (seconds to import: do it before the replay clock starts)

    from estimators.energy import epoch_energy, run_energy
    from profiler.hooks import EpochHooks
    from profiler.sidecar import Sidecar, StoreReceiver
    from profiler.sources.base import PowerSource
    from profiler.sources.replay import ReplaySource, load_trace

    source: PowerSource
    if data is not None:
        out.rule("4. A live run: CPU training, replayed RTX 3090, epoch hooks")
        trace_run = "cloud-vgg16-00"
        trace = load_trace(data / "traces.parquet", run_ids=[trace_run])
        gpu, node_type = "NVIDIA GeForce RTX 3090", "cloud"
        source = ReplaySource(trace, model=gpu, device_prefix="")
        power = f"replay of {trace_run} as a fake {gpu}"
    else:
        from profiler.sources.modelled import ModelledCpuSource

        out.rule("4. A live run: CPU training, modelled CPU power, epoch hooks")
        gpu, node_type = "CPU (modelled)", "cpu"
        source = ModelledCpuSource()
        power = "modelled: CPU utilisation x 100 W board power"
    run_id = "demo-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    arch, batch, size, n_train = "mobilenet_v3_small", 32, 64, 128
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": [run_id],
                "job_name": ["wattwise demo"],
                "node_type": [node_type],
                "gpu_model": [gpu],
                "gpu_count": [1],
                "architecture": [arch],
                "batch_size": [batch],
                "image_height": [size],
                "image_width": [size],
                "training_size": [n_train],
                "planned_epochs": [epochs],
                "status": ["running"],
                "start": [datetime.now(UTC)],
                "config": [json.dumps({"power": power, "device": "cpu"})],
            }
        )
    )
    out.print(
        f"run {run_id}: {arch}, batch {batch}, {n_train} images {size}x{size}, {epochs} epochs; "
        f"power: {power}, sampled every 0.5 s"
    )
    with tempfile.TemporaryDirectory() as journal:
        sidecar = Sidecar(
            [source],
            node="demo-node",
            run_id=run_id,
            interval_s=0.5,
            batch_interval_s=1.0,
            receiver=StoreReceiver(store),
            journal=journal,
        )
        with sidecar:
            hooks = EpochHooks(run_id, store=store)
            _train(arch, batch, size, n_train, epochs, hooks, out)
            hooks.close()
        stats = sidecar.stats
    samples = store.samples(run_id)
    marks = store.epochs(run_id)
    total = run_energy(samples).row(0, named=True)
    store.write_runs(
        pl.DataFrame(
            {
                "run_id": [run_id],
                "status": ["finished"],
                "trained_epochs": [marks.height],
                "end": [datetime.now(UTC)],
                "duration_s": [total["duration_s"]],
                "energy_j": [total["energy_j"]],
                "energy_source": ["measured"],
            }
        )
    )
    per_epoch = epoch_energy(samples, marks)
    from rich.table import Table

    table = Table(title_justify="left")
    for col in ("epoch", "seconds", "energy J", "mean W", "gap s", "samples"):
        table.add_column(col, justify="right")
    for r in per_epoch.iter_rows(named=True):
        table.add_row(
            str(r["epoch"]),
            f"{r['duration_s']:.2f}",
            f"{r['energy_j']:.1f}",
            f"{r['mean_power_w']:.1f}",
            f"{r['gap_s']:.1f}",
            str(r["n_samples"]),
        )
    out.print(table)
    out.print(
        f"sidecar: {stats.samples} samples taken, {stats.sent} stored, {stats.spilled} spilled, "
        f"{stats.lost} lost. See it again with: wattwise energy --run {run_id}"
    )
    return per_epoch


def _train(
    arch: str, batch: int, size: int, n_train: int, epochs: int, hooks: object, out: Console
) -> None:
    """A real (small) torchvision training loop on the CPU, on generated images."""
    import torch
    import torchvision
    from rich.progress import Progress

    torch.manual_seed(0)
    torch.set_num_threads(1)  # leave the other core to the sidecar
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    data = torchvision.datasets.FakeData(
        size=n_train,
        image_size=(3, size, size),
        num_classes=10,
        transform=torchvision.transforms.ToTensor(),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    with Progress(console=out, transient=True) as bar:
        task = bar.add_task("training", total=epochs * len(loader))
        for epoch in range(epochs):
            with hooks.epoch(epoch):  # type: ignore[attr-defined]
                model.train()
                for x, y in loader:
                    opt.zero_grad()
                    loss_fn(model(x), y).backward()
                    opt.step()
                    bar.advance(task)


def _step_live(per_epoch: pl.DataFrame, out: Console, *, power_cap_w: float) -> None:
    """STEP after every epoch of the live run, as the aggregator computes it."""
    from rich.table import Table

    from estimators.step import OnlineStep

    out.rule("5. STEP on the live run, updated after every epoch")
    planned = per_epoch.height
    total = float(per_epoch["energy_j"].sum())
    step = OnlineStep(planned_epochs=planned, power_cap_w=power_cap_w)
    table = Table(title_justify="left")
    for col in ("after epoch", "projected J", "90 % band J", "stable", "error"):
        table.add_column(col, justify="right")
    for i, r in enumerate(per_epoch.iter_rows(named=True)):
        proj = step.update(r["energy_j"], r["duration_s"])
        if proj.energy_j is None:
            continue
        band = f"{proj.lower_j:,.0f} - {proj.upper_j:,.0f}" if proj.lower_j is not None else "-"
        table.add_row(
            str(i),
            f"{proj.energy_j:,.0f}",
            band,
            "yes" if proj.stable else "not yet",
            f"{(proj.energy_j / total - 1) * 100:+.1f} %",
        )
    out.print(table)
    out.print(
        f"measured total of the {planned} epochs: {total:,.0f} J. STEP trusts no regime "
        "before 10 epochs (the paper's warm-up), so early answers carry a wide band."
    )


def _step_recorded(data: Path, out: Console) -> None:
    """STEP and the baselines on every recorded run, seeing only its first 20 %."""
    import polars as pl

    from cluster.commands.step_cmds import print_summary
    from estimators.baselines import bench_step, summarise

    out.rule("6. STEP against today's rules on 189 recorded runs, after 20 % of each")
    runs = pl.read_parquet(data / "runs.parquet").filter(pl.col("has_trace"))
    traces = pl.read_parquet(data / "traces.parquet")
    pred = bench_step(runs, traces, fraction=0.2)
    print_summary(summarise(pred), title="absolute percentage error of the projected total")
    out.print(
        "step = wattwise; carbontracker = first epoch x epochs; mlco2 = board power x time; "
        "green_algorithms = board power x utilisation x time; naive = mean power so far x time"
    )


def _pre(store: Store, out: Console) -> None:
    """Retrain PRE on the store, then recommend a node type for a new job."""
    from rich.table import Table

    from cluster.retrain import latest_model, retrain
    from estimators.features import JobDescription
    from estimators.recommend import NodeType, recommend

    out.rule("7. PRE: retrain on the finished runs, recommend a node type for a new job")
    result = retrain(store)
    out.print(
        f"PRE v{result.version} on {result.rows} runs: "
        f"{'accepted' if result.accepted else 'rejected'} ({result.decision})"
    )
    model = latest_model(store.root / "models")
    job = JobDescription(
        architecture="resnet18",
        batch_size=64,
        image_height=224,
        image_width=224,
        training_size=50_000,
        validation_size=10_000,
        planned_epochs=30,
    )
    inventory = [
        NodeType("cloud", "NVIDIA GeForce RTX 3090", default=True),
        NodeType("local-ml-engineer-gamer", "NVIDIA GeForce RTX 3070"),
        NodeType("a100-pool", "NVIDIA A100-SXM4-80GB"),
    ]
    rec = recommend(model, job, inventory)
    table = Table(title_justify="left")
    for col in ("node type", "GPU", "kWh (30 epochs)", "90 % interval", "hours"):
        table.add_column(col, justify="left" if col in ("node type", "GPU") else "right")
    for r in rec.table.iter_rows(named=True):
        table.add_row(
            r["node_type"],
            str(r["gpu_model"]).removeprefix("NVIDIA "),
            f"{r['total_energy_kwh']:.2f}",
            f"{r['total_lower_kwh']:.2f} - {r['total_upper_kwh']:.2f}",
            f"{r['total_time_h']:.1f}",
        )
    out.print("job: resnet18, batch 64, 224x224, 50,000 images, 30 epochs")
    out.print(table)
    default = rec.savings_vs_default_pct
    out.print(
        f"recommended: {rec.chosen} (saves {rec.savings_vs_worst_pct:.0f} % against the worst"
        + (f", {default:.0f} % against the default" if default is not None else "")
        + f"); placement: {rec.placement}"
    )
