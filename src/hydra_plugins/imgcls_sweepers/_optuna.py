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

from hydra_plugins.imgcls_sweepers import report_end, stop_on_ctrl_c
from hydra_plugins.imgcls_sweepers.slots import job_dir_of, run_in_slots
from hydra_plugins.imgcls_sweepers.slurm import record_scheduler_end
from imgcls.run_record import read_run
from imgcls.sweeps.summary import job_status, pid_alive

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


def _failing(ended: int, failed: int, sweeper: Any) -> bool:
    """max_failure_rate: more than that fraction of the jobs this sweep ended failed, counted once
    n_jobs of them ended (a batch's worth, as hydra-optuna-sweeper counts per batch)."""
    return ended >= max(1, int(sweeper.n_jobs)) and failed / ended > sweeper.max_failure_rate


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
        study = _open_study(
            self.study_name, self.storage, self.sampler, directions, getattr(self, "pruner", None)
        )
        if study.trials:
            # a fixed seed would replay the first run's proposals and rerun its first trials
            self.sampler.reseed_rng()
        killed = _reconcile_running_trials(study, sweep_dir)
        log.info(
            f"Study {study.study_name} in {self.storage}: {len(study.trials)} trials so far"
            + (f", {killed} left running by a killed sweep told from their jobs" if killed else "")
        )
        host, pid = socket.gethostname(), os.getpid()
        ended_jobs, failed_jobs = [0], [0]

        def next_job(num: int) -> tuple[list[str], Any] | None:
            """A new trial for job `num`, if the budget has room: finished trials, and those
            running here or in other workers sharing the study, take from it."""
            while not (failed_jobs[0] and _failing(ended_jobs[0], failed_jobs[0], self)):
                if self.n_trials - sum(_counted(t) for t in study.get_trials(deepcopy=False)) <= 0:
                    return None
                asked = _within_budget(study, [study.ask()], self.n_trials)
                if not asked:
                    continue  # another worker took that place in the budget
                (trial,) = asked
                (overrides,) = self._configure_trials([trial], space, fixed, fixed_overrides)
                # the job finds its trial (imgcls.sweeps.pruning: it reports every epoch's score there)
                overrides = [*overrides, f"++hydra.job.env_set.IMGCLS_OPTUNA_TRIAL_ID={trial._trial_id}",
                             f"++hydra.job.env_set.IMGCLS_OPTUNA_STUDY={study.study_name}"]  # fmt: skip
                trial.set_user_attr("host", host)
                trial.set_user_attr("pid", pid)
                trial.set_user_attr("job_num", num)
                return overrides, trial
            return None

        def started(job: Any) -> None:
            if job.job_id:  # where the leaderboard and a rerun find the job on the cluster
                job.payload.set_user_attr("slurm_job_id", job.job_id)

        def ended(job: Any, ret: Any) -> None:
            """Tell the trial its own job's end, the moment it ends, before the next ask."""
            trial = job.payload
            ended_jobs[0] += 1
            failed_jobs[0] += report_end(ret)
            # the job's own record decides: a trial whose job completed is COMPLETE with its best
            if _tell_from_record(study, trial, _record_of(sweep_dir, job.num)):
                return
            value = ret._return_value if ret.status == JobStatus.COMPLETED else None
            if isinstance(value, (int, float)):
                study.tell(trial, values=[float(value)])
                return
            if value is not None or ret.status == JobStatus.COMPLETED:
                log.warning(f"trial {trial.number}: the job returned {value!r}, not a number")
            if value is None and ret.status != JobStatus.COMPLETED:
                trial.set_user_attr("reason", _first_line(ret._return_value))
            study.tell(trial, state=TrialState.FAIL)

        def interrupted(running: list[Any]) -> None:
            """Ctrl-C: each trial as its job ended (cancelled: interrupted), or left RUNNING for a
            rerun to adopt when its SLURM job runs on (on_interrupt=keep)."""
            for job in running:
                record = _record_of(sweep_dir, job.num)
                if _kept(self) and job.job_id and (record is None or job_status(record) not in ENDED):
                    continue
                if not _tell_from_record(study, job.payload, record):
                    job.payload.set_user_attr("interrupted", True)
                    study.tell(job.payload, state=TrialState.FAIL)

        with stop_on_ctrl_c(sweep_dir):
            run_in_slots(
                self.launcher, max(1, int(self.n_jobs)), sweep_dir, next_job, ended, started, interrupted
            )
        if failed_jobs[0] and _failing(ended_jobs[0], failed_jobs[0], self):
            log.error(
                f"{failed_jobs[0]} of {ended_jobs[0]} jobs failed (max_failure_rate={self.max_failure_rate}): "
                "no more trials were asked for"
            )

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            best = study.best_trial
            log.info(f"Best parameters: {best.params}; best value: {best.value}")
            OmegaConf.save(
                OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                sweep_dir / "optimization_results.yaml",
            )


