"""Random-resized crops and flips on the device (data.device_augment): each box is drawn in the
loader worker, each batch is resized in one roi_align call where the model runs.

With the decoded-image cache, what is left in the workers is the per-sample antialiased resize of
RandomResizedCrop; on a GPU it is one kernel for the whole batch. The worker still draws every
box and flip from the sample's own (seed, epoch, index) generator, call for call as
torchvision's RandomResizedCrop and RandomHorizontalFlip draw them, so a run sees the same boxes
and flips as the CPU pipeline with the same seed, on any number of workers, and resumes
bit-exactly. Only the resampling differs: roi_align averages ceil(box / output) samples per
output pixel and axis, close to torchvision's antialiased bilinear filter (tests/test_augment.py
gives the difference on a smooth image)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torchvision.ops  # noqa: F401  registers torch.ops.torchvision (DeviceCrop.apply's roi_align)
from torch.utils.data import get_worker_info
from torchvision.transforms import v2

from imgcls.errors import ConfigError

SETTINGS = ("auto", "true", "false")


def setting(value: Any) -> str:
    """data.device_augment as one of SETTINGS (YAML gives true/false as booleans)."""
    text = str(value).lower()
    if text not in SETTINGS:
        raise ConfigError(f"data.device_augment={value!r} is not one of {', '.join(SETTINGS)}")
    return text


def draw_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop of a height x width image, drawn from torch's global generator
    exactly as torchvision.transforms.v2.RandomResizedCrop draws it: area fraction uniform in
    `scale`, aspect ratio log-uniform in `ratio`, 10 attempts, then a center crop."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Crops(NamedTuple):
    """A batch as the workers hand it over: the crop regions, unresized, packed into one uint8
    canvas; their RoIs [0, x1, y1, x2, y2] in it; which ones to flip. A NamedTuple, so the
    DataLoader pins each tensor."""

    pixels: torch.Tensor  # (1, C, H, W) uint8
    rois: torch.Tensor  # (N, 5) float32
    flips: torch.Tensor  # (N,) bool
    height: int
    width: int
    sampling_ratio: int  # 0: adaptive, ceil(box / output) samples per pixel and axis (antialias)

    def apply(self, device: torch.device) -> torch.Tensor:
        """(N, C, height, width) float in [0, 255] on `device`: each region resized, then flipped."""
        pixels = self.pixels.to(device, non_blocking=True)
        rois = self.rois.to(device, non_blocking=True)
        flips = self.flips.to(device, non_blocking=True)
        # the op itself, not torchvision.ops.roi_align: under deterministic=true on CUDA that
        # switches to a torch.compile'd Python version, for the backward's sake; the forward
        # kernel computes each output element in one thread and is deterministic as it is
        out = torch.ops.torchvision.roi_align(
            pixels.float(), rois, 1.0, self.height, self.width, self.sampling_ratio, True
        )
        return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)


def _empty_uint8(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """In a loader worker, straight in shared memory, as default_collate does: the batch then
    reaches the training process without another copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).resize_(shape)


