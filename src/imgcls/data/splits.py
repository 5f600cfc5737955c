"""Which files are in which split: a carved val split or a k-fold one, its record, the data fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgcls.data.check import DataReport, Sample, shown
from imgcls.data.scan import FileRecord
from imgcls.errors import DataError

# a tree of class folders with no split folders (root/<class>/<image>, as many published sets come):
# val is carved out of it, this share unless data.val_fraction says otherwise (fastai's valid_pct
# default; scikit-learn's train_test_split holds out 0.25)
FLAT_VAL_FRACTION = 0.2
# folder names that say a tree is split (by any spelling): such a root is never read as class folders
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "dev", "test", "testing"})


def check_options(
    val_fraction: float | None,
    folds: Any,
    fold: Any,
    split_file: str | None,
    test_fraction: float | None = None,
) -> None:
    """Refuse data.val_fraction / data.test_fraction / data.folds / data.fold / data.split_file
    values that cannot work."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1
        ):
            raise DataError(f"data.{key} must be between 0 and 1 (e.g. 0.2), or null; got {value!r}")
    if val_fraction is not None and test_fraction is not None and val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave nothing to "
            "train on: keep their sum below 1 (e.g. 0.2 and 0.1)"
        )
    if folds is not None and (type(folds) is not int or folds < 2):
        raise DataError(
            f"data.folds must be a whole number of at least 2 (e.g. data.folds=5), or null; got {folds!r}"
        )
    if type(fold) is not int:
        raise DataError(
            f"data.fold must be a whole number, the validation fold (0 to data.folds-1); got {fold!r}"
        )
    if folds is None and fold != 0:
        raise DataError(
            f"data.fold={fold} picks a validation fold, but data.folds is null: set the number of "
            "folds too, e.g. data.folds=5"
        )
    if folds is not None and not 0 <= fold < folds:
        raise DataError(
            f"data.fold={fold} is out of range for data.folds={folds}: choose 0 to {folds - 1} "
            f"(all of them in one sweep: -m data.fold={','.join(map(str, range(folds)))} data.folds={folds})"
        )
    if folds is not None and val_fraction is not None:
        raise DataError(
            f"data.folds={folds} and data.val_fraction={val_fraction} both draw val out of train: "
            "set one of them (data.val_fraction=null for cross-validation)"
        )
    if split_file and val_fraction is None and folds is None:
        raise DataError(
            "data.split_file reuses a split carved by data.val_fraction or data.folds: set the one "
            "that run used (its config.yaml has it) too"
        )


def _hash_order(members: list[Sample], seed: int) -> list[Sample]:
    return sorted(
        members, key=lambda s: hashlib.sha256(f"{seed}:{s[1]}".encode("utf-8", "surrogateescape")).digest()
    )


def _by_class(train: list[Sample]) -> dict[int, list[Sample]]:
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in train:
        by_class[sample[2]].append(sample)
    return by_class


def carve_val(
    train: list[Sample], fraction: float, seed: int, of_total: float = 1.0
) -> tuple[list[Sample], list[Sample]]:
    """A stratified (train, val) split of train's samples; `fraction` is a share of each class's
    files before a test split took its `1 - of_total` share (the same hash order: test took the
    first files, val takes the next).

    Each file's place follows from a hash of (seed, path), not from a shuffled list: adding or
    removing one file moves at most a file at each boundary, never reshuffles the rest."""
    by_class = _by_class(train)
    keep, val = [], []
    for target in sorted(by_class):
        members = _hash_order(by_class[target], seed)
        n_val = round(len(members) / of_total * fraction)
        n_val = min(max(n_val, 1), len(members) - 1)  # one of each class on both sides when possible
        val += members[:n_val]
        keep += members[n_val:]
    return sorted(keep, key=lambda s: s[1]), sorted(val, key=lambda s: s[1])


def fold_of(train: list[Sample], folds: int, seed: int) -> dict[str, int]:
    """Each train file's fold (0 .. folds-1): stratified, seeded, with fold sizes within one.

    Per class (in class order) the files are put in hash-of-(seed, path) order and dealt out
    round-robin, with the counter carrying on from one class to the next: each class is spread
    over the folds within one file, and so is the total. Unlike carve_val, adding a file can move
    the files dealt after it; a run's record (data_split) keeps resume and evaluate exact."""
    by_class = _by_class(train)
    assigned, dealt = {}, 0
    for target in sorted(by_class):
        for sample in _hash_order(by_class[target], seed):
            assigned[sample[1]] = dealt % folds
            dealt += 1
    return assigned


