"""From samples to tensors: the dataset, and normalization on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from imgcls.data.cache import changed_since_check, decode
from imgcls.data.images import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS, MB
from imgcls.errors import ConfigError, DataError

__all__ = ["DataError", "ImageDataset", "Normalize"]


class ImageDataset(Dataset):
    """(path, class index) samples -> (uint8 CHW tensor, class index)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Callable | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        size: int | None = None,
        max_bytes: int = DEFAULT_MAX_FILE_MB * MB,
    ):
        self.samples = samples
        self.transform = transform
        self.max_pixels = max_pixels
        self.size = size  # shorter side resized to this at decoding (data.cache_size)
        # the check's limit: a file swapped for a FIFO or a huge one since is refused, not read
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        try:
            image = decode(path, self.size, self.max_pixels, self.max_bytes)
        except MemoryError:
            raise
        except Exception as exc:  # load_image turns any decoder failure into BadImageError
            # the check decoded this file before training: it changed or vanished since. Stop and
            # name it rather than substitute a black image the model would learn from.
            raise changed_since_check(path, exc) from exc
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class Normalize(nn.Module):
    """uint8 NCHW batch -> float, scaled to [0, 1] and normalized, on whatever device it is on."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"transforms.normalize: need matching mean/std with std > 0, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std
