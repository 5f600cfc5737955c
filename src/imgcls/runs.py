"""A finished run read back without trusting it: folder, checkpoint, saved config + overrides."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

from imgcls.config.naming import run_label
from imgcls.config.overrides import apply_overrides
from imgcls.config.renamed import current_names
from imgcls.config.saved import read_saved, resolved, warn_ignored
from imgcls.config.targets import check_targets
from imgcls.errors import ConfigError, UserError
from imgcls.files import write_error

# where or how fast an evaluation goes, not what it measures: left out of its folder's name
# (the same keys train.yaml leaves out of run directory names)
UNNAMED_KEYS = ("device", "data.num_workers", "trainer.num_threads", "trainer.log_every_n_steps")
# the way out of a run folder that cannot be written (read-only, full): evaluate, predict and export
# write their results elsewhere
OUT_DIR_HINT = "pass out_dir=<a writable folder>"


class RunError(UserError):
    """A run directory, checkpoint or split that is not there; the message lists what is."""


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(
        p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith(".")
    )
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) if names else "nothing"


def _runs_below(folder: Path, limit: int = 8, depth: int = 3, budget: int = 2000) -> list[str]:
    """Training runs (folders holding weights/) up to `depth` levels below `folder`
    (outputs/<date>/<run>, multirun/<date>/<time>/<job>); at most `budget` folders are looked at,
    so a mistyped path near / stays quick."""
    runs, level = [], [folder]
    for _ in range(depth):
        below = []
        for d in level:
            try:
                entries = sorted(
                    (e for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")),
                    key=lambda e: e.name,
                )
            except OSError:
                continue
            for e in entries:
                if budget <= 0:
                    return sorted(runs)[-limit:]
                budget -= 1
                if os.path.isdir(os.path.join(e.path, "weights")):
                    runs.append(e.path)
                else:
                    below.append(Path(e.path))
        level = below
    return sorted(runs)[-limit:]


def find_run(run_dir: str | Path) -> Path:
    """The run's folder, or a RunError naming what exists instead."""
    path = Path(run_dir).expanduser()
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "weights").is_dir()):
        return path
    if path.is_dir():
        runs = _runs_below(path)
        hint = f" Runs below it: {', '.join(runs)}." if runs else f" It holds: {_listing(path)}."
        raise RunError(f"run_dir={run_dir}: not a training run (no config.yaml or weights/).{hint}")
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    runs = _runs_below(parent) if parent.is_dir() else []
    hint = f"runs below {parent}: {', '.join(runs)}" if runs else f"{parent} holds: {_listing(parent)}"
    raise RunError(f"run_dir={run_dir} does not exist; {hint}.")


def find_checkpoint(run: Path, spec: str) -> Path:
    """best | last | a .pt file: a path (absolute, or relative to the working directory or the run),
    or a file name in <run>/weights/."""
    spec = str(spec)
    weights = run / "weights"
    if spec in ("best", "last"):
        candidates = [weights / f"{spec}.pt"]
    else:
        p = Path(spec).expanduser()
        candidates = [p, run / p, weights / p, weights / f"{spec}.pt"]
    for path in candidates:
        if path.is_file():
            return path
    found = sorted(p.name for p in weights.glob("*.pt")) if weights.is_dir() else []
    held = f"{weights} holds {', '.join(found)}" if found else f"{weights} holds no .pt files"
    raise RunError(
        f"checkpoint={spec}: {candidates[-1]} does not exist; {held}. "
        "Use checkpoint=best, checkpoint=last or a path to a .pt file."
    )


def _checked(config: Any, source: str) -> dict:
    """The config with today's names of renamed project targets, every `_target_` checked."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: not a config (a mapping of keys), got {type(config).__name__}")
    config = current_names(config)
    try:
        check_targets(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def read_run_config(raw: Any, source: str) -> tuple[dict, dict]:
    """A saved config as evaluate, predict and export take it: no resolver in it runs, the keys a
    saved run may not decide are this command's (imgcls.config.saved), its own-key references are
    resolved and every `_target_` is checked. Returns (config, the saved values ignored)."""
    config, ignored = read_saved(raw, source)
    ignored.pop("tracking", None)  # evaluate, predict and export track nothing: not worth a warning
    return _checked(resolved(config, source), source), ignored


def load_run(run: Path, checkpoint: Path, overrides: Sequence[str]) -> tuple[dict, dict]:
    """(config, checkpoint state): the run's config.yaml with the overrides on top, and the
    checkpoint loaded weights_only, overrides applied by
    imgcls.config.overrides.apply_overrides. Both configs are read by read_run_config (every `_target_`
    checked against the registry, imgcls.config.targets, no resolver run), and so is the result,
    before anything is built."""
    # lazy: torch; this module is on the ONNX predictor's path, which runs without torch
    from imgcls.checkpoint import CheckpointError, load_checkpoint

    saved = run / "config.yaml"
    base = None
    if saved.is_file():
        try:
            raw = yaml.safe_load(saved.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{saved} is not valid YAML: {exc}") from None
        base, ignored = read_run_config(raw, str(saved))
        source = str(saved)
    state = load_checkpoint(checkpoint)
    if "config" in state:
        state["config"], from_checkpoint = read_run_config(state["config"], f"{checkpoint} (its config)")
    for key in ("class_names", "config"):
        if key not in state and not (key == "config" and base is not None):
            raise CheckpointError(
                f"checkpoint {checkpoint} has no {key!r} entry: not an imgcls training checkpoint"
            )
    if base is None:
        logger.warning(f"{saved} is missing: using the config stored in {checkpoint}")
        base, ignored, source = state["config"], from_checkpoint, f"{checkpoint} (its config)"
    # the checkpoint's unresolved copy is only for a resume, which reads it itself (training.resume)
    state.pop("config_unresolved", None)
    warn_ignored(ignored, source)
    config = _checked(apply_overrides(base, overrides, str(saved)), "the config with the overrides")
    return config, state


def output_dir(parent: Path, name: str, overrides: Sequence[str]) -> Path:
    """A new folder <parent>/<name>[_<overrides>][_N]: a second evaluation never overwrites the first."""
    named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in UNNAMED_KEYS]
    if named:
        name = f"{name}_{run_label(','.join(named))}"
    # claimed with an exclusive mkdir, so two evaluations started at once get different folders
    # (naming.unique_dir caches its answer per process, for Hydra; here each call is a new folder)
    n = 1
    while True:
        path = parent / (name if n == 1 else f"{name}_{n}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
        except OSError as exc:  # read-only or full: the commands' check up front makes this rare
            raise write_error(path, exc, OUT_DIR_HINT, into=True) from None


def restore(config: dict, state: dict, checkpoint: Path):
    """The run of `config` with the checkpoint's weights (training.run.build_run): on the device,
    in the memory format and with the determinism settings that training used (cuDNN picks its
    kernels by them), with the eval pipelines of its config."""
    # lazy: torch; this module is on the ONNX predictor's path, which runs without torch
    from imgcls.training.run import build_run

    return build_run(config, train=False, weights=(state, checkpoint))
