"""The export command (`python -m imgcls.export`, the entry in imgcls.export): a run's checkpoint
written as ONNX, TorchScript or safetensors next to the run (imgcls.deploy.formats), checked
against PyTorch on real validation images before it is kept."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn

from imgcls import __version__
from imgcls.data.loaders import make_dataset
from imgcls.deploy.exported import ExportError, preprocessing_steps
from imgcls.deploy.formats import write_onnx, write_safetensors, write_torchscript
from imgcls.errors import ConfigError
from imgcls.evaluation.ensemble import load_member
from imgcls.files import atomic_path, atomic_write, make_dir, writing_into
from imgcls.log import logged
from imgcls.runs import OUT_DIR_HINT, find_run, restore

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
DECODE = "8-bit RGB: EXIF orientation applied, alpha composited onto white (imgcls.data.images.load_image)"


class Exportable(nn.Module):
    """uint8 NCHW RGB in, logits out: normalization is part of the exported model."""

    def __init__(self, normalize: nn.Module, model: nn.Module):
        super().__init__()
        self.normalize, self.model = normalize, model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def export(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Export as conf/export.yaml's keys say; returns the exported file."""
    fmt = str(cfg["format"])
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt}: choose one of {', '.join(FORMATS)}")
    if float(cfg["tolerance"]) < 0 or int(cfg["verify_images"]) < 1:
        raise ConfigError("tolerance must be >= 0 and verify_images >= 1")
    split = str(cfg["split"])
    # the output folder first: a read-only run is an error now, not after the model is built
    found = find_run(cfg["run_dir"])
    out_dir = make_dir(Path(cfg["out_dir"]) if cfg.get("out_dir") else found / "export", hint=OUT_DIR_HINT)
    # the run, its checkpoint and config (every _target_ checked) and the split's labelled files
    member = load_member(found, cfg, overrides, split)
    run_dir, checkpoint, state = member.run_dir, member.checkpoint, member.state
    config = {
        **member.config,
        "device": "cpu",
        "trainer": {**member.config.get("trainer", {}), "channels_last": False},
    }
    class_names = member.class_names
    restored = restore(config, state, checkpoint)  # on the CPU, in fp32: the reference outputs
    images = _verification_batch(
        member.data, member.record, split, restored.pipelines["val"], int(cfg["verify_images"])
    )

    label = str(cfg["checkpoint"]) if cfg["checkpoint"] in ("best", "last") else checkpoint.stem
    target = out_dir / f"{label}{FORMATS[fmt]}"
    with writing_into(out_dir, hint=OUT_DIR_HINT), logged(out_dir / "export.log", "export"):
        steps, problem = preprocessing_steps(
            config["transforms"].get("val") or [], config["data"].get("cache_size")
        )
        norm = config["transforms"]["normalize"]
        metadata = {
            "format_version": 1,
            "format": fmt,
            "imgcls_version": __version__,
            "class_names": class_names,
            "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                      "height": int(images.shape[2]), "width": int(images.shape[3]), "batch": "dynamic"},
            "output": {"name": "logits", "meaning": "class scores in class_names order; softmax gives probabilities"},
            "preprocessing": {
                "decode": DECODE, "steps": steps, "torch_free_problem": problem,
                "normalize": {"mean": list(norm["mean"]), "std": list(norm["std"]), "formula": "(x / 255 - mean) / std",
                              "in_model": fmt != "safetensors"},
            },
            "source": {"run_dir": str(run_dir.resolve()), "checkpoint": str(checkpoint.resolve()),
                       "epoch": int(state.get("epoch", 0)), "split_checked": split},
            "config": config,
        }  # fmt: skip
        logger.info(f"exporting {checkpoint} (epoch {state.get('epoch', '?')}) as {fmt} to {target}")
        # atomically: an earlier export stays whole until this one is checked; a full disk is an error
        with atomic_path(target, hint=OUT_DIR_HINT) as tmp:
            check = _write_and_check(fmt, tmp, restored, images, metadata, float(cfg["tolerance"]), cfg)
            if not check["passed"]:
                rejected = target.with_name(target.name + ".rejected")
                os.replace(tmp, rejected)
                raise ExportError(
                    f"{fmt} export does not match PyTorch: max |logit difference| {check['max_abs_diff']:.3g} > "
                    f"{check['allowed_abs_diff']:.3g} (tolerance {check['tolerance']:.3g} x the largest |logit| "
                    f"{check['logit_scale']:.3g}), top-1 agrees on {check['top1_agree']}/{check['images']} "
                    f"images; kept as {rejected} for inspection, {target} left as it was"
                )
        atomic_write(target.with_name(target.name + ".check.json"), json.dumps(check, indent=2) + "\n")
        logger.info(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB); check: {_describe(check)}")
        if problem and fmt == "onnx":
            logger.warning(f"{problem}: python -m imgcls.predict onnx=... will refuse this export")
        return target


