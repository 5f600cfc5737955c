"""BatchNorm recalibration before validation: running statistics recomputed for the current weights.

While the learning rate is high, BatchNorm's running statistics (an exponential average over
past batches, momentum 0.1 in ResNet, 0.01 in MobileNetV3) lag the weights they should describe:
validation then measures a model that does not exist. On a 10-class photo set, mobilenet_v3_small
validated at chance for 7 of 12 epochs; the same checkpoints with recomputed statistics scored
40.5% (issue #19). This is PreciseBN (pycls, fvcore): reset every BatchNorm layer's statistics and
average them over a fixed set of training batches, in train mode, without gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from loguru import logger
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from imgcls.data.loaders import make_loader
from imgcls.data.sampling import mix, set_epoch
from imgcls.errors import ConfigError
from imgcls.training.distributed import SINGLE, Dist
from imgcls.training.engine import to_device
from imgcls.training.speed import FP32, Precision

if TYPE_CHECKING:
    from imgcls.training.engine import Placement  # engine imports this module

TRANSFORMS = ("eval", "train")


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (SyncBatchNorm too) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    normalize: nn.Module,
    *,
    channels_last: bool = False,
    amp: Precision = FP32,
    d: Dist = SINGLE,
    seed: int = 0,
) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over `batches`
    (each batch's mean and unbiased variance, weighted equally: the cumulative average that
    momentum=None computes), the forward pass in train mode as in training, under the same
    autocast. Sums are kept in float64 and added across ranks, so torchrun gives what one process
    gives over all the ranks' batches. Momentum, num_batches_tracked, the train/eval flag of every
    module and the global random generators are left as they were (dropout and stochastic depth
    draw from `seed` inside a fork). Returns the number of batches (over all ranks); 0 changes nothing."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers]  # fmt: skip
    modes = {m: m.training for m in model.modules()}
    sums = [torch.zeros(2, m.num_features, dtype=torch.float64, device=device) for m in layers]
    count = 0
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for m in layers:
                m.momentum = 1.0  # after each forward, the running buffers hold that batch's statistics
            model.train()
            for batch in batches:
                images, _ = to_device(batch, device, normalize, channels_last)
                with amp.autocast():
                    model(images)
                for m, s in zip(layers, sums, strict=True):
                    s[0] += m.running_mean.double()
                    s[1] += m.running_var.double()
                count += 1
        if d.enabled:
            flat = torch.cat(
                [s.flatten() for s in sums] + [torch.tensor([count], dtype=torch.float64, device=device)]
            )
            dist.all_reduce(flat)
            count = int(flat[-1].item())
            sums = list(torch.split(flat[:-1], [s.numel() for s in sums]))
            sums = [s.view(2, -1) for s in sums]
    finally:
        for m, (momentum, tracked) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        for m, training in modes.items():
            m.training = training
    if count == 0:
        raise RuntimeError("BatchNorm recalibration got no batches")  # the caller's loader was empty
    for m, s in zip(layers, sums, strict=True):
        m.running_mean.copy_(s[0] / count)
        m.running_var.copy_(s[1] / count)
    return count


@dataclass
class Recalibration:
    """Recalibrate the model (and the EMA's copy) before each validation, from a loader of training
    images whose order and augmentation follow (seed, epoch) like the training loader's, so a
    resumed run recomputes exactly the same statistics."""

    loader: Any  # a DataLoader built by data.loaders.make_loader(train=True, max_batches=...)
    device: torch.device
    normalize: nn.Module
    seed: int
    channels_last: bool = False
    amp: Precision = FP32
    d: Dist = SINGLE

    def __call__(self, models: Iterable[nn.Module], epoch: int) -> dict[str, float]:
        """{"bn_recal/time_s", "bn_recal/images"}: what it cost; {} when no model has BatchNorm."""
        models = [m for m in models if batchnorm_layers(m)]
        if not models:
            return {}
        start = time.perf_counter()
        batches = 0
        for model in models:
            set_epoch(self.loader, epoch)
            batches = recalibrate(
                model, self.loader, self.device, self.normalize, channels_last=self.channels_last,
                amp=self.amp, d=self.d, seed=mix(self.seed, epoch, 3),
            )  # fmt: skip
        elapsed = time.perf_counter() - start
        images = batches * self.loader.batch_size
        logger.debug(f"BatchNorm statistics recomputed over {images} training images in {elapsed:.2f} s")
        return {"bn_recal/time_s": elapsed, "bn_recal/images": float(images)}


def build_recalibration(
    settings: dict | None,
    data,
    record,
    pipelines: dict,
    shard: dict,
    place: Placement,
    epoch_batches: int | None = None,
) -> Recalibration | None:
    """trainer.bn_recalibration -> a Recalibration, or None when it is off. `max_share` caps its
    batches at that share of an epoch's `epoch_batches` training batches, rounded up."""
    settings = settings or {}
    if not settings.get("enabled"):
        return None
    n, which = int(settings.get("batches") or 0), settings.get("transforms", "eval")
    if n < 1:
        raise ConfigError(f"trainer.bn_recalibration.batches must be at least 1, got {n}")
    if which not in TRANSFORMS:
        raise ConfigError(f"trainer.bn_recalibration.transforms must be eval or train, got {which!r}")
    share = settings.get("max_share")
    if share is not None:
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(
                f"trainer.bn_recalibration.max_share must be a number in (0, 1] (a share of an epoch's "
                f"training batches) or null for no cap, got {share!r}"
            )
        if epoch_batches:
            n = min(n, math.ceil(share * epoch_batches))  # rounded up: at least one batch
    pipeline = pipelines["val"] if which == "eval" else pipelines["train"]
    # its own order (another seed than the training loader's), cut to n batches per process
    loader = make_loader(
        data, record, "train", pipeline, train=True, max_batches=n, **{**shard, "seed": mix(shard["seed"], 4)}
    )
    return Recalibration(
        loader, place.device, place.normalize, int(shard["seed"]), place.channels_last, place.amp, place.d
    )
