"""Values a config computes from its other keys, as OmegaConf resolvers (registered with the
others in imgcls.config.naming.register_resolvers): pure arithmetic on the values given, nothing
read from the machine but torchrun's process count."""

from __future__ import annotations

import math
import os

REFERENCE_BATCH = 256  # the batch a per-256 rate is stated for (Goyal et al. 2017; timm's lr_base_size)


def linear_lr(per_256: float, batch_size: int, grad_accum_steps: int = 1) -> float:
    """The learning rate for the batch per optimizer step, linear in it: per_256 x batch_size x
    grad_accum_steps x processes / 256 (processes: torchrun's WORLD_SIZE, 1 otherwise), as timm's
    train.py and Goyal et al. scale SGD's rate. `optimizer.lr=<number>` replaces the rule."""
    numbers = (per_256, batch_size, grad_accum_steps)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        # data.batch_size=x: its own key's check names it (data.batch_size='x': expected a number)
        # before any optimizer is built; raising here would fail the whole config first, naming neither
        return math.nan
    processes = int(os.environ.get("WORLD_SIZE") or 1)
    return float(per_256) * batch_size * (grad_accum_steps or 1) * processes / REFERENCE_BATCH
