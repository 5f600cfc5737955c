"""Extending imgcls without forking: the user's own config folder and the user's own code (a model
class in a package of theirs, trusted through an entry point), through every command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_tree

from imgcls.config.targets import TRUST_VARIABLE, check_targets
from imgcls.errors import ConfigError

NETS = '''
"""A user's own classifier: nothing of imgcls's."""
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def helper_that_writes(path):
    open(path, "w").write("written")
'''


def user_package(root: Path, entry_points: bool = True) -> Path:
    """<root>/imgcls_user_demo (importable from root), and its dist-info with an `imgcls.config.targets`
    entry point: what `pip install` of a package declaring one leaves in site-packages."""
    pkg = root / "imgcls_user_demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    if entry_points:
        info = root / "imgcls_user_demo-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: imgcls-user-demo\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(
            "[imgcls.targets]\nmodel.tiny = imgcls_user_demo.nets:TinyNet\n"
        )
    return root


def user_conf(root: Path, tree: Path) -> Path:
    """A user's config folder: a data option (no transforms file of its own) and a model option."""
    (root / "data").mkdir(parents=True)
    (root / "model").mkdir()
    (root / "data" / "shapes.yaml").write_text(
        textwrap.dedent(f"""\
            # my own data set: everything of imagefolder, my tree, the digits' 32 px preset
            defaults:
              - imagefolder
              - override /transforms@_global_.transforms: digits
              - _self_
            root: {tree}
            batch_size: 4
            num_workers: 0
            """)
    )
    (root / "model" / "tiny.yaml").write_text(
        "_target_: imgcls_user_demo.nets.TinyNet\n_partial_: true  # imgcls passes num_classes\nwidth: 8\n"
    )
    return root


def cli(module: str, *args: str, cwd: Path, pythonpath: Path | None, extra_env: dict | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(TRUST_VARIABLE, None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A sweep (two jobs) of the user's model on the user's data option, from the user's config
    folder; its first job."""
    cwd = tmp_path_factory.mktemp("extend")
    pkgs = user_package(cwd / "site")
    conf = user_conf(cwd / "myconf", make_tree(cwd / "tree"))
    swept = cli(
        "imgcls.train", "-m", "--config-dir", str(conf), "data=shapes", "model=tiny", "trainer.epochs=1",
        "device=cpu", "optimizer.lr=0.01,0.02", cwd=cwd, pythonpath=pkgs,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr[-3000:]
    (sweep,) = (cwd / "multirun").glob("*/*")
    with open(sweep / "sweep_summary.csv") as f:
        assert len(f.read().strip().splitlines()) == 3  # a header and both jobs
    run = min(p.parent for p in sweep.glob("*/summary.txt"))
    return cwd, pkgs, conf, run


@pytest.mark.slow
def test_user_config_folder_shows_in_help(tmp_path):
    conf = user_conf(tmp_path / "myconf", tmp_path / "tree")
    helped = cli("imgcls.train", "--config-dir", str(conf), "--help", cwd=tmp_path, pythonpath=None)
    assert helped.returncode == 0, helped.stderr
    section = helped.stdout.split("== Config ==")[0]  # the groups and their options, before the config
    groups = {line.split(":")[0]: line for line in section.splitlines() if ":" in line}
    assert "shapes" in groups["data"] and "tiny" in groups["model"]


@pytest.mark.slow
def test_user_config_folder_on_hydras_search_path_composes(tmp_path):
    """hydra.searchpath instead of --config-dir (Hydra lists such a folder's options in --help
    only for --config-dir; composing works the same)."""
    conf = user_conf(tmp_path / "myconf", tmp_path / "tree")
    job = cli(
        "imgcls.train",
        f"hydra.searchpath=[file://{conf}]",
        "data=shapes",
        "--cfg",
        "job",
        cwd=tmp_path,
        pythonpath=None,
    )
    assert job.returncode == 0, job.stderr
    assert f"root: {tmp_path / 'tree'}" in job.stdout and "size:\n    - 32" in job.stdout


@pytest.mark.slow
def test_user_model_trains_evaluates_predicts_exports_and_resumes(user_run):
    cwd, pkgs, _, run = user_run
    config = (run / "config.yaml").read_text()
    assert "imgcls_user_demo.nets.TinyNet" in config and "Resize" in config  # digits preset by name

    evaluated = cli("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=cwd, pythonpath=pkgs)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert list(run.glob("eval/val-best*/metrics.json"))

    images = sorted((cwd / "tree" / "test" / "cat").glob("*.jpg"))[:2]
    predicted = cli(
        "imgcls.predict", f"run_dir={run}", f"inputs=[{images[0]},{images[1]}]", cwd=cwd, pythonpath=pkgs
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]

    exported = cli("imgcls.export", f"run_dir={run}", "format=onnx", cwd=cwd, pythonpath=pkgs)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert list(run.rglob("*.onnx"))

    resumed = cli(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=2", cwd=cwd, pythonpath=pkgs
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = (run / "summary.txt").read_text()
    assert re.search(r"^epoch: +2 of 2$", summary, re.M) and re.search(r"^resumed: ", summary, re.M)


@pytest.mark.slow
def test_a_run_naming_user_code_is_refused_where_the_user_does_not_trust_it(user_run, tmp_path):
    """The same run copied to a machine that has the module but does not trust it: refused."""
    cwd, _, _, run = user_run
    untrusted = user_package(tmp_path / "site", entry_points=False)
    evaluated = cli("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path, pythonpath=untrusted)
    assert evaluated.returncode == 2
    assert evaluated.stderr.startswith("error: ")
    assert "model._target_='imgcls_user_demo.nets.TinyNet' is not allowed" in evaluated.stderr
    assert TRUST_VARIABLE in evaluated.stderr and "Traceback" not in evaluated.stderr


def test_trust_from_the_environment_variable(tmp_path, monkeypatch):
    user_package(tmp_path, entry_points=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    node = {"_target_": "imgcls_user_demo.nets.TinyNet", "_partial_": True}
    with pytest.raises(ConfigError, match="is not allowed"):
        check_targets({"model": node})
    monkeypatch.setenv(TRUST_VARIABLE, "model:imgcls_user_demo.nets.TinyNet")
    check_targets({"model": node})
    with pytest.raises(ConfigError, match="is not allowed"):  # trusted as a model, not as a loss
        check_targets({"loss": {"_target_": "imgcls_user_demo.nets.TinyNet"}})
    # a whole module: what it defines, not what it imports or a function of another group's kind
    monkeypatch.setenv(TRUST_VARIABLE, "model:imgcls_user_demo.nets")
    check_targets({"model": node})
    for target in (
        "imgcls_user_demo.nets.torch.load",
        "imgcls_user_demo.nets.nn.Linear",
        "imgcls_user_demo.os.system",
    ):
        with pytest.raises(ConfigError, match="is not allowed"):
            check_targets({"model": {"_target_": target, "_partial_": True}})
    monkeypatch.setenv(TRUST_VARIABLE, "modle:imgcls_user_demo.nets")
    with pytest.raises(ConfigError, match=f"{TRUST_VARIABLE} entry 'modle:imgcls_user_demo.nets': expected"):
        check_targets({"model": node})
