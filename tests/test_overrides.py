"""Overrides of a saved config, in-process: the command line split by Hydra's own parser (cli), and a
resume applying its overrides to the checkpoint's config the way evaluate, predict and export apply
theirs to a saved run (runs.apply_overrides, Hydra's compose API)."""

from __future__ import annotations

import pytest
from hydra._internal.utils import get_args_parser

from imgcls.cli import split_argv
from imgcls.errors import ConfigError
from imgcls.training.resume import resume_config

# every flag of Hydra's command line that takes a value (`--config-dir DIR`), from Hydra's own parser
VALUE_FLAGS = [
    flag
    for action in get_args_parser()._actions
    if action.option_strings and action.nargs is None and action.const is None and not action.choices
    for flag in action.option_strings
]


@pytest.mark.parametrize("flag", VALUE_FLAGS)
def test_a_flags_value_stays_with_hydra_even_when_it_looks_like_an_override(flag):
    argv = ["run_dir=r", flag, "a=b", "data.root=/t"]
    assert split_argv(argv, {"run_dir"}) == (["run_dir=r", flag, "a=b"], ["data.root=/t"])


PATH = "/runs/a/weights/last.pt"
SCHEDULER = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}


def checkpoint() -> dict:
    """A run trained 1 epoch with a cosine horizon of ${trainer.epochs}, saved before data.cache
    existed (an older checkpoint)."""
    unresolved = {
        "trainer": {"epochs": 1, "compile": False}, "device": "auto", "resume": None, "seed": 0,
        "scheduler": {**SCHEDULER, "T_max": "${trainer.epochs}"},
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01},
        "data": {"root": "/data/tree", "num_workers": 2, "cache_dir": "/theirs"},
    }  # fmt: skip
    resolved = {**unresolved, "scheduler": {**SCHEDULER, "T_max": 1}}
    return {"epoch": 1, "config": resolved, "config_unresolved": unresolved}


# what Hydra composed from this command's train.yaml: the keys a saved run never decides come from it
COMPOSED = {"data": {"cache_dir": "~/.cache/imgcls/images"}, "resume": PATH}


def test_resumable_overrides_apply_and_references_stay_live():
    overrides = [f"resume={PATH}", "trainer.epochs=3", "device=cpu", "data.cache=disk", "data.num_workers=0"]
    config, unresolved = resume_config(checkpoint(), COMPOSED, overrides, PATH)
    assert config["trainer"]["epochs"] == 3 and config["scheduler"]["T_max"] == 3  # the horizon follows
    assert unresolved["scheduler"]["T_max"] == "${trainer.epochs}"  # what the next checkpoint keeps
    assert config["device"] == "cpu" and config["data"]["num_workers"] == 0
    assert config["data"]["cache"] == "disk"  # set although the older checkpoint has no such key
    assert config["data"]["cache_dir"] == "~/.cache/imgcls/images" and config["resume"] == PATH


def test_overrides_that_change_the_run_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"optimizer.lr=0.1, \+model.depth=2 would change the saved run"):
        resume_config(
            checkpoint(), COMPOSED, ["trainer.epochs=3", "optimizer.lr=0.1", "+model.depth=2"], PATH
        )


def test_hydras_grammar_reaches_the_checkpoints_config():
    config, _ = resume_config(checkpoint(), COMPOSED, ["trainer.epochs=int(4.0)", "device='cuda:1'"], PATH)
    assert config["trainer"]["epochs"] == 4 and config["device"] == "cuda:1"
