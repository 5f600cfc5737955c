"""Class names in any script: drawn in a font that has their characters, or by index with the
names beside the figure and one warning when the machine has no such font."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from loguru import logger

import imgcls.evaluation.plots as plots
from imgcls.evaluation.reports import confusion_figure, write_split_report

NAMES = ["猫", "狗", "狐狸"]  # cat, dog, fox
TARGETS = [0, 1, 2, 0, 1, 2]
PREDS = [0, 1, 1, 0, 2, 2]


@pytest.fixture(autouse=True)
def fresh_font_choice():
    """label_font caches its answers and warns once per process: each test starts clean."""
    plots._font_for.cache_clear()
    plots._warned.clear()
    yield
    plots._font_for.cache_clear()
    plots._warned.clear()


@pytest.fixture
def warnings_logged():
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING", format="{message}")
    yield messages
    logger.remove(sink)


def tick_texts(fig) -> tuple[list[str], list[str]]:
    ax = fig.axes[0]
    return [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]


def test_without_a_font_for_the_names_classes_are_labelled_by_index(monkeypatch, tmp_path, warnings_logged):
    monkeypatch.setattr(plots, "_installed_fonts", lambda: [])  # a machine with no CJK font
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for split in ("train", "val", "test"):
            write_split_report(split, TARGETS, PREDS, NAMES, tmp_path)
    glyphs = [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert not glyphs, glyphs
    assert (tmp_path / "plots" / "class_index.txt").read_text(encoding="utf-8") == "0\t猫\n1\t狗\n2\t狐狸\n"
    said = [m for m in warnings_logged if "no font on this machine draws" in m]
    assert len(said) == 1, warnings_logged  # three figures, one warning
    assert "class_index.txt" in said[0] and "狐" in said[0]
    fig = confusion_figure(np.eye(3, dtype=int), NAMES, "val")
    assert tick_texts(fig) == (["0", "1", "2"], ["0", "1", "2"])
    assert "class_index.txt" in fig.axes[0].get_xlabel()


def test_latin_names_keep_the_default_font(tmp_path):
    fig = confusion_figure(np.eye(3, dtype=int), ["cat", "dog", "fox"], "val")
    assert tick_texts(fig) == (["cat", "dog", "fox"], ["cat", "dog", "fox"])
    assert plots.write_class_index(tmp_path, ["cat", "dog", "fox"]) is None


def test_an_installed_cjk_font_draws_the_names(tmp_path, warnings_logged):
    font = plots.font_for(NAMES)
    if not font:
        pytest.skip("no installed font covers the CJK names (CI installs fonts-wqy-zenhei)")
    from fontTools.ttLib import TTFont

    with TTFont(font, fontNumber=0, lazy=True) as f:  # the chosen font has every character
        cmap = f.getBestCmap()
    assert all(ord(c) in cmap for c in "".join(NAMES))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_split_report("val", TARGETS, PREDS, NAMES, tmp_path)
        fig = confusion_figure(np.eye(3, dtype=int), NAMES, "val")
        fig.savefig(tmp_path / "again.png")
    glyphs = [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert not glyphs, glyphs
    assert tick_texts(fig) == (NAMES, NAMES)
    assert {t.get_fontproperties().get_file() for t in fig.axes[0].get_xticklabels()} == {font}
    assert not (tmp_path / "plots" / "class_index.txt").exists()
    assert not [m for m in warnings_logged if "no font" in m]