def _open_study(name: Any, storage: Any, sampler: Any, directions: list[str], pruner: Any = None) -> Any:
    """create_study(load_if_exists=True), retried: workers started together on a new database
    race to create its tables, and all but one get "table ... already exists" or, one step later,
    "UNIQUE constraint failed: alembic_version.version_num" (both seen with SQLite)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

    for attempt in range(5):
        try:
            return optuna.create_study(
                study_name=name,
                storage=storage,
                sampler=sampler,
                directions=directions,
                load_if_exists=True,
                pruner=pruner,
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


def _record_of(sweep_dir: Path, num: Any) -> Any:
    """The run record of job number `num` of the sweep, or None (no folder yet, or no record)."""
    job_dir = job_dir_of(sweep_dir, int(num)) if num is not None else None
    return read_run(job_dir) if job_dir else None


def _kept(sweeper: Any) -> bool:
    return getattr(sweeper.launcher, "on_interrupt", "cancel") == "keep"


# the run statuses that end a trial, and how the study is told
ENDED = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL,
         "interrupted": TrialState.FAIL, "killed": TrialState.FAIL}  # fmt: skip


def _tell_from_record(study: Any, trial: Any, record: Any) -> bool:
    """Tell the trial what its job's run record says, if the record says the run ended: completed
    (its best score), pruned, failed or interrupted (FAIL, user attr reason; interrupted ones do
    not count towards n_trials). False when there is no ended record to go by."""
    status = job_status(record) if record is not None else None
    if status not in ENDED:
        return False
    number = trial.number if hasattr(trial, "number") else trial
    trial_id = trial._trial_id
    if status == "completed" and record.best is not None:
        study.tell(number, values=[float(record.best.score)])
        return True
    if status == "pruned":
        study.tell(number, state=TrialState.PRUNED)
        return True
    study._storage.set_trial_user_attr(trial_id, "reason", _first_line(record.error or status))
    if status in ("interrupted", "killed"):
        study._storage.set_trial_user_attr(trial_id, status, True)
    study.tell(number, state=TrialState.FAIL)
    return True


def _scheduler_state(job_id: str, sweep_dir: Path) -> str | None:
    """The SLURM state of a job (submitit, through sacct/squeue), or None when it cannot be read."""
    try:
        import submitit  # lazy: only a resumed SLURM sweep asks

        return str(submitit.SlurmJob(folder=sweep_dir / ".submitit" / "%j", job_id=job_id).state)
    except Exception as exc:  # noqa: BLE001 - no sacct here: judge by the record alone
        log.warning(f"SLURM job {job_id}: its state cannot be read ({exc})")
        return None


def _runs_here(record: Any, host: str) -> bool:
    """The record's run is still running in a live process on this host (not this one)."""
    return (
        record is not None and record.status in ("running", "reporting") and record.host == host
        and bool(record.pid) and record.pid != os.getpid() and pid_alive(int(record.pid))
    )  # fmt: skip


def _reconcile_running_trials(study: Any, sweep_dir: Path, poll_s: float = 5.0) -> int:
    """Settle the trials a killed sweep left RUNNING, each from its own job, never from the dead
    sweep's process: a job whose record ended tells its trial that end; a SLURM job still queued
    or running, or a parallel job whose process on this host still runs, is adopted (waited for,
    then told from its record); a job the scheduler ended
    without a record of it gets the scheduler's reason; a local job whose process is gone is FAIL
    `killed`. Returns how many trials were settled."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs, num = t.user_attrs, t.user_attrs.get("job_num")
        if attrs.get("host") == host and pid_alive(int(attrs.get("pid", -1))):
            continue  # a sweep of this host still runs it
        job_id = attrs.get("slurm_job_id")
        while job_id:
            state = _scheduler_state(job_id, sweep_dir)
            if state is None or state.split()[0] not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING",
                                                          "COMPLETING", "SUSPENDED", "UNKNOWN"):  # fmt: skip
                break
            log.info(f"trial {t.number}: SLURM job {job_id} is {state}; waiting for it (adopted)")
            time.sleep(poll_s)
        record = _record_of(sweep_dir, num)
        while _runs_here(record, host):  # a parallel job's own process outlived its sweep
            log.info(f"trial {t.number}: its job (pid {record.pid}) still runs; waiting for it (adopted)")
            time.sleep(poll_s)
            record = _record_of(sweep_dir, num)
        if _tell_from_record(study, t, record):
            n += 1
            continue
        if job_id and num is not None and state:  # ended without recording it: the scheduler says why
            job_dir = job_dir_of(sweep_dir, int(num))
            if job_dir is not None:
                record_scheduler_end(job_dir, [], state, job_id)
                if _tell_from_record(study, t, _record_of(sweep_dir, num)):
                    n += 1
                    continue
        if attrs.get("host") == host or job_id:  # never started, or its process on this host is gone
            study._storage.set_trial_user_attr(t._trial_id, "killed", True)
            study._storage.set_trial_user_attr(
                t._trial_id, "reason", "its sweep was killed before the job ended"
            )
            study.tell(t.number, state=TrialState.FAIL)
            n += 1
    return n
