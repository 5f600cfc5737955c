"""Decoded-image cache: every image decoded once into one uint8 buffer, in shared memory or a file.

JPEG decoding costs about 6 ms per photo on one core, every epoch; a cached image is a memory read.
Random crops and flips still run per sample on the uint8 tensor, so augmentation is unchanged, and
an image comes out of the cache bit-identical to a fresh decode: a run gives the same results with
and without the cache for the same seed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from imgcls.data.images import (
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_PIXELS,
    IMAGE_FORMATS,
    MB,
    BadImageError,
    file_problem,
    load_image,
    reason,
)
from imgcls.errors import DataError
from imgcls.files import atomic_path, atomic_write

MODES = ("none", "memory", "disk")


def decode(
    path: str | Path, size: int | None = None, max_pixels: int | None = None, max_bytes: int | None = None
) -> torch.Tensor:
    """RGB uint8 CHW (imgcls.data.load_image: EXIF orientation, alpha, 16-bit); with `size`, the
    shorter side is resized to it (never enlarged) once here, instead of at full resolution every
    epoch. Only a regular file of at most max_bytes is read (data.max_file_mb)."""
    image = load_image(path, max_pixels or DEFAULT_MAX_PIXELS, max_bytes or DEFAULT_MAX_FILE_MB * MB)
    if size and min(image.size) > size:
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    return TF.pil_to_tensor(image)


def changed_since_check(path: str | Path, exc: Exception) -> Exception:
    """The error for a file that the data check (or predict's) decoded and that now fails: it
    changed or vanished since. A DataError naming the file, never a traceback."""
    why = str(exc) if isinstance(exc, BadImageError) else f"cannot decode ({reason(exc)})"
    return DataError(f"cannot decode image {path}: {why} (it decoded when checked: it changed since)")


def decoded_shape(path: str | Path, size: int | None = None) -> tuple[int, int, int]:
    """The CHW shape `decode(path, size)` returns, from the file's header alone (EXIF rotations by
    90 degrees swap the sides)."""
    with Image.open(
        path, formats=IMAGE_FORMATS
    ) as im:  # the header only: Pillow decodes nothing until load()
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a corrupt EXIF block: load_image keeps the pixels as stored
            orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if size and min(w, h) > size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
    return 3, h, w


def fingerprint(paths: list[str], size: int | None) -> str:
    """Changes when a file is added, removed, replaced or touched, or the size changes."""
    h = hashlib.sha256(json.dumps(size).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))  # any file name
    return h.hexdigest()[:16]


class Store:
    """The decoded images of one split: a flat uint8 buffer (a shared-memory tensor, or the path of
    a file that each process maps on first use), and each image's offset and CHW shape."""

    def __init__(self, pixels: torch.Tensor | str, offsets: np.ndarray, shapes: np.ndarray):
        self.pixels, self.offsets, self.shapes = pixels, offsets, shapes

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        if isinstance(self.pixels, str):  # mapped once per process, copy-on-write: the OS shares the pages
            self.pixels = torch.from_numpy(np.memmap(self.pixels, np.uint8, mode="c", shape=(self.nbytes,)))
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.pixels[start:end].view(*self.shapes[index].tolist())


class CachedImages(Dataset):
    """(path, class) samples served from a Store: (uint8 CHW tensor, class index)."""

    def __init__(self, samples, store: Store, transform: Callable | None):
        self.samples, self.store, self.transform = samples, store, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.store[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]


def _mapped_file(path: Path, nbytes: int) -> np.memmap:
    """A writable map of a new file of `nbytes`, its blocks reserved up front: a full disk is an
    OSError here, not a SIGBUS that kills the process when a page of a sparse file is first written."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            f.truncate(nbytes)  # a file system without fallocate: sparse, as np.memmap makes it
    return np.memmap(path, np.uint8, mode="r+", shape=(nbytes,))


def _decoded_then_copied(pool, load, paths, allocate) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(pixels, offsets, shapes) the slow way, for headers that disagree with their pixels: every
    image decoded first, then copied into a buffer of their true total size."""
    images = list(pool.map(load, paths))
    shapes = np.array([im.shape for im in images], np.int64).reshape(-1, 3)
    offsets = np.concatenate([[0], np.cumsum(shapes.prod(1))]).astype(np.int64)
    pixels = allocate(int(offsets[-1]))
    for im, a, b in zip(images, offsets[:-1], offsets[1:], strict=True):
        pixels[int(a) : int(b)] = im.reshape(-1)
    return pixels, offsets, shapes


