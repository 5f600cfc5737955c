"""The training loop as plain functions: train_one_epoch / evaluate return {"split/name": float}."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import nn

from imgcls import __version__
from imgcls.checkpoint import save_checkpoint
from imgcls.errors import ConfigError, UserError
from imgcls.log import is_terminal, progress
from imgcls.seeding import epoch_seed, rng_state, seed_everything


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the step was not taken."""


def resolve_device(spec: str) -> torch.device:
    """`auto`: CUDA, then Apple's MPS, then the CPU; otherwise the named device, checked to exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device={spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r}, but CUDA is not available here: use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={spec!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={spec!r}, but MPS is not available here: use device=cpu or auto")
    return device


def _to_device(batch, device: torch.device, normalize: nn.Module, channels_last: bool):
    images, targets = batch
    images = normalize(images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    normalize: nn.Module,
    *,
    channels_last: bool = False,
    description: str = "train",
    log_every: int = 50,
) -> dict[str, float]:
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    start = time.perf_counter()
    with progress(description, len(loader), every=log_every) as advance:
        for step, batch in enumerate(loader):
            images, targets = _to_device(batch, device, normalize, channels_last)
            logits = model(images)
            loss = loss_fn(logits, targets)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"{description}: loss is {loss.item()} at step {step + 1}; the step was not taken. "
                    "Lower optimizer.lr, or check the data for broken images."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = targets.shape[0]
            seen += n
            loss_sum += loss.detach() * n
            correct += (logits.detach().argmax(1) == targets).sum()
            # reading values back syncs the device: only when a bar or a log line shows them
            if is_terminal() or (step + 1) % log_every == 0:
                advance(loss=loss_sum.item() / seen, acc=correct.item() / seen)
            else:
                advance()
    elapsed = time.perf_counter() - start
    return {
        "train/loss": loss_sum.item() / max(seen, 1),
        "train/acc": correct.item() / max(seen, 1),
        "train/time_s": elapsed,
        "train/images_per_s": seen / elapsed if elapsed > 0 else 0.0,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    loss_fn: Callable,
    device: torch.device,
    normalize: nn.Module,
    *,
    split: str = "val",
    channels_last: bool = False,
    log_every: int = 50,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics for `split`, plus every sample's target and prediction in loader order."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    targets_all, preds_all = [], []
    start = time.perf_counter()
    with progress(split, len(loader), every=log_every) as advance:
        for batch in loader:
            images, targets = _to_device(batch, device, normalize, channels_last)
            logits = model(images)
            loss_sum += loss_fn(logits, targets).double() * targets.shape[0]
            targets_all.append(targets)
            preds_all.append(logits.argmax(1))
            advance()
    elapsed = time.perf_counter() - start
    targets_np = torch.cat(targets_all).cpu().numpy() if targets_all else np.zeros(0, np.int64)
    preds_np = torch.cat(preds_all).cpu().numpy() if preds_all else np.zeros(0, np.int64)
    n = len(targets_np)
    metrics = {
        f"{split}/loss": loss_sum.item() / max(n, 1),
        f"{split}/acc": float((targets_np == preds_np).sum()) / max(n, 1),
        f"{split}/time_s": elapsed,
        f"{split}/images_per_s": n / elapsed if elapsed > 0 else 0.0,
    }
    return metrics, targets_np, preds_np


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    epoch: int,
    history: list[dict[str, float]],
    best_acc: float,
    best_epoch: int,
    config: dict,
    class_names: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to resume or evaluate, as tensors and plain Python values only.

    `extra` adds entries of its own (plain values), e.g. a fingerprint of the data."""
    return {
        **(extra or {}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "history": [dict(row) for row in history],
        "best_acc": best_acc,
        "best_epoch": best_epoch,
        "config": config,
        "class_names": list(class_names),
        "rng": rng_state(),
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
        "imgcls_version": __version__,
    }


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable,
    loaders: dict[str, Any],
    normalize: nn.Module,
    device: torch.device,
    *,
    epochs: int,
    seed: int,
    weights_dir: Path,
    config: dict,
    class_names: list[str],
    on_epoch: Callable[[dict[str, float], list[dict[str, float]]], None] = lambda m, h: None,
    checkpoint_extra: dict[str, Any] | None = None,
    channels_last: bool = False,
    log_every: int = 50,
) -> dict[str, Any]:
    """for epoch: train, validate, step the schedule, save last.pt (and best.pt when val/acc improves).

    Returns {"history", "best_acc", "best_epoch"}.
    """
    history: list[dict[str, float]] = []
    best_acc, best_epoch = -1.0, 0
    for epoch in range(1, epochs + 1):
        # every random draw of this epoch follows from (seed, epoch): shuffling, augmentation,
        # dropout, and the workers' seeds, which the loader draws from its generator
        seed_everything(epoch_seed(seed, epoch))
        loaders["train"].generator.manual_seed(epoch_seed(seed, epoch))
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(
            model, loaders["train"], loss_fn, optimizer, device, normalize,
            channels_last=channels_last, description=f"epoch {epoch}/{epochs}", log_every=log_every,
        )  # fmt: skip
        val_metrics, _, _ = evaluate(
            model, loaders["val"], loss_fn, device, normalize,
            split="val", channels_last=channels_last, log_every=log_every,
        )  # fmt: skip
        if scheduler is not None:
            scheduler.step()
        improved = val_metrics["val/acc"] > best_acc
        if improved:
            best_acc, best_epoch = val_metrics["val/acc"], epoch
        metrics = {"epoch": epoch, **train_metrics, **val_metrics, "val/acc_best": best_acc, "lr": lr}
        history.append(metrics)
        state = training_state(
            model, optimizer, scheduler, epoch=epoch, history=history, best_acc=best_acc,
            best_epoch=best_epoch, config=config, class_names=class_names, extra=checkpoint_extra,
        )  # fmt: skip
        save_checkpoint(state, weights_dir / "last.pt")
        if improved:
            save_checkpoint(state, weights_dir / "best.pt")
        logger.info(
            f"epoch {epoch}/{epochs}  train loss {metrics['train/loss']:.4f} acc {metrics['train/acc']:.4f}"
            f"  | val loss {metrics['val/loss']:.4f} acc {metrics['val/acc']:.4f}"
            f" (best {best_acc:.4f} @{best_epoch})  | lr {lr:.3g}"
            f"  | {metrics['train/time_s'] + metrics['val/time_s']:.1f} s"
            f" ({metrics['train/images_per_s']:.0f} img/s train)" + ("  *" if improved else "")
        )
        on_epoch(metrics, history)
    return {"history": history, "best_acc": best_acc, "best_epoch": best_epoch}
