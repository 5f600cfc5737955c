"""The run builder: one resolution of precision and memory format for every command, a loop that
changes nothing of its caller's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tree
from hydra import compose, initialize_config_dir

from imgcls.cli import CONFIG_DIR
from imgcls.config import build as b
from imgcls.training.run import build_run, resolve_speed

CPU = torch.device("cpu")


def compose_train(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return b.plain(compose(config_name="train", overrides=["device=cpu", *overrides]))


@pytest.mark.parametrize("spec, expected", [("auto", True), (True, True), (False, False)])
def test_evaluation_resolves_channels_last_as_training_does(spec, expected):
    trainer = {"channels_last": spec}
    assert resolve_speed(trainer, CPU, train=True)[1] is expected
    assert resolve_speed(trainer, CPU, train=False)[1] is expected


@pytest.mark.parametrize("spec", ["auto", True, False])
def test_a_restored_model_runs_in_trainings_memory_format(spec):
    config = compose_train("transforms=digits", f"trainer.channels_last={str(spec).lower()}")
    model = b.build_model(config["model"], num_classes=3)
    state = {"model": model.state_dict(), "class_names": ["a", "b", "c"]}
    run = build_run(config, train=False, weights=(state, Path("best.pt")))
    conv = next(p for p in run.model.parameters() if p.dim() == 4)
    # auto on the CPU is channels_last, in training (resolve_channels_last) and here alike
    assert run.channels_last is (spec is not False)
    assert conv.is_contiguous(memory_format=torch.channels_last) is run.channels_last
    assert run.amp.name == "fp32", "evaluation predicts in full precision"


def test_fit_leaves_the_callers_recipe_and_state_as_they_were(tmp_path):
    from imgcls.training.loop import fit
    from imgcls.training.resume import TrainingState

    tree = make_tree(tmp_path / "tree", counts={"train": 4, "val": 2})
    config = compose_train(
        "data=imagefolder", f"data.root={tree}", "transforms=digits", "data.batch_size=4", "data.num_workers=0",
        "trainer.epochs=1", "scheduler=onecycle", "trainer.bn_recalibration.enabled=false",
    )  # fmt: skip
    run = build_run(config, train=True, split_file=tmp_path / "data_split.json")
    assert run.recipe.step_scheduler is run.scheduler, "a per-step schedule is the builder's to wire"
    recipe, state = run.recipe, TrainingState()
    result = fit(run, state, tmp_path / "weights")
    assert run.recipe is recipe and recipe.should_stop() is None
    assert state == TrainingState(), "the caller's state is not the loop's to change"
    assert [row["epoch"] for row in result["history"]] == [1]
    assert (tmp_path / "weights" / "last.pt").is_file()
