"""Which files are in which split: a carved val split, its record, and the data fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from imgcls.data.check import DataReport, Sample, shown
from imgcls.data.loading import DataError
from imgcls.data.scan import FileRecord


def carve_val(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A stratified (train, val) split of train's samples.

    Each file's place follows from a hash of (seed, path), not from a shuffled list: adding or
    removing one file moves at most that file, never reshuffles the rest."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in train:
        by_class[sample[2]].append(sample)
    keep, val = [], []
    for target in sorted(by_class):
        members = sorted(by_class[target], key=lambda s: hashlib.sha256(f"{seed}:{s[1]}".encode()).digest())
        n_val = round(len(members) * fraction)
        n_val = min(max(n_val, 1), len(members) - 1)  # one of each class on both sides when possible
        val += members[:n_val]
        keep += members[n_val:]
    return sorted(keep, key=lambda s: s[1]), sorted(val, key=lambda s: s[1])


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
            digest.update(f"{rel}\t{r.size}\t{r.sha256}\t{class_names[target]}\n".encode())
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
