"""predict with a training run's checkpoint (`python -m imgcls.predict run_dir=...`, the entry in
imgcls.predict): the run's model and eval pipeline on images without labels; the inputs and
predictions.csv are imgcls.evaluation.predictions' (shared with the torch-free ONNX predictor)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

from imgcls.config import build as b
from imgcls.data.loaders import make_loader
from imgcls.data.record import DataRecord
from imgcls.evaluation.inference import predict
from imgcls.evaluation.predictions import (
    collect_images,
    nothing_readable,
    unreadable_inputs,
    write_predictions,
)
from imgcls.files import check_writable, writing_into
from imgcls.log import logged
from imgcls.runs import OUT_DIR_HINT, find_checkpoint, find_run, load_run, output_dir, restore


def predict_with_run(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Predict with the checkpoint of cfg's run_dir as conf/predict.yaml's keys say; returns the
    folder holding predictions.csv."""
    run_dir = find_run(cfg["run_dir"])
    # where the results go can take them (not read-only, not full) before the model is built
    default = run_dir / "predict"
    check_writable(Path(cfg["out_dir"]).parent if cfg.get("out_dir") else default, hint=OUT_DIR_HINT)
    checkpoint = find_checkpoint(run_dir, cfg["checkpoint"])
    config, state = load_run(run_dir, checkpoint, overrides)  # every _target_ checked here
    class_names = list(state["class_names"])
    # the run's data node gives the loader settings (batch size, workers) and the image suffixes
    data = b.build_data(config["data"])
    files = collect_images(cfg["inputs"], data.extensions)
    restored = restore(config, state, checkpoint)

    if cfg.get("out_dir"):
        out = output_dir(Path(cfg["out_dir"]).parent, Path(cfg["out_dir"]).name, [])
    else:
        out = output_dir(run_dir / "predict", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), [])
    with writing_into(out, hint=OUT_DIR_HINT), logged(out / "predict.log", "prediction"):
        logger.info(f"predicting {len(files)} image(s) with {checkpoint} (epoch {state.get('epoch', '?')})")
        (out / "config.yaml").write_text(
            yaml.safe_dump(
                {"predict": cfg, "overrides": overrides, "checkpoint": str(checkpoint), "run": config},
                sort_keys=False,
            )
        )
        # decoded once first, as training's data check does: the loader then meets no bad file
        unreadable = unreadable_inputs(files, data.max_pixels, data.max_bytes)
        readable = [f for f in files if f not in unreadable]
        if not readable:
            raise nothing_readable(unreadable)
        record = DataRecord.of_files(readable, class_names, split="predict")  # no labels: -1
        # the val pipeline: the one whose accuracy training reported
        loader = make_loader(
            data,
            record,
            "predict",
            restored.pipelines["val"],
            train=False,
            pin_memory=restored.device.type == "cuda",
        )
        p = predict(restored.model, loader, restored.place, description="predict")
        write_predictions(out, cfg, files, unreadable, p.logits, p.probs, p.preds, class_names)
        return out
