"""Evaluate reuses the val split a run carved out of train (data.val_fraction), file for file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_here, make_tree, run_dirs


@pytest.mark.slow
def test_evaluate_uses_the_runs_carved_val_split(tmp_path: Path):
    tree = make_tree(tmp_path / "tree", counts={"train": 8, "test": 2})  # no val/ folder at all
    trained = cli_here("imgcls.train", *TINY, f"data.root={tree}", "data.val_fraction=0.25", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    best = torch.load(run / "weights" / "best.pt", weights_only=True)
    carved = json.loads((run / "data_split.json").read_text())
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "eval" / "val-best" / "metrics.json").read_text())
    assert metrics["val/samples"] == 6  # 2 of each class's 8, stratified
    assert metrics["val/acc"] == best["best_acc"]
    rows = (run / "eval" / "val-best" / "predictions.csv").read_text().splitlines()[1:]
    evaluated = sorted(Path(r.split(",")[0]).name for r in rows)
    assert evaluated == sorted(Path(rel).name for rel in carved["val"])  # the very files training held out
    assert not set(evaluated) & {Path(rel).name for rel in carved["train"]}
