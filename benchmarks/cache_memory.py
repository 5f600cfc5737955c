"""Peak host memory of a run with the decoded-image cache against the same run without it.

    python benchmarks/cache_memory.py [--data ../shared/data/hymenoptera_data] [--per-class 60]

Runs `python -m imgcls.train` on real JPEGs (a subset of Hymenoptera: per-class images of train,
half as many of val), one epoch of ResNet18, data.num_workers=0 (one process, so its peak resident
memory is the whole run's), with data.cache=none, =memory and =memory data.cache_size=256. Each
process's peak RSS comes from wait4(); the cache's size from the run's own log line. Target:
peak(cache) - peak(none) stays within the cache's size plus a fixed overhead.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import HYMENOPTERA, REPO, machine, subset_tree, table

# the fixed allowance (a choice, not a measurement): images in flight (one full-resolution photo per
# decoding thread, before its resize), allocator slack, and the run-to-run spread of the peak
OVERHEAD_MIB = 128


def peak_run(args: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS MiB of the process, cache MiB it logged) for `python -m imgcls.train args`."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src")}
    with open(cwd / "out.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imgcls.train", *args], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = (cwd / "out.log").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"imgcls {' '.join(args)} failed:\n{text[-3000:]}")
    cache = sum(float(m) for m in re.findall(r"image cache \(memory\): \d+ images, (\d+) MiB", text))
    return usage.ru_maxrss / 1024, cache  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = subset_tree(
            args.data, Path(tmp) / "tree", {"train": args.per_class, "val": args.per_class // 2}
        )
        base = ["data=imagefolder", "transforms=imagenet", f"data.root={tree}", "data.num_workers=0",
                "data.batch_size=16", "trainer.epochs=1", "device=cpu"]  # fmt: skip
        settings = [
            ("data.cache=none", []),
            ("data.cache=memory", ["data.cache=memory"]),
            ("data.cache=memory data.cache_size=256", ["data.cache=memory", "data.cache_size=256"]),
        ]
        results = {
            name: peak_run(base + extra, Path(tmp) / f"run{i}") for i, (name, extra) in enumerate(settings)
        }
    none_peak = results["data.cache=none"][0]
    rows = [["setting", "peak RSS MiB", "cache MiB", "peak - uncached", "overhead beyond the cache",
             f"within cache + {OVERHEAD_MIB} MiB"]]  # fmt: skip
    for name, (peak, cache) in results.items():
        extra = peak - none_peak
        ok = "-" if not cache else ("yes" if extra <= cache + OVERHEAD_MIB else "NO")
        over = f"{extra - cache:+.0f} MiB ({extra / cache:.2f}x the cache)" if cache else "-"
        rows.append([name, f"{peak:.0f}", f"{cache:.0f}" if cache else "-", f"{extra:+.0f}", over, ok])
    print(f"{machine()}\n{args.per_class} train + {args.per_class // 2} val images per class of {args.data}")
    print(table(rows))


if __name__ == "__main__":
    main()
