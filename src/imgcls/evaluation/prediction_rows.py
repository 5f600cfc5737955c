"""Per-image prediction tables: the top-k classes, one row per image, the CSV file.

numpy and the standard library only: predict, evaluate and the metrics read these without
matplotlib (evaluation/reports.py draws the figures) or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgcls.names import csv_text


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices, best first; ties go to the lower index, as argmax breaks them, so
    the first column is always the prediction."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def prediction_rows(
    paths: Sequence[str],
    probs: np.ndarray,
    preds: np.ndarray,
    topk: np.ndarray,
    class_names: Sequence[str],
    targets: np.ndarray | None = None,
    losses: np.ndarray | None = None,
) -> list[dict]:
    """One row per sample: path, [true,] predicted, confidence, [correct, loss,] then the top-k
    classes with their probabilities."""
    rows = []
    for i, path in enumerate(paths):
        pred = int(preds[i])
        row = {"path": path}
        if targets is not None:
            row["true"] = class_names[int(targets[i])]
        row["predicted"] = class_names[pred]
        row["confidence"] = f"{probs[i, pred]:.6g}"
        if targets is not None:
            row["correct"] = int(pred == int(targets[i]))
        if losses is not None:
            row["loss"] = f"{losses[i]:.6g}"
        for j, c in enumerate(topk[i], start=1):
            row[f"top{j}"] = class_names[int(c)]
            row[f"top{j}_prob"] = f"{probs[i, int(c)]:.6g}"
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """The rows as a CSV, a column per key; names escaped and no cell a spreadsheet runs (csv_text)."""
    head = list(dict.fromkeys(k for row in rows for k in row)) or ["path"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(csv_text(head, rows))
