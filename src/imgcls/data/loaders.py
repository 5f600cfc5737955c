"""From samples to batches: the dataset that decodes them, the seeded loaders built from a tree's
options and the record its scan returned, and normalization on the device."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgcls.data.cache import CachedImages, build_store, changed_since_check, decode
from imgcls.data.folder import ImageFolderData
from imgcls.data.images import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS, MB
from imgcls.data.record import DataRecord
from imgcls.data.sampling import EpochSampler, EpochSeeded, kill_workers_at_exit, worker_init
from imgcls.errors import ConfigError


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


def make_dataset(
    options: ImageFolderData, record: DataRecord, split: str, transform: Callable | None = None
) -> Dataset:
    """`split`'s samples -> (uint8 CHW tensor, class index), decoded per item or served from the
    decoded-image cache (data.cache), which is built once per record and split."""
    samples = record.samples[split]
    if options.cache == "none":
        return ImageDataset(samples, transform, options.max_pixels, options.cache_size, options.max_bytes)
    if split not in record.stores:
        record.stores[split] = build_store(
            samples,
            options.cache,
            options.cache_size,
            options.cache_dir,
            options.max_pixels,
            options.max_bytes,
        )
    return CachedImages(samples, record.stores[split], transform)


def make_loader(
    options: ImageFolderData,
    record: DataRecord,
    split: str,
    transform: Callable | None,
    *,
    train: bool,
    seed: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
    collate_fn: Callable | None = None,
    max_batches: int | None = None,
) -> DataLoader:
    """Order and augmentation follow (seed, epoch, index): see sampling.set_epoch. `collate_fn`
    runs in the workers (augment.DeviceCrop.collate); None stacks the samples. `max_batches`:
    each epoch stops after that many batches per process."""
    dataset = EpochSeeded(make_dataset(options, record, split, transform), seed)
    if options.num_workers > 0:
        kill_workers_at_exit()
    limit = max_batches * options.batch_size if max_batches else None
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        sampler=EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world=world, limit=limit),
        # a last batch of one sample breaks BatchNorm in training; evaluation sees every sample
        drop_last=train and len(dataset) > options.batch_size * world,
        num_workers=options.num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        # workers live across epochs (no start-up per epoch): the sampler hands each of them the
        # epoch with every index, so their copy of the dataset never goes stale
        persistent_workers=options.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=worker_init,
    )
    if options.num_workers > 0:
        _with_workers.add(loader)
    return loader


# the loaders whose persistent workers may still run in this process
_with_workers: weakref.WeakSet[DataLoader] = weakref.WeakSet()


def stop_workers() -> None:
    """Stop the workers of every loader built in this process, at the end of a job. Left to the
    garbage collector, a loader in a reference cycle can have its queues finalized before its
    iterator, whose goodbye to the workers then never leaves: each of them cost 20 s of timeouts
    at the end of a second run in one process (a resume after a run, in-process). torch has no
    public call that stops persistent workers; its iterator's own shutdown is what `del` runs."""
    for loader in list(_with_workers):
        iterator = loader._iterator
        loader._iterator = None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
    _with_workers.clear()
