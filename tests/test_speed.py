"""Speed options: each precision trains and checkpoints, fp16 overflow steps are skipped (not errors),
the loss scale survives a resume, compiled models save plain keys, persistent workers stay exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli, cli_here, make_tree, run_dirs
from torch import nn

from imgcls.cli import CONFIG_DIR
from imgcls.config import build as b
from imgcls.data import ImageFolderData, Normalize, make_loader
from imgcls.data.sampling import set_epoch
from imgcls.errors import ConfigError
from imgcls.training.engine import NonFiniteLossError, Placement, train_one_epoch
from imgcls.training.speed import (
    Precision,
    compile_model,
    resolve_channels_last,
    resolve_precision,
    uncompiled,
)

CPU = torch.device("cpu")


def test_auto_settings_per_device():
    assert resolve_precision("auto", CPU) == "fp32"  # bf16 autocast is slower than fp32 on CPUs without AMX
    assert resolve_channels_last("auto", CPU) is True
    assert resolve_channels_last(False, CPU) is False
    assert resolve_channels_last(True, torch.device("mps")) is False
    assert resolve_precision("BF16", CPU) == "bf16"
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8' is not one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ConfigError, match=r"trainer.channels_last='yes': use true, false or auto"):
        resolve_channels_last("yes", CPU)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_and_writes_a_loadable_checkpoint(tmp_path, tiny_tree, precision):
    args = [*TINY, f"data.root={tiny_tree}", "trainer.epochs=1", f"trainer.precision={precision}"]
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    summary = (run / "summary.txt").read_text()
    assert f"precision {precision}, channels_last True, compile False" in summary
    assert "s from process start to the first training step" in summary
    state = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert ("grad_scaler" in state) == (precision == "fp16")
    # fp32 weights whatever the autocast dtype: an uncompiled fp32 model loads them as they are
    model = b.build_model(state["config"]["model"], num_classes=3)
    model.load_state_dict(state["model"])
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def _tiny_step_setup(n_batches: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    batches = [
        (torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    ] * n_batches
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, batches, optimizer, Normalize([0.5] * 3, [0.25] * 3)


def test_fp16_overflow_steps_are_skipped_not_errors():
    model, batches, optimizer, normalize = _tiny_step_setup(n_batches=1)
    amp = Precision("fp16", CPU)
    # a scale of 2**100 overflows every fp16 gradient: the scaler must skip the step and halve it
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    weights = [p.detach().clone() for p in model.parameters()]
    metrics = train_one_epoch(
        model, batches, nn.functional.cross_entropy, optimizer, Placement(CPU, normalize, amp=amp)
    )
    assert metrics["train/loss"] > 0
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True)), "step skipped"
    assert amp.scaler.get_scale() == 2.0**99
    # a sane scale trains
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train_one_epoch(
        model, batches, nn.functional.cross_entropy, optimizer, Placement(CPU, normalize, amp=amp)
    )
    assert not all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))


def test_fp16_gradients_that_overflow_even_unscaled_are_divergence():
    model, batches, optimizer, normalize = _tiny_step_setup(n_batches=1)
    amp = Precision("fp16", CPU)
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=0.5)  # below MIN_FP16_SCALE: no more skipping
    model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteLossError, match="the gradient norm is inf at step 1"):
        train_one_epoch(
            model, batches, nn.functional.cross_entropy, optimizer, Placement(CPU, normalize, amp=amp)
        )


@pytest.mark.slow
def test_fp16_loss_scale_resumes_exactly(tmp_path):
    tree = make_tree(tmp_path / "tree", counts={"train": 8, "val": 4})
    args = [*TINY, f"data.root={tree}", "trainer.precision=fp16", "deterministic=true"]
    ref_cwd, cwd = tmp_path / "ref", tmp_path / "cut"
    ref_cwd.mkdir(), cwd.mkdir()
    assert cli_here("imgcls.train", *args, cwd=ref_cwd).returncode == 0
    first = cli_here("imgcls.train", *args, "trainer.epochs=1", cwd=cwd)
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = run_dirs(cwd)
    resumed = cli_here("imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=2", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (ref,) = run_dirs(ref_cwd)
    a = torch.load(ref / "weights" / "last.pt", weights_only=True)
    c = torch.load(run / "weights" / "last.pt", weights_only=True)
    # steps overflowed and were skipped (the scale fell from 2**16), and the run went on; a resume
    # with a fresh scaler would start again at 2**16 and skip different steps
    assert a["grad_scaler"]["scale"] < 2.0**16
    assert a["grad_scaler"] == c["grad_scaler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], c["model"][k]), k


def test_compiled_training_model_shares_weights_and_saves_plain_keys():
    # torch.compile wraps lazily (nothing compiles until the first call): this runs in milliseconds
    model = nn.Sequential(nn.Linear(3, 2))
    compiled = compile_model(model, True)
    assert compiled is not model and uncompiled(compiled) is model
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(uncompiled(compiled).state_dict()) == ["0.weight", "0.bias"]
    assert compile_model(model, False) is model


def test_persistent_workers_see_each_epoch(tmp_path):
    """A persistent worker keeps the copy of the dataset it was given at the first epoch: the epoch
    must reach it with each index, or epoch 2 would repeat epoch 1's augmentation."""
    from omegaconf import OmegaConf

    from imgcls.config.build import build_transforms, plain

    tree = make_tree(tmp_path / "tree", counts={"train": 4, "val": 2})
    transforms = plain(OmegaConf.load(Path(CONFIG_DIR) / "transforms" / "digits.yaml"))
    transforms["test"] = transforms["val"]
    pipelines, _ = build_transforms(transforms)
    epochs = {}
    for workers in (0, 2):
        data = ImageFolderData(str(tree), {"train": "train", "val": "val"}, batch_size=4, num_workers=workers)
        loader = make_loader(data, data.scan(), "train", pipelines["train"], train=True, seed=3)
        assert loader.persistent_workers == (workers > 0)
        epochs[workers] = []
        for epoch in (1, 2):
            set_epoch(loader, epoch)
            epochs[workers].append(torch.cat([x for x, _ in loader]))
    assert not torch.equal(epochs[0][0], epochs[0][1])
    for a, c in zip(epochs[0], epochs[2], strict=True):
        assert torch.equal(a, c)


