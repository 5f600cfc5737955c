"""Classifiers: any torchvision classification model by its constructor name, head sized to the data."""

from __future__ import annotations

import torchvision
from torch import nn


def classifier_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def create_model(name: str, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
    """torchvision.models.<name>(...) with a num_classes-way head.

    From scratch the constructor sizes the head itself; with pretrained weights (a torchvision
    weights name) the 1000-way ImageNet head is replaced by a freshly initialized one.
    """
    names = classifier_names()
    if name not in names:
        raise ValueError(
            f"model.name={name!r} is not a torchvision classifier. Choose one of: {', '.join(names)}"
        )
    builder = torchvision.models.get_model_builder(name)
    if weights is None:
        return builder(weights=None, num_classes=num_classes, **kwargs)
    model = builder(weights=weights, **kwargs)
    replace_head(model, num_classes)
    return model


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
