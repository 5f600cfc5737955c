"""The sweep leaderboard: sweep_summary.csv, a ranked table, an objective plot and TensorBoard HParams;
with data.fold swept, the cross-validation table (crossval.py)."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from imgcls.files import atomic_write
from imgcls.names import csv_text, shown
from imgcls.pages import write_page
from imgcls.pages.sweep_page import write_sweep_page
from imgcls.run_record import RunRecord, read_run
from imgcls.sweeps import crossval
from imgcls.sweeps.crossval import OBJECTIVE

JOB_DIR = re.compile(r"^(\d+)_")  # <job.num>_<label>, set by hydra.sweep.subdir in train.yaml


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep: `<num>_<label>` folders that Hydra wrote overrides into."""
    if not sweep_dir.is_dir():
        return []
    found = [p for p in sweep_dir.iterdir() if JOB_DIR.match(p.name) and (p / ".hydra").is_dir()]
    return sorted(found, key=lambda p: (int(JOB_DIR.match(p.name).group(1)), p.name))


def next_job_num(sweep_dir: Path) -> int:
    """The first job number above every job directory already in sweep_dir (0 for a new sweep).

    A resumed sweep starts numbering here, so it never writes into a finished job's directory.
    """
    nums = [int(m.group(1)) for p in Path(sweep_dir).glob("*") if (m := JOB_DIR.match(p.name))]
    return max(nums, default=-1) + 1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# SLURM states of a job that has not ended (sacct's State column, first word)
SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                "SIGNALING", "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED")  # fmt: skip


def slurm_state(job_id: str) -> str | None:
    """The job's state as SLURM's accounting has it (`sacct -X`, e.g. RUNNING, CANCELLED by 0), or
    None where sacct is missing, fails or does not know the job (then nothing is judged from it)."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def job_status(record: RunRecord | None) -> str:
    """The status the job's record holds, except that `running` from a process that no longer
    exists is `killed` (`reporting`, `reports incomplete`); no record: `failed` (Hydra ran the
    job, and it died before training started).

    A job that ran under SLURM (the record names its slurm_job_id) is judged by the scheduler on
    any node: a `running` record whose SLURM job has ended (sacct) is killed. Otherwise only a
    process on this host can be checked; a job on another machine keeps `running`.
    """
    if record is None:
        return "failed"
    status = record.status
    if status not in ("running", "reporting"):
        return status
    if record.slurm_job_id:
        state = slurm_state(record.slurm_job_id)
        dead = state is not None and state.split()[0] not in SLURM_ACTIVE
    else:
        dead = bool(record.pid) and record.host == socket.gethostname() and not pid_alive(record.pid)
    if dead:
        # `reporting`: trained to the end, killed in the final reports (resume= writes them)
        return "killed" if status == "running" else "reports incomplete"
    return status


def read_job(job: Path) -> dict[str, Any]:
    """One job's row, from its record alone (run.json, or an old job's summary.txt and metrics.csv):
    overrides, status, epochs and the objective, the record's best (run_record.best_of)."""
    saved = job / ".hydra" / "overrides.yaml"  # missing only if the job died as Hydra set it up
    overrides = (yaml.safe_load(saved.read_text()) or []) if saved.is_file() else []
    record = read_run(job)
    best = record.best if record else None
    planned = record.epochs_planned if record and record.epochs_planned else "?"
    return {
        "job": int(JOB_DIR.match(job.name).group(1)),
        "status": job_status(record),
        OBJECTIVE: best.score if best else None,
        "best_epoch": best.epoch if best else None,
        "epochs": f"{record.epochs_done if record else 0}/{planned}",
        "params": dict(o.split("=", 1) for o in overrides if "=" in o),
        "overrides": " ".join(overrides),
        "override_list": overrides,
        "run_dir": str(job.resolve()),
    }


