"""The pages as HTML a parser reads, without a browser: names that hold markup, quotes or bytes that
are not UTF-8 reach every page as text (Jinja2's autoescaping, names.shown), and the per-class
tables come from the classification reports' JSON, never from their text."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from imgcls.evaluation.prediction_rows import write_csv
from imgcls.pages.eval_page import write_eval_page
from imgcls.pages.run_page import write_run_page
from imgcls.pages.sweep_page import write_sweep_page
from imgcls.training.recorder import RunRecorder

SCRIPT = "<script>alert(1)</script>"
QUOTES = "a\"b'c&d"
NOT_UTF8 = "\udcff\udcfe"  # b"\xff\xfe" as os.listdir gives it: shown as the text \xff\xfe
NAMES = (SCRIPT, QUOTES, NOT_UTF8)


class Page(HTMLParser):
    """What a browser would take from the page: its elements (tag, attributes), section ids, the text,
    and each table's rows of cell texts."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(path.read_text(encoding="utf-8"))  # the page is valid UTF-8, whatever the names
        self.close()

    @property
    def sections(self) -> list[str]:
        return [a["id"] for t, a in self.tags if t == "section"]

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def cells(self) -> set[str]:
        return {c for table in self.tables for row in table for c in row}

    def assert_names_are_text(self) -> None:
        """Each hostile name is a cell's text, shown as it is (the non-UTF-8 bytes as \\xff\\xfe),
        and no script, no element of its own, ran in."""
        assert [t for t, _ in self.tags if t == "script"] == []
        text = "".join(self.text)
        assert SCRIPT in text and QUOTES in text and "\\xff\\xfe" in text
        assert NOT_UTF8 not in text


def report_json(names) -> dict:
    """A classification report's JSON as evaluate and the final reports write it (per_class_scores)."""
    row = {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4}
    return {
        "classes": {n: row for n in names},
        "accuracy": 0.75,
        "macro avg": {**row, "support": 4 * len(names)},
        "weighted avg": {**row, "support": 4 * len(names)},
    }


def _run(tmp_path: Path, names=NAMES) -> Path:
    """A run directory of a failed run whose setup, error, notes and reports name the classes."""
    run = tmp_path / "run"
    recorder = RunRecorder(run, {"trainer": {"epochs": 2}}, 2, info={"classes": ", ".join(names)})
    for name in names:
        recorder.add_note(f"class {name} has one image")
    recorder.finish("failed", error=f"ValueError: class {QUOTES} {SCRIPT} {NOT_UTF8}")
    recorder.close()
    (run / "logs").mkdir(exist_ok=True)
    (run / "logs" / "classification_report_val.json").write_text(json.dumps(report_json(names)))
    return run


def test_hostile_names_are_text_on_every_page(tmp_path):
    run = _run(tmp_path)
    page = Page(write_run_page(run))
    page.assert_names_are_text()
    assert {SCRIPT, QUOTES, "\\xff\\xfe"} <= page.cells()  # the per-class table's rows
    assert "why" in {a.get("id") for _, a in page.tags}

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"split": "val", "val/acc": 0.75, "checkpoint": SCRIPT}))
    (out / "classification_report.json").write_text(json.dumps(report_json(NAMES)))
    write_csv(
        out / "predictions.csv",
        [{"path": f"{n}.jpg", "true": n, "predicted": NAMES[(i + 1) % 3]} for i, n in enumerate(NAMES)],
    )
    page = Page(write_eval_page(out))
    page.assert_names_are_text()
    assert {SCRIPT, QUOTES, "\\xff\\xfe"} <= page.cells()
    confused = next(t for t in page.tables if t[0][0] == "true class")
    assert [SCRIPT, QUOTES] in [row[:2] for row in confused]

    sweep = tmp_path / "sweep"
    job = shutil.copytree(run, sweep / "0_job")
    rows = [
        {"rank": 1, "job": 0, "status": "failed", "val/acc_best": "", "best_epoch": "", "epochs": "0",
         "model.name": name, "overrides": f"model.name={name}", "run_dir": str(job)}
        for name in NAMES
    ]  # fmt: skip
    write_csv(sweep / "sweep_summary.csv", rows)
    page = Page(write_sweep_page(sweep))
    page.assert_names_are_text()
    assert f"model.name={QUOTES}" in page.cells()
    assert f"ValueError: class {QUOTES} {SCRIPT} \\xff\\xfe" in page.cells()  # the failed job's reason


def test_the_per_class_tables_come_from_the_report_json(tmp_path):
    """A report JSON with a class `x` and no text report: both pages show x's row, then the averages."""
    run = _run(tmp_path, names=["x"])
    assert not list((run / "logs").glob("*.txt"))
    expected = [
        ["class", "precision", "recall", "F1", "support"],
        ["x", "0.5000", "0.2500", "0.3333", "4"],
        ["accuracy", "", "", "0.7500", "4"],
        ["macro avg", "0.5000", "0.2500", "0.3333", "4"],
        ["weighted avg", "0.5000", "0.2500", "0.3333", "4"],
    ]
    page = Page(write_run_page(run))
    assert "reports" in page.sections and expected in page.tables

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"split": "val", "val/acc": 0.75}))
    (out / "classification_report.json").write_text(json.dumps(report_json(["x"])))
    page = Page(write_eval_page(out))
    assert page.sections[:2] == ["metrics", "classes"] and expected in page.tables


def test_an_old_run_with_a_text_report_shows_it_as_written(tmp_path):
    """A run from before the JSON reports: its text report is shown preformatted, not parsed."""
    run = _run(tmp_path, names=["x"])
    (run / "logs" / "classification_report_val.json").unlink()
    text = "              precision    recall  f1-score   support\n\n           x     0.5000    0.2500    0.3333         4\n"
    (run / "logs" / "classification_report_val.txt").write_text(text)
    page = Page(write_run_page(run))
    assert "reports" in page.sections and "pre" in [t for t, _ in page.tags]
    assert text in "".join(page.text)


def test_a_trained_runs_page_has_every_section(trained_run, tmp_path):
    """The sections a browser shows (tests/test_pages.py opens them in Chromium where installed)."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    page = Page(write_run_page(run))
    assert page.sections == [
        "status",
        "curves",
        "accuracy",
        "confusion",
        "reports",
        "data-check",
        "setup",
        "config",
    ]
    assert [a["alt"] for t, a in page.tags if t == "img"] == [
        "loss, accuracy and learning rate per epoch", "train", "val", "test"
    ]  # fmt: skip
    accuracy = next(t for t in page.tables if t[0] == ["split", "accuracy"])
    assert [row[0] for row in accuracy[1:]] == ["train", "val", "test"]
    assert all(row[1].endswith("%") for row in accuracy[1:])
    assert "train (train/): 24 images in 3 classes" in "".join(page.text)
    # each split's report from the JSON the final reports wrote beside the text (never parsed)
    reports = [t for t in page.tables if t[0] == ["class", "precision", "recall", "F1", "support"]]
    assert len(reports) == 3 and all(
        [r[0] for r in t[-3:]] == ["accuracy", "macro avg", "weighted avg"] for t in reports
    )


def test_a_template_that_names_a_missing_value_fails(tmp_path):
    """StrictUndefined: a value a template uses and the page does not give is an error, never a blank."""
    import jinja2

    from imgcls.pages.html import render

    with pytest.raises(jinja2.UndefinedError):
        render("eval.html.j2", title="t", subtitle="s")
