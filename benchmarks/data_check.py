"""The data check's cost on a real tree: first scan vs cached scan, and load_image vs plain PIL.

python benchmarks/data_check.py ../shared/data/hymenoptera_data
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from PIL import Image, ImageOps

from imgcls.data import load_image
from imgcls.data.scan import scan_files


def plain_pil(path: Path) -> Image.Image:
    """The reference: what torchvision's ImageFolder loader does, plus EXIF orientation."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def main(root: Path, repeats: int = 3) -> None:
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png"}
    )
    print(f"{root}: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {date.today()}")  # fmt: skip
    first, cached = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["IMGCLS_CACHE_DIR"] = cache
            first.append(scan_files(root, files, 89_478_485).seconds)
            cached.append(scan_files(root, files, 89_478_485).seconds)
    print(
        f"scan, first (hash + decode, threads): median {statistics.median(first):.2f} s ({', '.join(f'{t:.2f}' for t in first)})"
    )
    print(f"scan, cached (stat only):             median {statistics.median(cached):.4f} s")
    for name, fn in (("plain PIL open+exif+convert", plain_pil), ("imgcls load_image", load_image)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for path in files:
                fn(path)
            times.append(time.perf_counter() - start)
        print(
            f"decode one by one, {name:<28} median {1000 * statistics.median(times) / len(files):.2f} ms/image"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
