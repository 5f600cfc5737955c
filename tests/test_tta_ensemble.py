"""Test-time augmentation and ensembles in `python -m imgcls.evaluate`: the numbers move the way
they must on fixed cases, and every per-sample output stays with its image."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, cli_here, run_dirs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgcls.evaluation.inference import augmented_views, predict
from imgcls.training.engine import Placement


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class LeftHalf(nn.Module):
    """Class 1 ("spot") when the left half of the image is bright: blind to a spot on the right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(left), 20 * (left - 0.25)], dim=1)


def spot_images() -> tuple[torch.Tensor, torch.Tensor]:
    """8 images: 0-3 plain (class 0), 4-5 a bright left half, 6-7 a bright right half (class 1)."""
    x = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    x[4:6, :, :, :2] = 255
    x[6:8, :, :, 2:] = 255
    return x, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def run_predict(views):
    x, y = spot_images()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # batches that split the classes
    scale = nn.Identity()
    scale.forward = lambda t: t.float() / 255  # the Normalize of a mean 0, std 1 config
    place = Placement(torch.device("cpu"), scale)
    return predict(LeftHalf(), loader, place, loss_fn=nn.CrossEntropyLoss(), views=views)


def test_flip_tta_fixes_a_left_right_blind_spot_and_keeps_samples_aligned():
    plain, tta = run_predict([]), run_predict(["hflip"])
    assert plain.correct.tolist() == [True] * 6 + [False] * 2  # the right-half spots are missed
    assert tta.correct.all()  # their mirror images show the spot on the left
    np.testing.assert_array_equal(tta.plain.logits, plain.logits)  # `without TTA` is the plain pass
    # each sample's TTA probability is the mean of its own two views, in loader order
    x, _ = spot_images()
    views = augmented_views(x.float() / 255, ["hflip"], 1.15)
    expected = torch.stack([LeftHalf()(v).softmax(1) for v in views]).mean(0).double().numpy()
    np.testing.assert_allclose(tta.probs, expected, atol=1e-6)
    # the mean loss of averaged probabilities is at most the mean of the views' losses (convexity)
    view_losses = [
        nn.functional.cross_entropy(LeftHalf()(v), torch.tensor([0] * 4 + [1] * 4)).item() for v in views
    ]
    assert tta.losses.mean() <= np.mean(view_losses) + 1e-9


def test_crop_views_are_the_four_corners_and_the_center_at_the_input_size():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    views = augmented_views(x, ["crops", "vflip"], 1.25)
    assert len(views) == 1 + 5 + 1 and all(v.shape == x.shape for v in views)
    big = nn.functional.interpolate(x, size=(10, 10), mode="bilinear", align_corners=False)
    assert torch.equal(views[1], big[..., :8, :8]) and torch.equal(views[4], big[..., 2:, 2:])
    assert torch.equal(views[5], big[..., 1:9, 1:9]) and torch.equal(views[6], x.flip(-2))


