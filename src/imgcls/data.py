"""ImageFolder data: scan the split folders, decode images to uint8 tensors, build seeded loaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgcls.cache import MODES, CachedImages, build_store, decode
from imgcls.errors import ConfigError, UserError
from imgcls.sampling import EpochSampler, EpochSeeded, worker_init


class DataError(UserError):
    """A problem with the user's data tree, reported before any training starts."""


def _visible(name: str) -> bool:
    # .ipynb_checkpoints, .DS_Store, .git and friends are never classes or samples
    return not name.startswith(".")


def find_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name))


def scan_class(class_dir: Path, extensions: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """All image files below class_dir (sorted, recursive), and the files skipped for their suffix."""
    keep, skipped = [], []
    exts = {e.lower() for e in extensions}
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            if not _visible(name):
                continue
            path = Path(dirpath) / name
            (keep if path.suffix.lower() in exts else skipped).append(path)
    return keep, skipped


def load_image(path: str | Path) -> Image.Image:
    """Decode as RGB with the EXIF orientation applied."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


class ImageDataset(Dataset):
    """(path, class index) samples -> (uint8 CHW tensor, class index)."""

    def __init__(
        self, samples: list[tuple[str, int]], transform: Callable | None = None, size: int | None = None
    ):
        self.samples = samples
        self.transform = transform
        self.size = size  # shorter side resized to this at decoding (data.cache_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        try:
            image = decode(path, self.size)
        except Exception as exc:  # name the file: a bare PIL error says nothing about which one
            raise DataError(f"cannot decode image {path}: {exc}") from exc
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class ImageFolderData:
    """A tree <root>/<split>/<class>/<image>; the class list comes from the train split."""

    required_splits = ("train", "val")

    def __init__(
        self,
        root: str,
        splits: Mapping[str, str],
        batch_size: int,
        num_workers: int = 0,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png"),
        cache: str = "none",
        cache_size: int | None = None,
        cache_dir: str = "~/.cache/imgcls/images",
    ):
        if batch_size < 1:
            raise DataError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.root = Path(root)
        self.split_dirs = dict(splits)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.extensions = list(extensions)
        if cache not in MODES:
            raise DataError(f"data.cache={cache!r} is not one of {', '.join(MODES)}")
        self.cache, self.cache_size, self.cache_dir = cache, cache_size, Path(cache_dir).expanduser()
        self.stores: dict = {}  # split -> cache.Store, built on first use
        self.class_names: list[str] = []
        self.samples: dict[str, list[tuple[str, int]]] = {}
        self.skipped: dict[str, list[Path]] = {}

    def prepare(self) -> None:
        """Make the tree available (subclasses write or fetch it); here: check it is there."""
        if not self.root.is_dir():
            raise DataError(
                f"data.root={str(self.root)!r} is not a folder (resolved: {self.root.resolve()}). "
                "Point data.root at a folder holding train/ and val/ class folders."
            )

    def setup(self) -> None:
        """Scan every split; raise DataError listing everything wrong with the tree."""
        self.prepare()
        present = {s: self.root / d for s, d in self.split_dirs.items() if (self.root / d).is_dir()}
        missing = [f"{self.split_dirs[s]}/" for s in self.required_splits if s not in present]
        if missing:
            found = sorted(e.name + "/" for e in os.scandir(self.root) if e.is_dir()) or ["nothing"]
            raise DataError(
                f"{self.root}: missing split folder(s) {', '.join(missing)}; found {', '.join(found)}. "
                "Each split needs one folder per class (set data.splits.<split> to rename a split)."
            )
        self.class_names = find_classes(present["train"])
        if len(self.class_names) < 2:
            raise DataError(
                f"{present['train']}: found {len(self.class_names)} class folder(s), need at least 2 "
                "(one folder per class, holding its images)."
            )
        problems = []
        for split, split_dir in present.items():
            classes = find_classes(split_dir)
            lacking = sorted(set(self.class_names) - set(classes))
            extra = sorted(set(classes) - set(self.class_names))
            if lacking:
                problems.append(f"{split_dir}: missing class folder(s) {', '.join(lacking)}")
            if extra:
                problems.append(f"{split_dir}: class folder(s) not in train: {', '.join(extra)}")
            samples, skipped = [], []
            for index, name in enumerate(self.class_names):
                if name not in classes:
                    continue
                files, odd = scan_class(split_dir / name, self.extensions)
                if not files:
                    problems.append(f"{split_dir / name}: no image files ({', '.join(self.extensions)})")
                samples += [(str(f), index) for f in files]
                skipped += odd
            self.samples[split] = samples
            self.skipped[split] = skipped
        if problems:
            raise DataError("the data tree has problems:\n  " + "\n  ".join(problems))

    @property
    def splits(self) -> list[str]:
        return list(self.samples)

    def dataset(self, split: str, transform: Callable | None = None) -> Dataset:
        if self.cache == "none":
            return ImageDataset(self.samples[split], transform, self.cache_size)
        if split not in self.stores:
            self.stores[split] = build_store(self.samples[split], self.cache, self.cache_size, self.cache_dir)
        return CachedImages(self.samples[split], self.stores[split], transform)

    def loader(
        self,
        split: str,
        transform: Callable | None,
        *,
        train: bool,
        seed: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> DataLoader:
        """Order and augmentation follow (seed, epoch, index): see sampling.set_epoch."""
        dataset = EpochSeeded(self.dataset(split, transform), seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world=world),
            # a last batch of one sample breaks BatchNorm in training; evaluation sees every sample
            drop_last=train and len(dataset) > self.batch_size * world,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            # workers live across epochs (no start-up per epoch): the sampler hands each of them the
            # epoch with every index, so their copy of the dataset never goes stale
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=worker_init,
        )


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
