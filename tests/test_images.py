"""load_image: every common file decodes to the right RGB pixels; everything else fails, saying why."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data import BadImageError, load_image

RED, BLUE = (220, 30, 30), (30, 30, 220)


def solid(color, size=(24, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def close(im: Image.Image, color, tol=6) -> bool:
    return bool(np.abs(pixels(im).reshape(-1, 3).mean(0) - np.array(color)).max() <= tol)


@pytest.mark.parametrize(
    ("fmt", "suffix", "kwargs"),
    [
        ("JPEG", ".jpg", {"quality": 95}),
        ("JPEG", ".jpg", {"quality": 95, "progressive": True}),
        ("PNG", ".png", {}),
        ("WEBP", ".webp", {"lossless": True}),
        ("TIFF", ".tif", {}),
        ("BMP", ".bmp", {}),
        ("PPM", ".ppm", {}),
    ],
)
def test_common_formats_decode_to_their_colors(tmp_path: Path, fmt, suffix, kwargs):
    path = tmp_path / f"x{suffix}"
    solid(RED).save(path, fmt, **kwargs)
    im = load_image(path)
    assert im.size == (24, 16) and close(im, RED)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path):
    solid(90, mode="L").save(tmp_path / "g.png")
    assert (pixels(load_image(tmp_path / "g.png")) == 90).all()


def test_cmyk_jpeg_keeps_its_colors(tmp_path: Path):
    solid(RED).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert close(load_image(tmp_path / "c.jpg"), RED, tol=8)


def test_cmyk_with_an_unusable_profile_falls_back_to_the_plain_conversion(tmp_path: Path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # not a CMYK profile
    solid(RED).convert("CMYK").save(tmp_path / "c.jpg", quality=95, icc_profile=srgb)
    assert Image.open(tmp_path / "c.jpg").info["icc_profile"]
    assert close(load_image(tmp_path / "c.jpg"), RED, tol=8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_is_scaled_not_clipped_to_white(tmp_path: Path, suffix):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / f"d{suffix}")
    assert Image.open(tmp_path / f"d{suffix}").mode == "I;16"
    got = pixels(load_image(tmp_path / f"d{suffix}"))[0, :, 0]
    assert got.tolist() == [0, 1, 128, 255]


def test_sixteen_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    assert Image.open(tmp_path / "d.png").convert("RGB").getpixel((2, 0)) == (255, 255, 255)  # the bug
    got = pixels(load_image(tmp_path / "d.png"))[0, :, 0]
    assert got.tolist() == [0, 1, 128, 255]


def test_rgba_is_composited_onto_white(tmp_path: Path):
    rgba = np.zeros((2, 2, 4), np.uint8)  # transparent black: a bare convert("RGB") gives black
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 128)  # half-transparent red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = pixels(load_image(tmp_path / "a.png"))
    assert got[0, 0].tolist() == [255, 0, 0]
    assert got[1, 1].tolist() == [255, 255, 255]
    assert abs(got[0, 1] - [255, 127, 127]).max() <= 1


def test_palette_with_transparency_is_composited_onto_white(tmp_path: Path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    got = pixels(load_image(tmp_path / "p.png"))
    assert got[0, 0].tolist() == [200, 30, 30] and got[3, 3].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path: Path):
    im = Image.new("RGB", (20, 10), BLUE)
    im.paste(RED, (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    got = load_image(tmp_path / "r.jpg")
    assert got.size == (10, 20)
    assert close(got.crop((0, 0, 10, 8)), RED, tol=10)  # the left half is now on top


def test_animated_gif_gives_its_first_frame(tmp_path: Path):
    frames = [solid(RED), solid(BLUE)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "a.gif").n_frames == 2
    assert close(load_image(tmp_path / "a.gif"), RED, tol=10)


def test_pixel_limit_refuses_before_decoding(tmp_path: Path):
    solid(RED, size=(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(BadImageError, match=r"100x100 = 10,000 pixels, above data.max_image_pixels=5,000"):
        load_image(tmp_path / "big.png", max_pixels=5000)
    assert load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)


def test_pillow_bomb_error_is_reported_as_a_bad_image(tmp_path: Path, monkeypatch):
    solid(RED, size=(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above twice this
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(tmp_path / "big.png", max_pixels=500)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file (0 bytes)"),
        (b"just some notes, saved as .jpg\n", "not an image"),
        ("truncated", "cannot decode"),
    ],
)
def test_unusable_files_say_why(tmp_path: Path, content, message):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=re.escape(message)):
        load_image(path)


def test_float_images_are_refused_not_guessed(tmp_path: Path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(BadImageError, match="mode F"):
        load_image(tmp_path / "f.tif")
