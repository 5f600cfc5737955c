"""BatchNorm recalibration (issue #19): imgcls's default with and without it, against timm's train.py.

    cd benchmarks && python bn_recalibration.py                      # imgcls rows only
    python bn_recalibration.py --timm-train-py /work/scratch-timm/run_timm.py \\
        --timm-python /work/scratch-timm/venv/bin/python --seeds 1,2,3 --epochs 10

timm's train.py is not in its pip package: keep a copy outside this repository, with timm in its
own environment. The revision read for this benchmark (2aabaef) has no --device option and its
train_one_epoch/validate default to CUDA; run_timm.py (beside it, not in this repository) loads it
unchanged, adds the option and points those defaults at the CPU.

Hymenoptera (244 train, 153 val photos) with resnet18 from scratch at 224 px, batch 32, and digits
(the embedded default, its own transforms and batch 64), each for --epochs epochs. For each seed:
the best and the final validation accuracy (what best.pt, early stopping and the reports see), and
the seconds the recalibration cost per epoch. timm's train.py runs with its own defaults apart from
what it needs to run here (CPU, no prefetcher, no workers, the split names, the class count).
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import HYMENOPTERA, machine, run_imgcls, table

DATASETS = {
    "hymenoptera": {
        "imgcls": ["data=hymenoptera", f"data.root={HYMENOPTERA}", "data.batch_size=32", "model=resnet18"],
        "batch": 32, "classes": 2, "tree": HYMENOPTERA, "img_size": 224,
    },
    "digits": {"imgcls": [], "batch": 64, "classes": 10, "tree": None, "img_size": 32},
}  # fmt: skip
ROWS = {  # --rows key: (label, overrides)
    "on": ("imgcls, recalibration on (default)", []),
    "off": ("imgcls, recalibration off", ["trainer.bn_recalibration.enabled=false"]),
    # the same weights as the two rows above (recalibration changes no weight), other statistics:
    "two": ("imgcls, recalibration over 2 batches", ["trainer.bn_recalibration.batches=2"]),
    "train": ("imgcls, recalibration, train transforms", ["trainer.bn_recalibration.transforms=train"]),
    # timm's learning rate for this batch (lr_base 0.1 x 32/256); recalibration on
    "lr": ("imgcls, optimizer.lr=0.0125", ["optimizer.lr=0.0125"]),
}


def imgcls_row(dataset: str, extra: list[str], seed: int, epochs: int, workdir: Path) -> dict:
    size = DATASETS[dataset]["img_size"]
    # the photo presets at another size: crop `size`, resize to size / 0.875 for eval (as timm does)
    sized = [f"transforms.train.0.size={size}", f"transforms.val.0.size={round(size / 0.875)}",
             f"transforms.val.1.size={size}"] if dataset == "hymenoptera" and size != 224 else []  # fmt: skip
    args = [
        *DATASETS[dataset]["imgcls"],
        *sized,
        *extra,
        f"seed={seed}",
        f"trainer.epochs={epochs}",
        "device=cpu",
    ]
    out = run_imgcls(args, workdir)
    accs = [float(r["val/acc"]) for r in out["rows"]]
    recal = [float(r["bn_recal/time_s"]) for r in out["rows"] if r.get("bn_recal/time_s")]
    train = [float(r["train/time_s"]) for r in out["rows"]]
    losses = " ".join(f"{float(r['val/loss']):.3g}" for r in out["rows"])
    print(f"    val acc per epoch {' '.join(f'{a:.3f}' for a in accs)}; val loss {losses}", flush=True)
    return {"best": max(accs), "final": accs[-1], "recal_s": statistics.mean(recal) if recal else 0.0,
            "train_s": statistics.mean(train), "wall_s": out["wall_s"], "run": out["run"]}  # fmt: skip


def timm_row(
    dataset: str, tree: Path, seed: int, epochs: int, train_py: Path, python: Path, out: Path
) -> dict:
    spec = DATASETS[dataset]
    cmd = [str(python), str(train_py), "--data-dir", str(tree), "--train-split", "train", "--val-split", "val",
           "--model", "resnet18", "--num-classes", str(spec["classes"]), "--epochs", str(epochs),
           "-b", str(spec["batch"]), "--seed", str(seed), "--device", "cpu", "--no-prefetcher", "-j", "0",
           "--img-size", str(spec["img_size"]), "--output", str(out), "--experiment", "run"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"timm {' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    with open(out / "run" / "summary.csv") as f:
        accs = [float(r["eval_top1"]) / 100 for r in csv.DictReader(f)]
    print(f"    val acc per epoch {' '.join(f'{a:.3f}' for a in accs)}", flush=True)
    return {"best": max(accs), "final": accs[-1], "recal_s": 0.0, "train_s": 0.0,
            "wall_s": time.perf_counter() - start}  # fmt: skip


def cell(runs: list[dict]) -> str:
    best = [100 * r["best"] for r in runs]
    final = [100 * r["final"] for r in runs]
    spread = f" (+-{statistics.stdev(best):.1f})" if len(best) > 1 else ""
    return f"{statistics.mean(best):.1f}%{spread} / {statistics.mean(final):.1f}%"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--datasets", default="hymenoptera,digits")
    parser.add_argument("--size", type=int, default=224, help="Hymenoptera's crop size (imgcls and timm)")
    parser.add_argument("--timm-train-py", type=Path, help="timm's train.py (not in timm's pip package)")
    parser.add_argument("--timm-python", type=Path, help="a Python with timm installed, to run it")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--rows", default="on,off", help=f"imgcls rows, of: {','.join(ROWS)}")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    DATASETS["hymenoptera"]["img_size"] = args.size
    print(machine(), flush=True)
    rows = [
        [
            "data set",
            "run",
            "best / final val acc, mean over seeds",
            "recal s/epoch",
            "train s/epoch",
            "per seed (best)",
        ]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.workdir or Path(tmp)
        for dataset in args.datasets.split(","):
            digits_tree = None
            results: dict[str, list[dict]] = {}
            for seed in seeds:  # every row of a seed before the next seed: a cut-short run still pairs them
                for key in args.rows.split(","):
                    name, extra = ROWS[key]
                    r = imgcls_row(dataset, extra, seed, args.epochs, tmp / f"{dataset}-{key}-{seed}")
                    digits_tree = digits_tree or r["run"].parents[2] / "data" / "digits"
                    results.setdefault(name, []).append(r)
                    print(f"  {dataset} {name} seed {seed}: best {r['best']:.4f} final {r['final']:.4f} "
                          f"recal {r['recal_s']:.1f} s train {r['train_s']:.1f} s/epoch", flush=True)  # fmt: skip
                if args.timm_train_py and args.timm_python:
                    tree = DATASETS[dataset]["tree"] or digits_tree
                    r = timm_row(dataset, tree, seed, args.epochs, args.timm_train_py, args.timm_python,
                                 tmp / f"timm-{dataset}-{seed}")  # fmt: skip
                    results.setdefault("timm train.py defaults", []).append(r)
                    print(
                        f"  {dataset} timm seed {seed}: best {r['best']:.4f} final {r['final']:.4f}",
                        flush=True,
                    )
            for name, runs in results.items():
                rows.append([dataset, name, cell(runs),
                             f"{statistics.mean(r['recal_s'] for r in runs):.1f}" if runs[0]["recal_s"] else "-",
                             f"{statistics.mean(r['train_s'] for r in runs):.1f}" if runs[0]["train_s"] else "-",
                             " ".join(f"{100 * r['best']:.1f}" for r in runs)])  # fmt: skip
    print(f"\n{args.epochs} epochs, seeds {args.seeds}, Hymenoptera at {args.size} px\n{table(rows)}")


if __name__ == "__main__":
    main()
