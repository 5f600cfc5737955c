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


def check_options(val_fraction: float | None, folds: Any, fold: Any, split_file: str | None) -> None:
    """Refuse data.val_fraction / data.folds / data.fold / data.split_file values that cannot work."""
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction must be between 0 and 1 (e.g. 0.2), or null; got {val_fraction}")
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


def carve_val(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A stratified (train, val) split of train's samples.

    Each file's place follows from a hash of (seed, path), not from a shuffled list: adding or
    removing one file moves at most that file, never reshuffles the rest."""
    by_class = _by_class(train)
    keep, val = [], []
    for target in sorted(by_class):
        members = _hash_order(by_class[target], seed)
        n_val = round(len(members) * fraction)
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


def draw_val(
    train: list[Sample],
    class_names: list[str],
    report: DataReport,
    *,
    val_fraction: float | None,
    folds: int | None,
    fold: int,
    seed: int,
    recorded: Mapping[str, Any] | None,
    split_file: Path | None,
) -> tuple[list[Sample], list[Sample], dict[str, Any]]:
    """The (train, val) split drawn from train, and its record (the checkpoint's data_split).

    A recorded split (a checkpoint's, then data.split_file's) is reused file for file; otherwise
    val is fold `fold` of `folds` when folds is set, else a val_fraction share."""
    from_file = recorded is None and split_file is not None
    source = str(split_file) if from_file else "the checkpoint's data_split"
    if from_file:
        recorded = read_split_file(split_file)
    if recorded is not None:
        then = (recorded.get("folds"), recorded.get("fold") if recorded.get("folds") else None)
        if then != (folds, fold if folds else None):
            wanted = f"data.folds={folds} data.fold={fold}" if folds else f"data.val_fraction={val_fraction}"
            recorded_as = (
                f"data.folds={then[0]} data.fold={then[1]}" if then[0] else "data.val_fraction (no folds)"
            )
            fix = (
                "set the recorded values, or leave data.split_file out"
                if from_file
                else "a run keeps the split it was trained on: leave these data keys as the run had them"
            )
            report.errors.append(
                f"{source} records a split drawn with {recorded_as}, but the config asks for {wanted}: {fix}"
            )
            return train, [], {}
        kept, val = reuse_split(train, recorded, source, report)
    elif folds is not None:
        kept, val = fold_split(train, folds, fold, seed, class_names, report)
    else:
        kept, val = carve_val(train, val_fraction, seed)
    how = {"folds": folds, "fold": fold} if folds is not None else {"val_fraction": val_fraction}
    record = {
        **how,
        "split_seed": seed,
        "train": [rel for _, rel, _ in kept],
        "val": [rel for _, rel, _ in val],
    }
    return kept, [("val", rel, target) for _, rel, target in val], record


def describe(carved: Mapping[str, Any] | None) -> str:
    """One line for the summary and the log: where val came from ("" for the tree's val/)."""
    if not carved:
        return ""
    seed = f"data.split_seed={carved['split_seed']}"
    if carved.get("folds"):
        return f"fold {carved['fold']} of {carved['folds']} of train, {seed}"
    return f"carved from train, data.val_fraction={carved['val_fraction']}, {seed}"


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
        list(recorded["train"]), list(recorded["val"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"data.split_file={str(split_file)!r} is not a readable data_split.json ({type(exc).__name__}: {exc})"
        ) from exc
    return recorded


def reuse_split(
    train: list[Sample], recorded: dict, source: str, report: DataReport
) -> tuple[list[Sample], list[Sample]]:
    """The (train, val) an earlier run carved (its data_split.json, or its checkpoint's
    data_split): evaluate and resume must see exactly the same files. Recorded files that are
    gone are errors; new ones are left out with a warning."""
    by_rel = {s[1]: s for s in train}
    lost = [rel for rel in [*recorded["train"], *recorded["val"]] if rel not in by_rel]
    if lost:
        report.errors.append(f"{len(lost)} file(s) of the recorded split in {source} are gone: {shown(lost)}")
    kept = [by_rel[rel] for rel in recorded["train"] if rel in by_rel]
    val = [by_rel[rel] for rel in recorded["val"] if rel in by_rel]
    new = len(train) - len(kept) - len(val)
    if new > 0:
        report.warnings.append(f"{new} file(s) in train are not in {source}: left out")
    return kept, val


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
