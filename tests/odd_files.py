"""Broken and hostile image files, crafted byte by byte: for the data check, training and predict."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

SIZE = (48, 40)


def noisy(size=SIZE, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8))


def encoded(fmt: str, image: Image.Image | None = None, **kwargs) -> bytes:
    buf = io.BytesIO()
    (image or noisy()).save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, *chunks: bytes) -> bytes:
    """A PNG of 8-bit RGB whose header claims width x height, with the given chunks before IEND."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + png_chunk(b"IEND", b"")


def huge_text(itxt: bool = False) -> bytes:
    """A compressed text chunk that expands past Pillow's MAX_TEXT_CHUNK: ValueError in Image.open."""
    info = PngImagePlugin.PngInfo()
    text = "A" * (PngImagePlugin.MAX_TEXT_CHUNK + 1)
    info.add_itxt("comment", text, zip=True) if itxt else info.add_text("comment", text, zip=True)
    return encoded("PNG", pnginfo=info)


def bad_ztxt() -> bytes:
    """A zTXt chunk whose compressed bytes are not zlib: Pillow drops the text, the pixels are fine."""
    good = encoded("PNG")
    return good[:33] + png_chunk(b"zTXt", b"comment\0\0" + b"\x78\x9c not zlib at all") + good[33:]


def flipped(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset % len(out)] ^= 0xFF
    return bytes(out)


def bmp_header_size(size: int) -> bytes:
    out = bytearray(encoded("BMP"))
    out[14:18] = struct.pack("<I", size)  # the DIB header's own size field
    return bytes(out)


def tiff_ifd_offset(offset: int) -> bytes:
    out = bytearray(encoded("TIFF"))
    out[4:8] = struct.pack("<I", offset)  # where the first IFD starts
    return bytes(out)


def animated_gif_broken_second_frame() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (20, 20), (220, 30, 30)), Image.new("RGB", (20, 20), (30, 30, 220))]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()[:-12]


def exif_jpeg(exif) -> bytes:
    return encoded("JPEG", exif=exif)


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def webp_chunk_length() -> bytes:
    out = bytearray(encoded("WEBP"))
    out[16:20] = struct.pack("<I", 0xFFFFFF)  # the VP8 chunk claims 16 MB
    return bytes(out)


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


# name -> (bytes, what the check says: a regex of the reason, or None: the file decodes)
HOSTILE = {
    "ztxt_bomb.png": (huge_text, r"cannot decode \(ValueError: Decompressed data too large"),
    "itxt_bomb.png": (
        lambda: huge_text(itxt=True),
        r"cannot decode \(ValueError: Decompressed data too large",
    ),
    "short_header.png": (
        lambda: b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", bytes(8)) + png_chunk(b"IEND", b""),
        r"cannot decode \(ValueError: Truncated IHDR chunk",
    ),
    "bad_header_crc.png": (
        lambda: flipped(encoded("PNG"), 29),
        r"cannot decode as PNG \(SyntaxError: broken PNG file \(bad header checksum",
    ),
    "zero_width.png": (lambda: png(0, 10), r"cannot decode as PNG \(SyntaxError"),
    "bomb.png": (lambda: png(70_000, 70_000), r"too many pixels, refused as a decompression bomb"),
    "header_cut.gif": (lambda: encoded("GIF")[:10], r"cannot decode as GIF \(SyntaxError"),
    "header_size.bmp": (lambda: bmp_header_size(0xFFFF), r"cannot decode \(OSError"),
    "header_type.bmp": (
        lambda: bmp_header_size(7),
        r"cannot decode \(OSError: Unsupported BMP header type \(7\)",
    ),
    "ifd_offset.tif": (lambda: tiff_ifd_offset(0x7FFFFFF0), r"cannot decode as TIFF \(SyntaxError"),
    "mid_scan.jpg": (
        lambda: truncated(encoded("JPEG"), 0.6),
        r"cannot decode \(OSError: image file is truncated",
    ),
    "header.ico": (lambda: b"\0\0\1\0\1\0" + b"\xff" * 10, r"cannot decode as ICO \(SyntaxError"),
    "subimage.icns": (
        lambda: b"icns" + struct.pack(">I", 100) + b"ic08" + struct.pack(">I", 0xFFFF) + bytes(20),
        r"a ICNS file, not an image format imgcls reads",  # recognized, never opened (IMAGE_FORMATS)
    ),
    "chunk_length.webp": (webp_chunk_length, r"cannot decode \(OSError"),
    "psd_header.psd": (
        lambda: b"8BPS\0\1" + bytes(8) + b"\xff" * 8,
        r"a PSD file, not an image format imgcls reads",
    ),
    # unusual but sound: the pixels are all there
    "orientation_99.jpg": (lambda: exif_jpeg(orientation(99)), None),
    "exif_garbage.jpg": (lambda: exif_jpeg(b"Exif\0\0II*\0" + b"\xff" * 40), None),
    "second_frame_cut.gif": (animated_gif_broken_second_frame, None),
    "bad_zlib_text.png": (bad_ztxt, None),
}
BAD = {name: why for name, (_, why) in HOSTILE.items() if why}
GOOD = sorted(name for name, (_, why) in HOSTILE.items() if not why)


