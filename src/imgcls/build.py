"""The one place where config nodes become objects: `_target_`s checked against the registry
(imgcls.targets), then instantiate."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from imgcls.errors import ConfigError, UserError
from imgcls.targets import check_targets


def plain(node: Any) -> Any:
    """An OmegaConf node as plain, resolved Python containers (nothing OmegaConf reaches torch)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node


def build(node: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """instantiate(node) once every `_target_` in it is what `key` may build; failures name the key."""
    node = plain(node)
    check_targets(node, key)
    try:
        return instantiate(node, *args, **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"cannot build {key} ({node.get('_target_')}): {cause}") from exc


def build_data(cfg: Any):
    return build(cfg, "data")


def build_transforms(cfg: Any) -> tuple[dict[str, Any], Any]:
    """{split: Compose of the split's v2 nodes}, and the on-device Normalize."""
    from torchvision.transforms import v2

    from imgcls.data import Normalize

    cfg = plain(cfg)
    pipelines = {}
    for split in ("train", "val", "test"):
        nodes = cfg.get(split) or []
        pipelines[split] = v2.Compose([build(n, f"transforms.{split}[{i}]") for i, n in enumerate(nodes)])
    norm = cfg.get("normalize") or {}
    try:
        normalize = Normalize(norm["mean"], norm["std"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"transforms.normalize needs mean and std lists, got {norm!r}") from exc
    return pipelines, normalize


def complete(partial: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """Call a `_partial_: true` node's partial with its run-time arguments; errors name the key."""
    try:
        return partial(*args, **kwargs)
    except UserError:
        raise  # it names its key already (model.weights=...)
    except (TypeError, ValueError) as exc:
        target = getattr(partial, "func", partial)
        raise ConfigError(f"cannot build {key} ({getattr(target, '__qualname__', target)}): {exc}") from exc


def build_model(cfg: Any, num_classes: int):
    return complete(build(cfg, "model"), "model", num_classes=num_classes)


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: decaying norms' scales and biases hurts (timm, torchvision refs)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Any, model):
    partial = build(cfg, "optimizer")
    weight_decay = partial.keywords.get("weight_decay", 0.0)
    return complete(partial, "optimizer", parameter_groups(model, weight_decay))


def _accepts(partial: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(getattr(partial, "func", partial)).parameters
    except (TypeError, ValueError):
        return False


def build_scheduler(cfg: Any, optimizer, steps_per_epoch: int = 1):
    """None for the `none` option (an empty node). Schedules stepped per optimizer step get the
    number of optimizer steps per epoch, which only the data knows."""
    cfg = plain(cfg)
    if not cfg or not cfg.get("_target_"):
        return None
    partial = build(cfg, "scheduler")
    extra = {"steps_per_epoch": steps_per_epoch} if _accepts(partial, "steps_per_epoch") else {}
    return complete(partial, "scheduler", optimizer, **extra)


def build_loss(cfg: Any, class_counts: list[int] | None = None):
    """The loss; one that takes `class_counts` (class weights) gets the train split's counts."""
    cfg = plain(cfg)
    if _accepts(build(dict(cfg, _partial_=True), "loss"), "class_counts"):
        return build(cfg, "loss", class_counts=class_counts)
    return build(cfg, "loss")
