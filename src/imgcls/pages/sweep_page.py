"""report.html beside a sweep's sweep_summary.csv: the leaderboard linking to each job's page, the
objective plot, the cross-validation table when folds were swept, and the jobs that failed or were
killed with their reason."""

from __future__ import annotations

import os
from pathlib import Path

from imgcls.pages import html as h
from imgcls.pages.run_page import parse_summary

OBJECTIVE = "val/acc_best"
NOT_DONE = ("failed", "killed", "interrupted")


def write_sweep_page(sweep_dir: Path) -> Path | None:
    """Write sweep_dir/report.html from sweep_summary.csv (and cv_summary.csv, the objective plot
    and each job's summary.txt); None when there is no leaderboard yet."""
    jobs = h.read_csv(sweep_dir / "sweep_summary.csv")
    if not jobs:
        return None
    sections = [
        h.section("leaderboard", "Leaderboard", _leaderboard(jobs, sweep_dir)),
        h.section(
            "objective", "Objective", h.figures([(sweep_dir / "sweep_objective.png", f"{OBJECTIVE} per job")])
        ),
        h.section("cross-validation", "Cross-validation", _cv(sweep_dir / "cv_summary.csv")),
        h.section("problems", "Jobs that did not finish", _problems(jobs, sweep_dir)),
    ]
    done = sum(j.get("status") == "completed" for j in jobs)
    subtitle = f"{len(jobs)} jobs, {done} completed: {sweep_dir.resolve()}"
    return h.write(sweep_dir / "report.html", h.page(f"Sweep {sweep_dir.resolve().name}", subtitle, sections))


def _job_dir(job: dict[str, str], sweep_dir: Path) -> Path:
    return Path(job.get("run_dir") or sweep_dir / job.get("job", ""))


def _link(job: dict[str, str], sweep_dir: Path) -> str:
    """The job's number, linked to its report.html (relative, so the sweep folder can be moved)."""
    folder = _job_dir(job, sweep_dir)
    page = folder / "report.html"
    if not page.is_file():
        return h.esc(job.get("job", ""))
    href = os.path.relpath(page, sweep_dir.resolve())
    return f'<a href="{h.esc(Path(href).as_posix())}">{h.esc(job.get("job", ""))}</a>'


def _leaderboard(jobs: list[dict[str, str]], sweep_dir: Path) -> str:
    fixed = {"rank", "job", "status", OBJECTIVE, "best_epoch", "epochs", "overrides", "run_dir"}
    keys = [k for k in jobs[0] if k not in fixed]
    head = ["rank", "job", "status", OBJECTIVE, "best epoch", "epochs", *keys]
    rows = [
        [h.esc(j.get("rank", "")), _link(j, sweep_dir), f'<span class="status {h.esc(j.get("status", ""))}">{h.esc(j.get("status", ""))}</span>',
         h.esc(h.pct(j.get(OBJECTIVE)) if j.get(OBJECTIVE) else "-"), h.esc(j.get("best_epoch", "")), h.esc(j.get("epochs", "")),
         *(h.esc(j.get(k, "")) for k in keys)]
        for j in jobs
    ]  # fmt: skip
    return h.table(head, rows, numeric=(0, 3, 4), raw=True)


def _cv(path: Path) -> str:
    rows = h.read_csv(path)
    if not rows:
        return ""
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
    return "<p>The objective over the completed folds of each setting.</p>" + h.table(head, shown)


def _problems(jobs: list[dict[str, str]], sweep_dir: Path) -> str:
    rows = []
    for j in jobs:
        if j.get("status") not in NOT_DONE:
            continue
        folder = _job_dir(j, sweep_dir)
        fields, _, error, _ = parse_summary(h.read(folder / "summary.txt") or "")
        if not error:
            error = (
                "the process ended while the job was running (no error was recorded)"
                if j.get("status") == "killed"
                else "no summary.txt: the job failed before training started (see its logs/train.log)"
                if not (folder / "summary.txt").is_file()
                else j.get("status", "")
            )
        rows.append(
            [
                _link(j, sweep_dir),
                h.esc(j.get("status", "")),
                h.esc(j.get("overrides", "")),
                f"<pre>{h.esc(error)}</pre>",
            ]
        )
    return h.table(["job", "status", "overrides", "reason"], rows, raw=True) if rows else ""
