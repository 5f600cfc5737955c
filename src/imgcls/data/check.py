"""What the data check finds in a scanned tree: counts, imbalance, duplicates, leakage, tiny images."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from imgcls.data.scan import FileRecord
from imgcls.names import shown as name
from imgcls.names import shown_text

# Past 10:1 between the largest and smallest class, plain cross-entropy tends to ignore the small
# ones; class weights or a balanced sampler are worth a look. A warning, not an error.
IMBALANCE_WARN_RATIO = 10.0
SHOWN = 10  # examples per warning; the check lists every unreadable file, warnings need only a few

# (split, path relative to the root, class index)
Sample = tuple[str, str, int]


@dataclass(frozen=True)
class DataReport:
    """Everything the check found; errors stop training, warnings are shown and logged.

    While the scan runs, its steps append to `errors` and `warnings`; final() then gives the
    finished report, read-only throughout (the one a DataRecord holds)."""

    root: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    folders: dict[str, str] = field(default_factory=dict)  # split -> folder name ("" when carved)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_bad: int = 0  # unreadable files left out under on_bad_image=skip
    scanned: str = ""  # "398 files (398 decoded, 0 from cache) in 3.1 s"
    carved_from: str = "carved from train"  # val drawn from train: how (splits.describe)

    def final(self, **fields) -> DataReport:
        """This report with `fields` set, its lists and dicts made read-only."""
        done = replace(self, **fields)
        return replace(
            done,
            counts=MappingProxyType({s: MappingProxyType(dict(c)) for s, c in done.counts.items()}),
            folders=MappingProxyType(dict(done.folders)),
            errors=tuple(done.errors),
            warnings=tuple(done.warnings),
        )

    def summary_line(self) -> str:
        """One line for summary.txt."""
        parts = [self.scanned]
        if self.skipped_bad:
            parts.append(f"skipped {self.skipped_bad} unreadable file(s) (data.on_bad_image=skip)")
        parts.append(f"{len(self.warnings)} warning(s)")
        return "; ".join(parts)

    def text(self) -> str:
        lines = [f"data check: {self.root}", f"scanned {self.scanned}"]
        for split, counts in self.counts.items():
            total = sum(counts.values())
            where = f"{self.folders[split]}/" if self.folders.get(split) else self.carved_from
            per_class = ", ".join(f"{name(c)} {n}" for c, n in counts.items())
            lines.append(f"{split} ({where}): {total} images in {len(counts)} classes: {per_class}")
            ratio = imbalance(counts)
            if ratio is not None:
                lines.append(f"  imbalance (largest / smallest class): {ratio:.2f}")
        for title, items in (("warnings", self.warnings), ("errors", self.errors)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += ["  - " + item.replace("\n", "\n    ") for item in items]
        if not self.errors:
            lines.append("ok: no errors" + (f", {len(self.warnings)} warning(s)" if self.warnings else ""))
        # names that are not UTF-8 escaped (b"\xff" -> "\xff"), so the text can be printed and saved
        return shown_text("\n".join(lines))


def imbalance(counts: dict[str, int]) -> float | None:
    sizes = [n for n in counts.values() if n > 0]
    return max(sizes) / min(sizes) if len(sizes) >= 2 else None


def shown(items: list[str], n: int = SHOWN) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def imbalance_warnings(counts: dict[str, dict[str, int]]) -> list[str]:
    out = []
    for split, per_class in counts.items():
        ratio = imbalance(per_class)
        if ratio is not None and ratio >= IMBALANCE_WARN_RATIO:
            big = max(per_class, key=per_class.get)
            small = min(per_class, key=per_class.get)
            out.append(
                f"{split}: classes are imbalanced {ratio:.1f}:1 ({name(big)} {per_class[big]}, "
                f"{name(small)} {per_class[small]}); consider class weights or a balanced sampler"
            )
    return out


def small_image_warning(samples: list[Sample], records: dict[str, FileRecord], min_size: int) -> list[str]:
    small = [
        f"{name(rel)} ({records[rel].width}x{records[rel].height})"
        for _, rel, _ in samples
        if min(records[rel].width, records[rel].height) < min_size
    ]
    if not small:
        return []
    return [
        f"{len(small)} image(s) smaller than {min_size} px on a side (data.min_image_size): {shown(small)}"
    ]


def duplicate_warnings(
    samples: list[Sample], records: dict[str, FileRecord], class_names: list[str]
) -> list[str]:
    """Identical bytes twice: within a split (over-weighted, maybe mislabeled) or across splits
    (leakage: the model is scored on images it trained on)."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[records[sample[1]].sha256].append(sample)
    within: dict[str, list[str]] = defaultdict(list)
    conflicting: list[str] = []
    across: list[str] = []
    for group in groups.values():
        if len(group) < 2:
            continue
        text = " = ".join(name(rel) for _, rel, _ in group)
        if len({split for split, _, _ in group}) > 1:
            across.append(text)
            continue
        within[group[0][0]].append(text)
        if len({target for _, _, target in group}) > 1:
            labels = sorted({name(class_names[t]) for _, _, t in group})
            conflicting.append(f"{text} ({' vs '.join(labels)})")
    out = [
        f"{split}: {len(texts)} set(s) of identical files: {shown(texts)}" for split, texts in within.items()
    ]
    if conflicting:
        out.append(f"identical files with different classes: {shown(conflicting)}")
    if across:
        out.append(
            f"leakage: {len(across)} set(s) of identical files in more than one split "
            f"(validation and test scores count them as unseen): {shown(across)}"
        )
    return out
