"""hydra-submitit-launcher's SLURM launcher, made to end every job as a result, whatever the cluster did.

Its own launch waits with `job.results()` for each job in turn: a job cancelled, timed out, killed,
preempted or lost with its node has no result, submitit raises UncompletedJobError, and that reaches
the sweeper (exit 1, a traceback, no later batch, no leaderboard). Here each job's end is its own
JobReturn: the ones the scheduler ended become FAILED returns naming the state `sacct` gives (through
submitit's job.state, e.g. "CANCELLED by 0", "TIMEOUT"), and the job's run record says so: a record
left `running` (the job was killed before it could write its end) or a job that never started gets
status interrupted (cancelled, timed out, preempted) or failed (anything else) with that reason.

Ctrl-C of the sweep cancels its queued and running jobs (scancel: SIGTERM, so each run saves last.pt
and says interrupted, then SIGKILL after the cluster's KillWait), waits for them to end and
re-raises; `hydra.launcher.on_interrupt=keep` leaves them running instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf, open_dict

from imgcls.files import atomic_write
from imgcls.run_record import RUN_FILE, RunRecord, read_run
from imgcls.sweeps.summary import JOB_DIR

log = logging.getLogger(__name__)
ON_INTERRUPT = ("cancel", "keep")
# scheduler states where the job was stopped from outside (its run can be resumed from last.pt);
# every other end without a result (FAILED, OUT_OF_MEMORY, NODE_FAIL, BOOT_FAIL...) is a failure
STOPPED_STATES = ("CANCELLED", "TIMEOUT", "PREEMPTED", "DEADLINE")
# how long a Ctrl-C waits for cancelled jobs to end: the cluster's KillWait (SIGTERM to SIGKILL,
# 30 s by default) plus the time sacct takes to record the end
CANCEL_WAIT_S = 90.0


@dataclass
class ImgclsSlurmConf(SlurmQueueConf):
    """hydra/launcher/imgcls_slurm: submitit_slurm's options (every sbatch option it knows), run by
    imgcls's launcher, plus on_interrupt: what Ctrl-C of the sweep does to its SLURM jobs."""

    _target_: str = "hydra_plugins.imgcls_sweepers.slurm.SlurmLauncher"
    on_interrupt: str = "cancel"


# Hydra imports this module when it scans for plugins, before it composes the config
ConfigStore.instance().store(
    group="hydra/launcher", name="imgcls_slurm", node=ImgclsSlurmConf, provider="imgcls"
)


class SchedulerEnded(RuntimeError):
    """The job has no result: the scheduler ended it (job.state holds why)."""


def job_dir_of(sweep_dir: Path, num: int) -> Path | None:
    """The folder of job number `num` in the sweep (<num>_<label>), if the job made one."""
    for p in sorted(Path(sweep_dir).glob(f"{num}_*")):
        m = JOB_DIR.match(p.name)
        if m and int(m.group(1)) == num and p.is_dir():
            return p
    return None


def status_for_state(state: str) -> str:
    """The run status a scheduler state means: interrupted when it was stopped from outside."""
    return "interrupted" if state.split()[0].upper() in STOPPED_STATES else "failed"


