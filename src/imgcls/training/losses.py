"""Losses with class weights for imbalanced data: cross-entropy and focal loss (soft targets too)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.errors import ConfigError


def class_counts(samples: Sequence[tuple[str, int]], num_classes: int) -> list[int]:
    """Images per class in (path, class index) samples: what class weights are computed from."""
    counts = [0] * num_classes
    for _, target in samples:
        counts[target] += 1
    return counts


def class_weight_tensor(class_weights: str | Sequence[float] | None, class_counts: Sequence[int] | None):
    """None, `balanced` (n / (classes x count), scikit-learn's rule) or one weight per class."""
    if class_weights is None:
        return None
    if class_counts is None:
        raise ConfigError("loss.class_weights needs the class counts of the train split")
    if class_weights == "balanced":
        counts = torch.tensor(class_counts, dtype=torch.float32)
        if (counts == 0).any():
            raise ConfigError("loss.class_weights=balanced: a class has no training images")
        return counts.sum() / (len(counts) * counts)
    if isinstance(class_weights, str) or len(class_weights) != len(class_counts):
        raise ConfigError(
            f"loss.class_weights must be null, balanced, or {len(class_counts)} numbers (one per "
            f"class), got {class_weights!r}"
        )
    return torch.tensor([float(w) for w in class_weights])


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """torch's cross-entropy with `class_weights`; `class_counts` comes from the data at run time."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weights: str | Sequence[float] | None = None,
        class_counts: Sequence[int] | None = None,
    ):
        super().__init__(
            weight=class_weight_tensor(class_weights, class_counts), label_smoothing=label_smoothing
        )


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, so confident,
    easy samples count less. gamma=0 is cross-entropy. Accepts class indices or soft targets
    (mixup/cutmix)."""

    def __init__(
        self,
        gamma: float = 2.0,
        label_smoothing: float = 0.0,
        class_weights: str | Sequence[float] | None = None,
        class_counts: Sequence[int] | None = None,
    ):
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"loss.gamma must be >= 0, got {gamma}")
        self.gamma, self.label_smoothing = gamma, label_smoothing
        weight = class_weight_tensor(class_weights, class_counts)
        self.register_buffer("weight", weight if weight is not None else torch.empty(0), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = logits.shape[1]
        probs = F.one_hot(target, n).to(logits.dtype) if target.ndim == 1 else target.to(logits.dtype)
        if self.label_smoothing:
            probs = probs * (1 - self.label_smoothing) + self.label_smoothing / n
        log_p = F.log_softmax(logits, dim=1)
        focal = (1 - log_p.exp()).pow(self.gamma)
        per_class = -probs * focal * log_p
        if self.weight.numel():
            per_class = per_class * self.weight
        return per_class.sum(1).mean()
