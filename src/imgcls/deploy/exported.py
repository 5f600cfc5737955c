"""Exported models read back without PyTorch: metadata, integrity, the documented preprocessing,
and an ONNX Runtime classifier. Imports numpy, Pillow, onnx and onnxruntime only (never torch),
so a deployment needs none of imgcls's training code."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgcls.data.images import DEFAULT_MAX_PIXELS, load_image
from imgcls.errors import UserError

METADATA_KEY = "imgcls"  # the JSON document every export carries (ONNX metadata_props, safetensors header)
FORMAT_VERSION = 1
RESIZE = "torchvision.transforms.v2.Resize"
CENTER_CROP = "torchvision.transforms.v2.CenterCrop"


class ExportError(UserError):
    """An export that cannot be written, read or trusted; the message names the file."""


def preprocessing_steps(nodes: Sequence[dict], cache_size: int | None) -> tuple[list[dict], str | None]:
    """The eval pipeline's transform nodes as plain steps, and why they cannot be reproduced
    without torchvision (None when they can: resize and center crop, bilinear, antialiased)."""
    steps: list[dict] = []
    if cache_size:
        # data.cache_size: the shorter side resized once at decoding (cache.decode, Pillow bilinear)
        steps.append({"op": "resize_shorter_pil", "size": int(cache_size), "enlarge": False})
    problem = None
    for node in nodes:
        target = str(node.get("_target_", ""))
        args = {k: v for k, v in node.items() if not k.startswith("_")}
        size = args.get("size")
        sizes = [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size)] if size else []
        if target == RESIZE and sizes:
            interpolation = str(args.get("interpolation", "bilinear")).lower().rsplit(".", 1)[-1]
            if interpolation != "bilinear" or args.get("antialias", True) is not True:
                problem = f"{target} with interpolation={interpolation}, antialias={args.get('antialias')}"
            steps.append({"op": "resize", "size": sizes, "max_size": args.get("max_size")})
        elif target == CENTER_CROP and sizes:
            steps.append({"op": "center_crop", "size": sizes * 2 if len(sizes) == 1 else sizes})
        else:
            problem = problem or f"{target}({', '.join(f'{k}={v}' for k, v in args.items())})"
            steps.append({"op": "torchvision", "node": dict(node)})
    if problem:
        problem = (
            f"the eval pipeline has {problem}, which the torch-free predictor does not reproduce "
            "(it does bilinear antialiased Resize and CenterCrop)"
        )
    return steps, problem


def _resized(width: int, height: int, size: list[int], max_size: int | None) -> tuple[int, int]:
    """torchvision's output size: [h, w] exactly; one number: the shorter side, the longer one
    scaled and truncated, then capped by max_size."""
    if len(size) == 2:
        return size[1], size[0]
    short, long = sorted((width, height))
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), int(max_size)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def apply_steps(image, steps: Sequence[dict]) -> np.ndarray:
    """A decoded RGB Pillow image through the steps -> uint8 CHW array, as the eval pipeline gives
    it to the model (Pillow's bilinear resize stands in for torchvision's antialiased one: pixel
    values can differ by a few levels; `python -m imgcls.export` measures by how much)."""
    for step in steps:
        op = step["op"]
        if op == "resize_shorter_pil":
            w, h = image.size
            if min(w, h) > step["size"]:
                scale = step["size"] / min(w, h)
                size = (max(step["size"], round(w * scale)), max(step["size"], round(h * scale)))
                image = image.resize(size, Image.BILINEAR)
        elif op == "resize":
            size = _resized(*image.size, list(step["size"]), step.get("max_size"))
            if size != image.size:
                image = image.resize(size, Image.BILINEAR)
        elif op == "center_crop":
            ch, cw = step["size"]
            w, h = image.size
            if cw > w or ch > h:  # torchvision pads with zeros around the image first
                left, top = (max(cw - w, 0)) // 2, (max(ch - h, 0)) // 2
                canvas = Image.new("RGB", (max(w, cw), max(h, ch)))
                canvas.paste(image, (left, top))
                image, (w, h) = canvas, canvas.size
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            image = image.crop((left, top, left + cw, top + ch))
        else:
            raise ExportError(f"preprocessing step {step} needs torchvision; predict with the run instead")
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def weights_digest(arrays: Sequence[tuple[str, bytes]]) -> str:
    """sha256 over (name, bytes) pairs in name order: any changed byte of any weight changes it."""
    h = hashlib.sha256()
    for name, data in sorted(arrays):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def onnx_digest(model) -> str:
    """The digest of an ONNX graph: its initializers and nodes (metadata_props is outside it)."""
    from onnx import numpy_helper  # lazy: onnx costs 1 s of start-up, and only ONNX files need it

    arrays = [(f"init:{t.name}", numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer]
    arrays.append(("graph:nodes", b"".join(n.SerializeToString() for n in model.graph.node)))
    return weights_digest(arrays)


def read_onnx(path: Path):
    """(onnx ModelProto, metadata): refuses a file that is missing, not ONNX, not an imgcls export,
    or whose graph changed since export (digest)."""
    import onnx  # lazy: 1 s of start-up, and only ONNX files need it
    from google.protobuf.message import DecodeError  # protobuf comes with onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(
            f"{path}: no such file; export one with python -m imgcls.export run_dir=<run> format=onnx"
        )
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ExportError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); the file is truncated or "
            "corrupt: export it again with python -m imgcls.export"
        ) from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path}: an ONNX model without imgcls metadata (class names, preprocessing): "
                          "export it with python -m imgcls.export")  # fmt: skip
    meta = parse_metadata(props[METADATA_KEY], path)
    if onnx_digest(model) != meta.get("weights_sha256"):
        raise ExportError(f"{path}: its graph or weights changed since export (digest mismatch): the file is "
                          "corrupt or was edited; export it again with python -m imgcls.export")  # fmt: skip
    return model, meta


def parse_metadata(text: str, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(text)
        names = meta["class_names"]
        meta["input"]["height"], meta["input"]["width"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(
            f"{path}: its imgcls metadata is unreadable ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(names, list) or len(names) < 2:
        raise ExportError(f"{path}: its metadata lists {names!r} as class names")
    return meta


class OnnxClassifier:
    """An exported ONNX model under ONNX Runtime: images in, class probabilities out."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None):
        import onnxruntime as ort  # lazy: only the ONNX predictor runs a model here

        self.path = Path(path)
        model, self.metadata = read_onnx(self.path)
        self.class_names: list[str] = list(self.metadata["class_names"])
        self.steps: list[dict] = self.metadata["preprocessing"]["steps"]
        self.torch_free_problem: str | None = self.metadata["preprocessing"].get("torch_free_problem")
        try:
            self.session = ort.InferenceSession(
                model.SerializeToString(), providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(
                f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})"
            ) from None
        out = self.session.get_outputs()[0]
        if out.shape[-1] != len(self.class_names):
            raise ExportError(
                f"{self.path}: the model gives {out.shape[-1]} outputs per image but its metadata "
                f"names {len(self.class_names)} classes: a mismatched export; export it again"
            )
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NCHW batch (as `apply_steps` gives each image) -> float32 logits (N, classes)."""
        return self.session.run(["logits"], {self.input_name: np.ascontiguousarray(batch, dtype=np.uint8)})[0]

    def preprocess(self, path: str | Path, max_pixels: int | None = None) -> np.ndarray:
        if self.torch_free_problem:
            raise ExportError(f"{self.path}: {self.torch_free_problem}. Predict with the run instead: "
                              "python -m imgcls.predict run_dir=<run> inputs=[...]")  # fmt: skip
        return apply_steps(load_image(path, max_pixels or DEFAULT_MAX_PIXELS), self.steps)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
