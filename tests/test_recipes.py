"""Training recipes: every model, scheduler, loss and augmentation option trains a step; early
stopping, accumulation, EMA, top-k checkpoints, transfer learning, lr_find, resume with each."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_here, make_tree, run_dirs
from hydra import compose, initialize_config_dir
from test_resume import assert_same_state, metrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgcls.cli import CONFIG_DIR
from imgcls.config import build as b
from imgcls.data.loaders import make_loader
from imgcls.models.torchvision import create_model
from imgcls.training.engine import Placement, train_one_epoch
from imgcls.training.losses import CrossEntropyLoss, FocalLoss
from imgcls.training.recipes import Recipe, WarmupCosineLR, build_mix, make_ema, scheduler_interval


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("recipes") / "tree", counts={"train": 6, "val": 3, "test": 2})


def train_a_step(tree: Path, *overrides: str) -> dict[str, float]:
    """Compose the train config with overrides, build everything as a run does, train 2 batches of 4
    (batches of 2 at 32 px leave EfficientNet's 1x1 maps normalized over two values: gradients of
    1e8 and, for about 3 initializations in 100, a NaN at the second step)."""
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(config_name="train", overrides=["data=imagefolder", f"data.root={tree}", "data.batch_size=4",
                                                      "data.num_workers=0", *overrides])  # fmt: skip
    config = b.plain(cfg)
    data = b.build_data(config["data"])
    record = data.scan()
    pipelines, normalize = b.build_transforms(config["transforms"])
    model = b.build_model(config["model"], num_classes=len(record.class_names))
    optimizer = b.build_optimizer(config["optimizer"], model)
    loader = make_loader(data, record, "train", pipelines["train"], train=True)
    scheduler = b.build_scheduler(config["scheduler"], optimizer, steps_per_epoch=len(loader))
    loss_fn = b.build_loss(config["loss"], class_counts=[6, 6, 6])
    trainer = config["trainer"]
    recipe = Recipe(
        grad_accum_steps=trainer["grad_accum_steps"], grad_clip_norm=trainer["grad_clip_norm"],
        mix=build_mix(trainer["mixup_alpha"], trainer["cutmix_alpha"], 3), ema=make_ema(model, trainer["ema_decay"]),
        step_scheduler=scheduler if scheduler_interval(scheduler) == "step" else None,
    )  # fmt: skip
    loader.sampler.n = 8  # two batches are enough to show the option trains
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    metrics = train_one_epoch(
        model, loader, loss_fn, optimizer, Placement(torch.device("cpu"), normalize), recipe=recipe
    )
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(x, y) for x, y in zip(before, after, strict=True)), "the weights moved"
    assert math.isfinite(metrics["train/loss"])
    return metrics


@pytest.mark.parametrize(
    "overrides",
    [
        *[
            [f"model={m}", "transforms=digits"]
            for m in [
                "resnet50",
                "mobilenet_v3_small",
                "mobilenet_v3_large",
                "efficientnet_b0",
                "convnext_tiny",
            ]
        ],
        # ViT-B (86M parameters) on a 32 px grid of 2x2 patches: its config builds and trains; the
        # 224 px step cost 10 s on 2 cores and tested nothing more (transforms=basic has its own row)
        pytest.param(["model=vit_b_16", "model.image_size=32", "transforms=digits"], marks=pytest.mark.slow),
        *[
            [f"scheduler={s}", "transforms=digits"]
            for s in ["multistep", "cosine", "onecycle", "plateau", "none"]
        ],
        ["loss=focal", "loss.class_weights=balanced", "transforms=digits"],
        ["loss.class_weights=[1.0,2.0,0.5]", "loss.label_smoothing=0.1", "transforms=digits"],
        *[[f"transforms={t}"] for t in ["basic", "randaugment", "trivialaugment", "autoaugment"]],
        ["transforms=digits", "trainer.mixup_alpha=0.2", "trainer.cutmix_alpha=1.0", "trainer.ema_decay=0.9"],
        ["transforms=digits", "trainer.grad_accum_steps=2", "trainer.grad_clip_norm=1.0", "optimizer=adamw"],
        ["transforms=digits", "model.freeze_backbone=true", "optimizer=adam"],
        ["experiment=digits_fast"],
    ],
    ids=lambda o: ",".join(o),
)
def test_every_recipe_option_trains_a_step(tree, overrides):
    train_a_step(tree, *overrides)


def test_accumulating_k_batches_equals_one_batch_k_times_larger():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def run(batch: int, k: int) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # no batch norm
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, Placement(torch.device("cpu"), nn.Identity()),
                        recipe=Recipe(grad_accum_steps=k))  # fmt: skip
        return [p.detach() for p in model.parameters()]

    for a, c in zip(run(4, 4), run(16, 1), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run(4, 1)[0], run(16, 1)[0]), "and differs from plain small batches"


def test_focal_loss_and_class_weights():
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    torch.testing.assert_close(
        FocalLoss(gamma=0.0)(logits, target), nn.functional.cross_entropy(logits, target)
    )
    assert FocalLoss(gamma=2.0)(logits, target) < nn.functional.cross_entropy(logits, target)
    weighted = CrossEntropyLoss(class_weights="balanced", class_counts=[10, 30, 60])
    torch.testing.assert_close(weighted.weight, torch.tensor([100 / 30, 100 / 90, 100 / 180]))
    soft = torch.softmax(torch.randn(8, 3), 1)  # mixup targets
    assert FocalLoss()(logits, soft).ndim == 0


def test_warmup_cosine_schedule_shape():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, epochs=4, steps_per_epoch=10, warmup_epochs=1, warmup_start_factor=0.1)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.01  # cosine decay
    assert "lr_lambdas" not in sched.state_dict()  # plain data: loads with weights_only=True


def test_local_pretrained_weights_and_frozen_backbone(tmp_path):
    source = create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = create_model(
        "resnet18", num_classes=3, weights=str(tmp_path / "resnet18.pth"), freeze_backbone=True
    )
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match="does not fit ResNet"):
        create_model("resnet34", num_classes=3, weights=str(tmp_path / "resnet18.pth"))


def test_pretrained_name_offline_says_where_to_put_the_file(tmp_path):
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(
            ValueError, match=r"cannot download https://download\.pytorch\.org/models/resnet18-"
        ) as err:
            create_model("resnet18", num_classes=3, weights="IMAGENET1K_V1")
        assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-") in str(err.value)
        with pytest.raises(ValueError, match="is not a weights name of resnet18"):
            create_model("resnet18", num_classes=3, weights="IMAGENET9K")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_early_stopping_stops_and_says_why(tree, tmp_path):
    # lr=0: the weights never move; the recalibrated BatchNorm statistics still differ a little
    # from epoch to epoch (other batches), hence a min_delta no such wobble reaches
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", "trainer.epochs=6", "optimizer.lr=0",
                 "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=0.5", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    summary = (run / "summary.txt").read_text()
    assert "status:         completed" in summary and "epoch:          3 of 6" in summary
    assert "note:           stopped early at epoch 3: validation accuracy has not improved" in summary
    assert len(metrics(run)) == 3


@pytest.mark.slow
def test_ema_and_top_k_checkpoints_appear_and_load(tree, tmp_path):
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", "trainer.epochs=3", "trainer.ema_decay=0.5",
                 "trainer.keep_top_k=2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    tops = sorted((run / "weights").glob("top-epoch*.pt"))
    assert len(tops) == 2
    rows = metrics(run)
    assert "val/acc_ema" in rows[0]
    score = {int(r["epoch"]): max(float(r["val/acc"]), float(r["val/acc_ema"])) for r in rows}
    for path in tops:
        state = torch.load(path, weights_only=True)
        assert path.name == f"top-epoch{state['epoch']:03d}-acc{score[state['epoch']]:.4f}.pt"
    assert sorted(score, key=lambda e: (-score[e], e))[:2] == sorted(
        (torch.load(p, weights_only=True)["epoch"] for p in tops), key=lambda e: (-score[e], e)
    )
    last = torch.load(run / "weights" / "last.pt", weights_only=True)
    best = torch.load(run / "weights" / "best.pt", weights_only=True)
    assert "n_averaged" in last["ema"] and best["best_source"] in ("ema", "raw")
    assert best["best_acc"] == max(score.values())


@pytest.mark.slow
def test_lr_find_writes_its_plot_and_suggestion(tree, tmp_path):
    result = cli_here("imgcls.lr_find", "data=imagefolder", f"data.root={tree}", "transforms=digits", "data.batch_size=4",
                 "data.num_workers=0", "lr_find.num_iter=30", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    assert "_lr_find_" in run.name
    assert (run / "lr_find.png").stat().st_size > 5000
    rows = (run / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss,smoothed_loss" and 3 <= len(rows) - 1 <= 30
    suggestion = (run / "suggestion.txt").read_text().strip()
    lr = float(suggestion.split("=")[1])
    assert 1e-7 <= lr <= 10 and f"use: python -m imgcls.train {suggestion}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        ["scheduler=multistep", "scheduler.milestones=[1]"],
        ["scheduler=cosine"],
        ["scheduler=onecycle", "trainer.ema_decay=0.9"],
        ["scheduler=plateau", "scheduler.patience=0"],
    ],
    ids=["multistep", "cosine", "onecycle+ema", "plateau"],
)
def test_resume_is_exact_with_each_scheduler_and_ema(tree, tmp_path, recipe):
    args = [*TINY, f"data.root={tree}", "deterministic=true", "trainer.log_every_n_steps=1", *recipe]
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()
    reference = cli_here("imgcls.train", *args, cwd=tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-2000:]
    # stopped in-process by a real SIGTERM (tests/test_resume.py pins the same in a real process)
    cut = cli_here("imgcls.train", *args, cwd=tmp_path / "cut", signal_at=("epoch 2/2 2/", signal.SIGTERM))
    assert cut.returncode == 143, cut.stderr[-2000:]
    (run,) = run_dirs(tmp_path / "cut")
    resumed = cli_here("imgcls.train", f"resume={run / 'weights' / 'last.pt'}", cwd=tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_state(run, run_dirs(tmp_path / "ref")[0])
    if "trainer.ema_decay=0.9" in recipe:
        a = torch.load(run / "weights" / "last.pt", weights_only=True)["ema"]
        c = torch.load(run_dirs(tmp_path / "ref")[0] / "weights" / "last.pt", weights_only=True)["ema"]
        assert all(torch.equal(a[k], c[k]) for k in a)
