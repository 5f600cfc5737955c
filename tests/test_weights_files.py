"""model.weights and checkpoints that torch.load(weights_only=True) refuses or cannot read: an
error naming the file and what to do, never a traceback or torch's advice to unpickle anyway."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY, cli_here, run_dirs

from imgcls.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from imgcls.config.build import build_model
from imgcls.errors import ConfigError

RESNET18 = {"_target_": "imgcls.models.torchvision.create_model", "_partial_": True, "name": "resnet18"}
# what torch's own message says, and must never reach the user: both would run the file's code
ADVICE = ("weights_only=False", "`weights_only` set to `False`", "safe_globals", "trusted source")


class Pickled:
    """A class of this module: torch.save pickles it by reference, torch.load(weights_only=True) refuses it."""

    def __init__(self):
        self.weights = torch.zeros(2)


class Runs:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "custom object":
        torch.save({"model": Pickled()}, path)
    elif kind == "text":
        path.write_text("abc")  # torch.load: IndexError: pop from empty list
    elif kind == "other text":
        path.write_text("hello this is text\n")  # torch.load: KeyError: 101
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated zip":
        torch.save(torchvision.models.resnet18().state_dict(), path)
        path.write_bytes(path.read_bytes()[:100_000])
    elif kind == "another architecture":
        torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), path)
    elif kind == "a tensor":
        torch.save(torch.zeros(3), path)
    return path


CASES = {
    "custom object": "the file holds more than tensors and plain values (it names test_weights_files.Pickled), "
    "and imgcls loads only weights-only files. Re-save the weights alone: torch.save(model.state_dict(), path).",
    "text": "not a PyTorch weights file (IndexError: pop from empty list). Give a file written by "
    "torch.save(model.state_dict(), path) or an imgcls checkpoint.",
    "other text": "not a PyTorch weights file (KeyError: 101).",
    "empty": "not a PyTorch weights file (the file is empty).",
    "truncated zip": "not a PyTorch weights file (RuntimeError: PytorchStreamReader failed reading zip archive",
    "another architecture": "does not fit ResNet: ",
    "a tensor": "holds a Tensor, not a state dict",
}


@pytest.mark.parametrize("kind", list(CASES))
def test_model_weights_that_cannot_load_name_the_file(tmp_path: Path, kind):
    path = write(kind, tmp_path)
    with pytest.raises(ConfigError) as info:
        build_model({**RESNET18, "weights": str(path)}, num_classes=3)
    message = str(info.value)
    assert message.startswith(f"model.weights={path}: {CASES[kind]}"), message
    assert not any(advice in message for advice in ADVICE)


def test_model_weights_that_would_run_code_run_nothing(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Runs(marker)}, path)
    with pytest.raises(
        ConfigError, match=r"holds more than tensors and plain values \(it names posix.system\)"
    ):
        build_model({**RESNET18, "weights": str(path)}, num_classes=3)
    assert not marker.exists()


def test_model_weights_of_the_same_architecture_still_load(tmp_path: Path):
    source = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = build_model({**RESNET18, "weights": str(path)}, num_classes=3)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3  # the head stays fresh


def test_a_checkpoint_holding_objects_is_refused_without_torchs_advice(tmp_path: Path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "extra": Pickled()}, path)  # a valid zip: its CRCs pass
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(
        f"checkpoint {path} holds more than tensors and plain values (it names test_weights_files.Pickled); "
        "refusing to load it (weights_only=True): imgcls loads only weights-only files."
    )
    assert not any(advice in message for advice in ADVICE)


def test_train_with_weights_that_are_not_weights_only_exits_2(tmp_path: Path, tiny_tree: Path):
    path = write("custom object", tmp_path)
    result = cli_here(
        "imgcls.train", *TINY, f"data.root={tiny_tree}", f"model.weights={path}", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: model.weights={path}: the file holds more than tensors and plain values" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(advice in result.stderr for advice in ADVICE)
    (run,) = run_dirs(tmp_path)
    assert not (run / "weights").exists()
