"""Shared fixtures: tiny ImageFolder trees of real image files, and the real CLI in a subprocess or in-process.

`cli` runs `python -m <module>` in a new process (~5 s of start-up); `cli_here` runs the same entry in
this process and returns the same result. Use `cli` where only a process shows the behaviour (its real
exit code and `error:` line, once per command; signals, torchrun, sweeps' workers); `cli_here` for the
rest. Tests marked `slow` are in the default run; `pytest -m "not slow"` is the quick loop."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# pytest-xdist runs the suite in parallel (`-n auto` in pyproject): one process per core, each with one
# torch thread, which its subprocesses inherit. Two threads per process on a shared core spin in OpenMP's
# barriers: a ResNet18 step at 32 px took 409 ms with 2 threads and 96 ms with 1 on the loaded 2-core VM.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most 4 (each holds torch and its models: about 1 GiB)."""
    return max(
        1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
# a 0.34M-parameter ShuffleNetV2 at 32 px on a few dozen images: a run takes seconds on 2 cores. The
# default ResNet18 (11M parameters) cost 40% more per tiny run, most of it 45 MB checkpoints; the
# tests that pin the default model (the default digits run, compile) keep it.
TINY_MODEL = "model.name=shufflenet_v2_x0_5"
TINY = [
    "data=imagefolder",
    "transforms=digits",
    TINY_MODEL,
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.epochs=2",
    "device=cpu",
]
COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}


def make_tree(root: Path, counts=None, size=(20, 16), fmt="JPEG", seed=0) -> Path:
    """<root>/<split>/<class>/<n>.jpg: noisy images whose dominant color is the class."""
    counts = counts or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
                pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
                ext = ".jpg" if fmt == "JPEG" else f".{fmt.lower()}"
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}{ext}", fmt)
    return root


@pytest.fixture(scope="session", autouse=True)
def scan_cache_dir(tmp_path_factory) -> Path:
    """The data check's cache goes to a temp folder, never the user's ~/.cache/imgcls."""
    folder = tmp_path_factory.mktemp("imgcls-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tiny")


