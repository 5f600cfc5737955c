"""The training engine's own per-step cost, without data loading: imgcls.training.engine.train_one_epoch
against a bare `loss.backward(); opt.step()` loop on the same in-memory uint8 batches.

    python benchmarks/engine_overhead.py [--rounds 3] [--steps 6]

ResNet18 (2 classes) at 224 px, batch 16, SGD as in cpu_throughput.py, the same normalization
module for both; interleaved rounds, medians. What the ratio holds: the finiteness check (one
gradient-norm pass and one sync per optimizer step), the BatchNorm-buffer copy that lets a
failed step be undone, and the running sums of loss and accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from common import machine, table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgcls.data import Normalize
from imgcls.training.engine import Placement, train_one_epoch

BATCH = 16


def make(seed: int = 1):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, opt


def bare(x, y, norm) -> float:
    model, opt = make()
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for i in range(0, len(x), BATCH):
        loss = loss_fn(model(norm(x[i : i + BATCH])), y[i : i + BATCH])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(x) / (time.perf_counter() - start)


def engine(x, y, norm) -> float:
    model, opt = make()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    start = time.perf_counter()
    train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), opt, Placement(torch.device("cpu"), norm, log_every=1000)
    )
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.steps * BATCH
    x, y = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8), torch.randint(0, 2, (n,))
    norm = Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    results = {"bare loop": [], "imgcls.training.engine.train_one_epoch": []}
    for r in range(args.rounds):
        results["bare loop"].append(bare(x, y, norm))
        results["imgcls.training.engine.train_one_epoch"].append(engine(x, y, norm))
        print(
            f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} images/s" for k, v in results.items()),
            flush=True,
        )
    base = statistics.median(results["bare loop"])
    rows = [["loop", "train images/s", "vs bare loop"]]
    for name, values in results.items():
        rows.append([name, f"{statistics.median(values):.2f}", f"{statistics.median(values) / base:.3f}x"])
    print(machine())
    print(
        f"ResNet18, 224 px, batch {BATCH}, {args.steps} steps, {args.rounds} round(s), in-memory uint8 batches"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
