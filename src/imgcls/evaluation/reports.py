"""Confusion matrices and classification reports: PNG, text, JSON, TensorBoard (matplotlib, seaborn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imgcls.names import literal_text, shown  # noqa: E402


@literal_text()  # class names are drawn as written: a name like $\frac{$ is text, not math
def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str, normalized: bool = False):
    """A seaborn heatmap with class names on both axes and the counts in the cells; normalized:
    each row divided by its true class's count, so the diagonal is the per-class recall.

    Names are drawn in a font that has their characters (plots.label_font); when no installed
    font has them, the axes show class indices and write_class_index puts the names beside."""
    # lazy for start-up time: seaborn brings pandas and scipy, 1.6-1.9 s of imports alone (0.04 s
    # after the report's scikit-learn, which imports them too)
    import seaborn as sns

    from imgcls.evaluation.plots import CLASS_INDEX_FILE, label_font, short_label, use_font

    class_names = [shown(c) for c in class_names]  # a name that is not UTF-8 drawn as "\xff"
    n = len(class_names)
    font = label_font(class_names)
    # the labels are laid out in the default font: a special font's names go in once it is done
    index = [str(i) for i in range(n)]
    names = [short_label(c) for c in class_names]  # full names: classification reports, class_index.txt
    ticks = names if font == "" else index
    if normalized:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    # past a few dozen classes the figure grows by a fixed size per class (up to 400 classes at
    # 0.16 in each, then the labels shrink), and the numbers leave the cells
    side = 4 + 0.45 * n if n <= 40 else min(0.16 * n, 64)
    label_size = 10 if n <= 40 else max(4.0, min(8.0, 72 * side / n * 0.75))
    fig, ax = plt.subplots(figsize=(side + 1.5 + 0.06 * max(map(len, names), default=0), side))
    sns.heatmap(
        cm,
        ax=ax,
        cmap="Blues",
        vmin=0.0 if normalized else float(cm.min(initial=0)),
        vmax=1.0 if normalized else float(cm.max(initial=1)),
        annot=n <= 40,  # past ~40 classes the numbers no longer fit their cells
        fmt="d" if cm.dtype.kind in "iu" else ".2f",
        annot_kws={"fontsize": label_size},  # black or white, whichever reads on the cell's blue
        xticklabels=ticks,  # every class, not seaborn's "auto" subset
        yticklabels=ticks,
    )
    ax.tick_params(length=0, labelsize=label_size)
    if font:
        ax.set_xticklabels(names)
        ax.set_yticklabels(names)
        use_font([*ax.get_xticklabels(), *ax.get_yticklabels()], font)
    drawn = names if font else ticks
    plt.setp(ax.get_xticklabels(), rotation=90 if max(map(len, drawn), default=0) > 2 else 0)
    plt.setp(ax.get_yticklabels(), rotation=0)
    indexed = "" if font is not None else f" (class index: names in {CLASS_INDEX_FILE})"
    ax.set_xlabel(f"predicted{indexed}")
    ax.set_ylabel(f"true{indexed}")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def write_split_report(
    split: str,
    targets: Sequence[int],
    preds: Sequence[int],
    class_names: Sequence[str],
    run_dir: Path,
    writer=None,
    step: int = 0,
) -> str:
    """plots/confusion_matrix_<split>.png (and plots/class_index.txt when no font draws the
    names), logs/classification_report_<split>.txt, TensorBoard image and text. Returns the
    report text."""
    from imgcls.evaluation.plots import save_figure, write_class_index
    from imgcls.evaluation.scores import confusion, report_text  # scikit-learn: lazy, see scores.py

    text = report_text(targets, preds, class_names)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs" / f"classification_report_{split}.txt").write_text(text)
    cm = confusion(targets, preds, len(class_names))
    acc = float(np.trace(cm) / max(cm.sum(), 1))
    fig = confusion_figure(cm, class_names, f"{split}: accuracy {acc:.4f} ({cm.sum()} images)")
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    save_figure(
        fig, run_dir / "plots" / f"confusion_matrix_{split}.png", writer, f"confusion_matrix/{split}", step
    )
    write_class_index(run_dir / "plots", class_names)
    if writer is not None:
        # two leading spaces per line make TensorBoard's markdown keep the table's columns
        writer.add_text(f"classification_report/{split}", "    " + text.replace("\n", "\n    "), step)
    plt.close(fig)
    return text
