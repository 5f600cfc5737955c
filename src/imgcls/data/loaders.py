"""Datasets and seeded loaders, built from a tree's options and the record its scan returned."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from imgcls.data.cache import CachedImages, build_store
from imgcls.data.folder import ImageFolderData
from imgcls.data.loading import ImageDataset
from imgcls.data.record import DataRecord
from imgcls.data.sampling import EpochSampler, EpochSeeded, kill_workers_at_exit, worker_init


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
