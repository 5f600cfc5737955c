"""The training loop as plain functions: train_one_epoch / evaluate return {"split/name": float}."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgcls.data.augment import Crops
from imgcls.errors import ConfigError, UserError
from imgcls.log import is_terminal, progress
from imgcls.training.distributed import SINGLE, Dist, all_sum, any_rank, gather
from imgcls.training.recipes import Recipe
from imgcls.training.speed import FP32, Precision


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


def to_device(batch, device: torch.device, normalize: nn.Module, channels_last: bool):
    images, targets = batch
    if isinstance(images, Crops):  # data.device_augment: the crops are resized and flipped here
        images = normalize(images.apply(device))
    else:
        images = normalize(images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


@dataclass(frozen=True)
class Placement:
    """Where and how batches run, the same for training, validation, recalibration and reports:
    the device, the normalization that ends the pipeline, the memory format, the precision, the ranks."""

    device: torch.device
    normalize: nn.Module
    channels_last: bool = False
    amp: Precision = FP32
    d: Dist = SINGLE
    log_every: int = 50


class StopTraining(Exception):
    """Raised inside an epoch at a step boundary; carries what resuming mid-epoch needs."""

    def __init__(self, step: int, partial: dict[str, float], signum: int | None = None):
        super().__init__(f"stopped after step {step}")
        self.step, self.partial, self.signum = step, partial, signum


class _Running:
    """An epoch's running sums, kept on the device (no sync per batch), continuing `partial`'s."""

    def __init__(self, partial: dict[str, float] | None, device: torch.device):
        partial = partial or {}
        self.loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=device, dtype=torch.float64)
        self.correct = torch.tensor(partial.get("correct", 0), device=device, dtype=torch.int64)
        self.seen = int(partial.get("seen", 0))
        self.spent, self.start = float(partial.get("time_s", 0.0)), time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = targets.shape[0]
        self.seen += n
        self.loss_sum += loss.detach() * n
        self.correct += (logits.detach().argmax(1) == targets).sum()

    def window(self) -> tuple:
        """The sums as they are now (clones: no device sync), to report if the next step fails."""
        return self.loss_sum.clone(), self.correct.clone(), self.seen

    def partial(self, window: tuple | None = None) -> dict[str, float]:
        loss_sum, correct, seen = window or (self.loss_sum, self.correct, self.seen)
        return {"loss_sum": loss_sum.item(), "correct": int(correct.item()), "seen": seen,
                "time_s": self.elapsed()}  # fmt: skip

    def shown(self, step: int, log_every: int) -> dict[str, float]:
        """What the progress bar shows: reading values back syncs the device, so only when a bar
        or a log line shows them."""
        if is_terminal() or step % log_every == 0:
            return {"loss": self.loss_sum.item() / self.seen, "acc": self.correct.item() / self.seen}
        return {}

    def elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.start


def train_one_epoch(
    model: nn.Module,
    loader,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    place: Placement,
    *,
    recipe: Recipe | None = None,
    description: str = "train",
    start: tuple[int, dict[str, float] | None] = (0, None),
) -> dict[str, float]:
    """One pass over `loader` from batch `start` = (step, partial), continuing partial's running
    sums (this rank's own under torchrun; the epoch's metrics are summed over ranks).

    With `recipe.grad_accum_steps` = k, gradients of k batches (each loss divided by k) make one
    optimizer step; clipping, the per-step schedule and the EMA follow each optimizer step.
    Stops before the optimizer step on a non-finite loss or gradient (NonFiniteLossError), and
    after an optimizer step when `recipe.should_stop()` returns a signal (StopTraining); both carry
    the batch count and the running sums so the epoch can be finished later exactly as it would
    have been."""
    recipe = recipe or Recipe()
    k, amp, device = max(int(recipe.grad_accum_steps), 1), place.amp, place.device
    module = getattr(model, "module", model)  # the model itself under DistributedDataParallel
    model.train()
    running = _Running(start[1], device)
    step, total = start[0], len(loader) + start[0]
    finite = torch.ones((), dtype=torch.bool, device=device)
    guard = _BufferGuard(module)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    with progress(description, total, every=place.log_every) as advance:
        for batch in loader:
            images, targets = to_device(batch, device, place.normalize, place.channels_last)
            first, last = step % k == 0, (step + 1) % k == 0 or step + 1 == total
            if first:
                guard.save()
                window = (running.window(), step)  # before this optimizer step's batches
            soft = recipe.mix(images, targets) if recipe.mix is not None else None
            if soft is not None:
                images, soft_targets = soft
            # under DDP, only the last batch of an accumulation window all-reduces gradients
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with amp.autocast():
                    logits = model(images)
                    loss = loss_fn(logits, soft_targets if soft is not None else targets)
                amp.backward(loss / k)
            finite &= torch.isfinite(loss)
            running.add(loss, logits, targets)
            step += 1
            if last:
                grad_norm = _grad_norm(params, optimizer, amp, device)
                # one device sync per optimizer step buys the guarantee that no NaN reaches the
                # weights; an fp16 gradient overflow is the GradScaler's to skip (amp.step)
                if not bool(finite & (torch.isfinite(grad_norm) | amp.skips_overflow)):
                    guard.restore()
                    raise _non_finite(description, step, finite, loss, grad_norm, running, window)
                if recipe.grad_clip_norm:
                    torch.nn.utils.clip_grads_with_norm_(params, recipe.grad_clip_norm, grad_norm)
                amp.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
                recipe.after_step(module)
            advance(**running.shown(step, place.log_every))
            if last:
                recipe.on_step()
                signum = any_rank(recipe.should_stop(), place.d, device)  # a signal on one rank stops all
                if signum is not None and step < total:
                    raise StopTraining(step, running.partial(), signum)
    elapsed = running.elapsed()
    total_loss, total_correct, total_seen = all_sum(
        [running.loss_sum.item(), running.correct.item(), running.seen], place.d, device
    )
    return {
        "train/loss": total_loss / max(total_seen, 1),
        "train/acc": total_correct / max(total_seen, 1),
        "train/time_s": elapsed,
        "train/images_per_s": total_seen / elapsed if elapsed > 0 else 0.0,
    }


class _BufferGuard:
    """BatchNorm statistics change during the forward pass itself: a copy taken before each
    optimizer step's batches (one fused multi-tensor copy) puts them back when the step fails."""

    def __init__(self, module: nn.Module):
        self.buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.before = [torch.empty_like(b) for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.before, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.before)


def _grad_norm(params, optimizer, amp: Precision, device) -> torch.Tensor:
    amp.unscale(optimizer)  # the norm, the check and clipping see the true gradients
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def _non_finite(description, step, finite, loss, grad_norm, running: _Running, window) -> NonFiniteLossError:
    what = "loss" if not bool(finite) else "gradient norm"
    value = loss.item() if what == "loss" else grad_norm.item()
    sums, w_step = window
    return NonFiniteLossError(
        f"{description}: the {what} is {value} at step {step}; the optimizer step was not taken. "
        "Lower optimizer.lr, or check the data for broken images.",
        step=w_step,
        partial=running.partial(sums),
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader, loss_fn: Callable, place: Placement, split: str = "val"
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics for `split`, plus every sample's target and prediction (under torchrun: gathered
    from every rank, so the numbers are those of one process evaluating the whole split)."""
    device, d = place.device, place.d
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    targets_all, preds_all = [], []
    start = time.perf_counter()
    with progress(split, len(loader), every=place.log_every) as advance:
        for batch in loader:
            images, targets = to_device(batch, device, place.normalize, place.channels_last)
            with place.amp.autocast():
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
