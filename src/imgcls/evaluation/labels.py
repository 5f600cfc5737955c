"""One split's samples labelled by the checkpoint's class names: folders matched by name, not order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from imgcls.data import DataError, ImageFolderData, find_classes, scan_class
from imgcls.runs import RunError


def class_difference(found: Sequence[str], expected: Sequence[str]) -> str | None:
    """What differs between a tree's class folders and the checkpoint's classes, or None."""
    missing = [c for c in expected if c not in set(found)]
    extra = sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"not in the checkpoint: {', '.join(extra)}")
    return "; ".join(parts) or None


def checked_samples(
    data: ImageFolderData, split: str, class_names: Sequence[str], state: dict
) -> list[tuple[str, int]] | None:
    """The training path for a tree laid out like the run's own (its train split is there): the
    full data check, the checkpoint's carved val split reused, and a warning for each way the
    data changed since the checkpoint. None for any other tree (see labelled_samples)."""
    if split not in data.split_dirs or not (data.root / data.split_dirs["train"]).is_dir():
        return None
    data.recorded_split = state.get("data_split")
    data.setup()
    difference = class_difference(data.class_names, class_names)
    if difference:
        raise DataError(
            f"{data.root}: the class folders differ from the checkpoint's {len(class_names)} classes "
            f"({', '.join(class_names)}): {difference}."
        )
    if split not in data.samples:
        return None
    for line in data.changes_since(state):
        logger.warning(f"the data changed since the checkpoint: {line}")
    # indices are the checkpoint's: a folder's position on disk never shifts a label
    index = [list(class_names).index(name) for name in data.class_names]
    data.samples[split] = [(path, index[target]) for path, target in data.samples[split]]
    data.class_names = list(class_names)
    return data.samples[split]


def labelled_samples(data: ImageFolderData, split: str, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """Scan <root>/<split folder>/<class>/ with class indices taken from `class_names` (the
    checkpoint's), never from the order of the folders; only this split needs to exist.

    Sets data.class_names and data.samples[split], so data.loader(split, ...) builds the loader
    exactly as training built its own. Nothing is downloaded or written (data.download, digits):
    the run's config may come from someone else."""
    data.prepare(fetch=False)
    if split not in data.split_dirs:
        raise RunError(
            f"split={split}: the run's data has no such split; it has {', '.join(data.split_dirs)} "
            "(data.splits). Choose one of those, or add it with +data.splits.<name>=<folder>."
        )
    folder = data.root / data.split_dirs[split]
    if not folder.is_dir():
        present = [s for s, d in data.split_dirs.items() if (data.root / d).is_dir()]
        raise RunError(
            f"split={split}: {folder} is not a folder; splits found in {data.root}: "
            f"{', '.join(present) or 'none'}. Choose split=<one of those>, or data.root=<a tree with "
            f"{data.split_dirs[split]}/>."
        )
    found = find_classes(folder)
    difference = class_difference(found, class_names)
    if difference:
        raise DataError(
            f"{folder}: the class folders differ from the checkpoint's {len(class_names)} classes "
            f"({', '.join(class_names)}): {difference}. Class indices come from the checkpoint, so "
            "each of its classes needs a folder of the same name, and no other folders."
        )
    samples, skipped, empty = [], [], []
    for index, name in enumerate(class_names):
        files, odd = scan_class(folder / name, data.extensions)
        samples += [(str(f), index) for f in files]
        skipped += odd
        if not files:
            empty.append(name)
    if not samples:
        raise DataError(f"{folder}: no image files ({', '.join(data.extensions)}) in any class folder")
    if empty:
        logger.warning(f"{folder}: no images for {', '.join(empty)}; their recall is reported as 0")
    if skipped:
        shown = ", ".join(str(Path(f).relative_to(folder)) for f in skipped[:5])
        logger.warning(f"{split}: skipped {len(skipped)} file(s) that are not images by suffix: {shown}")
    data.class_names = list(class_names)
    data.samples[split] = samples
    data.skipped[split] = skipped
    return samples