def fold_split(
    train: list[Sample], folds: int, fold: int, seed: int, class_names: list[str], report: DataReport
) -> tuple[list[Sample], list[Sample]]:
    """(train, val) for cross-validation: val is fold `fold`, train the other folds."""
    if len(train) < folds:
        report.errors.append(
            f"data.folds={folds}: train has only {len(train)} usable image(s), fewer than the folds; "
            "use fewer folds"
        )
        return train, []
    assigned = fold_of(train, folds, seed)
    kept = [s for s in train if assigned[s[1]] != fold]
    val = [s for s in train if assigned[s[1]] == fold]
    per_class = Counter(s[2] for s in train)
    few = [f"{class_names[t]} {n}" for t, n in sorted(per_class.items()) if n < folds]
    if few:
        absent = sorted({class_names[t] for t in per_class} - {class_names[s[2]] for s in val})
        report.warnings.append(
            f"data.folds={folds}: class(es) with fewer train images than folds ({', '.join(few)}) are "
            "missing from the validation side of some folds"
            + (f", this one (fold {fold}) included: {', '.join(absent)}" if absent else "")
            + "; use fewer folds, or add images"
        )
    return sorted(kept, key=lambda s: s[1]), sorted(val, key=lambda s: s[1])


def draw_splits(
    train: list[Sample],
    class_names: list[str],
    report: DataReport,
    *,
    val_fraction: float | None,
    test_fraction: float | None,
    folds: int | None,
    fold: int,
    seed: int,
    recorded: Mapping[str, Any] | None,
    split_file: Path | None,
    layout: str = "split folders",
) -> tuple[list[Sample], dict[str, list[Sample]], dict[str, Any]]:
    """What is left to train on, the splits drawn from train ({"val": ..., "test": ... when
    test_fraction is set}), and their record (the checkpoint's data_split).

    A recorded split (a checkpoint's, then data.split_file's) is reused file for file. Otherwise
    test, when asked, is a test_fraction share of each class; val is then fold `fold` of `folds`
    of the rest when folds is set, else a val_fraction share of the whole. `layout` is "class
    folders" for a tree without split folders (the record and the summary say so)."""
    from_file = recorded is None and split_file is not None
    source = str(split_file) if from_file else "the checkpoint's data_split"
    if from_file:
        recorded = read_split_file(split_file)
    if recorded is not None:
        then = (recorded.get("folds"), recorded.get("fold") if recorded.get("folds") else None)
        then_test = recorded.get("test_fraction")
        if then != (folds, fold if folds else None) or then_test != test_fraction:
            wanted = f"data.folds={folds} data.fold={fold}" if folds else f"data.val_fraction={val_fraction}"
            recorded_as = (
                f"data.folds={then[0]} data.fold={then[1]}" if then[0] else "data.val_fraction (no folds)"
            )
            if then_test or test_fraction:
                wanted, recorded_as = (
                    f"{wanted}, data.test_fraction={test_fraction}",
                    f"{recorded_as}, data.test_fraction={then_test}",
                )
            fix = (
                "set the recorded values, or leave data.split_file out"
                if from_file
                else "a run keeps the split it was trained on: leave these data keys as the run had them"
            )
            report.errors.append(
                f"{source} records a split drawn with {recorded_as}, but the config asks for {wanted}: {fix}"
            )
            return train, {}, {}
        kept, drawn = reuse_split(train, recorded, source, report)
    else:
        pool, test = carve_val(train, test_fraction, seed) if test_fraction else (train, [])
        drawn = {"test": test} if test_fraction else {}
        if folds is not None:
            kept, drawn["val"] = fold_split(pool, folds, fold, seed, class_names, report)
        elif val_fraction is not None:
            kept, drawn["val"] = carve_val(pool, val_fraction, seed, of_total=1 - (test_fraction or 0))
        else:  # the tree's own val/: test alone is drawn
            kept = pool
        drawn = {split: drawn[split] for split in ("val", "test") if split in drawn}
    how = {"folds": folds, "fold": fold} if folds is not None else {"val_fraction": val_fraction}
    record = {
        **how,
        **({"test_fraction": test_fraction} if test_fraction else {}),
        **({"layout": layout} if layout != "split folders" else {}),
        "split_seed": seed,
        "train": [rel for _, rel, _ in kept],
        **{split: [rel for _, rel, _ in items] for split, items in drawn.items()},
    }
    return kept, {split: [(split, rel, t) for _, rel, t in items] for split, items in drawn.items()}, record


