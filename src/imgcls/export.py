"""`python -m imgcls.export run_dir=... format=onnx|torchscript|safetensors`: a deployable model
next to the run, checked against PyTorch on real validation images before it is kept.

The entry: Hydra's command line (conf/export.yaml); the export is imgcls.deploy.export_command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgcls.cli import run_command
from imgcls.runs import find_run


def run(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Export as conf/export.yaml's keys say; returns the exported file."""
    # the run first: a wrong run_dir is refused in 0.4 s, not after the export's imports (torch,
    # torchvision: 2.9 s for that error); export() finds it again
    find_run(cfg["run_dir"])
    # lazy: the export loads torch, only once Hydra parsed the command line: --help stays torch-free
    from imgcls.deploy.export_command import export

    return export(cfg, overrides)


def main() -> None:
    run_command("export", run, run_paths=("run_dir", "checkpoint", "out_dir"))


if __name__ == "__main__":
    main()
