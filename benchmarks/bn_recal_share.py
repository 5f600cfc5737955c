"""How many batches BatchNorm recalibration needs (issue #19's cost cap): finished runs' own weights,
recalibrated over k of the training split's batches, then validated.

    cd benchmarks && python bn_recal_share.py <run dir> [<run dir> ...] --batches 1,2,4,16 --draws 3

For each run and checkpoint (best.pt, last.pt), each k and each draw (the recalibration batches come
from (seed, epoch): draw d uses epoch d), the val accuracy and loss. Training is unchanged by the
recalibration, so this is what `trainer.bn_recalibration.batches=k` (or a `max_share` giving k
batches) would have reported for the same weights; k at or past the split's batch count is the
whole split. Runs from bn_recalibration.py --workdir are such runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def measure(run_dir: Path, batches: list[int], draws: int) -> list[list[str]]:
    from imgcls.training.engine import evaluate
    from imgcls.training.run import build_run

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["device"] = "cpu"
    rows = []
    for name in ("best.pt", "last.pt"):
        state = torch.load(run_dir / "weights" / name, weights_only=True)
        for k in batches:
            config["trainer"]["bn_recalibration"] = {"enabled": True, "batches": k, "transforms": "eval"}
            run = build_run(config, train=True)
            accs, losses, seconds = [], [], []
            for draw in range(1, draws + 1):
                run.model.load_state_dict(state["model"])
                cost = run.recipe.recalibrate([run.model], draw)
                metrics, _, _ = evaluate(run.model, run.loaders["val"], run.loss_fn, run.place)
                accs.append(metrics["val/acc"])
                losses.append(metrics["val/loss"])
                seconds.append(cost["bn_recal/time_s"])
            spread = f" (+-{statistics.stdev(accs) * 100:.1f})" if len(accs) > 1 else ""
            rows.append([run_dir.parents[2].name, f"{name} (epoch {state['epoch']})", str(k), str(int(cost["bn_recal/images"])),
                         f"{statistics.mean(accs) * 100:.1f}%{spread}", f"{statistics.mean(losses):.3f}",
                         f"{statistics.mean(seconds):.1f}"])  # fmt: skip
            print("  " + "  ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    from common import machine, table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batches", default="1,2,4,16")
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    print(machine(), flush=True)
    rows = [["run", "weights", "batches", "images", "val acc (mean over draws)", "val loss", "recal s"]]
    for run_dir in args.runs:
        rows += measure(run_dir, [int(k) for k in args.batches.split(",")], args.draws)
    print(table(rows))


if __name__ == "__main__":
    main()
