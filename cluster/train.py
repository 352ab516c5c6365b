"""The built-in training workload: a torchvision model (``weights=None``) on generated images.

``wattwise train --arch resnet18 --dataset fake`` trains a real model on the
CPU or a CUDA GPU for demos and profiling campaigns, marking each epoch with
:class:`profiler.hooks.EpochHooks`. Under ``wattwise run`` the run id comes
from ``$WATTWISE_RUN_ID`` and the marks go to the store at ``$WATTWISE_STORE``
(the runner forwards them to the aggregator); run on its own it also records
its run (``running``, then ``finished``/``failed``) in the store.

torch and torchvision are imported inside the functions so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from profiler.errors import BadInputError, WattwiseError

if TYPE_CHECKING:
    from estimators.features import JobDescription
    from profiler.hooks import EpochHooks

log = logging.getLogger(__name__)

#: Environment variables the job runner sets for the training process.
ENV_RUN_ID = "WATTWISE_RUN_ID"
ENV_EPOCHS = "WATTWISE_EPOCHS"
ENV_RUNNER = "WATTWISE_RUNNER"
DATASETS: tuple[str, ...] = ("fake",)
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """What to train.

    Attributes:
        arch: torchvision classification model name (built with ``weights=None``).
        dataset: ``fake``: ``torchvision.datasets.FakeData`` (random images).
        epochs: Epochs to train.
        batch_size: Samples per batch.
        image_size: Height and width of the square input images, in pixels.
        train_size: Training images per epoch.
        num_classes: Classes of the classifier head.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        lr: SGD learning rate.
        seed: Seed of the generated images and the weights.

    """

    arch: str = "resnet18"
    dataset: str = "fake"
    epochs: int = 3
    batch_size: int = 32
    image_size: int = 32
    train_size: int = 256
    num_classes: int = 10
    device: Device = "auto"
    lr: float = 0.01
    seed: int = 0

    def check(self) -> TrainConfig:
        """Validate; returns ``self``.

        Raises:
            BadInputError: A size is not positive or the dataset is unknown.

        """
        if self.dataset not in DATASETS:
            raise BadInputError(
                f"dataset must be one of {list(DATASETS)}; found {self.dataset!r} "
                "(this machine has no internet: 'fake' generates images locally)"
            )
        for name in ("epochs", "batch_size", "image_size", "train_size", "num_classes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise BadInputError(f"{name.replace('_', '-')} must be an integer > 0; found {v!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadInputError(f"device must be auto, cpu or cuda; found {self.device!r}")
        return self

    def job(self) -> JobDescription:
        """The job as PRE sees it (FLOPs are measured later by ``complete_job``)."""
        from estimators.features import JobDescription

        return JobDescription(
            architecture=self.arch,
            batch_size=self.batch_size,
            training_size=self.train_size,
            image_height=self.image_size,
            image_width=self.image_size,
            planned_epochs=self.epochs,
        )


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a training run did.

    Attributes:
        epochs: Epochs completed.
        epoch_s: Wall time of each epoch in s.
        losses: Mean training loss of each epoch.
        device: Where it trained (``cpu``, ``cuda:0``).

    """

    epochs: int
    epoch_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    device: str = "cpu"


def _device(choice: Device) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise BadInputError(
            "device cuda requested but torch sees no CUDA GPU here; use --device cpu or auto"
        )
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def build_model(arch: str, num_classes: int) -> Any:
    """A torchvision classifier with random weights.

    Raises:
        BadInputError: Unknown architecture (the message lists the known ones).

    """
    from torchvision import models

    names = sorted(models.list_models(module=models))
    if arch not in names:
        raise BadInputError(
            f"unknown architecture {arch!r}; expected a torchvision classification model: "
            + ", ".join(names)
        )
    return models.get_model(arch, weights=None, num_classes=num_classes)


def prepare(cfg: TrainConfig) -> tuple[str, Any]:
    """The device and the model of ``cfg``, checked so that training does not fail on input.

    Seeds torch, builds the model and passes two blank images of the
    configured size through it in training mode (see :func:`_check_input`).
    ``wattwise train`` calls this before recording its run.

    Returns:
        (device, model on that device).

    Raises:
        BadInputError: Bad sizes or dataset; ``cuda`` without a CUDA GPU; an
            unknown architecture; images too small for the architecture; or a
            last batch of one image that the model's batch norms cannot train on.

    """
    import torch

    cfg.check()
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.num_classes).to(device)
    _check_input(model, cfg, device)
    return device, model


