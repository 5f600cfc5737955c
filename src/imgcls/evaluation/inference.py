"""Per-sample inference through training's eval path: every sample's logits, prediction and loss."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgcls.evaluation.prediction_rows import topk_indices  # noqa: F401  (torch-free, for the ONNX predictor; re-exported)
from imgcls.log import progress

# the same transfer, normalization and memory format as engine.evaluate: the accuracy of the
# val split and the best checkpoint then equals the one recorded in training, bit for bit
from imgcls.training.engine import Placement, to_device


@dataclass
class Predictions:
    """Loader order. targets are -1 for unlabelled images; losses is None without labels."""

    logits: np.ndarray  # (N, C) float32, as the model returned them
    preds: np.ndarray  # (N,) argmax on the device, as engine.evaluate takes it
    targets: np.ndarray  # (N,)
    losses: np.ndarray | None  # (N,) the configured loss of each sample

    # with test-time augmentation: logits are the log of the views' mean probabilities, and
    # `plain` holds the predictions of the unaugmented images alone (the numbers without TTA)
    plain: Predictions | None = None

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


TTA_VIEWS = ("hflip", "vflip", "crops")


def check_views(views: Sequence[str]) -> list[str]:
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise ValueError(
            f"tta_views: {', '.join(map(str, unknown))} unknown; choose from {', '.join(TTA_VIEWS)}"
        )
    return list(dict.fromkeys(views))


def augmented_views(images: torch.Tensor, views: Sequence[str], crop_scale: float) -> list[torch.Tensor]:
    """The batch itself first, then each view: horizontal and vertical flips, and `crops`: the four
    corners and the center of the batch enlarged by crop_scale (bilinear), each at the input size."""
    out = [images]
    for view in views:
        if view == "hflip":
            out.append(images.flip(-1))
        elif view == "vflip":
            out.append(images.flip(-2))
        elif view == "crops":
            h, w = images.shape[-2:]
            big_h, big_w = max(h, round(h * crop_scale)), max(w, round(w * crop_scale))
            big = nn.functional.interpolate(images, size=(big_h, big_w), mode="bilinear", align_corners=False)
            dy, dx = big_h - h, big_w - w
            for top, left in [(0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, dx // 2)]:
                out.append(big[..., top : top + h, left : left + w])
    return out


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader,
    place: Placement,
    *,
    loss_fn: Callable | None = None,
    description: str = "predict",
    views: Sequence[str] = (),
    crop_scale: float = 1.15,
) -> Predictions:
    """Run the model in eval mode over the loader; the loss is computed when loss_fn is given.

    With `views` (test-time augmentation, see augmented_views) each sample's prediction is the mean
    of its views' softmax probabilities, and its loss the configured loss of their log."""
    model.eval()
    views = check_views(views)
    sample_loss = per_sample_loss(loss_fn) if loss_fn is not None else None
    logits_all, preds_all, targets_all, losses_all = [], [], [], []
    plain_logits, plain_preds, plain_losses = [], [], []
    with progress(description, len(loader), every=place.log_every) as advance:
        for batch in loader:
            images, targets = to_device(batch, place.device, place.normalize, place.channels_last)
            logits = model(images)
            if views:
                plain_logits.append(logits.float())
                plain_preds.append(logits.argmax(1))
                if sample_loss is not None:
                    plain_losses.append(sample_loss(logits, targets).double())
                # in float64: a confident model's small probabilities would underflow float32 to 0
                probs = torch.stack(
                    [logits.double().softmax(1)]
                    + [model(v).double().softmax(1) for v in augmented_views(images, views, crop_scale)[1:]]
                ).mean(0)
                # softmax(log p) = p: every consumer of logits sees the mean (a 0 is floored, not -inf)
                logits = probs.clamp_min(torch.finfo(torch.float64).tiny).log()
            preds_all.append(logits.argmax(1))
            logits_all.append(logits.float())
            targets_all.append(targets)
            if sample_loss is not None:
                losses_all.append(sample_loss(logits, targets).double())
            advance()
    if not logits_all:
        raise ValueError("no samples to predict")

    def cat(parts: list[torch.Tensor]) -> np.ndarray | None:
        return torch.cat(parts).cpu().numpy() if parts else None

    targets_np = cat(targets_all)
    plain = Predictions(cat(plain_logits), cat(plain_preds), targets_np, cat(plain_losses)) if views else None
    return Predictions(cat(logits_all), cat(preds_all), targets_np, cat(losses_all), plain=plain)
