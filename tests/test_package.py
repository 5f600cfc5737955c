"""imgcls as an installed package: the wheel ships its configs, and its console scripts work from
an empty folder without the checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_under_src():
    """pyproject.toml names its packages (conf/ needs a package-dir of its own, which rules out
    `find`): a new subpackage left off the list would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    src = REPO / "src"
    holding_code = {p.parent.relative_to(src).parts for p in src.rglob("*.py")}
    found = {".".join(parts[:i]) for parts in holding_code for i in range(1, len(parts) + 1)}
    assert set(config["packages"]) == found | {"imgcls.conf"}
    assert config["package-dir"]["imgcls.conf"] == "conf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, REPO],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (path,) = out.glob("imgcls-*.whl")
    return path


def bare_venv(where: Path) -> Path:
    """A fresh virtual environment without imgcls whose dependencies come from this test
    environment's site-packages through a .pth file; Python does not read the .pth files of a
    folder a .pth adds (this checkout's editable install among them)."""
    venv.create(where, with_pip=False)
    site = Path(
        subprocess.run(
            [where / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where


@pytest.mark.slow
def test_a_checkout_on_pythonpath_alone_finds_its_configs(tmp_path):
    """`PYTHONPATH=src python -m imgcls.train` from a checkout that was never installed (how the
    benchmarks run): conf/ beside src/."""
    env = bare_venv(tmp_path / "venv")
    out = run_in(
        env, tmp_path, "python", "-c", "import imgcls.cli as c; print(c.CONFIG_DIR)", pythonpath=REPO / "src"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(REPO / "conf")
    helped = run_in(env, tmp_path, "python", "-m", "imgcls.train", "--help", pythonpath=REPO / "src")
    assert helped.returncode == 0 and "optimizer: adam, adamw, sgd" in helped.stdout, helped.stderr


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel (its dependencies, torch alone gigabytes,
    from this environment: bare_venv): `imgcls` there can only be the wheel's."""
    env = bare_venv(tmp_path_factory.mktemp("venv") / "venv")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "-q", "--no-deps", wheel],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return env


def run_in(env: Path, cwd: Path, *args: str, timeout: float = 300, pythonpath: Path | None = None):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if pythonpath is not None:
        clean["PYTHONPATH"] = str(pythonpath)
    clean["PATH"] = f"{env / 'bin'}{os.pathsep}{clean.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_wheel_ships_every_config(wheel: Path):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        n.removeprefix("imgcls/conf/") for n in names if n.startswith("imgcls/conf/") and n.endswith(".yaml")
    }
    assert shipped == {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    # the pages' Jinja2 templates (pyproject's package-data for imgcls.pages)
    templates = REPO / "src" / "imgcls" / "pages" / "templates"
    assert {n for n in names if n.startswith("imgcls/pages/templates/")} == {
        f"imgcls/pages/templates/{p.name}" for p in templates.iterdir()
    }
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("imgcls-train", "imgcls-evaluate", "imgcls-predict", "imgcls-export", "imgcls-data"):
        assert f"{command} = " in scripts


@pytest.mark.slow
def test_installed_wheel_trains_evaluates_and_helps_from_an_empty_folder(installed: Path, tmp_path: Path):
    where = run_in(
        installed,
        tmp_path,
        "python",
        "-c",
        "import imgcls, imgcls.cli as c; print(imgcls.__file__, c.CONFIG_DIR)",
    )
    assert where.returncode == 0, where.stderr
    assert str(installed) in where.stdout and str(REPO) not in where.stdout  # the wheel, not the checkout

    helped = run_in(installed, tmp_path, "imgcls-train", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "model: convnext_tiny" in helped.stdout and "optimizer: adam, adamw, sgd" in helped.stdout

    # the default data set (written into the empty folder), a small model: the wheel is the subject
    trained = run_in(installed, tmp_path, "imgcls-train", "trainer.epochs=1", "device=cpu", TINY_MODEL)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert re.search(r"^status: +completed$", (run / "summary.txt").read_text(), re.M)
    assert (tmp_path / "data" / "digits" / "train").is_dir()  # the data set in the current folder
    site = Path(installed)
    assert not any(site.rglob("outputs")) and not any(site.rglob("multirun"))
    assert not (site / "lib").joinpath("data").exists()

    evaluated = run_in(installed, tmp_path, "imgcls-evaluate", f"run_dir={run}", "split=val")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (metrics,) = run.glob("eval/val-best*/metrics.json")
    assert metrics.is_file()

    # the wheel's declared dependencies against what the environment holds
    pip_check = run_in(
        installed,
        tmp_path,
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(installed / "bin" / "python"),
        "check",
    )
    assert pip_check.returncode == 0, pip_check.stdout + pip_check.stderr


@pytest.mark.slow
def test_train_shell_completion(installed: Path, tmp_path: Path):
    """Hydra's bash completion for the console script: `eval "$(imgcls-train -sc install=bash)"`
    installs it; completing `optimizer=` lists the options."""
    install = run_in(installed, tmp_path, "imgcls-train", "-sc", "install=bash")
    assert install.returncode == 0 and "complete" in install.stdout, install.stderr
    env = {"COMP_LINE": "imgcls-train optimizer=", "COMP_POINT": str(len("imgcls-train optimizer="))}
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | env
    clean["PATH"] = f"{installed / 'bin'}{os.pathsep}{clean.get('PATH', '')}"
    query = subprocess.run(
        ["imgcls-train", "-sc", "query=bash"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert query.returncode == 0, query.stderr
    assert {"optimizer=adam", "optimizer=adamw", "optimizer=sgd"} <= set(query.stdout.split())
