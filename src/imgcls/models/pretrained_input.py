"""The input a timm model's pretrained weights expect (size, crop_pct, mean, std), applied to a run's transforms."""

from __future__ import annotations

import math

from imgcls.models import TIMM_TARGET
from imgcls.models.timm import check_name, pretrained_cfg


def pretrained_input(model: dict) -> dict | None:
    """timm's input config of the pretrained weights a model node loads ({input_size: (3, H, W),
    crop_pct, mean, std, ...}, timm.data.resolve_data_config), or None: not a timm node, or no weights."""
    if not isinstance(model, dict) or model.get("_target_") != TIMM_TARGET:
        return None
    check_name(model["name"])  # a misspelt name is refused here, before the data check reads the files
    if model.get("weights") is None:
        return None
    cfg = pretrained_cfg(str(model["name"]))
    if cfg is None:
        return None  # create_model says that there are no weights
    from timm.data import resolve_data_config  # lazy: the optional timm extra, for timm nodes only

    return resolve_data_config(pretrained_cfg=cfg)


CROPS = ("RandomResizedCrop", "CenterCrop", "RandomCrop")  # each outputs exactly its size
SIZED = ("Resize", *CROPS)


def with_pretrained_input(config: dict) -> tuple[dict, str | None]:
    """The config with its transforms sized and normalized as timm's pretrained config says (for
    a timm model with weights), and a line saying so; else the config as it is and None.

    Each split keeps its own pipeline (augmentations stay): a Resize followed by a crop resizes to
    size / crop_pct (timm's eval resize), the last resize or crop gives the model's input size, a
    pipeline without either gets a Resize to it first; normalize takes timm's mean and std.
    Applying it twice changes nothing, so a saved config reads back the same."""
    data = pretrained_input(config.get("model"))
    if data is None:
        return config, None
    _, height, width = data["input_size"]
    crop_pct = float(data.get("crop_pct") or 1.0)
    scale = [math.floor(height / crop_pct), math.floor(width / crop_pct)]
    transforms = dict(config["transforms"])
    for split in ("train", "val", "test"):
        if transforms.get(split) is not None:
            transforms[split] = _sized(transforms[split], (height, width), scale)
    transforms["normalize"] = {
        "mean": [float(m) for m in data["mean"]],
        "std": [float(s) for s in data["std"]],
    }
    line = (
        f"{height}x{width} px, mean {transforms['normalize']['mean']}, std {transforms['normalize']['std']}, "
        f"crop_pct {crop_pct} (a Resize before a crop: {_size(scale)}): timm's pretrained config of "
        f"{config['model']['name']}; the transforms' sizes and normalize follow it"
    )
    return {**config, "transforms": transforms}, line


def _size(hw) -> int | list[int]:
    """An int where square (a crop's size, a Resize of the shorter side), else [height, width]."""
    return hw[0] if hw[0] == hw[1] else list(hw)


def _sized(nodes: list, hw: tuple[int, int], scale: list[int]) -> list:
    kinds = [str(n.get("_target_", "")).rpartition(".")[2] if isinstance(n, dict) else "" for n in nodes]
    sized = [i for i, kind in enumerate(kinds) if kind in SIZED]
    if not sized:
        return [{"_target_": "torchvision.transforms.v2.Resize", "size": list(hw), "antialias": True}, *nodes]
    out = list(nodes)
    for i in sized:
        last = i == sized[-1]
        if kinds[i] in CROPS:
            size = _size(hw)
        elif last:
            size = list(hw)  # a Resize alone must give both sides
        else:
            size = _size(scale) if any(kinds[j] in CROPS for j in sized if j > i) else list(hw)
        out[i] = {**nodes[i], "size": size}
    return out
