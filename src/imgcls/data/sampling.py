"""Epoch-seeded sampling: each epoch's order and each sample's augmentation follow from
(seed, epoch, index) alone, so a run can stop anywhere and resume bit-exactly, with any number
of DataLoader workers."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers its exit handler now: ours, registered later, runs before it
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class EpochSampler(Sampler[tuple[int, int]]):
    """(epoch, index) pairs: a permutation of range(n) drawn from (seed, epoch) (or 0..n-1
    unshuffled), from `start`. The epoch travels with each index to the worker that loads it, so
    persistent workers, whose copy of the dataset was made once, still seed by the right epoch.

    Under torchrun each rank takes every world-th index of the same order. Shuffled (training),
    the order is cut to a multiple of the world size so every rank takes as many steps; in order
    (evaluation), nothing is cut or repeated: the ranks' results are gathered whole. `limit` keeps
    only the first `limit` indices of each rank's share (BatchNorm recalibration's few batches)."""

    def __init__(
        self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1, limit: int | None = None
    ):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world, self.limit = rank, world, limit
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start` samples of this epoch's order are skipped: they were seen before a resume."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in self._indices()[self.start :].tolist())

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix(self.seed, self.epoch, 1))
            order = torch.randperm(self.n, generator=g)
            order = order[: self.n - self.n % self.world]
        else:
            order = torch.arange(self.n)
        return order[self.rank :: self.world][: self.limit]

    def __len__(self) -> int:
        return len(self._indices()) - self.start


class EpochSeeded(Dataset):
    """Runs the wrapped dataset's __getitem__ under a torch seed drawn from (seed, epoch, index).

    torchvision's random transforms draw from torch's global generator; forking it per sample
    makes the augmentation independent of which worker, or which process, decodes the sample,
    and leaves the caller's generator untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int):
        """`key` is (epoch, index) from EpochSampler, or a bare index read at `self.epoch`."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(self.seed, epoch, 2, index))
            return self.dataset[index]


def set_epoch(loader, epoch: int, start_batch: int = 0) -> None:
    """Point a loader built by make_loader at `epoch`, skipping its first `start_batch` batches."""
    loader.sampler.set_epoch(epoch, start_batch * loader.batch_size)
    loader.dataset.epoch = epoch  # for bare-index access; loaders pass the epoch with each index


def worker_init(worker_id: int) -> None:
    # Ctrl-C and SIGTERM are the training process's to handle: it stops at a step boundary and
    # shuts the workers down itself (a worker killed by the signal would break the batch in flight)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def kill_workers_at_exit() -> None:
    """Once per training process, before its first worker starts: see _kill_leftover_workers."""
    global _killer_registered
    if not _killer_registered:
        atexit.register(_kill_leftover_workers)
        _killer_registered = True


_killer_registered = False


def _kill_leftover_workers() -> None:
    """Workers ignore SIGTERM (worker_init), and multiprocessing's exit handler stops daemonic
    children with SIGTERM, then joins them: a run that stops on an error while its persistent
    workers are alive (an image that changed after the data check) printed the error and then
    waited forever. Workers hold nothing worth keeping: kill what is left."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each as a crash
    for child in children:  # DataLoader workers: nothing else here starts daemonic processes
        child.kill()
        child.join(5)
