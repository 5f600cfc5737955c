"""`python -m imgcls.evaluate run_dir=...`: a run's checkpoint on one split, sample by sample, reported.

The entry: Hydra's command line (conf/evaluate.yaml); the evaluation is imgcls.evaluation.evaluate_command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgcls.cli import run_command
from imgcls.runs import find_run


def run(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Evaluate as conf/evaluate.yaml's keys say, with `overrides` applied to the run's saved
    config (to each member's, for an ensemble); returns the new evaluation folder."""
    # the runs first: a wrong run_dir is refused in 0.4 s, not after the evaluation's imports (torch,
    # torchvision, matplotlib, TensorBoard: 4.1 s for that error); evaluate() finds them again
    single, many = cfg.get("run_dir"), cfg.get("run_dirs")
    named = [single] if single and not many else many if isinstance(many, list) and not single else []
    for run_dir in named:
        if isinstance(run_dir, str):  # anything else: evaluate() says what is wrong with it
            find_run(run_dir)
    # lazy: the evaluation loads torch, only once Hydra parsed the command line: --help stays torch-free
    from imgcls.evaluation.evaluate_command import evaluate

    return evaluate(cfg, overrides)


def main() -> None:
    run_command("evaluate", run, run_paths=("run_dir", "checkpoint", "out_dir"))


if __name__ == "__main__":
    main()
