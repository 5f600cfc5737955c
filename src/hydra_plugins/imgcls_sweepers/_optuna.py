"""The resumable Optuna sweep loop (imported only when an Optuna sweep runs: optuna is slow to load)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.imgcls_sweepers import report_failures
from imgcls.sweeps.summary import next_job_num, pid_alive

log = logging.getLogger(__name__)
# trials that never ran to an end: they do not count towards n_trials
NOT_COUNTED = ("killed", "interrupted", "over_budget")
# what hydra/sweeper/sampler may build: the two prefixes hydra-optuna-sweeper's own sweeper trusts
SAMPLER_TARGETS = ("optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*")


def build_sampler(node: Any) -> Any:
    """The sampler that hydra.sweeper.sampler configures. Hydra 1.4 instantiates a sweeper without
    building its nested nodes, so the sweeper builds its sampler, through an execution whitelist."""
    if OmegaConf.is_config(node) or isinstance(node, dict):
        return instantiate(node, _execution_whitelist_=SAMPLER_TARGETS)
    return node  # built already (a sampler object passed in by Python code)


def _counted(trial: Any) -> bool:
    return not any(trial.user_attrs.get(k) for k in NOT_COUNTED)


class ResumableImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        # fixed_overrides: deletions such as ~key, passed to every job as they are
        space, fixed, fixed_overrides = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments)
        )
        for name in fixed:
            space.pop(name, None)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite file lives here
        directions = self._get_directions()
        if len(directions) != 1:
            raise ValueError(
                f"hydra.sweeper.direction={directions}: imgcls.train returns one objective (the best "
                "validation accuracy), so give one direction, e.g. maximize"
            )
        check_storage(self.storage)  # a URL that cannot work is an error before any trial runs
        study = _open_study(self.study_name, self.storage, self.sampler, directions)
        if study.trials:
            # a fixed seed would replay the first run's proposals and rerun its first trials
            self.sampler.reseed_rng()
        killed = _fail_killed_trials(study)
        log.info(
            f"Study {study.study_name} in {self.storage}: {len(study.trials)} trials so far"
            + (f", {killed} left running by a killed sweep marked FAIL" if killed else "")
        )
        host, pid = socket.gethostname(), os.getpid()
        while True:
            # finished trials, and those other workers are running, take from the budget
            left = self.n_trials - sum(_counted(t) for t in study.get_trials(deepcopy=False))
            if left <= 0:
                break
            batch = _within_budget(study, [study.ask() for _ in range(min(self.n_jobs, left))], self.n_trials)
            if not batch:
                continue
            overrides = self._configure_trials(batch, space, fixed, fixed_overrides)
            first = next_job_num(sweep_dir)
            for i, trial in enumerate(batch):
                trial.set_user_attr("host", host)
                trial.set_user_attr("pid", pid)
                trial.set_user_attr("job_num", first + i)
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=first)
            except BaseException:  # Ctrl-C: the asked trials did not finish
                for trial in batch:
                    trial.set_user_attr("interrupted", True)
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
        if complete:
            best = study.best_trial
            log.info(f"Best parameters: {best.params}; best value: {best.value}")
            OmegaConf.save(
                OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                sweep_dir / "optimization_results.yaml",
            )


def _open_study(name: Any, storage: Any, sampler: Any, directions: list[str]) -> Any:
    """create_study(load_if_exists=True), retried: workers started together on a new database
    race to create its tables, and all but one get "table ... already exists" or, one step later,
    "UNIQUE constraint failed: alembic_version.version_num" (both seen with SQLite)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

    for attempt in range(5):
        try:
            return optuna.create_study(
                study_name=name, storage=storage, sampler=sampler, directions=directions, load_if_exists=True
            )
        except (OperationalError, IntegrityError) as exc:
            if attempt == 4:  # a server that refuses us, a file SQLite cannot open: not a race
                _exit_storage(storage, f"the database cannot be opened ({_first_line(exc.orig)})")
            log.warning(f"opening the study failed ({exc.orig}); retrying")
            time.sleep(1 + attempt)
        except SQLAlchemyError as exc:  # e.g. "file is not a database"
            reason = _first_line(getattr(exc, "orig", None) or exc)
            _exit_storage(storage, f"the database cannot be opened ({reason})")
        except RuntimeError as exc:
            if "optuna storage upgrade" not in str(exc):
                raise
            _exit_old_schema(storage, str(exc))
    raise AssertionError("unreachable")


