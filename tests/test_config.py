"""Every config option composes and builds; the allowlist refuses foreign targets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from imgcls.cli import CONFIG_DIR
from imgcls.config import build as b
from imgcls.errors import ConfigError


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name="train", overrides=list(overrides))


def test_groups_have_the_documented_options():
    assert options("data") == ["digits", "hymenoptera", "imagefolder"]
    assert options("optimizer") == ["adam", "adamw", "sgd"]
    assert options("scheduler") == ["cosine", "multistep", "none", "onecycle", "plateau", "step"]
    assert options("loss") == ["cross_entropy", "focal"]
    assert options("experiment") == ["digits_fast", "hymenoptera_finetune"]
    assert "resnet18" in options("model") and "cross_entropy" in options("loss")
    assert {"digits", "imagenet"} <= set(options("transforms"))


@pytest.mark.parametrize(
    "group",
    ["data", "transforms", pytest.param("model", marks=pytest.mark.slow), "optimizer", "scheduler", "loss"],
)  # model builds every classifier, ViT-B and ConvNeXt among them
def test_every_option_composes_and_builds(group: str, tmp_path: Path):
    for option in options(group):
        if option == "timm" and importlib.util.find_spec("timm") is None:
            continue  # the timm extra is not installed (tests/test_timm.py builds it when it is)
        cfg = compose_train(f"{group}={option}", f"data.root={tmp_path}")
        config = b.plain(cfg)
        b.check_targets(config)
        data = b.build_data(config["data"])
        assert data.batch_size >= 1 and data.root == tmp_path
        pipelines, normalize = b.build_transforms(config["transforms"])
        image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
        for split in ("train", "val", "test"):
            out = pipelines[split](image)
            assert out.dtype == torch.uint8 and out.ndim == 3
        assert normalize(out.unsqueeze(0)).dtype == torch.float32
        model = b.build_model(config["model"], num_classes=4)
        side = config["model"].get("image_size", 32)  # ViT's patch grid fixes its input size
        assert model.eval()(torch.randn(2, 3, side, side)).shape == (2, 4)
        optimizer = b.build_optimizer(config["optimizer"], model)
        assert optimizer.param_groups[0]["lr"] == config["optimizer"]["lr"]
        scheduler = b.build_scheduler(config["scheduler"], optimizer)
        if group == "scheduler":
            assert (scheduler is None) == (option == "none")
        loss = b.build_loss(config["loss"])
        assert loss(torch.randn(2, 4), torch.tensor([0, 3])).ndim == 0


def test_transforms_follow_the_data_option():
    assert compose_train().transforms.train[0].size == [32, 32]
    assert compose_train("data=hymenoptera").transforms.train[0]._target_.endswith("RandomResizedCrop")
    assert compose_train("data=hymenoptera", "transforms=digits").transforms.train[0].size == [32, 32]


def test_no_weight_decay_on_norms_and_biases():
    cfg = compose_train("optimizer=adamw")
    model = b.build_model(cfg.model, num_classes=3)
    optimizer = b.build_optimizer(cfg.optimizer, model)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "target", ["os.system", "subprocess.Popen", "builtins.exec", "pickle.loads", "shutil.rmtree"]
)
def test_allowlist_refuses_foreign_targets_nested_too(target: str, tmp_path: Path):
    marker = tmp_path / "pwned"
    node = {
        "_target_": "imgcls.models.torchvision.create_model",
        "_partial_": True,
        "name": "resnet18",
        "inner": [{"x": {"_target_": target, "_args_": [f"touch {marker}"]}}],
    }
    with pytest.raises(ConfigError, match=rf"model\.inner\[0\]\.x\._target_='{target}' is not allowed"):
        b.build(node, "model")
    assert not marker.exists()


def test_a_wrong_value_names_the_key():
    cfg = compose_train("optimizer.lr=-1")
    model = b.build_model(cfg.model, num_classes=3)
    with pytest.raises(
        ConfigError, match=r"cannot build optimizer \(torch\.optim\.SGD\): Invalid learning rate"
    ):
        b.build_optimizer(cfg.optimizer, model)


def test_config_is_plain_data():
    config = b.plain(compose_train())
    assert type(config) is dict and type(config["transforms"]["train"]) is list
    assert not OmegaConf.is_config(config["data"])


# SGD's rate is the rule in conf/optimizer/sgd.yaml: 0.2 x (batch per optimizer step) / 256
@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        ([], 0.05),  # digits: batch 64
        (["data=hymenoptera"], 0.0125),  # batch 16
        (["data=imagefolder"], 0.025),  # batch 32
        (["data=imagefolder", "data.batch_size=128"], 0.1),  # a batch size change changes the rate
        (["data=imagefolder", "trainer.grad_accum_steps=4"], 0.1),  # so does accumulation: 128 per step
        (["data=hymenoptera", "optimizer=adam"], 1e-3),  # Adam keeps its own rate
        (["data=hymenoptera", "optimizer.lr=0.05"], 0.05),  # the command line wins
        (["data=imagefolder", "data.batch_size=128", "optimizer.lr=0.01"], 0.01),  # over the rule too
        (["experiment=hymenoptera_finetune"], 0.001),  # an experiment's own rate wins
    ],
)
def test_sgd_rate_is_linear_in_the_batch(overrides, lr):
    assert compose_train(*overrides).optimizer.lr == pytest.approx(lr)


def test_the_rate_counts_torchruns_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # set by torchrun in every process it starts
    assert compose_train("data=imagefolder").optimizer.lr == pytest.approx(0.1)  # 32 x 4 per step


def test_a_users_data_option_gets_the_rule(tmp_path):
    """A data option of the user's own (conf/data/mine.yaml in their config folder) adds no other
    file to get the rate for its batch."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(
        "defaults:\n  - imagefolder\n  - _self_\nroot: /x\nbatch_size: 48\n"
    )
    cfg = compose_train("data=mine", f"hydra.searchpath=[file://{tmp_path}]")
    assert cfg.optimizer.lr == pytest.approx(0.2 * 48 / 256)
    assert compose_train(
        "data=mine", "data.batch_size=96", f"hydra.searchpath=[file://{tmp_path}]"
    ).optimizer.lr == (pytest.approx(0.2 * 96 / 256))
