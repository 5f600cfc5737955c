"""Evaluation metrics from per-sample predictions: top-k, calibration (ECE), confusions (the per-class
scores are scikit-learn's: evaluation/scores.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgcls.evaluation.inference import Predictions
from imgcls.evaluation.prediction_rows import topk_indices


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    hits = (topk_indices(logits, k) == targets[:, None]).any(axis=1)
    return float(hits.mean()) if len(hits) else 0.0


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Equal-width confidence bins over [0, 1] (a bin holds (lo, hi]; the first holds 0 too):
    per bin the sample count, the accuracy and the mean confidence (NaN when empty)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct.astype(float), minlength=n_bins) / count
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
    return {"edges": edges, "count": count, "accuracy": accuracy, "confidence": mean_conf}


def expected_calibration_error(bins: dict[str, np.ndarray]) -> float:
    """ECE (Guo et al., 2017): sum over bins of |accuracy - confidence| weighted by the bin's share."""
    count = bins["count"]
    filled = count > 0
    if not filled.any():
        return 0.0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((gaps * count[filled]).sum() / count.sum())


def summary(split: str, p: Predictions, k: int, n_bins: int) -> dict[str, float]:
    """{"<split>/acc", "<split>/acc_top<k>", "<split>/loss", "<split>/ece", "<split>/samples"}."""
    n = len(p.targets)
    return {
        f"{split}/acc": float(p.correct.sum()) / max(n, 1),
        f"{split}/acc_top{k}": topk_accuracy(p.logits, p.targets, k),
        f"{split}/loss": float(p.losses.mean()) if p.losses is not None and n else float("nan"),
        f"{split}/ece": expected_calibration_error(calibration_bins(p.confidence, p.correct, n_bins)),
        f"{split}/samples": float(n),
    }


def confused_pairs(cm: np.ndarray, class_names: Sequence[str], limit: int = 10) -> list[dict]:
    """The off-diagonal cells of a confusion matrix, largest first: true, predicted, count, and the
    share of the true class's samples that went there."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:limit]
    pairs = []
    for flat in order:
        t, q = np.unravel_index(flat, cm.shape)
        if off[t, q] == 0:
            break
        pairs.append(
            {
                "true": class_names[t],
                "predicted": class_names[q],
                "count": int(off[t, q]),
                "share": float(off[t, q] / max(cm[t].sum(), 1)),
            }
        )
    return pairs
