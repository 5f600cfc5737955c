"""Decode any common image file to 8-bit RGB, the same way in the data check and in training."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Pillow's own limit (about 9459 x 9459): a 100 kB PNG can expand to gigabytes of pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# Transparent pixels become white: logos, product shots and icons are drawn for a light page;
# plain convert("RGB") keeps whatever color the transparent pixels happen to store (often black).
BACKGROUND = (255, 255, 255)
ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# load_image enforces max_pixels itself, before decoding; Pillow's warning would only repeat it
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImageError(Exception):
    """One file that cannot become an RGB image; the message says why (the caller names the file)."""


def load_image(source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode as 8-bit RGB: EXIF orientation applied, alpha composited onto white, 16-bit scaled.

    Raises BadImageError for anything else: not an image, truncated, too many pixels, odd modes.
    """
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # Pillow refuses outright above twice its own limit; ours is the one that counts
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"too many pixels, refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        if _is_empty(source):
            raise BadImageError("empty file (0 bytes)") from exc
        raise BadImageError("not an image: no image format recognizes its content") from exc
    except OSError as exc:  # e.g. a header cut short
        raise BadImageError(f"cannot decode ({type(exc).__name__}: {exc})") from exc
    with opened as im:
        width, height = im.size
        if width * height > max_pixels:
            raise BadImageError(
                f"{width}x{height} = {width * height:,} pixels, above data.max_image_pixels="
                f"{max_pixels:,} (the decompression-bomb guard); raise it to load this image"
            )
        try:
            im.load()  # every byte now: a truncated file fails here, not mid-epoch
        except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ...
            raise BadImageError(f"cannot decode ({type(exc).__name__}: {exc})") from exc
        try:
            oriented = ImageOps.exif_transpose(im)  # a new image, rotated as the camera meant
        except Exception:  # a corrupt EXIF block: the pixels are fine, keep them as stored
            oriented = im.copy()
        rgb = to_rgb(oriented)
        return rgb if rgb is not im else im.copy()


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
        raise BadImageError(f"pixel mode {mode} cannot be converted to RGB ({exc})") from exc


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


def _is_empty(source: str | Path | BinaryIO) -> bool:
    if isinstance(source, (str, Path)):
        return Path(source).stat().st_size == 0
    return len(source.getvalue()) == 0 if isinstance(source, io.BytesIO) else False
