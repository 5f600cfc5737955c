"""Pruning across jobs: the pruner hydra.sweeper.pruner configures, and a job's reports to its trial.

Both sides of an Optuna sweep build the pruner here (build_pruner): the sweeper for its study, each
job for the copy of the study it opens through the storage. The storage (hydra.sweeper.storage: a
SQLite file or a shared database) is the only channel between them, so pruning works the same with
jobs on another host and with several workers sharing one study.

The sweeper sets, per job, hydra.job.env_set.IMGCLS_OPTUNA_TRIAL_ID=<trial._trial_id> and
IMGCLS_OPTUNA_STUDY=<study name>; the job (train.job -> trial_link) reads them with the storage
URL and the pruner from its own HydraConfig (hydra.sweeper.storage / .pruner). After every epoch
the job reports the record's best-so-far score (run_record.best_of) as trial.report(score, epoch)
and asks should_prune(); a pruned run raises RunPruned after last.pt is saved, its record says
`pruned` (with the epoch and the reason in its notes) and train.run raises optuna.TrialPruned,
which Hydra hands the sweeper as the job's return value (status FAILED): the sweeper tells the
trial PRUNED.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from imgcls.config.build import build_named
from imgcls.errors import ConfigError
from imgcls.run_record import best_of

TRIAL_ENV = "IMGCLS_OPTUNA_TRIAL_ID"  # the trial's storage id (trial._trial_id), set by the sweeper per job
STUDY_ENV = "IMGCLS_OPTUNA_STUDY"  # the study's name, set by the sweeper per job
# what hydra.sweeper.pruner may build, by exact name (trust by name, not by neighbourhood):
# Optuna's pruners that take plain values (PatientPruner and friends wrap another pruner: not here)
PRUNER_TARGETS = (
    "optuna.pruners.MedianPruner",
    "optuna.pruners.PercentilePruner",
    "optuna.pruners.SuccessiveHalvingPruner",  # ASHA: asynchronous successive halving
    "optuna.pruners.HyperbandPruner",
    "optuna.pruners.ThresholdPruner",
    "optuna.pruners.NopPruner",
)


class RunPruned(Exception):
    """The study's pruner stopped this run after `epoch` (last.pt holds that epoch: resume= continues)."""

    def __init__(self, reason: str, epoch: int):
        super().__init__(reason)
        self.epoch = epoch


def build_pruner(node: Any) -> Any:
    """The pruner of hydra.sweeper.pruner (`_target_: optuna.pruners.MedianPruner` + its arguments);
    None for null. A target outside PRUNER_TARGETS is a ConfigError naming the key."""
    if node is None:
        return None
    if not (OmegaConf.is_config(node) or isinstance(node, Mapping)):
        return node  # built already (a pruner object passed in by Python code)
    target = node.get("_target_")
    if target not in PRUNER_TARGETS:
        raise ConfigError(
            f"hydra.sweeper.pruner._target_={target}: not a pruner imgcls builds; use one of "
            f"{', '.join(PRUNER_TARGETS)} (e.g. hydra.sweeper.pruner._target_=optuna.pruners.MedianPruner), "
            "or hydra.sweeper.pruner=null for none"
        )
    return build_named(node, PRUNER_TARGETS)


@dataclass(frozen=True)
class TrialLink:
    """Where a sweep job reports: its trial in a study held by a storage, and the pruner to ask."""

    storage: str
    study: str
    trial_id: int
    pruner: Any  # the hydra.sweeper.pruner node as plain data, or None


def trial_link(env: Mapping[str, str], sweeper: Any) -> TrialLink | None:
    """The job's trial from the sweeper's environment variables and the job's hydra.sweeper node;
    None outside an Optuna sweep. A study in memory (storage null) cannot be reached from a job:
    said once, and the job trains unpruned."""
    trial_id = env.get(TRIAL_ENV)
    if not trial_id:
        return None
    # only the keys read here are resolved: others may interpolate keys of the job's config (${seed})
    storage, study, pruner = (_plain(sweeper, key) for key in ("storage", "study_name", "pruner"))
    if not isinstance(storage, str):
        from loguru import logger  # lazy for start-up time: train --help imports this module, not loguru

        logger.warning(
            f"{TRIAL_ENV} is set but hydra.sweeper.storage is {storage!r}: a study in memory cannot be "
            "reached from the job, which trains without reporting to its trial (give a storage URL)"
        )
        return None
    return TrialLink(storage, str(env.get(STUDY_ENV) or study), int(trial_id), pruner)


def _plain(node: Any, key: str) -> Any:
    if node is None:
        return None
    if OmegaConf.is_config(node):
        value = OmegaConf.select(node, key, default=None)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return node.get(key)


class TrialReporter:
    """After each epoch: report the best-so-far score to the trial and ask the pruner.

    The score is the record's best so far (run_record.best_of, the one definition of best), not the
    epoch's own score: a trial's last report then equals the value it is told at the end (the
    objective, train.run's return), and the pruners compare trials by what each would be worth if
    stopped now, so one noisy epoch at a rung does not prune a trial whose best is already good.
    """

    RETRIES = 5  # SQLite shared by several jobs answers "database is locked" while another writes

    def __init__(self, link: TrialLink, epochs: int, last: Path):
        """`last`: the run's last.pt, named in the reason as what resume= continues."""
        self.link, self.epochs, self.last = link, epochs, last
        self.trial: Any = None
        self.broken = False  # the study cannot be reached: the run trains on, unpruned

    def __call__(self, epoch: int, history: list[dict[str, float]]) -> str | None:
        """The reason to stop after `epoch`, or None."""
        best = best_of(history)
        if self.broken or best is None:
            return None
        try:
            trial = self.trial or self._open()
            self._retry(lambda: trial.report(best.score, epoch))
            pruned = epoch < self.epochs and self._retry(trial.should_prune)
        except Exception as exc:  # a study that cannot be reached must not fail the run
            from loguru import logger  # lazy for start-up time: train --help imports this module

            self.broken = True
            logger.warning(
                f"optuna: reporting epoch {epoch} to trial id {self.link.trial_id} of study {self.link.study} "
                f"failed ({type(exc).__name__}: {exc}); the run trains on without pruning"
            )
            return None
        if not pruned:
            return None
        pruner = type(trial.study.pruner).__name__
        return (
            f"pruned at epoch {epoch} of {self.epochs} by the study's {pruner} (trial {trial.number} of "
            f"study {self.link.study}): best val acc {best.score:.4f} so far at epoch {best.epoch}; "
            f"`python -m imgcls.train resume={self.last}` continues it"
        )

    def _open(self) -> Any:
        import optuna  # lazy for start-up time: ~1 s, and only a job of an Optuna sweep needs it

        pruner = build_pruner(self.link.pruner) or optuna.pruners.NopPruner()  # load_study's default prunes
        study = self._retry(
            lambda: optuna.load_study(study_name=self.link.study, storage=self.link.storage, pruner=pruner)
        )
        self.trial = optuna.trial.Trial(study, self.link.trial_id)
        return self.trial

    def _retry(self, call: Any) -> Any:
        from sqlalchemy.exc import OperationalError

        for attempt in range(self.RETRIES):
            try:
                return call()
            except OperationalError:
                if attempt == self.RETRIES - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


def trial_pruned(exc: RunPruned) -> BaseException:
    """What train.run raises for a pruned run: optuna.TrialPruned, the exception Optuna's own
    objectives raise, which reaches the sweeper as the job's return value."""
    import optuna  # lazy for start-up time (a pruned run has loaded it already)

    return optuna.TrialPruned(str(exc))
