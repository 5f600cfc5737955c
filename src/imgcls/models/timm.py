"""timm classifiers by name (`model=timm`): head sized to the data, weights through timm's own loading."""

from __future__ import annotations

import contextlib
import difflib
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from imgcls.checkpoint import Unloadable, load_weights_only
from imgcls.errors import ConfigError

INSTALL = 'pip install "imgcls[timm]" (or pip install timm)'


def _timm():
    try:
        import timm  # lazy: the optional timm extra; 0.5 s of start-up after torch, for model=timm only
    except ImportError:
        raise ConfigError(f"model=timm needs the timm package: {INSTALL}") from None
    return timm


def check_name(name: str) -> None:
    """ConfigError with the closest timm names when `name` (an architecture, optionally with a
    pretrained tag: resnet18.a1_in1k) is not one timm creates."""
    timm = _timm()
    arch, _, tag = str(name).partition(".")
    known = timm.is_model(arch) and (not tag or name in timm.list_pretrained(arch))
    if not known:
        names = timm.list_models() + timm.list_pretrained()
        close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "none of timm's names is close"
        raise ConfigError(
            f"model.name={name!r} is not a timm model ({hint}). timm {timm.__version__} has "
            f'{len(timm.list_models())} architectures; list them with python -c "import timm; '
            f"print(timm.list_models('*{arch[:6]}*'))\", pretrained tags with timm.list_pretrained()."
        )


def create_model(
    name: str,
    num_classes: int,
    weights: str | None = None,
    freeze_backbone: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """timm.create_model(name, num_classes=...), its head sized to the data's classes.

    `weights`: None trains from scratch; `pretrained` loads timm's pretrained weights of `name`
    (its tag picks them: resnet18.a1_in1k) through timm's own loading, from the Hugging Face cache
    when they are there, else downloaded by timm; a path loads that file (.safetensors, or a
    .pth/.pt state dict read weights-only) as timm's pretrained file (pretrained_cfg_overlay=
    dict(file=...)). Either way timm drops the pretrained head when num_classes differs.
    `freeze_backbone`: only the classifier head's parameters train. Other keys go to the model."""
    timm = _timm()
    check_name(name)
    if weights is None:
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
    elif weights == "pretrained":
        model = _pretrained(timm, name, num_classes, kwargs)
    else:
        model = _from_file(timm, name, Path(weights), num_classes, kwargs)
    if freeze_backbone:
        head = _head(model)
        for param_name, param in model.named_parameters():
            param.requires_grad = param_name.startswith(head + ".")
    return model


def _from_file(timm, name: str, path: Path, num_classes: int, kwargs: dict) -> nn.Module:
    """timm.create_model(pretrained=True) with the weights of `path` as timm's pretrained file."""
    saved = _read_weights_file(path)
    with _as_safetensors(path, saved) as file:
        try:
            model = timm.create_model(
                name,
                pretrained=True,
                pretrained_cfg_overlay={"file": file},
                num_classes=num_classes,
                **kwargs,
            )
        except RuntimeError as exc:  # load_state_dict's missing / unexpected keys, size mismatches
            raise ConfigError(_misfit(path, name, str(exc).splitlines()[0])) from None
    _check_fit(model, saved, path, name)
    return model


def _head(model: nn.Module) -> str:
    """The classifier's module name: timm's pretrained config names it (fc, head.fc, classifier)."""
    # lazy: imgcls.models.torchvision imports torchvision (1.2 s), and every training command's config
    # check passes through this module (pretrained_input): a config error took 3.3 s instead of 1.8
    from imgcls.models.torchvision import head_name

    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    modules = dict(model.named_modules())
    return named if isinstance(named, str) and named in modules else head_name(model)


def _read_weights_file(path: Path) -> dict:
    """The tensors of a weights file, read safely (safetensors, or torch.load(weights_only=True));
    from a checkpoint dict, the entry timm's load_state_dict picks."""
    if not path.is_file():
        raise ConfigError(
            f"model.weights={path}: not a file. Give model.weights=pretrained (timm's weights of model.name), "
            "or a .safetensors or .pth file of the same architecture."
        )
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"model.weights={path}: not a safetensors file ({exc})") from None
    try:
        state = load_weights_only(path)
    except Unloadable as exc:
        kind = "holds more than tensors and plain values" if exc.objects else "is not a PyTorch weights file"
        raise ConfigError(
            f"model.weights={path}: {kind} ({exc.detail}); imgcls loads only weights-only files. "
            "Re-save the weights alone: torch.save(model.state_dict(), path), or use .safetensors."
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights={path}: holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's order (use_ema=True)
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


@contextlib.contextmanager
def _as_safetensors(path: Path, saved: dict):
    """The file for timm to load: a .safetensors file as it is; the tensors of a .pth file, already
    read weights-only, as a temporary .safetensors file: timm's load_state_dict defaults to
    torch.load(weights_only=False) in 1.0.9 to 1.0.19 (checked in 1.0.9, .11, .14, .16, .19)."""
    if path.suffix == ".safetensors":
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="imgcls-weights-") as folder:
        file = Path(folder) / (path.stem + ".safetensors")
        tensors = {
            k: v.detach().clone().contiguous() for k, v in saved.items() if isinstance(v, torch.Tensor)
        }
        save_file(tensors, str(file))  # clones: safetensors refuses tensors that share memory (tied weights)
        yield str(file)


