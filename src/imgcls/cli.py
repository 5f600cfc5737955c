"""The config directory, and the one helper that turns every command's command line into its run."""

from __future__ import annotations

import atexit
import functools
import gc
import importlib.resources
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra._internal.utils import get_args_parser  # the parser hydra.main reads sys.argv with
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from imgcls.config.naming import register_resolvers
from imgcls.errors import ConfigError, UserError
from imgcls.files import FULL_OR_READ_ONLY, write_error


def _config_dir() -> str:
    """conf/ sits at the repository root and installs as the package imgcls.conf (pyproject.toml's
    package-dir): an editable install and a wheel find it by import; a checkout that is only on
    PYTHONPATH (src/, as the benchmarks run it) has it beside src/."""
    try:
        return str(importlib.resources.files("imgcls.conf"))
    except ModuleNotFoundError:
        return str(Path(__file__).resolve().parents[2] / "conf")


CONFIG_DIR = _config_dir()
# the project's resolvers (run naming, optimizer.lr's rule) before anything composes CONFIG_DIR's
# configs: a command, a test or a notebook's hydra.compose
register_resolvers()
# the hydra.callbacks that conf/train.yaml names, for Hydra's execution whitelist (Hydra 1.4 warns
# about, and 1.5 refuses, a config-named target that trusted code did not list)
CALLBACKS = (
    "imgcls.config.preflight.BeforeRun", "imgcls.sweeps.tracking.SweepParentRun", "imgcls.sweeps.summary.SweepSummary",
    "imgcls.sweeps.gpu_slots.OneGpuPerJob",
)  # fmt: skip


def split_argv(
    argv: Sequence[str], own_keys: set[str], path_keys: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Split the command line into Hydra's part (flags, hydra.*, the entry's own keys) and the
    overrides of the run's saved config (everything else, e.g. data.root=/other/tree).

    Hydra's own command-line parser says which arguments are overrides (what is left is its flags
    and their values); struct mode would refuse `data.root=...` on a primary config without a `data`
    node, so those overrides are applied to the saved config instead (config.overrides.apply_overrides), with
    the same grammar. Values of `path_keys` are quoted for Hydra: run directories are named like
    `10-31-07_batch_size=32,lr=0.01`, whose `=` and `,` Hydra's grammar would reject or read as a
    sweep.
    """
    # intermixed: `run_dir=... --cfg job data.root=...` is one command line, as split_argv always read it
    overrides = get_args_parser().parse_intermixed_args(argv).overrides
    hydra_args: list[str] = []
    run_overrides: list[str] = []
    for arg in argv:
        # a flag, a flag's value (`-cn evaluate`), or no override at all (Hydra says what is wrong)
        if arg not in overrides or ("=" not in arg and not arg.startswith("~")):
            hydra_args.append(arg)
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key in path_keys and value and value[0] not in "'\"":
            arg = f"{arg.partition('=')[0]}='{value.replace(chr(39), chr(92) + chr(39))}'"
        top = re.split(r"[./@\[]", key, maxsplit=1)[0]
        (hydra_args if top in own_keys or top == "hydra" else run_overrides).append(arg)
    return hydra_args, run_overrides


def primary_keys(config_file: Path) -> set[str]:
    """The top-level keys of an entry's primary config (its own keys; the rest go to the run)."""
    keys = set(yaml.safe_load(config_file.read_text()) or {})
    return keys - {"defaults"}


def run_command(
    config_name: str | None,
    task: Callable[..., Any],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    run_paths: Sequence[str] | None = None,
) -> Any:
    """Every command's main(): its command line (`argv`, by default sys.argv[1:]) becomes a config
    composed by Hydra from conf/<config_name>.yaml (with Hydra's --help, --cfg, -m, shell completion,
    --config-dir and hydra.searchpath), and task(cfg) runs as Hydra's job.

    `run_paths` marks a command over a finished run (evaluate, predict, export): the keys of its
    yaml stay its own, every other key=value is an override of the run's saved config, and the
    task gets task(plain cfg, overrides); `run_paths` are its keys that hold paths (quoted for
    Hydra's grammar). `config_name=None` is a command with no config (task(argv) returns the exit code).

    A UserError prints `error: <message>` and exits 2 (in a -m sweep it fails that job instead);
    Ctrl-C exits 130, and a training stopped by a signal 128 + its number."""
    _quick_exit()
    argv = list(sys.argv[1:] if argv is None else argv)
    if config_name is None:
        return _reported(lambda: task(argv))
    overrides = None
    if run_paths is not None:
        argv, overrides = split_argv(argv, primary_keys(Path(CONFIG_DIR) / f"{config_name}.yaml"), run_paths)
    result: list[Any] = []

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, execution_whitelist=CALLBACKS)
    @functools.wraps(task)  # Hydra names the job after the command's module, as it always has
    def job(cfg) -> Any:
        def call() -> Any:
            if overrides is None:
                return task(cfg)
            return task(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), overrides)

        try:
            result.append(_reported(call))
        finally:
            _stop_loader_workers()
        return result[-1]  # a sweep's objective (imgcls.train's best val accuracy)

    with _command_line(prog or sys.argv[0], argv):
        job()
    return result[-1] if result else None


def _quick_exit() -> None:
    """Freeze the garbage collector once every atexit handler has run: the interpreter's last
    collections then skip the objects torch and its compiler stack created at import, which every
    command pays for at exit (0.95 s of a 3.4 s `import torch, torchvision` process; 0.2 s frozen,
    2-core VM). Nothing is lost: every module is still torn down and every object freed as its
    references go; only cycles still alive at exit stay uncollected, and a command has closed what
    holds data (logs, TensorBoard, checkpoints, trackers) before it returns."""
    if not getattr(_quick_exit, "registered", False):
        atexit.register(gc.freeze)  # before the command registers its own handlers: runs after them
        _quick_exit.registered = True


@contextmanager
def _command_line(prog: str, argv: list[str]) -> Iterator[None]:
    """Hydra reads its command line from sys.argv: `argv` there while it runs, restored after."""
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _reported(run: Callable[[], Any]) -> Any:
    """run(), with the user's errors as `error: ...` + exit 2 and Ctrl-C as the shell expects."""
    try:
        try:
            return run()
        except MissingMandatoryValue as exc:
            raise ConfigError(
                f"{exc.full_key} is required: set it on the command line, {exc.full_key}=..."
            ) from None
    except KeyboardInterrupt:
        sys.exit(130)
    except (UserError, OmegaConfBaseException) as exc:
        if _in_sweep():
            raise  # the sweep records this job as failed and goes on
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in FULL_OR_READ_ONLY or _in_sweep():
            raise
        # a write outside imgcls.files and writing_into (a log, TensorBoard) on a full or read-only disk
        message = (
            write_error(exc.filename, exc, "or write elsewhere") if exc.filename
            else f"a write failed: {exc.strerror}; free space where the command writes, or write elsewhere"
        )  # fmt: skip
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        # lazy: loguru (which signals imports) is not on --help's path; only a failed command gets here
        from imgcls.training.signals import RunInterrupted

        if not isinstance(exc, RunInterrupted):
            raise
        # SystemExit passes through Hydra's job runner: a signal stops a whole sweep too
        print(f"interrupted: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _stop_loader_workers() -> None:
    """The job's DataLoader workers end with the job (a sweep runs the next job in this process)."""
    loaders = sys.modules.get("imgcls.data.loaders")  # commands that built no loader import no torch
    if loaders is not None:
        loaders.stop_workers()


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
