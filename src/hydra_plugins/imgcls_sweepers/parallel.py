"""hydra/launcher=parallel: several jobs at once on one machine, each in a process of its own.

Hydra's joblib launcher runs a batch with `joblib.Parallel` and returns when the whole batch has
ended, and its pool (loky) kills every other running job with SIGKILL when one worker dies. Here
each job is started on its own, as a slot frees (hydra_plugins.imgcls_sweepers.slots), in a fresh
spawned process (the standard library's ProcessPoolExecutor, one per job, with one worker):
jobs share no process state, and a job killed from outside (kill -9, the out-of-memory killer) ends
as its own failed row naming why while the others run on. Ctrl-C stops the running jobs: each gets
SIGINT, saves last.pt and says interrupted.

The job, its Hydra context and the task function go to the process pickled with cloudpickle, as
joblib's loky backend sends them: Hydra's task function is a closure the standard pickle cannot send.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.imgcls_sweepers.slots import Job, failed_return, job_dir_of, record_end, run_in_slots
from imgcls.run_record import read_run

log = logging.getLogger(__name__)
# how long Ctrl-C waits for the running jobs to save last.pt and record their end
STOP_WAIT_S = 120.0
# what each job's BLAS / OpenMP pools read, for inner_max_num_threads
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class ImgclsParallelConf:
    """hydra/launcher/imgcls_parallel."""

    _target_: str = "hydra_plugins.imgcls_sweepers.parallel.ParallelLauncher"
    n_jobs: int = 2  # jobs at once; -1: one per CPU core
    inner_max_num_threads: int | None = None  # OMP/MKL/OpenBLAS threads in each job; null: theirs


# Hydra imports this module when it scans for plugins, before it composes the config
ConfigStore.instance().store(
    group="hydra/launcher", name="imgcls_parallel", node=ImgclsParallelConf, provider="imgcls"
)


# set in a job's process while the job runs (_run_pickled); _watch_parent reads it
_job_running = threading.Event()


def _watch_parent(parent: int) -> None:
    """In the job's process, at its start: once the sweep's process is gone (kill -9), the job runs
    on to its end (a rerun of the sweep adopts it), then this process exits instead of waiting
    for work from a parent that no longer exists."""

    def watch() -> None:
        while True:
            time.sleep(1)
            if os.getppid() != parent and not _job_running.is_set():
                os._exit(0)

    threading.Thread(target=watch, name="imgcls-watch-sweep", daemon=True).start()


def _run_pickled(payload: bytes) -> bytes:
    """In the job's process: unpickle (Hydra's own execute_job, its arguments), run, pickle the
    JobReturn back (cloudpickle: it may hold the job's exception). A job that raised past Hydra's
    runner (SystemExit 130 from an interrupted run) comes back as a FAILED JobReturn naming it:
    Hydra 1.4's JobReturn pickling recurses through such an exception for minutes."""
    import cloudpickle  # lazy, as in start

    function, args = cloudpickle.loads(payload)
    _job_running.set()
    try:
        ret = function(*args)
    except BaseException as exc:  # noqa: BLE001 - the job's end, whatever it was, goes back as its result
        ret = failed_return(args[1], RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        _job_running.clear()
    return cloudpickle.dumps(ret)


class ParallelLauncher(Launcher):
    """n_jobs jobs at once on this machine, each in a fresh process, started as slots free."""

    def __init__(self, n_jobs: int = 2, inner_max_num_threads: int | None = None) -> None:
        self.n_jobs, self.inner_max_num_threads = n_jobs, inner_max_num_threads
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context
        setup_globals()
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)

    def n_slots(self) -> int:
        n = int(self.n_jobs)
        return os.cpu_count() or 1 if n == -1 else max(1, n)

    def _sweep_dir(self) -> Path:
        assert self.config is not None
        return Path(str(self.config.hydra.sweep.dir))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Hydra's batch API (a sweeper other than imgcls's): the batch's jobs through n_jobs slots."""
        todo, returns = [list(o) for o in job_overrides], {}
        run_in_slots(
            self, self.n_slots(), self._sweep_dir(),
            next_job=lambda num: (todo.pop(0), None) if todo else None,
            ended=lambda job, ret: returns.__setitem__(job.num, ret),
            first_num=initial_job_idx,
        )  # fmt: skip
        return [returns[n] for n in sorted(returns)]

    def start(self, overrides: Sequence[str], num: int) -> tuple[Any, None]:
        """Job `num` in a process of its own: (its future, no scheduler id)."""
        # lazy: Hydra imports this module at every start-up (its plugin scan); these load only here
        import cloudpickle
        from hydra_plugins.hydra_joblib_launcher._core import execute_job  # Hydra's job runner (joblib)

        self._sweep_dir().mkdir(parents=True, exist_ok=True)
        args = (
            num,
            list(overrides),
            self.hydra_context,
            self.config,
            self.task_function,
            0,
            Singleton.get_state(),
            False,
        )
        payload = cloudpickle.dumps((execute_job, args))
        env = (
            {name: str(self.inner_max_num_threads) for name in THREAD_VARS}
            if self.inner_max_num_threads
            else {}
        )
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)  # the spawned process inherits the environment at its start
        try:
            pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_watch_parent,
                initargs=(os.getpid(),),
            )
            future = pool.submit(_run_pickled, payload)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        future.pool = pool  # shut down once the job's result is read
        return future, None

    def done(self, future: Any) -> bool:
        return future.done()

    def outcome(self, future: Any, overrides: Sequence[str], num: int) -> JobReturn:
        """The job's JobReturn, or a FAILED one naming why its process died; the run's record then
        says failed (the dead process left it `running`)."""
        import cloudpickle  # lazy, as in start

        try:
            return cloudpickle.loads(future.result())
        except Exception as exc:  # noqa: BLE001 - BrokenProcessPool: the process died without a result
            reason = f"its process died before the job ended ({type(exc).__name__}: {exc})"
            job_dir = job_dir_of(self._sweep_dir(), num)
            if job_dir is not None:
                record_end(job_dir, overrides, "failed", reason)
            return failed_return(overrides, RuntimeError(reason))
        finally:
            future.pool.shutdown(wait=True)  # its one worker has ended its one task: it exits now

    def stop(self, running: list[Job]) -> None:
        """Ctrl-C: each running job gets SIGINT (a terminal's Ctrl-C sent it already; a second one is
        harmless) and is waited for while it saves last.pt and records `interrupted`."""
        for job in running:
            job_dir = job_dir_of(self._sweep_dir(), job.num)
            record = read_run(job_dir) if job_dir else None
            if record is not None and record.status == "running" and record.pid:
                try:
                    os.kill(record.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        if running:
            log.warning(f"Ctrl-C: stopping jobs {' '.join(str(j.num) for j in running)} (they save last.pt)")
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline and not all(j.handle.done() for j in running):
            time.sleep(0.5)
        for job in running:
            if job.handle.done():
                self.outcome(job.handle, job.overrides, job.num)
                continue
            # still running after STOP_WAIT_S: killed, so that the sweep can exit; its row says so
            log.warning(f"job {job.num} did not stop within {STOP_WAIT_S:.0f} s of SIGINT: killing it")
            for process in list((getattr(job.handle.pool, "_processes", None) or {}).values()):
                process.kill()  # the executor's one worker (ProcessPoolExecutor._processes)
            job_dir = job_dir_of(self._sweep_dir(), job.num)
            if job_dir is not None:
                record_end(job_dir, job.overrides, "interrupted", f"killed {STOP_WAIT_S:.0f} s after Ctrl-C")
            job.handle.pool.shutdown(wait=False, cancel_futures=True)
