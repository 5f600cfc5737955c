"""The one place where config nodes become objects: `_target_`s checked against the registry
(imgcls.config.targets), then instantiate."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hydra.utils import UNSAFE_DISABLE_EXECUTION_CHECKS, instantiate
from omegaconf import OmegaConf

from imgcls.config.targets import check_targets, locate
from imgcls.errors import ConfigError, UserError


def plain(node: Any) -> Any:
    """An OmegaConf node as plain, resolved Python containers (nothing OmegaConf reaches torch)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node


# plain values the training loop counts and compares with (not constructor arguments)
NUMBER_KEYS = (
    "seed", "trainer.epochs", "trainer.grad_accum_steps", "trainer.grad_clip_norm", "trainer.mixup_alpha",
    "trainer.cutmix_alpha", "trainer.ema_decay", "trainer.early_stopping.patience",
    "trainer.early_stopping.min_delta", "trainer.keep_top_k", "trainer.log_every_n_steps", "trainer.num_threads",
)  # fmt: skip


def check_number_keys(config: Mapping, keys: tuple[str, ...] = NUMBER_KEYS) -> None:
    """Raise ConfigError for a key of `keys` set to a string or a boolean (trainer.epochs=abc)."""
    for key in keys:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, (str, bool)):
            raise ConfigError(f"{key}={value!r}: expected a number")


def _number_kind(param: Any) -> str | None:
    """ "a number" for an argument declared or defaulted as int or float ("a number or a list" when
    a sequence is allowed too), None for any other (bool, str, or anything)."""
    annotation = param.annotation if isinstance(param.annotation, str) else repr(param.annotation)
    words = set(re.findall(r"[A-Za-z_]+", annotation.replace("typing.", "")))
    listed = bool(words & {"Sequence", "list", "tuple", "List", "Tuple"})
    if isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
        return "a number or a list of numbers" if listed else "a number"
    if words & {"int", "float"} and not words & {"str", "Any", "bool", "object"}:
        return "a number or a list of numbers" if listed else "a number"
    return None


def check_numbers(node: Any, key: str = "") -> None:
    """Raise ConfigError naming the key when a string is given where a `_target_`'s argument is a
    number: `optimizer.lr=abc` otherwise fails inside torch with "'<' not supported between
    instances of 'str' and 'float'", which names neither the key nor what it should be.
    Call it after check_targets: it imports the targets to read their signatures."""
    import inspect

    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str):
            try:
                params = inspect.signature(locate(target)).parameters
            except Exception:  # not found, no signature: instantiate says what is wrong
                params = {}
            for name, value in node.items():
                listed = isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value)
                kind = _number_kind(params[name]) if name in params else None
                if kind and (isinstance(value, str) or listed):
                    where = f"{key}.{name}" if key else str(name)
                    raise ConfigError(f"{where}={value!r}: expected {'numbers' if listed else kind}")
        for k, v in node.items():
            check_numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_numbers(v, f"{key}[{i}]")


def build(node: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """instantiate(node) once every `_target_` in it is what `key` may build; failures name the key."""
    node = plain(node)
    check_targets(node, key)
    check_numbers(node, key)
    try:
        # check_targets is the allowlist; Hydra 1.4's execution whitelist would also wrap the
        # partials it returns and re-check every callable result (a module, a transform) by class
        return instantiate(node, *args, _execution_whitelist_=UNSAFE_DISABLE_EXECUTION_CHECKS, **kwargs)
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
