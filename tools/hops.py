"""Count the calls a config value passes through, from the Hydra job to where it acts (issue 27).

    python tools/hops.py             # this checkout (PYTHONPATH=<other checkout>/src to measure another)

Runs one tiny training (1 epoch, a generated 3-class tree, ShuffleNetV2 0.5x, CPU) in this process
under a profiler and records the Python call stack at four moments:

- optimizer.lr is taken: the optimizer's constructor (torch.optim.Optimizer.__init__) runs;
- optimizer.lr acts: the first optimizer step (the optimizer class's `step`);
- data.root is taken: the data object's constructor (a class in imgcls.data whose __init__ gets root);
- data.root acts: the first listing of a folder (os.scandir / os.listdir / Path.iterdir) called from
  imgcls.data.

For each value it prints the project's functions on the stacks below the job function
(`imgcls.train.job` and what it calls), the taking and the acting stacks together, each function
counted once: the calls the value passes from the composed config to where it acts, and the modules
they live in. Project functions only (imgcls.*): Hydra's, torch's and the standard library's frames
are not counted.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = "imgcls"


def make_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in {"train": 8, "val": 4}.items():
        for k, name in enumerate(("a", "b", "c")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                pixels[..., k] += 180
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def project_stack(frame) -> list[tuple[str, str]]:
    """(module, function) of each project frame from the job function down to `frame`, outermost first."""
    stack = []
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == PROJECT or module.startswith(PROJECT + "."):
            stack.append((module, frame.f_code.co_qualname if hasattr(frame.f_code, "co_qualname") else frame.f_code.co_name))
        frame = frame.f_back
    stack.reverse()
    # from the job function on (imgcls.train.job); the command-line layer above it is not the value's
    for i, (module, name) in enumerate(stack):
        if module == "imgcls.train" and name == "job":
            return stack[i:]
    return stack


def main() -> None:
    import torch

    seen: dict[str, list[tuple[str, str]]] = {}
    listing = {os.scandir, os.listdir}

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if "opt_taken" not in seen and code is torch.optim.Optimizer.__init__.__code__:
                seen["opt_taken"] = project_stack(frame)
            elif "opt_acts" not in seen and code.co_name == "step" and "torch/optim/" in code.co_filename:
                if isinstance(frame.f_locals.get("self"), torch.optim.Optimizer):
                    seen["opt_acts"] = project_stack(frame)
            elif "root_taken" not in seen and code.co_name == "__init__" and "root" in frame.f_locals:
                module = frame.f_globals.get("__name__", "")
                if module.startswith(PROJECT + ".data"):
                    seen["root_taken"] = project_stack(frame)
            elif "root_acts" not in seen and code is Path.iterdir.__code__:
                caller = frame.f_back
                if caller is not None and caller.f_globals.get("__name__", "").startswith(PROJECT + ".data"):
                    seen["root_acts"] = project_stack(caller)
        elif event == "c_call" and "root_acts" not in seen and arg in listing:
            if frame.f_globals.get("__name__", "").startswith(PROJECT + ".data"):
                seen["root_acts"] = project_stack(frame)

    with tempfile.TemporaryDirectory() as tmp:
        tree = make_tree(Path(tmp) / "tree")
        os.chdir(tmp)
        sys.argv = [
            "imgcls.train", "data=imagefolder", f"data.root={tree}", "transforms=digits",
            "model.name=shufflenet_v2_x0_5", "data.batch_size=4", "data.num_workers=0", "trainer.epochs=1",
            "device=cpu", "hydra.run.dir=run",
        ]  # fmt: skip
        from imgcls.train import main as train_main

        sys.setprofile(profile)
        try:
            train_main()
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
        finally:
            sys.setprofile(None)

    import imgcls

    print(f"imgcls from {Path(imgcls.__file__).parent}")
    for key, (taken, acts) in {"optimizer.lr": ("opt_taken", "opt_acts"), "data.root": ("root_taken", "root_acts")}.items():
        missing = [k for k in (taken, acts) if k not in seen]
        if missing:
            print(f"{key}: not seen ({', '.join(missing)})")
            continue
        functions = list(dict.fromkeys([*seen[taken], *seen[acts]]))
        modules = list(dict.fromkeys(m for m, _ in functions))
        print(f"{key}: {len(functions)} calls in {len(modules)} modules")
        print(f"  taken: {' > '.join(f'{m.removeprefix(PROJECT + chr(46))}.{n}' for m, n in seen[taken])}")
        print(f"  acts:  {' > '.join(f'{m.removeprefix(PROJECT + chr(46))}.{n}' for m, n in seen[acts])}")


if __name__ == "__main__":
    main()
