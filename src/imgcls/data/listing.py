"""Which files a folder holds: class folders and image files by suffix. Torch-free, so the ONNX
predictor (imgcls.onnx_model) lists its inputs without importing PyTorch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


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
