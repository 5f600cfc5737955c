"""Asynchronous, pruned sweeps: the same Optuna search synchronous and unpruned, then asynchronous
and pruned, side by side (issue 25).

    python benchmarks/pruning.py --data sign-digits --epochs 20 --per-class 60,40 \
        --pruner '{_target_: optuna.pruners.SuccessiveHalvingPruner, min_resource: 3, reduction_factor: 3}'
                                           # BENCHMARKS.md's figures: about 13 min on 2 cores
    python benchmarks/pruning.py --trials 2 --epochs 2 --per-class 8,4   # a tiny check that it runs

Both sweeps search the same 4-parameter space (lr, weight decay, batch size, label smoothing) with
the same sampler and seed (`--sampler random` by default: it proposes the same 16 trials in both
sweeps, so the comparison measures the pruning; TPE's later proposals depend on what it was told,
which pruning changes), 2 jobs at once, one torch thread each, over a reduced data set: Sign
Language Digits (`--data sign-digits`: each class's first images in name order for train, the next
ones for val) or Hymenoptera (symlinks to the first images of each class), with a ShuffleNetV2 0.5x
from scratch at 32 px (the tests' tiny model, so a trial is cheap).
The first sweep is the reference: no pruner, on Hydra's own joblib launcher (`hydra/launcher=joblib`),
which runs each batch of n_jobs trials to its end before the next, as Hydra's sweeps run. The second
runs on imgcls's parallel launcher, whose slots start a trial as soon as one ends, with the pruner
(`--pruner`; a MedianPruner by default; `--pruned-extra` for more overrides). Printed side by side:
the best validation accuracy (the leaderboard's first row), the epochs all trials trained (the sum
of each job's run.json epochs_done), the trials pruned and the wall time, with the ratios against
the targets (best within 1 point, <= 40% of the epochs, <= 50% of the wall time), then each sweep's
leaderboard as it printed it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HYMENOPTERA, REPO, SIGN_DIGITS, machine, split_tree, subset_tree, table

# the search space in Hydra's sweep syntax on the command line (as hparams_search/optuna.yaml says)
SPACE = [
    "optimizer.lr=tag(log, interval(1e-4, 1e-1))", "optimizer.weight_decay=tag(log, interval(1e-6, 1e-2))",
    "data.batch_size=choice(8, 16, 32)", "loss.label_smoothing=interval(0.0, 0.2)",
]  # fmt: skip
MEDIAN = "{_target_: optuna.pruners.MedianPruner, n_startup_trials: 4, n_warmup_steps: 2}"


def sweep(name: str, args: list[str], cwd: Path) -> dict:
    """One `python -m imgcls.train -m ...` sweep in cwd/<name>: its leaderboard, epochs and wall time."""
    folder = cwd / name
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "imgcls.train", "-m", *args, f"hydra.sweep.dir={folder / 'sweep'}"],
        cwd=folder, env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"the {name} sweep failed:\n{out.stderr[-3000:]}")
    with open(folder / "sweep" / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    records = [json.loads(p.read_text()) for p in (folder / "sweep").glob("*_*/run.json")]
    best = max((float(r["val/acc_best"]) for r in rows if r["val/acc_best"]), default=float("nan"))
    return {
        "best": best,
        "epochs": sum(r["epochs_done"] for r in records),
        "pruned": sum(r["status"] == "pruned" for r in records),
        "trials": len(records),
        "wall_s": wall,
        # what the sweep printed last: its leaderboard
        "leaderboard": out.stdout[out.stdout.rfind("sweep ") :] if "sweep " in out.stdout else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--data", choices=("hymenoptera", "sign-digits"), default="hymenoptera",
                        help="Hymenoptera (2 classes, split) or Sign Language Digits (10 classes, 100 px, no split: "
                        "each class's images in name order make train, then val)")  # fmt: skip
    parser.add_argument("--per-class", default="60,30", help="train,val images per class")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed, the same for both sweeps")
    parser.add_argument("--sampler", default="random",
                        help="hydra/sweeper/sampler: random (the default here) proposes the same trials in both "
                        "sweeps, so the comparison measures the pruning; tpe's later proposals depend on the "
                        "results it was told, which pruning changes")  # fmt: skip
    parser.add_argument(
        "--pruner", default=MEDIAN, help="hydra.sweeper.pruner; none: no pruner (checks the script)"
    )
    parser.add_argument("--pruned-extra", nargs="*", default=[], help="overrides for the pruned sweep only")
    opts = parser.parse_args()
    n_train, n_val = (int(n) for n in opts.per_class.split(","))
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        counts = {"train": n_train, "val": n_val}
        if opts.data == "hymenoptera":
            tree = subset_tree(HYMENOPTERA, Path(tmp) / "data", counts)
        else:
            tree = split_tree(SIGN_DIGITS, Path(tmp) / "data", counts)
        common = [
            "hparams_search=optuna", f"hydra/sweeper/sampler={opts.sampler}", "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_jobs=2", f"hydra.sweeper.n_trials={opts.trials}",
            f"hydra.sweeper.sampler.seed={opts.seed}", *SPACE,
            "data=imagefolder", f"data.root={tree}", "data.num_workers=0", "transforms=digits",
            "model.name=shufflenet_v2_x0_5",
            "trainer.num_threads=1", f"trainer.epochs={opts.epochs}", "device=cpu",
        ]  # fmt: skip
        plain = sweep("unpruned", ["hydra/launcher=joblib", *common], Path(tmp))
        pruner = [] if opts.pruner == "none" else [f"hydra.sweeper.pruner={opts.pruner}"]
        pruned = sweep("pruned", ["hydra/launcher=parallel", *common, *pruner, *opts.pruned_extra], Path(tmp))
    rows = [["sweep", "best val acc", "trained epochs", "pruned trials", "wall time"]]
    for name, r in (
        ("synchronous, unpruned (Hydra's joblib launcher)", plain),
        ("asynchronous, pruned (hydra/launcher=parallel)", pruned),
    ):
        rows.append([name, f"{100 * r['best']:.2f}%", str(r["epochs"]), f"{r['pruned']} of {r['trials']}",
                     f"{r['wall_s']:.0f} s"])  # fmt: skip
    rows.append([
        "pruned / unpruned (targets)", f"{100 * (pruned['best'] - plain['best']):+.2f} points (>= -1)",
        f"{pruned['epochs'] / max(plain['epochs'], 1):.0%} (<= 40%)", "",
        f"{pruned['wall_s'] / plain['wall_s']:.0%} (<= 50%)",
    ])  # fmt: skip
    print(table(rows))
    for name, r in (("unpruned", plain), ("pruned", pruned)):
        print(f"\nthe {name} sweep's leaderboard, as it printed it:\n{r['leaderboard']}")


if __name__ == "__main__":
    main()
