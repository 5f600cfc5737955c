"""What a saved run may decide when it is read again (evaluate, predict, export, resume), key by
key, and the one reader of a saved config's text: no resolver in it ever runs.

A run folder or checkpoint may come from someone else. It supplies the model and how to rebuild
it (SAVED keys); anything that reaches the network, writes outside the run or reads the
environment comes from the person running the command now (CURRENT keys): the saved value is
replaced by the command's own (its composed config for a resume, READER_VALUES otherwise), and a
warning names each saved value so ignored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loguru import logger
from omegaconf import OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse

from imgcls.errors import ConfigError

SAVED, CURRENT = "saved", "current"

# Every key of the composed train config is matched by its longest prefix here
# (tests/test_foreign_runs.py walks them all: a new key needs a decision). The reason says why a
# SAVED key is safe to take from someone else's run, or what a CURRENT key would reach.
POLICY: dict[str, tuple[str, str]] = {
    "seed": (SAVED, "how the run draws its randomness"),
    "deterministic": (SAVED, "the kernels the run used"),
    "device": (SAVED, "a device of this machine, checked to exist; override with device=..."),
    "trainer": (SAVED, "the recipe: epochs, precision, EMA, ...; only numbers and switches"),
    "transforms": (SAVED, "the pipelines the model was trained on (every _target_ checked)"),
    "model": (
        SAVED,
        "the architecture; the checkpoint holds every weight (readers build it without timm's weights)",
    ),
    "optimizer": (SAVED, "the recipe a resume continues (every _target_ checked)"),
    "scheduler": (SAVED, "the recipe a resume continues (every _target_ checked)"),
    "loss": (SAVED, "the recipe a resume continues (every _target_ checked)"),
    "data": (
        SAVED,
        "the data's layout, classes' folders, batching and decoding limits; data.root is only read",
    ),
    # only a new training run fetches: readers call ImageFolderData.prepare(fetch=False), whose error
    # names the URL and what to do; kept so that error can say what the run was fetched from
    "data.download": (SAVED, "never fetched by a reader (only a new run downloads)"),
    "data.cache_dir": (CURRENT, "where data.cache=disk writes its files, outside the run"),
    "tracking": (CURRENT, "an MLflow store: a server on the network or a database file anywhere"),
    "resume": (CURRENT, "which checkpoint the command continues"),
    # not keys of a composed run config, but a saved file could carry them: Hydra would act on them
    # (hydra.searchpath, a defaults list composes other files) if the saved config reached compose
    "hydra": (CURRENT, "Hydra's settings: search paths, run directories, callbacks"),
    "defaults": (CURRENT, "a defaults list composes other config files"),
}

_ABSENT = object()
# What a CURRENT key is when evaluate, predict or export read a run (they compose no train config):
# train.yaml's defaults (tests/test_foreign_runs.py compares them); their command line sets them.
READER_VALUES: dict[str, Any] = {
    "data.cache_dir": "~/.cache/imgcls/images",
    "tracking": _ABSENT,
    "resume": None,
    "hydra": _ABSENT,
    "defaults": _ABSENT,
}
_QUIET = ("resume",)  # a resumed run's config names its checkpoint: nothing the reader would miss


def classify(key: str) -> str | None:
    """SAVED or CURRENT for a dotted key (`data.cache_dir`, `transforms.val`), by its longest
    prefix in POLICY; None: no decision (a key nothing classifies)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        rule = POLICY.get(".".join(parts[:n]))
        if rule is not None:
            return rule[0]
    return None


def read_saved(raw: Any, source: str, current: Any = None) -> tuple[dict, dict[str, Any]]:
    """(config, ignored): a saved config (plain containers, as YAML or torch.load gave it) with every
    CURRENT key taken from `current` (a resume's composed config; READER_VALUES when None), and the
    saved values so replaced, by key. Interpolations are left as they are, and refused first when
    they call a resolver (refuse_resolvers)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: not a config (a mapping of keys), got {type(raw).__name__}")
    refuse_resolvers(raw, source)
    config = _copied(raw)
    ignored: dict[str, Any] = {}
    for key, (kind, _) in POLICY.items():
        if kind != CURRENT:
            continue
        saved = _get(config, key)
        now = READER_VALUES.get(key, _ABSENT) if current is None else _select(current, key)
        if saved is now or saved == now:
            continue
        if saved is not _ABSENT and key not in _QUIET:
            ignored[key] = saved
        _set(config, key, now)
    return config, ignored


def warn_ignored(ignored: Mapping[str, Any], source: str) -> None:
    """One warning line per saved value that the command's own replaced."""
    for key, value in ignored.items():
        logger.warning(
            f"{key}={_short(value)} from {source} ignored: a saved run does not choose {POLICY[key][1]}; "
            f"set {key} on the command line to use it"
        )


