"""`python -m imgcls.evaluate run_dir=...`: a run's checkpoint on one split, sample by sample, reported.

The entry: Hydra's command line (conf/evaluate.yaml); the evaluation is imgcls.evaluation.evaluate_command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgcls.cli import run_command


def run(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Evaluate as conf/evaluate.yaml's keys say, with `overrides` applied to the run's saved
    config (to each member's, for an ensemble); returns the new evaluation folder."""
    # lazy: the evaluation loads torch, only once Hydra parsed the command line: --help stays torch-free
    from imgcls.evaluation.evaluate_command import evaluate

    return evaluate(cfg, overrides)


def main() -> None:
    run_command("evaluate", run, run_paths=("run_dir", "checkpoint", "out_dir"))


if __name__ == "__main__":
    main()
