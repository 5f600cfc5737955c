"""Broken and hostile files: whatever a decoder raises on one file is that file's reason, in the
data check (both on_bad_image modes), in training's loaders and caches, never a traceback."""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from conftest import TINY, cli_here, make_tree, run_dirs
from odd_files import BAD, GOOD, HOSTILE, mutations, png, write_hostile
from PIL import Image

from imgcls.data import (
    BadImageError,
    DataError,
    DataRecord,
    ImageFolderData,
    load_image,
    make_dataset,
    make_loader,
)
from imgcls.data.scan import scan_files

EXTENSIONS = [".jpg", ".png", ".gif", ".bmp", ".tif", ".webp", ".ico", ".icns", ".psd"]  # HOSTILE's


def data(root: Path, **kwargs) -> ImageFolderData:
    splits = {"train": "train", "val": "val", "test": "test"}
    return ImageFolderData(str(root), splits, batch_size=4, extensions=EXTENSIONS, **kwargs)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_file_decodes_or_says_why_on_one_line(tmp_path: Path, name):
    (path,) = write_hostile(tmp_path, [name])
    if name in GOOD:
        image = load_image(path)
        assert image.mode == "RGB" and min(image.size) > 0
        return
    with pytest.raises(BadImageError) as info:
        load_image(path)
    why = str(info.value)
    assert re.match(BAD[name], why), why
    assert "\n" not in why and len(why) <= 240


def test_warnings_turned_errors_do_not_decide_a_file(tmp_path: Path):
    """Under -W error, Pillow's warnings would be exceptions: a file with a corrupt EXIF block or a
    cut second frame still decodes, and one past the pixel limit is refused by the limit."""
    exif_garbage, second_frame = write_hostile(tmp_path, ["exif_garbage.jpg", "second_frame_cut.gif"])
    (tmp_path / "warned.png").write_bytes(png(10_000, 9_000))  # 90 M pixels: DecompressionBombWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error")
        assert load_image(exif_garbage).size == (48, 40)
        assert load_image(second_frame).size == (20, 20)
        with pytest.raises(
            BadImageError, match=r"10000x9000 = 90,000,000 pixels, above data.max_image_pixels"
        ):
            load_image(tmp_path / "warned.png")
    assert caught == []


def test_the_reason_names_the_exception_type():
    from imgcls.data.images import reason

    assert reason(ValueError("a\n  b")) == "ValueError: a b"
    assert reason(IndexError()) == "IndexError"
    assert reason(struct.error("short")) == "struct.error: short"
    assert reason(zlib.error("bad")) == "zlib.error: bad"
    assert reason(Image.DecompressionBombError("big")) == "DecompressionBombError: big"
    assert len(reason(OSError("x" * 1000))) == 200


@pytest.fixture
def hostile_tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "tree", size=(40, 40))
    write_hostile(root / "train" / "cat")
    return root


def test_error_mode_lists_every_hostile_file_with_its_reason(hostile_tree: Path):
    with pytest.raises(DataError) as info:
        data(hostile_tree).scan()
    message = str(info.value)
    assert f"{len(BAD)} file(s) cannot be used (set data.on_bad_image=skip to leave them out)" in message
    for name, why in BAD.items():
        assert re.search(rf"^    train/cat/{re.escape(name)}: {why}[^\n]*$", message, re.M), name
    for name in GOOD:
        assert name not in message


def test_skip_mode_leaves_hostile_files_out_and_keeps_the_sound_odd_ones(hostile_tree: Path):
    d = data(hostile_tree, on_bad_image="skip")
    record = d.scan()
    names = {Path(p).name for p, _ in record.samples["train"]}
    assert not names & set(BAD) and set(GOOD) <= names
    assert record.report.skipped_bad == len(BAD)
    assert f"skipped {len(BAD)} unreadable file(s) (data.on_bad_image=skip)" in "\n".join(
        record.report.warnings
    )
    for i, (path, _) in enumerate(record.samples["train"]):
        image, _ = make_dataset(d, record, "train")[i]
        assert tuple(image.shape) == (3, *reversed(load_image(path).size))


@pytest.fixture
def fuzz_tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "fuzz", size=(40, 40))
    for name, content in mutations().items():
        (root / "train" / "dog" / name).write_bytes(content)
    return root


def test_mutated_files_are_decoded_or_listed_in_both_modes(fuzz_tree: Path):
    mutated = {f"train/dog/{name}" for name in mutations()}
    assert len(mutated) == 54
    with pytest.raises(DataError) as info:
        data(fuzz_tree).scan()
    message = str(info.value)
    records = scan_files(fuzz_tree, [fuzz_tree / rel for rel in sorted(mutated)], 89_478_485).records
    bad = {rel for rel, record in records.items() if record.error}
    assert 12 <= len(bad) < len(mutated)  # the damage is varied: some files survive it
    assert f"{len(bad)} file(s) cannot be used" in message
    for rel, record in records.items():
        if record.error:
            assert f"\n    {rel}: {record.error}\n" in message + "\n"
            assert "\n" not in record.error
        else:  # accepted: it really decodes, to RGB of the size the check recorded
            image = load_image(fuzz_tree / rel)
            assert image.mode == "RGB" and image.size == (record.width, record.height), rel
    skip = data(fuzz_tree, on_bad_image="skip")
    record = skip.scan()
    kept = {Path(p).relative_to(fuzz_tree).as_posix() for p, _ in record.samples["train"]}
    assert kept & mutated == mutated - bad and record.report.skipped_bad == len(bad)
    assert any(w.startswith(f"skipped {len(bad)} unreadable file(s)") for w in record.report.warnings)


