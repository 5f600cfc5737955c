"""ImageFolder data: check the tree, decode every common image to RGB, build seeded loaders.

The data node builds options (`ImageFolderData`, nobody changes them); `options.scan()` returns
what it found as an immutable `DataRecord` (record.py); `make_loader(options, record, split, ...)`
builds a loader from both (loaders.py). A relabelled or predict view is a new record.

Names are imported on first use: `from imgcls.data.images import load_image` (or listing) then
costs no PyTorch import, which the ONNX predictor relies on."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BadImageError": "imgcls.data.images",
    "DataError": "imgcls.errors",
    "DataRecord": "imgcls.data.record",
    "DataReport": "imgcls.data.check",
    "ImageDataset": "imgcls.data.loaders",
    "ImageFolderData": "imgcls.data.folder",
    "Normalize": "imgcls.data.loaders",
    "find_classes": "imgcls.data.listing",
    "fingerprint_changes": "imgcls.data.splits",
    "load_image": "imgcls.data.images",
    "make_dataset": "imgcls.data.loaders",
    "make_loader": "imgcls.data.loaders",
    "scan_class": "imgcls.data.listing",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'imgcls.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once per name
    return value


def __dir__() -> list[str]:
    return __all__
