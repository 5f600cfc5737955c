"""Data as values: a scan returns a record nobody changes; other views are new records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tree

from imgcls.data import DataRecord, ImageFolderData, make_dataset, make_loader
from imgcls.evaluation.labels import checked_record, labelled_record

SPLITS = {"train": "train", "val": "val", "test": "test"}


def options(root: Path, **kwargs) -> ImageFolderData:
    return ImageFolderData(str(root), SPLITS, batch_size=4, **kwargs)


def test_a_scan_returns_a_frozen_record_and_the_options_stay_read_only(tmp_path: Path):
    data = options(make_tree(tmp_path / "t"))
    record = data.scan()
    assert record.class_names == ("cat", "dog", "fox") and record.splits == ["train", "val", "test"]
    assert all(isinstance(items, tuple) for items in record.samples.values())
    assert record.report.counts["val"] == {"cat": 4, "dog": 4, "fox": 4} and record.carved is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.class_names = ("a", "b")  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.samples["predict"] = ()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.report.scanned = ""  # type: ignore[misc]
    assert isinstance(record.report.warnings, tuple) and isinstance(record.report.errors, tuple)
    with pytest.raises(AttributeError, match="ImageFolderData is read-only after construction"):
        data.batch_size = 8
    assert data.scan() == record, "the same tree scans to an equal value"


def test_relabelled_is_a_new_record_with_the_checkpoints_indices_by_name(tmp_path: Path):
    record = options(make_tree(tmp_path / "t")).scan()
    names = ("fox", "cat", "dog")
    other = record.relabelled(names)
    assert other.class_names == names and record.class_names == ("cat", "dog", "fox")
    for split in record.splits:
        for (path, old), (same, new) in zip(record.samples[split], other.samples[split], strict=True):
            assert path == same and names[new] == record.class_names[old] == Path(path).parent.name


def test_a_predict_list_is_an_unlabelled_record(tmp_path: Path):
    tree = make_tree(tmp_path / "t", counts={"train": 2})
    files = sorted((tree / "train").rglob("*.jpg"))
    record = DataRecord.of_files(files, ["cat", "dog", "fox"])
    assert record.splits == ["predict"] and record.samples["predict"] == tuple((str(f), -1) for f in files)
    assert record.relabelled(["dog", "fox", "cat"]).samples == record.samples, "no label stays no label"
    data = options(tree)
    images, targets = next(iter(make_loader(data, record, "predict", None, train=False)))
    assert images.shape == (4, 3, 16, 20) and targets.tolist() == [-1] * 4


def test_checkpoint_entries_and_the_split_file_are_plain_data(tmp_path: Path):
    data = ImageFolderData(
        str(make_tree(tmp_path / "t", counts={"train": 10})), SPLITS, batch_size=4, val_fraction=0.2
    )
    record = data.scan()
    entries = record.checkpoint_entries()
    assert type(entries["data_split"]) is dict and type(entries["data_split"]["val"]) is list
    assert type(entries["data_fingerprint"]["splits"]["train"]) is dict
    torch.save(entries, tmp_path / "entries.pt")
    assert torch.load(tmp_path / "entries.pt", weights_only=True) == entries
    record.write_split(tmp_path / "data_split.json")
    assert json.loads((tmp_path / "data_split.json").read_text()) == entries["data_split"]
    assert record.changes_since({"data_fingerprint": entries["data_fingerprint"]}) == []
    reused = data.scan(recorded_split=entries["data_split"])  # a resume: the checkpoint's split
    assert reused.samples == record.samples


def test_inspect_returns_the_report_and_no_record_when_the_check_fails(tmp_path: Path):
    tree = make_tree(tmp_path / "t")
    (tree / "val" / "dog" / "dog_000.jpg").write_bytes(b"not a jpeg")
    report, record = options(tree).inspect()
    assert record is None and len(report.errors) == 1 and "val/dog/dog_000.jpg" in report.errors[0]


def test_the_image_cache_is_built_once_per_record_and_split(tmp_path: Path):
    data = options(make_tree(tmp_path / "t"), cache="memory")
    record = data.scan()
    first = make_dataset(data, record, "val")
    second = make_loader(data, record, "val", None, train=False).dataset.dataset
    assert second.store is first.store and set(record.stores) == {"val"}
    assert not record.relabelled(("dog", "cat", "fox")).stores, "a new record, a new memo"


def test_evaluation_relabels_a_copy_and_leaves_the_scan_alone(tmp_path: Path):
    data = options(make_tree(tmp_path / "t"))
    names = ["fox", "dog", "cat"]
    checked = checked_record(data, "test", names, {})
    assert checked.class_names == tuple(names)
    assert {(Path(p).parent.name, names[t]) for p, t in checked.samples["test"]} == {
        (c, c) for c in ("cat", "dog", "fox")
    }
    alone = labelled_record(data, "test", names)
    assert alone.splits == ["test"] and set(alone.samples["test"]) == set(checked.samples["test"])


def test_a_jobs_loader_workers_stop_when_the_job_ends(tmp_path: Path):
    """stop_workers (called by every command at the end of its job) stops a loader's persistent
    workers while the loader is still referenced, instead of leaving them to the garbage collector."""
    import multiprocessing

    from imgcls.data.loaders import stop_workers

    data = options(make_tree(tmp_path / "tree", counts={"train": 4, "val": 1, "test": 1}), num_workers=2)
    loader = make_loader(data, data.scan(), "train", None, train=True)
    before = {c.pid for c in multiprocessing.active_children()}
    assert len(list(loader)) == 3
    workers = [c for c in multiprocessing.active_children() if c.daemon and c.pid not in before]
    assert len(workers) == 2, "two persistent workers outlive the epoch"
    stop_workers()
    assert not any(w.is_alive() for w in workers)
    assert len(list(loader)) == 3, "the loader still works: it starts new workers"
    stop_workers()
