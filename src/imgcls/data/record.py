"""What a scan found, as a value: classes, samples per split, fingerprint, carved split, report."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imgcls.data.check import DataReport
from imgcls.data.splits import fingerprint_changes

Samples = tuple[tuple[str, int], ...]  # (path, class index); -1: no label (predict)


def freeze(value: Any) -> Any:
    """A read-only copy of plain data: dicts become mapping proxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """freeze undone: the plain dicts and lists a checkpoint or a JSON file holds."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class DataRecord:
    """One view of a tree: nobody changes it; a relabelled view or a predict list is a new record.

    `carved` is the val split drawn from train (data.val_fraction, data.folds), None otherwise;
    `fingerprint` what checkpoints keep to tell later whether the tree changed."""

    root: Path
    class_names: tuple[str, ...]
    samples: Mapping[str, Samples]
    split_dirs: Mapping[str, str] = field(default_factory=_empty)
    skipped: Mapping[str, tuple[Path, ...]] = field(default_factory=_empty)  # left out for their suffix
    fingerprint: Mapping[str, Any] = field(default_factory=_empty)
    carved: Mapping[str, Any] | None = None
    report: DataReport | None = field(default=None, compare=False)  # its timings differ scan to scan
    # decoded-image caches (data.cache), built on a split's first loader and shared by later ones
    # (training, BatchNorm recalibration, the final reports): a memo, not part of the value
    stores: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        root: str | Path,
        class_names: Sequence[str],
        samples: Mapping[str, Iterable[tuple[str, int]]],
        **rest: Any,
    ) -> DataRecord:
        """A record from plain values, each made read-only."""
        rest = {k: freeze(v) if k in ("split_dirs", "fingerprint", "carved") else v for k, v in rest.items()}
        if "skipped" in rest:
            rest["skipped"] = MappingProxyType({s: tuple(p) for s, p in rest["skipped"].items()})
        return cls(
            Path(root),
            tuple(class_names),
            MappingProxyType({s: tuple((str(p), int(t)) for p, t in items) for s, items in samples.items()}),
            **rest,
        )

    @classmethod
    def of_files(cls, files: Iterable[str | Path], class_names: Sequence[str], split: str = "predict"):
        """Unlabelled files (class -1) as one split, e.g. predict's inputs."""
        return cls.of(Path("."), class_names, {split: [(str(f), -1) for f in files]})

    @property
    def splits(self) -> list[str]:
        return list(self.samples)

    def relabelled(self, class_names: Sequence[str]) -> DataRecord:
        """The same files with class indices taken from `class_names` (a checkpoint's), matched
        by name: a folder's position on disk never shifts a label. Every class here must be there."""
        index = [list(class_names).index(name) for name in self.class_names]
        samples = {
            s: tuple((p, index[t] if t >= 0 else t) for p, t in items) for s, items in self.samples.items()
        }
        return replace(self, class_names=tuple(class_names), samples=MappingProxyType(samples), stores={})

    def write_split(self, path: Path) -> None:
        """Record the carved val split or fold (file lists), so evaluate and resume reuse it: data.split_file."""
        if self.carved is not None:
            Path(path).write_text(json.dumps(thaw(self.carved), indent=1) + "\n")

    def checkpoint_entries(self) -> dict[str, Any]:
        """Plain entries for every checkpoint: the data fingerprint, and the carved split if any."""
        carved = thaw(self.carved) if self.carved is not None else None
        return {"data_fingerprint": thaw(self.fingerprint), "data_split": carved}

    def changes_since(self, state: Mapping[str, Any]) -> list[str]:
        """How this tree differs from the one a checkpoint was trained on (empty: the same).
        For resume and evaluate: warn with each line."""
        return fingerprint_changes(state.get("data_fingerprint"), self.fingerprint)