def describe(carved: Mapping[str, Any] | None) -> str:
    """One line for the summary and the log: where val (and a carved test) came from ("" for the
    tree's own val/)."""
    if not carved:
        return ""
    seed = f"data.split_seed={carved['split_seed']}"
    source = "train"
    if carved.get("layout") == "class folders":
        source = "the class folders (the tree has no split folders)"
    if "val" not in carved:  # the tree's own val/, a test split carved from train
        return f"test carved from {source}, data.test_fraction={carved['test_fraction']}, {seed}"
    if carved.get("folds"):
        line = f"fold {carved['fold']} of {carved['folds']} of {source}, {seed}"
    else:
        line = f"carved from {source}, data.val_fraction={carved['val_fraction']}, {seed}"
    if carved.get("test_fraction"):
        line += f"; test carved from it too, data.test_fraction={carved['test_fraction']}"
    return line


def unused_val_warning(split_dirs: Mapping[str, str], present: Mapping[str, Path], folds: int) -> list[str]:
    """With folds, val is a fold of train: the tree's own val/ folder is not read for validation."""
    if any(s != "val" and d == split_dirs["val"] for s, d in split_dirs.items()):
        return []  # already another split (data.splits.test=val): nothing is left out
    val = split_dirs["val"]
    if "test" in present:
        hint = f"to test on it instead of {split_dirs['test']}/, set data.splits.test={val}"
    else:
        hint = f"to use it as the test split, add data.splits.test={val}"
    return [
        f"data.folds={folds}: validation is a fold of train, so {present['val']} is not used for "
        f"validation; {hint}"
    ]


def read_split_file(split_file: Path) -> dict:
    try:
        recorded = json.loads(Path(split_file).read_text())
        list(recorded["train"]), list(recorded.get("val", [])), list(recorded.get("test", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"data.split_file={str(split_file)!r} is not a readable data_split.json ({type(exc).__name__}: {exc})"
        ) from exc
    return recorded


def reuse_split(
    train: list[Sample], recorded: Mapping[str, Any], source: str, report: DataReport
) -> tuple[list[Sample], dict[str, list[Sample]]]:
    """What is left to train on and the splits an earlier run carved (its data_split.json, or its
    checkpoint's data_split: val, and test when it carved one): evaluate and resume must see
    exactly the same files. Recorded files that are gone are errors; new ones are left out with
    a warning."""
    by_rel = {s[1]: s for s in train}
    drawn_splits = [s for s in ("val", "test") if s in recorded]
    listed = [*recorded["train"], *(rel for s in drawn_splits for rel in recorded[s])]
    lost = [rel for rel in listed if rel not in by_rel]
    if lost:
        report.errors.append(f"{len(lost)} file(s) of the recorded split in {source} are gone: {shown(lost)}")
    kept = [by_rel[rel] for rel in recorded["train"] if rel in by_rel]
    drawn = {s: [by_rel[rel] for rel in recorded[s] if rel in by_rel] for s in drawn_splits}
    new = len(train) - len(kept) - sum(len(items) for items in drawn.values())
    if new > 0:
        report.warnings.append(f"{new} file(s) in train are not in {source}: left out")
    return kept, drawn


def fingerprint(samples: dict[str, list[Sample]], records: dict[str, FileRecord], class_names: list[str]):
    """Per split: file count, bytes and one sha256 over (path, size, content hash, class)."""
    out = {}
    for split, items in samples.items():
        digest = hashlib.sha256()
        for _, rel, target in sorted(items, key=lambda s: s[1]):
            r = records[rel]
            # surrogateescape: a name that is not UTF-8 hashes as its bytes (valid names as before)
            digest.update(
                f"{rel}\t{r.size}\t{r.sha256}\t{class_names[target]}\n".encode("utf-8", "surrogateescape")
            )
        out[split] = {
            "files": len(items),
            "bytes": sum(records[rel].size for _, rel, _ in items),
            "sha256": digest.hexdigest(),
        }
    return {"splits": out}


def fingerprint_changes(recorded: dict | None, current: dict) -> list[str]:
    """What differs between a checkpoint's data fingerprint and today's tree, one line per split."""
    if not recorded or "splits" not in recorded:
        return []
    changes = []
    for split, now in current["splits"].items():
        then = recorded["splits"].get(split)
        if then is None:
            changes.append(f"{split}: not in the recorded data")
        elif then["sha256"] != now["sha256"]:
            changes.append(
                f"{split}: changed since the checkpoint ({then['files']} -> {now['files']} files, "
                f"{then['bytes']:,} -> {now['bytes']:,} bytes)"
            )
    changes += [
        f"{s}: in the recorded data, missing now" for s in recorded["splits"] if s not in current["splits"]
    ]
    return changes
