"""The registry of what each config group may build: everything else, by name or by place, is refused."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_here
from hydra import compose, initialize_config_dir

from imgcls.cli import CALLBACKS, CONFIG_DIR
from imgcls.config.targets import GROUPS, check_targets, target_problem
from imgcls.errors import ConfigError

# where the registry allows outside classes, and where the project's own targets live
NAMESPACES = ["imgcls", "torch.optim", "torch.nn", "torchvision.transforms", "torchvision.datasets"]
if importlib.util.find_spec(
    "timm"
):  # the timm extra: all of timm is walked, and only imgcls's builder admitted
    NAMESPACES.append("timm")
# each group's slot in a run's config
SLOT = {
    "data": lambda node: {"data": node},
    "model": lambda node: {"model": node},
    "loss": lambda node: {"loss": node},
    "optimizer": lambda node: {"optimizer": node},
    "scheduler": lambda node: {"scheduler": node},
    "transforms": lambda node: {"transforms": {"test": [node]}},
}
KEY = {"transforms": "transforms.test[0]"}
PARTIAL = {g: {"_partial_": True} if GROUPS[g].partial else {} for g in GROUPS}


def modules():
    """Every module under NAMESPACES that imports (not the CLI entry points)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in NAMESPACES:
            package = importlib.import_module(name)
            found.append(package)
            for info in pkgutil.walk_packages(package.__path__, name + "."):
                if info.name.endswith("__main__"):
                    continue
                try:
                    found.append(importlib.import_module(info.name))
                except ImportError:  # an optional dependency that is not installed
                    continue
    return found


@pytest.fixture(scope="module")
def reachable() -> dict[str, object]:
    """{spelled name: object} for every class and function reachable in the allowed namespaces,
    under every name a module gives it (torch.optim.SGD and torch.optim.sgd.SGD)."""
    names = {}
    for module in modules():
        for attr, obj in list(vars(module).items()):
            if inspect.isclass(obj) or inspect.isfunction(obj):
                names[f"{module.__name__}.{attr}"] = obj
    return names


def registered_on_purpose(name: str, obj: object, group: str) -> bool:
    """In the registry by name, or a class of the group's kind spelled and defined in its package."""
    g = GROUPS[group]
    if name in g.targets:
        return True
    if not g.bases or not inspect.isclass(obj):
        return False

    def inside(module: str) -> bool:
        return module == g.namespace or module.startswith(g.namespace + ".")

    bases = tuple(
        importlib.import_module(b.rpartition(".")[0]).__dict__[b.rpartition(".")[2]] for b in g.bases
    )
    return inside(name.rpartition(".")[0]) and inside(obj.__module__) and issubclass(obj, bases)


def test_every_class_and_function_in_the_allowed_namespaces_is_registered_or_refused(reachable):
    assert len(reachable) > 1000  # the walk did reach torch.nn, torchvision.datasets, ...
    allowed = {g: set() for g in GROUPS}
    for name, obj in reachable.items():
        for group in GROUPS:
            ok = target_problem(name, group) is None
            assert ok == registered_on_purpose(name, obj, group), (group, name)
            if ok:
                allowed[group].add(obj)
    # the project's own targets: exactly the registered ones
    assert {f"{o.__module__}.{o.__qualname__}" for o in allowed["data"]} == {
        "imgcls.data.folder.ImageFolderData",
        "imgcls.data.digits.DigitsData",
    }
    assert {f"{o.__module__}.{o.__qualname__}" for o in allowed["model"]} == {
        "imgcls.models.torchvision.create_model",
        "imgcls.models.timm.create_model",
    }
    # outside: classes only, of the group's kind
    torch_nn, torch_optim = importlib.import_module("torch.nn"), importlib.import_module("torch.optim")
    from torchvision.transforms import v2

    assert all(
        inspect.isclass(o) for g in ("loss", "optimizer", "scheduler", "transforms") for o in allowed[g]
    )
    assert {torch_optim.SGD, torch_optim.AdamW} <= allowed["optimizer"]
    assert {torch_optim.lr_scheduler.StepLR, torch_optim.lr_scheduler.ReduceLROnPlateau} <= allowed[
        "scheduler"
    ]
    assert {torch_nn.CrossEntropyLoss, v2.Compose, v2.RandomApply} <= allowed["loss"] | allowed["transforms"]
    assert not allowed["transforms"] & (allowed["optimizer"] | allowed["scheduler"] | allowed["loss"])