class DeviceCrop:
    """What replaces a RandomResizedCrop (+ RandomHorizontalFlip) train pipeline: called on a
    uint8 CHW image in the worker, it returns the crop region (a view, nothing resized) and the
    flip; `collate` pads a batch of them into Crops; Crops.apply resizes on the device."""

    def __init__(
        self,
        size: Sequence[int],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float | None = None,
        antialias: bool = True,
    ):
        self.size = (int(size[0]), int(size[-1]))
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip_p, self.antialias = flip_p, antialias

    @classmethod
    def of(cls, pipeline: Any) -> DeviceCrop | None:
        """The DeviceCrop doing what `pipeline` (a v2.Compose) does, or None when it does more
        or other things than a bilinear RandomResizedCrop, optionally then a RandomHorizontalFlip."""
        steps = list(getattr(pipeline, "transforms", None) or [])
        if not steps or type(steps[0]) is not v2.RandomResizedCrop or len(steps) > 2:
            return None
        crop = steps[0]
        # an InterpolationMode, or its value as a string (torchvision 0.29 keeps the string)
        if str(getattr(crop.interpolation, "value", crop.interpolation)) != "bilinear":
            return None
        flip_p = None
        if len(steps) == 2:
            if type(steps[1]) is not v2.RandomHorizontalFlip:
                return None
            flip_p = float(steps[1].p)
        antialias = crop.antialias is not False  # v2's default (None, True) is antialiased for tensors
        return cls(crop.size, crop.scale, crop.ratio, flip_p, antialias)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, bool]:
        _, height, width = image.shape
        top, left, h, w = draw_box(height, width, self.scale, self.ratio)
        # RandomHorizontalFlip draws whatever its p (v2's _RandomApplyTransform): so does this
        flip = self.flip_p is not None and bool(torch.rand(1) < self.flip_p)
        return image[:, top : top + h, left : left + w], flip

    def collate(self, samples: list[tuple[tuple[torch.Tensor, bool], int]]) -> tuple[Crops, torch.Tensor]:
        """((region, flip), target) samples -> (Crops, targets), the regions packed into one
        uint8 canvas (pack_shelves): the bytes to pin and copy to the device are about the
        regions' own, not N times the largest one (padding a batch of 256 regions of a
        cache_size=256 tree to its largest doubles them)."""
        regions = [region for (region, _), _ in samples]
        channels = regions[0].shape[0]
        # a replicated 1-pixel border around each region: bilinear sampling in a region's outer
        # half pixel reads one pixel past it, which must be its edge (torchvision clamps there)
        places, (height, width) = pack_shelves([(r.shape[1] + 2, r.shape[2] + 2) for r in regions])
        canvas = _empty_uint8((1, channels, height, width), regions[0])
        boxes = []
        for region, (y, x) in zip(regions, places, strict=True):
            _, h, w = region.shape
            canvas[0, :, y + 1 : y + 1 + h, x + 1 : x + 1 + w] = region
            canvas[0, :, y + 1 : y + 1 + h, x] = region[:, :, 0]
            canvas[0, :, y + 1 : y + 1 + h, x + 1 + w] = region[:, :, w - 1]
            canvas[0, :, y, x : x + w + 2] = canvas[0, :, y + 1, x : x + w + 2]
            canvas[0, :, y + 1 + h, x : x + w + 2] = canvas[0, :, y + h, x : x + w + 2]
            boxes.append((0, x + 1, y + 1, x + 1 + w, y + 1 + h))  # every region in image 0
        flips = torch.tensor([flip for (_, flip), _ in samples], dtype=torch.bool)
        targets = torch.tensor([target for _, target in samples], dtype=torch.int64)
        ratio = 0 if self.antialias else 1  # 1: one bilinear sample per pixel, as without antialias
        rois = torch.tensor(boxes, dtype=torch.float32)  # [0, x1, y1, x2, y2]
        return Crops(canvas, rois, flips, *self.size, ratio), targets


def pack_shelves(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(top, left) of each (h, w) box in a canvas, and the canvas's (height, width): shelves of
    boxes sorted tallest first, left to right, in a canvas about as wide as the boxes' total area
    is square. Random-resized crops waste about 10-20% of it; the rest is never read."""
    width = max(max(w for _, w in sizes), math.isqrt(sum(h * w for h, w in sizes)) + 1)
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    top = left = shelf = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0]):
        h, w = sizes[i]
        if left + w > width:  # this shelf is full: a new one below it, as tall as its first box
            top, left, shelf = top + shelf, 0, 0
        places[i] = (top, left)
        left, shelf = left + w, max(shelf, h)
    return places, (top + shelf, width)


def resolve(
    value: Any, pipeline: Any, *, cached: bool, device: torch.device, resumed: bool | None = None
) -> DeviceCrop | None:
    """data.device_augment: the DeviceCrop for the train loader, or None for the CPU pipeline.
    auto: on with CUDA, the image cache and a RandomResizedCrop (+ flip) pipeline (imagenet); on a
    resumed run, what the run started with (`resumed`, False for checkpoints older than the key),
    so resuming on another device or with another data.cache stays exact."""
    value = setting(value)
    crop = DeviceCrop.of(pipeline)
    if value == "auto" and resumed is not None:
        value = "true" if resumed else "false"
    if value == "true" and crop is None:
        names = [type(t).__name__ for t in getattr(pipeline, "transforms", [])]
        raise ConfigError(
            "data.device_augment=true needs transforms.train to be exactly a bilinear RandomResizedCrop, "
            f"optionally followed by RandomHorizontalFlip (transforms=imagenet); it is {names or 'empty'}. "
            "Set data.device_augment=auto or false to augment in the loader workers."
        )
    if value == "true" or (value == "auto" and device.type == "cuda" and cached):
        return crop
    return None
