"""The data check on trees of odd and broken files, in both on_bad_image modes, and its cache."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree
from PIL import Image

from imgcls.data import DataError, ImageFolderData, fingerprint_changes, make_dataset
from imgcls.data.scan import cache_file

SPLITS = {"train": "train", "val": "val", "test": "test"}


def data(root: Path, **kwargs) -> ImageFolderData:
    return ImageFolderData(str(root), kwargs.pop("splits", SPLITS), batch_size=4, **kwargs)


def jpeg_bytes(color=(200, 40, 40), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 60, (size[1], size[0], 3))
    Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BAD = {  # file under train/cat -> the reason the check gives
    "truncated.jpg": "cannot decode",
    "empty.jpg": "empty file (0 bytes)",
    "notes.jpg": "not an image",
    "bomb.png": "above data.max_image_pixels=5,000",
}
ODD_BUT_GOOD = ["cmyk.jpg", "deep.png", "rotated.jpg", "rgba.png", "palette.png"]


def add_messy_files(root: Path) -> None:
    """Real-world odd files in train/cat: some unusable, some unusual but fine, and hidden clutter."""
    cat = root / "train" / "cat"
    (cat / "truncated.jpg").write_bytes(jpeg_bytes()[:400])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("not a picture\n")
    Image.new("RGB", (100, 100), (200, 40, 40)).save(cat / "bomb.png")  # 10,000 px > the 5,000 limit
    Image.new("RGB", (40, 40), (200, 40, 40)).convert("CMYK").save(cat / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(cat / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), (200, 40, 40)).save(cat / "rotated.jpg", exif=exif)
    Image.new("RGBA", (40, 40), (200, 40, 40, 128)).save(cat / "rgba.png")
    Image.new("P", (40, 40), 0).save(cat / "palette.png", transparency=0)
    for hidden in (root / "train" / ".ipynb_checkpoints" / "x", cat / ".ipynb_checkpoints"):
        hidden.mkdir(parents=True)
        (hidden / "a.jpg").write_bytes(jpeg_bytes())
    (cat / ".DS_Store").write_bytes(b"\0\1junk")
    (cat / "README.txt").write_text("where these came from\n")


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "messy", size=(40, 40))
    add_messy_files(root)
    return root


def test_error_mode_lists_every_unreadable_file_with_its_reason(messy: Path):
    d = data(messy, max_image_pixels=5000)
    with pytest.raises(DataError) as info:
        d.scan()
    message = str(info.value)
    assert "4 file(s) cannot be used (set data.on_bad_image=skip to leave them out)" in message
    for name, reason in BAD.items():
        assert re.search(rf"train/cat/{re.escape(name)}: .*{re.escape(reason)}", message), name
    for name in ODD_BUT_GOOD:
        assert name not in message
    assert d.inspect()[1] is None  # nothing to train on: no record


def test_skip_mode_leaves_bad_files_out_and_keeps_odd_good_ones(messy: Path):
    options = data(messy, max_image_pixels=5000, on_bad_image="skip")
    d = options.scan()
    names = {Path(p).name for p, _ in d.samples["train"]}
    assert not names & set(BAD)
    assert set(ODD_BUT_GOOD) <= names
    assert len(d.samples["train"]) == 3 * 8 + len(ODD_BUT_GOOD)
    assert d.report.skipped_bad == 4
    assert "skipped 4 unreadable file(s) (data.on_bad_image=skip)" in d.report.summary_line()
    # hidden folders are neither classes nor samples; other suffixes are skipped with a warning
    assert d.class_names == ("cat", "dog", "fox")
    assert not any(".ipynb_checkpoints" in p or ".DS_Store" in p for p, _ in d.samples["train"])
    assert any("not images by suffix: train/cat/README.txt" in w for w in d.report.warnings)
    # every kept sample really loads, as the RGB the model sees
    for i in range(len(d.samples["train"])):
        image, _ = make_dataset(options, d, "train")[i]
        assert image.dtype.is_floating_point is False and image.shape[0] == 3


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_an_empty_class_is_named(tmp_path: Path, mode):
    root = make_tree(tmp_path / "t")
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    (root / "val" / "dog" / "broken.jpg").write_bytes(b"")
    with pytest.raises(DataError) as info:
        data(root, on_bad_image=mode).scan()
    assert f"{root / 'val' / 'dog'}: no usable image (all 1 unreadable)" in str(info.value)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_class_missing_from_val_or_extra_in_test_is_listed(tmp_path: Path, mode):
    root = make_tree(tmp_path / "t")
    shutil.rmtree(root / "val" / "dog")
    shutil.copytree(root / "test" / "fox", root / "test" / "wolf")
    with pytest.raises(DataError) as info:
        data(root, on_bad_image=mode).scan()
    assert f"{root / 'val'}: missing class folder(s) dog" in str(info.value)
    assert f"{root / 'test'}: class folder(s) not in train: wolf" in str(info.value)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_duplicates_within_and_across_splits_are_warned(tmp_path: Path, mode):
    root = make_tree(tmp_path / "t")
    shutil.copy(root / "train" / "cat" / "cat_000.jpg", root / "val" / "cat" / "leaked.jpg")
    shutil.copy(root / "train" / "dog" / "dog_000.jpg", root / "train" / "dog" / "again.jpg")
    shutil.copy(root / "train" / "fox" / "fox_000.jpg", root / "train" / "cat" / "fox_as_cat.jpg")
    d = data(root, on_bad_image=mode).scan()
    warnings = "\n".join(d.report.warnings)
    assert "leakage: 1 set(s) of identical files in more than one split" in warnings
    assert "train/cat/cat_000.jpg = val/cat/leaked.jpg" in warnings
    assert "train: 2 set(s) of identical files" in warnings
    assert "train/dog/again.jpg = train/dog/dog_000.jpg" in warnings
    assert (
        "identical files with different classes: train/cat/fox_as_cat.jpg = train/fox/fox_000.jpg (cat vs fox)"
        in warnings
    )


def test_split_folder_names_are_configurable(tmp_path: Path):
    root = make_tree(tmp_path / "t", counts={"train": 4, "validation": 2})
    d = data(root, splits={"train": "train", "val": "validation", "test": "test"}).scan()
    assert d.splits == ["train", "val"] and len(d.samples["val"]) == 6
    assert "val (validation/): 6 images in 3 classes: cat 2, dog 2, fox 2" in d.report.text()
    with pytest.raises(DataError, match=r"missing split folder\(s\) val/; found train/, validation/"):
        data(root).scan()


def test_imbalance_and_small_images_are_warned(tmp_path: Path):
    root = make_tree(tmp_path / "t", counts={"train": 2, "val": 2})
    for i in range(20):
        shutil.copy(root / "train" / "cat" / "cat_000.jpg", root / "train" / "cat" / f"more_{i}.jpg")
    d = data(root, min_image_size=32).scan()
    warnings = "\n".join(d.report.warnings)
    assert "train: classes are imbalanced 11.0:1 (cat 22, dog 2)" in warnings
    assert "image(s) smaller than 32 px on a side (data.min_image_size): " in warnings
    assert "(20x16)" in warnings
    assert "imbalance (largest / smallest class): 11.00" in d.report.text()


def test_val_fraction_carves_a_seeded_stratified_split(tmp_path: Path):
    root = make_tree(tmp_path / "t", counts={"train": 10})
    d = data(root, val_fraction=0.2, split_seed=3).scan()
    assert d.report.counts["val"] == {"cat": 2, "dog": 2, "fox": 2}
    assert d.report.counts["train"] == {"cat": 8, "dog": 8, "fox": 8}
    assert not {p for p, _ in d.samples["train"]} & {p for p, _ in d.samples["val"]}
    again = data(root, val_fraction=0.2, split_seed=3).scan()
    assert again.samples == d.samples
    other = data(root, val_fraction=0.2, split_seed=4).scan()
    assert other.samples["val"] != d.samples["val"]
    # recorded and reused exactly, even after new files arrive
    d.write_split(tmp_path / "data_split.json")
    assert (
        json.loads((tmp_path / "data_split.json").read_text())["val"]
        == d.checkpoint_entries()["data_split"]["val"]
    )
    shutil.copy(root / "train" / "cat" / "cat_000.jpg", root / "train" / "cat" / "new.jpg")
    reused = data(root, val_fraction=0.2, split_seed=3, split_file=str(tmp_path / "data_split.json")).scan()
    assert reused.samples == d.samples
    assert "1 file(s) in train are not in" in "\n".join(reused.report.warnings)
    # a recorded file that is gone is an error; an unreadable record is named
    (root / "train" / "dog" / "dog_000.jpg").unlink()
    with pytest.raises(
        DataError, match=r"1 file\(s\) of the recorded split .* are gone: train/dog/dog_000.jpg"
    ):
        data(root, val_fraction=0.2, split_seed=3, split_file=str(tmp_path / "data_split.json")).scan()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"data.split_file='.*bad.json' is not a readable data_split.json"):
        data(root, val_fraction=0.2, split_file=str(tmp_path / "bad.json")).scan()
    with pytest.raises(DataError, match="carves val out of train, but"):
        data(make_tree(tmp_path / "u"), val_fraction=0.2).scan()
    with pytest.raises(DataError, match="data.val_fraction must be between 0 and 1"):
        data(root, val_fraction=1.5)


def test_scan_is_cached_outside_the_tree_and_revalidated(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tree(tmp_path / "t")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = data(root).scan()
    assert first.report.scanned.startswith("48 files (48 decoded, 0 from cache)")
    assert cache_file(root).is_file() and cache_file(root).is_relative_to(tmp_path / "cache")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written there
    second = data(root).scan()
    assert second.report.scanned.startswith("48 files (0 decoded, 48 from cache)")
    assert second.fingerprint == first.fingerprint
    # a file replaced in place (same name, new content) is read again, and seen as bad
    victim = root / "train" / "dog" / "dog_003.jpg"
    victim.write_bytes(b"oops")
    os.utime(victim, ns=(1, 1))
    third = data(root, on_bad_image="skip").scan()
    assert third.report.scanned.startswith("48 files (1 decoded, 47 from cache)")
    assert third.report.skipped_bad == 1
    changes = fingerprint_changes(first.fingerprint, third.fingerprint)
    assert changes == ["train: changed since the checkpoint (24 -> 23 files, " + changes[0].split(", ", 1)[1]]
    assert fingerprint_changes(first.fingerprint, second.fingerprint) == []
    assert third.changes_since({"data_fingerprint": first.fingerprint}) == changes  # resume, evaluate
    assert third.changes_since({}) == []  # a checkpoint from before fingerprints: nothing to compare
    # a different pixel limit decides differently: everything is rescanned
    fourth = data(root, max_image_pixels=100)
    with pytest.raises(DataError, match="48 file"):
        fourth.scan()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_bad_image": "ignore"}, "data.on_bad_image must be one of error, skip, got 'ignore'"),
        ({"max_image_pixels": 0}, "data.max_image_pixels must be at least 1"),
        ({"split_file": "data_split.json"}, "data.split_file reuses a split carved by data.val_fraction"),
    ],
)
def test_bad_data_options_are_named(tmp_path: Path, kwargs, message):
    with pytest.raises(DataError, match=re.escape(message)):
        data(tmp_path, **kwargs)


def test_exclude_leaves_files_out_by_glob(tmp_path: Path):
    root = make_tree(tmp_path / "t")
    d = data(root, exclude=["train/cat/cat_00[0-2].jpg", "*/fox/fox_007.jpg"]).scan()
    assert d.report.counts["train"] == {"cat": 5, "dog": 8, "fox": 7}
    assert "left out 4 file(s) matching data.exclude" in "\n".join(d.report.warnings)


def test_a_file_broken_after_the_check_stops_loading_with_its_name(tmp_path: Path):
    root = make_tree(tmp_path / "t")
    options = data(root)
    d = options.scan()
    path, _ = d.samples["val"][0]
    Path(path).write_bytes(b"overwritten while training")
    with pytest.raises(DataError, match=rf"cannot decode image {re.escape(path)}: not an image"):
        make_dataset(options, d, "val")[0]  # never a black stand-in image
