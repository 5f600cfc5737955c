"""What a config may build: each config group's targets by name, checked before anything is built.

A run directory may come from someone else, so its config.yaml is untrusted input. A `_target_`
is allowed only where its key says what is built there (data, model, loss, optimizer, scheduler,
transforms.<split>[i]) and only if it is what that group builds: one of the project's own
targets, registered here by exact name, or an outside class of the group's kind (an optimizer is
a torch.optim.Optimizer subclass defined in torch.optim, never any function that lives nearby:
`imgcls.data.download.fetch_tree` lives in imgcls.data and unpacks a zip wherever it is told).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from imgcls.errors import ConfigError


@dataclass(frozen=True)
class Group:
    """What one config group builds."""

    builds: str  # for messages: "an optimizer"
    targets: tuple[str, ...] = ()  # the project's own, by the exact `_target_` spelling
    bases: tuple[str, ...] = ()  # outside classes: subclasses of one of these ...
    namespace: str | None = None  # ... both spelled and defined inside this package
    partial: bool | None = None  # its `_partial_`: true (completed at run time), false, None: either
    nested: str | None = None  # the group of `_target_` nodes in its arguments; None: none allowed


# The registry. Hydra's own sweepers, launchers and callbacks (conf/hydra/, `hydra:` in
# conf/train.yaml) are not here: Hydra instantiates them from the primary config, never from a
# run's config.yaml, and none of them goes through build.py. The user's own code joins a group
# through trusted_targets() below: trust comes from the user's environment, never from a run.
GROUPS: dict[str, Group] = {
    "data": Group(
        "a data set",
        targets=("imgcls.data.ImageFolderData", "imgcls.data.digits.DigitsData"),
        partial=False,
    ),
    "model": Group(
        "a classifier",
        # timm's models through imgcls's own builder only: nothing of timm itself (its checkpoint
        # savers and hub uploaders write files) is a target
        targets=("imgcls.models.torchvision.create_model", "imgcls.models.timm.create_model"),
        partial=True,
    ),
    "loss": Group(
        "a loss",
        targets=("imgcls.training.losses.CrossEntropyLoss", "imgcls.training.losses.FocalLoss"),
        bases=("torch.nn.modules.loss._Loss",),
        namespace="torch.nn",
    ),  # either: build_loss probes a partial for class_counts
    "optimizer": Group(
        "an optimizer",
        bases=("torch.optim.Optimizer",),
        namespace="torch.optim",
        partial=True,
    ),
    "scheduler": Group(
        "a learning-rate schedule",
        targets=("imgcls.training.recipes.WarmupCosineLR",),
        # ReduceLROnPlateau subclasses LRScheduler only from torch 2.2 on
        bases=("torch.optim.lr_scheduler.LRScheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"),
        namespace="torch.optim",
        partial=True,
    ),
    "transforms": Group(
        "an image transform",
        bases=("torchvision.transforms.v2.Transform",),  # Compose, RandomApply, ... too
        namespace="torchvision.transforms.v2",
        partial=False,
        nested="transforms",  # Compose(transforms=[...]) and the other containers
    ),
}
SLOTS = "data, model, loss, optimizer, scheduler and transforms.<split>[i]"
_TRANSFORM_SLOT = re.compile(r"transforms\.(train|val|test)\[\d+\]")
# Hydra's keys in a node with a `_target_`; any other `_name_` is a typo or a trick
_SPECIAL = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
_CONVERT = ("none", "partial", "object", "all")


# The user's own targets: installed packages declare them as entry points, the user's shell in
# this variable. Either way an entry is `<group>:<module>.<name>` (that class or function) or
# `<group>:<module>` (every class and function defined in that module, not in its submodules).
TRUST_VARIABLE = "IMGCLS_TRUSTED_TARGETS"  # e.g. "model:my_pkg.nets.TinyNet, loss:my_pkg.losses"
# [project.entry-points."imgcls.targets"] in the package's pyproject.toml: the entry's name is the
# group, optionally with a suffix after a dot to keep names unique ("model.tiny"), its value
# "my_pkg.nets:TinyNet" (one target) or "my_pkg.nets" (the module)
ENTRY_POINT_GROUP = "imgcls.targets"


def trusted_targets() -> dict[str, frozenset[str]]:
    """{group: targets and modules the user trusts}, from installed entry points and $IMGCLS_TRUSTED_TARGETS."""
    return _trusted(os.environ.get(TRUST_VARIABLE, ""))


@functools.lru_cache(maxsize=8)
def _trusted(variable: str) -> dict[str, frozenset[str]]:
    entries = [(ep.name.split(".")[0], ep.value.replace(":", "."), f"entry point {ep.name} = {ep.value}")
               for ep in entry_points(group=ENTRY_POINT_GROUP)]  # fmt: skip
    for item in filter(None, (part.strip() for part in re.split(r"[,\s]+", variable))):
        group, _, name = item.partition(":")
        entries.append((group, name, f"{TRUST_VARIABLE} entry {item!r}"))
    found: dict[str, set[str]] = {}
    for group, name, source in entries:
        if group not in GROUPS or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise ConfigError(
                f"{source}: expected <group>:<module>[.<name>] with a group of {', '.join(GROUPS)}, "
                f"e.g. model:my_pkg.nets.TinyNet"
            )
        found.setdefault(group, set()).add(name)
    return {group: frozenset(names) for group, names in found.items()}


def _user_trusts(target: str, group_name: str) -> bool:
    """Whether the user trusts `target` in this group: by its exact name, or by its module (then
    it must be a class or function defined in exactly that module, checked once it is located)."""
    names = trusted_targets().get(group_name, frozenset())
    return target in names or target.rpartition(".")[0] in names


def group_of(key: str) -> str | None:
    """The group a top-level node at `key` builds, or None where nothing is built."""
    if key in GROUPS and key != "transforms":
        return key
    return "transforms" if _TRANSFORM_SLOT.fullmatch(key) else None


def _in(module: str | None, namespace: str) -> bool:
    return module is not None and (module == namespace or module.startswith(namespace + "."))


def allowed(group_name: str) -> str:
    """What the group may build, in words."""
    group = GROUPS[group_name]
    parts = [*group.targets, *sorted(trusted_targets().get(group_name, ()))]
    if group.bases:
        kinds = " or ".join(group.bases)
        parts.append(f"a class from {group.namespace} that subclasses {kinds}")
    return ", ".join(parts)


def locate(path: str) -> Any:
    """The object a dotted `_target_` names, resolved the way Hydra's instantiate resolves it: the
    first part imported as a module, each next part an attribute or else a submodule. Imports
    what it names and calls nothing."""
    parts = path.split(".") if isinstance(path, str) else []
    if not parts or not all(parts):
        raise ImportError(f"{path!r} is not a dotted path such as torch.optim.SGD")
    try:
        obj = importlib.import_module(parts[0])
    except ModuleNotFoundError:
        raise ImportError(f"Are you sure that module {parts[0]!r} is installed?") from None
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            parent = ".".join(parts[:i])
            if not inspect.ismodule(obj):
                raise ImportError(f"Are you sure that {part!r} is an attribute of {parent!r}?") from None
            try:
                obj = importlib.import_module(f"{parent}.{part}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{parent}.{part}":
                    raise  # the module exists and fails to import: its own error says why
                raise ImportError(
                    f"Are you sure that {part!r} is importable from module {parent!r}?"
                ) from None
    return obj


def target_problem(target: Any, group_name: str, key: str | None = None) -> str | None:
    """What is wrong with `target` as the `_target_` of a node of `group_name` (at `key`, for the
    message), or None when it may be built there."""
    group = GROUPS[group_name]
    expected = f"{key or group_name} builds {group.builds}: {allowed(group_name)}"
    user = isinstance(target, str) and _user_trusts(target, group_name)
    registered = (isinstance(target, str) and target in group.targets) or user
    outside = isinstance(target, str) and group.namespace and _in(target.rpartition(".")[0], group.namespace)
    if not (registered or outside):
        # nothing is imported for a name that is neither registered nor in the group's package
        return f"is not allowed: {expected}"
    try:
        obj = locate(target)  # imports the allowed modules it names; calls nothing
    except Exception as exc:
        return f"cannot be found ({str(exc).strip().splitlines()[-1]}); {expected}"
    if user and target not in trusted_targets().get(group_name, ()):  # trusted as part of its module
        defined_there = getattr(obj, "__module__", None) == target.rpartition(".")[0]
        if not (defined_there and (inspect.isclass(obj) or inspect.isfunction(obj))):
            return f"is not allowed: {target} is not a class or function defined in the module you trust; {expected}"
    if registered:
        return None if inspect.isclass(obj) or inspect.isfunction(obj) else f"is not allowed: {expected}"
    module = getattr(obj, "__module__", None)
    where = (
        f"the module {obj.__name__}"
        if inspect.ismodule(obj)
        else f"{module}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    )
    if not inspect.isclass(obj):
        return f"is not allowed: it resolves to {where}, not a class; {expected}"
    if not _in(module, group.namespace):
        return f"is not allowed: it resolves to {where}, outside {group.namespace}; {expected}"
    if not issubclass(obj, tuple(locate(b) for b in group.bases)):
        return f"is not allowed: {where} is not {group.builds}; {expected}"
    return None


def _special_problem(node: Mapping, group_name: str) -> tuple[str, str] | None:
    """(key, problem) for a Hydra key of `node` that its group does not take, or None."""
    group = GROUPS[group_name]
    for name, value in node.items():
        if not (isinstance(name, str) and len(name) > 2 and name.startswith("_") and name.endswith("_")):
            continue
        if name not in _SPECIAL:
            return name, f"is not a key instantiate takes ({', '.join(_SPECIAL)})"
        if name in ("_partial_", "_recursive_") and not isinstance(value, bool):
            return name, "must be true or false"
        if name == "_convert_" and str(value).lower() not in _CONVERT:
            return name, f"must be one of {', '.join(_CONVERT)}"
        if name == "_args_" and not isinstance(value, list):
            return name, "must be a list of positional arguments"
    partial = node.get("_partial_", False)
    if group.partial is not None and partial is not group.partial:
        how = "true (completed with run-time arguments)" if group.partial else "false"
        return "_partial_", f"{group_name} nodes are built with _partial_: {how}"
    return None


def _refuse(where: str, value: Any, problem: str, advice: str) -> ConfigError:
    return ConfigError(f"{where}={value!r} {problem}. {advice} Refusing to build anything from this config.")


def check_targets(node: Any, key: str = "", inside: str | None = None) -> None:
    """Raise ConfigError naming the key of any `_target_` its place does not allow: a node at
    data, model, loss, optimizer, scheduler or transforms.<split>[i] must build what that group
    builds, a node inside another's arguments what that group nests (transforms in a Compose;
    nothing anywhere else), and no other key builds anything. `inside`: the group of the node
    whose arguments `node` is in."""
    prefix = f"{key}." if key else ""
    if isinstance(node, Mapping):
        here = inside
        if node.get("_target_") is not None:  # null: nothing to build (scheduler: none)
            where = f"{prefix}_target_"
            if inside is not None:
                here = GROUPS[inside].nested
                if here is None:
                    raise _refuse(
                        where, node["_target_"],
                        f"is not allowed: a {inside} node takes plain values, not objects built from a nested _target_",
                        "Remove the nested node.",
                    )  # fmt: skip
            else:
                here = group_of(key)
                if here is None:
                    raise _refuse(
                        where, node["_target_"],
                        f"is not allowed: nothing is built from {key or 'the top level'}; a _target_ is read only in {SLOTS}",
                        "Remove it.",
                    )  # fmt: skip
            problem = target_problem(node["_target_"], here, key)
            if problem is not None:
                raise _refuse(
                    where, node["_target_"], problem,
                    f"Use one of those (see conf/{here}/); to build your own code, trust it where you run "
                    f"imgcls: {TRUST_VARIABLE}={here}:<module>.<name> or an {ENTRY_POINT_GROUP!r} entry point.",
                )  # fmt: skip
            special = _special_problem(node, here)
            if special is not None:
                raise _refuse(
                    f"{prefix}{special[0]}",
                    node.get(special[0]),
                    f"is not allowed: {special[1]}",
                    "Fix or remove it.",
                )
        for k, v in node.items():
            check_targets(v, f"{prefix}{k}", here)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_targets(v, f"{key}[{i}]", inside)