def rank(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best objective first; jobs without a value last, in job order. Ties keep job order."""
    ranked = sorted(jobs, key=lambda j: (j[OBJECTIVE] is None, -(j[OBJECTIVE] or 0.0), j["job"]))
    for i, job in enumerate(ranked, 1):
        job["rank"] = i
    return ranked


def swept_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were first given."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job["params"] if k not in keys]
    return [k for k in keys if len({j["params"].get(k) for j in jobs}) > 1]


def write_csv(jobs: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    """sweep_summary.csv: a row per job; override values that start like a formula (`=`, `+`, `@`,
    a `-` that is not a number) get a leading ' (names.csv_text), which the sweep page strips."""
    head = ["rank", "job", "status", OBJECTIVE, "best_epoch", "epochs", *keys, "overrides", "run_dir"]
    rows = [
        [j["rank"], j["job"], j["status"], "" if j[OBJECTIVE] is None else repr(j[OBJECTIVE])]
        + [j["best_epoch"] or "", j["epochs"]]  # the objective at full precision, for scripts
        + [j["params"].get(k, "") for k in keys]
        + [j["overrides"], j["run_dir"]]
        for j in jobs
    ]
    atomic_write(path, csv_text(head, rows))  # a reader never sees half a leaderboard


def format_table(jobs: list[dict[str, Any]], keys: list[str]) -> str:
    """The leaderboard as fixed-width text: it reads the same in a terminal, a log and a CI page.

    Only the swept overrides are shown per job; the ones every job shares are printed once above.
    """
    head = ["rank", "job", "status", "best val acc", "epochs", "overrides", "run dir"]
    rows = []
    for j in jobs:
        acc = "-" if j[OBJECTIVE] is None else f"{j[OBJECTIVE]:.4f} (ep {j['best_epoch']})"
        swept = shown(" ".join(f"{k}={j['params'][k]}" for k in keys if k in j["params"]))
        name = shown(Path(j["run_dir"]).name)
        rows.append([str(j["rank"]), str(j["job"]), j["status"], acc, j["epochs"], swept, name])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    common = [o for o in (jobs[0]["override_list"] if jobs else []) if o.split("=", 1)[0] not in keys]
    if common:
        lines.insert(0, f"every job: {shown(' '.join(common))}")
    return "\n".join(lines)


def _hparam_value(text: str) -> float | str:
    try:
        value = float(text)
    except ValueError:
        return shown(text)  # TensorBoard's strings are UTF-8
    return value if math.isfinite(value) else text


def write_hparams(jobs: list[dict[str, Any]], keys: list[str], out: Path) -> None:
    """<sweep>/hparams/<job>: one HParams session per job with a value, so TensorBoard pointed at
    the sweep directory lists every job's swept values beside its objective (HPARAMS tab).

    Every session declares the same keys (a missing one is ""): the dashboard builds its columns
    from the sessions it finds. Rewritten whole, so a resumed sweep never doubles an entry, and
    kept out of the job directories, which the sweep never touches once a job is done.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    shutil.rmtree(out, ignore_errors=True)
    for j in jobs:
        if j[OBJECTIVE] is None:
            continue
        hp = {k: _hparam_value(j["params"].get(k, "")) for k in keys} | {"status": j["status"]}
        with SummaryWriter(log_dir=str(out / Path(j["run_dir"]).name)) as w:
            for summary in hparams(hp, {OBJECTIVE: j[OBJECTIVE]}):
                w.file_writer.add_summary(summary)
            w.add_scalar(OBJECTIVE, j[OBJECTIVE], j["best_epoch"] or 0)


def summarize(sweep_dir: Path, stream=None) -> list[dict[str, Any]]:
    """Build the leaderboard from the job directories in sweep_dir; print it to stream.

    It reads only what each job wrote, so it covers failed and killed jobs and every attempt of a
    resumed sweep, and can be rerun at any time: `python -m imgcls.sweep <sweep_dir>`.
    """

    sweep_dir = Path(sweep_dir)
    stream = stream or sys.stdout
    jobs = rank([read_job(j) for j in job_dirs(sweep_dir)])
    if not jobs:  # a sweep refused before its first job (a misspelt key, a bad storage URL): no folder made
        print(f"\nsweep {sweep_dir}: no job ran; nothing written", file=stream)
        stream.flush()
        return jobs
    keys = swept_keys(jobs)
    write_csv(jobs, keys, sweep_dir / "sweep_summary.csv")
    folds = crossval.cv_groups(jobs, keys)  # [] unless jobs have a data.fold override
    if folds:
        crossval.write_csv(folds, sweep_dir / "cv_summary.csv")
    from imgcls.sweeps.plots import write_objective_plot  # lazy for start-up time: seaborn and matplotlib,
    # ~2 s of imports, and train --help imports this module (the SweepSummary callback)

    plotted = write_objective_plot(jobs, keys, sweep_dir / "sweep_objective.png")
    write_hparams(jobs, keys, sweep_dir / "hparams")
    page = write_page(write_sweep_page, sweep_dir)
    counts = {s: sum(j["status"] == s for j in jobs) for s in dict.fromkeys(j["status"] for j in jobs)}
    print(
        f"\nsweep {sweep_dir}: {len(jobs)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())})",
        file=stream,
    )
    print(format_table(jobs, keys), file=stream)
    if folds:
        print(f"\n{crossval.format_table(folds)}", file=stream)
    written = ["sweep_summary.csv"] + (["cv_summary.csv"] if folds else [])
    written += ["sweep_objective.png"] if plotted else []
    written += ["report.html"] if page else []
    print(f"wrote {', '.join(str(sweep_dir / w) for w in written)}; compare the jobs with "
          f"`tensorboard --logdir {sweep_dir}` (HPARAMS tab)", file=stream)  # fmt: skip
    stream.flush()
    return jobs


class SweepSummary(Callback):
    """Hydra callback (hydra.callbacks in train.yaml): the leaderboard when a sweep ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        summarize(Path(str(config.hydra.sweep.dir)))


def main(argv: list[str] | None = None) -> int:
    """`python -m imgcls.sweep <sweep_dir>`: rebuild the leaderboard, e.g. of a sweep still running."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(
            "usage: python -m imgcls.sweep <sweep_dir>   (e.g. multirun/2026-11-27/10-31-07)", file=sys.stderr
        )
        return 2
    sweep_dir = Path(argv[0])
    if not job_dirs(sweep_dir):
        print(f"error: {sweep_dir} holds no job directories (<num>_<overrides>/.hydra)", file=sys.stderr)
        return 2
    summarize(sweep_dir)
    return 0
