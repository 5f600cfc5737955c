"""Run directory names: readable from the command-line overrides, and never shared by two runs."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

# a run directory is passed back on the command line (resume=<run>/weights/last.pt), so its name
# keeps to characters Hydra's override grammar reads unquoted: no '=', ',', brackets or spaces
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_claimed: dict[str, str] = {}


def run_label(override_dirname: str) -> str:
    """`data.batch_size=32,optimizer.lr=0.01` -> `batch_size-32_lr-0.01`; no overrides -> `base`.

    Keys listed in hydra.job.config.override_dirname.exclude_keys are already left out by Hydra.
    Keys keep their last component, group choices stay whole (`data=hymenoptera`), and a path
    value keeps its last component, so the name stays one readable folder name.
    """
    parts = []
    for item in _split_overrides(override_dirname):
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra."):
            continue
        if "/" in value:
            value = Path(value.rstrip("/")).name or value
        value = _short_float(value)
        parts.append(_UNSAFE.sub("-", f"{key.rsplit('.', 1)[-1]}-{value}").strip("-"))
    label = "_".join(sorted(parts))
    return label[:120] or "base"


def _short_float(value: str) -> str:
    """`0.0013292918943162175` (an Optuna suggestion) -> `0.00132929`; config.yaml keeps it whole."""
    if len(value) <= 10 or not re.fullmatch(r"[-+]?\d*\.\d+(e[-+]?\d+)?|[-+]?\d+e[-+]?\d+", value, re.I):
        return value
    return f"{float(value):.6g}"


def _split_overrides(text: str) -> list[str]:
    """Split Hydra's override_dirname on the commas that separate overrides, not those in values."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i for i in items + [current] if i]


def unique_dir(path: str) -> str:
    """`path`, or `path_2`, `path_3`, ... when another run already holds it.

    The folder is claimed with an exclusive mkdir, so two runs started in the same second with
    the same overrides still get different directories. The result is cached per process because
    Hydra may resolve the run directory more than once.
    """
    if path in _claimed:
        return _claimed[path]
    candidate, n = path, 1
    while True:
        try:
            Path(candidate).mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:
            n += 1
            candidate = f"{path}_{n}"
    _claimed[path] = candidate
    return candidate


def run_dir(resume: str | None, new_dir: str) -> str:
    """A resumed run continues in its own directory (<run>/weights/<ckpt>.pt -> <run>); any other
    run claims `new_dir` through unique_dir."""
    if env_rank() > 0:
        # torchrun: rank 0 owns the run directory and hands its path to the others
        return str(Path(tempfile.gettempdir()) / f"imgcls-rank{env_rank()}-{os.getpid()}")
    if resume:
        ckpt = Path(resume)
        if ckpt.is_file() and ckpt.parent.name == "weights":
            return str(ckpt.parent.parent)
    return unique_dir(new_dir)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def hydra_subdir(resume: str | None) -> str | None:
    """Where Hydra records the composition: `.hydra`, or `.hydra/resume-<time>` for a resumed
    run, so resuming never overwrites the original run's record."""
    if env_rank() > 0:
        return None  # only rank 0 records the composition
    if not resume:
        return ".hydra"
    from datetime import datetime

    return f".hydra/resume-{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"


def register_resolvers() -> None:
    resolvers = {
        "run_label": run_label,
        "unique_dir": unique_dir,
        "run_dir": run_dir,
        "hydra_subdir": hydra_subdir,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