def test_the_check_cli_lists_hostile_files_without_a_traceback_or_warnings(
    hostile_tree: Path, tmp_path: Path
):
    result = cli_here(
        "imgcls.data", "check", "data=imagefolder", f"data.root={hostile_tree}",
        f"data.extensions=[{','.join(EXTENSIONS)}]", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    for name, why in BAD.items():
        assert re.search(rf"train/cat/{re.escape(name)}: {why}", result.stdout), name
    assert "error: 1 problem(s) in" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "Warning" not in result.stderr  # Pillow's notes on odd files are not printed, per file or at all


@pytest.mark.slow
def test_training_in_skip_mode_trains_around_hostile_files(hostile_tree: Path, tmp_path: Path):
    result = cli_here(
        "imgcls.train", *TINY, "trainer.epochs=1", f"data.root={hostile_tree}", "data.on_bad_image=skip",
        f"data.extensions=[{','.join(EXTENSIONS)}]", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    (run,) = run_dirs(tmp_path)
    assert (
        f"skipped {len(BAD)} unreadable file(s) (data.on_bad_image=skip)" in (run / "summary.txt").read_text()
    )


def replace_after_the_check(record: DataRecord, split: str) -> str:
    path, _ = record.samples[split][0]
    Path(path).write_bytes(HOSTILE["ztxt_bomb.png"][0]())  # a ValueError inside Image.open
    return path


def test_a_file_that_turns_hostile_after_the_check_stops_loading_with_its_name(tmp_path: Path):
    d = data(make_tree(tmp_path / "t"))
    record = d.scan()
    path = replace_after_the_check(record, "val")
    with pytest.raises(DataError) as info:
        for _ in make_loader(d, record, "val", None, train=False):
            pass
    assert str(info.value) == (
        f"cannot decode image {path}: cannot decode (ValueError: Decompressed data too large for "
        "PngImagePlugin.MAX_TEXT_CHUNK) (it decoded when checked: it changed since)"
    )


TURN_HOSTILE_IN_TRAINING = """
import sys
from pathlib import Path
from imgcls.data.folder import ImageFolderData
from imgcls.train import main

checked = ImageFolderData.scan
hostile = Path(sys.argv.pop()).read_bytes()  # the last argument; the rest are Hydra's


def scan(self, **kwargs):
    record = checked(self, **kwargs)
    Path(record.samples["train"][0][0]).write_bytes(hostile)
    return record


ImageFolderData.scan = scan
main()
"""


@pytest.mark.slow
def test_training_stops_on_a_file_that_turned_hostile_and_exits(tmp_path: Path):
    """In a loader worker: the error comes back without the worker's traceback, and the process
    exits (workers ignore SIGTERM: the run used to print the error, then hang at exit)."""
    import subprocess
    import sys

    tree = make_tree(tmp_path / "t")
    (tmp_path / "hostile.png").write_bytes(HOSTILE["ztxt_bomb.png"][0]())
    args = [
        *TINY,
        "data.num_workers=2",
        "trainer.epochs=1",
        f"data.root={tree}",
        str(tmp_path / "hostile.png"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", TURN_HOSTILE_IN_TRAINING, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    path = tree / "train" / "cat" / "cat_000.jpg"
    assert f"error: cannot decode image {path}: cannot decode (ValueError: Decompressed data" in result.stderr
    assert "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr


def test_the_image_cache_names_a_file_that_turned_hostile(tmp_path: Path):
    d = data(make_tree(tmp_path / "t"), cache="memory")
    record = d.scan()
    path = replace_after_the_check(record, "train")
    with pytest.raises(
        DataError, match=rf"^cannot decode image {re.escape(path)}: .*ValueError: Decompressed"
    ):
        make_dataset(d, record, "train")


def test_a_file_gone_after_listing_is_a_bad_file(tmp_path: Path):
    from imgcls.data.scan import inspect_file

    record = inspect_file(tmp_path / "gone.jpg", 1000)
    assert record.error == "cannot read: No such file or directory"
    with pytest.raises(BadImageError, match="cannot read: No such file or directory"):
        load_image(tmp_path / "gone.jpg")


def test_formats_outside_the_list_are_never_opened(tmp_path):
    """Pillow picks a plugin by content: an EPS file named .jpg would reach Ghostscript on load.
    imgcls names its formats, so such a file is refused by what it is, before any plugin loads it."""
    from imgcls.data.images import BadImageError, load_image

    eps = tmp_path / "drawing.jpg"
    eps.write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"
    )
    with pytest.raises(BadImageError, match=r"a EPS file, not an image format imgcls reads \(JPEG, "):
        load_image(eps)
