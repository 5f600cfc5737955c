"""data.cache: images come out of the cache exactly as a fresh decode; runs match with and without it."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_here, make_tree, run_dirs
from torch.utils.data import Dataset

from imgcls.data import DataError, DataRecord, ImageFolderData, make_dataset


def _dataset(tree: Path, tmp_path: Path, **kw) -> tuple[Dataset, DataRecord]:
    """The train split's dataset, and the record whose image cache it uses."""
    data = ImageFolderData(
        str(tree), {"train": "train", "val": "val"}, batch_size=4, cache_dir=str(tmp_path / "c"), **kw
    )
    record = data.scan()
    return make_dataset(data, record, "train"), record


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("size", [None, 12])
def test_cached_images_equal_fresh_decodes(tmp_path, mode, size):
    tree = make_tree(tmp_path / "tree", counts={"train": 3, "val": 2}, size=(20, 16))
    fresh, _ = _dataset(tree, tmp_path, cache_size=size)
    cached, record = _dataset(tree, tmp_path, cache=mode, cache_size=size)
    assert len(cached) == len(fresh) == 9
    for i in range(len(fresh)):
        (a, ta), (b, tb) = fresh[i], cached[i]
        assert a.dtype == b.dtype == torch.uint8 and ta == tb
        assert torch.equal(a, b)
        assert a.shape == ((3, 12, 15) if size else (3, 16, 20))  # the shorter side resized, aspect kept
    assert record.stores["train"].nbytes == sum(fresh[i][0].numel() for i in range(9))


def test_disk_cache_is_reused_until_a_file_changes(tmp_path):
    tree = make_tree(tmp_path / "tree", counts={"train": 2, "val": 1})
    _dataset(tree, tmp_path, cache="disk")
    files = sorted((tmp_path / "c").glob("*.u8"))
    assert len(files) == 1 and not list((tmp_path / "c").glob(".*tmp*"))
    _dataset(tree, tmp_path, cache="disk")
    assert sorted((tmp_path / "c").glob("*.u8")) == files, "the same files and size: reused"
    image = next((tree / "train" / "cat").iterdir())
    os.utime(image, ns=(0, 0))
    _dataset(tree, tmp_path, cache="disk")
    assert len(list((tmp_path / "c").glob("*.u8"))) == 2, "a changed file: a new cache"


def test_unknown_cache_mode_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"data.cache='ram' is not one of none, memory, disk"):
        ImageFolderData(str(tmp_path), {}, batch_size=4, cache="ram")


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [
            {k: v for k, v in r.items() if "time_s" not in k and "per_s" not in k} for r in csv.DictReader(f)
        ]


@pytest.mark.slow
def test_a_run_gives_the_same_results_with_and_without_the_cache(tmp_path):
    tree = make_tree(tmp_path / "tree", counts={"train": 8, "val": 4})
    runs = {}
    for mode in ("none", "memory"):
        cwd = tmp_path / mode
        cwd.mkdir()
        args = [*TINY, f"data.root={tree}", "deterministic=true", "data.num_workers=2", f"data.cache={mode}"]
        result = cli_here("imgcls.train", *args, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        (runs[mode],) = run_dirs(cwd)
    assert "image cache (memory): 24 images" in (runs["memory"] / "logs" / "train.log").read_text()
    assert _metrics(runs["none"]) == _metrics(runs["memory"])
    a = torch.load(runs["none"] / "weights" / "last.pt", weights_only=True)["model"]
    b = torch.load(runs["memory"] / "weights" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("size", [None, 12])
def test_header_shapes_equal_decoded_shapes(tmp_path, size):
    """The cache sizes its buffer from headers before decoding: EXIF rotations and the shorter-side
    resize must give exactly the shape a decode does."""
    from PIL import Image

    from imgcls.data.cache import decode, decoded_shape

    im = Image.new("RGB", (40, 24), (10, 200, 30))
    paths = []
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(tmp_path / f"o{orientation}.jpg")
        im.save(paths[-1], exif=exif)
    Image.new("RGB", (9, 30)).save(tmp_path / "small.png")  # shorter side below size: never enlarged
    paths.append(tmp_path / "small.png")
    for path in paths:
        assert decoded_shape(path, size) == tuple(decode(path, size).shape), path
    assert decoded_shape(paths[2]) == (3, 40, 24)  # orientation 6: stored sideways
