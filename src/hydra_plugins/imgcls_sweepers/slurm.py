"""hydra-submitit-launcher's SLURM launcher, made to end every job as a result, whatever the cluster did.

Its own launch waits with `job.results()` for each job in turn: a job cancelled, timed out, killed,
preempted or lost with its node has no result, submitit raises UncompletedJobError, and that reaches
the sweeper (exit 1, a traceback, no later batch, no leaderboard). Here each job's end is its own
JobReturn: the ones the scheduler ended become FAILED returns naming the state `sacct` gives (through
submitit's job.state, e.g. "CANCELLED by 0", "TIMEOUT"), and the job's run record says so: a record
left `running` (the job was killed before it could write its end) or a job that never started gets
status interrupted (cancelled, timed out, preempted) or failed (anything else) with that reason.

Each job is its own sbatch submission, made when a slot frees (slots.run_in_slots: at most
`array_parallelism` of the sweep's jobs queued or running at once), not one array per batch: an
Optuna trial is asked for only after the result that freed its slot is told.

Ctrl-C of the sweep cancels its queued and running jobs (scancel: SIGTERM, so each run saves last.pt
and says interrupted, then SIGKILL after the cluster's KillWait), waits for them to end and
re-raises; `hydra.launcher.on_interrupt=keep` leaves them running instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf, open_dict

from hydra_plugins.imgcls_sweepers.slots import Job, failed_return, job_dir_of, record_end

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


def status_for_state(state: str) -> str:
    """The run status a scheduler state means: interrupted when it was stopped from outside."""
    return "interrupted" if state.split()[0].upper() in STOPPED_STATES else "failed"


def record_scheduler_end(job_dir: Path, overrides: Sequence[str], state: str, job_id: str) -> str:
    """Complete the record of a job the scheduler ended (slots.record_end) with the status its
    state means and the reason: `SLURM job <id> ended <state>`."""
    return record_end(job_dir, overrides, status_for_state(state), f"SLURM job {job_id} ended {state}")


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra/launcher=slurm and slurm_cpu: submitit's SLURM launcher, each job submitted on its own
    as a slot frees (slots.run_in_slots) and each job's end its own result."""

    def __init__(self, on_interrupt: str = "cancel", **params: Any) -> None:
        if on_interrupt not in ON_INTERRUPT:
            from imgcls.errors import UserError

            raise UserError(
                f"hydra.launcher.on_interrupt={on_interrupt}: give cancel (Ctrl-C cancels the sweep's "
                "SLURM jobs, the default) or keep (they run on; resume the sweep with the same command "
                "and hydra.sweep.dir=...)"
            )
        self.on_interrupt = on_interrupt
        self._executor: Any = None
        self._forced = 0.0  # when sacct was last asked (done)
        super().__init__(**params)

    def __getstate__(self) -> dict[str, Any]:
        # the launcher is pickled into each job; the sweep's executor stays here
        return {**self.__dict__, "_executor": None}

    def n_slots(self) -> int:
        """Jobs of the sweep queued or running at once: hydra.launcher.array_parallelism."""
        return max(1, int(self.params.get("array_parallelism") or 1))

    def _submitter(self) -> Any:
        """submitit's executor with every sbatch option of hydra.launcher (as hydra-submitit-launcher
        1.2's launch builds it)."""
        if self._executor is not None:
            return self._executor
        import submitit  # lazy: submitit loads only when a SLURM sweep runs

        assert self.config is not None
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
        self._executor = executor
        return executor

    def start(self, overrides: Sequence[str], num: int) -> tuple[Any, str]:
        """Submit job `num` (sbatch): (the submitit job, its SLURM id)."""
        executor = self._submitter()
        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        job = executor.submit(
            self, list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()
        )
        return job, str(job.job_id)

    def done(self, job: Any) -> bool:
        """Ended: its result file is there, or sacct says so (asked at most every 5 s for all the
        sweep's jobs at once; submitit caches the answer)."""
        force = time.monotonic() - self._forced > 5
        if force:
            self._forced = time.monotonic()
        return job.done(force_check=force)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Hydra's batch API (a sweeper other than imgcls's): every job submitted, then waited for."""
        jobs = [Job(num=initial_job_idx + i, overrides=list(o)) for i, o in enumerate(job_overrides)]
        for job in jobs:
            job.handle, job.job_id = self.start(job.overrides, job.num)
        try:
            while not all(self.done(j.handle) for j in jobs):
                time.sleep(1)
        except KeyboardInterrupt:
            self.stop(jobs)
            raise
        return [self.outcome(j.handle, j.overrides, j.num) for j in jobs]

    def stop(self, running: list[Job]) -> None:
        """Ctrl-C: cancel the sweep's queued and running jobs (unless on_interrupt=keep) and wait
        for their runs to record the end, so the leaderboard written next shows them interrupted."""
        pending = [j for j in running if not j.handle.done()]
        if self.on_interrupt == "keep":
            ids = " ".join(str(j.job_id) for j in pending)
            log.warning(f"Ctrl-C: SLURM jobs {ids} keep running (hydra.launcher.on_interrupt=keep)")
            return
        if not pending:
            return
        log.warning(f"Ctrl-C: cancelling SLURM jobs {' '.join(str(j.job_id) for j in pending)}")
        for job in pending:
            job.handle.cancel(check=False)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline and not all(j.handle.done(force_check=True) for j in pending):
            time.sleep(1)
        for job in pending:
            self.outcome(job.handle, job.overrides, job.num)

    def outcome(self, job: Any, overrides: Sequence[str], num: int) -> JobReturn:
        """The job's JobReturn: its own (completed, or failed with the exception Hydra caught), or a
        FAILED one naming the scheduler's state when the job has no result."""
        from submitit.core.utils import UncompletedJobError

        try:
            return job.results()[0]
        except UncompletedJobError:
            pass
        except Exception as exc:  # the job's own exception outside Hydra's run_job
            return failed_return(overrides, exc)
        state = str(job.state)
        job_dir = job_dir_of(Path(str(self.config.hydra.sweep.dir)), num) or self._planned_dir(overrides, num)
        status = record_scheduler_end(job_dir, overrides, state, str(job.job_id))
        return failed_return(
            overrides, SchedulerEnded(f"SLURM job {job.job_id} ended {state}; the run is {status}")
        )

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
