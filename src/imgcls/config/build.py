"""The one place where config nodes become objects: `_target_`s checked against the registry
(imgcls.config.targets), then instantiate."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
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


# Limits on the sizes a config asks for, checked by key before anything is allocated (check_sizes).
# A saved run is someone else's text: its 100000 px resize or its batch of 10**9 is refused here,
# in every command, never met as a traceback or a machine out of memory.
# 4096 px a side: classifiers train at 224-600 px and high-resolution ones at 1024-2048; at 4096 a
# single image costs 334x the activations of a 224 px one (a few GB for a ResNet-50), beyond any GPU
# batch, and above it a size is a typo or a trap.
MAX_SIDE = 4096
MAX_SCALE = 16  # side_range / scale_range factors (RandomZoomOut, ScaleJitter): torchvision's go to 4
MAX_BATCH = 65536  # images per batch, whatever their size: no classifier here trains on more at once
BATCH_MEMORY_SHARE = (
    4  # a batch's float input may take at most 1/4 of memory: activations take many times more
)
WORKERS_PER_CPU = 4  # data.num_workers, trainer.num_threads: more per core only queue behind each other
MIN_WORKER_CAP = 64  # ... but a run made on a 64-core machine still evaluates on a laptop
PIXEL_BYTES = 8  # one decoded pixel at most: 16-bit images are scaled as int64 (images.to_rgb)
SCAN_THREADS = 8  # the data check reads this many files at once (data.scan)
# a transform argument that is a side in pixels, or that adds pixels to every side
_SIDE_ARGS = re.compile(r".*size|padding")
_SCALE_ARGS = ("side_range", "scale_range")
_MODEL_SIDES = ("image_size", "img_size", "input_size")


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the OS does not say (the absolute limits
    still apply there)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def _get(config: Mapping, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _transform_sizes(node: Any, key: str) -> Iterator[tuple[str, str, float]]:
    """(key, argument name, value) of every size-like argument in a transform node, nested ones too."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            where = f"{key}.{name}"
            if isinstance(name, str) and (_SIDE_ARGS.fullmatch(name) or name in _SCALE_ARGS):
                for number in _numbers(value):
                    yield where, name, number
            yield from _transform_sizes(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _transform_sizes(value, f"{key}[{i}]")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GB"


def check_sizes(config: Mapping) -> None:
    """Raise ConfigError naming the key when a size in the config cannot fit this machine: image
    sides in the transforms and the model, the batch, workers and threads, and the data check's
    per-file limits. Every command's config passes here (build_data, training.run.build_run),
    a saved run's and a resumed checkpoint's too, before anything is allocated."""
    memory = physical_memory()
    of_memory = f"of this machine's {_gb(memory)} memory" if memory else ""
    sides: list[float] = []
    for split in ("train", "val", "test"):
        nodes = _get(config, f"transforms.{split}")
        for i, node in enumerate(nodes if isinstance(nodes, (list, tuple)) else []):
            for key, name, value in _transform_sizes(node, f"transforms.{split}[{i}]"):
                limit = MAX_SCALE if name in _SCALE_ARGS else MAX_SIDE
                if abs(value) > limit:
                    what = "a scale factor" if name in _SCALE_ARGS else "pixels"
                    raise ConfigError(
                        f"{key}={value!r}: above {limit} {what}, the most imgcls allows (an image of "
                        f"{MAX_SIDE}x{MAX_SIDE} px already needs hundreds of times the memory of a 224 px one)"
                    )
                if name == "padding":
                    sides.append(2 * abs(value))
                elif name != "kernel_size":
                    sides.append(abs(value))
    for name in _MODEL_SIDES:
        for value in _numbers(_get(config, f"model.{name}")):
            if value > MAX_SIDE:
                raise ConfigError(f"model.{name}={value!r}: above {MAX_SIDE} pixels, the most imgcls allows")
            sides.append(value)
    cache_size = _get(config, "data.cache_size")
    if isinstance(cache_size, int) and not isinstance(cache_size, bool) and cache_size > MAX_SIDE:
        raise ConfigError(f"data.cache_size={cache_size}: above {MAX_SIDE} pixels, the most imgcls allows")

    batch = _get(config, "data.batch_size")
    if isinstance(batch, int) and not isinstance(batch, bool):
        if batch > MAX_BATCH:
            raise ConfigError(
                f"data.batch_size={batch}: above {MAX_BATCH} images, the most imgcls allows in one batch; "
                "for a larger effective batch, set trainer.grad_accum_steps"
            )
        side = max(sides, default=0)
        nbytes = batch * 3 * side * side * 4  # the float input tensor alone
        if memory and nbytes > memory / BATCH_MEMORY_SHARE:
            raise ConfigError(
                f"data.batch_size={batch}: a batch of {side:g}x{side:g} px images is {_gb(nbytes)} as a float "
                f"tensor alone, above 1/{BATCH_MEMORY_SHARE} {of_memory} (activations take many times "
                "more); lower data.batch_size, and set trainer.grad_accum_steps for a larger effective batch"
            )
    cap = max(MIN_WORKER_CAP, WORKERS_PER_CPU * (os.cpu_count() or 1))
    for key in ("data.num_workers", "trainer.num_threads"):
        value = _get(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            raise ConfigError(
                f"{key}={value}: above {cap} ({WORKERS_PER_CPU} per CPU core, at least {MIN_WORKER_CAP}); "
                "each is a process or thread of its own, and more than the cores only queue"
            )
    pixels = _get(config, "data.max_image_pixels")
    if isinstance(pixels, (int, float)) and memory and pixels * PIXEL_BYTES > memory / BATCH_MEMORY_SHARE:
        raise ConfigError(
            f"data.max_image_pixels={pixels:,}: one image that large takes up to {_gb(pixels * PIXEL_BYTES)} "
            f"decoded, above 1/{BATCH_MEMORY_SHARE} {of_memory}; keep it at most {memory // BATCH_MEMORY_SHARE // PIXEL_BYTES:,}"
        )
    file_mb = _get(config, "data.max_file_mb")
    if isinstance(file_mb, (int, float)) and memory and file_mb * 2**20 * SCAN_THREADS > memory / 2:
        raise ConfigError(
            f"data.max_file_mb={file_mb}: the data check reads {SCAN_THREADS} files at once, "
            f"{_gb(file_mb * 2**20 * SCAN_THREADS)} at this limit, above half {of_memory}"
        )


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


def build_named(node: Any, allowed: tuple[str, ...]) -> Any:
    """instantiate(node) for a node outside the config groups' registry whose `_target_` must be one of
    `allowed`, exactly (hydra.sweeper.pruner: imgcls.sweeps.pruning); Hydra's execution whitelist
    holds it to that list."""
    return instantiate(node, _execution_whitelist_=allowed)


def build_data(cfg: Any):
    node = plain(cfg)
    if isinstance(node, Mapping):
        check_sizes({"data": node})  # the check, evaluate and predict read files with these limits
    return build(node, "data")


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
    """The optimizer node (`_partial_: true` in its group) called at once on the model's parameter
    groups, weight decay on weights only."""
    node = plain(cfg)
    groups = parameter_groups(model, node.get("weight_decay", 0.0))
    return build(node, "optimizer", groups, _partial_=False)


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
