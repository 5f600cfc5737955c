"""End-to-end: `python -m imgcls.predict` on single files and folders of a tiny finished run."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import cli, cli_here
from odd_files import UNREADABLE, check_predictions, mixed_inputs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def data_root(run: Path) -> Path:
    return Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])


def test_predict_files_and_a_folder(trained_run: Path, tmp_path: Path):
    tree = data_root(trained_run)
    single = tree / "val" / "dog" / "dog_001.jpg"
    folder = tree / "test"
    out = tmp_path / "pred"
    result = cli_here(
        "imgcls.predict", f"run_dir={trained_run}", f"inputs=[{single},{folder}]", "top_k=2",
        f"out_dir={out}", "console_rows=3", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "predictions.csv")
    header = ["path", "predicted", "confidence", "top1", "top1_prob", "top2", "top2_prob", "error"]
    assert list(rows[0]) == header and not any(r["error"] for r in rows)
    expected = [str(single)] + sorted(str(p) for p in folder.glob("*/*.jpg"))
    assert [r["path"] for r in rows] == expected  # the order given, each folder sorted
    for r in rows:
        assert r["predicted"] == r["top1"] and r["confidence"] == r["top1_prob"]
        assert {r["top1"], r["top2"]} <= {"cat", "dog", "fox"} and r["top1"] != r["top2"]
        assert 1 >= float(r["top1_prob"]) >= float(r["top2_prob"]) >= 0
    # the console: a table of the first console_rows images with their top-k
    assert "top-2 predictions (first 3 of 13; all in the CSV)" in result.stdout
    assert str(single.name) in result.stdout
    assert (out / "predict.log").is_file() and (out / "config.yaml").is_file()
    assert not (trained_run / "predict").exists()  # out_dir given: the run is left alone


def test_predict_agrees_with_evaluate(trained_run: Path, tmp_path: Path):
    """The same images through predict and evaluate get the same classes and confidences."""
    tree = data_root(trained_run)
    result = cli_here(
        "imgcls.predict", f"run_dir={trained_run}", f"inputs={tree / 'test'}", f"out_dir={tmp_path / 'p'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli_here("imgcls.evaluate", f"run_dir={trained_run}", f"out_dir={tmp_path / 'e'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = {
        r["path"]: (r["predicted"], r["confidence"]) for r in read_csv(tmp_path / "p" / "predictions.csv")
    }
    evaluated = {
        r["path"]: (r["predicted"], r["confidence"]) for r in read_csv(tmp_path / "e" / "predictions.csv")
    }
    assert predicted == evaluated and len(predicted) == 12


def test_predict_writes_into_the_run_by_default(trained_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(
        trained_run,
        run,
        copy_function=os.link,
        ignore=shutil.ignore_patterns("eval", "predict", "tensorboard"),
    )
    image = data_root(trained_run) / "train" / "fox" / "fox_000.jpg"
    result = cli_here("imgcls.predict", f"run_dir={run}", f"inputs={image}", cwd=tmp_path)  # a plain string
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (run / "predict").iterdir()
    rows = read_csv(out / "predictions.csv")
    assert [r["path"] for r in rows] == [str(image)]
    assert re.search(rf"{image}\s+{rows[0]['top1']} {float(rows[0]['top1_prob']):.3f}", result.stdout)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            "[{tree}/test/cat/nope.jpg]",
            "inputs: {tree}/test/cat/nope.jpg does not exist; {tree}/test/cat holds: cat_000.jpg",
        ),
        ("[{empty}]", "inputs: {empty} holds no image files (.jpg"),
        ("[]", "inputs is empty"),
    ],
)
def test_predict_bad_inputs_are_named(trained_run: Path, tmp_path: Path, inputs, message):
    (tmp_path / "empty").mkdir()
    fill = {"tree": data_root(trained_run), "empty": tmp_path / "empty"}
    result = cli_here(
        "imgcls.predict", f"run_dir={trained_run}", f"inputs={inputs.format(**fill)}", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message.format(**fill) in result.stderr and "Traceback" not in result.stderr
    assert not (trained_run / "predict").exists()


@pytest.mark.slow
def test_predict_lists_unreadable_inputs_and_predicts_the_rest(trained_run: Path, tmp_path: Path):
    good = mixed_inputs(data_root(trained_run), tmp_path / "in")
    result = cli_here(
        "imgcls.predict", f"run_dir={trained_run}", f"inputs=[{tmp_path / 'in'}]", f"out_dir={tmp_path / 'p'}",
        "top_k=2", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    alone = cli_here(
        "imgcls.predict", f"run_dir={trained_run}", f"inputs=[{','.join(map(str, good))}]",
        f"out_dir={tmp_path / 'alone'}", "top_k=2", cwd=tmp_path,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    rows = read_csv(tmp_path / "p" / "predictions.csv")
    check_predictions(rows, tmp_path / "in", result.stderr, read_csv(tmp_path / "alone" / "predictions.csv"))
    assert all(Path(p).name in result.stdout for p in good)  # the console table: the predicted ones

    broken = [str(tmp_path / "in" / name) for name in UNREADABLE]
    none = cli(
        "imgcls.predict", f"run_dir={trained_run}", f"inputs=[{','.join(broken)}]", f"out_dir={tmp_path / 'n'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert none.returncode == 2, none.stderr[-3000:]
    assert "error: inputs: none of the 4 image(s) can be read, nothing to predict\n" in none.stderr
    assert f"  {broken[0]}: too many pixels" in none.stderr and "Traceback" not in none.stderr
    assert not (tmp_path / "n" / "predictions.csv").exists()
