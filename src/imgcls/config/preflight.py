"""Before Hydra writes anything: refuse `+keys` that nothing reads, and claim the run directory
(a new one, or the one a resume continues)."""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from imgcls.cli import CONFIG_DIR
from imgcls.config.naming import claim_new_run_dir, env_rank, hold_run_dir, release_all, resumed_dir
from imgcls.config.targets import group_of, locate, target_problem
from imgcls.errors import ConfigError, UserError

# keys instantiate() itself reads in any `_target_` node
_INSTANTIATE_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class BeforeRun(Callback):
    """Hydra callback (hydra.callbacks in train.yaml). Hydra writes `.hydra/` into the run
    directory before the task function runs, so the checks that must leave a directory untouched
    run here, at the start, where a refusal exits 2 with nothing written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _or_exit(lambda: start_run(config))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_all()  # train.run let go already; this covers a run Hydra ended before it started

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # a sweep's jobs claim their own numbered folders (hydra_plugins.imgcls_sweepers)
        _or_exit(lambda: check_added_keys(config, list(config.hydra.overrides.task)))


def _or_exit(check: Callable[[], None]) -> None:
    try:
        check()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def start_run(config: DictConfig) -> None:
    check_added_keys(config, list(config.hydra.overrides.task))
    if env_rank() > 0:
        return  # torchrun: rank 0 claims the directory and hands it to the others

    HydraConfig.instance().set_config(config)  # ${hydra:job.override_dirname} in the name reads it
    path = Path(str(OmegaConf.select(config, "hydra.run.dir")))
    resumed = resumed_dir(OmegaConf.select(config, "resume"))
    if resumed is not None and resumed.resolve() == path.resolve():
        # resume=<run>/weights/last.pt continues in its own directory, holding it as a new run
        # does: a second resume of a running run is refused here, before anything is written
        hold_run_dir(path)
        return
    claimed = claim_new_run_dir(path)
    if claimed != path:  # another run took the name since it was resolved: Hydra writes where we claimed
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(claimed)


def check_added_keys(config: DictConfig, overrides: list[str]) -> None:
    """Raise ConfigError for every `+key=value` (or `++key` that adds) that nothing in imgcls reads.

    Hydra suggests `+optimzer.lr=0.1` for a misspelt key, and following that hint used to train
    with the value ignored. A key is read when it is an argument of the `_target_` node it is
    added to (`+optimizer.foreach=true`; a `**kwargs` constructor takes any); `+group=option`
    selects a config and `hydra.*` is Hydra's."""
    adds = [
        o
        for o in OverridesParser.create().parse_overrides(overrides)
        if o.type in (OverrideType.ADD, OverrideType.FORCE_ADD)
        and o.package is None
        and not o.key_or_group.startswith("hydra.")
        and not _is_group(config, o.key_or_group)
    ]
    unread = [o for o in adds if not _read(config, o.key_or_group)]
    forced = [o for o in unread if o.type == OverrideType.FORCE_ADD]
    if forced:  # ++key=value on a key the config already has is an ordinary override
        base = _keys(_compose_without_adds(config, overrides))
        unread = [o for o in unread if o.key_or_group not in base]
    if not unread:
        return
    added = {o.key_or_group for o in adds}
    known = _existing(_known_keys(config), added)
    lines = []
    for o in unread:
        prefix = "++" if o.type == OverrideType.FORCE_ADD else "+"
        lines.append(f"{prefix}{o.key_or_group}: no such key; {_hint(config, o.key_or_group, known)}")
    raise ConfigError("\n".join(lines))


