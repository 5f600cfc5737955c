"""Run directory names: readable from the command-line overrides, and never shared by two runs."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")
_claimed: dict[str, str] = {}


def run_label(override_dirname: str) -> str:
    """`data.batch_size=32,optimizer.lr=0.01` -> `batch_size=32,lr=0.01`; no overrides -> `base`.

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
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    label = _UNSAFE.sub("-", ",".join(sorted(parts))).strip("-")
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


def register_resolvers() -> None:
    for name, fn in (("run_label", run_label), ("unique_dir", unique_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