@pytest.fixture(scope="module")
def two_runs(trained_run: Path, tmp_path_factory) -> list[Path]:
    """The shared tiny run and a second one with another seed, side by side in one folder."""
    cwd = tmp_path_factory.mktemp("ensemble")
    root = yaml.safe_load((trained_run / "config.yaml").read_text())["data"]["root"]
    result = cli_here("imgcls.train", *TINY, f"data.root={root}", "optimizer.lr=0.01", "seed=3", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (second,) = run_dirs(cwd)
    first = second.parent / trained_run.name
    shutil.copytree(
        trained_run, first, copy_function=os.link, ignore=shutil.ignore_patterns("eval", "predict")
    )
    return [first, second]


def evaluate(*args: str, cwd: Path) -> Path:
    result = cli_here("imgcls.evaluate", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_ensemble_averages_its_members_sample_by_sample(two_runs: list[Path], tmp_path: Path):
    a, b = two_runs
    for run in two_runs:
        evaluate(f"run_dir={run}", cwd=tmp_path)
    result = evaluate(f"run_dirs=[{a},{b}]", cwd=tmp_path)
    out = a.parent / "ensemble" / "test-best"
    assert out.is_dir() and "ensemble members" in result.stdout
    members = [
        {r["path"]: r for r in read_csv(run / "eval" / "test-best" / "predictions.csv")} for run in two_runs
    ]
    rows = read_csv(out / "predictions.csv")
    assert [r["path"] for r in rows] == list(members[0]) and len(rows) == 12
    for row in rows:
        for c in ("cat", "dog", "fox"):  # 3 classes, top_k 5: every class's probability is in the row
            mean = np.mean([float(next(m[row["path"]][f"top{j}_prob"] for j in (1, 2, 3) if m[row["path"]][f"top{j}"] == c))
                            for m in members])  # fmt: skip
            got = float(next(row[f"top{j}_prob"] for j in (1, 2, 3) if row[f"top{j}"] == c))
            assert abs(got - mean) < 1e-5
    metrics = json.loads((out / "metrics.json").read_text())
    own = [json.loads((run / "eval" / "test-best" / "metrics.json").read_text()) for run in two_runs]
    assert [m["acc"] for m in metrics["members"]] == [o["test/acc"] for o in own]
    assert [m["loss"] for m in metrics["members"]] == pytest.approx([o["test/loss"] for o in own], rel=1e-9)
    # the log loss of averaged probabilities is at most the members' mean (convexity): never worse
    assert metrics["test/loss"] <= np.mean([o["test/loss"] for o in own]) + 1e-9
    assert read_csv(out / "members.csv")[-1]["run_dir"] == "ensemble"


@pytest.mark.slow
def test_ensemble_of_runs_with_other_classes_is_refused(two_runs: list[Path], tmp_path: Path):
    """A run trained on cat, dog, wolf (its own tree has those folders) next to one on cat, dog, fox."""
    a, b = two_runs
    other = tmp_path / "other"
    shutil.copytree(b, other, ignore=shutil.ignore_patterns("eval", "predict", "tensorboard"))
    config = yaml.safe_load((other / "config.yaml").read_text())
    tree = shutil.copytree(config["data"]["root"], tmp_path / "wolves")
    for split in ("train", "val", "test"):
        (tree / split / "fox").rename(tree / split / "wolf")
    config["data"]["root"] = str(tree)
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    state = torch.load(other / "weights" / "best.pt", weights_only=True)
    state["class_names"] = ["cat", "dog", "wolf"]
    torch.save(state, other / "weights" / "best.pt")
    result = cli_here("imgcls.evaluate", f"run_dirs=[{a},{other}]", cwd=tmp_path)
    assert result.returncode == 2 and "an ensemble needs runs trained on the same classes" in result.stderr
    result = cli_here("imgcls.evaluate", f"run_dirs=[{a}]", cwd=tmp_path)
    assert result.returncode == 2 and "an ensemble needs a list of at least two runs" in result.stderr


@pytest.mark.slow
def test_tta_evaluation_reports_itself_and_the_numbers_without_it(trained_run: Path, tmp_path: Path):
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run, copy_function=os.link, ignore=shutil.ignore_patterns("eval", "predict"))
    evaluate(f"run_dir={run}", cwd=tmp_path)
    result = evaluate(f"run_dir={run}", "tta=true", "tta_views=[hflip,crops]", cwd=tmp_path)
    assert "without TTA" in result.stdout
    plain = json.loads((run / "eval" / "test-best" / "metrics.json").read_text())
    tta = json.loads((run / "eval" / "test-best_tta" / "metrics.json").read_text())
    assert tta["tta"]["views"] == ["identity", "hflip", "crops"]
    without = tta["tta"]["without_tta"]
    assert without["test/acc"] == plain["test/acc"] and without["test/loss"] == pytest.approx(
        plain["test/loss"]
    )
    rows = read_csv(run / "eval" / "test-best_tta" / "predictions.csv")
    assert [r["path"] for r in rows] == [
        r["path"] for r in read_csv(run / "eval" / "test-best" / "predictions.csv")
    ]
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "tta=true", "tta_views=[rotate]", cwd=tmp_path)
    assert (
        result.returncode == 2
        and "tta_views: rotate unknown; choose from hflip, vflip, crops" in result.stderr
    )
