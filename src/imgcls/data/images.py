"""Decode any common image file to 8-bit RGB, the same way in the data check and in training."""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Pillow's own limit (about 9459 x 9459): a 100 kB PNG can expand to gigabytes of pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# data.max_file_mb: no file above it is read. A 50-megapixel camera JPEG is 15-25 MB, its RAW-free
# 16-bit TIFF about 300 MB only when uncompressed; 256 MB admits any photo the decoders handle
# within DEFAULT_MAX_PIXELS, and stops a 20 GB sparse file named x.jpg before its first byte.
DEFAULT_MAX_FILE_MB = 256
MB = 1 << 20
# The raster formats imgcls reads. Pillow picks a plugin by a file's content, whatever its suffix
# says, and some of its plugins must never see an untrusted file: EPS runs Ghostscript (a
# PostScript interpreter) on load. Every Image.open names these (JPEG covers camera MPO files).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF", "JPEG2000", "TGA", "ICO")
# Transparent pixels become white: logos, product shots and icons are drawn for a light page;
# plain convert("RGB") keeps whatever color the transparent pixels happen to store (often black).
BACKGROUND = (255, 255, 255)
ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _quiet_pillow() -> None:
    """Pillow's warnings about a file never decide its fate, nor reach the console.

    It warns about what it finds in a file (corrupt EXIF, a tag past the end, an odd palette, a
    bomb below our own limit, which load_image enforces before decoding): each file is already
    decoded or refused with its reason, and a tree of scanned photos would print a warning per
    camera. Under `-W error` those warnings would refuse files whose pixels are fine. Its warnings
    about our own calls (DeprecationWarning) still show."""
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"PIL(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_quiet_pillow()
# load_image puts them back in front when a later filter (-W error, a test's catch_warnings) hid them
_QUIET_FILTERS = warnings.filters[:3]
REASON_CHARS = 200  # a reason is one line of the check's list, however long the decoder's message


class BadImageError(Exception):
    """One file that cannot become an RGB image; the message says why (the caller names the file)."""


def reason(exc: BaseException) -> str:
    """`TypeName: message` on one short line: why a decoder gave up on a file."""
    kind = type(exc)
    # struct.error and zlib.error are both called `error`: keep the module outside builtins and PIL
    plain = kind.__module__ == "builtins" or kind.__module__.startswith("PIL")
    name = kind.__qualname__ if plain else f"{kind.__module__}.{kind.__qualname__}"
    text = " ".join(str(exc).split())
    line = f"{name}: {text}" if text else name
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


# what a path that is not a regular file is, by its mode: none of them is opened
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)
_READ_CHUNK = 16 * MB  # a read never asks for more at once, whatever the cap


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def file_problem(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_MB * MB) -> str | None:
    """Why `path` must not be read as an image, from its metadata alone (nothing is opened), or
    None for a regular file of at most max_bytes. A FIFO would block the reader forever, a device
    (a symbolic link to /dev/zero) never ends, a sparse file claims gigabytes: each is refused
    by what it is, before a byte is read."""
    try:
        st = os.stat(path)  # follows symbolic links: what a reader would get
    except OSError as exc:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            what = "a symbolic link loop" if exc.errno == errno.ELOOP else "a broken symbolic link"
            return f"{what} (to {target}), not an image file: remove it or fix its target"
        return f"cannot read: {exc.strerror or reason(exc)}"
    if not stat.S_ISREG(st.st_mode):
        via = f" (behind a symbolic link to {os.readlink(path)})" if os.path.islink(path) else ""
        return f"{_kind(st.st_mode)}{via}, not an image file: remove it or move it out of the folder"
    if st.st_size > max_bytes:
        return too_big(st.st_size, max_bytes)
    return None


def too_big(size: int, max_bytes: int) -> str:
    return (
        f"{size / MB:,.1f} MB, above data.max_file_mb={max_bytes / MB:g}: not read (a photo is a few MB); "
        "raise data.max_file_mb to read it"
    )


def read_image_file(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_MB * MB) -> bytes:
    """The bytes of a regular file of at most max_bytes; BadImageError says why for anything else.

    file_problem decides before the file is opened; the open is non-blocking and the opened file
    is checked again (the path may have been swapped for a FIFO in between), and the read stops at
    max_bytes + 1 bytes (a file may grow after its size was read)."""
    problem = file_problem(path, max_bytes)
    if problem:
        raise BadImageError(problem)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:  # gone, no permission, a broken network mount
        raise BadImageError(f"cannot read: {exc.strerror or reason(exc)}") from exc
    with os.fdopen(fd, "rb", buffering=0) as file:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadImageError(
                    f"{_kind(st.st_mode)}, not an image file: remove it or move it out of the folder"
                )
            chunks, total = [], 0
            while total <= max_bytes:
                chunk = file.read(min(_READ_CHUNK, max_bytes + 1 - total, max(st.st_size - total, 0) + 1))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as exc:  # EIO on a failing disk, a network mount gone mid-read
            raise BadImageError(f"cannot read: {exc.strerror or reason(exc)}") from exc
    if total > max_bytes:
        raise BadImageError(too_big(total, max_bytes))
    return b"".join(chunks)