def test_help_does_not_import_torch():
    """`--help` and `--cfg job` answer without importing torch (seconds on a cold cache)."""
    code = "import sys, imgcls.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_compile_trains_end_to_end_and_checkpoints_load_uncompiled(tmp_path, tiny_tree):
    # nearly all of it Inductor compiling the forward and backward: ResNet18's 13 s (idle 2-core VM),
    # TINY's ShuffleNetV2, a deeper graph, 65 s
    args = [
        *TINY,
        f"data.root={tiny_tree}",
        "trainer.epochs=1",
        "trainer.compile=true",
        "model.name=resnet18",
    ]
    result = cli("imgcls.train", *args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    assert "compile True" in (run / "summary.txt").read_text()
    for name in ("last.pt", "best.pt"):
        state = torch.load(run / "weights" / name, weights_only=True)
        assert not [k for k in state["model"] if "_orig_mod" in k]
        b.build_model(state["config"]["model"], num_classes=3).load_state_dict(state["model"])


def test_a_bad_precision_stops_before_training(tmp_path, tiny_tree):
    result = cli_here("imgcls.train", *TINY, f"data.root={tiny_tree}", "trainer.precision=fp8", cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.precision='fp8' is not one of auto, fp32, bf16, fp16" in result.stderr
    (run,) = run_dirs(tmp_path)
    assert "status:         failed" in (run / "summary.txt").read_text()
    assert not (run / "weights").exists()
