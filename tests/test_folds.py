"""k-fold cross-validation: seeded stratified folds of train, their record, and the sweep's CV table."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, cli_here, make_tree

from imgcls.data import DataError, ImageFolderData
from imgcls.data.splits import fold_of
from imgcls.sweeps import summary as sweep

SPLITS = {"train": "train", "val": "val", "test": "test"}
SWEEP_TINY = [o for o in TINY if not o.startswith("trainer.epochs=")] + ["trainer.epochs=1"]


def data(root: Path, **kwargs) -> ImageFolderData:
    return ImageFolderData(str(root), kwargs.pop("splits", SPLITS), batch_size=4, **kwargs)


def uneven_tree(root: Path) -> Path:
    """train/ only: cat 5, dog 7, fox 7 images (19, so 3 folds cannot all be the same size)."""
    make_tree(root, counts={"train": 7})
    for i in (0, 1):
        (root / "train" / "cat" / f"cat_00{i}.jpg").unlink()
    return root


def files_of(samples: list[tuple[str, int]], root: Path) -> set[str]:
    return {Path(p).relative_to(root).as_posix() for p, _ in samples}


# -- the folds --------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(13, 7, 5, 2), (10, 10), (1, 4, 9)])
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_fold_sizes_and_each_class_are_spread_within_one(sizes, folds):
    train = [("train", f"train/c{c}/{i}.jpg", c) for c, n in enumerate(sizes) for i in range(n)]
    for seed in (0, 1, 7):
        assigned = fold_of(train, folds, seed)
        assert sorted(assigned) == sorted(rel for _, rel, _ in train)  # every file, once
        totals = Counter(assigned.values())
        assert max(totals.values()) - min(totals[f] for f in range(folds)) <= 1
        for c in range(len(sizes)):
            per_fold = Counter(assigned[rel] for _, rel, t in train if t == c)
            assert max(per_fold.values()) - min(per_fold[f] for f in range(folds)) <= 1


def test_folds_are_disjoint_stratified_cover_train_and_follow_the_seed(tmp_path: Path):
    root = uneven_tree(tmp_path / "t")
    everything = {p.relative_to(root).as_posix() for p in (root / "train").rglob("*.jpg")}
    vals = []
    for fold in range(3):
        d = data(root, folds=3, fold=fold, split_seed=4).scan()
        train, val = files_of(d.samples["train"], root), files_of(d.samples["val"], root)
        assert train | val == everything and not train & val
        assert d.checkpoint_entries()["data_split"] == {
            "folds": 3, "fold": fold, "split_seed": 4, "train": sorted(train), "val": sorted(val),
        }  # fmt: skip
        assert f"val (fold {fold} of 3 of train, data.split_seed=4): {len(val)} images" in d.report.text()
        vals.append((val, d.report.counts["val"]))
    assert set().union(*(v for v, _ in vals)) == everything  # every train image is validated once
    assert sum(len(v) for v, _ in vals) == len(everything) == 19
    assert sorted(len(v) for v, _ in vals) == [6, 6, 7]
    for name, n in {"cat": 5, "dog": 7, "fox": 7}.items():
        per_fold = [counts[name] for _, counts in vals]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1, (name, per_fold)

    again = data(root, folds=3, fold=1, split_seed=4).scan()
    assert files_of(again.samples["val"], root) == vals[1][0]
    other = [data(root, folds=3, fold=f, split_seed=5).scan() for f in range(3)]
    assert [files_of(d.samples["val"], root) for d in other] != [v for v, _ in vals]


def test_the_trees_val_folder_is_not_validation_and_can_be_the_test_split(tmp_path: Path):
    root = make_tree(tmp_path / "t", counts={"train": 6, "val": 2})  # like Hymenoptera: no test/
    d = data(root, folds=3, fold=0).scan()
    assert files_of(d.samples["val"], root) <= {
        f"train/{c}/{c}_00{i}.jpg" for c in "cat dog fox".split() for i in range(6)
    }
    assert set(d.samples) == {"train", "val"}
    warning = f"data.folds=3: validation is a fold of train, so {root / 'val'} is not used for validation"
    assert f"{warning}; to use it as the test split, add data.splits.test=val" in d.report.warnings
    as_test = data(root, folds=3, fold=0, splits={**SPLITS, "test": "val"}).scan()
    assert files_of(as_test.samples["test"], root) == {
        p.relative_to(root).as_posix() for p in (root / "val").rglob("*.jpg")
    }
    assert as_test.samples["val"] == d.samples["val"]
    assert not [w for w in as_test.report.warnings if "validation is a fold" in w]
    with_test = make_tree(tmp_path / "u", counts={"train": 6, "val": 2, "test": 2})
    d = data(with_test, folds=3).scan()
    assert any(
        w.endswith("to test on it instead of test/, set data.splits.test=val") for w in d.report.warnings
    )
    assert len(d.samples["test"]) == 6  # test/ stays the test split


def test_split_file_reuses_the_fold_and_refuses_another(tmp_path: Path):
    root = uneven_tree(tmp_path / "t")
    d = data(root, folds=3, fold=2).scan()
    d.write_split(tmp_path / "data_split.json")
    assert json.loads((tmp_path / "data_split.json").read_text()) == d.checkpoint_entries()["data_split"]
    reused = data(root, folds=3, fold=2, split_seed=9, split_file=str(tmp_path / "data_split.json"))
    reused = reused.scan()  # the record decides the files, not the seed
    assert reused.samples == d.samples
    with pytest.raises(
        DataError,
        match=r"records a split drawn with data.folds=3 data.fold=2, but the config asks for data.folds=3 data.fold=1",
    ):
        data(root, folds=3, fold=1, split_file=str(tmp_path / "data_split.json")).scan()
    with pytest.raises(
        DataError, match=r"data.folds=3 data.fold=2, but the config asks for data.val_fraction=0.2"
    ):
        data(root, val_fraction=0.2, split_file=str(tmp_path / "data_split.json")).scan()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"folds": 5, "fold": 5},
            "data.fold=5 is out of range for data.folds=5: choose 0 to 4 (all of them in one sweep: -m data.fold=0,1,2,3,4 data.folds=5)",
        ),
        ({"folds": 3, "fold": -1}, "data.fold=-1 is out of range for data.folds=3: choose 0 to 2"),
        ({"folds": 1}, "data.folds must be a whole number of at least 2 (e.g. data.folds=5), or null; got 1"),
        (
            {"folds": "five"},
            "data.folds must be a whole number of at least 2 (e.g. data.folds=5), or null; got 'five'",
        ),
        (
            {"fold": 2},
            "data.fold=2 picks a validation fold, but data.folds is null: set the number of folds too, e.g. data.folds=5",
        ),
        (
            {"folds": 5, "fold": 1.5},
            "data.fold must be a whole number, the validation fold (0 to data.folds-1); got 1.5",
        ),
        (
            {"folds": 5, "val_fraction": 0.2},
            "data.folds=5 and data.val_fraction=0.2 both draw val out of train: set one of them",
        ),
        (
            {"split_file": "x.json"},
            "data.split_file reuses a split carved by data.val_fraction or data.folds",
        ),
    ],
)
def test_bad_fold_options_are_named(tmp_path: Path, kwargs, message):
    with pytest.raises(DataError, match=re.escape(message)):
        data(tmp_path, **kwargs)


def test_too_few_images_for_the_folds(tmp_path: Path):
    root = make_tree(tmp_path / "t", counts={"train": 3})
    d = data(root, folds=4, fold=3).scan()  # 9 images in 4 folds: a warning, fold 3 has one class
    (warning,) = [w for w in d.report.warnings if "fewer train images than folds" in w]
    assert warning.startswith(
        "data.folds=4: class(es) with fewer train images than folds (cat 3, dog 3, fox 3)"
    )
    assert "this one (fold 3) included" in warning
    with pytest.raises(
        DataError, match=r"data.folds=10: train has only 9 usable image\(s\), fewer than the folds"
    ):
        data(root, folds=10, fold=0).scan()


def test_a_bad_fold_stops_training_with_exit_code_2(tmp_path: Path):
    tree = make_tree(tmp_path / "t", counts={"train": 2, "val": 1})
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", "data.folds=5", "data.fold=5", cwd=tmp_path)
    assert result.returncode == 2
    assert re.search(
        r"^error: .*data.fold=5 is out of range for data.folds=5: choose 0 to 4", result.stderr, re.M
    )
    assert "Traceback" not in result.stderr


# -- a real cross-validation sweep --------------------------------------------------------------


@pytest.fixture(scope="module")
def cv_sweep(tmp_path_factory) -> tuple[Path, Path, str]:
    """`-m data.fold=0,1,2 data.folds=3` on a tiny tree with a val/ folder (left unused)."""
    cwd = tmp_path_factory.mktemp("cv")
    tree = make_tree(cwd / "tiny", counts={"train": 6, "val": 2})
    args = ["-m", *SWEEP_TINY, f"data.root={tree}", "optimizer.lr=0.01", "data.fold=0,1,2", "data.folds=3"]
    result = cli_here("imgcls.train", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (cwd / "multirun").glob("*/*")
    return sweep_dir, tree, result.stdout


def best_val_acc(job: Path) -> float:
    with open(job / "metrics.csv", newline="") as f:
        return max(float(r["val/acc"]) for r in csv.DictReader(f))


@pytest.mark.slow
def test_cv_sweep_writes_the_mean_and_std_of_the_folds(cv_sweep):
    sweep_dir, tree, stdout = cv_sweep
    jobs = sorted(sweep.job_dirs(sweep_dir))
    # one readable directory per fold
    assert [re.sub(r"^\d+_", "", j.name) for j in jobs] == [
        f"batch_size-4_data-imagefolder_epochs-1_fold-{k}_folds-3_lr-0.01_name-shufflenet_v2_x0_5_root-tiny_transforms-digits"
        for k in range(3)
    ]
    scores = [best_val_acc(j) for j in jobs]
    with open(sweep_dir / "cv_summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["folds"], row["folds_done"], row["jobs"]) == ("3", "3", "0 1 2")
    assert float(row["val/acc_best_mean"]) == pytest.approx(statistics.fmean(scores), abs=1e-12)
    assert float(row["val/acc_best_std"]) == pytest.approx(statistics.stdev(scores), abs=1e-12)  # ddof=1
    assert (float(row["val/acc_best_min"]), float(row["val/acc_best_max"])) == (min(scores), max(scores))
    assert row["per_fold"] == " ".join(f"{k}={s!r}" for k, s in enumerate(scores))
    assert row["not_done"] == "" and row["note"] == ""
    table = stdout[stdout.index("cross-validation: val/acc_best over the completed folds") :].splitlines()
    assert table[1].split()[:3] == ["folds", "done", "mean"]
    assert table[2].split()[:2] == ["3/3", f"{statistics.fmean(scores):.4f}"]
    assert "cv_summary.csv" in stdout[stdout.index("wrote ") :]

    # each fold's run: val is its fold; together the folds cover train exactly once
    vals = []
    for k, job in enumerate(jobs):
        split = json.loads((job / "data_split.json").read_text())
        assert (split["folds"], split["fold"], split["split_seed"]) == (3, k, 0)
        assert torch.load(job / "weights" / "best.pt", weights_only=True)["data_split"] == split
        assert (
            f"val split:      fold {k} of 3 of train, data.split_seed=0" in (job / "summary.txt").read_text()
        )
        vals.append(set(split["val"]))
        assert not set(split["train"]) & set(split["val"])
    train_files = {p.relative_to(tree).as_posix() for p in (tree / "train").rglob("*.jpg")}
    assert set().union(*vals) == train_files and sum(map(len, vals)) == len(train_files) == 18

    # `python -m imgcls.sweep` rebuilds the table from the job directories alone
    written = (sweep_dir / "cv_summary.csv").read_text()
    (sweep_dir / "cv_summary.csv").unlink()
    rebuilt = cli_here("imgcls.sweep", str(sweep_dir), cwd=sweep_dir)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert (sweep_dir / "cv_summary.csv").read_text() == written


@pytest.mark.slow
def test_evaluate_and_resume_of_a_fold_see_the_same_val_files(cv_sweep):
    sweep_dir, tree, _ = cv_sweep
    job = sorted(sweep.job_dirs(sweep_dir))[1]
    split = json.loads((job / "data_split.json").read_text())
    result = cli_here("imgcls.evaluate", f"run_dir={job}", "split=val", cwd=sweep_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (job / "eval" / "val-best" / "predictions.csv").read_text().splitlines()[1:]
    evaluated = sorted(Path(r.split(",")[0]).relative_to(tree).as_posix() for r in rows)
    assert evaluated == sorted(split["val"])  # fold 1, not the tree's val/ folder

    result = cli_here(
        "imgcls.train", f"resume={job / 'weights' / 'last.pt'}", "trainer.epochs=2", cwd=sweep_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(job / "weights" / "last.pt", weights_only=True)["data_split"] == split
    assert json.loads((job / "data_split.json").read_text()) == split


# -- the CV table from job directories ---------------------------------------------------------


def fake_job(sweep_dir: Path, num: int, overrides: list[str], status: str, accs: list[float]) -> None:
    job = sweep_dir / f"{num}_job"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "summary.txt").write_text(f"status: {status}\nepoch: {len(accs)} of 2\n")
    rows = "".join(f"{e},{a}\n" for e, a in enumerate(accs, 1))
    (job / "metrics.csv").write_text("epoch,val/acc\n" + rows)


def test_cv_table_counts_and_names_folds_that_did_not_finish(tmp_path: Path):
    jobs = [  # (lr, fold, status, val/acc per epoch)
        ("0.1", 0, "completed", [0.5, 0.7]),
        ("0.1", 1, "completed", [0.8]),
        ("0.1", 2, "failed", []),
        ("0.01", 0, "completed", [0.9]),
        ("0.01", 1, "failed", []),
        ("0.01", 2, "completed", [0.6, 0.95]),
        ("0.01", 1, "completed", [0.85]),  # fold 1 again, after its failure
        ("0.001", 0, "interrupted", [0.4]),  # a partial score is not averaged
        ("0.001", 1, "completed", [0.3]),
    ]
    for num, (lr, fold, status, accs) in enumerate(jobs):
        fake_job(tmp_path, num, [f"optimizer.lr={lr}", f"data.fold={fold}", "data.folds=3"], status, accs)
    out = io.StringIO()
    sweep.summarize(tmp_path, stream=out)
    with open(tmp_path / "cv_summary.csv", newline="") as f:
        rows = {r["optimizer.lr"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["0.01", "0.1", "0.001"]  # best mean first
    full = rows["0.01"]
    assert (full["folds_done"], full["jobs"], full["not_done"]) == ("3", "3 6 5", "")
    assert float(full["val/acc_best_mean"]) == pytest.approx(statistics.fmean([0.9, 0.85, 0.95]))
    assert float(full["val/acc_best_std"]) == pytest.approx(0.05)  # ddof=1 (ddof=0: 0.0408)
    assert full["note"] == "fold 1 ran 2 times, job 6 counted"
    part = rows["0.1"]
    assert (part["folds_done"], part["not_done"]) == ("2", "fold 2 failed (job 2)")
    assert float(part["val/acc_best_mean"]) == pytest.approx(0.75)
    one = rows["0.001"]
    assert (one["folds_done"], one["val/acc_best_std"]) == ("1", "")
    assert one["not_done"] == "fold 0 interrupted (job 7); fold 2 not run"
    assert one["note"] == "one fold: no standard deviation"
    text = out.getvalue()
    assert "nan" not in text.lower()
    assert re.search(
        r"^1/3\s+0\.3000\s+n/a \(1 fold\)\s+0\.3000\s+0\.3000\s+optimizer.lr=0.001\s+fold 0 interrupted",
        text,
        re.M,
    )
    assert re.search(
        r"^2/3\s+0\.7500\s+0\.0707\s+0\.7000\s+0\.8000\s+optimizer.lr=0.1\s+fold 2 failed \(job 2\)$",
        text,
        re.M,
    )
