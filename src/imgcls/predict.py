"""`python -m imgcls.predict run_dir=... inputs=[...]`: classify images without labels, top-k per image.

The entry: Hydra's command line (conf/predict.yaml) and which predictor runs: a training run's
checkpoint (imgcls.evaluation.predict_command, PyTorch) or an exported ONNX model
(imgcls.evaluation.predictions.predict_onnx, no PyTorch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgcls.cli import run_command
from imgcls.errors import ConfigError


def run(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Predict as conf/predict.yaml's keys say; returns the folder holding predictions.csv."""
    if cfg.get("onnx") and cfg.get("run_dir"):
        raise ConfigError("set run_dir=<a training run> or onnx=<an exported .onnx file>, not both")
    if cfg.get("onnx"):
        # lazy: the ONNX predictor (matplotlib, ONNX Runtime) loads only once Hydra parsed the command
        # line; it never imports torch
        from imgcls.evaluation.predictions import predict_onnx

        return predict_onnx(cfg, overrides)
    if not cfg.get("run_dir"):
        raise ConfigError(
            "run_dir is required: set it on the command line, run_dir=... (a training run), "
            "or onnx=<run>/export/best.onnx (an exported model)"
        )
    # lazy: the run's predictor loads torch, only once Hydra parsed the command line: --help stays torch-free
    from imgcls.evaluation.predict_command import predict_with_run

    return predict_with_run(cfg, overrides)


def main() -> None:
    run_command("predict", run, run_paths=("run_dir", "checkpoint", "out_dir", "onnx"))


if __name__ == "__main__":
    main()
