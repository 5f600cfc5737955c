"""`python -m imgcls.predict run_dir=... inputs=[...]`: classify images without labels, top-k per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgcls.cli import run_command


def collect_images(inputs: str | Sequence[str], extensions: Sequence[str]) -> list[Path]:
    """Files as named (whatever their suffix), and the image files below each folder (recursive,
    sorted, by suffix), in the order given, each file once. A name that is there but is no regular
    file (a FIFO, a device, a socket, a broken link) is listed too: reading it is refused, with
    what it is, by unreadable_inputs, and its row in predictions.csv says so."""
    import os

    from imgcls.data import DataError, scan_class
    from imgcls.runs import RunError

    items = [inputs] if isinstance(inputs, str) else list(inputs or [])
    if not items:
        raise RunError("inputs is empty: name image files or folders, inputs=[photo.jpg,some/folder]")
    files: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found, _ = scan_class(path, extensions)
            if not found:
                raise DataError(f"inputs: {path} holds no image files ({', '.join(extensions)})")
            files += found
        elif path.is_file() or os.path.lexists(path):
            files.append(path)
        else:
            parent = path.parent
            while not parent.is_dir() and parent != parent.parent:
                parent = parent.parent
            names = sorted(
                p.name + ("/" if p.is_dir() else "") for p in parent.iterdir() if not p.name.startswith(".")
            )
            shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            raise RunError(f"inputs: {item} does not exist; {parent} holds: {shown or 'nothing'}")
    return list(dict.fromkeys(files))


def run(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Predict as conf/predict.yaml's keys say; returns the folder holding predictions.csv."""
    from imgcls.errors import ConfigError

    if cfg.get("onnx") and cfg.get("run_dir"):
        raise ConfigError("set run_dir=<a training run> or onnx=<an exported .onnx file>, not both")
    if cfg.get("onnx"):
        return run_onnx(cfg, overrides)
    if not cfg.get("run_dir"):
        raise ConfigError(
            "run_dir is required: set it on the command line, run_dir=... (a training run), "
            "or onnx=<run>/export/best.onnx (an exported model)"
        )
    from datetime import datetime

    from loguru import logger

    from imgcls.config import build as b
    from imgcls.data.loaders import make_loader
    from imgcls.data.record import DataRecord
    from imgcls.evaluation.inference import predict
    from imgcls.files import check_writable, writing_into
    from imgcls.log import logged
    from imgcls.runs import OUT_DIR_HINT, find_checkpoint, find_run, load_run, output_dir, restore

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
            _yaml({"predict": cfg, "overrides": overrides, "checkpoint": str(checkpoint), "run": config})
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