# what each registered target does with a path, as README.md ("A run directory may come from
# someone else") documents it; every other class a config may build takes no path at all
PATH_ARGUMENTS = {
    # root: read; written (download, digits) only by training. split_file: read. cache_dir:
    # data.cache=disk writes <fingerprint>.u8/.json image caches there
    "imgcls.data.ImageFolderData": {"root", "split_file", "download", "cache_dir"},
    "imgcls.data.digits.DigitsData": {"root", "split_file", "download", "cache_dir"},
    # weights: a file read with torch.load(weights_only=True), or a torchvision weights name
    "imgcls.models.torchvision.create_model": {"weights"},
    # weights: `pretrained` (timm's own download into the Hugging Face cache) or a file, read only
    "imgcls.models.timm.create_model": {"weights"},
}
# a parameter named for a path: log_dir, split_file, root, weights (not class_weights: a list, nor
# max_file_mb: a size)
PATHLIKE = re.compile(
    r"^(?!.*_mb$)(.*_)?(path|file|filename|dir|root|url|download|save|load|folder)(_|$)|^weights$"
)


def test_what_may_be_built_takes_paths_only_where_documented(reachable):
    for name, obj in reachable.items():
        for group in GROUPS:
            if target_problem(name, group) is not None:
                continue
            registered = name if name in GROUPS[group].targets else None
            params = {p for p in inspect.signature(obj).parameters if PATHLIKE.search(p)}
            assert params == PATH_ARGUMENTS.get(registered, set()), (group, name)


WRITERS = [
    "imgcls.data.download.fetch_tree",  # unpacks a zip (a data: URL too) at any root
    "imgcls.data.download.download",
    "imgcls.data.download.unpack",
    "imgcls.data.digits.write_digits",
    "imgcls.checkpoint.save_checkpoint",
    "imgcls.files.atomic_write",
    "imgcls.data.scan._write_cache",
    "torchvision.datasets.MNIST",  # download=True writes files
    "torchvision.datasets.CIFAR10",
    "torchvision.datasets.ImageFolder",
    "torchvision.datasets.utils.download_and_extract_archive",
    "torchvision.io.write_file",
    "torch.utils.tensorboard.SummaryWriter",
    "torch.save",
    "torch.load",
    "torch.hub.load",
    "torch.hub.download_url_to_file",
    "torch.optim.swa_utils.AveragedModel",  # an nn.Module, not an optimizer or a schedule
    "torch.nn.Module",
    "torch.nn.Linear",
    "torchvision.transforms.Resize",  # v1: not a v2 Transform
    "torchvision.transforms.v2.functional.resize",  # a function
    "torchvision.transforms.v2",  # a module
    # timm: only through imgcls.models.timm.create_model; its own builder downloads, its helpers write
    "timm.create_model",
    "timm.models.create_model",
    "timm.models.load_checkpoint",
    "timm.models.push_to_hf_hub",
    "timm.models.save_for_hf",
    "timm.utils.CheckpointSaver",
    "timm.utils.update_summary",
    "torch.optim.optimizer.torch.os.system",  # spelled inside torch.optim
    "imgcls.data.folder.os.system",
    "builtins.eval",
    "os.system",
]


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("target", WRITERS)
def test_writers_and_neighbours_are_refused_in_every_slot(target, group):
    config = SLOT[group]({"_target_": target, **PARTIAL[group]})
    key = KEY.get(group, group)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(key)}\._target_='{re.escape(target)}' is not allowed: "
    ):
        check_targets(config)


@pytest.mark.parametrize(
    ("group", "target"),
    [
        ("transforms", "torch.optim.SGD"),
        ("transforms", "torch.nn.CrossEntropyLoss"),
        ("optimizer", "torch.optim.lr_scheduler.StepLR"),
        ("optimizer", "torchvision.transforms.v2.Resize"),
        ("scheduler", "torch.optim.Adam"),
        ("loss", "torchvision.transforms.v2.Resize"),
        ("loss", "torch.optim.SGD"),
        ("model", "torch.nn.CrossEntropyLoss"),
        ("model", "torchvision.models.resnet18"),
        ("data", "imgcls.models.torchvision.create_model"),
        ("data", "imgcls.data.folder.ImageFolderData"),  # registered by its documented name only
    ],
)
def test_a_slot_refuses_what_another_group_builds(group, target):
    with pytest.raises(ConfigError) as info:
        check_targets(SLOT[group]({"_target_": target, **PARTIAL[group]}))
    key = KEY.get(group, group)
    message = str(info.value)
    assert message.startswith(f"{key}._target_='{target}' is not allowed: ")
    assert f"{key} builds {GROUPS[group].builds}: " in message
    assert message.endswith(
        f"Use one of those (see conf/{group}/); to build your own code, trust it where you run imgcls: "
        f"IMGCLS_TRUSTED_TARGETS={group}:<module>.<name> or an 'imgcls.targets' entry point. "
        "Refusing to build anything from this config."
    )


