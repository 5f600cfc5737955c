"""The three export formats: write each (and read it back as its users would), with the class
names, preprocessing and a weights digest as metadata. Called by `python -m imgcls.export`."""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from imgcls.data.images import DEFAULT_MAX_PIXELS, load_image
from imgcls.deploy.exported import (
    METADATA_KEY,
    ExportError,
    OnnxClassifier,
    apply_steps,
    onnx_digest,
    parse_metadata,
    weights_digest,
)


def tensor_bytes(state: dict) -> list[tuple[str, bytes]]:
    """(name, raw bytes) of each tensor, for formats' weights digests (any dtype, bfloat16 too)."""
    return [
        (k, v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for k, v in state.items()
    ]


def write_onnx(path: Path, model, images, metadata: dict, cfg: dict):
    import onnx  # lazy: 1 s of start-up, for format=onnx only

    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their optimizer passes log at INFO, per pass
        logging.getLogger(name).setLevel(logging.WARNING)
    opset = cfg.get("opset")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (images,), str(path), input_names=["images"], output_names=["logits"], dynamo=True,
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, opset_version=opset,
                external_data=False, verbose=False,
            )  # fmt: skip
    except Exception as exc:  # the exporter raises many types; the TorchScript-based one may still work
        logger.warning(f"torch.export-based ONNX export failed ({type(exc).__name__}: {exc}); trying the "
                       "TorchScript-based exporter")  # fmt: skip
        torch.onnx.export(
            model, (images,), str(path), input_names=["images"], output_names=["logits"], dynamo=False,
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset or 17,
        )  # fmt: skip
    proto = onnx.load(str(path))
    metadata = {**metadata, "weights_sha256": onnx_digest(proto)}
    del proto.metadata_props[:]
    for key, value in {
        METADATA_KEY: json.dumps(metadata),
        "class_names": json.dumps(metadata["class_names"]),
        "preprocessing": json.dumps(metadata["preprocessing"]),
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    session = OnnxClassifier(path)  # read back as predict reads it: digest, metadata, ONNX Runtime
    batch = images.numpy()
    outputs = (session.logits(batch), session.logits(batch[:1]))
    extra: dict = {"opset": int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))}
    if not metadata["preprocessing"]["torch_free_problem"]:
        # the predictor's own preprocessing (Pillow, no torch) on the same files, against the pipeline's
        max_pixels = metadata["config"]["data"].get("max_image_pixels") or DEFAULT_MAX_PIXELS
        own = np.stack([apply_steps(load_image(p, max_pixels), session.steps) for p in images.paths])
        pixel = (
            int(np.abs(own.astype(np.int16) - batch.astype(np.int16)).max())
            if own.shape == batch.shape
            else None
        )
        if pixel is None:
            raise RuntimeError(
                f"torch-free preprocessing gives {own.shape[1:]}, the pipeline {batch.shape[1:]}"
            )
        logits = session.logits(own)
        with torch.inference_mode():
            reference = model(images).numpy()
        extra["torch_free"] = {
            "max_pixel_diff": pixel,
            "max_abs_diff": float(np.abs(logits - reference).max()),
            "top1_agree": int((logits.argmax(1) == reference.argmax(1)).sum()),
        }
    return outputs, extra


def write_torchscript(path: Path, model, images, metadata: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, and still works
        traced = torch.jit.trace(model, images, check_trace=False)
        metadata = {**metadata, "weights_sha256": weights_digest(tensor_bytes(traced.state_dict()))}
        torch.jit.save(traced, str(path), _extra_files={"imgcls.json": json.dumps(metadata)})
        loaded, _ = read_torchscript(path)
        with torch.inference_mode():
            return (loaded(images), loaded(images[:1])), {}


def read_torchscript(path: Path):
    """(scripted module, metadata), refusing a file whose weights changed since export."""
    files = {"imgcls.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    except Exception as exc:  # torch raises RuntimeError and zip errors alike
        raise ExportError(
            f"{path}: not a readable TorchScript file ({type(exc).__name__}): export it again"
        ) from None
    meta = parse_metadata(files["imgcls.json"], Path(path))
    if weights_digest(tensor_bytes(module.state_dict())) != meta.get("weights_sha256"):
        raise ExportError(f"{path}: its weights changed since export (digest mismatch): export it again")
    return module.eval(), meta


def write_safetensors(path: Path, restored, images, metadata: dict):
    state = {k: v.detach().cpu().contiguous().clone() for k, v in restored.model.state_dict().items()}
    metadata = {**metadata, "weights_sha256": weights_digest(tensor_bytes(state))}
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    loaded, _ = read_safetensors(path)
    fresh = copy.deepcopy(restored.model)
    fresh.load_state_dict(loaded, strict=True)
    fresh.eval()
    with torch.inference_mode():
        x = restored.normalize(images)
        return (fresh(x), fresh(x[:1])), {}


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(state dict, metadata), refusing a file whose weights changed since export. Load the state
    dict into the model that metadata["config"]["model"] builds (normalization is not inside)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable safetensors file ({exc}): export it again") from None
    if METADATA_KEY not in header:
        raise ExportError(f"{path}: a safetensors file without imgcls metadata: export it with imgcls.export")
    meta = parse_metadata(header[METADATA_KEY], Path(path))
    if weights_digest(tensor_bytes(state)) != meta.get("weights_sha256"):
        raise ExportError(f"{path}: its weights changed since export (digest mismatch): export it again")
    return state, meta