def write_hostile(folder: Path, names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or HOSTILE:
        (folder / name).write_bytes(HOSTILE[name][0]())
        paths.append(folder / name)
    return paths


FUZZ_FORMATS = {"PNG": {}, "JPEG": {"quality": 90}, "GIF": {}, "BMP": {}, "TIFF": {}, "WEBP": {"quality": 80}}


def mutations() -> dict[str, bytes]:
    """Deterministic damage to one valid file per format: cut short, a header byte flipped or
    zeroed, a region zeroed. 9 per format, 54 in all; some still decode, most do not."""
    out = {}
    for fmt, kwargs in FUZZ_FORMATS.items():
        data = encoded(fmt, noisy(seed=len(out)), **kwargs)
        suffix = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
        for fraction in (0.05, 0.5, 0.9):
            out[f"{fmt}_cut{int(fraction * 100)}.{suffix}"] = truncated(data, fraction)
        for offset in (1, 12, 20, 30):
            out[f"{fmt}_flip{offset}.{suffix}"] = flipped(data, offset)
        out[f"{fmt}_nul11.{suffix}"] = data[:11] + b"\0" + data[12:]  # PNG: the header chunk's length
        zeroed = bytearray(data)
        start = len(data) // 2
        zeroed[start : start + len(data) // 10] = bytes(len(zeroed[start : start + len(data) // 10]))
        out[f"{fmt}_zero50.{suffix}"] = bytes(zeroed)
    return out


# predict's inputs: good images beside broken ones, name -> the reason in predictions.csv's `error`
UNREADABLE = {
    "bomb.png": r"too many pixels, refused as a decompression bomb",
    "empty.jpg": r"empty file \(0 bytes\)$",
    "mid_scan.jpg": r"cannot decode \(OSError: image file is truncated",
    "ztxt_bomb.png": r"cannot decode \(ValueError: Decompressed data too large",
}


def mixed_inputs(tree: Path, folder: Path) -> list[Path]:
    """<folder> with three good images of the tree's test split and the UNREADABLE files; returns
    the good ones."""
    import shutil

    good = sorted((tree / "test").glob("*/*_000.jpg"))
    folder.mkdir(parents=True)
    for path in good:
        shutil.copy(path, folder / path.name)
    write_hostile(folder, [n for n in UNREADABLE if n in HOSTILE])
    (folder / "empty.jpg").write_bytes(b"")
    return [folder / p.name for p in good]


def check_predictions(rows: list[dict], folder: Path, stderr: str, alone: list[dict]) -> None:
    """predictions.csv and the console of predict over mixed_inputs(folder): a row per input in
    order, the good ones predicted as when they are alone, the others empty with their reason."""
    import re

    assert [r["path"] for r in rows] == sorted(str(p) for p in folder.iterdir())
    assert list(rows[0])[-1] == "error" and list(rows[0])[:3] == ["path", "predicted", "confidence"]
    good = {r["path"]: r for r in rows if not r["error"]}
    assert good == {r["path"]: {**r, "error": ""} for r in alone} and len(good) == 3
    for row in rows:
        name = Path(row["path"]).name
        if name in UNREADABLE:
            assert re.match(UNREADABLE[name], row["error"]), (name, row["error"])
            assert all(v == "" for k, v in row.items() if k not in ("path", "error")), row
            assert f"  {row['path']}: {row['error']}\n" in stderr
        else:
            assert 0 < float(row["confidence"]) <= 1 and row["predicted"] == row["top1"]
    assert "4 of 7 input(s) cannot be read and were not predicted" in stderr
    assert "predictions for 3 of 7 image(s)" in stderr and "Traceback" not in stderr


# Names that look like images and are no regular file, or too large to read: name -> the reason
# (a regex) the check, training and predict give. Made by special_files.
SPECIAL = {
    "fifo.jpg": r"^a FIFO \(named pipe\), not an image file: remove it or move it out of the folder$",
    "zero.jpg": r"^a character device \(behind a symbolic link to /dev/zero\), not an image file",
    "null.png": r"^a character device \(behind a symbolic link to /dev/null\), not an image file",
    "socket.jpg": r"^a socket, not an image file",
    "sparse.jpg": r"^20,480\.0 MB, above data\.max_file_mb=256: not read .*raise data\.max_file_mb",
    "loop.jpg": r"^a symbolic link loop \(to loop\.jpg\), not an image file",
    "broken.jpg": r"^a broken symbolic link \(to nowhere\.jpg\), not an image file",
}
SPARSE_BYTES = 20 * 2**30  # `truncate -s 20G`: no disk used, 20 GB to a reader that trusts the size


def special_files(folder: Path) -> list[Path]:
    """SPECIAL's files in folder: a FIFO, links to /dev/zero and /dev/null, a bound UNIX socket, a
    20 GB sparse file, a link to itself and a link to nothing."""
    import os
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink("/dev/null", folder / "null.png")
    with open(folder / "sparse.jpg", "wb") as f:
        f.truncate(SPARSE_BYTES)
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("nowhere.jpg", folder / "broken.jpg")
    # a socket's path must fit in 108 bytes: bound by its short relative name inside the folder
    here = os.getcwd()
    try:
        os.chdir(folder)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind("socket.jpg")
        sock.close()  # the socket file stays, as one left by a crashed server
    finally:
        os.chdir(here)
    return [folder / name for name in SPECIAL]


def release_fifos(paths) -> None:
    """Open each FIFO for writing and close it: a reader blocked on it gets EOF. A regression that
    opens a FIFO then fails its test instead of hanging the suite."""
    import os
    import stat

    for path in paths:
        try:
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody is reading it: nothing to release
