"""Overrides on a saved config: `key=value`, `+key=value`, `++key=value` and `~key` applied to a
finished run's config by Hydra's compose API, with the same grammar and rules as training's command
line. The one way a saved config takes overrides: evaluate, predict and export (imgcls.runs.load_run)
and resume (imgcls.training.resume.resume_config)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from imgcls.errors import ConfigError

# the name the saved config is stored under for Hydra to compose it (ConfigStore, this process only)
_SAVED_RUN = "imgcls_saved_run"


def apply_overrides(config: dict, overrides: Sequence[str], source: str, resolve: bool = True) -> dict:
    """The saved config with `key=value`, `+key=value`, `++key=value` and `~key` applied by Hydra's
    compose API: the grammar, struct mode (an unknown key is refused) and the `+`/`~` rules are
    training's. The one way a saved config takes overrides: evaluate, predict and export (load_run)
    and resume (training.resume.resume_config, with resolve=False: the checkpoint keeps its own-key
    references, ${trainer.epochs}, live). Hydra's refusals are reworded to name the key and say
    what to do."""

    if not overrides:
        return config
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"cannot parse the overrides {list(overrides)}: {exc}") from None
    _refuse_group_switches(parsed, OmegaConf.create(config))
    try:
        with _composing(config) as compose:
            return OmegaConf.to_container(compose(_SAVED_RUN, list(overrides)), resolve=resolve)
    except HydraException as exc:
        raise ConfigError(_reworded(str(exc), parsed, config, source)) from None


def _refuse_group_switches(parsed: list, config: Any) -> None:
    """Hydra would replace a whole node of the saved config by a value (`data=hymenoptera` as the
    string "hymenoptera"): a trained run has no config groups to pick from, so that is refused, as
    are sweeps (the run's config takes one value per key)."""

    for o in parsed:
        line, key = o.input_line, o.key_or_group
        if o.is_sweep_override() or o.package is not None:
            raise ConfigError(f"{line}: one value per key of the run's config (no sweeps, no @package)")
        current = OmegaConf.select(config, key, default=None)
        if isinstance(current, DictConfig) and not (
            o.is_delete() or o.is_add() or isinstance(o.value(), dict)
        ):
            raise ConfigError(
                f"{line}: {key} is a config node of the run, not a value; config groups cannot be switched "
                f"on a trained run: override its keys instead ({key}.<key>=...: {', '.join(map(str, current))})"
            )


def _reworded(message: str, parsed: list, config: dict, source: str) -> str:
    """Hydra's refusal of an override, naming the key and what to do instead."""

    found = re.search(r"override '([^']+)'|already at '([^']+)'|delete from config\. '([^']+)'", message)
    key = next((k for k in found.groups() if k), None) if found else None
    line = next((o.input_line for o in parsed if o.key_or_group == key), key)
    if key is None:
        return f"{' '.join(o.input_line for o in parsed)}: {message.splitlines()[0]} ({source})"
    if "already at" in message:
        return (
            f"{line}: {key} is already in the run's config; drop the + to change it (++ sets it either way)"
        )
    if "delete from config" in message:
        return f"{line}: {key} is not in the run's config ({source})"
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(OmegaConf.create(config), parent, default=None) if parent else config
    has = (
        f"{parent or 'its top level'} has: {', '.join(map(str, node))}"
        if isinstance(node, dict | DictConfig)
        else ""
    )
    own = "" if parent else " (the command's own keys are listed by --help)"
    return f"{line}: {key} is not in the run's config ({source}); {has}{own}. Add a new key with +{line}"


@contextmanager
def _composing(config: dict) -> Iterator[Callable]:
    """Hydra's `compose`, with `config` stored as the primary config `_SAVED_RUN`.

    The entries call this from inside their own Hydra job (hydra.main), and Hydra holds one
    global instance: it is set aside while the saved config is composed, and given back after."""

    # replace: an earlier command in this process stored its own run under the same name
    ConfigStore.instance().store(name=_SAVED_RUN, node=config, replace=True)
    entry = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize(config_path=None, job_name="saved_run"):
            yield compose
    finally:
        GlobalHydra.instance().clear()
        if entry is not None:
            GlobalHydra.instance().initialize(entry)