# the package that installs each database driver module SQLAlchemy imports for a dialect
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "asyncpg": "asyncpg", "pg8000": "pg8000",
    "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "mariadb": "mariadb",
    "oracledb": "oracledb", "pyodbc": "pyodbc", "pymssql": "pymssql",
}  # fmt: skip


def check_storage(storage: Any) -> None:
    """`error:` naming hydra.sweeper.storage, exit 2, for a storage URL that cannot work: not a
    URL, a database kind SQLAlchemy does not know, a driver that is not installed, a SQLite file in
    a folder that does not exist or cannot be written. The folder is not created: a mistyped path
    would start a new, empty study there instead of resuming the one meant. null: in memory."""
    if storage is None or not isinstance(storage, str):
        return  # null (an in-memory study), or a storage object passed in by Python code
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(storage)
    except ArgumentError:
        _exit_storage(storage, "this is not a database URL; give dialect[+driver]://[user:password@]host/"
                      "database, e.g. sqlite:///optuna.db or postgresql://user@dbhost/optuna, or null for a "
                      "study in memory")  # fmt: skip
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        _exit_storage(storage, f"'{url.drivername}' is not a database SQLAlchemy knows; use "
                      "sqlite:///<file>.db, postgresql://..., mysql://... (or another SQLAlchemy dialect)")  # fmt: skip
    backend = url.get_backend_name()
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = (exc.name or "").split(".")[0] or str(exc)
        _exit_storage(storage, f"{backend}'s driver {module} (for {url.drivername}://) is not installed: pip "
                      f"install {DRIVER_PACKAGES.get(module, module)}, or name a driver you have in the URL "
                      f"({backend}+<driver>://...)")  # fmt: skip
    if backend == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).expanduser().absolute().parent
        if not folder.is_dir():
            _exit_storage(storage, f"the folder {folder} does not exist; create it (mkdir -p {folder}) or give "
                          "a path in an existing folder (four slashes for an absolute path: sqlite:////abs/x.db)")  # fmt: skip
        from imgcls.files import WriteError, check_writable

        try:
            check_writable(folder)  # SQLite writes a journal beside the database
        except WriteError as exc:
            _exit_storage(storage, str(exc))


def _first_line(exc: Any) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _exit_storage(storage: Any, reason: str) -> None:
    """`error: hydra.sweeper.storage=<url, password hidden>: <reason>` and exit 2."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        shown = make_url(str(storage)).render_as_string(hide_password=True)
    except ArgumentError:
        shown = str(storage)
    print(f"error: hydra.sweeper.storage={shown}: {reason}", file=sys.stderr)
    sys.exit(2)


def _exit_old_schema(storage: Any, reason: str) -> None:
    """`error: ...` and exit 2 for a study database an older Optuna wrote (imgcls sweeps before the
    move to Hydra 1.4 used optuna 2.10): Optuna 4/5 opens it once `optuna storage upgrade` ran."""
    from sqlalchemy.engine import make_url

    url = make_url(str(storage)).render_as_string(
        hide_password=True
    )  # a shared database's password stays out
    reason = reason.split(". Please")[0]  # "The runtime optuna version ... (set up by optuna 2.10.1)"
    print(
        f"error: hydra.sweeper.storage={url}: {reason}. Upgrade it once with `optuna storage upgrade "
        f"--storage {url}` (back the database up first), then run the same command again",
        file=sys.stderr,
    )
    sys.exit(2)


def _within_budget(study: Any, asked: list[Any], n_trials: int) -> list[Any]:
    """The asked trials that fit the budget; the rest are told FAIL with user attr over_budget.

    Workers sharing a study may ask at the same moment. Trial numbers are handed out by the
    storage, so every worker agrees that the first n_trials counted numbers are the budget.
    """
    numbers = sorted(t.number for t in study.get_trials(deepcopy=False) if _counted(t))
    keep = set(numbers[:n_trials])
    for trial in asked:
        if trial.number not in keep:
            trial.set_user_attr("over_budget", True)
            study.tell(trial, state=TrialState.FAIL)
    return [t for t in asked if t.number in keep]


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
