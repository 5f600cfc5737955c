"""GPU training throughput: imgcls end to end on a JPEG ImageFolder, against the compute ceiling.

    python benchmarks/gpu_throughput.py            # one NVIDIA GPU, no network, about 5 minutes

Makes (or takes, --data) an ImageFolder of 20,000 train and 1,000 val JPEGs of photo-like sizes
(400-640 x 300-480 px, smooth shapes and gradients with light noise, quality 90), then:
- the compute ceiling: ResNet18 (10 classes) trained on GPU-resident random tensors, batch 256,
  224 px, SGD, for each setting (fp32; bf16 autocast + channels_last; the same plus torch.compile);
- imgcls end to end on the JPEG folder with the same model, batch and setting (transforms=imagenet:
  random-resized crop + flip, decoded by PIL in data.num_workers processes), 2 epochs: the second
  epoch's train/images_per_s is reported, so worker start-up and compiling are left out;
- their ratio (target: >= 0.85 at bf16 + channels_last, with and without compile).
Rows without `cache` decode every JPEG every epoch; rows with it decode each once, before training
(not counted in images/s: it is start-up), and crop and flip the cached uint8 images each epoch, in
the loader workers; `device augment` rows resize the crops and flip them on the GPU instead
(data.device_augment=true: the workers only draw the boxes and cut the regions out).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from common import REPO, machine, run_imgcls, summary_value, table

BATCH, CLASSES = 256, 10
# decoded once (threads), shorter side 256 for 224 px crops, then read from shared memory; the
# workers crop and flip (data.device_augment=false: auto would move that to the GPU)
CACHE = ["data.cache=memory", "data.cache_size=256", "data.device_augment=false"]
# the same cache; the workers only draw each box and flip and cut the region out, one roi_align
# per batch resizes the regions on the GPU
DEVICE_AUGMENT = ["data.cache=memory", "data.cache_size=256", "data.device_augment=true"]
SETTINGS = {
    "fp32": (["trainer.precision=fp32", "trainer.channels_last=false", "trainer.compile=false"], None, False, False),
    "fp32 + compile": (["trainer.precision=fp32", "trainer.channels_last=false", "trainer.compile=true"], None, False, True),
    "bf16 + channels_last": (["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=false"], "bf16", True, False),
    "bf16 + channels_last + compile": (["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=true"], "bf16", True, True),
    "bf16 + channels_last + cache": (["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=false", *CACHE], "bf16", True, False),
    "bf16 + channels_last + compile + cache": (["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=true", *CACHE], "bf16", True, True),
    "bf16 + channels_last + cache + device augment": (["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=false", *DEVICE_AUGMENT], "bf16", True, False),
    "bf16 + channels_last + compile + cache + device augment": (["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=true", *DEVICE_AUGMENT], "bf16", True, True),
}  # fmt: skip


def _write_image(job: tuple[Path, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    # a smooth two-color gradient, a few filled shapes, a slight blur and noise: JPEG sizes and
    # decode times close to those of photos (pure noise would decode far slower, flat color far faster)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None]
    base = (a * (1 - t) + b * t).repeat(h, axis=0)
    im = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    pixels = np.asarray(im).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def make_tree(root: Path, train: int, val: int) -> Path:
    marker = root / f".complete-{train}-{val}"
    if marker.exists():
        return root
    jobs = []
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            folder = root / split / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{i:06d}.jpg", i + (10**7 if split == "val" else 0)))
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_image, jobs, chunksize=64)
    marker.touch()
    return root


def ceiling(
    precision: str | None, channels_last: bool, compiled: bool, steps: int, train: bool = True
) -> float:
    """Training (or, train=False, inference) images/s of the model alone, on random tensors already
    on the GPU."""
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.resnet18(num_classes=CLASSES).cuda().to(memory_format=fmt).train(train)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fwd = torch.compile(model) if compiled else model
    x = torch.randn(BATCH, 3, 224, 224, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (BATCH,), device="cuda")
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            fwd(x).argmax(1)

    work = step if train else infer
    for _ in range(10):  # warm-up: cuDNN autotuning, compiling
        work()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        work()
    torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - start)


def evaluate_ips(run: Path, extra: list[str], workers: int) -> float:
    """images/s of `python -m imgcls.evaluate` on the run's 20k-image train split, as it logs them
    (loading, decoding and the model; not process start-up or the reports)."""
    cmd = [sys.executable, "-m", "imgcls.evaluate", f"run_dir={run}", "split=train",
           f"data.num_workers={workers}", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    found = re.search(r"predicted (\d+) images in [\d.]+ s \((\d+) images/s", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, help="an existing ImageFolder tree (train/, val/) to use instead"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/imgcls-gpu-bench"), help="where to write the JPEGs"
    )
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS),
        # the uncached compile rows would push the run past 5 minutes: ask for them with --settings
        default=["fp32", "bf16 + channels_last", "bf16 + channels_last + cache",
                 "bf16 + channels_last + compile + cache"],
    )  # fmt: skip
    parser.add_argument(
        "--evaluate",
        nargs="*",
        default=["bf16 + channels_last", "bf16 + channels_last + cache"],
        help="settings whose run is also evaluated (python -m imgcls.evaluate split=train) against the "
        "inference ceiling",
    )
    parser.add_argument("--table", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    began = time.perf_counter()
    print(machine(), flush=True)
    import torch

    print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    if args.data:
        root = args.data
    else:
        t = time.perf_counter()
        root = make_tree(args.out / "data", args.train_images, 1_000)
        print(f"JPEG tree ready in {time.perf_counter() - t:.0f} s: {root}", flush=True)
    rows = [["setting", "ceiling images/s", "imgcls images/s", "imgcls / ceiling"]]
    for name in args.settings:
        extra, precision, cl, compiled = SETTINGS[name]
        top = ceiling(precision, cl, compiled, steps=30)
        try:
            run = run_imgcls(
                ["data=imagefolder", f"data.root={root}", "transforms=imagenet", f"data.batch_size={BATCH}",
                 f"data.num_workers={args.workers}", "trainer.epochs=2", "scheduler=none", "device=cuda", *extra],
                args.out / "runs" / name.replace(" ", "").replace("+", "_"),
            )  # fmt: skip
        except SystemExit as exc:  # one failed setting (say, shared memory too small for the cache)
            print(f"  {name}: FAILED\n{exc}", flush=True)  # is a row, not the end of the benchmark
            rows.append([name, f"{top:,.0f}", "failed", "-"])
            continue
        ips = float(run["last"]["train/images_per_s"])
        print(f"  {name}: {summary_value(run['summary'], 'settings:')}", flush=True)
        rows.append([name, f"{top:,.0f}", f"{ips:,.0f}", f"{ips / top:.2f}"])
        print(
            f"  {name}: ceiling {top:,.0f}, imgcls {ips:,.0f} images/s (run {run['wall_s']:.0f} s)",
            flush=True,
        )
        if name in args.evaluate:  # the same run's best.pt, evaluated on its 20k train images
            top = ceiling(precision, cl, compiled=False, steps=30, train=False)
            try:
                ips = evaluate_ips(run["run"], [e for e in extra if e.startswith("data.cache")], args.workers)
            except SystemExit as exc:
                print(f"  evaluate, {name}: FAILED\n{exc}", flush=True)
                continue
            rows.append([f"evaluate: {name}", f"{top:,.0f}", f"{ips:,.0f}", f"{ips / top:.2f}"])
            print(f"  evaluate, {name}: ceiling {top:,.0f}, imgcls {ips:,.0f} images/s", flush=True)
    text = "\n".join([
        f"\nResNet18, 224 px, batch {BATCH}, {args.workers} loader workers; {machine()}; GPU {torch.cuda.get_device_name()}",
        table(rows), f"total {time.perf_counter() - began:.0f} s"])  # fmt: skip
    print(text, flush=True)
    if args.table:
        args.table.write_text(text + "\n")


if __name__ == "__main__":
    main()
