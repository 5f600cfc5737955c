"""A tree of class folders with no split folders (<root>/<class>/<image>, as Sign Language Digits and
many published sets come): val is carved from it (data.val_fraction, 0.2 unless set), test where
data.test_fraction asks, seeded and recorded; the summary says what was carved (issue 29, item 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, cli_here, make_tree, run_dirs

from imgcls.data import ImageFolderData
from imgcls.errors import DataError

SPLITS = {"train": "train", "val": "val", "test": "test"}


def class_folders(root: Path, per_class: int = 10) -> Path:
    """<root>/<class>/<n>.jpg: real JPEGs, three classes, no split folder."""
    make_tree(root / "_made", counts={"all": per_class})
    for folder in (root / "_made" / "all").iterdir():
        shutil.move(str(folder), root / folder.name)
    shutil.rmtree(root / "_made")
    return root


def options(root: Path, **kw) -> ImageFolderData:
    return ImageFolderData(root=str(root), splits=SPLITS, batch_size=4, **kw)


def names(record, split: str) -> set[str]:
    return {Path(p).name for p, _ in record.samples[split]}


def test_class_folders_alone_get_a_seeded_stratified_val_split(tmp_path: Path):
    root = class_folders(tmp_path / "photos")
    record = options(root).scan()
    assert list(record.samples) == ["train", "val"]
    assert record.class_names == ("cat", "dog", "fox")
    # 0.2 of each class's 10 images, the default for a tree without split folders
    per_class = [sum(t == k for _, t in record.samples["val"]) for k in range(3)]
    assert per_class == [2, 2, 2] and len(record.samples["train"]) == 24
    assert not names(record, "train") & names(record, "val")
    assert record.carved["layout"] == "class folders" and record.carved["val_fraction"] == 0.2
    assert list(record.carved["val"]) == sorted(
        str(Path(p).relative_to(root)) for p, _ in record.samples["val"]
    )
    assert "carved from the class folders (the tree has no split folders), data.val_fraction=0.2" in (
        record.report.text()
    )
    # the same files every time, another split_seed draws others
    assert options(root).scan().samples == record.samples
    assert names(options(root, split_seed=1).scan(), "val") != names(record, "val")


def test_test_fraction_carves_a_test_split_first(tmp_path: Path):
    root = class_folders(tmp_path / "photos", per_class=20)
    record = options(root, val_fraction=0.25, test_fraction=0.1).scan()
    assert list(record.samples) == ["train", "val", "test"]
    sizes = {split: len(items) for split, items in record.samples.items()}
    assert sizes == {"train": 39, "val": 15, "test": 6}  # per class: 13, 5 (0.25 of 20), 2 (0.1 of 20)
    sets = [names(record, s) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == 60
    # the recorded split is reused file for file (resume, evaluate)
    again = options(root, val_fraction=0.25, test_fraction=0.1).scan(recorded_split=dict(record.carved))
    assert again.samples == record.samples


def test_test_fraction_on_a_split_tree_without_test(tmp_path: Path):
    tree = make_tree(tmp_path / "tree", counts={"train": 10, "val": 4})
    record = options(tree, test_fraction=0.2).scan()
    assert {s: len(v) for s, v in record.samples.items()} == {"train": 24, "val": 12, "test": 6}
    assert "layout" not in record.carved
    with pytest.raises(
        DataError, match=r"data.test_fraction=0.2 carves test out of train, but .*test exists"
    ):
        options(make_tree(tmp_path / "full"), test_fraction=0.2).scan()


@pytest.mark.parametrize("split_like", ["Train", "val", "validation", "test"])
def test_a_folder_named_like_a_split_is_never_read_as_a_class(tmp_path: Path, split_like: str):
    root = class_folders(tmp_path / "photos")
    (root / split_like).mkdir()
    with pytest.raises(
        DataError, match=rf"missing split folder\(s\) train/(, val/)?; found (.*/, )?{split_like}/"
    ):
        options(root).scan()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"test_fraction": 1.5}, r"data.test_fraction must be between 0 and 1"),
        ({"test_fraction": "a"}, r"data.test_fraction must be between 0 and 1 .*got 'a'"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, r"leave nothing to train on"),
    ],
)
def test_bad_fractions_name_the_key(tmp_path: Path, kw: dict, message: str):
    with pytest.raises(DataError, match=message):
        options(tmp_path, **kw)


@pytest.mark.slow
def test_a_run_on_class_folders_says_what_it_carved_and_evaluates_on_it(tmp_path: Path):
    root = class_folders(tmp_path / "photos", per_class=10)
    trained = cli_here("imgcls.train", *TINY, f"data.root={root}", "data.test_fraction=0.2", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    summary = (run / "summary.txt").read_text()
    assert (
        "carved from the class folders (the tree has no split folders), data.val_fraction=0.2, "
        "data.split_seed=0; test carved from it too, data.test_fraction=0.2" in summary
    )
    carved = json.loads((run / "data_split.json").read_text())
    assert [len(carved[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    # the final reports covered the carved test split
    assert (run / "reports" / "test").is_dir() or "test" in (run / "run.json").read_text()
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "split=test", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "eval" / "test-best" / "metrics.json").read_text())
    assert metrics["test/samples"] == 6
    rows = (run / "eval" / "test-best" / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(Path(r.split(",")[0]).name for r in rows) == sorted(
        Path(rel).name for rel in carved["test"]
    )


def test_evaluate_names_a_split_a_class_folder_run_did_not_carve(tmp_path: Path):
    root = class_folders(tmp_path / "photos", per_class=6)
    trained = cli_here("imgcls.train", *TINY, "trainer.epochs=1", f"data.root={root}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "split=test", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "holds class folders, not split folders, and the run carved train, val from them" in result.stderr
    assert "Traceback" not in result.stderr
