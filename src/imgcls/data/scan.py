"""Hash and decode every file of a tree once, cached per tree and revalidated by size and mtime."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imgcls.data.images import DEFAULT_MAX_FILE_MB, MB, BadImageError, load_image, read_image_file
from imgcls.files import WriteError, atomic_write
from imgcls.log import progress

CACHE_VERSION = 1  # bump when what a record means changes: old caches are then ignored


@dataclass(frozen=True)
class FileRecord:
    size: int
    mtime_ns: int
    sha256: str
    width: int = 0
    height: int = 0
    error: str | None = None  # why the file cannot be used, or None for a good image


def cache_dir() -> Path:
    """$IMGCLS_CACHE_DIR, else $XDG_CACHE_HOME/imgcls, else ~/.cache/imgcls (never the data tree,
    which may be read-only or shared)."""
    if os.environ.get("IMGCLS_CACHE_DIR"):
        return Path(os.environ["IMGCLS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgcls"


def cache_file(root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:20]
    return cache_dir() / "scan" / f"{key}.json"


def inspect_file(path: Path, max_pixels: int, max_bytes: int = DEFAULT_MAX_FILE_MB * MB) -> FileRecord:
    """Read once: hash the bytes, then decode them exactly as training will. Never raises for a
    file (only MemoryError passes): whatever goes wrong is the record's `error`, so one odd file
    cannot stop the scan or the threads that run it. Only regular files of at most max_bytes are
    read (images.read_image_file): a FIFO, a device or a 20 GB sparse file is refused by its
    metadata, without being opened."""
    try:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # gone since listed, a broken link or a loop: read_image_file says which
        size, mtime = 0, 0
    try:
        data = read_image_file(path, max_bytes)
    except BadImageError as exc:
        return FileRecord(size, mtime, "", error=str(exc))
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = load_image(io.BytesIO(data), max_pixels)
    except BadImageError as exc:
        return FileRecord(size, mtime, digest, error=str(exc))
    return FileRecord(size, mtime, digest, image.width, image.height)


@dataclass
class ScanResult:
    records: dict[str, FileRecord]  # by path relative to the root, with / separators
    decoded: int  # files read and decoded now
    cached: int  # files whose cached record was still valid
    seconds: float


def scan_files(
    root: Path,
    paths: Iterable[Path],
    max_pixels: int,
    workers: int | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_MB * MB,
) -> ScanResult:
    """A record per path; only files new or changed (size, mtime) since the last scan are read."""
    start = time.perf_counter()
    cache_path = cache_file(root)
    limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
    cached = _read_cache(cache_path, limits)
    records: dict[str, FileRecord] = {}
    todo: list[tuple[str, Path]] = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        old = cached.get(rel)
        try:
            st = path.stat()
        except OSError:  # gone since it was listed: inspect_file records why
            todo.append((rel, path))
            continue
        # only a regular file's size and mtime say it is unchanged (a FIFO's are always 0 and now)
        if (
            old is not None
            and stat.S_ISREG(st.st_mode)
            and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns)
        ):
            records[rel] = old
        else:
            todo.append((rel, path))
    if todo:
        # Pillow's decoders and hashlib release the GIL: threads scale without pickling anything
        workers = workers or min(8, os.cpu_count() or 1)
        # a bar on a terminal; elsewhere a line per tenth of a big first scan (ImageNet: an hour on 2 cores)
        with (
            ThreadPoolExecutor(workers) as pool,
            progress("data check", len(todo), max(1000, len(todo) // 10)) as advance,
        ):
            results = pool.map(lambda t: inspect_file(t[1], max_pixels, max_bytes), todo)
            for (rel, _), record in zip(todo, results, strict=True):
                records[rel] = record
                advance()
        _write_cache(cache_path, root, limits, records)  # files gone from the tree drop out
    return ScanResult(records, len(todo), len(records) - len(todo), time.perf_counter() - start)


def _read_cache(path: Path, limits: dict[str, int]) -> dict[str, FileRecord]:
    try:
        payload = json.loads(path.read_text())
        if payload.get("version") != CACHE_VERSION or any(payload.get(k) != v for k, v in limits.items()):
            return {}  # the limits decide which files are refused: rescan under the new ones
        return {rel: FileRecord(*fields) for rel, fields in payload["files"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # missing, unreadable or from another version: a full scan rebuilds it


def _write_cache(path: Path, root: Path, limits: dict[str, int], records: dict[str, FileRecord]) -> None:
    payload = {
        "version": CACHE_VERSION,
        "root": str(root.resolve()),
        **limits,
        "files": {
            rel: [r.size, r.mtime_ns, r.sha256, r.width, r.height, r.error] for rel, r in records.items()
        },
    }

    try:  # a concurrent run reads the old cache or the new one, never half
        atomic_write(path, json.dumps(payload, separators=(",", ":")), durable=False)
    except WriteError:
        pass  # a read-only or full cache folder costs the next run a rescan, nothing else
