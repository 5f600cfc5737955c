"""Training curves: train and val loss, accuracy (and EMA accuracy) and the learning rate per epoch,
with the best epoch marked, in one PNG rewritten atomically after every epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from imgcls.files import atomic_file
from imgcls.names import literal_text
from imgcls.pages.html import number
from imgcls.run_record import Best, best_of

PANELS = (  # (title, y label, [(metric key, label)])
    ("loss", "loss", [("train/loss", "train"), ("val/loss", "val")]),
    (
        "accuracy",
        "accuracy",
        [("train/acc", "train"), ("val/acc", "val"), ("val/acc_ema", "val (EMA weights)")],
    ),
    ("learning rate", "lr", [("lr", "lr")]),
)


def best_epoch(history: Sequence[Mapping[str, float]]) -> int | None:
    """The epoch the run's record calls best (run_record.best_of: the first with the highest
    selection score, val/acc or the EMA's when it is better), as best.pt and the summary."""
    best = best_of(history)
    return best.epoch if best else None


@literal_text()  # every figure of the project draws its text as written (names.literal_text)
def write_curves(history: Sequence[Mapping[str, float]], path: Path, best: Best | None = None) -> bool:
    """plots/curves.png for the epochs in `history` (metrics.csv's rows), the record's `best` epoch
    marked (best_of(history), the same, when not given); False when there is no epoch.

    The PNG's Description names the epochs it shows and the best one, so a reader (or a test) can
    tell which history a file was drawn from without comparing pixels."""
    rows = [r for r in history if r.get("epoch") is not None]
    if not rows:
        return False
    # imported here: every command loads this module through the sweep callback (0.35 s of start-up)
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    top = best or best_of(rows)
    best = top.epoch if top else None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for ax, (title, ylabel, series) in zip(axes, PANELS, strict=True):
        for key, label in series:
            points = [(int(r["epoch"]), float(r[key])) for r in rows if number(r.get(key)) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
        if best is not None:
            ax.axvline(best, color="0.5", linestyle="--", linewidth=1, label=f"best epoch ({best})")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if title == "learning rate" and _spans_decades(rows):
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend(fontsize=8)
    ema = " (EMA weights)" if top and top.metric == "val/acc_ema" else ""
    acc = f"; best val acc {100 * top.score:.2f}% at epoch {best}{ema}" if top else ""
    fig.suptitle(f"training curves, epochs {epochs[0]}-{epochs[-1]}{acc}")
    description = f"epochs {','.join(map(str, epochs))}; best epoch {best if best is not None else '-'}"
    try:
        with atomic_file(path, durable=False) as f:  # a watcher never sees half a file
            fig.savefig(f, format="png", dpi=100, metadata={"Description": description})
    finally:
        plt.close(fig)
    return True


def described_epochs(path: Path) -> list[int]:
    """The epochs a curves.png shows, read back from its Description."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get("Description", "")
    listed = text.partition("epochs ")[2].partition(";")[0]
    return [int(e) for e in listed.split(",") if e]


def _spans_decades(rows: Sequence[Mapping[str, float]]) -> bool:
    lrs = [float(r["lr"]) for r in rows if number(r.get("lr")) is not None and float(r["lr"]) > 0]
    return len(lrs) > 1 and max(lrs) / min(lrs) >= 100
