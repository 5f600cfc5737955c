"""Notes a finished run leaves in its summary: a model that predicts one class for everything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cli_here, run_dirs
from PIL import Image


def test_one_class_for_every_image_is_noted():
    from imgcls.evaluation.final import one_class_note

    names = ["ants", "bees"]
    note = one_class_note(np.array([0, 1, 1, 0, 1]), np.array([1, 1, 1, 1, 1]), names)
    assert note.startswith("the best weights predict one class, 'bees', for every one of the 5 val images")
    assert "val accuracy 0.6000 is that class's share" in note
    assert one_class_note(np.array([0, 1, 1]), np.array([1, 0, 1]), names) is None  # two classes predicted
    assert one_class_note(np.array([1, 1]), np.array([1, 1]), names) is None  # val holds one class only


def identical_tree(root: Path) -> Path:
    """Two classes of the very same image: no model can tell them apart, so every val image gets
    the same logits and the same predicted class (a run left at chance, made deterministic)."""
    pixels = np.full((16, 16, 3), 128, np.uint8)
    for split, n in {"train": 4, "val": 2}.items():
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_run_that_predicts_one_class_says_so_in_log_and_summary(tmp_path: Path):
    tree = identical_tree(tmp_path / "same")
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", "trainer.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    summary = (run / "summary.txt").read_text()
    assert "status:         completed" in summary
    (note,) = [line for line in summary.splitlines() if line.startswith("note:")]
    assert "the best weights predict one class" in note and "for every one of the 4 val images" in note
    assert "val accuracy 0.5000 is that class's share" in note
    assert "WARNING" in result.stderr and "predict one class" in result.stderr
    assert "predict one class" in (run / "logs" / "train.log").read_text()