def cli(module: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` in cwd, the way a user does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_here(
    module: str, *args: str, cwd: Path, timeout: float | None = None, signal_at: tuple[str, int] | None = None
) -> subprocess.CompletedProcess:
    """`cli` in this process: `python -m <module> args...` run by runpy as `__main__`, with the same
    result (exit code, stdout, stderr) and none of the ~5 s a new interpreter costs. The state a
    command leaves in a process is put back afterwards (see `_process_state`); `timeout` is ignored.
    Keep one subprocess test per command: only a real process pins what the interpreter does.

    `signal_at=(marker, signum)`: the process gets that real signal once its stderr shows `marker`
    (the command's own handler takes it, as when a user presses Ctrl-C or a scheduler sends SIGTERM)."""
    out, err = io.StringIO(), (_SignalAt(*signal_at) if signal_at else io.StringIO())
    with _process_state(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.environ.update(PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
        sys.argv = [module, *args]  # runpy sets argv[0] to the module's file, as `python -m` does
        code = 0
        try:
            with warnings.catch_warnings(), _loguru_to(sys.stderr):
                # warnings print to stderr as in a new interpreter, not into pytest's record
                warnings.filters[:] = PROCESS_WARNING_FILTERS
                warnings.showwarning = _show_warning
                # runpy warns that the entry is already imported (by an earlier test): rerun it anyway
                warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(
        [sys.executable, "-m", module, *args], code, out.getvalue(), err.getvalue()
    )


class _SignalAt(io.StringIO):
    """A captured stderr that raises `signum` in this process the first time `marker` is written."""

    def __init__(self, marker: str, signum: int):
        super().__init__()
        self.marker, self.signum, self.sent = marker, signum, False

    def write(self, text: str) -> int:
        written = super().write(text)
        if not self.sent and self.marker in text:
            self.sent = True
            signal.raise_signal(self.signum)
        return written


# the filters of a new interpreter (-W and PYTHONWARNINGS included), before pytest adds its own per test
PROCESS_WARNING_FILTERS = warnings.filters[:]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _loguru_to(stream):
    """loguru's default sink, on the captured stream: what a command logs before it sets up its own
    sinks reaches stderr as in a new process (loguru keeps the stream it was given, not sys.stderr)."""
    from loguru import logger

    logger.remove()
    logger.add(stream)
    yield


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): printed, exit 1
    return 1


def _fresh_hydra() -> None:
    """Hydra's state as a new process has it, and no run directory claimed yet."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    # no HydraConfig: with the last command's, `${hydra:...}` resolves early and the train config's
    # run_dir resolver claims a directory while Hydra only asks for the run mode
    HydraConfig.instance().cfg = None
    # imgcls.config.naming caches the directories this process claimed, by relative name
    naming = sys.modules.get("imgcls.config.naming")
    getattr(naming, "_claimed", {}).clear()


@contextlib.contextmanager
def _process_state(cwd: Path):
    """Put back what a command changes in its process: cwd, argv, environment, sys.path, signal
    handlers, RNGs, torch's threads and determinism flags, Hydra's global state, logging sinks, the
    run directories claimed."""
    import numpy
    import torch
    from loguru import logger

    from imgcls import log

    saved = {
        "cwd": os.getcwd(),
        "argv": sys.argv[:],
        "env": dict(os.environ),
        "path": sys.path[:],
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
        "rng": (random.getstate(), numpy.random.get_state(), torch.get_rng_state()),
        "threads": torch.get_num_threads(),
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "matmul": torch.get_float32_matmul_precision(),
        "root_logger": (logging.root.handlers[:], logging.root.level),
    }
    os.chdir(cwd)
    _fresh_hydra()
    # a new process starts from unseeded generators: a command that forgets to seed must not pass
    # because the test process happened to hold the same state for both runs
    random.seed()
    numpy.random.seed()
    torch.seed()
    try:
        yield
    finally:
        os.chdir(saved["cwd"])
        sys.argv[:] = saved["argv"]
        os.environ.clear()
        os.environ.update(saved["env"])
        sys.path[:] = saved["path"]
        for s, handler in saved["signals"].items():
            signal.signal(s, handler)
        random.setstate(saved["rng"][0])
        numpy.random.set_state(saved["rng"][1])
        torch.set_rng_state(saved["rng"][2])
        torch.set_num_threads(saved["threads"])
        torch.use_deterministic_algorithms(saved["deterministic"][0], warn_only=saved["deterministic"][1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved["cudnn"]
        torch.set_float32_matmul_precision(saved["matmul"])
        _fresh_hydra()
        handlers, level = saved["root_logger"]
        for handler in logging.root.handlers[:]:  # Hydra's job log file and console
            if handler not in handlers:
                logging.root.removeHandler(handler)
                handler.close()
        logging.root.setLevel(level)
        # loguru: the sinks the command added wrote to its files and to the captured stderr
        logger.remove()
        getattr(log, "_sinks", set()).clear()
        logger.add(sys.__stderr__, level="INFO", format=log.CONSOLE_FORMAT)


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished training run, shared by the tests that only read what it wrote."""
    cwd = tmp_path_factory.mktemp("trained")
    tree = make_tree(cwd / "tiny")
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", "optimizer.lr=0.01", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(cwd)
    return run


@pytest.fixture(scope="session")
def slurm_session():
    """The real one-node SLURM cluster (tools/slurm_cluster.sh), or a skip saying why: see tests/slurm.py."""
    from slurm import slurm_cluster_session

    yield from slurm_cluster_session()


@pytest.fixture
def slurm_cluster(slurm_session):
    """The cluster, for this test alone (slurm.one_test_at_a_time)."""
    from slurm import one_test_at_a_time

    with one_test_at_a_time(slurm_session) as cluster:
        yield cluster
