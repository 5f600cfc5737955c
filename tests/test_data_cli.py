"""`python -m imgcls.data check` and training on real-world odd trees, as a user runs them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, cli, cli_here, make_tree, run_dirs
from hydra import compose, initialize_config_dir
from PIL import Image
from test_data_check import BAD, add_messy_files

from imgcls.config.build import build_data

ONE_EPOCH = [a for a in TINY if not a.startswith("trainer.epochs=")] + ["trainer.epochs=1"]


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "messy", size=(40, 40))
    add_messy_files(root)
    return root


def summary_value(run: Path, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}:\s*(.+)$", (run / "summary.txt").read_text(), re.M)
    assert match, f"{key} not in summary.txt"
    return match.group(1).strip()


@pytest.mark.parametrize("option", ["digits", "hymenoptera", "imagefolder"])
def test_check_config_composes_and_builds_every_data_option(option):
    with initialize_config_dir(str(REPO / "conf")):
        cfg = compose("check", [f"data={option}", "data.root=somewhere"])
    data = build_data(cfg.data)
    assert data.on_bad_image == "error" and data.max_pixels == 89_478_485 and data.val_fraction is None
    assert ".gif" in data.extensions
    if option == "hymenoptera":
        assert data.exclude == ("train/ants/imageNotFound.gif",)
        assert data.download["url"] == "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


@pytest.mark.slow
def test_check_lists_every_bad_file_and_exits_2(tmp_path: Path, messy: Path):
    args = ["check", "data=imagefolder", f"data.root={messy}", "data.max_image_pixels=5000"]
    result = cli("imgcls.data", *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        f"error: 1 problem(s) in {messy} (listed above); training would stop before it starts"
        in result.stderr
    )
    assert "errors (1):\n  - 4 file(s) cannot be used (set data.on_bad_image=skip" in result.stdout
    for name, reason in BAD.items():
        assert re.search(rf"^    train/cat/{re.escape(name)}: .*{re.escape(reason)}", result.stdout, re.M), (
            name
        )
    # the report still shows what the check found
    assert "train (train/): 29 images in 3 classes: cat 13, dog 8, fox 8" in result.stdout
    assert "val (val/): 12 images in 3 classes: cat 4, dog 4, fox 4" in result.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def test_check_in_skip_mode_passes_with_warnings_and_caches(tmp_path: Path, messy: Path):
    args = [
        "check",
        "data=imagefolder",
        f"data.root={messy}",
        "data.max_image_pixels=5000",
        "data.on_bad_image=skip",
    ]
    first = cli_here("imgcls.data", *args, cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "train (train/): 29 images in 3 classes: cat 13, dog 8, fox 8" in first.stdout
    assert "skipped 4 unreadable file(s) (data.on_bad_image=skip): train/cat/" in first.stdout
    assert "ok: no errors" in first.stdout
    second = cli_here("imgcls.data", *args, cwd=tmp_path, timeout=120)
    assert "(0 decoded, 57 from cache)" in second.stdout


def test_check_without_its_verb_or_root_says_what_is_missing(tmp_path: Path):
    result = cli_here("imgcls.data", "data.root=x", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "usage: python -m imgcls.data check" in result.stderr
    result = cli_here("imgcls.data", "check", "data=imagefolder", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: data.root is required: set it on the command line, data.root=..." in result.stderr
    result = cli_here("imgcls.data", "check", "--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    assert "python -m imgcls.data check is powered by Hydra" in result.stdout
    assert "data: digits, hymenoptera, imagefolder" in result.stdout


def test_training_stops_before_the_model_on_bad_files(tmp_path: Path, messy: Path):
    result = cli_here("imgcls.train", *TINY, f"data.root={messy}", "data.max_image_pixels=5000", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "4 file(s) cannot be used (set data.on_bad_image=skip to leave them out)" in result.stderr
    assert all(f"train/cat/{name}" in result.stderr for name in BAD)
    (run,) = run_dirs(tmp_path)
    assert "status:         failed" in (run / "summary.txt").read_text()
    assert not (run / "weights").exists()


@pytest.mark.slow
def test_training_in_skip_mode_completes_and_records_the_skips(tmp_path: Path, messy: Path):
    args = [*ONE_EPOCH, f"data.root={messy}", "data.max_image_pixels=5000", "data.on_bad_image=skip"]
    check = cli_here("imgcls.data", "check", *args[:1], *args[-3:], cwd=tmp_path, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    line = summary_value(run, "data check")
    # the check run just before warmed the cache: training did not decode anything again
    assert line.startswith("57 files (0 decoded, 57 from cache)")
    assert "skipped 4 unreadable file(s) (data.on_bad_image=skip)" in line
    assert "train 29, val 12, test 12 images" in summary_value(run, "data")
    assert "skipped 4 unreadable file(s)" in (run / "logs" / "train.log").read_text()
    state = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert state["data_fingerprint"]["splits"]["train"]["files"] == 29
    assert state["data_split"] is None and not (run / "data_split.json").exists()


@pytest.mark.slow
def test_val_fraction_split_is_recorded_in_the_run_and_checkpoint(tmp_path: Path):
    tree = make_tree(tmp_path / "t", counts={"train": 10, "test": 2})
    result = cli_here("imgcls.train", *ONE_EPOCH, f"data.root={tree}", "data.val_fraction=0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    split = json.loads((run / "data_split.json").read_text())
    assert len(split["val"]) == 6 and len(split["train"]) == 24
    assert split["val_fraction"] == 0.2 and split["split_seed"] == 0
    assert "train 24, val 6, test 6 images" in summary_value(run, "data")
    state = torch.load(run / "weights" / "best.pt", weights_only=True)
    assert state["data_split"] == split
    assert set(state["data_fingerprint"]["splits"]) == {"train", "val", "test"}


@pytest.mark.slow
def test_resume_keeps_the_carved_split_and_warns_about_changed_data(tmp_path: Path):
    tree = make_tree(tmp_path / "t", counts={"train": 10})
    args = [*ONE_EPOCH, f"data.root={tree}", "data.val_fraction=0.2"]
    assert cli_here("imgcls.train", *args, cwd=tmp_path).returncode == 0
    (run,) = run_dirs(tmp_path)
    split = json.loads((run / "data_split.json").read_text())
    # a new image arrives: a fresh carve might move it into val; the resumed run must not
    shutil.copy(tree / "train" / "cat" / "cat_000.jpg", tree / "train" / "cat" / "new.jpg")
    # and one is edited in place: same name, other pixels
    Image.new("RGB", (20, 16), (250, 0, 0)).save(tree / "train" / "cat" / "cat_001.jpg")
    result = cli_here(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "the data changed since the checkpoint: train: changed since the checkpoint (24 -> 24 files"
        in result.stderr
    )
    assert "1 file(s) in train are not in the checkpoint's data_split: left out" in result.stderr
    state = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["data_split"] == split
    assert json.loads((run / "data_split.json").read_text()) == split