def _misfit(path: Path, name: str, detail: str) -> str:
    return (
        f"model.weights={path}: does not fit timm's {name} ({detail}). Was it saved from another "
        "architecture? Set model.name to the one it was saved from."
    )


def _check_fit(model: nn.Module, saved: dict, path: Path, name: str) -> None:
    """timm loads a file leniently once it drops a head of another size (strict=False): a file of
    another architecture would load nothing and say so only in a log line. Every tensor but the
    head's must come from the file."""
    head = _head(model) + "."
    own = model.state_dict()
    problems = [
        k for k, v in own.items() if not k.startswith(head) and (k not in saved or saved[k].shape != v.shape)
    ]
    if problems:
        detail = f"{len(problems)} of its {len(own)} tensors are missing or of another shape, e.g. {', '.join(problems[:3])}"
        raise ConfigError(_misfit(path, name, detail))


def _pretrained(timm, name: str, num_classes: int, kwargs: dict) -> nn.Module:
    """timm's pretrained weights of `name`: the cached file when there is one (no network needed,
    no retries offline), else timm's own download; failing that, what to fetch and where it goes."""
    cfg = pretrained_cfg(name)
    if cfg is None:
        tags = timm.list_pretrained(name.partition(".")[0])
        raise ConfigError(
            f"model.weights=pretrained: timm has no pretrained weights for {name}"
            + (f"; pretrained tags: {', '.join(tags[:8])}" if tags else "; set model.weights=null")
        )
    cached = _cached_file(cfg)
    if cached:  # read as a local file is: a pytorch_model.bin weights-only too
        return _from_file(timm, name, Path(cached), num_classes, kwargs)
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except TypeError:
        raise  # a model argument it does not take: build.complete names the key
    except Exception as exc:  # no network, no cache: LocalEntryNotFoundError, URLError, ...
        raise ConfigError(_fetch_advice(name, cfg, exc)) from None


def pretrained_cfg(name: str) -> dict | None:
    """timm's pretrained config of `name` (its default tag when it has none), None without weights."""
    from timm.models import get_pretrained_cfg  # lazy: the optional timm extra (see _timm)

    cfg = get_pretrained_cfg(name)  # a name without a tag: its default tag's
    cfg = cfg.to_dict() if cfg is not None else None
    return cfg if cfg and (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")) else None


def _cached_file(cfg: dict) -> str | None:
    """The weights file already in the Hugging Face cache (the same file timm would load)."""
    if not cfg.get("hf_hub_id") or cfg.get("custom_load"):
        return None
    from huggingface_hub import try_to_load_from_cache  # lazy: installed with timm, not with imgcls

    repo, _, revision = cfg["hf_hub_id"].partition("@")
    names = (
        [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    )
    for filename in names:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def _fetch_advice(name: str, cfg: dict, exc: Exception) -> str:
    why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    head = f"model.weights=pretrained: cannot get timm's pretrained weights of {name} ({why})."
    local = "or give a file of them: model.weights=/path/to/model.safetensors (or a .pth state dict)."
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants  # lazy: installed with timm, not with imgcls

        repo = cfg["hf_hub_id"].partition("@")[0]
        filename = cfg.get("hf_hub_filename") or "model.safetensors"
        return (
            f"{head} They are {filename} of the Hugging Face repo {repo}, kept in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} (HF_HOME or HF_HUB_CACHE moves it). On a machine with internet run "
            f"`hf download {repo} {filename}` and copy that cache folder here (imgcls then loads it from "
            f"there without the network), {local}"
        )
    url = cfg.get("url") or "?"
    where = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return f"{head} Download {url} on a machine with internet and put it at {where} (TORCH_HOME moves it), {local}"