def build_store(
    samples,
    mode: str,
    size: int | None,
    folder: Path,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Store:
    """Decode every sample once into shared memory (`memory`) or into <folder>/<fingerprint>.u8
    (`disk`, reused by later runs and sweep jobs while the files and `size` are unchanged)."""
    paths = [p for p, _ in samples]
    if mode == "disk":
        key = fingerprint(paths, size)
        data_file, index_file = folder / f"{key}.u8", folder / f"{key}.json"
        if index_file.exists() and data_file.exists():
            index = json.loads(index_file.read_text())
            offsets, shapes = np.array(index["offsets"], np.int64), np.array(index["shapes"], np.int64)
            logger.info(f"image cache: reusing {data_file} ({offsets[-1] / 2**20:.0f} MiB)")
            return Store(str(data_file), offsets, shapes)

    def load(path: str) -> torch.Tensor:
        try:
            return decode(path, size, max_pixels, max_bytes)
        except MemoryError:
            raise
        except Exception as exc:
            raise changed_since_check(path, exc) from exc

    def shape(path: str) -> tuple[int, int, int]:
        try:
            problem = file_problem(path, max_bytes) if max_bytes else file_problem(path)
            if problem:  # swapped for a FIFO or a device since the check: Image.open would block on it
                raise BadImageError(problem)
            return decoded_shape(path, size)
        except MemoryError:
            raise
        except Exception as exc:  # a header Pillow now refuses: the file changed
            raise changed_since_check(path, exc) from exc

    def allocate(nbytes: int) -> torch.Tensor:
        if mode == "memory":
            return torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        return torch.from_numpy(_mapped_file(tmp, max(nbytes, 1)))

    # disk: written under a temp name and published whole; a full disk, or an image that changed
    # since the check, leaves no temp file behind (imgcls.files.atomic_path)
    hint = "or set data.cache=memory (or none), or data.cache_dir=<a folder with space>"
    with atomic_path(data_file, hint=hint) if mode == "disk" else contextlib.nullcontext() as tmp:
        # each image's size from its header first, so the buffer is allocated once and every image is
        # decoded straight into its place: the build holds the cache plus the images in flight (one
        # per thread), not a second copy of it. Threads, not processes: PIL releases the GIL.
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            shapes = np.array(list(pool.map(shape, paths)), np.int64).reshape(-1, 3)
            offsets = np.concatenate([[0], np.cumsum(shapes.prod(1))]).astype(np.int64)
            pixels = allocate(int(offsets[-1]))

            def fill(i: int, buffer: torch.Tensor) -> bool:
                image = load(paths[i])
                if tuple(image.shape) != tuple(shapes[i]):
                    return False
                buffer[int(offsets[i]) : int(offsets[i + 1])] = image.reshape(-1)
                return True

            filled = pool.map(fill, range(len(paths)), [pixels] * len(paths))
            wrong = [paths[i] for i, ok in enumerate(filled) if not ok]
            if wrong:  # a header that disagrees with its pixels: decode everything first, then copy
                logger.warning(f"image cache: {len(wrong)} file(s) decode to another size than their header "
                               f"says ({', '.join(wrong[:3])}); building the cache the slow way (twice its size)")  # fmt: skip
                pixels = None  # freed before the second buffer
                pixels, offsets, shapes = _decoded_then_copied(pool, load, paths, allocate)
        logger.info(f"image cache ({mode}): {len(paths)} images, {offsets[-1] / 2**20:.0f} MiB")
        if mode == "memory":
            return Store(pixels, offsets, shapes)
        del pixels  # flush the map, then publish the file (here) and its index atomically
    index = {"offsets": offsets.tolist(), "shapes": shapes.tolist(), "size": size}
    atomic_write(index_file, json.dumps(index), hint=hint)
    return Store(str(data_file), offsets, shapes)
