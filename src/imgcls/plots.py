"""Evaluation figures: the reliability diagram and the grid of the most confidently wrong images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imgcls.data import load_image  # noqa: E402


def reliability_figure(bins: dict[str, np.ndarray], ece: float, title: str):
    """Accuracy per confidence bin against the diagonal of perfect calibration (the red part of a
    bar is the gap), and below it how many samples fell in each bin."""
    edges, count = bins["edges"], bins["count"]
    width = np.diff(edges)
    centers = edges[:-1] + width / 2
    filled = count > 0
    acc = np.where(filled, bins["accuracy"], 0.0)
    conf = np.where(filled, bins["confidence"], centers)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(centers, acc, width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    top.bar(
        centers[filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=width[filled],
        edgecolor="#c44e52",
        color="#c44e52",
        alpha=0.35,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE {ece:.4f} over {len(count)} bins")
    top.legend(loc="upper left")
    bottom.bar(centers, count, width=width, edgecolor="black", color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("samples")
    fig.tight_layout()
    return fig


def error_grid_figure(
    paths: Sequence[str],
    true: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
    title: str,
    columns: int = 5,
):
    """The images as read from disk (before any transform), each titled true / predicted (conf)."""
    n = len(paths)
    if n == 0:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}\nno misclassified samples", ha="center", va="center")
        return fig
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, t, p, c in zip(axes.flat, paths, true, predicted, confidence, strict=False):
        image = load_image(path)
        image.thumbnail((256, 256))
        ax.imshow(np.asarray(image), interpolation="nearest" if min(image.size) < 64 else "antialiased")
        name = path.replace("\\", "/").rsplit("/", 1)[-1]
        ax.set_title(f"true: {t}\npred: {p} ({c:.2f})\n{name[:28]}", fontsize=8, color="#c44e52")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # leave the title its own line
    return fig
