"""Training-recipe mechanics beside the loop: accumulation and clipping settings, mixup/cutmix,
EMA of the weights, scheduler cadence, early stopping and top-k checkpoint selection."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from imgcls.run_record import selection_score  # the one definition of best (best.pt, views, study)


@dataclass
class Recipe:
    """What train_one_epoch does around each optimizer step (defaults: plain SGD steps), and what
    fit does to the model before validating it."""

    grad_accum_steps: int = 1
    grad_clip_norm: float | None = None
    mix: Callable | None = None  # (images, targets) -> (images, soft targets)
    step_scheduler: Any = None  # stepped after every optimizer step (per-step schedules)
    ema: torch.optim.swa_utils.AveragedModel | None = None
    # before each validation: (models, epoch) -> cost metrics (batchnorm.Recalibration)
    recalibrate: Callable[[list[nn.Module], int], dict[str, float]] | None = None
    on_step: Callable[[], None] = lambda: None  # after every optimizer step (the run's heartbeat)
    should_stop: Callable[[], int | None] = lambda: None  # a signal's number: stop at this step

    def after_step(self, module: nn.Module) -> None:
        """After each optimizer step: the per-step schedule, then the EMA of the new weights."""
        if self.step_scheduler is not None:
            self.step_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(module)


def build_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Callable | None:
    """torchvision's batch MixUp and/or CutMix (one of them per batch when both are on)."""
    from torchvision.transforms import v2

    ops = []
    if mixup_alpha and mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
    if cutmix_alpha and cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def make_ema(model: nn.Module, decay: float | None) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights and buffers (BatchNorm statistics too)."""
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        from imgcls.errors import ConfigError

        raise ConfigError(f"trainer.ema_decay must be between 0 and 1 (e.g. 0.999), got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def scheduler_interval(scheduler: Any) -> str:
    """`step` (after every optimizer step), `plateau` (per epoch, on a validation metric) or `epoch`."""
    if scheduler is None:
        return "none"
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        return "plateau"
    if isinstance(scheduler, lr_scheduler.OneCycleLR):
        return "step"
    return getattr(scheduler, "interval", "epoch")


class WarmupCosineLR(lr_scheduler.LambdaLR):
    """Linear warmup from `warmup_start_factor` x lr over `warmup_epochs`, then cosine decay to
    `min_factor` x lr at the end of `epochs`; stepped after every optimizer step."""

    interval = "step"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 1.0,
        warmup_start_factor: float = 0.01,
        min_factor: float = 0.0,
    ):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.warmup_epochs, self.warmup_start_factor, self.min_factor = (
            warmup_epochs, warmup_start_factor, min_factor,
        )  # fmt: skip
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        # reads the attributes at every step, so a resumed run with more epochs (restore() sets
        # self.epochs) stretches the cosine from here on
        warmup = self.warmup_epochs * self.steps_per_epoch
        total = max(self.epochs * self.steps_per_epoch, 1)
        if step < warmup:
            return self.warmup_start_factor + (1 - self.warmup_start_factor) * step / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        # the bound method is not plain data: leave it out (it is rebuilt by __init__)
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        state.pop("lr_lambdas", None)
        self.__dict__.update(state)


def plateau_metric(scheduler: lr_scheduler.ReduceLROnPlateau, metrics: dict[str, float]) -> float:
    """ReduceLROnPlateau watches val/acc in mode max and val/loss in mode min."""
    return metrics["val/acc"] if scheduler.mode == "max" else metrics["val/loss"]


def early_stop_reason(history: list[dict[str, float]], patience: int | None, min_delta: float) -> str | None:
    """Why to stop now, or None: the score has not improved by more than min_delta for `patience`
    epochs. Computed from the history alone, so a resumed run decides as the original would."""
    if not patience or patience <= 0 or not history:
        return None
    best, best_epoch = -math.inf, 0
    for row in history:
        if selection_score(row) > best + min_delta:
            best, best_epoch = selection_score(row), int(row["epoch"])
    waited = int(history[-1]["epoch"]) - best_epoch
    if waited >= patience:
        return (
            f"stopped early at epoch {int(history[-1]['epoch'])}: validation accuracy has not improved "
            f"by more than {min_delta} for {waited} epochs (trainer.early_stopping.patience={patience}); "
            f"best {best:.4f} at epoch {best_epoch}"
        )
    return None


def top_k_epochs(history: list[dict[str, float]], k: int) -> list[int]:
    """The k best epochs by selection score (earlier epoch first among equals)."""
    ranked = sorted(history, key=lambda r: (-selection_score(r), r["epoch"]))
    return [int(r["epoch"]) for r in ranked[:k]]