def _check_input(model: Any, cfg: TrainConfig, device: str) -> None:
    """Refuse images the model cannot take and a last batch its batch norms cannot train on.

    Two blank images go through the model in training mode (auxiliary heads
    included, as training runs them) without gradients; the random stream
    (dropout) and the batch norms' running statistics are restored after, so
    the seeded run trains as it would without the check.

    Raises:
        BadInputError: The forward pass fails (``alexnet``, ``vit_b_16`` or
            ``inception_v3`` on 32x32 images), or ``train_size`` leaves a last
            batch of one image while a batch norm sees one value per channel
            (a 1x1 feature map: training raises "Expected more than 1 value
            per channel").

    """
    import torch

    sizes: list[int] = []  # values per channel of each batch norm, per image

    def seen(module: Any, inputs: tuple[Any, ...]) -> None:
        sizes.append(int(inputs[0][0].numel() // inputs[0].shape[1]))

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(seen) for m in norms]
    kept = {k: b.clone() for k, b in model.named_buffers()}
    side = cfg.image_size
    try:
        with torch.random.fork_rng(), torch.no_grad():
            model.train()
            model(torch.zeros(2, 3, side, side, device=device))
    except Exception as err:  # torchvision raises RuntimeError, ValueError or AssertionError
        raise BadInputError(
            f"--arch {cfg.arch} cannot train on {side}x{side} images ({type(err).__name__}: "
            f"{err}); give a larger --image-size (224 suits most torchvision models, 299 "
            "inception_v3)"
        ) from err
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(kept[k])
    last = cfg.train_size % cfg.batch_size or cfg.batch_size
    if last == 1 and sizes and min(sizes) == 1:
        raise BadInputError(
            f"--train-size {cfg.train_size} with --batch-size {cfg.batch_size} leaves a last "
            f"batch of 1 image, and {cfg.arch}'s batch norms at {side}x{side} see one value per "
            "channel, which training refuses; change --train-size or --batch-size so that no "
            "batch holds a single image (or give a larger --image-size)"
        )


def train(
    cfg: TrainConfig,
    hooks: EpochHooks | None = None,
    *,
    on_epoch: Callable[[int, float, float], object] | None = None,
    prepared: tuple[str, Any] | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` on generated images, marking each epoch through ``hooks``.

    Models with auxiliary heads (``googlenet``, ``inception_v3``) are trained
    on their main output.

    Args:
        cfg: What to train.
        hooks: Epoch hooks (``epoch_start``/``epoch_end`` around each epoch).
        on_epoch: Called with (epoch, seconds, mean loss) after each epoch.
        prepared: :func:`prepare`'s (device, model) for ``cfg``, if already
            made; else it is made here.

    Returns:
        Per-epoch times and losses.

    Raises:
        BadInputError: See :func:`prepare`.

    """
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    device, model = prepared if prepared is not None else prepare(cfg)
    data = datasets.FakeData(
        size=cfg.train_size,
        image_size=(3, cfg.image_size, cfg.image_size),
        num_classes=cfg.num_classes,
        transform=transforms.ToTensor(),
        random_offset=cfg.seed,
    )
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    times: list[float] = []
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        if hooks is not None:
            hooks.epoch_start(epoch)
        t0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            # googlenet and inception_v3 return their auxiliary heads' outputs too.
            loss = loss_fn(getattr(out, "logits", out), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if hooks is not None:
            hooks.epoch_end()
        times.append(dt)
        losses.append(total / max(n, 1))
        if on_epoch is not None:
            on_epoch(epoch, dt, losses[-1])
    return TrainResult(epochs=cfg.epochs, epoch_s=times, losses=losses, device=device)


def epochs_from_env(default: int) -> int:
    """Planned epochs from ``$WATTWISE_EPOCHS`` (``wattwise run --epochs``), else ``default``.

    Raises:
        BadInputError: The variable is set but not a positive integer.

    """
    raw = os.environ.get(ENV_EPOCHS)
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n <= 0:
        raise BadInputError(f"${ENV_EPOCHS} must be an integer > 0; found {raw!r}")
    return n


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's options (shared by ``wattwise train`` and the runner's command parsing)."""
    parser.add_argument("--arch", default="resnet18", help="torchvision model (default resnet18)")
    parser.add_argument(
        "--dataset", default="fake", choices=DATASETS, help="fake: generated images (default)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs (default $WATTWISE_EPOCHS, else 3)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch (32)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (32)")
    parser.add_argument("--train-size", type=int, default=256, help="images per epoch (256)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes (10)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0, help="seed of images and weights (0)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed :func:`add_train_arguments` options."""
    epochs = args.epochs if args.epochs is not None else epochs_from_env(3)
    return TrainConfig(
        arch=args.arch,
        dataset=args.dataset,
        epochs=epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        train_size=args.train_size,
        num_classes=args.num_classes,
        device=args.device,
        seed=args.seed,
    ).check()


def main(args: argparse.Namespace) -> int:
    """Run ``wattwise train``: train with epoch hooks; on its own, also record the run.

    Under ``wattwise run`` (``$WATTWISE_RUNNER`` set) the runner records the
    run; here only the epoch marks are written. On its own it refuses a run id
    the store has as an ended run, as ``wattwise run`` does, and records the
    run ``failed`` when epoch marks could not be written.

    Raises:
        BadInputError: Bad input (see :func:`prepare`), checked before the run
            is recorded; the run id names an ended run of the store; or the
            store refused epoch marks.
        StoreError: Epoch marks could not be written (the run is recorded
            ``failed``).

    """
    from profiler.hooks import EpochHooks
    from profiler.store import Store

    cfg = config_from_args(args)
    store = Store(getattr(args, "store", None))
    run_id = args.run_id or os.environ.get(ENV_RUN_ID)
    standalone = not os.environ.get(ENV_RUNNER)
    if run_id is None:
        from cluster.runner import new_run_id

        run_id = new_run_id("local")
    elif standalone:
        from cluster.runner import check_new_run_id

        check_new_run_id(run_id, store.root)
    # Everything is checked before the run is recorded: bad input leaves no 'failed' run.
    prepared = prepare(cfg)
    hooks = EpochHooks(run_id, store=store)
    if standalone:
        _record(store, run_id, cfg, "running")
    print(
        f"run {run_id}: {cfg.arch} on {cfg.dataset} images {cfg.image_size}x{cfg.image_size}, "
        f"{cfg.train_size} per epoch, batch {cfg.batch_size}, {cfg.epochs} epochs",
        flush=True,
    )

    def report(epoch: int, seconds: float, loss: float) -> None:
        print(f"epoch {epoch}: {seconds:.2f} s, loss {loss:.4f}", flush=True)

    try:
        result = train(cfg, hooks, on_epoch=report, prepared=prepared)
    except BaseException:
        try:  # the training error goes on; marks that cannot be written are only logged
            hooks.close()
        except WattwiseError as err:
            log.error("%s", err)
        if standalone:
            _record(store, run_id, cfg, "failed", epochs=len(hooks.marks))
        raise
    try:
        hooks.close()  # raises when epoch marks could not be written
    except BaseException:
        if standalone:
            _record(store, run_id, cfg, "failed", epochs=result.epochs)
        raise
    if standalone:
        _record(store, run_id, cfg, "finished", epochs=result.epochs)
    print(f"run {run_id}: trained {result.epochs} epochs on {result.device}", flush=True)
    return 0


def _record(
    store: Any, run_id: str, cfg: TrainConfig, status: str, *, epochs: int | None = None
) -> None:
    """Write the standalone run's record (no energy: nothing measured it)."""
    import polars as pl

    from profiler.sources.base import utc_now

    row: dict[str, Any] = {
        "run_id": run_id,
        "job_name": f"train {cfg.arch}",
        "architecture": cfg.arch,
        "batch_size": cfg.batch_size,
        "image_height": cfg.image_size,
        "image_width": cfg.image_size,
        "training_size": cfg.train_size,
        "planned_epochs": cfg.epochs,
        "trained_epochs": epochs,
        "status": status,
        "start" if status == "running" else "end": utc_now(),
    }
    store.write_runs(pl.DataFrame([row]))