def run_onnx(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """The same predictions.csv and console table from an exported ONNX model under ONNX Runtime,
    with the preprocessing its metadata documents: no PyTorch, no training code."""
    from datetime import datetime

    import numpy as np
    from loguru import logger

    from imgcls.data.images import BadImageError
    from imgcls.deploy.exported import OnnxClassifier, softmax
    from imgcls.errors import ConfigError
    from imgcls.files import check_writable, writing_into
    from imgcls.log import logged, progress
    from imgcls.runs import OUT_DIR_HINT, output_dir

    if overrides:
        raise ConfigError(
            f"{' '.join(overrides)}: an exported model has no run config to override; "
            "predict's own keys are listed by --help"
        )
    model = OnnxClassifier(Path(cfg["onnx"]).expanduser())
    default = model.path.parent / "predict"
    check_writable(Path(cfg["out_dir"]).parent if cfg.get("out_dir") else default, hint=OUT_DIR_HINT)
    data = model.metadata.get("config", {}).get("data", {})
    files = collect_images(cfg["inputs"], data.get("extensions") or [".jpg", ".jpeg", ".png"])
    if cfg.get("out_dir"):
        out = output_dir(Path(cfg["out_dir"]).parent, Path(cfg["out_dir"]).name, [])
    else:
        out = output_dir(model.path.parent / "predict", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), [])
    with writing_into(out, hint=OUT_DIR_HINT), logged(out / "predict.log", "prediction"):
        logger.info(f"predicting {len(files)} image(s) with {model.path} (ONNX Runtime)")
        (out / "config.yaml").write_text(_yaml({"predict": cfg, "onnx": str(model.path)}))
        batch_size = int(data.get("batch_size") or 32)
        logits, unreadable = [], {}
        with progress("predict", -(-len(files) // batch_size)) as advance:
            for start in range(0, len(files), batch_size):
                batch = []
                for f in files[start : start + batch_size]:
                    try:
                        batch.append(model.preprocess(f, data.get("max_image_pixels")))
                    except BadImageError as exc:  # one file's fault: the others are still predicted
                        unreadable[f] = str(exc)
                if batch:
                    logits.append(model.logits(np.stack(batch)))
                advance()
        if not logits:
            raise nothing_readable(unreadable)
        logits = np.concatenate(logits)
        probs = softmax(logits)
        write_predictions(out, cfg, files, unreadable, logits, probs, logits.argmax(1), model.class_names)
        return out


SHOWN = 10  # unreadable inputs listed on the console; predictions.csv (or predict.log) has them all


def unreadable_inputs(files: list[Path], max_pixels: int, max_bytes: int | None = None) -> dict[Path, str]:
    """{file: why} for each input that does not decode (load_image, as in training: only regular
    files of at most max_bytes, data.max_file_mb, are opened)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from imgcls.data.images import DEFAULT_MAX_FILE_MB, MB, BadImageError, load_image
    from imgcls.log import progress

    def why(path: Path) -> str | None:
        try:
            load_image(path, max_pixels, max_bytes or DEFAULT_MAX_FILE_MB * MB)
        except BadImageError as exc:
            return str(exc)
        return None

    reasons: dict[Path, str] = {}
    # threads: Pillow's decoders release the GIL (as in the data check)
    with (
        ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool,
        progress("checking inputs", len(files), max(1000, len(files) // 10)) as advance,
    ):
        for path, reason in zip(files, pool.map(why, files), strict=True):
            if reason:
                reasons[path] = reason
            advance()
    return reasons


def listed(unreadable: dict[Path, str]) -> str:
    items = [f"\n  {path}: {why}" for path, why in list(unreadable.items())[:SHOWN]]
    more = f"\n  and {len(unreadable) - SHOWN} more" if len(unreadable) > SHOWN else ""
    return "".join(items) + more


def nothing_readable(unreadable: dict[Path, str]) -> Exception:
    from loguru import logger

    from imgcls.errors import DataError

    if len(unreadable) > SHOWN:  # the message lists SHOWN of them; the log file gets them all
        logger.debug("unreadable inputs:" + "".join(f"\n  {p}: {why}" for p, why in unreadable.items()))
    return DataError(
        f"inputs: none of the {len(unreadable)} image(s) can be read, nothing to predict{listed(unreadable)}"
    )


def write_predictions(
    out: Path, cfg: dict, files: list[Path], unreadable: dict[Path, str], logits, probs, preds, class_names
) -> None:
    """predictions.csv (a row per input, in order; an unreadable one has an empty prediction and
    its reason in `error`), the console table (the first console_rows predicted) and the log."""
    from loguru import logger

    from imgcls.evaluation import tables
    from imgcls.evaluation.reports import prediction_rows, topk_indices, write_csv

    k = max(1, min(int(cfg["top_k"]), len(class_names)))
    readable = [f for f in files if f not in unreadable]
    rows = prediction_rows([str(f) for f in readable], probs, preds, topk_indices(logits, k), class_names)
    predicted = dict(zip(readable, rows, strict=True))
    empty = dict.fromkeys(rows[0], "")
    write_csv(
        out / "predictions.csv",
        [{**predicted.get(f, {**empty, "path": str(f)}), "error": unreadable.get(f, "")} for f in files],
    )
    text = tables.show([tables.predictions_table(rows, k, int(cfg["console_rows"]))])
    logger.debug("\n" + text)  # the file sink only: the console already shows the table
    if unreadable:
        logger.warning(
            f"{len(unreadable)} of {len(files)} input(s) cannot be read and were not predicted "
            f"(in predictions.csv: an empty prediction and the reason in `error`):{listed(unreadable)}"
        )
    of = f" of {len(files)}" if unreadable else ""
    logger.info(f"predictions for {len(rows)}{of} image(s) in {out / 'predictions.csv'}")


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def main() -> None:
    run_command("predict", run, run_paths=("run_dir", "checkpoint", "out_dir", "onnx"))


if __name__ == "__main__":
    main()
