"""End-to-end: `python -m imgcls.evaluate` and `python -m imgcls.predict` on a tiny finished run."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, cli_here, make_tree
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EVAL_FILES = [
    "predictions.csv",
    "classification_report.txt",
    "classification_report.json",
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "metrics.json",
    "reliability_diagram.png",
    "most_confident_errors.png",
    "inference.log",
    "config.yaml",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def training_history(run: Path) -> list[dict[str, float]]:
    return read_csv(run / "metrics.csv")


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a run (checkpoints hard-linked: they are only read)."""
    shutil.copytree(run, dest, copy_function=os.link, ignore=shutil.ignore_patterns("eval", "predict"))
    return dest


@pytest.fixture(scope="session")
def run_copy(trained_run: Path, tmp_path_factory) -> Path:
    """The shared tiny run, copied: evaluations write into the run directory."""
    return copy_run(trained_run, tmp_path_factory.mktemp("eval") / trained_run.name)


@pytest.fixture(scope="session")
def evaluated(trained_run: Path, tmp_path_factory):
    """One default evaluation (best checkpoint, test split), read by several tests, in a copy of
    its own: the other tests' evaluations write into run_copy in whatever order xdist runs them."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("evaluated") / trained_run.name)
    result = cli_here("imgcls.evaluate", f"run_dir={run}", cwd=run.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "eval" / "test-best", result


def test_evaluation_folder_holds_every_file(evaluated):
    out, _ = evaluated
    run = out.parents[1]
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["test-best"]
    # nothing outside the run: no outputs/<date>/ or .hydra/ in the working directory
    assert [p.name for p in run.parent.iterdir()] == [run.name]
    for name in EVAL_FILES:
        assert (out / name).is_file(), name
    for name in [
        "confusion_matrix",
        "confusion_matrix_normalized",
        "reliability_diagram",
        "most_confident_errors",
    ]:
        assert (out / f"{name}.png").stat().st_size > 5000, name
    log = (out / "inference.log").read_text()
    assert "weights/best.pt (epoch" in log and "per class" in log and "results in" in log
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["evaluate"]["split"] == "test" and saved["run"]["optimizer"]["lr"] == 0.01


def test_predictions_csv_has_one_row_per_sample(evaluated, trained_run: Path):
    out, _ = evaluated
    rows = read_csv(out / "predictions.csv")
    header = ["path", "true", "predicted", "confidence", "correct", "loss"]
    header += [f"top{j}{s}" for j in (1, 2, 3) for s in ("", "_prob")]  # top_k=5 capped at 3 classes
    assert list(rows[0]) == header
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    tree = Path(config["data"]["root"]) / "test"
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in tree.glob("*/*.jpg"))
    for r in rows:
        assert r["true"] == Path(r["path"]).parent.name  # labelled by its folder's name
        assert r["predicted"] == r["top1"] and r["confidence"] == r["top1_prob"]
        assert int(r["correct"]) == (r["true"] == r["predicted"])
        probs = {r[f"top{j}"]: float(r[f"top{j}_prob"]) for j in (1, 2, 3)}
        assert sorted(probs) == ["cat", "dog", "fox"] and sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert list(probs.values()) == sorted(probs.values(), reverse=True)
        # cross entropy (no label smoothing) of one sample: -log p(true class); the CSV keeps 6
        # significant digits, so a probability that rounds to 0 only bounds the loss
        if probs[r["true"]] > 1e-30:
            assert float(r["loss"]) == pytest.approx(-math.log(probs[r["true"]]), rel=1e-4, abs=1e-4)
        else:
            assert float(r["loss"]) > 60


def test_metrics_json_agrees_with_the_predictions(evaluated, run_copy: Path):
    out, _ = evaluated
    rows = read_csv(out / "predictions.csv")
    metrics = read_json(out / "metrics.json")
    best = torch.load(run_copy / "weights" / "best.pt", weights_only=True)
    correct = np.array([int(r["correct"]) for r in rows])
    conf = np.array([float(r["confidence"]) for r in rows])
    assert metrics["test/acc"] == correct.mean()
    assert metrics["test/acc_top3"] == 1.0 and metrics["top_k"] == 3
    assert metrics["test/samples"] == 12 and metrics["epoch"] == best["epoch"]
    assert metrics["test/loss"] == pytest.approx(np.mean([float(r["loss"]) for r in rows]), rel=1e-5)
    # ECE recomputed here, bin by bin, from the CSV's confidences
    edges = np.linspace(0, 1, metrics["calibration_bins"] + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert metrics["test/ece"] == pytest.approx(ece, abs=1e-5)


def test_classification_reports_text_and_json(evaluated):
    out, _ = evaluated
    rows = read_csv(out / "predictions.csv")
    text = (out / "classification_report.txt").read_text()
    acc = np.mean([int(r["correct"]) for r in rows])
    assert re.search(r"accuracy\s+(\d\.\d{4})\s+12\n", text).group(1) == f"{acc:.4f}"
    report = read_json(out / "classification_report.json")
    assert list(report["classes"]) == ["cat", "dog", "fox"]
    for name, scores in report["classes"].items():
        predicted = [r for r in rows if r["predicted"] == name]
        true = [r for r in rows if r["true"] == name]
        hits = sum(r["true"] == name for r in predicted)
        assert scores["support"] == len(true) == 4
        assert scores["recall"] == pytest.approx(hits / 4)
        assert scores["precision"] == pytest.approx(hits / len(predicted) if predicted else 0)
        assert re.search(
            rf"^\s+{name}\s+{scores['precision']:.4f}\s+{scores['recall']:.4f}\s+{scores['f1']:.4f}\s+4$",
            text,
            re.M,
        )
    for average in ("macro avg", "weighted avg"):
        assert set(report[average]) == {"precision", "recall", "f1", "support"}
        assert report[average]["support"] == 12
    assert report["macro avg"]["recall"] == pytest.approx(
        np.mean([s["recall"] for s in report["classes"].values()])
    )


def test_console_shows_metrics_classes_and_confusions(evaluated):
    out, result = evaluated
    rows = read_csv(out / "predictions.csv")
    for line in [
        "evaluation",
        "per class",
        "most confused pairs",
        "top-3 accuracy",
        "ECE (15 bins)",
        "macro avg",
    ]:
        assert line in result.stdout, line
    wrong = {}
    for r in rows:
        if r["true"] != r["predicted"]:
            wrong[(r["true"], r["predicted"])] = wrong.get((r["true"], r["predicted"]), 0) + 1
    for (true, predicted), count in wrong.items():
        assert re.search(rf"{true}\s+{predicted}\s+{count}\s+{100 * count / 4:.1f}%", result.stdout)
    assert "Traceback" not in result.stderr


def test_tensorboard_holds_the_evaluation(evaluated, run_copy: Path):
    out, _ = evaluated
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    epoch = read_json(out / "metrics.json")["epoch"]
    metrics = read_json(out / "metrics.json")
    for tag in ["test/acc", "test/acc_top3", "test/loss", "test/ece"]:
        (event,) = acc.Scalars(tag)
        assert event.step == epoch and event.value == pytest.approx(metrics[tag], rel=1e-6)
    images = set(acc.Tags()["images"])
    for name in [
        "confusion_matrix",
        "confusion_matrix_normalized",
        "reliability_diagram",
        "most_confident_errors",
    ]:
        assert f"{name}/test" in images
    assert "classification_report/test/text_summary" in acc.Tags()["tensors"]


def test_val_accuracy_of_the_best_checkpoint_equals_training(run_copy: Path):
    result = cli_here("imgcls.evaluate", f"run_dir={run_copy}", "split=val", cwd=run_copy.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(run_copy / "eval" / "val-best" / "metrics.json")
    best = torch.load(run_copy / "weights" / "best.pt", weights_only=True)
    recorded = training_history(run_copy)[best["best_epoch"] - 1]
    assert metrics["val/acc"] == best["best_acc"] == float(recorded["val/acc"])  # exactly
    # the loss too, to float32 rounding (training averages each batch, here each sample has its own)
    assert metrics["val/loss"] == pytest.approx(float(recorded["val/loss"]), rel=1e-6)
    assert re.search(
        rf"val acc in training\s+{best['best_acc']:.4f} \(epoch {best['epoch']}\)", result.stdout
    )
    # with BatchNorm recalibration on (the default): best.pt holds the statistics validation used
    assert "bn recal cost:" in (run_copy / "summary.txt").read_text()


def test_last_checkpoint_and_a_second_evaluation_get_their_own_folders(run_copy: Path):
    for _ in range(2):
        result = cli_here(
            "imgcls.evaluate", f"run_dir={run_copy}", "checkpoint=last", "split=val", cwd=run_copy.parent
        )
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = run_copy / "eval" / "val-last", run_copy / "eval" / "val-last_2"
    assert (first / "metrics.json").is_file() and (second / "metrics.json").is_file()
    last_epoch = training_history(run_copy)[-1]
    for out in (first, second):
        metrics = read_json(out / "metrics.json")
        assert metrics["epoch"] == int(last_epoch["epoch"]) == 2
        assert metrics["val/acc"] == float(last_epoch["val/acc"])


def test_another_tree_with_the_same_classes(run_copy: Path, tmp_path: Path):
    # only a test/ split: evaluation needs no train/ or val/
    other = make_tree(tmp_path / "other", counts={"test": 2}, seed=7)
    result = cli_here(
        "imgcls.evaluate", f"run_dir={run_copy}", f"data.root={other}", "device=cpu", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_copy / "eval" / "test-best_root-other"  # named for what it measured; device left out
    rows = read_csv(out / "predictions.csv")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in (other / "test").glob("*/*.jpg"))
    assert read_json(out / "metrics.json")["test/samples"] == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["data"]["root"] == str(other)


def test_class_names_come_from_the_checkpoint_not_the_folder_order(evaluated, run_copy: Path, tmp_path: Path):
    # the same network with its outputs listed in another order: fox, cat, dog
    state = torch.load(run_copy / "weights" / "best.pt", weights_only=True)
    order = [2, 0, 1]
    state["class_names"] = [state["class_names"][i] for i in order]
    for key in ("fc.weight", "fc.bias"):
        state["model"][key] = state["model"][key][order].clone()
    torch.save(state, tmp_path / "permuted.pt")
    result = cli_here(
        "imgcls.evaluate", f"run_dir={run_copy}", f"checkpoint={tmp_path / 'permuted.pt'}",
        f"out_dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    original = {r["path"]: r for r in read_csv(evaluated[0] / "predictions.csv")}
    permuted = read_csv(tmp_path / "out" / "predictions.csv")
    assert len(permuted) == len(original) == 12
    for r in permuted:
        o = original[r["path"]]
        assert (r["true"], r["predicted"], r["correct"]) == (o["true"], o["predicted"], o["correct"])
        assert float(r["loss"]) == pytest.approx(float(o["loss"]), rel=1e-5, abs=1e-6)
    names = read_json(tmp_path / "out" / "classification_report.json")["classes"]
    assert list(names) == ["fox", "cat", "dog"]


def test_class_folders_that_differ_are_listed(run_copy: Path, tmp_path: Path):
    tree = make_tree(tmp_path / "renamed", counts={"test": 1})
    (tree / "test" / "fox").rename(tree / "test" / "wolf")
    (tree / "test" / "owl").mkdir()
    result = cli_here("imgcls.evaluate", f"run_dir={run_copy}", f"data.root={tree}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: {tree / 'test'}: the class folders differ from the checkpoint's 3 classes (cat, dog, fox): "
        "missing fox; not in the checkpoint: owl, wolf." in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (run_copy / "eval" / "test-best_root=renamed").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run_dir={run}_nope"], "run_dir={run}_nope does not exist; runs below {parent}: {run}."),
        (
            ["run_dir={parent}"],
            "run_dir={parent}: not a training run (no config.yaml or weights/). Runs below it: {run}.",
        ),
        (["run_dir={run}", "checkpoint=epoch3"], "{run}/weights holds best.pt, last.pt. Use checkpoint=best"),
        (
            ["run_dir={run}", "split=holdout"],
            "split=holdout: the run's data has no such split; it has train, val, test",
        ),
        (
            ["run_dir={run}", "data.root={tree}"],
            "split=test: {tree}/test is not a folder; splits found in {tree}: train, val.",
        ),
        (
            ["run_dir={run}", "data.rooot=x"],
            "data.rooot is not in the run's config ({run}/config.yaml); data has: _target_, root,",
        ),
        (["run_dir={run}", "data=hymenoptera"], "config groups cannot be switched on a trained run"),
        ([], "error: run_dir is required: set it on the command line, run_dir=..."),
    ],
)
def test_missing_paths_and_bad_keys_name_what_exists(run_copy: Path, tmp_path: Path, args, message):
    tree = make_tree(tmp_path / "nosplit", counts={"train": 1, "val": 1})
    fill = {"run": run_copy, "parent": run_copy.parent, "tree": tree}
    result = cli_here("imgcls.evaluate", *(a.format(**fill) for a in args), cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message.format(**fill) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_real_process_exits_2_with_the_error_line(run_copy: Path, tmp_path: Path):
    """The cases above run in-process; this one pins what the interpreter itself exits with."""
    result = cli("imgcls.evaluate", f"run_dir={run_copy}", "split=holdout", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: split=holdout: the run's data has no such split; it has train, val, test" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_copy / "eval" / "holdout-best").exists()


def test_help_is_instant_and_imports_no_torch(tmp_path: Path):
    for module, usage in [("imgcls.evaluate", "run_dir=outputs/"), ("imgcls.predict", "inputs=[photo.jpg")]:
        result = cli_python(tmp_path, "-X", "importtime", "-m", module, "--help")
        assert result.returncode == 0, result.stderr[-2000:]
        assert usage in result.stdout and "checkpoint: best" in result.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "hydra" in imported


def cli_python(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_train_split_is_read_with_the_eval_pipeline_as_training_reports_it(run_copy: Path):
    result = cli_here("imgcls.evaluate", f"run_dir={run_copy}", "split=train", cwd=run_copy.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(run_copy / "eval" / "train-best" / "metrics.json")
    summary = (run_copy / "summary.txt").read_text()
    recorded = re.search(r"^train acc \(best weights\): (\d\.\d{4})", summary, re.M).group(1)
    assert f"{metrics['train/acc']:.4f}" == recorded and metrics["train/samples"] == 24