def _hint(config: DictConfig, key: str, known: list[str]) -> str:
    """The nearest key: among its siblings when its node exists (`+optimizer.nesterow`), else
    among all keys (`+optimzer.lr`)."""
    parent, _, name = key.rpartition(".")
    if parent and any(k.startswith(f"{parent}.") for k in known):
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        siblings = [k for k in siblings if not k.startswith("_")]
        near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
        if near:
            return f"did you mean {parent}.{near[0]}?"
        target = OmegaConf.select(config, f"{parent}._target_", default=None)
        if isinstance(target, str):
            return f"{target} takes no argument {name!r} (it takes {', '.join(sorted(siblings))})"
        return f"{parent} has {', '.join(sorted(siblings))}"
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"did you mean {near[0]}?" if near else "nothing in imgcls reads it (CONFIG.md lists the keys)"


def _is_group(config: DictConfig, name: str) -> bool:
    """`+experiment=digits_fast` picks a config file: a group Hydra composed, or a conf/ folder."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    return name in choices or (Path(CONFIG_DIR) / name).is_dir()


def _read(config: DictConfig, key: str) -> bool:
    """Whether `key` is an argument of the `_target_` node it is added to."""
    parent, _, name = key.rpartition(".")
    target = OmegaConf.select(config, f"{parent}._target_" if parent else "_target_", default=None)
    if not isinstance(target, str):
        return False
    if name in _INSTANTIATE_KEYS:
        return True
    params = _parameters(target, parent)
    return params is None or name in params or "**" in params


def _parameters(target: str, key: str) -> set[str] | None:
    """The keyword arguments `target` (the node at `key`) takes ("**" for **kwargs); None when it
    cannot be told: a target the build refuses with its own message, or one without a signature.
    Only targets the node's group allows are imported (imgcls.config.targets)."""
    key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)  # transforms.train.0 -> transforms.train[0]
    group = group_of(key)
    if group is None or target_problem(target, group, key) is not None:
        return None
    try:
        signature = inspect.signature(locate(target))
    except (TypeError, ValueError):
        return None
    names = set()
    for p in signature.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            names.add("**")
        elif p.kind != p.VAR_POSITIONAL:
            names.add(p.name)
    return names


def _optional(target: str, key: str) -> set[str]:
    """The arguments of `target` a config may add: those with defaults (the others, such as an
    optimizer's params, are given at run time)."""
    if _parameters(target, key) is None:
        return set()
    params = inspect.signature(locate(target)).parameters.values()
    return {p.name for p in params if p.default is not p.empty and p.kind != p.VAR_KEYWORD}


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        items = ((str(k), node._get_node(k)) for k in node.keys())
    elif isinstance(node, ListConfig):
        items = ((str(i), node._get_node(i)) for i in range(len(node)))
    else:
        return
    for k, child in items:
        key = f"{prefix}.{k}" if prefix else k
        if key == "hydra":
            continue
        yield key, child
        yield from _walk(child, key)


def _keys(config: DictConfig) -> set[str]:
    return {k for k, _ in _walk(config)}


def _known_keys(config: DictConfig) -> list[str]:
    """Every key of the config, and every argument of each `_target_` node (what `+` may add)."""
    keys = []
    for key, node in _walk(config):
        keys.append(key)
        if isinstance(node, DictConfig) and isinstance(node.get("_target_"), str):
            keys += [f"{key}.{p}" for p in _optional(node["_target_"], key) - set(node.keys())]
    return keys


def _existing(keys: list[str], added: set[str]) -> list[str]:
    """`keys` without those the command line added (and folders that hold nothing else): a
    misspelt key is never its own suggestion."""
    kept = [k for k in keys if not any(k == a or k.startswith(f"{a}.") for a in added)]
    return [k for k in kept if not any(a.startswith(f"{k}.") for a in added) or any(
        o.startswith(f"{k}.") for o in kept)]  # fmt: skip


def _compose_without_adds(config: DictConfig, overrides: list[str]) -> DictConfig:
    """The config as composed from the command line without its `+`/`++` overrides."""
    kept = [o for o in overrides if not o.startswith("+")]
    name = OmegaConf.select(config, "hydra.job.config_name") or "train"
    return compose(config_name=name, overrides=kept)
