"""Evaluation figures: the reliability diagram, the grid of the most confidently wrong images, and
the font that draws the class names (Chinese, Arabic, ... as well as Latin)."""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imgcls.data import load_image  # noqa: E402
from imgcls.names import draw_literally, literal_text, shown  # noqa: E402

CLASS_INDEX_FILE = "class_index.txt"  # beside figures whose class names no font could draw
# tried first among the fonts that have every character: wide coverage, made for screen text
_PREFERRED = ("notosanscjk", "noto sans cjk", "sourcehansans", "wqy", "wenquanyi", "droidsansfallback")
_warned: set[frozenset[str]] = set()


def label_font(labels: Iterable[str]) -> str | None:
    """The font file that draws every character of `labels`: "" when matplotlib's default font
    does, else the path of an installed font that does (Noto CJK, WenQuanYi, ...), else None, and
    a warning, once per set of labels, that the figures label those classes by index instead."""
    from loguru import logger

    chars = _chars(labels)
    font = _font_for(chars)
    if font is None and chars not in _warned:
        _warned.add(chars)
        missing = sorted(chars - _charset(_default_font()))
        logger.warning(
            f"no font on this machine draws the characters {''.join(missing[:20])!r} of the class names: "
            f"the confusion matrices label the classes by index, with the names in {CLASS_INDEX_FILE} "
            "beside them (install a font that has them, e.g. apt-get install fonts-noto-cjk, to see the names)"
        )
    return font


def font_for(texts: Iterable[str]) -> str | None:
    """label_font's answer for any texts, without the warning."""
    return _font_for(_chars(texts))


def _chars(texts: Iterable[str]) -> frozenset[str]:
    return frozenset(c for c in "".join(texts) if not c.isspace())


@functools.lru_cache(maxsize=64)
def _font_for(chars: frozenset[str]) -> str | None:
    codes = {ord(c) for c in chars}
    if codes <= _charset(_default_font()):
        return ""
    fonts = sorted(_installed_fonts(), key=lambda p: not any(k in p.lower() for k in _PREFERRED))
    # Last Resort (shipped with matplotlib since 3.10) maps every code point to a box that names
    # its Unicode block: it "has" every character and draws none of them
    fonts = [path for path in fonts if "lastresort" not in Path(path).name.lower()]
    return next((path for path in fonts if codes <= _charset(path)), None)


def _default_font() -> str:
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties())


def _installed_fonts() -> list[str]:
    """Font files matplotlib knows, then any its font cache predates (installed after it first ran)."""
    from matplotlib import font_manager

    known = [f.fname for f in font_manager.fontManager.ttflist]
    return known + sorted(set(font_manager.findSystemFonts()) - set(known))


@functools.lru_cache(maxsize=256)
def _charset(path: str) -> frozenset[int]:
    """The code points a font file maps to glyphs (the first face of a .ttc collection)."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:  # not a TrueType/OpenType file (Type 1, a broken file): draws nothing here
        return frozenset()


def save_figure(fig, path: Path, writer=None, tag: str = "", step: int = 0, **kwargs) -> Path:
    """Save a figure with every title and label inside the image: the canvas grows to what was
    drawn (bbox_inches="tight"), so a long title on a narrow figure is never cut at the edges.
    With a TensorBoard `writer`, the saved PNG goes there too, as the image `tag`: TensorBoard
    shows the file's pixels, and the figure is not drawn a third time (add_figure renders it
    again; drawing was 12% of the quick test loop's samples).

    Every text is drawn as written (names.literal_text): a figure made elsewhere saves safely too."""
    draw_literally(fig)
    with literal_text():  # the tick labels matplotlib makes while it draws
        fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15, **kwargs)
    if writer is not None:
        from PIL import Image

        with Image.open(path) as image:
            writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
    return path


def short_label(name: str, limit: int = 24) -> str:
    """A class name for an axis: names past `limit` characters keep their start and end."""
    return name if len(name) <= limit else f"{name[: limit - 9]}…{name[-8:]}"


def use_font(texts: Iterable, font: str | None) -> None:
    """Draw matplotlib Text objects with the font file `font` (label_font's answer), same size."""
    if font:
        from matplotlib.font_manager import FontProperties

        for text in texts:
            text.set_fontproperties(FontProperties(fname=font, size=text.get_fontsize()))


def write_class_index(folder: Path, class_names: Sequence[str]) -> Path | None:
    """<folder>/class_index.txt, the index -> name table, when no font draws the names or a name is
    too long for an axis (short_label)."""
    class_names = [shown(c) for c in class_names]  # as the confusion matrices draw them
    if label_font(class_names) is not None and all(short_label(c) == c for c in class_names):
        return None
    path = Path(folder) / CLASS_INDEX_FILE
    path.write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(class_names)), encoding="utf-8")
    return path


@literal_text()  # the title may hold a run's or a split's name
def reliability_figure(bins: dict[str, np.ndarray], ece: float, title: str):
    """Accuracy per confidence bin against the diagonal of perfect calibration (the red part of a
    bar is the gap), and below it how many samples fell in each bin."""
    edges, count = bins["edges"], bins["count"]
    width = np.diff(edges)
    centers = edges[:-1] + width / 2
    filled = count > 0
    acc = np.where(filled, bins["accuracy"], 0.0)
    conf = np.where(filled, bins["confidence"], centers)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(centers, acc, width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    top.bar(
        centers[filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=width[filled],
        edgecolor="#c44e52",
        color="#c44e52",
        alpha=0.35,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE {ece:.4f} over {len(count)} bins")
    top.legend(loc="upper left")
    bottom.bar(centers, count, width=width, edgecolor="black", color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("samples")
    fig.tight_layout()
    return fig


@literal_text()  # class and file names drawn as written: a name like $\frac{$ is text, not math
def error_grid_figure(
    paths: Sequence[str],
    true: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
    title: str,
    columns: int = 5,
):
    """The images as read from disk (before any transform), each titled true / predicted (conf)."""
    n = len(paths)
    if n == 0:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}\nno misclassified samples", ha="center", va="center")
        return fig
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    titles = [  # names shown escaped: a file name that is not UTF-8 is drawn as "\xff"
        f"true: {shown(t)}\npred: {shown(p)} ({c:.2f})\n{shown(path.replace(chr(92), '/').rsplit('/', 1)[-1])[:28]}"
        for path, t, p, c in zip(paths, true, predicted, confidence, strict=True)
    ]
    font = font_for(titles)  # names in other scripts; none found: the confusion matrix said so
    for ax, path, label in zip(axes.flat, paths, titles, strict=False):
        image = load_image(path)
        image.thumbnail((256, 256))
        ax.imshow(np.asarray(image), interpolation="nearest" if min(image.size) < 64 else "antialiased")
        use_font([ax.set_title(label, fontsize=8, color="#c44e52")], font)
    title = "\n".join(
        textwrap.wrap(title, width=max(30, int(10 * fig.get_figwidth())))
    )  # ~10 characters an inch
    fig.suptitle(title)
    lines = title.count("\n") + 1
    fig.tight_layout(
        rect=(0, 0, 1, 1 - 0.3 * (lines + 1) / fig.get_figheight())
    )  # the title gets its own lines
    return fig
