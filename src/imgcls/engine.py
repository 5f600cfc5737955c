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
from imgcls.distributed import SINGLE, Dist, all_sum, any_rank, gather, sync_buffers
from imgcls.errors import ConfigError, UserError
from imgcls.log import is_terminal, progress
from imgcls.seeding import epoch_seed, rng_state, seed_everything
from imgcls.speed import FP32, Precision


class NonFiniteLossError(UserError):
    """The loss or a gradient became NaN or infinite; the optimizer step was not taken."""

    def __init__(self, message: str, step: int = 0, partial: dict[str, float] | None = None):
        super().__init__(message)
        self.step, self.partial = step, partial or {}


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


class StopTraining(Exception):
    """Raised inside an epoch at a step boundary; carries what resuming mid-epoch needs."""

    def __init__(self, step: int, partial: dict[str, float], signum: int | None = None):
        super().__init__(f"stopped after step {step}")
        self.step, self.partial, self.signum = step, partial, signum


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
    start_step: int = 0,
    partial: dict[str, float] | None = None,
    should_stop: Callable[[], int | None] = lambda: None,
    on_step: Callable[[], None] = lambda: None,
    d: Dist = SINGLE,
    amp: Precision = FP32,
) -> dict[str, float]:
    """One pass over `loader` (from batch `start_step`, continuing `partial`'s running sums,
    this rank's own under torchrun; the epoch's metrics are summed over ranks).

    Stops before the optimizer step on a non-finite loss or gradient (NonFiniteLossError), and
    after a step when `should_stop()` returns a signal (StopTraining); both carry the step and
    the running sums so the epoch can be finished later exactly as it would have been."""
    model.train()
    partial = partial or {}
    loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=device, dtype=torch.float64)
    correct = torch.tensor(partial.get("correct", 0), device=device, dtype=torch.int64)
    seen = int(partial.get("seen", 0))
    spent = float(partial.get("time_s", 0.0))
    start = time.perf_counter()
    step = start_step

    def sums() -> dict[str, float]:
        return {"loss_sum": loss_sum.item(), "correct": int(correct.item()), "seen": seen,
                "time_s": spent + time.perf_counter() - start}  # fmt: skip

    # BatchNorm statistics change during the forward pass itself: a copy taken before each step
    # (one fused multi-tensor copy) puts them back when the step turns out non-finite
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    before = [torch.empty_like(b) for b in buffers]
    with progress(description, len(loader) + start_step, every=log_every) as advance:
        for batch in loader:
            images, targets = _to_device(batch, device, normalize, channels_last)
            if buffers:
                torch._foreach_copy_(before, buffers)
            with amp.autocast():
                logits = model(images)
                loss = loss_fn(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            amp.backward(loss)
            amp.unscale(optimizer)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
            # one device sync per step buys the guarantee that no NaN ever reaches the weights;
            # an fp16 gradient overflow is the GradScaler's to skip (amp.step), not an error
            if not bool(torch.isfinite(loss) & (torch.isfinite(grad_norm) | amp.skips_overflow)):
                if buffers:
                    torch._foreach_copy_(buffers, before)
                what = "loss" if not torch.isfinite(loss) else "gradient norm"
                value = loss.item() if what == "loss" else grad_norm.item()
                raise NonFiniteLossError(
                    f"{description}: the {what} is {value} at step {step + 1}; the optimizer step was "
                    "not taken. Lower optimizer.lr, or check the data for broken images.",
                    step=step,
                    partial=sums(),
                )
            amp.step(optimizer)
            n = targets.shape[0]
            seen += n
            loss_sum += loss.detach() * n
            correct += (logits.detach().argmax(1) == targets).sum()
            step += 1
            # reading values back syncs the device: only when a bar or a log line shows them
            if is_terminal() or step % log_every == 0:
                advance(loss=loss_sum.item() / seen, acc=correct.item() / seen)
            else:
                advance()
            on_step()
            signum = any_rank(should_stop(), d, device)  # a signal on one rank stops them all here
            if signum is not None and step < len(loader) + start_step:
                raise StopTraining(step, sums(), signum)
    elapsed = spent + time.perf_counter() - start
    total_loss, total_correct, total_seen = all_sum([loss_sum.item(), correct.item(), seen], d, device)
    return {
        "train/loss": total_loss / max(total_seen, 1),
        "train/acc": total_correct / max(total_seen, 1),
        "train/time_s": elapsed,
        "train/images_per_s": total_seen / elapsed if elapsed > 0 else 0.0,
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
    d: Dist = SINGLE,
    amp: Precision = FP32,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics for `split`, plus every sample's target and prediction (under torchrun: gathered
    from every rank, so the numbers are those of one process evaluating the whole split)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    targets_all, preds_all = [], []
    start = time.perf_counter()
    with progress(split, len(loader), every=log_every) as advance:
        for batch in loader:
            images, targets = _to_device(batch, device, normalize, channels_last)
            with amp.autocast():
                logits = model(images)
                loss_sum += loss_fn(logits, targets).double() * targets.shape[0]
            targets_all.append(targets)
            preds_all.append(logits.argmax(1))
            advance()
    elapsed = time.perf_counter() - start
    targets_np = torch.cat(targets_all).cpu().numpy() if targets_all else np.zeros(0, np.int64)
    preds_np = torch.cat(preds_all).cpu().numpy() if preds_all else np.zeros(0, np.int64)
    (total_loss,) = all_sum([loss_sum.item()], d, device)
    if d.enabled:
        targets_np = np.concatenate(gather(targets_np, d))
        preds_np = np.concatenate(gather(preds_np, d))
    n = len(targets_np)
    metrics = {
        f"{split}/loss": total_loss / max(n, 1),
        f"{split}/acc": float((targets_np == preds_np).sum()) / max(n, 1),
        f"{split}/time_s": elapsed,
        f"{split}/images_per_s": n / elapsed if elapsed > 0 else 0.0,
    }
    return metrics, targets_np, preds_np


def is_finite(model: nn.Module) -> bool:
    """Every floating-point parameter and buffer (BatchNorm statistics too) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


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
    on_step: Callable[[], None] = lambda: None,
    checkpoint_extra: dict[str, Any] | None = None,
    channels_last: bool = False,
    log_every: int = 50,
    resume: dict[str, Any] | None = None,
    should_stop: Callable[[], int | None] = lambda: None,
    train_model: nn.Module | None = None,
    d: Dist = SINGLE,
    amp: Precision = FP32,
) -> dict[str, Any]:
    """for epoch: train, validate, step the schedule, record, save last.pt (and best.pt on a new
    best val/acc). `resume` is a checkpoint whose model, optimizer, scheduler and random states
    were already restored; training continues after its epoch (and step, when it stopped
    mid-epoch). Returns {"history", "best_acc", "best_epoch"}.

    A signal (`should_stop`) or a non-finite loss stops the epoch at a step boundary: last.pt then
    holds that mid-epoch state and RunInterrupted / NonFiniteLossError propagate.

    Under torchrun, `train_model` is the DistributedDataParallel wrapper of `model`; every rank
    runs this loop in step and rank 0 alone writes checkpoints.
    """
    from imgcls.sampling import set_epoch
    from imgcls.signals import RunInterrupted

    resume = resume or {}
    history: list[dict[str, float]] = [dict(h) for h in resume.get("history", [])]
    best_acc, best_epoch = resume.get("best_acc", -1.0), resume.get("best_epoch", 0)
    start_step, partial = resume.get("step", 0), resume.get("partial")
    if resume.get("partial_ranks") and d.enabled:
        partial = resume["partial_ranks"][d.rank]
    # `is None`, not `or`: a torch.compile wrapper raises on bool() (it forwards __len__)
    train_model = model if train_model is None else train_model
    last_path = weights_dir / "last.pt"

    def state(epoch: int, partial: dict | None = None, **extra: Any) -> dict[str, Any]:
        if d.enabled:  # collectives: every rank builds the state, rank 0 saves it
            extra["rng_ranks"] = gather(rng_state(), d)
            extra["partial_ranks"] = gather(partial, d) if partial else None
        return training_state(
            model, optimizer, scheduler, epoch=epoch, history=history, best_acc=best_acc,
            best_epoch=best_epoch, config=config, class_names=class_names,
            extra={**(checkpoint_extra or {}), **amp.state_dict(), **extra, "partial": partial},
        )  # fmt: skip

    def save(state: dict[str, Any], path: Path) -> None:
        if d.main:
            save_checkpoint(state, path)

    for epoch in range(resume.get("epoch", 0) + 1, epochs + 1):
        if start_step == 0:
            # this epoch's dropout and other in-loop draws follow from (seed, epoch); mid-epoch,
            # the caller restored the generators as they were when the run stopped
            seed_everything(epoch_seed(seed, epoch))
        set_epoch(loaders["train"], epoch, start_step)
        lr = optimizer.param_groups[0]["lr"]
        try:
            train_metrics = train_one_epoch(
                train_model, loaders["train"], loss_fn, optimizer, device, normalize,
                channels_last=channels_last, description=f"epoch {epoch}/{epochs}", log_every=log_every,
                start_step=start_step, partial=partial, should_stop=should_stop, on_step=on_step, d=d,
                amp=amp,
            )  # fmt: skip
        except StopTraining as stop:
            save(state(epoch - 1, step=stop.step, partial=stop.partial), last_path)
            raise RunInterrupted(stop.signum, epoch, stop.step, str(last_path)) from None
        except NonFiniteLossError as exc:
            # the forward pass may already have pushed BatchNorm statistics to inf: save only a
            # finite state, so last.pt and best.pt never hold a NaN
            if is_finite(model):
                save(state(epoch - 1, step=exc.step, partial=exc.partial), last_path)
                where = f"{last_path} holds the weights before that step"
            else:
                where = f"the weights were no longer finite; {last_path} keeps the last finite epoch"
            raise NonFiniteLossError(f"{exc} ({where})", exc.step, exc.partial) from None
        start_step, partial = 0, None
        sync_buffers(model, d)  # evaluate and save rank 0's model, the same on every rank
        val_metrics, _, _ = evaluate(
            model, loaders["val"], loss_fn, device, normalize,
            split="val", channels_last=channels_last, log_every=log_every, d=d, amp=amp,
        )  # fmt: skip
        if not is_finite(model):
            raise NonFiniteLossError(
                f"epoch {epoch}: the weights became non-finite (an optimizer step overflowed); "
                f"{last_path} keeps the last finite epoch. Lower optimizer.lr."
            )
        if scheduler is not None:
            scheduler.step()
        improved = val_metrics["val/acc"] > best_acc
        if improved:
            best_acc, best_epoch = val_metrics["val/acc"], epoch
        metrics = {"epoch": epoch, **train_metrics, **val_metrics, "val/acc_best": best_acc, "lr": lr}
        history.append(metrics)
        logger.info(
            f"epoch {epoch}/{epochs}  train loss {metrics['train/loss']:.4f} acc {metrics['train/acc']:.4f}"
            f"  | val loss {metrics['val/loss']:.4f} acc {metrics['val/acc']:.4f}"
            f" (best {best_acc:.4f} @{best_epoch})  | lr {lr:.3g}"
            f"  | {metrics['train/time_s'] + metrics['val/time_s']:.1f} s"
            f" ({metrics['train/images_per_s']:.0f} img/s train)" + ("  *" if improved else "")
        )
        # record first, then save: a kill in between redoes this epoch on resume, and the
        # TensorBoard writer of the resumed run purges the orphaned points
        on_epoch(metrics, history)
        epoch_state = state(epoch, step=0, partial=None)
        save(epoch_state, last_path)
        if improved:
            save(epoch_state, weights_dir / "best.pt")
        signum = any_rank(should_stop(), d, device)
        if signum is not None and epoch < epochs:
            raise RunInterrupted(signum, epoch + 1, 0, str(last_path))
    return {"history": history, "best_acc": best_acc, "best_epoch": best_epoch}
