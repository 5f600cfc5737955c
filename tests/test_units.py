"""Unit tests: run naming, checkpoints, models, data scanning, seeding, the digits writer."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tree

from imgcls.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from imgcls.config.naming import run_label, unique_dir
from imgcls.data import DataError, ImageFolderData, make_dataset
from imgcls.data.digits import MARKER, DigitsData, split_indices
from imgcls.models.torchvision import create_model, replace_head
from imgcls.training.seeding import rng_state, seed_everything, set_rng_state


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ("", "base"),
        ("data.batch_size=16,optimizer.lr=0.01,trainer.epochs=25", "batch_size-16_epochs-25_lr-0.01"),
        ("data.root=/a/b/hymenoptera_data/,data=hymenoptera", "data-hymenoptera_root-hymenoptera_data"),
        ("model.name=resnet50,transforms.train=[a,b]", "name-resnet50_train--a-b"),
        ("+trainer.foo=1,hydra.verbose=true", "foo-1"),
    ],
)
def test_run_label_is_readable_and_one_folder(overrides: str, label: str):
    assert run_label(overrides) == label
    assert "/" not in run_label(overrides)


def test_unique_dir_never_hands_out_a_taken_folder(tmp_path: Path):
    first = unique_dir(str(tmp_path / "06-00-00_base"))
    assert unique_dir(str(tmp_path / "06-00-00_base")) == first  # same process: same answer
    assert not any(tmp_path.iterdir())  # a resolver only computes the name
    (tmp_path / "06-00-01_x").mkdir()
    assert unique_dir(str(tmp_path / "06-00-01_x")) == str(tmp_path / "06-00-01_x_2")


def test_a_named_folder_taken_since_moves_the_run_on_to_the_next_name(tmp_path: Path):
    from imgcls.config.naming import CLAIM_FILE, RunDirTaken, claim_new_run_dir

    name = unique_dir(str(tmp_path / "06-00-02_base"))
    Path(name).mkdir()  # a run started the same second with the same overrides claimed it first
    claimed = claim_new_run_dir(Path(name))
    assert claimed == tmp_path / "06-00-02_base_2" and (claimed / CLAIM_FILE).is_file()
    assert unique_dir(str(tmp_path / "06-00-02_base")) == str(claimed)  # Hydra resolving it again
    # a folder the user named (hydra.run.dir=) is that folder or none
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirTaken):
        claim_new_run_dir(tmp_path / "mine")


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path: Path):
    path = tmp_path / "w" / "last.pt"
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "history": [{"val/acc": 0.5}], "rng": rng_state()}
    save_checkpoint(state, path)
    save_checkpoint({**state, "epoch": 3}, path)
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temp files
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(3.0))


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path: Path):
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"model": {}, "payload": evil}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_checkpoint(path)
    assert not evil.marker.exists()


def test_missing_checkpoint_names_what_exists(tmp_path: Path):
    save_checkpoint({"model": {}}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt does not exist\. Found: best\.pt"):
        load_checkpoint(tmp_path / "last.pt")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_any_torchvision_classifier_gets_a_head_sized_to_the_data(name: str):
    model = create_model(name, num_classes=5).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    replace_head(model, 7)  # what pretrained weights get: the ImageNet head swapped
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"not a torchvision classifier\. Choose one of: .*resnet18"):
        create_model("fasterrcnn_resnet50_fpn", num_classes=3)


def test_scan_uses_train_classes_by_name_and_skips_hidden_and_odd_files(tmp_path: Path):
    tree = make_tree(tmp_path / "t", counts={"train": 2, "val": 1})
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (tree / "train" / "cat" / "notes.txt").write_text("not an image")
    data = ImageFolderData(
        str(tree), {"train": "train", "val": "val", "test": "test"}, batch_size=2, extensions=[".jpg"]
    )
    record = data.scan()
    assert record.class_names == ("cat", "dog", "fox")
    assert record.splits == ["train", "val"]
    assert [Path(f).name for f in record.skipped["train"]] == ["notes.txt"]
    assert {(Path(p).parent.name, t) for p, t in record.samples["val"]} == {
        ("cat", 0),
        ("dog", 1),
        ("fox", 2),
    }
    image, target = make_dataset(data, record, "val")[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 20) and target == 0


def test_problems_are_listed_together(tmp_path: Path):
    tree = make_tree(tmp_path / "t", counts={"train": 2, "val": 1})
    (tree / "val" / "owl").mkdir()
    for f in (tree / "train" / "dog").iterdir():
        f.unlink()
    data = ImageFolderData(str(tree), {"train": "train", "val": "val"}, batch_size=2, extensions=[".jpg"])
    with pytest.raises(DataError) as err:
        data.scan()
    assert "train/dog: no image files" in str(err.value)
    assert "class folder(s) not in train: owl" in str(err.value)


def test_rng_state_round_trips_through_weights_only(tmp_path: Path):
    seed_everything(5)
    save_checkpoint({"model": {}, "rng": rng_state()}, tmp_path / "c.pt")
    expected = (np.random.rand(), torch.rand(1).item())
    seed_everything(99)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (np.random.rand(), torch.rand(1).item()) == expected


def test_digits_split_is_fixed_and_stratified():
    targets = np.repeat(np.arange(10), 180)
    a, b = split_indices(targets), split_indices(targets)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert {s: len(v) for s, v in a.items()} == {"train": 1260, "val": 270, "test": 270}
    assert set(np.bincount(targets[a["val"]])) == {27}
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])


def test_digits_refuses_a_folder_it_did_not_write(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    data = DigitsData(str(tmp_path / "mine"), {"train": "train", "val": "val"}, batch_size=8)
    with pytest.raises(DataError, match="was not written by imgcls"):
        data.prepare()
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "mine" / MARKER).exists()


def test_a_stopped_run_holds_its_signal_handler_until_it_has_said_how_it_ended():
    """A second, impatient signal while a stopped run writes its summary is logged, never fatal;
    release_signals() (train.run's last step) puts the handlers from before the run back."""
    import signal

    from imgcls.training.signals import release_signals, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        pass
    assert signal.getsignal(signal.SIGTERM) is before, "a run that was not stopped restores at once"
    try:
        with stop_on_signals() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested() == signal.SIGTERM
        held = signal.getsignal(signal.SIGTERM)
        assert held is not before and held is not signal.SIG_DFL
        signal.raise_signal(signal.SIGTERM)  # the impatient second one: handled, the test goes on
        assert stop.requested() == signal.SIGTERM
    finally:
        release_signals()
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is not held