def refuse_resolvers(node: Any, source: str, path: str = "") -> None:
    """ConfigError naming the key and `source` for any `${...}` that calls a resolver (`oc.env`,
    `oc.decode`, `now`, `hydra`, the project's own, any `name:`), at any depth, nested or not.
    References to the config's own keys (`${trainer.epochs}`, `${.val}`) stay: resume keeps a
    scheduler's horizon live through them. `\\${` is literal text."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            refuse_resolvers(v, source, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            refuse_resolvers(v, source, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node:
        try:
            name = _resolver_in(node)
        except GrammarParseError:
            raise ConfigError(
                f"{source}: {path}={node!r} is not a valid interpolation; a saved config may only refer "
                "to its own keys (${trainer.epochs}); write a literal ${ as \\${"
            ) from None
        if name is not None:
            raise ConfigError(
                f"{source}: {path}={node!r} calls the resolver {name!r}; a saved run's config is data and "
                "may only refer to its own keys (${trainer.epochs}), never to this machine's environment "
                f"or settings. Replace it with its value in {source}."
            )


def with_recorded_values(unresolved: Any, recorded: Any) -> Any:
    """A checkpoint's unresolved config with each value that calls a resolver replaced by what the
    run resolved it to when it trained (the checkpoint's resolved config, same key): a config that
    read ${oc.env:DATA} still resumes, with the value it trained on, never this machine's. A value
    the resolved config lacks stays, and read_saved refuses it."""
    if isinstance(unresolved, Mapping):
        return {
            k: with_recorded_values(v, recorded.get(k, _ABSENT) if isinstance(recorded, Mapping) else _ABSENT)
            for k, v in unresolved.items()
        }
    if isinstance(unresolved, list | tuple):
        inner = recorded if isinstance(recorded, list | tuple) else ()
        return [
            with_recorded_values(v, inner[i] if i < len(inner) else _ABSENT) for i, v in enumerate(unresolved)
        ]
    if isinstance(unresolved, str) and "${" in unresolved and recorded is not _ABSENT:
        try:
            calls = _resolver_in(unresolved) is not None
        except GrammarParseError:
            calls = False
        if calls:
            return recorded
    return unresolved


def resolved(config: dict, source: str) -> dict:
    """The config with its own-key references (the only interpolations read_saved lets through)
    replaced by their values; a reference to a key that is not there is a ConfigError."""
    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(
            f"{source}: {key or 'a value'} does not resolve: {str(exc).splitlines()[0]}"
        ) from None


def _resolver_in(text: str) -> str | None:
    """The first resolver `text` calls, by OmegaConf's own grammar (what OmegaConf would run)."""
    stack = [parse(text)]
    while stack:
        tree = stack.pop()
        if isinstance(tree, OmegaConfGrammarParser.InterpolationResolverContext):
            return tree.resolverName().getText()
        stack.extend(tree.getChildren() if hasattr(tree, "getChildren") else ())
    return None


def _copied(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _copied(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_copied(v) for v in node]
    return node


def _get(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _select(current: Any, key: str) -> Any:
    if not OmegaConf.is_config(current):
        return _get(current or {}, key)
    value = OmegaConf.select(current, key, default=_ABSENT, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _set(config: dict, key: str, value: Any) -> None:
    """Set or (value _ABSENT) remove a key; nothing when a parent is missing or not a mapping (a
    config without a data node gets none)."""
    *parents, last = key.split(".")
    node: Any = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            return
        node = node[part]
    if value is _ABSENT:
        node.pop(last, None)
    else:
        node[last] = value


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
