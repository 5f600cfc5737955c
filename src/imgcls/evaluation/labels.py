"""One split's samples labelled by the checkpoint's class names (folders matched by name, not
order), as a new DataRecord."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from imgcls.data import DataError, ImageFolderData, find_classes, scan_class
from imgcls.data.record import DataRecord
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


def checked_record(
    data: ImageFolderData, split: str, class_names: Sequence[str], state: dict
) -> DataRecord | None:
    """The training path for a tree laid out like the run's own (its train split is there): the
    full data check, the checkpoint's carved val split reused, and a warning for each way the
    data changed since the checkpoint; the record relabelled to the checkpoint's classes. None
    for any other tree (see labelled_record)."""
    # a run on a tree of class folders alone carved its splits from them (splits.draw_splits)
    flat = (state.get("data_split") or {}).get("layout") == "class folders"
    if split not in data.split_dirs or not (flat or (data.root / data.split_dirs["train"]).is_dir()):
        return None
    record = data.scan(recorded_split=state.get("data_split"))
    difference = class_difference(record.class_names, class_names)
    if difference:
        raise DataError(
            f"{data.root}: the class folders differ from the checkpoint's {len(class_names)} classes "
            f"({', '.join(class_names)}): {difference}."
        )
    if split not in record.samples and flat:
        raise RunError(
            f"split={split}: {data.root} holds class folders, not split folders, and the run carved "
            f"{', '.join(record.samples)} from them. Choose one of those; data.test_fraction=0.1 at "
            "training carves a test split too."
        )
    if split not in record.samples:
        return None
    for line in record.changes_since(state):
        logger.warning(f"the data changed since the checkpoint: {line}")
    # indices are the checkpoint's: a folder's position on disk never shifts a label
    return record.relabelled(class_names)


def labelled_record(data: ImageFolderData, split: str, class_names: Sequence[str]) -> DataRecord:
    """Scan <root>/<split folder>/<class>/ with class indices taken from `class_names` (the
    checkpoint's), never from the order of the folders; only this split needs to exist.

    The record holds that split alone, so make_loader(data, record, split, ...) builds the loader
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
    return DataRecord.of(
        data.root, class_names, {split: samples}, split_dirs=data.split_dirs, skipped={split: skipped}
    )
