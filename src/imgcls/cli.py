"""The command line of the entries that work on a finished run (evaluate, predict)."""

from __future__ import annotations

import importlib.resources
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from imgcls.errors import ConfigError, UserError


def _config_dir() -> str:
    """conf/ sits at the repository root and installs as the package imgcls.conf (pyproject.toml's
    package-dir): an editable install and a wheel find it by import; a checkout that is only on
    PYTHONPATH (src/, as the benchmarks run it) has it beside src/."""
    try:
        return str(importlib.resources.files("imgcls.conf"))
    except ModuleNotFoundError:
        return str(Path(__file__).resolve().parents[2] / "conf")


CONFIG_DIR = _config_dir()
# Hydra's flags that take their value as the next argument (`--cfg job`, `-cn evaluate`)
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
_FLAGS_WITH_VALUE |= {"--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun"}


def split_argv(
    argv: Sequence[str], own_keys: set[str], path_keys: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Split the command line into Hydra's part (flags, hydra.*, the entry's own keys) and the
    overrides of the run's saved config (everything else, e.g. data.root=/other/tree).

    Hydra's struct mode would refuse `data.root=...` on a primary config without a `data` node;
    these overrides are applied to the saved config instead, with the same grammar. Values of
    `path_keys` are quoted for Hydra: run directories are named like `10-31-07_batch_size=32,lr=0.01`,
    whose `=` and `,` Hydra's grammar would reject or read as a sweep.
    """
    hydra_args: list[str] = []
    run_overrides: list[str] = []
    takes_value = False
    for arg in argv:
        if takes_value or arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            takes_value = arg in _FLAGS_WITH_VALUE
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


def main_over_run(
    config_name: str,
    task: Callable[[dict, list[str]], Any],
    path_keys: Sequence[str] = ("run_dir", "checkpoint", "out_dir"),
) -> None:
    """The command line of an entry that works on a finished run: Hydra composes
    conf/<config_name>.yaml from the entry's own keys; every other key=value is an override of the
    run's saved config, handed to task(cfg, overrides). A UserError prints `error: ...`, exit 2."""
    import hydra
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    hydra_args, overrides = split_argv(
        sys.argv[1:], primary_keys(Path(CONFIG_DIR) / f"{config_name}.yaml"), path_keys
    )
    sys.argv = [sys.argv[0], *hydra_args]

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def _main(cfg) -> None:
        try:
            try:
                plain_cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            except MissingMandatoryValue as exc:
                raise ConfigError(
                    f"{exc.full_key} is required: set it on the command line, {exc.full_key}=..."
                ) from None
            task(plain_cfg, overrides)
        except (UserError, OmegaConfBaseException) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    _main()
