"""Speed settings: mixed precision (autocast, GradScaler for fp16), torch.compile, per-device defaults."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch
from torch import nn

from imgcls.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the fp16 loss scale halves on every overflow step; below 1 the gradients overflow even unscaled,
# which no scale can fix: that is divergence, reported as such instead of skipping steps forever
MIN_FP16_SCALE = 1.0


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def resolve_precision(spec: str, device: torch.device) -> str:
    """`auto`: bf16 on an NVIDIA GPU with bf16 tensor cores (Ampere, compute capability 8.0, or
    newer), fp32 elsewhere: on CPUs without AMX bf16 autocast is slower than fp32."""
    spec = str(spec).lower()
    if spec not in PRECISIONS:
        raise ConfigError(f"trainer.precision={spec!r} is not one of {', '.join(PRECISIONS)}")
    if spec == "auto":
        return "bf16" if _cuda_capability(device) >= (8, 0) else "fp32"
    if spec == "fp16" and device.type == "mps":
        raise ConfigError("trainer.precision=fp16 needs a CUDA GPU or the CPU; on MPS use fp32")
    return spec


def resolve_channels_last(spec: Any, device: torch.device) -> bool:
    """`auto`: NHWC on the CPU and on NVIDIA GPUs with tensor cores (compute capability 7.0 or newer),
    where cuDNN and oneDNN convolutions run fastest in it; never on MPS."""
    if device.type == "mps":
        return False
    if str(spec).lower() == "auto":
        return device.type == "cpu" or _cuda_capability(device) >= (7, 0)
    if not isinstance(spec, bool):
        raise ConfigError(f"trainer.channels_last={spec!r}: use true, false or auto")
    return spec


class Precision:
    """Autocast for the forward pass and, for fp16, a GradScaler around backward and step.

    fp32 is a no-op: the same calls cost nothing, so the loop has one shape for every precision."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device_type = name, device.type
        self.dtype = _DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)  # the norm and the finiteness check see the true gradients

    @property
    def skips_overflow(self) -> bool:
        """True while a non-finite gradient is an fp16 overflow that the scaler skips by design
        (it lowers the scale and retries with the next batch), not a diverged run."""
        return self.scaler is not None and self.scaler.get_scale() >= MIN_FP16_SCALE

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)  # skipped when unscale_ found an inf or a NaN
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries: the loss scale and its growth counter, so a resumed fp16 run scales
        (and skips) exactly as the uninterrupted one."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        if self.scaler and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])


FP32 = Precision("fp32", torch.device("cpu"))


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile for the training forward and backward. The wrapper shares its parameters
    with `model`: checkpoints keep saving `model` itself, so their keys carry no `_orig_mod.`."""
    return torch.compile(model) if enabled else model


def uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (its state_dict has no `_orig_mod.` prefix), else `model`."""
    return getattr(model, "_orig_mod", model)


# -- start-up -----------------------------------------------------------------------------------
_IMPORTED = time.time()


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc, so the interpreter's own start-up
    and imports count); elsewhere, since imgcls.training.speed was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time() - _IMPORTED


class FirstStep:
    """Wraps the per-step callback: on the first training step, reports the process's age once."""

    def __init__(self, on_step, report):
        self.on_step, self.report, self.seconds = on_step, report, None

    def __call__(self) -> None:
        if self.seconds is None:
            self.seconds = process_age()
            self.report(self.seconds)
        self.on_step()
