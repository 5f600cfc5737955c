"""Shared by the benchmark scripts: a subset ImageFolder tree, and imgcls runs through its real CLI."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
SIGN_DIGITS = REPO.parent / "shared" / "data" / "sign_language_digits"  # <class>/<image>, no splits


def subset_tree(source: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """<dest>/<split>/<class>/: symlinks to the first per_class[split] images of each class."""
    for split, n in per_class.items():
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in {".jpg", ".jpeg", ".png"})
            if len(files) < n:
                raise SystemExit(f"{class_dir} has {len(files)} images, the benchmark needs {n}")
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in files[:n]:
                (out / f.name).symlink_to(f.resolve())
    return dest


def split_tree(source: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """<dest>/<split>/<class>/ from a tree without splits (<source>/<class>/<image>): symlinks to
    each class's images in name order, the first per_class[split] to the first split, the next ones
    to the next split, and so on."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if len(files) < sum(per_class.values()):
            raise SystemExit(
                f"{class_dir} has {len(files)} images, the benchmark needs {sum(per_class.values())}"
            )
        start = 0
        for split, n in per_class.items():
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in files[start : start + n]:
                (out / f.name).symlink_to(f.resolve())
            start += n
    return dest


def run_imgcls(args: list[str], cwd: Path, timeout: float = 1800) -> dict:
    """`python -m imgcls.train args` in cwd; its last metrics row, summary and wall time (process
    start to exit, as a user waits for it)."""
    cwd.mkdir(parents=True, exist_ok=True)
    # this checkout's imgcls first, and whatever PYTHONPATH already held after it
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "imgcls.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"imgcls {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    (run,) = sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "wall_s": wall,
        "rows": rows,
        "last": rows[-1],
        "summary": (run / "summary.txt").read_text(),
        "run": run,
    }


def summary_value(summary: str, prefix: str) -> str:
    """The rest of the summary.txt line that starts with `prefix` ('' when absent)."""
    for line in summary.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return ""


def machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.node()}: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"load average {load:.1f} at the start; Python {platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
