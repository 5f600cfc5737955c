"""k-fold cross-validation in a sweep: val/acc_best over the folds of each setting, in cv_summary.csv."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml

from imgcls.files import atomic_write
from imgcls.names import csv_text

OBJECTIVE = "val/acc_best"  # what train.run returns and the Optuna sweeper maximizes; a job's score

FOLD, FOLDS = "data.fold", "data.folds"


def _folds_of(job: dict[str, Any]) -> int | None:
    """The job's data.folds: its override, else its config.yaml (None when neither says)."""
    value = job["params"].get(FOLDS)
    if value is None:
        config = Path(job["run_dir"]) / "config.yaml"  # written before training starts
        try:
            value = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("folds")
        except (OSError, yaml.YAMLError, AttributeError):
            return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fold(job: dict[str, Any]) -> int | str:
    value = job["params"][FOLD]
    return int(value) if value.lstrip("-").isdigit() else value


def cv_groups(jobs: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One row per setting (the swept values other than data.fold, and data.folds) of the jobs
    that have a data.fold override; best mean first. None of them: [].

    Only completed folds count. A fold run more than once counts its last completed job; a fold
    with no completed job is named in `not_done` with its last job's status, and so is a fold of
    0..folds-1 that no job ran. The standard deviation is the sample one (ddof=1)."""
    others = [k for k in keys if k != FOLD]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in sorted((j for j in jobs if FOLD in j["params"]), key=lambda j: j["job"]):
        setting = (tuple(job["params"].get(k, "") for k in others), _folds_of(job))
        groups.setdefault(setting, []).append(job)
    rows = []
    for (values, folds), members in groups.items():
        by_fold: dict[int | str, list[dict[str, Any]]] = {}
        for job in members:
            by_fold.setdefault(_fold(job), []).append(job)
        counted, not_done, notes = {}, [], []
        for fold, tries in sorted(by_fold.items(), key=lambda kv: str(kv[0]).zfill(8)):
            done = [j for j in tries if j["status"] == "completed" and j[OBJECTIVE] is not None]
            if done:
                counted[fold] = done[-1]
                if len(tries) > 1:
                    notes.append(f"fold {fold} ran {len(tries)} times, job {done[-1]['job']} counted")
            else:
                not_done.append(f"fold {fold} {tries[-1]['status']} (job {tries[-1]['job']})")
        if folds is not None:
            not_done += [f"fold {f} not run" for f in range(folds) if f not in by_fold]
        scores = [counted[f][OBJECTIVE] for f in counted]
        if len(scores) == 1:
            notes.insert(0, "one fold: no standard deviation")
        elif not scores:
            notes.insert(0, "no fold completed")
        rows.append(
            {
                "setting": dict(zip(others, values, strict=True)),
                "folds": folds,
                "done": len(scores),
                "mean": statistics.fmean(scores) if scores else None,
                "std": statistics.stdev(scores) if len(scores) > 1 else None,
                "min": min(scores, default=None),
                "max": max(scores, default=None),
                "per_fold": {f: counted[f][OBJECTIVE] for f in counted},
                "jobs": [counted[f]["job"] for f in counted],
                "not_done": not_done,
                "note": "; ".join(notes),
            }
        )
    return sorted(rows, key=lambda r: (r["mean"] is None, -(r["mean"] or 0.0)))


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """cv_summary.csv: one line per setting, full precision for scripts; no cell a spreadsheet runs
    as a formula (names.csv_text)."""
    others = list(rows[0]["setting"]) if rows else []
    stats = [f"{OBJECTIVE}_{s}" for s in ("mean", "std", "min", "max")]
    head = [*others, "folds", "folds_done", *stats, "per_fold", "not_done", "note", "jobs"]
    cells = [
        [r["setting"][k] for k in others]
        + ["" if r["folds"] is None else r["folds"], r["done"]]
        + ["" if r[s] is None else repr(r[s]) for s in ("mean", "std", "min", "max")]
        + [" ".join(f"{f}={v!r}" for f, v in r["per_fold"].items()), "; ".join(r["not_done"])]
        + [r["note"], " ".join(map(str, r["jobs"]))]
        for r in rows
    ]
    atomic_write(path, csv_text(head, cells))  # a reader never sees half a table


def format_table(rows: list[dict[str, Any]]) -> str:
    """The cross-validation table printed after the leaderboard."""
    head = ["folds done", "mean", "std (ddof=1)", "min", "max", "setting", "not done"]
    lines = []
    for r in rows:
        cells = ["-" if r[s] is None else f"{r[s]:.4f}" for s in ("mean", "std", "min", "max")]
        if r["done"] == 1:
            cells[1] = "n/a (1 fold)"
        setting = " ".join(f"{k}={v}" for k, v in r["setting"].items()) or "every job"
        done = f"{r['done']}/{r['folds'] if r['folds'] is not None else '?'}"
        lines.append([done, *cells, setting, "; ".join(r["not_done"]) or "-"])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [head, *lines]]
    title = f"cross-validation: {OBJECTIVE} over the completed folds of each setting"
    return "\n".join([title, *text])
