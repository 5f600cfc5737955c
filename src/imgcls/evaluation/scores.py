"""The classification report (text and JSON form) and the confusion matrix: scikit-learn's.

sklearn.metrics is 1.3-1.6 s of imports (`python -X importtime -c "import sklearn.metrics"`, this
machine, 2 cores): this module is imported only where a report is written (reports.write_split_report,
evaluate), never at start-up. Class names are shown escaped (imgcls.names.shown) before they reach
scikit-learn, so a text file holds every name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from imgcls.names import shown

DIGITS = 4  # the report's decimals: 4 tells 0.9993 from 0.9987 on a few thousand images


def _labels(targets: Sequence[int], preds: Sequence[int], num_classes: int) -> list[int]:
    """range(num_classes), once every index is in it. What scikit-learn lacks: given `labels`, it
    drops the samples whose class is not among them (and prints a micro average where the accuracy
    was), a report that is silently wrong; an index past the class names is a bug, so it raises."""
    indices = np.concatenate([np.asarray(targets).reshape(-1), np.asarray(preds).reshape(-1)])
    if len(indices) and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(f"a class index outside 0..{num_classes - 1}")
    return list(range(num_classes))


def confusion(targets: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    return confusion_matrix(targets, preds, labels=_labels(targets, preds, num_classes))


def report_text(targets: Sequence[int], preds: Sequence[int], class_names: Sequence[str]) -> str:
    """A row per class (every class, never predicted or absent too: 0 where a score divides by
    0), then accuracy, macro and weighted averages."""
    return classification_report(
        targets,
        preds,
        labels=_labels(targets, preds, len(class_names)),
        target_names=[shown(c) for c in class_names],
        digits=DIGITS,
        zero_division=0,
    )


def report_dict(targets: Sequence[int], preds: Sequence[int], class_names: Sequence[str]) -> dict:
    """report_text's numbers for classification_report.json: {"classes": {name: {precision,
    recall, f1, support}}, "accuracy", "macro avg", "weighted avg"}. The classes sit under their
    own key, so that no class name can collide with an average (a class may be called "accuracy"),
    and they keep the names as written (JSON holds any name)."""
    report = classification_report(
        targets,
        preds,
        labels=_labels(targets, preds, len(class_names)),
        target_names=[str(i) for i in range(len(class_names))],  # digits: never an average's key
        output_dict=True,
        zero_division=0,
    )

    def row(scores: dict) -> dict:
        return {
            "precision": float(scores["precision"]),
            "recall": float(scores["recall"]),
            "f1": float(scores["f1-score"]),
            "support": int(scores["support"]),
        }

    return {
        "classes": {name: row(report[str(i)]) for i, name in enumerate(class_names)},
        "accuracy": float(report["accuracy"]),
        **{average: row(report[average]) for average in ("macro avg", "weighted avg")},
    }
