"""The one place where config nodes become objects: allowlisted `_target_`s, then instantiate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from imgcls.errors import ConfigError

# Namespaces a config may name: what the project's own configs use. A run directory may come
# from someone else, so a target must both be spelled inside them and resolve to a class or
# function defined inside them: `torch.os.system` and `imgcls.data.os.system` are spelled inside
# "torch." and "imgcls." but resolve to os.system, and `torch.hub.load` or `torch.load` would run
# code from a download or a pickle. Anything else is refused before anything is built.
ALLOWED_TARGET_PREFIXES = (
    "imgcls.data.",  # ImageFolderData
    "imgcls.digits.",  # DigitsData
    "imgcls.models.",  # create_model
    "imgcls.losses.",  # CrossEntropyLoss and FocalLoss with class weights
    "imgcls.recipes.",  # WarmupCosineLR
    "torch.nn.",  # losses
    "torch.optim.",  # optimizers and lr_scheduler
    "torchvision.transforms.",  # the per-split pipelines
)


def plain(node: Any) -> Any:
    """An OmegaConf node as plain, resolved Python containers (nothing OmegaConf reaches torch)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node


def target_problem(target: Any) -> str | None:
    """What is wrong with `target` as a `_target_`, or None when it may be instantiated."""
    import inspect

    from hydra._internal.utils import _locate  # what instantiate resolves with (get_object logs)

    allowed = ", ".join(p.rstrip(".") for p in ALLOWED_TARGET_PREFIXES)
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
        return f"is not allowed: targets must be in {allowed}"
    try:
        obj = _locate(target)  # imports the allowed modules it names; calls nothing
    except Exception as exc:
        return f"cannot be found ({str(exc).strip().splitlines()[-1]})"
    module = getattr(obj, "__module__", None)
    if inspect.ismodule(obj):
        where = f"the module {obj.__name__}"
    else:
        where = f"{module}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not f"{module}.".startswith(
        ALLOWED_TARGET_PREFIXES
    ):
        return f"is not allowed: it resolves to {where}, not a class or function defined in {allowed}"
    return None


def check_targets(node: Any, key: str = "") -> None:
    """Raise ConfigError naming the key of any `_target_` outside the allowlist (nested ones too)."""
    if isinstance(node, Mapping):
        if node.get("_target_") is not None:  # null: nothing to build (scheduler: none)
            problem = target_problem(node["_target_"])
            if problem is not None:
                where = f"{key}._target_" if key else "_target_"
                raise ConfigError(
                    f"{where}={node['_target_']!r} {problem}. Refusing to build anything from this config."
                )
        for k, v in node.items():
            check_targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_targets(v, f"{key}[{i}]")


def build(node: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """instantiate(node) after the allowlist check; failures name the config key."""
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