def _verification_batch(data, record, split: str, pipeline, n: int):
    """n images spread evenly over the split (every class, not the first folder's), through the
    eval pipeline as evaluation feeds them: a uint8 NCHW batch."""
    dataset = make_dataset(data, record, split, pipeline)
    count = len(dataset)
    picks = sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(min(n, count))})
    tensors = [dataset[i][0] for i in picks]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ExportError(
            f"the eval pipeline (transforms.val) gives images of different sizes {sorted(shapes)}: an "
            "export needs one input size; end transforms.val with a CenterCrop (or a Resize to [h, w])"
        )
    batch = torch.stack(tensors)
    batch.paths = [record.samples[split][i][0] for i in picks]  # type: ignore[attr-defined]
    return batch


def _write_and_check(
    fmt: str, path: Path, restored, images, metadata: dict, tolerance: float, cfg: dict
) -> dict:
    """`restored` written as `fmt` to `path` and read back: its logits on `images` (the batch, and
    its first image alone) against PyTorch's, as the export's .check.json records them."""
    model = Exportable(restored.normalize.cpu(), restored.model.cpu()).eval()
    with torch.inference_mode():
        reference = model(images).float()
        single = model(images[:1]).float()

    if fmt == "onnx":
        outputs, extra = write_onnx(path, model, images, metadata, cfg)
    elif fmt == "torchscript":
        outputs, extra = write_torchscript(path, model, images, metadata)
    else:
        outputs, extra = write_safetensors(path, restored, images, metadata)
    got, got_single = (torch.as_tensor(o).float() for o in outputs)
    diff = max((got - reference).abs().max().item(), (got_single - single).abs().max().item())
    agree = int((got.argmax(1) == reference.argmax(1)).sum())
    # float32 rounding grows with the logits' size: the tolerance is relative to the largest |logit|
    scale = max(1.0, reference.abs().max().item(), single.abs().max().item())
    return {
        "format": fmt,
        "images": int(images.shape[0]),
        "batch_sizes_checked": [int(images.shape[0]), 1],
        "max_abs_diff": diff,
        "logit_scale": scale,
        "tolerance": tolerance,
        "allowed_abs_diff": tolerance * scale,
        "top1_agree": agree,
        "passed": diff <= tolerance * scale and agree == images.shape[0],
        "checked_files": list(images.paths),
        **extra,
    }


def _describe(check: dict) -> str:
    text = (
        f"max |logit difference| {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g} x the largest "
        f"|logit| {check['logit_scale']:.3g} = {check['allowed_abs_diff']:.3g}) on "
        f"{check['images']} real images, batch sizes {check['batch_sizes_checked']}; top-1 agrees on "
        f"{check['top1_agree']}/{check['images']}"
    )
    if "torch_free" in check:
        tf = check["torch_free"]
        text += (
            f"; torch-free preprocessing (Pillow): max pixel difference {tf['max_pixel_diff']}/255, "
            f"max |logit difference| {tf['max_abs_diff']:.3g}, top-1 agrees on {tf['top1_agree']}/{check['images']}"
        )
    return text
