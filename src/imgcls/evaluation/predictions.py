"""predict's torch-free half: the inputs it reads (collect_images, unreadable_inputs), the
predictions.csv and console table it writes (write_predictions), and the ONNX predictor
(predict_onnx), which runs an exported model under ONNX Runtime without PyTorch. Nothing here
imports torch: tests/test_export.py runs the ONNX predictor with torch made unimportable."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from loguru import logger

from imgcls.data import scan_class
from imgcls.data.images import DEFAULT_MAX_FILE_MB, MB, BadImageError, load_image
from imgcls.deploy.exported import OnnxClassifier, softmax
from imgcls.errors import ConfigError, DataError
from imgcls.evaluation import tables
from imgcls.evaluation.prediction_rows import prediction_rows, topk_indices, write_csv
from imgcls.files import check_writable, writing_into
from imgcls.log import logged, progress
from imgcls.runs import OUT_DIR_HINT, RunError, output_dir

SHOWN = 10  # unreadable inputs listed on the console; predictions.csv (or predict.log) has them all


def collect_images(inputs: str | Sequence[str], extensions: Sequence[str]) -> list[Path]:
    """Files as named (whatever their suffix), and the image files below each folder (recursive,
    sorted, by suffix), in the order given, each file once. A name that is there but is no regular
    file (a FIFO, a device, a socket, a broken link) is listed too: reading it is refused, with
    what it is, by unreadable_inputs, and its row in predictions.csv says so."""
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


def predict_onnx(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """The same predictions.csv and console table from an exported ONNX model under ONNX Runtime,
    with the preprocessing its metadata documents: no PyTorch, no training code."""
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
        (out / "config.yaml").write_text(
            yaml.safe_dump({"predict": cfg, "onnx": str(model.path)}, sort_keys=False)
        )
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


def unreadable_inputs(files: list[Path], max_pixels: int, max_bytes: int | None = None) -> dict[Path, str]:
    """{file: why} for each input that does not decode (load_image, as in training: only regular
    files of at most max_bytes, data.max_file_mb, are opened)."""

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
