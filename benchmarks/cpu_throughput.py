"""CPU training throughput: imgcls against a hand-written PyTorch loop on the same images, in one run.

    python benchmarks/cpu_throughput.py            # about 3 minutes on 2 cores; prints a table

Both train ResNet18 (2 classes, from scratch) on the same Hymenoptera JPEGs at 224 px (random-resized
crop + flip), batch 16, SGD (lr 0.05, momentum 0.9, nesterov, weight decay 5e-4), 2 loader workers,
for the same number of steps. Images/s is counted the same way for both: images trained on, divided
by the wall time from asking the loader for the first batch to the end of the last optimizer step
(worker start-up and JPEG decoding included). imgcls's figure is the train/images_per_s its own
metrics.csv records. On 2 cores, decoding workers take CPU time from the model: the best CPU settings
decode every image once, before training (data.cache=memory; that one-off decoding is not in the
images/s, it is in the run's start-up), and crop and flip in the training process. Then the default
run (digits) is timed: see default_run.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import HYMENOPTERA, machine, run_imgcls, subset_tree, table

BATCH, WORKERS = 16, 2


def plain_loop(root: Path, steps: int, seed: int = 0) -> float:
    """The torchvision-reference way, written by hand; returns training images/s."""
    import torch
    import torchvision
    from torchvision import transforms as T

    torch.manual_seed(seed)
    tf = T.Compose([
        T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True
    )
    model = torchvision.models.resnet18(num_classes=len(data.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seen, start = 0, time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if step == steps:
            break
        loss = loss_fn(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += targets.shape[0]
    return seen / (time.perf_counter() - start)


def imgcls_loop(root: Path, work: Path, extra: list[str]) -> float:
    args = [
        "data=hymenoptera", f"data.root={root}", f"data.batch_size={BATCH}", f"data.num_workers={WORKERS}",
        "trainer.epochs=1", "device=cpu", "scheduler=none", f"data.cache_dir={work / 'cache'}", *extra,
    ]  # fmt: skip
    return float(run_imgcls(args, work)["last"]["train/images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=HYMENOPTERA, help="an ImageFolder tree with train/ and val/"
    )
    parser.add_argument("--steps", type=int, default=6, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all configurations; medians are shown")
    parser.add_argument("--skip-default-run", action="store_true")
    args = parser.parse_args()
    print(machine(), flush=True)
    configs = {
        "plain PyTorch loop (fp32, NCHW)": None,
        "imgcls, same settings (precision=fp32 channels_last=false)": [
            "trainer.precision=fp32", "trainer.channels_last=false"],
        "imgcls, CPU defaults (precision=auto -> fp32, channels_last=auto -> true)": [],
        "imgcls, best CPU settings (defaults + data.cache=memory data.num_workers=0)": [
            "data.cache=memory", "data.num_workers=0"],
    }  # fmt: skip
    results: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        n = args.steps * BATCH // 2  # images per class: exactly `steps` batches of the two classes
        root = subset_tree(args.data, Path(tmp) / "data", {"train": n, "val": 4})
        for r in range(args.rounds):  # interleaved, so a change in the machine's load hits every row
            for i, (name, extra) in enumerate(configs.items()):
                ips = plain_loop(root, args.steps) if extra is None else imgcls_loop(
                    root, Path(tmp) / f"run{r}-{i}", extra)  # fmt: skip
                results[name].append(ips)
                print(f"  round {r + 1}: {name}: {ips:.2f} images/s", flush=True)
    base = statistics.median(results["plain PyTorch loop (fp32, NCHW)"])
    rows = [["configuration", "train images/s", "vs plain loop"]]
    for name, values in results.items():
        rows.append([name, f"{statistics.median(values):.2f}", f"{statistics.median(values) / base:.3f}x"])
    print(f"\nResNet18, 224 px, batch {BATCH}, {WORKERS} workers, {args.steps} steps, {args.rounds} round(s)")
    print(table(rows), flush=True)
    if not args.skip_default_run:
        from default_run import default_run, report

        print()
        print(report(default_run()))


if __name__ == "__main__":
    main()
