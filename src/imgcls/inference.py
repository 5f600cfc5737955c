"""Per-sample inference through training's eval path: every sample's logits, prediction and loss."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# the same transfer, normalization and memory format as engine.evaluate: the accuracy of the
# val split and the best checkpoint then equals the one recorded in training, bit for bit
from imgcls.engine import _to_device
from imgcls.log import progress


@dataclass
class Predictions:
    """Loader order. targets are -1 for unlabelled images; losses is None without labels."""

    logits: np.ndarray  # (N, C) float32, as the model returned them
    preds: np.ndarray  # (N,) argmax on the device, as engine.evaluate takes it
    targets: np.ndarray  # (N,)
    losses: np.ndarray | None  # (N,) the configured loss of each sample

    @property
    def probs(self) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits).double(), dim=1).numpy()

    @property
    def confidence(self) -> np.ndarray:
        return self.probs[np.arange(len(self.preds)), self.preds]

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.targets


def per_sample_loss(loss_fn: Callable) -> Callable:
    """The configured loss without its reduction: one value per sample, whose mean is the
    loss that training reports (for a loss without class weights)."""
    if isinstance(loss_fn, nn.modules.loss._Loss) and hasattr(loss_fn, "reduction"):
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"
        return unreduced
    # any other callable: one sample at a time (slower, but the same definition)
    return lambda logits, targets: torch.stack(
        [loss_fn(logits[i : i + 1], targets[i : i + 1]) for i in range(targets.shape[0])]
    )


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader,
    device: torch.device,
    normalize: nn.Module,
    *,
    loss_fn: Callable | None = None,
    channels_last: bool = False,
    description: str = "predict",
    log_every: int = 50,
) -> Predictions:
    """Run the model in eval mode over the loader; the loss is computed when loss_fn is given."""
    model.eval()
    sample_loss = per_sample_loss(loss_fn) if loss_fn is not None else None
    logits_all, preds_all, targets_all, losses_all = [], [], [], []
    with progress(description, len(loader), every=log_every) as advance:
        for batch in loader:
            images, targets = _to_device(batch, device, normalize, channels_last)
            logits = model(images)
            preds_all.append(logits.argmax(1))
            logits_all.append(logits.float())
            targets_all.append(targets)
            if sample_loss is not None:
                losses_all.append(sample_loss(logits, targets).double())
            advance()
    if not logits_all:
        raise ValueError("no samples to predict")
    return Predictions(
        logits=torch.cat(logits_all).cpu().numpy(),
        preds=torch.cat(preds_all).cpu().numpy(),
        targets=torch.cat(targets_all).cpu().numpy(),
        losses=torch.cat(losses_all).cpu().numpy() if losses_all else None,
    )


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices, best first; ties go to the lower index, as argmax breaks them, so
    the first column is always the prediction."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]
