"""The pictures and pages of a run, an evaluation and a sweep: curves.png redrawn after every epoch
and across a resume, report.html pages opened in a real headless Chromium, and figures whose
titles and labels stay inside the image."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, cli
from PIL import Image

from imgcls.pages.curves import described_epochs
from imgcls.pages.run_page import write_run_page
from imgcls.run_record import read_run
from imgcls.training.recorder import RunRecorder

ARTIFACTS = Path(os.environ.get("IMGCLS_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _row(epoch: int, acc: float) -> dict[str, float]:
    return {"epoch": epoch, "train/loss": 2.0 / epoch, "train/acc": acc - 0.1, "val/loss": 1.5 / epoch,
            "val/acc": acc, "val/acc_ema": acc + 0.01, "lr": 0.1 / epoch}  # fmt: skip


def test_curves_are_redrawn_after_an_epoch_and_continue_across_a_resume(tmp_path, monkeypatch):
    """After an epoch when the last redraw is PAGE_EVERY_S old (0 here: every epoch), and at the end."""
    config = {"trainer": {"epochs": 4}}
    monkeypatch.setattr(RunRecorder, "PAGE_EVERY_S", 0.0)
    recorder = RunRecorder(tmp_path, config, 4, info={"model": "resnet18"})
    curves = tmp_path / "plots" / "curves.png"
    history, seen = [], []
    for epoch, acc in [(1, 0.5), (2, 0.8)]:
        history.append(_row(epoch, acc))
        recorder.log_epoch(history[-1], history)
        assert described_epochs(curves) == list(range(1, epoch + 1))
        seen.append(curves.read_bytes())
        assert (tmp_path / "report.html").is_file()
    assert seen[0] != seen[1]
    recorder.finish("interrupted", error="RunInterrupted: stopped by SIGTERM after epoch 2")
    recorder.close()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "last.pt").write_bytes(b"")
    write_run_page(tmp_path)  # the page of the interrupted run, from its files alone
    page = (tmp_path / "report.html").read_text()
    assert "interrupted" in page and "stopped by SIGTERM" in page
    assert f"python -m imgcls.train resume={tmp_path / 'weights' / 'last.pt'}" in page

    # resumed from epoch 2: one continuous history, the best epoch is 3
    resumed = RunRecorder(tmp_path, config, 4, info={}, history=history[:2], started=str(recorder.started))
    history = [*history[:2], _row(3, 0.9)]
    resumed.log_epoch(history[-1], history)
    assert described_epochs(curves) == [1, 2, 3]
    with Image.open(curves) as image:
        assert image.text["Description"].endswith("best epoch 3")
    monkeypatch.setattr(RunRecorder, "PAGE_EVERY_S", 3600.0)  # a short epoch: drawn when the run ends
    history = [*history, _row(4, 0.7)]
    resumed.log_epoch(history[-1], history)
    assert described_epochs(curves) == [1, 2, 3]
    resumed.finish("completed")
    resumed.close()
    assert described_epochs(curves) == [1, 2, 3, 4]
    record = read_run(tmp_path)
    assert record.status == "completed" and not record.error
    assert 'id="why"' not in (tmp_path / "report.html").read_text()


# -- in a real browser --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if executable is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser, path: Path, name: str) -> dict:
    """Open a page offline (file://, every network request refused), save a screenshot as a test
    artifact, and return what the browser rendered: section ids, images (decoded size) and text."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    try:
        page = context.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.resolve().as_uri())
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        rendered = page.evaluate(
            """() => ({
                sections: [...document.querySelectorAll('section')].map(s => s.id),
                images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, shown: i.getBoundingClientRect().width})),
                text: document.body.innerText,
                links: [...document.querySelectorAll('a')].map(a => a.href),
                scripts: document.scripts.length,
            })"""
        )
    finally:
        context.close()
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # nothing from the network
    assert rendered["scripts"] == 0
    assert all(i["width"] > 0 and i["shown"] > 0 for i in rendered["images"]), rendered["images"]
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
    return rendered


def test_a_run_page_shows_the_run_in_a_browser(trained_run, browser):
    assert described_epochs(trained_run / "plots" / "curves.png") == [1, 2]
    shown = open_page(browser, trained_run / "report.html", "run_page")
    expected = ["status", "curves", "accuracy", "confusion", "reports", "data-check", "setup", "config"]
    assert shown["sections"] == expected
    assert [i["alt"] for i in shown["images"]][:1] == ["loss, accuracy and learning rate per epoch"]
    assert sorted(i["alt"] for i in shown["images"][1:]) == [
        "test",
        "train",
        "val",
    ]  # a confusion matrix per split
    text = shown["text"]
    assert "completed" in text and "macro avg" in text and "cat" in text
    assert "train (train/): 24 images in 3 classes" in text  # the data check's findings
    for split in ("train", "val", "test"):
        assert f"{split} acc (best weights)" not in text  # shown as the accuracy table instead
    accuracy = [line for line in text.splitlines() if line.startswith(("train\t", "val\t", "test\t"))]
    assert len(accuracy) >= 3 and all(line.endswith("%") for line in accuracy[:3])


