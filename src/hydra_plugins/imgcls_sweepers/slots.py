"""Sweeps in slots: `n` jobs running at once, the next one started the moment any of them ends.

Hydra's launchers take a batch and return when all of it has ended, so one slow job idles every
other slot until the batch is done, and an Optuna sampler learns nothing from a result until its
whole batch is in (issue 25, item 6). imgcls's parallel and SLURM launchers can start one job and
say when it ended (`start`, `done`, `outcome`); with them, `run_in_slots` keeps every slot busy:
the grid starts its next point, and the Optuna sweep tells the study the result that freed a slot
before it asks for the next trial. A launcher that only takes batches (Hydra's basic launcher, or
any other) runs through the same loop, one batch of `n` jobs at a time, as Hydra runs it.

A job whose process or node died without a result still ends as a result (`record_end`): its run
record says interrupted or failed, with the reason, and the sweep goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from imgcls.files import atomic_write
from imgcls.run_record import RUN_FILE, RunRecord, read_run
from imgcls.sweeps.summary import JOB_DIR, next_job_num

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """A job the sweep started: its number (its folder is <num>_<label>), overrides, the launcher's
    handle on it (a future, a SLURM job), and the sweeper's own payload (an Optuna trial)."""

    num: int
    overrides: list[str]
    payload: Any = None
    handle: Any = None
    job_id: str | None = None  # the scheduler's id, where there is a scheduler


def job_dir_of(sweep_dir: Path, num: int) -> Path | None:
    """The folder of job number `num` in the sweep (<num>_<label>), if the job made one."""
    for p in sorted(Path(sweep_dir).glob(f"{num}_*")):
        m = JOB_DIR.match(p.name)
        if m and int(m.group(1)) == num and p.is_dir():
            return p
    return None


def record_end(job_dir: Path, overrides: Sequence[str], status: str, reason: str) -> str:
    """Complete the record of a job that ended without saying so: a run left `running` /
    `reporting`, or none at all (it never started), gets `status` and the reason. A run that wrote
    its own end (interrupted on SIGTERM, failed with its traceback) keeps it; the reason is added
    to its notes. Returns the status the record holds."""
    record = read_run(job_dir)
    if record is None:  # the job died before training wrote anything, or never started
        (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        saved = job_dir / ".hydra" / "overrides.yaml"
        if not saved.is_file():  # the leaderboard's row names the job's overrides
            atomic_write(saved, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        record = RunRecord(run_dir=str(job_dir))
    if record.status in ("running", "reporting", "unknown"):
        record.status = status
        record.error = record.error or reason
    if reason not in record.notes:
        record.notes.append(reason)
    atomic_write(job_dir / RUN_FILE, record.to_json())
    return record.status


def failed_return(overrides: Sequence[str], exc: BaseException) -> JobReturn:
    """A FAILED JobReturn carrying why (Hydra's own shape for a job that raised)."""
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret._return_value = exc
    return ret


class BatchSlots:
    """A launcher that only takes batches, driven through the slot loop: the jobs started since the
    last poll run as one batch (Hydra's launch), so `n` slots are one batch of `n` jobs."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher
        self.queued: list[Job] = []

    def start(self, job: Job) -> None:
        self.queued.append(job)

    def poll(self, running: list[Job]) -> list[tuple[Job, JobReturn]]:
        batch, self.queued = self.queued, []
        if not batch:
            return []
        returns = self.launcher.launch([j.overrides for j in batch], initial_job_idx=batch[0].num)
        return list(zip(batch, returns, strict=True))

    def stop(self, running: list[Job]) -> None:
        """Ctrl-C: the batch ran in this process (or its launcher handled the signal)."""


class LauncherSlots:
    """A launcher with start / done / outcome / stop (imgcls's parallel and SLURM launchers)."""

    def __init__(self, launcher: Any, poll_s: float = 0.5) -> None:
        self.launcher, self.poll_s = launcher, poll_s

    def start(self, job: Job) -> None:
        job.handle, job.job_id = self.launcher.start(job.overrides, job.num)

    def poll(self, running: list[Job]) -> list[tuple[Job, JobReturn]]:
        while True:
            ended = [j for j in running if self.launcher.done(j.handle)]
            if ended:
                return [(j, self.launcher.outcome(j.handle, j.overrides, j.num)) for j in ended]
            time.sleep(self.poll_s)

    def stop(self, running: list[Job]) -> None:
        self.launcher.stop(running)


def slots_for(launcher: Any) -> BatchSlots | LauncherSlots:
    if callable(getattr(launcher, "start", None)):
        return LauncherSlots(launcher)
    return BatchSlots(launcher)


def launcher_slots(launcher: Any) -> int | None:
    """How many jobs the launcher runs at once, where it says (parallel: n_jobs; SLURM:
    array_parallelism), else None."""
    n = getattr(launcher, "n_slots", None)
    return n() if callable(n) else None


def run_in_slots(
    launcher: Any,
    n_slots: int,
    sweep_dir: Path,
    next_job: Callable[[int], tuple[list[str], Any] | None],
    ended: Callable[[Job, JobReturn], None],
    started: Callable[[Job], None] = lambda job: None,
    interrupted: Callable[[list[Job]], None] = lambda jobs: None,
    first_num: int = 0,
) -> None:
    """Keep up to `n_slots` jobs running until `next_job` has nothing more and every job ended.

    next_job(num) -> (overrides, payload) for job number `num`, or None (nothing to start now);
    started(job) once the launcher took it (its scheduler id is known); ended(job, ret) once per
    job, as it ends, before the next one is asked for. Job numbers start at `first_num` or above
    every job folder in the sweep, whichever is higher. On Ctrl-C the launcher stops (or keeps) its
    jobs, interrupted(jobs still running) settles them, and the KeyboardInterrupt goes on up.
    """
    slots = slots_for(launcher)
    running: list[Job] = []
    last = first_num - 1
    try:
        while True:
            while len(running) < n_slots:
                # numbers above every folder in the sweep and every job started (SLURM jobs make
                # their folders later, on their node)
                num = max(next_job_num(sweep_dir), last + 1)
                nxt = next_job(num)
                if nxt is None:
                    break
                job = Job(num=num, overrides=list(nxt[0]), payload=nxt[1])
                slots.start(job)
                last = num
                running.append(job)
                started(job)
            if not running:
                return
            for job, ret in slots.poll(running):
                running.remove(job)
                ended(job, ret)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code != 130:
            raise
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            slots.stop(running)
            interrupted(running)
        raise
