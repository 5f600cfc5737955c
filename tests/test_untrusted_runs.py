"""A run directory from someone else: injected `_target_`s are refused before anything runs."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_here

from imgcls.config.build import check_targets
from imgcls.errors import ConfigError


def shell(marker: Path) -> str:
    return f"touch {marker}"


# name: (the injected node, where it goes, the start of the refusal message)
INJECTIONS = {
    "data": (
        lambda m: {"_target_": "os.system", "_args_": [shell(m)]},
        lambda c, node: c.update({"data": node}),
        "data._target_='os.system' is not allowed",
    ),
    "nested transform": (
        lambda m: {"_target_": "subprocess.Popen", "_args_": [["sh", "-c", shell(m)]]},
        lambda c, node: c["transforms"]["val"].insert(0, node),
        "transforms.val[0]._target_='subprocess.Popen' is not allowed",
    ),
    "allowed prefix, other module": (
        lambda m: {"_target_": "imgcls.data.folder.os.system", "_args_": [shell(m)]},
        lambda c, node: c.update({"model": node}),
        "model._target_='imgcls.data.folder.os.system' is not allowed: model builds a classifier",
    ),
    "in the slot's namespace, other module": (
        lambda m: {"_target_": "torch.optim.optimizer.torch.os.system", "_args_": [shell(m)]},
        lambda c, node: c.update({"optimizer": node}),
        "optimizer._target_='torch.optim.optimizer.torch.os.system' is not allowed: it resolves to "
        "posix.system, not a class",
    ),
    "deep in a node evaluation never builds": (
        lambda m: {"_target_": "builtins.exec", "_args_": [f"import os; os.system({shell(m)!r})"]},
        lambda c, node: c["optimizer"].update({"extra": {"inner": [node]}}),
        "optimizer.extra.inner[0]._target_='builtins.exec' is not allowed",
    ),
}


def untrusted_run(trained_run: Path, dest: Path) -> Path:
    """config.yaml and weights/best.pt of the tiny run (the checkpoint hard-linked: only read)."""
    (dest / "weights").mkdir(parents=True)
    os.link(trained_run / "weights" / "best.pt", dest / "weights" / "best.pt")
    shutil.copy(trained_run / "config.yaml", dest / "config.yaml")
    return dest


def inject(run: Path, name: str, marker: Path) -> str:
    node, place, message = INJECTIONS[name]
    config = yaml.safe_load((run / "config.yaml").read_text())
    place(config, node(marker))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return message


@pytest.mark.parametrize("name", list(INJECTIONS))
def test_the_injected_nodes_do_run_when_built_blindly(tmp_path: Path, name):
    """The control: called as instantiate calls it, without an allowlist, each injected node runs
    its command. (Hydra 1.3.8's own target policy blocks some of them too; 1.3.2 blocks none.)"""
    from hydra._internal.utils import _locate

    marker = tmp_path / "ran"
    node = INJECTIONS[name][0](marker)
    result = _locate(node["_target_"])(*node["_args_"])
    if hasattr(result, "wait"):
        result.wait()
    assert marker.exists()


@pytest.mark.parametrize("name", list(INJECTIONS))
def test_evaluate_refuses_injected_targets_in_config_yaml(trained_run: Path, tmp_path: Path, name):
    run = untrusted_run(trained_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    message = inject(run, name, marker)
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {run / 'config.yaml'}: {message}" in result.stderr
    assert "Refusing to build anything from this config." in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the injected command ran"
    assert not (run / "eval").exists()


def test_predict_refuses_injected_targets(trained_run: Path, tmp_path: Path):
    run = untrusted_run(trained_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    message = inject(run, "nested transform", marker)
    image = next(
        (Path(yaml.safe_load((trained_run / "config.yaml").read_text())["data"]["root"]) / "val").glob(
            "*/*.jpg"
        )
    )
    result = cli_here("imgcls.predict", f"run_dir={run}", f"inputs=[{image}]", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert not marker.exists() and not (run / "predict").exists()


@pytest.mark.parametrize("with_config_yaml", [False, True])
def test_injected_targets_in_the_checkpoint_config_are_refused(
    trained_run: Path, tmp_path: Path, with_config_yaml
):
    # without config.yaml the checkpoint's own config is the base, and it would be built
    run = untrusted_run(trained_run, tmp_path / "run")
    if not with_config_yaml:
        (run / "config.yaml").unlink()
    marker = tmp_path / "pwned"
    state = torch.load(run / "weights" / "best.pt", weights_only=True)
    state["config"]["loss"] = {"_target_": "os.system", "_args_": [shell(marker)]}
    (run / "weights" / "best.pt").unlink()  # a hard link: write a new file, keep the shared one
    torch.save(state, run / "weights" / "best.pt")
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"{run / 'weights' / 'best.pt'} (its config): loss._target_='os.system' is not allowed"
        in result.stderr
    )
    assert not marker.exists() and not (run / "eval").exists()


def test_a_target_given_on_the_command_line_is_checked_too(trained_run: Path, tmp_path: Path):
    run = untrusted_run(trained_run, tmp_path / "run")
    result = cli_here(
        "imgcls.evaluate", f"run_dir={run}", "loss._target_=os.system", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    assert "the config with the overrides: loss._target_='os.system' is not allowed" in result.stderr


@pytest.mark.parametrize(
    "target",
    [
        "os.system", "subprocess.Popen", "builtins.exec", "builtins.eval", "pickle.loads", "shutil.rmtree",
        "torch.load", "torch.hub.load", "torch.jit.load", "torch.os.system", "imgcls.data.folder.os.system",
        "torch.nn.modules.module.torch.hub.load", "imgcls.models.torchvision.torchvision.io.write_file",
        "imgcls.files.atomic_write", "imgcls.checkpoint.save_checkpoint", "torch.nn", 42,
    ],
)  # fmt: skip
def test_check_targets_refuses_and_names_the_key(target):
    config = {"model": {"name": "resnet18", "head": [{"x": 1}, {"_target_": target}]}}
    with pytest.raises(ConfigError, match=r"^model\.head\[1\]\._target_=.* is not allowed"):
        check_targets(config)


def test_a_config_yaml_that_is_not_yaml_is_named(trained_run: Path, tmp_path: Path):
    run = untrusted_run(trained_run, tmp_path / "run")
    (run / "config.yaml").write_text("data: [unclosed\n")
    result = cli_here("imgcls.evaluate", f"run_dir={run}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and f"error: {run / 'config.yaml'} is not valid YAML" in result.stderr


def sitecustomize_url(marker: Path) -> str:
    """A zip holding a `sitecustomize` package, as a data: URL: unpacked on a path Python imports
    at start-up (site-packages, a PYTHONPATH folder), its code runs in every later Python process."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("sitecustomize/__init__.py", f"open({str(marker)!r}, 'w').close()\n")
    return "data:application/zip;base64," + base64.b64encode(buffer.getvalue()).decode()


def fetch_tree_node(site: Path, marker: Path) -> dict:
    return {
        "_target_": "imgcls.data.download.fetch_tree",
        "url": sitecustomize_url(marker),
        "root": str(site / "sitecustomize"),
        "archive_folder": "sitecustomize",
    }


def test_fetch_tree_does_unpack_anywhere_when_built_blindly(tmp_path: Path):
    """The control: imgcls.data.download.fetch_tree, as instantiate would call it, writes the
    attacker's package at the attacker's path (and imports it: a process that finds it runs it)."""
    from hydra._internal.utils import _locate

    site, marker = tmp_path / "site", tmp_path / "pwned"
    node = fetch_tree_node(site, marker)
    _locate(node.pop("_target_"))(**node)
    assert (site / "sitecustomize" / "__init__.py").is_file()
    subprocess.run([sys.executable, "-c", "pass"], env={**os.environ, "PYTHONPATH": str(site)}, check=True)
    assert marker.exists()


def poisoned_run(trained_run: Path, tmp_path: Path, place) -> tuple[Path, Path, Path]:
    """A copy of the tiny run whose config.yaml `place` poisons; (run, site, marker)."""
    run = untrusted_run(trained_run, tmp_path / "run")
    site, marker = tmp_path / "site", tmp_path / "pwned"
    site.mkdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    place(config, site, marker)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, site, marker


def test_evaluate_refuses_fetch_tree_in_a_transform_slot(trained_run: Path, tmp_path: Path):
    run, site, marker = poisoned_run(
        trained_run, tmp_path, lambda c, site, m: c["transforms"].update(test=[fetch_tree_node(site, m)])
    )
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: {run / 'config.yaml'}: transforms.test[0]._target_='imgcls.data.download.fetch_tree' "
        "is not allowed: transforms.test[0] builds an image transform: a class from "
        "torchvision.transforms.v2 that subclasses torchvision.transforms.v2.Transform."
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert list(site.iterdir()) == [] and not marker.exists()
    assert not (run / "eval").exists()


def test_predict_refuses_fetch_tree_in_a_transform_slot(trained_run: Path, tmp_path: Path):
    run, site, marker = poisoned_run(
        trained_run, tmp_path, lambda c, site, m: c["transforms"].update(test=[fetch_tree_node(site, m)])
    )
    tree = Path(yaml.safe_load((trained_run / "config.yaml").read_text())["data"]["root"])
    image = next((tree / "val").glob("*/*.jpg"))
    result = cli_here("imgcls.predict", f"run_dir={run}", f"inputs=[{image}]", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "error: " in result.stderr
        and "transforms.test[0]._target_='imgcls.data.download.fetch_tree' is not allowed" in result.stderr
    )
    assert list(site.iterdir()) == [] and not marker.exists()
    assert not (run / "predict").exists()


def assert_download_refused(result, site: Path, marker: Path) -> None:
    """Exit 2 naming data.root, and nothing unpacked (no sitecustomize, no marker)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: data.root='{site / 'sitecustomize'}' is not a folder, and only a new training run downloads"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert list(site.iterdir()) == [] and not marker.exists()


def test_evaluate_never_downloads_what_a_run_config_names(trained_run: Path, tmp_path: Path):
    """imgcls.data.ImageFolderData is registered, and its data.download would call fetch_tree:
    evaluation reads a run's data and never fetches or writes it."""

    def place(config, site, marker):
        config["data"]["root"] = str(site / "sitecustomize")
        config["data"]["download"] = {"url": sitecustomize_url(marker), "archive_folder": "sitecustomize"}

    run, site, marker = poisoned_run(trained_run, tmp_path, place)
    result = cli_here("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path, timeout=120)
    assert_download_refused(result, site, marker)


def test_evaluation_never_writes_the_digits_where_a_run_config_points(tmp_path: Path):
    from imgcls.data.digits import DigitsData
    from imgcls.errors import DataError
    from imgcls.evaluation.labels import labelled_record

    root = tmp_path / "site" / "anything"
    data = DigitsData(str(root), {"train": "train", "val": "val", "test": "test"}, batch_size=8)
    with pytest.raises(
        DataError, match=rf"^data.root='{root}' holds no digits, and only a new training run writes them"
    ):
        labelled_record(data, "val", [str(i) for i in range(10)])
    assert not (tmp_path / "site").exists()


def test_resume_never_downloads_what_a_checkpoint_config_names(trained_run: Path, tmp_path: Path):
    """resume= takes its config from the checkpoint, which may be someone else's: its
    data.download is not fetched (only a new run, whose config the user composed, downloads)."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "weights" / "last.pt").unlink()
    site, marker = tmp_path / "site", tmp_path / "pwned"
    site.mkdir()
    state = torch.load(trained_run / "weights" / "last.pt", weights_only=True)
    download = {"url": sitecustomize_url(marker), "archive_folder": "sitecustomize"}
    for key in ("config", "config_unresolved"):  # a resume composes from the latter
        if state.get(key):
            state[key]["data"].update(root=str(site / "sitecustomize"), download=download)
    torch.save(state, run / "weights" / "last.pt")
    result = cli_here(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=3", cwd=tmp_path, timeout=120
    )
    assert_download_refused(result, site, marker)
