"""Classifiers: any torchvision classification model by its constructor name, head sized to the data."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from imgcls.checkpoint import Unloadable, load_weights_only
from imgcls.errors import ConfigError
from imgcls.models import TIMM_TARGET, TORCHVISION_TARGET


def classifier_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def create_model(
    name: str,
    num_classes: int,
    weights: str | None = None,
    freeze_backbone: bool = False,
    **kwargs,
) -> nn.Module:
    """torchvision.models.<name>(...) with a num_classes-way head.

    `weights`: None trains from scratch (the constructor sizes the head); a torchvision weights
    name (DEFAULT, IMAGENET1K_V1, or ResNet18_Weights.IMAGENET1K_V1) loads them through
    torchvision (downloaded once into the torch hub cache); a path to a .pth/.pt file loads a
    state dict (or an imgcls checkpoint's model) saved from the same architecture. Either way the
    head is then replaced by a fresh num_classes-way one, unless it already has that size.
    `freeze_backbone`: only the head's parameters train."""
    names = classifier_names()
    if name not in names:
        raise ValueError(
            f"model.name={name!r} is not a torchvision classifier. Choose one of: {', '.join(names)}"
        )
    builder = torchvision.models.get_model_builder(name)
    if weights is None:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
    elif _is_path(weights):
        model = builder(weights=None, num_classes=num_classes, **kwargs)
        load_local_weights(model, Path(weights))
    else:
        model = builder(weights=_pretrained(name, weights), **kwargs)
        replace_head(model, num_classes)
    if freeze_backbone:
        head = head_name(model)
        for param_name, param in model.named_parameters():
            param.requires_grad = param_name.startswith(head + ".")
    return model


# what torchvision's builder sets when it is given weights (googlenet.py, inception.py: the
# pretrained models normalise their input their own way); the rest build the same modules either way
_WITH_WEIGHTS = {"googlenet": {"transform_input": True}, "inception_v3": {"transform_input": True}}


def architecture_only(model: dict) -> dict:
    """A model node without its weights, building the same modules, for a checkpoint's weights to
    be loaded into (evaluate, predict, export, resume). Nothing is downloaded or read: a saved run's
    config may come from someone else, and `model.weights` may name their host's hub or a path on
    the reader's machine; the checkpoint holds every weight anyway."""
    if not isinstance(model, dict) or model.get("weights") is None:
        return model
    if model.get("_target_") == TIMM_TARGET:  # timm builds the same modules; the tag picks the config
        return {**model, "weights": None}
    if model.get("_target_") == TORCHVISION_TARGET:
        same = {} if _is_path(str(model["weights"])) else _WITH_WEIGHTS.get(model.get("name"), {})
        return {**same, **model, "weights": None}
    return model


def _is_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".pth", ".pt"))


def _pretrained(name: str, weights: str):
    """The torchvision weights enum, present in the hub cache or downloadable; else a clear error."""
    enum = torchvision.models.get_model_weights(name)
    key = weights.split(".")[-1]
    if key not in enum.__members__:
        raise ValueError(
            f"model.weights={weights!r} is not a weights name of {name}; choose one of: "
            f"{', '.join(enum.__members__)}, or a path to a .pth file"
        )
    value = enum[key]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(value.url).name
    if not cached.is_file():
        try:
            torch.hub.load_state_dict_from_url(value.url, progress=True)
        except Exception as exc:  # no network: say where the file goes instead of a URLError
            raise ValueError(
                f"model.weights={weights!r}: cannot download {value.url} ({type(exc).__name__}: {exc}). "
                f"Download it on a machine with internet and put it at {cached}, or pass a local "
                "file: model.weights=/path/to/weights.pth"
            ) from exc
    return value


def load_local_weights(model: nn.Module, path: Path) -> None:
    """Load every tensor whose name and shape match; the head may differ (it stays fresh).

    The file is read with torch.load(weights_only=True) and nothing else: a run's config may come
    from someone else, and model.weights is only ever read."""
    saved = "torch.save(model.state_dict(), path)"
    if not path.is_file():
        raise ConfigError(
            f"model.weights={path}: not a file. Give a file written by {saved}, an imgcls checkpoint, "
            "or a torchvision weights name (DEFAULT, IMAGENET1K_V1)."
        )
    try:
        state = load_weights_only(path)
    except Unloadable as exc:
        if exc.objects:
            raise ConfigError(
                f"model.weights={path}: the file holds more than tensors and plain values ({exc.detail}), "
                f"and imgcls loads only weights-only files. Re-save the weights alone: {saved}."
            ) from None
        raise ConfigError(
            f"model.weights={path}: not a PyTorch weights file ({exc.detail}). Give a file written by "
            f"{saved} or an imgcls checkpoint."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # an imgcls checkpoint
    if not isinstance(state, dict):
        raise ConfigError(
            f"model.weights={path}: holds a {type(state).__name__}, not a state dict (parameter names "
            f"to tensors). Re-save the weights: {saved}."
        )
    own = model.state_dict()
    head = head_name(model) + "."
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    problems = [k for k in mismatched + missing if not k.startswith(head)]
    if problems:
        raise ConfigError(
            f"model.weights={path}: does not fit {type(model).__name__}: {len(problems)} of its "
            f"{len(own)} tensors are missing or of another shape (e.g. {', '.join(problems[:3])}). "
            "Was it saved from another architecture? Set model.name to the one it was saved from."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)


def head_name(model: nn.Module) -> str:
    """The name of the classifier head: the last nn.Linear."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last nn.Linear (the classifier in every torchvision classifier but SqueezeNet's)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head to resize")
    name, old = linears[-1]
    if old.out_features == num_classes:
        return model
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(
        parent, name.rpartition(".")[2], nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
