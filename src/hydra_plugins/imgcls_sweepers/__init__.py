"""imgcls's Hydra sweepers: a grid that outlives failed jobs, and an Optuna search that resumes.

Hydra only instantiates sweepers found under the `hydra_plugins` namespace package, hence this
location. Both keep job numbers above those already in the sweep directory, so a sweep rerun or
resumed into the same directory never writes into a finished job's folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def pruned(ret: Any) -> bool:
    """The job stopped because the study's pruner said so (it raised optuna.TrialPruned): not a failure."""
    return type(getattr(ret, "_return_value", None)).__name__ == "TrialPruned"


def report_end(ret: Any) -> bool:
    """Log a job that did not complete, as it ends; True when it failed (a pruned job did not)."""
    if ret.status != JobStatus.FAILED:
        return False
    if pruned(ret):
        log.info(f"job pruned: {' '.join(ret.overrides)}: {ret._return_value}")
        return False
    # the job's summary.txt holds the traceback; one line here keeps the sweep's log readable
    log.warning(f"job failed, the sweep goes on: {' '.join(ret.overrides)}: {ret._return_value!r}")
    return True


@contextmanager
def stop_on_ctrl_c(sweep_dir: Path) -> Iterator[None]:
    """Ctrl-C of a sweep: exit 130 with how to resume. The slots stopped (SLURM: cancelled) the
    running jobs first, and a job run in this process (the basic launcher) turned its Ctrl-C into
    exit 130 already (imgcls.cli). Hydra 1.4 runs the callbacks' on_multirun_end on the way out
    (its `finally`), which writes the leaderboard of what ran."""
    try:
        yield
        return
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        if exc.code != 130:
            raise
    log.warning(f"Ctrl-C: the sweep stops; resume it with the same command and hydra.sweep.dir={sweep_dir}")
    raise SystemExit(130)


class GridSweeper(BasicSweeper):
    """Hydra's basic (grid) sweeper, except that a failed job is logged and the sweep goes on, and
    the launcher's slots stay busy: with imgcls's parallel and SLURM launchers the next grid point
    starts as soon as any job ends (hydra_plugins.imgcls_sweepers.slots).

    Hydra's own stops at the first batch with a failure and raises, which skips the callbacks'
    on_multirun_end and so the leaderboard. Failed jobs say why in their own summary.txt.
    """

    def sweep(self, arguments: list[str]) -> Any:
        from hydra_plugins.imgcls_sweepers.slots import launcher_slots, run_in_slots

        params = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        overrides = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(
            params
        )
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not (sweep_dir / "multirun.yaml").exists():  # a rerun or a job's resume keeps the sweep's own
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        for batch in self.overrides:
            self.validate_batch_is_legal(batch)  # a typo in an override fails before any job runs
        todo = [list(o) for batch in self.overrides for o in batch]
        # at once: the launcher's slots (parallel: n_jobs; SLURM: array_parallelism), at most
        # max_batch_size; a launcher that takes batches gets max_batch_size (null: all) per batch
        n_slots = min(
            [n for n in (launcher_slots(self.launcher), self.max_batch_size, len(todo)) if n] or [1]
        )
        returns: list[Any] = []
        failures: list[bool] = []  # each job's, logged as it ends
        with stop_on_ctrl_c(sweep_dir):
            run_in_slots(
                self.launcher, n_slots, sweep_dir,
                next_job=lambda num: (todo.pop(0), None) if todo else None,
                ended=lambda job, ret: (returns.append(ret), failures.append(report_end(ret))),
            )  # fmt: skip
        if failed := sum(failures):
            log.warning(f"{failed} of {len(returns)} jobs failed")
        return [returns]


class ResumableOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's OptunaSweeper, made to resume and to share a study.

    - `n_trials` is the number of finished trials the study should hold, not the number this
      process runs: rerun into the same storage and only the missing trials run.
    - Trials this host left RUNNING in a process that no longer exists (a killed sweep) are
      marked FAIL with user attr `killed`, and do not count towards n_trials.
    - Workers on several machines sharing one storage split the budget: each batch asks only for
      what is left after the finished trials and those other workers are running.
    - A failed trial is recorded FAIL and the sweep goes on; `max_failure_rate` stops asking for
      more trials (without raising) once a batch fails more than that fraction.
    """

    def __init__(
        self, sampler: Any, pruner: Any = None, **kwargs: Any
    ) -> None:  # hydra/sweeper/optuna's keys
        from hydra_plugins.imgcls_sweepers._optuna import ResumableImpl, build_sampler  # optuna loads here
        from imgcls.sweeps.pruning import build_pruner  # lazy with optuna: it builds Optuna's pruners

        self.sweeper = ResumableImpl(sampler=build_sampler(sampler), **kwargs)
        self.sweeper.pruner = build_pruner(pruner)


@dataclass
class ImgclsOptunaConf(OptunaSweeperConf):
    """hydra/sweeper/imgcls_optuna_schema: hydra-optuna-sweeper's options plus `pruner` (null: none;
    else `_target_: optuna.pruners.MedianPruner` and its arguments, imgcls.sweeps.pruning)."""

    _target_: str = "hydra_plugins.imgcls_sweepers.ResumableOptunaSweeper"
    pruner: Any = None


# Hydra imports this module when it scans for plugins, before it composes the config
ConfigStore.instance().store(
    group="hydra/sweeper", name="imgcls_optuna_schema", node=ImgclsOptunaConf, provider="imgcls"
)
