"""The resumable Optuna sweep loop (imported only when an Optuna sweep runs: optuna is slow to load)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.imgcls_sweepers import report_failures
from imgcls.sweep import next_job_num, pid_alive

log = logging.getLogger(__name__)


class ResumableImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        if self.search_space_distributions:
            space = {**self.search_space_distributions, **space}
        for name in fixed:
            space.pop(name, None)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite file lives here
        directions = self._get_directions()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            directions=directions,
            load_if_exists=True,
        )
        killed = _fail_killed_trials(study)
        log.info(
            f"Study {study.study_name} in {self.storage}: {len(study.trials)} trials so far"
            + (f", {killed} left running by a killed sweep marked FAIL" if killed else "")
        )
        host, pid = socket.gethostname(), os.getpid()
        while True:
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state != TrialState.RUNNING and not t.user_attrs.get("killed") for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)  # other workers' trials
            left = self.n_trials - done - running
            if left <= 0:
                break
            batch = [study.ask() for _ in range(min(self.n_jobs, left))]
            overrides = self._configure_trials(batch, space, fixed)
            first = next_job_num(sweep_dir)
            for i, trial in enumerate(batch):
                trial.set_user_attr("host", host)
                trial.set_user_attr("pid", pid)
                trial.set_user_attr("job_num", first + i)
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=first)
            except BaseException:  # Ctrl-C: the asked trials did not finish
                for trial in batch:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            failed = report_failures(returns)
            for trial, ret in zip(batch, returns, strict=True):
                value = ret._return_value if ret.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)):
                    study.tell(trial, values=[float(value)])
                else:
                    if value is not None or ret.status == JobStatus.COMPLETED:
                        log.warning(f"trial {trial.number}: the job returned {value!r}, not a number")
                    study.tell(trial, state=TrialState.FAIL)
            if failed / len(returns) > self.max_failure_rate:
                log.error(
                    f"{failed} of {len(returns)} jobs failed (max_failure_rate={self.max_failure_rate})"
                )
                break

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete and len(directions) == 1:
            best = study.best_trial
            log.info(f"Best parameters: {best.params}; best value: {best.value}")
            OmegaConf.save(
                OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                sweep_dir / "optimization_results.yaml",
            )


def _fail_killed_trials(study: Any) -> int:
    """Mark FAIL (user attr killed) the RUNNING trials whose process on this host is gone."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid is not None and not pid_alive(int(pid)):
            study._storage.set_trial_user_attr(t._trial_id, "killed", True)
            study.tell(t.number, state=TrialState.FAIL)
            n += 1
    return n
