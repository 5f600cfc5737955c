"""A run's parts, built in one place for every command: device, precision, memory format, model, data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imgcls.checkpoint import CheckpointError
from imgcls.config import build as b
from imgcls.config.rules import REFERENCE_BATCH
from imgcls.errors import ConfigError
from imgcls.models import TIMM_TARGET as TIMM
from imgcls.models.pretrained_input import with_pretrained_input
from imgcls.models.torchvision import architecture_only, count_parameters
from imgcls.training.batchnorm import batchnorm_layers
from imgcls.training.distributed import SINGLE, Dist
from imgcls.training.engine import Placement, resolve_device
from imgcls.training.recipes import Recipe, build_mix, make_ema, scheduler_interval
from imgcls.training.run_data import build_data
from imgcls.training.seeding import configure_determinism, seed_everything
from imgcls.training.speed import FP32, Precision, compile_model, resolve_channels_last, resolve_precision


@dataclass
class Run:
    """What train, evaluate, predict, export and lr_find run: the model on its device with the
    pipelines of its config and how batches reach it (`place`); when training, also the data, its
    loaders, the optimizer, schedule, loss and the recipe the loop steps."""

    config: dict
    place: Placement
    model: nn.Module  # what checkpoints save and evaluation runs
    pipelines: dict[str, Any]
    class_names: list[str]
    # training only
    data: Any = None  # the data node's options (ImageFolderData)
    record: Any = None  # what the scan found: classes, samples per split, fingerprint (DataRecord)
    loaders: dict[str, Any] = field(default_factory=dict)
    eval_loader: Callable[[str], Any] | None = None  # a split through the eval pipeline (train's too)
    train_model: nn.Module | None = None  # model, or its DDP / torch.compile wrapper
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    loss_fn: Callable | None = None
    recipe: Recipe = field(default_factory=Recipe)
    # what the summary says about the data and how it is loaded, and the data's checkpoint entries
    info: dict[str, str] = field(default_factory=dict)
    loading: str = ""
    batch_size: int = 0  # per process
    checkpoint_entries: dict[str, Any] = field(default_factory=dict)

    # the names evaluation and export read (runs.restore returned them before this builder)
    device = property(lambda self: self.place.device)
    normalize = property(lambda self: self.place.normalize)
    channels_last = property(lambda self: self.place.channels_last)
    amp = property(lambda self: self.place.amp)
    dist = property(lambda self: self.place.d)
    log_every = property(lambda self: self.place.log_every)

    @property
    def trainer(self) -> dict:
        return self.config.get("trainer") or {}

    @property
    def epochs(self) -> int:
        return int(self.trainer["epochs"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def early_stopping(self) -> tuple[int | None, float]:
        early = self.trainer.get("early_stopping") or {}
        return early.get("patience"), float(early.get("min_delta") or 0.0)

    @property
    def keep_top_k(self) -> int:
        return int(self.trainer.get("keep_top_k") or 0)


def resolve_speed(trainer: dict, device: torch.device, train: bool) -> tuple[Precision, bool]:
    """(precision, channels_last), the one place both are resolved: evaluation then runs in the
    memory format training ran in (`auto` per device, as in training). Evaluation and prediction
    stay in fp32 (as they always were): their numbers do not depend on a training speed setting."""
    channels_last = resolve_channels_last(trainer.get("channels_last", "auto"), device)
    if not train:
        return FP32, channels_last
    # a checkpoint without trainer.precision was trained in fp32
    return Precision(resolve_precision(trainer.get("precision", "fp32"), device), device), channels_last


def _placement(
    config: dict, dist: Dist, train: bool, device_spec: str | None
) -> tuple[dict, Placement, dict, str | None]:
    """Checked by size, seeded for training, deterministic as configured, on its device: the config
    (with a pretrained timm model's input applied), where and how it runs, the split pipelines and
    what the pretrained input changed."""
    b.check_sizes(config)  # every command's config, a saved run's too: by key, before anything is allocated
    trainer = config.get("trainer") or {}
    if train:
        if trainer["epochs"] < 1:
            raise ConfigError(f"trainer.epochs must be at least 1, got {trainer['epochs']}")
        seed_everything(int(config["seed"]))
    # cuDNN picks its kernels by these: evaluation uses training's settings
    configure_determinism(bool(config.get("deterministic", False)))
    device = resolve_device(device_spec or str(config.get("device", "auto")))
    if trainer.get("num_threads"):
        torch.set_num_threads(int(trainer["num_threads"]))
    amp, channels_last = resolve_speed(trainer, device, train)
    # a timm model with pretrained weights: their input size, mean and std (config_to_run applied it already)
    config, pretrained_input = with_pretrained_input(config)
    if pretrained_input:
        logger.info(f"input: {pretrained_input}")
    pipelines, normalize = b.build_transforms(config["transforms"])
    place = Placement(
        device, normalize.to(device), channels_last, amp, dist, int(trainer.get("log_every_n_steps", 50))
    )
    return config, place, pipelines, pretrained_input


def build_run(
    config: dict,
    dist: Dist = SINGLE,
    *,
    train: bool,
    device_spec: str | None = None,
    ckpt: dict | None = None,
    weights: tuple[dict, Path] | None = None,
    split_file: Path | None = None,
) -> Run:
    """The run a plain config describes. Training (`train`): seeded, with the data checked first
    (a broken tree is reported before any model is built), the data split recorded in `split_file`
    and, for a resume (`ckpt`), the checkpoint's split and classes; the states are restored by
    resume.resume_into. Otherwise the model of the config with `weights` = (checkpoint state,
    its path), on the device and in the memory format training used."""
    config, place, pipelines, pretrained_input = _placement(config, dist, train, device_spec)
    trainer = config.get("trainer") or {}
    if not train:
        state, path = weights
        model = _restored_model(config, state, path, place)
        return Run(config, place, model, pipelines, list(state["class_names"]))
    parts = build_data(config, pipelines, place, ckpt, split_file)
    if pretrained_input:
        parts.info["input"] = pretrained_input
    # a resume restores every weight: it rebuilds without its pretrained weights or the network
    node = architecture_only(config["model"]) if ckpt else config["model"]
    model = b.build_model(node, num_classes=len(parts.class_names))
    if dist.enabled and trainer.get("sync_batchnorm"):
        if place.device.type != "cuda":
            raise ConfigError(
                "trainer.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs "
                "only); on CPU, set trainer.sync_batchnorm=false"
            )
        # same Parameter objects, new modules: batch statistics over the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = b.build_optimizer(config["optimizer"], model)
    accum = int(trainer.get("grad_accum_steps") or 1)
    if accum < 1:
        raise ConfigError(f"trainer.grad_accum_steps must be at least 1, got {accum}")
    steps_per_epoch = -(-len(parts.loaders["train"]) // accum)  # optimizer steps, for per-step schedules
    scheduler = b.build_scheduler(config["scheduler"], optimizer, steps_per_epoch=steps_per_epoch)
    loss_fn = b.build_loss(config["loss"], class_counts=parts.class_counts)
    model = _placed(model, place)
    train_model = model
    if dist.enabled:
        device = place.device
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    recipe = Recipe(
        recalibrate=parts.recalibration,
        grad_accum_steps=accum,
        grad_clip_norm=trainer.get("grad_clip_norm"),
        mix=build_mix(
            trainer.get("mixup_alpha", 0.0), trainer.get("cutmix_alpha", 0.0), len(parts.class_names)
        ),
        ema=make_ema(model, trainer.get("ema_decay")),
        step_scheduler=scheduler if scheduler_interval(scheduler) == "step" else None,
    )
    train_model = compile_model(train_model, bool(trainer.get("compile")))
    return Run(
        config, place, model, pipelines, parts.class_names, data=parts.data, record=parts.record, loaders=parts.loaders,
        eval_loader=parts.eval_loader, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
        loss_fn=loss_fn, recipe=recipe, info=parts.info, loading=parts.loading, batch_size=parts.batch_size,
        checkpoint_entries={"world_size": dist.world, **parts.checkpoint_entries},
    )  # fmt: skip


def _restored_model(config: dict, state: dict, checkpoint: Path, place: Placement) -> nn.Module:
    # the checkpoint holds every weight: a run evaluates without its pretrained weights or the network
    model = b.build_model(architecture_only(config["model"]), num_classes=len(state["class_names"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint}: its weights do not fit the model that the config builds "
            f"({config['model']}): {str(exc).splitlines()[0]}"
        ) from None
    return _placed(model, place)


def _placed(model: nn.Module, place: Placement) -> nn.Module:
    return model.to(
        place.device, memory_format=torch.channels_last if place.channels_last else torch.preserve_format
    )


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(run: Run, lr_source: object = None) -> dict[str, str]:
    """The summary's lines about what the run is: device, model, data, settings, batch.
    `lr_source`: optimizer.lr as the config wrote it (the rule `${linear_lr:...}`, or a number)."""
    config, trainer, device = run.config, run.trainer, run.device
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    accum, batch = run.recipe.grad_accum_steps, run.batch_size
    step_batch, lr = batch * run.dist.world * accum, config["optimizer"].get("lr")
    lines = {
        "device": where,
        "model": f"{config['model'].get('name', config['model']['_target_'])}"
        f"{' (timm)' if config['model'].get('_target_') == TIMM else ''}, {count_parameters(run.model):,} parameters",
        **run.info,
        "settings": f"precision {run.amp.name}, channels_last {run.channels_last}, "
        f"compile {bool(trainer.get('compile'))}, {run.loading}",
        "batch": f"{batch} per process x {run.dist.world} process(es) x {accum} accumulated = "
        f"{step_batch} per optimizer step; optimizer.lr {_number(lr)} "
        + (
            f"= {_number(lr * REFERENCE_BATCH / step_batch)} x {step_batch} / {REFERENCE_BATCH} (the rule, linear in the batch "
            "per optimizer step; optimizer.lr=<number> fixes it)"
            if isinstance(lr_source, str) and "linear_lr" in lr_source and isinstance(lr, float)
            else "as configured (not scaled)"
        ),
    }
    recal = run.recipe.recalibrate
    if recal is not None and batchnorm_layers(run.model):
        settings, n = trainer["bn_recalibration"], len(recal.loader)
        share = settings.get("max_share")
        capped = (
            f"; max_share {share} of {len(run.loaders['train'])}"
            if n < int(settings["batches"]) and share
            else ""
        )
        lines["bn recalibration"] = (
            f"BatchNorm statistics recomputed before each validation over {n} batches of {batch} "
            f"training images per process ({settings.get('transforms', 'eval')} transforms{capped})"
        )
    return lines
