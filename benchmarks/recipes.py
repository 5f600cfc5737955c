"""Photo recipes (issue 29): imgcls's defaults against timm's train.py defaults, on every real photo
set in ../shared/data and on the digits, at the same model, epochs, batch and image size.

    cd benchmarks && python recipes.py --timm-train-py /work/scratch-timm/run_timm.py   # ~1 h on 2 cores
    python recipes.py --rows imgcls --src /work/old/src        # another checkout's defaults (before)
    python recipes.py --rows imgcls --imgcls-args optimizer.lr=0.05 --sets face_mask --seeds 1

timm's train.py is not in its pip package: keep a copy outside this repository (BENCHMARKS.md says
which revision), run through a wrapper that runs it on the CPU (`--timm-train-py`).

Each set is one train/val split used by both: Hymenoptera's own folders; the sets of class folders
alone (Sign Language Digits, Face Mask) carved the way imgcls carves them (`data.val_fraction` 0.2,
`data.split_seed` 0: what `data.root=<them>` draws), as symlink trees; the digits are imgcls's
embedded set (written under the work folder), at its own 32 px transforms and batch 64, timm at
32 px. Photos train at `--size` px (crop; eval resize size / 0.875 then center crop, as timm does),
batch 32, from scratch. For each set, model and recipe: the best and the final validation accuracy
over `--seeds`, their mean and spread, and the wall time per run (process start to exit).
imgcls decodes each image once (`data.cache=memory`, the README's setting for small sets on CPU);
timm decodes every epoch (its loader has no cache); both with 2 loader workers.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HYMENOPTERA, REPO, SIGN_DIGITS, machine, table

FACE_MASK = REPO.parent / "shared" / "data" / "face_mask"
SETS = {  # name: (source tree, layout)
    "hymenoptera": (HYMENOPTERA, "split"),
    "sign_digits": (SIGN_DIGITS, "class folders"),
    "face_mask": (FACE_MASK, "class folders"),
    "digits": (None, "embedded"),
}
MODELS = {"mobilenet_v3_small": "mobilenetv3_small_100", "resnet18": "resnet18"}  # imgcls (torchvision): timm
PHOTO_BATCH, DIGITS_BATCH = 32, 64


def carved_tree(source: Path, dest: Path, src: Path) -> Path:
    """<dest>/{train,val}/<class>/: symlinks to the files imgcls's own carve puts in each split
    (data.root=<source> with the defaults: val 0.2 of each class, split_seed 0)."""
    code = (
        "import json, sys; from imgcls.data import ImageFolderData\n"
        "r = ImageFolderData(root=sys.argv[1], splits={'train': 'train', 'val': 'val', 'test': 'test'}, "
        "batch_size=1).scan()\n"
        "print(json.dumps({s: [[p, r.class_names[t]] for p, t in items] for s, items in r.samples.items()}))"
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code, str(source)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"carving {source} failed:\n{out.stderr[-3000:]}")
    for split, items in json.loads(out.stdout.splitlines()[-1]).items():
        for path, name in items:
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(path).name).symlink_to(Path(path).resolve())
    return dest


def sized(size: int) -> list[str]:
    """imgcls's photo presets at `size`: crop size, eval resize size / 0.875 (as timm's crop_pct)."""
    return [f"transforms.train.0.size={size}", f"transforms.val.0.size={round(size / 0.875)}",
            f"transforms.val.1.size={size}"]  # fmt: skip


def imgcls_run(name, tree, model, seed, epochs, size, extra, src, workdir) -> dict:
    if name == "digits":
        data = ["model=" + model]  # the default data option: digits, its transforms and batch
    else:
        data = ["data=imagefolder", f"data.root={tree}", f"model={model}", *sized(size), "data.cache=memory"]
    args = [*data, *extra, f"seed={seed}", f"trainer.epochs={epochs}", "device=cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(src)}
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "imgcls.train", *args], cwd=workdir, env=env, capture_output=True,
                         text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"imgcls {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    (run,) = sorted(p for p in (workdir / "outputs").glob("*/*") if p.is_dir())
    with open(run / "metrics.csv") as f:
        accs = [float(r["val/acc"]) for r in csv.DictReader(f)]
    return {"best": max(accs), "final": accs[-1], "wall_s": wall, "accs": accs}


def timm_run(name, tree, model, seed, epochs, size, train_py, python, workdir) -> dict:
    classes = len([p for p in (tree / "train").iterdir() if p.is_dir()])
    batch = DIGITS_BATCH if name == "digits" else PHOTO_BATCH
    cmd = [str(python), str(train_py), str(tree), "--train-split", "train", "--val-split", "val",
           "--model", MODELS[model], "--num-classes", str(classes), "--epochs", str(epochs), "-b", str(batch),
           "--seed", str(seed), "--device", "cpu", "--no-prefetcher", "-j", "2",
           "--img-size", str(32 if name == "digits" else size), "--output", str(workdir), "--experiment", "run"]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(train_py).parent)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"timm {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    with open(workdir / "run" / "summary.csv") as f:
        accs = [float(r["eval_top1"]) / 100 for r in csv.DictReader(f)]
    return {"best": max(accs), "final": accs[-1], "wall_s": wall, "accs": accs}


def cells(runs: list[dict]) -> list[str]:
    best = [100 * r["best"] for r in runs]
    final = [100 * r["final"] for r in runs]
    spread = f" (+-{statistics.stdev(best):.1f})" if len(best) > 1 else ""
    per_seed = " ".join(f"{b:.1f}" for b in best)
    wall = statistics.mean(r["wall_s"] for r in runs)
    return [f"{statistics.mean(best):.1f}%{spread}", f"{statistics.mean(final):.1f}%", f"{wall:.0f}", per_seed]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="photo crop size in px (imgcls and timm)")
    parser.add_argument("--rows", default="imgcls,timm", help="imgcls, timm or both")
    parser.add_argument("--label", default="imgcls defaults", help="the imgcls row's name in the table")
    parser.add_argument("--imgcls-args", nargs="*", default=[], help="overrides added to every imgcls run")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the imgcls checkout's src to run")
    parser.add_argument("--timm-train-py", type=Path, help="timm's train.py wrapper (not in timm's pip package)")
    parser.add_argument("--timm-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if "timm" in rows and not args.timm_train_py:
        parser.error("--rows timm needs --timm-train-py")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(machine(), flush=True)
    print(f"{args.epochs} epochs, photos at {args.size} px batch {PHOTO_BATCH}, digits at 32 px batch "
          f"{DIGITS_BATCH}; seeds {args.seeds}; imgcls from {args.src} {' '.join(args.imgcls_args)}", flush=True)  # fmt: skip
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgcls-recipes-"))
    results: dict[tuple[str, str, str], list[dict]] = {}
    for name in args.sets.split(","):
        source, layout = SETS[name]
        if layout == "split":
            tree = source
        elif layout == "class folders":
            tree = work / "trees" / name
            if not tree.exists():
                carved_tree(source, tree, args.src)
        else:  # digits: imgcls writes its embedded tree on first use; timm reads the same files
            tree = work / "digits-tree" / "data" / "digits"
            if not tree.exists():
                imgcls_run("digits", None, "resnet18", 0, 1, 32, [], args.src, work / "digits-tree")
        for model in args.models.split(","):
            for seed in seeds:
                for row in rows:
                    where = work / "runs" / f"{name}-{model}-{row}-{seed}"
                    if row == "imgcls":
                        r = imgcls_run(name, tree, model, seed, args.epochs, args.size, args.imgcls_args,
                                       args.src, where)  # fmt: skip
                        label = args.label
                    else:
                        r = timm_run(name, tree, model, seed, args.epochs, args.size, args.timm_train_py,
                                     args.timm_python, where)  # fmt: skip
                        label = "timm train.py defaults"
                    results.setdefault((name, model, label), []).append(r)
                    accs = " ".join(f"{a:.3f}" for a in r["accs"])
                    print(f"  {name} {model} {label} seed {seed}: best {r['best']:.4f} final {r['final']:.4f} "
                          f"{r['wall_s']:.0f} s; val acc per epoch {accs}", flush=True)  # fmt: skip
    header = ["set", "model", "recipe", "best val acc (sd)", "final", "wall s/run", "best per seed"]
    print()
    print(table([header] + [[n, m, label, *cells(runs)] for (n, m, label), runs in results.items()]))
    labels = sorted({label for _, _, label in results})
    if len(labels) == 2:
        mine = next(label for label in labels if not label.startswith("timm"))
        gaps = [
            100 * (statistics.mean(r["best"] for r in results[(n, m, mine)])
                   - statistics.mean(r["best"] for r in results[(n, m, "timm train.py defaults")]))
            for (n, m, label) in results if label == mine and (n, m, "timm train.py defaults") in results
        ]  # fmt: skip
        print(f"\n{mine} minus timm, mean best val acc per set and model: "
              f"{' '.join(f'{g:+.1f}' for g in gaps)}; average {statistics.mean(gaps):+.2f} points")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({" | ".join(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