def load_image(
    source: str | Path | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_FILE_MB * MB,
) -> Image.Image:
    """Decode as 8-bit RGB: EXIF orientation applied, alpha composited onto white, 16-bit scaled.

    A path is read through read_image_file (regular files of at most max_bytes only); an open
    file object is the caller's, read as it is.
    Raises BadImageError for anything else: not an image, truncated, too many pixels, odd modes,
    and whatever a decoder raises on a broken or hostile file (Pillow's plugins raise ValueError,
    SyntaxError, struct.error, zlib.error, EOFError, IndexError, ...: each is a fact about the
    file). Only MemoryError, KeyboardInterrupt and SystemExit pass through: they are not the file's.
    """
    if warnings.filters[:3] != _QUIET_FILTERS:
        _quiet_pillow()
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # Pillow refuses outright above twice its own limit; ours is the one that counts
        Image.MAX_IMAGE_PIXELS = max_pixels
    if not isinstance(source, (str, os.PathLike)):
        return _decode(source, max_pixels)
    return _decode(io.BytesIO(read_image_file(source, max_bytes)), max_pixels)


def _decode(fp: BinaryIO, max_pixels: int) -> Image.Image:
    try:
        return _decode_rgb(fp, max_pixels)
    except (BadImageError, MemoryError):
        raise
    except Exception as exc:  # see load_image: any decoder failure is the file's
        raise BadImageError(f"cannot decode ({reason(exc)})") from exc


def _decode_rgb(fp: BinaryIO, max_pixels: int) -> Image.Image:
    try:
        opened = Image.open(fp, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadImageError(
            f"too many pixels, refused as a decompression bomb ({' '.join(str(exc).split())})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(_unidentified(fp)) from exc
    with opened as im:
        width, height = im.size
        if width < 1 or height < 1:
            raise BadImageError(f"{width}x{height}: an image without pixels")
        if width * height > max_pixels:
            raise BadImageError(
                f"{width}x{height} = {width * height:,} pixels, above data.max_image_pixels="
                f"{max_pixels:,} (the decompression-bomb guard); raise it to load this image"
            )
        im.load()  # every byte now: a truncated file fails here, not mid-epoch
        try:
            oriented = ImageOps.exif_transpose(im)  # a new image, rotated as the camera meant
        except MemoryError:
            raise
        except Exception:  # a corrupt EXIF block: the pixels are fine, keep them as stored
            oriented = im.copy()
        rgb = to_rgb(oriented)
        return rgb if rgb is not im else im.copy()


def _unidentified(fp: BinaryIO) -> str:
    """Why no format opened the file: empty, not an image at all, or a format that recognizes its
    first bytes and then finds the header broken (Pillow swallows that reason and moves on)."""
    fp.seek(0, os.SEEK_END)
    if fp.tell() == 0:
        return "empty file (0 bytes)"
    fp.seek(0)
    prefix = fp.read(16)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if not accept or isinstance(accept(prefix), str) or not accept(prefix):
                continue  # a format without a signature test would claim anything
            if fmt not in IMAGE_FORMATS:  # recognized, and never opened: see IMAGE_FORMATS
                return f"a {fmt} file, not an image format imgcls reads ({', '.join(IMAGE_FORMATS)})"
            fp.seek(0)
            factory(fp, "").close()
        except MemoryError:
            raise
        except Exception as exc:
            return f"cannot decode as {fmt} ({reason(exc)})"
    return "not an image: no image format recognizes its content"


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, without the silent losses of a bare convert("RGB")."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255, so nearly every pixel turns white; scale instead
        pixels = np.asarray(im).astype(np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise BadImageError(f"{mode} pixels outside 0..65535 have no standard 8-bit scaling")
        pixels = (pixels * 255 + 32767) // 65535  # rounded: 65535 -> 255, 257 -> 1
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise BadImageError("32-bit float pixels (mode F) have no standard range; save as 8 or 16 bit")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise BadImageError(f"pixel mode {mode} cannot be converted to RGB ({reason(exc)})") from exc


_SRGB = None


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """Through the file's ICC profile when it has one (print CMYK is not a formula away from RGB)."""
    global _SRGB
    icc = im.info.get("icc_profile")
    if icc:
        try:
            if _SRGB is None:
                _SRGB = ImageCms.createProfile("sRGB")
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, source, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to Pillow's naive conversion below
    return im.convert("RGB")