@pytest.mark.slow  # a full evaluation, then a real browser
def test_an_evaluation_page_shows_metrics_figures_and_confusions(trained_run, browser, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    result = cli("imgcls.evaluate", f"run_dir={run}", "errors_shown=2", "tta=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = run / "eval" / "test-best_tta"
    shown = open_page(browser, out / "report.html", "eval_page")
    assert shown["sections"][:3] == ["metrics", "comparison", "classes"]
    assert "without TTA" in shown["text"] and "identity, hflip" in shown["text"]
    assert {"confusion", "calibration", "errors", "confused", "config"} <= set(shown["sections"])
    alts = [i["alt"] for i in shown["images"]]
    assert alts == [
        "counts",
        "normalized by true class",
        "reliability diagram",
        "the most confidently wrong images",
    ]
    text = shown["text"]
    assert "accuracy" in text and "expected calibration error" in text and "macro avg" in text
    errors = sum(
        1
        for line in (out / "predictions.csv").read_text().splitlines()[1:]
        if line.split(",")[1] != line.split(",")[2]
    )
    assert ("No image of this split was misclassified." in text) == (errors == 0)


def test_a_sweep_page_links_every_job_and_says_why_one_failed(trained_run, browser, tmp_path):
    from imgcls.sweeps.summary import summarize

    sweep = tmp_path / "multirun" / "2026-11-30" / "10-00-00"
    for num, lr in ((0, "0.01"), (1, "0.1")):
        job = shutil.copytree(trained_run, sweep / f"{num}_optimizer.lr={lr}")
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}"]))
    failed = sweep / "2_optimizer.lr=10"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optimizer.lr=10"]))
    recorder = RunRecorder(failed, {"trainer": {"epochs": 2}}, 2, info={})
    recorder.finish("failed", error="NonFiniteLossError: the loss became nan at step 3; lower optimizer.lr")
    recorder.close()

    summarize(sweep, stream=open(os.devnull, "w"))
    shown = open_page(browser, sweep / "report.html", "sweep_page")
    assert shown["sections"][0] == "leaderboard" and "problems" in shown["sections"]
    assert "objective" in shown["sections"]
    job_pages = {link for link in shown["links"] if link.endswith("/report.html")}
    assert len(job_pages) == 3  # the failed job is linked from the leaderboard and from its reason
    for link in job_pages:  # every link opens that job's own page
        assert Path(link.removeprefix("file://")).is_file()
    assert "the loss became nan at step 3; lower optimizer.lr" in shown["text"]


# -- figures whose text stays inside --------------------------------------------------------------
def _border_is_blank(png: Path) -> bool:
    """True when nothing is drawn on the outermost pixels: a clipped title or label would be."""
    pixels = np.asarray(Image.open(png).convert("L"))
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return bool(edges.min() > 245)


def test_the_error_grid_title_is_never_cut_with_few_errors(tmp_path):
    from imgcls.evaluation.plots import error_grid_figure, save_figure

    paths = []
    for i in range(2):
        path = tmp_path / f"img_{i}.png"
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(path)
        paths.append(str(path))
    title = "test, best.pt (epoch 12): the 2 most confidently wrong of 2 errors, from a long run name"
    fig = error_grid_figure(paths, ["cat", "dog"], ["dog", "cat"], [0.97, 0.91], title)
    save_figure(fig, tmp_path / "errors.png")
    assert _border_is_blank(tmp_path / "errors.png")
    assert all(line in title for line in fig._suptitle.get_text().splitlines())  # wrapped, not cut


def test_a_confusion_matrix_of_many_long_class_names_stays_legible(tmp_path):
    from imgcls.evaluation.reports import confusion_figure, write_split_report

    names = [f"a rather long class name number {i:03d} of the set" for i in range(120)]
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 120, 600)
    preds = np.where(rng.random(600) < 0.8, targets, rng.integers(0, 120, 600))
    write_split_report("val", targets, preds, names, tmp_path)
    png = tmp_path / "plots" / "confusion_matrix_val.png"
    assert _border_is_blank(png)
    with Image.open(png) as image:
        width, height = image.size
    assert 1000 < height < 8000 and width < 2.5 * height  # grows with the classes, within reason
    index = (tmp_path / "plots" / "class_index.txt").read_text().splitlines()
    assert index[7] == f"7\t{names[7]}"  # the full names beside the figure
    fig = confusion_figure(np.eye(120, dtype=int), names, "t")
    ticks = fig.axes[0].get_yticklabels()
    assert len(ticks) == 120 and all(t.get_fontsize() >= 4 for t in ticks)
    assert all(len(t.get_text()) <= 24 for t in ticks)


def test_pages_are_rebuilt_from_the_files_alone(trained_run, tmp_path):
    from imgcls.pages.__main__ import main

    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "report.html").unlink()
    (run / "plots" / "curves.png").unlink()
    assert main([str(run)]) == 0
    assert described_epochs(run / "plots" / "curves.png") == [1, 2]  # from metrics.csv
    assert 'id="confusion"' in (run / "report.html").read_text()
    assert main([str(tmp_path / "nothing")]) == 2