def test_the_message_says_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        check_targets({"transforms": {"test": [{"_target_": "imgcls.data.download.fetch_tree"}]}})
    assert str(info.value) == (
        "transforms.test[0]._target_='imgcls.data.download.fetch_tree' is not allowed: transforms.test[0] "
        "builds an image transform: a class from torchvision.transforms.v2 that subclasses "
        "torchvision.transforms.v2.Transform. Use one of those (see conf/transforms/); to build your "
        "own code, trust it where you run imgcls: IMGCLS_TRUSTED_TARGETS=transforms:<module>.<name> "
        "or an 'imgcls.targets' entry point. Refusing to build anything from this config."
    )


FETCH = {"_target_": "imgcls.data.download.fetch_tree", "root": "/tmp/x", "url": "data:,"}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        # a container's transforms are checked as transforms
        ({"transforms": {"train": [{"_target_": "torchvision.transforms.v2.Compose", "transforms": [FETCH]}]}},
         "transforms.train[0].transforms[0]._target_"),
        ({"transforms": {"val": [{"_target_": "torchvision.transforms.v2.RandomApply",
                                  "transforms": [{"_target_": "torch.optim.SGD", "_partial_": True}]}]}},
         "transforms.val[0].transforms[0]._target_"),
        # positional arguments too
        ({"transforms": {"val": [{"_target_": "torchvision.transforms.v2.Lambda", "_args_": [FETCH]}]}},
         "transforms.val[0]._args_[0]._target_"),
        ({"transforms": {"val": [{"_target_": "torchvision.transforms.v2.Lambda",
                                  "_args_": [{"_target_": "builtins.exec", "_args_": ["1"]}]}]}},
         "transforms.val[0]._args_[0]._target_"),
        # no other group nests objects, not even allowed ones
        ({"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "params": [FETCH]}},
         "optimizer.params[0]._target_"),
        ({"model": {"_target_": "imgcls.models.torchvision.create_model", "_partial_": True,
                    "norm_layer": {"_target_": "torch.nn.BatchNorm2d", "_partial_": True}}},
         "model.norm_layer._target_"),
        ({"data": {"_target_": "imgcls.data.ImageFolderData", "download": {"x": FETCH}}},
         "data.download.x._target_"),
        # _recursive_: false does not hide a nested node from the check
        ({"loss": {"_target_": "torch.nn.CrossEntropyLoss", "_recursive_": False, "weight": FETCH}},
         "loss.weight._target_"),
        # nothing is built outside the groups' slots
        ({"hydra": {"callbacks": {"x": {"_target_": "imgcls.sweeps.summary.SweepSummary"}}}},
         "hydra.callbacks.x._target_"),
        ({"transforms": {"normalize": {"_target_": "torchvision.transforms.v2.Normalize"}}},
         "transforms.normalize._target_"),
        ({"trainer": {"_target_": "torch.optim.SGD"}}, "trainer._target_"),
        ({"_target_": "imgcls.data.ImageFolderData"}, "_target_"),
    ],
)  # fmt: skip
def test_nested_and_misplaced_targets_are_refused_by_key(config, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is not allowed: "):
        check_targets(config)


RESIZE = {"_target_": "torchvision.transforms.v2.Resize", "size": 8}
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"transforms": {"val": [{**RESIZE, "_partial_": True}]}}, "transforms.val[0]._partial_"),
        ({"transforms": {"val": [{**RESIZE, "_partial_": "yes"}]}}, "transforms.val[0]._partial_"),
        ({"optimizer": {**SGD, "_partial_": False}}, "optimizer._partial_"),
        ({"optimizer": {k: v for k, v in SGD.items() if k != "_partial_"}}, "optimizer._partial_"),
        ({"optimizer": {**SGD, "_convert_": "everything"}}, "optimizer._convert_"),
        ({"optimizer": {**SGD, "_recursive_": "no"}}, "optimizer._recursive_"),
        ({"optimizer": {**SGD, "_args_": "params"}}, "optimizer._args_"),
        ({"optimizer": {**SGD, "_target__": "os.system"}}, "optimizer._target__"),
    ],
)
def test_hydra_keys_are_checked(config, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is not allowed: "):
        check_targets(config)


def test_hydra_keys_that_fit_the_group_pass():
    check_targets({"optimizer": {**SGD, "_convert_": "all", "_recursive_": True, "_args_": []}})
    check_targets(
        {"loss": {"_target_": "torch.nn.CrossEntropyLoss", "_partial_": True}}
    )  # build_loss probes it
    check_targets({"scheduler": {}})  # scheduler=none


@pytest.mark.slow
def test_every_project_config_option_passes_and_uses_every_target_in_conf():
    from imgcls.config.build import plain

    options = [
        f"{group}={p.stem}"
        for group in ("data", "transforms", "model", "optimizer", "scheduler", "loss", "experiment")
        for p in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))
    ]
    used = set()
    with initialize_config_dir(config_dir=CONFIG_DIR):
        for option in options:
            config = plain(compose(config_name="train", overrides=[option, "data.root=/tmp/unused"]))
            check_targets(config)
            used |= set(_targets(config))
    # every _target_ written in conf/ outside hydra/ (Hydra builds those itself) was checked above
    written = set()
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        if "hydra" not in path.relative_to(CONFIG_DIR).parts[:-1]:
            written |= set(re.findall(r"^\s*-?\s*_target_:\s*(\S+)", path.read_text(), re.M))
    written -= set(CALLBACKS)  # conf/train.yaml's hydra.callbacks, Hydra's execution whitelist
    assert written <= used, written - used


