"""Shared fixtures: tiny ImageFolder trees of real image files, and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
# ResNet18 at 32 px on a few dozen images: a run takes seconds on 2 cores
TINY = [
    "data=imagefolder",
    "transforms=digits",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.epochs=2",
    "device=cpu",
]
COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}


def make_tree(root: Path, counts=None, size=(20, 16), fmt="JPEG", seed=0) -> Path:
    """<root>/<split>/<class>/<n>.jpg: noisy images whose dominant color is the class."""
    counts = counts or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
                pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
                ext = ".jpg" if fmt == "JPEG" else f".{fmt.lower()}"
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}{ext}", fmt)
    return root


@pytest.fixture(scope="session", autouse=True)
def scan_cache_dir(tmp_path_factory) -> Path:
    """The data check's cache goes to a temp folder, never the user's ~/.cache/imgcls."""
    folder = tmp_path_factory.mktemp("imgcls-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tiny")


def cli(module: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` in cwd, the way a user does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished training run, shared by the tests that only read what it wrote."""
    cwd = tmp_path_factory.mktemp("trained")
    tree = make_tree(cwd / "tiny")
    result = cli("imgcls.train", *TINY, f"data.root={tree}", "optimizer.lr=0.01", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(cwd)
    return run
