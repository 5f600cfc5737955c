"""An ImageFolder tree <root>/<split>/<class>/<image>: its options, and the scan that lists, checks
and splits it into a DataRecord (loaders are built from both: data.loaders)."""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imgcls.data import check, splits
from imgcls.data.augment import setting
from imgcls.data.cache import MODES
from imgcls.data.download import fetch_tree
from imgcls.data.images import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS, MB
from imgcls.data.listing import find_classes, scan_class
from imgcls.data.record import DataRecord
from imgcls.data.scan import scan_files
from imgcls.data.splits import check_options
from imgcls.errors import ConfigError, DataError

ON_BAD_IMAGE = ("error", "skip")


class ImageFolderData:
    """The options of a tree <root>/<split>/<class>/<image> (the YAML's data node, key for key);
    nobody changes them after construction. scan() checks the whole tree before anything trains
    and returns what it found as a DataRecord; the class list comes from the train split."""

    required_splits = ("train", "val")

    def __init__(
        self,
        root: str,
        splits: Mapping[str, str],
        batch_size: int,
        num_workers: int = 0,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png"),
        exclude: Sequence[str] = (),
        on_bad_image: str = "error",
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_file_mb: float = DEFAULT_MAX_FILE_MB,
        min_image_size: int = 32,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        folds: int | None = None,
        fold: int = 0,
        split_seed: int = 0,
        split_file: str | None = None,
        download: Mapping[str, Any] | None = None,
        cache: str = "none",
        cache_size: int | None = None,
        cache_dir: str = "~/.cache/imgcls/images",
        device_augment: str | bool = "auto",
    ):
        if batch_size < 1:
            raise DataError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"data.num_workers must be 0 or more, got {num_workers}")
        if on_bad_image not in ON_BAD_IMAGE:
            raise DataError(
                f"data.on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}"
            )
        if max_image_pixels < 1:
            raise DataError(f"data.max_image_pixels must be at least 1, got {max_image_pixels}")
        if not max_file_mb > 0:
            raise DataError(f"data.max_file_mb must be above 0, got {max_file_mb}")
        check_options(val_fraction, folds, fold, split_file, test_fraction)  # `splits`: the folder names
        self.root = Path(root)
        # read-only containers too: one options object serves every record scanned from it
        self.split_dirs = MappingProxyType(dict(splits))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.extensions = tuple(extensions)
        self.exclude = tuple(exclude)
        self.on_bad_image = on_bad_image
        self.max_pixels = max_image_pixels
        self.max_bytes = int(max_file_mb * MB)  # no file above it is opened (images.read_image_file)
        self.min_image_size = min_image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.folds, self.fold = folds, fold
        self.split_seed = split_seed
        self.split_file = Path(split_file) if split_file else None
        self.download = MappingProxyType(dict(download)) if download else None
        if cache not in MODES:
            raise DataError(f"data.cache={cache!r} is not one of {', '.join(MODES)}")
        self.cache, self.cache_size, self.cache_dir = cache, cache_size, Path(cache_dir).expanduser()
        try:
            self.device_augment = setting(device_augment)  # resolved with the device: augment.resolve
        except ConfigError as exc:
            raise DataError(str(exc)) from None
        self._built = True

    def __setattr__(self, name: str, value: Any) -> None:
        # options, not state: what a scan finds goes into the DataRecord it returns
        if getattr(self, "_built", False):
            raise AttributeError(f"{type(self).__name__} is read-only after construction (setting {name})")
        super().__setattr__(name, value)

    def prepare(self, fetch: bool = True) -> None:
        """Make the tree available: fetch it when a download is configured, else check it is there.

        fetch=False (evaluate, predict, export, resume): a run's config may come from someone else,
        and data.download would unpack their archive at their data.root; only a new training run,
        whose config the user composed, fetches."""
        if not self.root.is_dir() and self.download:
            if not fetch:
                raise DataError(
                    f"data.root={str(self.root)!r} is not a folder, and only a new training run downloads "
                    f"data.download.url={self.download.get('url')!r}: a run's config may come from "
                    "someone else. Fetch the tree yourself (python -m imgcls.data check with the same "
                    "data options), or point data.root at it."
                )

            fetch_tree(root=self.root, **self.download)
        if not self.root.is_dir():
            raise DataError(
                f"data.root={str(self.root)!r} is not a folder (resolved: {self.root.resolve()}). "
                "Point data.root at a folder of class folders, or of train/ and val/ split folders of them."
            )

    def scan(self, fetch: bool = True, recorded_split: Mapping[str, Any] | None = None) -> DataRecord:
        """List, decode and check every split into a record; raise DataError listing everything
        that is wrong. fetch: see prepare. recorded_split: a checkpoint's data_split, reused file
        for file (a resume or evaluate sees exactly the files the run was trained on)."""
        report, record = self.inspect(fetch, recorded_split)
        if record is None:
            problems = "\n  ".join(e.replace("\n", "\n    ") for e in report.errors)
            raise DataError(f"the data tree {self.root} has problems:\n  {problems}")
        return record

    def inspect(
        self, fetch: bool = True, recorded_split: Mapping[str, Any] | None = None
    ) -> tuple[check.DataReport, DataRecord | None]:
        """The data check's report, and the record when the report has no errors. A tree that
        cannot be checked at all (no root, no train/, fewer than 2 classes) raises DataError."""
        self.prepare(fetch)
        report = check.DataReport(str(self.root))
        present, layout = self._present(report)
        class_names = find_classes(present["train"])
        if len(class_names) < 2:
            raise DataError(
                f"{present['train']}: found {len(class_names)} class folder(s), need at least 2 "
                "(one folder per class, holding its images)."
            )
        listed, skipped = self._list(present, class_names, report)
        paths = [p for files in listed.values() for _, p in files]
        scan = scan_files(self.root, paths, self.max_pixels, max_bytes=self.max_bytes)
        records = scan.records
        scanned = (
            f"{len(records)} files ({scan.decoded} decoded, {scan.cached} from cache) in {scan.seconds:.2f} s"
        )
        samples, skipped_bad = self._usable(listed, records, present, class_names, report)
        carved, carved_from = None, report.carved_from
        # a tree of class folders alone: val is carved (data.val_fraction, else FLAT_VAL_FRACTION)
        flat = layout == "class folders"
        val_fraction = splits.FLAT_VAL_FRACTION if flat and self.val_fraction is None else self.val_fraction
        if (self.carves or flat) and not report.errors:
            samples["train"], drawn, carved = splits.draw_splits(
                samples["train"], class_names, report, val_fraction=val_fraction, test_fraction=self.test_fraction,
                folds=self.folds, fold=self.fold, seed=self.split_seed, recorded=recorded_split,
                split_file=self.split_file, layout=layout,
            )  # fmt: skip
            samples.update(drawn)
            carved_from = splits.describe(carved)
            samples = {s: samples[s] for s in self.split_dirs if s in samples}  # train, val, test
        everything = [s for items in samples.values() for s in items]
        report.warnings.extend(check.imbalance_warnings(_counts(samples, class_names)))
        report.warnings.extend(check.small_image_warning(everything, records, self.min_image_size))
        report.warnings.extend(check.duplicate_warnings(everything, records, class_names))
        report = report.final(
            scanned=scanned,
            skipped_bad=skipped_bad,
            carved_from=carved_from,
            folders={s: self.split_dirs[s] if s in present and not flat else "" for s in samples},
            counts=_counts(samples, class_names),
        )
        if report.errors:
            return report, None
        return report, DataRecord.of(
            self.root,
            class_names,
            {
                split: [(str(self.root / rel), target) for _, rel, target in items]
                for split, items in samples.items()
            },
            split_dirs=self.split_dirs,
            skipped=skipped,
            fingerprint=splits.fingerprint(samples, records, class_names),
            carved=carved,
            report=report,
        )

    @property
    def carves(self) -> bool:
        """A split is drawn from train (data.val_fraction, data.test_fraction or data.folds), not
        read from a folder (a tree of class folders alone has val drawn whatever these say)."""
        return self.val_fraction is not None or self.folds is not None or self.test_fraction is not None

    def _present(self, report: check.DataReport) -> tuple[dict[str, Path], str]:
        """The split folders to scan, by split, and the tree's layout: "split folders", or "class
        folders" for a root holding class folders and no split folder (its images are train's, and
        val is drawn from them). A missing required split raises DataError."""
        present = {s: self.root / d for s, d in self.split_dirs.items() if (self.root / d).is_dir()}
        if not present and self._class_folders_only():
            return {"train": self.root}, "class folders"
        val_drawn = self.val_fraction is not None or self.folds is not None
        required = ("train",) if val_drawn else self.required_splits
        missing = [f"{self.split_dirs[s]}/" for s in required if s not in present]
        if missing:
            found = sorted(e.name + "/" for e in os.scandir(self.root) if e.is_dir()) or ["nothing"]
            hint = "" if val_drawn else " With no val/ folder, data.val_fraction=0.2 carves one out of train."
            raise DataError(
                f"{self.root}: missing split folder(s) {', '.join(missing)}; found {', '.join(found)}. "
                f"Each split needs one folder per class (set data.splits.<split> to rename a split), or "
                f"put the class folders straight under data.root (val is then carved from them).{hint}"
            )
        if self.folds is not None and "val" in present:
            report.warnings.extend(splits.unused_val_warning(self.split_dirs, present, self.folds))
            del present["val"]  # not listed, not scanned: validation is a fold of train
        elif self.val_fraction is not None and "val" in present:
            raise DataError(
                f"data.val_fraction={self.val_fraction} carves val out of train, but {present['val']} "
                "exists: drop data.val_fraction to use that folder, or rename it."
            )
        if self.test_fraction is not None and "test" in present:
            raise DataError(
                f"data.test_fraction={self.test_fraction} carves test out of train, but {present['test']} "
                "exists: drop data.test_fraction to use that folder, or rename it."
            )
        return present, "split folders"

    def _class_folders_only(self) -> bool:
        """root holds folders and none is named like a split (train/, Val/, test/, ...): class
        folders, as many published sets come (fastai's valid_pct, torchvision's ImageFolder)."""
        folders = [e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")]
        return bool(folders) and not any(name.casefold() in splits.SPLIT_NAMES for name in folders)

    def _list(self, present: dict[str, Path], class_names: list[str], report: check.DataReport):
        """(class index, path) of every candidate file per split, and the files skipped for their
        suffix per split; structural problems go to report."""
        listed: dict[str, list[tuple[int, Path]]] = {}
        skipped: dict[str, list[Path]] = {}
        excluded = 0
        for split, split_dir in present.items():
            classes = find_classes(split_dir)
            lacking = sorted(set(class_names) - set(classes))
            extra = sorted(set(classes) - set(class_names))
            if lacking:
                report.errors.append(f"{split_dir}: missing class folder(s) {', '.join(lacking)}")
            if extra:
                report.errors.append(f"{split_dir}: class folder(s) not in train: {', '.join(extra)}")
            listed[split], skipped[split] = [], []
            for target, name in enumerate(class_names):
                if name not in classes:
                    continue
                files, odd = scan_class(split_dir / name, self.extensions)
                for path in files:
                    rel = path.relative_to(self.root).as_posix()
                    if any(fnmatch.fnmatchcase(rel, pattern) for pattern in self.exclude):
                        excluded += 1
                    else:
                        listed[split].append((target, path))
                skipped[split] += odd
        not_images = [p.relative_to(self.root).as_posix() for files in skipped.values() for p in files]
        if not_images:
            report.warnings.append(
                f"skipped {len(not_images)} file(s) that are not images by suffix: {check.shown(not_images)}"
            )
        if excluded:
            report.warnings.append(f"left out {excluded} file(s) matching data.exclude {list(self.exclude)}")
        return listed, skipped

    def _usable(
        self, listed, records, present, class_names, report
    ) -> tuple[dict[str, list[check.Sample]], int]:
        """The decodable samples per split, and how many unreadable files were skipped; unreadable
        files (under on_bad_image=error) and empty class folders go to report."""
        bad = [(rel, r.error) for rel, r in records.items() if r.error]
        if bad and self.on_bad_image == "error":
            report.errors.append(
                f"{len(bad)} file(s) cannot be used (set data.on_bad_image=skip to leave them out):\n"
                + "\n".join(f"{rel}: {error}" for rel, error in bad)
            )
        elif bad:
            report.warnings.append(
                f"skipped {len(bad)} unreadable file(s) (data.on_bad_image=skip): "
                + check.shown([f"{rel} ({error})" for rel, error in bad])
            )
        samples: dict[str, list[check.Sample]] = {}
        for split, files in listed.items():
            samples[split] = []
            for target, path in files:
                rel = path.relative_to(self.root).as_posix()
                if not records[rel].error:
                    samples[split].append((split, rel, target))
            listed_per_class = Counter(t for t, _ in files)
            usable_per_class = Counter(s[2] for s in samples[split])
            for target, name in enumerate(class_names):
                if (present[split] / name).is_dir() and not usable_per_class[target]:
                    if listed_per_class[target]:
                        report.errors.append(
                            f"{present[split] / name}: no usable image (all {listed_per_class[target]} unreadable)"
                        )
                    else:
                        report.errors.append(
                            f"{present[split] / name}: no image files ({', '.join(self.extensions)})"
                        )
        return samples, len(bad) if self.on_bad_image == "skip" else 0


def _counts(samples: dict[str, list[check.Sample]], class_names: list[str]) -> dict[str, dict[str, int]]:
    per_split = {split: Counter(s[2] for s in items) for split, items in samples.items()}
    return {split: {name: c[t] for t, name in enumerate(class_names)} for split, c in per_split.items()}