def record_scheduler_end(job_dir: Path, overrides: Sequence[str], state: str, job_id: str) -> str:
    """Complete the record of a job the scheduler ended: a run left `running` / `reporting`, or none
    at all (it never started), gets the status the state means and the reason. A run that wrote its
    own end (interrupted on SIGTERM, failed with its traceback) keeps it; the reason is added to its
    notes. Returns the status the record holds."""
    reason = f"SLURM job {job_id} ended {state}"
    record = read_run(job_dir)
    if record is None:  # the job died before training wrote anything, or never started
        (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        saved = job_dir / ".hydra" / "overrides.yaml"
        if not saved.is_file():  # the leaderboard's row names the job's overrides
            atomic_write(saved, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        record = RunRecord(run_dir=str(job_dir))
    if record.status in ("running", "reporting", "unknown"):
        record.status = status_for_state(state)
        record.error = record.error or reason
    if reason not in record.notes:
        record.notes.append(reason)
    atomic_write(job_dir / RUN_FILE, record.to_json())
    return record.status


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra/launcher=slurm and slurm_cpu: submitit's SLURM launcher, each job's end its own result."""

    def __init__(self, on_interrupt: str = "cancel", **params: Any) -> None:
        if on_interrupt not in ON_INTERRUPT:
            from imgcls.errors import UserError

            raise UserError(
                f"hydra.launcher.on_interrupt={on_interrupt}: give cancel (Ctrl-C cancels the sweep's "
                "SLURM jobs, the default) or keep (they run on; resume the sweep with the same command "
                "and hydra.sweep.dir=...)"
            )
        self.on_interrupt = on_interrupt
        # the sweeper's hook: called with {job number: SLURM job id} once a batch is submitted
        self.on_submitted: Callable[[dict[int, str]], None] | None = None
        super().__init__(**params)

    def __getstate__(self) -> dict[str, Any]:
        # the launcher is pickled into each job; the sweeper's hook stays here
        return {**self.__dict__, "on_submitted": None}

    def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        """The base launch up to map_array (hydra-submitit-launcher 1.2): the submitted jobs."""
        import submitit  # lazy: submitit loads only when a SLURM sweep runs

        assert self.config is not None and len(job_overrides) > 0
        params = self.params
        specific_init_keys = {"max_num_timeout", "python"}
        init_params = {"folder": params["submitit_folder"]}
        init_params.update({f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys})
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        init_keys = specific_init_keys | {"submitit_folder"}
        executor.update_parameters(
            **{
                x if x in baseparams else f"{self._EXECUTOR}_{x}": y
                for x, y in params.items()
                if x not in init_keys
            }
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        return list(executor.map_array(self, *zip(*job_params, strict=True)))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        jobs = self.submit(job_overrides, initial_job_idx)
        ids = {initial_job_idx + i: str(job.job_id) for i, job in enumerate(jobs)}
        if self.on_submitted is not None:
            self.on_submitted(ids)
        try:
            for job in jobs:
                job.wait()
        except KeyboardInterrupt:
            self.interrupted(jobs, job_overrides, initial_job_idx)
            raise
        return [
            self.outcome(job, o, initial_job_idx + i)
            for i, (job, o) in enumerate(zip(jobs, job_overrides, strict=True))
        ]

    def interrupted(self, jobs: list[Any], job_overrides: Sequence[Sequence[str]], first: int) -> None:
        """Ctrl-C: cancel the batch's jobs (unless on_interrupt=keep) and wait for their runs to
        record the end, so the leaderboard written next shows them interrupted."""
        pending = [j for j in jobs if not j.done()]
        if self.on_interrupt == "keep":
            ids = " ".join(str(j.job_id) for j in pending)
            log.warning(f"Ctrl-C: SLURM jobs {ids} keep running (hydra.launcher.on_interrupt=keep)")
            return
        if not pending:
            return
        log.warning(f"Ctrl-C: cancelling SLURM jobs {' '.join(str(j.job_id) for j in pending)}")
        for job in pending:
            job.cancel(check=False)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline and not all(j.done(force_check=True) for j in pending):
            time.sleep(1)
        for i, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True)):
            if job in pending:
                self.outcome(job, overrides, first + i)

    def outcome(self, job: Any, overrides: Sequence[str], num: int) -> JobReturn:
        """The job's JobReturn: its own (completed, or failed with the exception Hydra caught), or a
        FAILED one naming the scheduler's state when the job has no result."""
        from submitit.core.utils import UncompletedJobError

        try:
            return job.results()[0]
        except UncompletedJobError:
            pass
        except Exception as exc:  # the job's own exception outside Hydra's run_job
            return self._failed(overrides, exc)
        state = str(job.state)
        job_dir = job_dir_of(Path(str(self.config.hydra.sweep.dir)), num) or self._planned_dir(overrides, num)
        status = record_scheduler_end(job_dir, overrides, state, str(job.job_id))
        return self._failed(
            overrides, SchedulerEnded(f"SLURM job {job.job_id} ended {state}; the run is {status}")
        )

    def _failed(self, overrides: Sequence[str], exc: BaseException) -> JobReturn:
        ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
        ret._return_value = exc
        return ret

    def _planned_dir(self, overrides: Sequence[str], num: int) -> Path:
        """The folder a job that never started would have had: Hydra's hydra.sweep.subdir for it."""
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        main = HydraConfig.initialized()
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
                cfg.hydra.job.id = f"job_id_for_{num}"
            HydraConfig.instance().set_config(cfg)
            return sweep_dir / str(cfg.hydra.sweep.subdir)
        except Exception as exc:  # the name is a nicety; the row matters
            log.warning(f"job {num}: its folder name could not be built ({exc}); using {num}_not_started")
            return sweep_dir / f"{num}_not_started"
        finally:
            if main:  # the sweep's own config again, as the sweeper had it
                HydraConfig.instance().set_config(self.config)