def _targets(node):
    if isinstance(node, dict):
        if node.get("_target_"):
            yield node["_target_"]
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


def test_a_run_saved_before_the_packages_reads_back_under_todays_names():
    """Runs written by the first layout name imgcls.digits.DigitsData, imgcls.losses.FocalLoss, ...:
    each old name maps to a registered target, and a saved config with them passes the check."""
    from imgcls.config.renamed import RENAMED, current_names
    from imgcls.config.targets import locate

    for old, new in RENAMED.items():
        assert locate(new).__name__ == old.rpartition(".")[2]
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=["loss=focal"])
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(cfg, resolve=False)
    saved["data"]["_target_"] = "imgcls.digits.DigitsData"
    saved["loss"]["_target_"] = "imgcls.losses.FocalLoss"
    saved["scheduler"]["_target_"] = "imgcls.recipes.WarmupCosineLR"
    with pytest.raises(ConfigError, match="imgcls.digits.DigitsData"):
        check_targets(saved)
    renamed = current_names(saved)
    check_targets(renamed)
    assert renamed["data"]["_target_"] == "imgcls.data.digits.DigitsData"
    assert renamed["loss"]["_target_"] == "imgcls.training.losses.FocalLoss"
    assert saved["data"]["_target_"] == "imgcls.digits.DigitsData"  # the input is not changed


# a model node as a run saved before the models wing (issue 27) wrote it: models.py, timm_models.py
OLD_MODEL_TARGETS = {
    "imgcls.models.create_model": "imgcls.models.torchvision.create_model",
    "imgcls.timm_models.create_model": "imgcls.models.timm.create_model",
}


@pytest.mark.parametrize("old", list(OLD_MODEL_TARGETS))
def test_a_model_target_saved_before_the_models_wing_reads_back_under_todays_name(old):
    """The old name is refused as it stands (the registry takes exact names), reads back as today's,
    and is then rebuilt without its pretrained weights where a checkpoint supplies them."""
    from imgcls.config.renamed import current_names
    from imgcls.models.torchvision import architecture_only

    saved = {"model": {"_target_": old, "_partial_": True, "name": "resnet18", "weights": "DEFAULT"}}
    with pytest.raises(ConfigError, match=re.escape(f"model._target_='{old}' is not allowed")):
        check_targets(saved)
    renamed = current_names(saved)
    assert renamed["model"]["_target_"] == OLD_MODEL_TARGETS[old]
    check_targets(renamed)
    assert architecture_only(renamed["model"])["weights"] is None


def test_a_run_saved_before_the_models_wing_evaluates_and_resumes(trained_run: Path, tmp_path: Path):
    """A run directory and checkpoint whose model node names imgcls.models.create_model (models.py
    before it became imgcls.models.torchvision) still evaluate and resume."""
    run = Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval")))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["_target_"] == "imgcls.models.torchvision.create_model"
    config["model"]["_target_"] = "imgcls.models.create_model"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    last = run / "weights" / "last.pt"
    state = torch.load(last, weights_only=True)
    for key in ("config", "config_unresolved"):
        if state.get(key):
            state[key]["model"]["_target_"] = "imgcls.models.create_model"
    last.unlink()  # hard links of the shared run are never written through
    torch.save(state, last)
    evaluated = cli_here("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert [p.parent.name for p in (run / "eval").glob("*/metrics.json")] == ["val-best"]
    resumed = cli_here("imgcls.train", f"resume={last}", "trainer.epochs=3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch:          3 of 3" in (run / "summary.txt").read_text()


def test_locate_resolves_like_hydra_and_says_what_is_missing():
    import torch

    from imgcls.config.targets import locate

    assert locate("torch.optim.SGD") is torch.optim.SGD
    assert locate("torch.nn.modules.loss.CrossEntropyLoss") is torch.nn.CrossEntropyLoss
    for path, message in [
        ("torch.optim.Nope", "'Nope' is importable from module 'torch.optim'"),
        ("no_such_package.x", "module 'no_such_package' is installed"),
        ("torch.optim.SGD.zzz", "'zzz' is an attribute of 'torch.optim.SGD'"),
        ("torch..x", "not a dotted path"),
    ]:
        with pytest.raises(ImportError, match=re.escape(message)):
            locate(path)
