"""The embedded default data set: scikit-learn's handwritten digits, written once as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data import DataError, ImageFolderData
from imgcls.files import atomic_path

MARKER = ".imgcls-digits"
# conf/data/digits.yaml's root (a test keeps the two equal): the one folder the digits are
# written into when it is missing. Anywhere else a missing data.root is far more likely a typo
# for the user's own tree (data.root without data=imagefolder) than a wish for digits there.
DEFAULT_ROOT = Path("data/digits")
SPLIT_SEED = 0  # fixed: every machine gets the same train/val/test files
FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


def split_indices(targets: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """A stratified train/val/test split of range(len(targets)), the same for the same seed."""
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn's start-up, data=digits only

    index = np.arange(len(targets))
    rest = FRACTIONS["val"] + FRACTIONS["test"]
    train, holdout = train_test_split(index, test_size=rest, stratify=targets, random_state=seed)
    val, test = train_test_split(
        holdout,
        test_size=FRACTIONS["test"] / rest,
        stratify=targets[holdout],
        random_state=seed,
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_digits(root: Path) -> None:
    """Write <root>/{train,val,test}/<digit>/<index>.png atomically (a temp folder, then a rename)."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn's start-up, data=digits only

    digits = load_digits()
    # 0..16 gray levels -> 0..255 so the PNGs look like what they are
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    # a full or read-only disk: WriteError naming the folder, and no half-written tree left behind
    with atomic_path(root, hint="or give data.root=<a writable folder>") as tmp:
        for split, indices in split_indices(digits.target).items():
            for i in indices:
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
        (tmp / MARKER).write_text(
            f"scikit-learn digits, {len(pixels)} images, split {FRACTIONS} with seed {SPLIT_SEED}\n"
        )
    if not (root / MARKER).is_file():  # another process published a folder there first: it must be digits
        raise DataError(
            f"data.root={str(root)!r} was filled by another process with something other than the digits"
        )


class DigitsData(ImageFolderData):
    """ImageFolderData whose tree is written from scikit-learn's bundled copy on first use."""

    def prepare(self, fetch: bool = True) -> None:
        if (self.root / MARKER).is_file():
            return
        if not fetch:  # evaluate, predict, export, resume: a run's config may name any data.root
            # the check writes them only into DEFAULT_ROOT or an empty folder (see below)
            made = "" if self.root.resolve() == DEFAULT_ROOT.resolve() else f"mkdir -p {self.root} && "
            raise DataError(
                f"data.root={str(self.root)!r} holds no digits, and only a new training run writes them. Write "
                f"them with {made}python -m imgcls.data check data=digits data.root={self.root}, or point "
                "data.root at the run's tree."
            )
        if self.root.exists() and any(self.root.iterdir()):
            raise DataError(
                f"data.root={str(self.root)!r} exists but was not written by imgcls (no {MARKER} "
                "file): remove it, or point data.root at an empty folder. To train on the images in "
                "it, add data=imagefolder."
            )
        if not self.root.exists() and self.root.resolve() != DEFAULT_ROOT.resolve():
            raise DataError(
                f"data.root={str(self.root)!r} does not exist. The digits data set (data=digits, the "
                f"default) is written only into {DEFAULT_ROOT}/ or into an empty folder you made for it. "
                "To train on your own images, add data=imagefolder (data=imagefolder data.root=<your "
                "tree>), and check the path."
            )
        if self.root.exists():
            self.root.rmdir()
        write_digits(self.root)
