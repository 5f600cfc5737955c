"""The reports and plots are the design card's libraries: scikit-learn's classification report and
confusion matrix, seaborn's heatmaps and sweep panels; neither is imported at start-up."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from imgcls.evaluation import plots
from imgcls.evaluation.reports import confusion_figure, write_split_report
from imgcls.evaluation.scores import confusion, report_dict, report_text
from imgcls.sweeps.crossval import OBJECTIVE
from imgcls.sweeps.plots import objective_figure, write_objective_plot

# a class that is never predicted (dog), one absent from the targets (fox), names that look like
# the report's own rows, math and a name that is not UTF-8 (b"\xff" as os.listdir gives it)
NAMES = ["cat", "dog", "fox", "accuracy", "$\\frac{$", "\udcff" + "x" * 40]
TARGETS = [0, 0, 1, 1, 3, 3, 4, 5, 5, 0]
PREDS = [0, 3, 0, 3, 3, 4, 4, 5, 0, 0]


def test_the_report_files_hold_scikit_learns_report_text_and_dict():
    from sklearn.metrics import classification_report

    labels = list(range(len(NAMES)))
    shown = ["cat", "dog", "fox", "accuracy", "$\\frac{$", "\\xff" + "x" * 40]  # names.shown
    assert report_text(TARGETS, PREDS, NAMES) == classification_report(
        TARGETS, PREDS, labels=labels, target_names=shown, digits=4, zero_division=0
    )
    theirs = classification_report(
        TARGETS,
        PREDS,
        labels=labels,
        target_names=[f"#{i}" for i in labels],
        output_dict=True,
        zero_division=0,
    )
    ours = report_dict(TARGETS, PREDS, NAMES)
    assert list(ours["classes"]) == NAMES  # as written, under their own key: "accuracy" is a class here
    for i, name in enumerate(NAMES):
        s = theirs[f"#{i}"]
        assert ours["classes"][name] == {
            "precision": s["precision"], "recall": s["recall"], "f1": s["f1-score"], "support": int(s["support"])
        }  # fmt: skip
    assert ours["classes"]["dog"]["recall"] == 0 and ours["classes"]["fox"]["support"] == 0
    assert ours["accuracy"] == theirs["accuracy"] == 0.5
    for average in ("macro avg", "weighted avg"):
        assert ours[average]["f1"] == theirs[average]["f1-score"] and ours[average]["support"] == 10
    json.dumps(ours)  # plain floats and ints, ready for classification_report.json


def test_a_class_index_past_the_names_is_refused_not_dropped():
    # scikit-learn, given labels=range(3), would drop the sample of class 3 and print a micro average
    for report in (report_text, report_dict):
        with pytest.raises(ValueError, match="outside 0..2"):
            report([0, 1, 3], [0, 1, 2], ["a", "b", "c"])
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion([0, 1, 2], [0, -1, 2], 3)


def test_heatmaps_annotate_counts_and_shares_up_to_40_classes():
    cm = confusion(TARGETS, PREDS, len(NAMES))
    counts = confusion_figure(cm, NAMES, "val")
    cells = [t.get_text() for t in counts.axes[0].texts]
    assert cells == [str(v) for v in cm.flat]  # a number in every cell, row by row
    colours = {t.get_text(): t.get_color() for t in counts.axes[0].texts}
    assert colours["2"] != colours["0"]  # light text on the darkest blue, dark on the palest
    shares = confusion_figure(cm, NAMES, "val", normalized=True)
    assert [t.get_text() for t in shares.axes[0].texts][:4] == ["0.67", "0.00", "0.00", "0.33"]  # cat: 2 of 3
    assert len(counts.axes) == 2  # the heatmap and its colour bar
    many = confusion_figure(np.eye(41, dtype=int), [f"c{i}" for i in range(41)], "val")
    assert not many.axes[0].texts  # past 40 classes the numbers leave the cells


def test_the_heatmap_png_is_what_tensorboard_shows(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tensorboard")) as writer:
        text = write_split_report("val", TARGETS, PREDS, NAMES, tmp_path, writer, step=3)
    assert (tmp_path / "logs" / "classification_report_val.txt").read_text() == text
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("confusion_matrix/val")
    with (
        Image.open(io.BytesIO(event.encoded_image_string)) as shown,
        Image.open(tmp_path / "plots" / "confusion_matrix_val.png") as png,
    ):
        assert event.step == 3 and png.size[0] > 400
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(png.convert("RGB")))


def _jobs(rows: list[tuple[float | None, dict[str, str]]]) -> list[dict]:
    return [{OBJECTIVE: score, "params": params} for score, params in rows]


def test_the_sweep_plot_has_a_panel_per_swept_key_coloured_by_another(tmp_path: Path):
    jobs = _jobs(
        [(0.5 + 0.1 * i, {"optimizer.lr": lr, "data.batch_size": bs, "model.name": "$\\frac{$" if i % 2 else "r18"})
         for i, (lr, bs) in enumerate([("0.1", "16"), ("0.01", "32"), ("0.001", "16"), ("0.0001", "32")])]
        + [(None, {"optimizer.lr": "1", "data.batch_size": "8", "model.name": "r18"})]  # a failed job
    )  # fmt: skip
    keys = ["optimizer.lr", "data.batch_size", "model.name", "trainer.epochs"]  # the last: failed jobs only
    jobs[-1]["params"]["trainer.epochs"] = "9"
    fig = objective_figure(jobs, keys)
    assert [ax.get_xlabel() for ax in fig.axes] == keys  # one panel each, wrapped 3 to a row
    lr, bs, model, epochs = fig.axes
    assert lr.get_xscale() == "log" and bs.get_xscale() == "linear"  # 0.0001..0.1 spans decades
    assert [t.get_text() for t in lr.get_xticklabels()] == ["0.0001", "0.001", "0.01", "0.1"]
    assert [t.get_text() for t in model.get_xticklabels()] == ["$\\frac{$", "r18"]  # categories, as written
    assert lr.get_legend().get_title().get_text() == "data.batch_size"
    assert model.get_legend().get_title().get_text() == "optimizer.lr"  # the next key that varies
    assert "no job with an objective" in epochs.texts[0].get_text()
    assert write_objective_plot(jobs, keys, tmp_path / "sweep_objective.png")
    with Image.open(tmp_path / "sweep_objective.png") as png:
        assert png.size[0] > 1.5 * png.size[1]  # three panels wide, two rows high


def test_no_sweep_plot_without_a_swept_key_or_an_objective(tmp_path: Path):
    jobs = _jobs([(None, {"optimizer.lr": "0.1"}), (None, {"optimizer.lr": "0.2"})])
    assert objective_figure(jobs, ["optimizer.lr"]) is None
    assert not write_objective_plot(jobs, [], tmp_path / "p.png") and not (tmp_path / "p.png").exists()


def test_the_last_resort_font_is_never_chosen_for_names():
    """matplotlib 3.10+ ships Last Resort, whose boxes cover every code point: chosen, it drew every
    name as boxes instead of falling back to class indices and class_index.txt."""
    plots._font_for.cache_clear()
    try:
        font = plots.font_for(["猫", "狗"])
    finally:
        plots._font_for.cache_clear()
    assert font is None or "lastresort" not in Path(font).name.lower()


def test_start_up_imports_neither_scikit_learn_nor_seaborn():
    """train --help imports the sweep summary (the Hydra callback); predict imports the report
    module for its top-k: neither pays the ~3 s of scikit-learn, seaborn and pandas."""
    code = (
        "import sys, imgcls.train, imgcls.sweeps.summary, imgcls.evaluation.reports\n"
        "print(sorted(m for m in ('sklearn', 'seaborn', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
