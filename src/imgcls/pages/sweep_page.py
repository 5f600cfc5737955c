"""report.html beside a sweep's sweep_summary.csv: the leaderboard linking to each job's page, the
objective plot, the cross-validation table when folds were swept, and the jobs that failed or were
killed with their reason."""

from __future__ import annotations

import os
from pathlib import Path

from imgcls.pages import html as h
from imgcls.run_record import pruned_reason, read_run

OBJECTIVE = "val/acc_best"
NOT_DONE = ("failed", "killed", "interrupted", "pruned")  # listed below the leaderboard, with why


def write_sweep_page(sweep_dir: Path) -> Path | None:
    """Write sweep_dir/report.html from sweep_summary.csv (and cv_summary.csv, the objective plot
    and each failed job's record); None when there is no leaderboard yet."""
    jobs = h.read_csv(sweep_dir / "sweep_summary.csv")
    if not jobs:
        return None
    done = sum(j.get("status") == "completed" for j in jobs)
    pruned = sum(j.get("status") == "pruned" for j in jobs)
    page = h.render(
        "sweep.html.j2",
        title=f"Sweep {sweep_dir.resolve().name}",
        subtitle=f"{len(jobs)} jobs, {done} completed{f', {pruned} pruned' if pruned else ''}: {sweep_dir.resolve()}",
        leaderboard=_leaderboard(jobs, sweep_dir),
        objective=h.figures([(sweep_dir / "sweep_objective.png", f"{OBJECTIVE} per job")]),
        cv=_cv(sweep_dir / "cv_summary.csv"),
        problems=_problems(jobs, sweep_dir),
    )
    return h.write(sweep_dir / "report.html", page)


def _job_dir(job: dict[str, str], sweep_dir: Path) -> Path:
    return Path(job.get("run_dir") or sweep_dir / job.get("job", ""))


def _link(job: dict[str, str], sweep_dir: Path) -> dict[str, str] | str:
    """The job's number, linked to its report.html (relative, so the sweep folder can be moved)."""
    page = _job_dir(job, sweep_dir) / "report.html"
    if not page.is_file():
        return job.get("job", "")
    href = os.path.relpath(page, sweep_dir.resolve())
    return {"href": Path(href).as_posix(), "text": job.get("job", "")}


def _leaderboard(jobs: list[dict[str, str]], sweep_dir: Path) -> dict:
    fixed = {"rank", "job", "status", OBJECTIVE, "best_epoch", "epochs", "overrides", "run_dir"}
    keys = [k for k in jobs[0] if k not in fixed]
    rows = [
        [j.get("rank", ""), _link(j, sweep_dir), {"status": j.get("status", "")},
         h.pct(j.get(OBJECTIVE)) if j.get(OBJECTIVE) else "-", j.get("best_epoch", ""), j.get("epochs", ""),
         *(j.get(k, "") for k in keys)]
        for j in jobs
    ]  # fmt: skip
    return {"head": ["rank", "job", "status", OBJECTIVE, "best epoch", "epochs", *keys], "rows": rows}


def _cv(path: Path) -> dict | None:
    rows = h.read_csv(path)
    if not rows:
        return None
    head = list(rows[0])
    shown = [
        [
            h.pct(r[c])
            if c.startswith(OBJECTIVE) and not c.endswith("_std") and h.number(r[c]) is not None
            else r[c]
            for c in head
        ]
        for r in rows
    ]
    return {"head": head, "rows": shown}


def _problems(jobs: list[dict[str, str]], sweep_dir: Path) -> list[list]:
    rows = []
    for j in jobs:
        if j.get("status") not in NOT_DONE:
            continue
        folder = _job_dir(j, sweep_dir)
        record = read_run(folder)
        error = (
            pruned_reason(record)  # the pruner's reason, with the epoch and how to resume it
            if record and record.status == "pruned"
            else record.error
            if record and record.error
            else "the process ended while the job was running (no error was recorded)"
            if j.get("status") == "killed"
            else "no run record: the job failed before training started (see its logs/train.log)"
            if record is None
            else j.get("status", "")
        )
        rows.append([_link(j, sweep_dir), j.get("status", ""), j.get("overrides", ""), {"pre": error}])
    return rows
