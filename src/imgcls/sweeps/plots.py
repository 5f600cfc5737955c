"""The sweep's plot (seaborn): the objective against each swept parameter, a panel per parameter,
each job coloured by another swept parameter where there is one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # sweeps run headless; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from imgcls.evaluation.plots import save_figure  # noqa: E402
from imgcls.names import literal_text, shown  # noqa: E402
from imgcls.sweeps.crossval import OBJECTIVE  # noqa: E402

COLUMNS = 3  # panels in a row: a 3-key grid still reads on a laptop screen
FEW = 8  # a grid's few values: each one ticked, each one a colour of its own


def write_objective_plot(jobs: list[dict[str, Any]], keys: list[str], path: Path) -> bool:
    """objective_figure saved as `path` (PNG); False, and nothing written, when it has nothing to draw."""
    fig = objective_figure(jobs, keys)
    if fig is None:
        return False
    save_figure(fig, path)
    plt.close(fig)
    return True


@literal_text()  # override keys and values drawn as written: "a$b$" is text, not math
def objective_figure(jobs: list[dict[str, Any]], keys: list[str]):
    """One panel per swept key: the objective of every job that has one against the key's value
    (log x for a value spanning decades, a category per string), coloured by the next swept key.
    None when nothing was swept or no job has an objective."""
    scored = [j for j in jobs if j[OBJECTIVE] is not None]
    if not keys or not scored:
        return None
    columns = min(len(keys), COLUMNS)
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        fig.delaxes(ax)  # a panel per key, no empty frames
    for i, (ax, key) in enumerate(zip(axes.flat, keys, strict=False)):
        have = [j for j in scored if key in j["params"]]
        # the next key that varies here colours the jobs, so every key colours some panel
        varies = [k for k in keys[i + 1 :] + keys[:i] if len({j["params"].get(k) for j in have}) > 1]
        _panel(ax, have, key, varies[0] if varies else None)
    fig.suptitle(f"{len(scored)} of {len(jobs)} jobs with a validation accuracy")
    fig.tight_layout()
    return fig


def _panel(ax, jobs: list[dict[str, Any]], key: str, hue_key: str | None) -> None:
    raw = [shown(j["params"][key]) for j in jobs]
    y = [j[OBJECTIVE] for j in jobs]
    colour = _colour(jobs, hue_key)
    xs = _numbers(raw)
    if not jobs:  # the key was given only to jobs that have no objective (failed, killed)
        ax.text(0.5, 0.5, "no job with an objective has this override", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    elif xs is not None:
        sns.scatterplot(x=xs, y=y, ax=ax, **colour)
        if _spans_decades(xs):  # learning rates and the like: a log axis spreads them evenly
            ax.set_xscale("log")
            # plain numbers: the log axis labels in mathtext ($10^{-3}$), drawn here as written
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if len(set(xs)) <= FEW:  # a grid's few values: tick exactly those
            ax.set_xticks(sorted(set(xs)), [f"{v:g}" for v in sorted(set(xs))])
            ax.minorticks_off()
    else:
        sns.stripplot(x=raw, y=y, order=sorted(set(raw)), ax=ax, jitter=0.15, size=6, **colour)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set_xlabel(shown(key))  # after seaborn, which labels the axes with its own (empty) names
    ax.set_ylabel(OBJECTIVE)
    ax.grid(alpha=0.3)
    if ax.get_legend() is not None:  # beside the panel: inside, it hides the best jobs
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title=shown(hue_key), fontsize=8)


def _colour(jobs: list[dict[str, Any]], hue_key: str | None) -> dict[str, Any]:
    """seaborn's hue arguments for `hue_key`'s values: a colour per value for a few values or
    strings, a colour scale (log for values spanning decades) for many numbers; {} for no key."""
    if hue_key is None:
        return {}
    raw = [shown(j["params"].get(hue_key, "-")) for j in jobs]  # "-": a job without the override
    numbers = _numbers(raw)
    if numbers is not None and len(set(numbers)) > FEW:  # e.g. an Optuna search's sampled lr
        norm = LogNorm() if _spans_decades(numbers) else None
        return {"hue": numbers, "hue_norm": norm, "palette": "viridis"}
    order = sorted(set(raw), key=float) if numbers is not None else sorted(set(raw))
    return {"hue": raw, "hue_order": order, "palette": "deep" if len(order) <= 10 else "husl"}


def _numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _spans_decades(xs: list[float]) -> bool:
    return min(xs) > 0 and max(xs) / min(xs) >= 10
