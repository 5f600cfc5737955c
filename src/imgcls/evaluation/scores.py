"""Confusion matrix, per-class precision / recall / F1 / support and the classification report text.

numpy only: scikit-learn's metrics cost about a second of imports in every process that reports
(`python -X importtime -m imgcls.train ...`: sklearn.metrics 0.97 s of a 3.9 s start-up). The
definitions and the text are scikit-learn's (`classification_report(..., digits=4,
zero_division=0)`): a score whose denominator is 0 is 0, and F1 is 2 tp / (2 tp + fp + fn).
tests/test_evaluate_units.py checks both against scikit-learn itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from imgcls.names import shown


def confusion(targets: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"{len(t)} targets but {len(p)} predictions")
    if len(t) and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"a class index outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, -1)


class Scores(NamedTuple):
    """Per class (arrays of num_classes): precision, recall, F1 and support (true samples)."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray

    def average(self, weighted: bool) -> tuple[float, float, float]:
        """The macro (plain mean over classes) or support-weighted mean of precision, recall, F1;
        0 when there is nothing to average."""
        weights = self.support if weighted else np.ones_like(self.support)
        total = weights.sum()
        if not len(weights) or total == 0:
            return 0.0, 0.0, 0.0
        return tuple(
            float((score * weights).sum() / total) for score in (self.precision, self.recall, self.f1)
        )


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def class_scores(cm: np.ndarray) -> Scores:
    """Precision, recall, F1 and support of each class from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    true = cm.sum(axis=1)
    return Scores(_divide(tp, predicted), _divide(tp, true.astype(np.float64)),
                  _divide(2 * tp, true + predicted), true)  # fmt: skip


def report_text(
    targets: Sequence[int], preds: Sequence[int], class_names: Sequence[str], digits: int = 4
) -> str:
    """scikit-learn's classification report: a row per class, then accuracy, macro and weighted
    averages. Names are shown escaped (imgcls.names.shown): a text file holds every name."""
    class_names = [shown(c) for c in class_names]
    cm = confusion(targets, preds, len(class_names))
    s = class_scores(cm)
    width = max([len(name) for name in class_names] + [len("weighted avg"), digits])
    row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    lines = ["{:>{width}s} ".format("", width=width) + "".join(f" {h:>9}" for h in ("precision", "recall", "f1-score", "support")),
             "\n\n"]  # fmt: skip
    for i, name in enumerate(class_names):
        lines.append(
            row.format(
                name, s.precision[i], s.recall[i], s.f1[i], int(s.support[i]), width=width, digits=digits
            )
        )
    total = int(s.support.sum())
    accuracy = float(np.trace(cm) / total) if total else 0.0
    lines.append("\n")
    lines.append(("{:>{width}s} " + " {:>9}" * 2 + " {:>9.{digits}f} {:>9}\n").format(
        "accuracy", "", "", accuracy, total, width=width, digits=digits))  # fmt: skip
    for name, weighted in (("macro avg", False), ("weighted avg", True)):
        lines.append(row.format(name, *s.average(weighted), total, width=width, digits=digits))
    return "".join(lines)
