"""A run someone sent you supplies its model and how to rebuild it, nothing else: what reaches the
network or writes outside the run (tracking, cache folders, Hydra's settings) comes from the command
now (imgcls.config.saved), and no resolver in a saved config runs on this machine."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_here, run_dirs

from imgcls.config.saved import CURRENT, POLICY, READER_VALUES, classify, read_saved
from imgcls.errors import ConfigError

SECRET = "s3cret-from-the-readers-environment"
FOREIGN_RUN_ID = "0123456789abcdef0123456789abcdef"


def _leaves(node, prefix=""):
    """Every key of a config: into mappings (`_target_` nodes too); a list is one value."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, name + ".")
        else:
            yield name


def _composed_configs():
    """train.yaml composed with each option of every config group (one group switched at a time)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from imgcls.cli import CONFIG_DIR
    from imgcls.config.naming import register_resolvers

    register_resolvers()
    groups = [p for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"]
    options = [[]] + [[f"{g.name}={o.stem}"] for g in groups for o in sorted(g.glob("*.yaml"))]
    with initialize_config_dir(config_dir=CONFIG_DIR):
        for overrides in options:
            cfg = compose(config_name="train", overrides=overrides)
            yield overrides, OmegaConf.to_container(cfg, resolve=False)


def test_every_key_of_the_composed_train_config_has_a_decision():
    """A key added later without a decision (may a saved run supply it?) fails here."""
    seen = set()
    for overrides, config in _composed_configs():
        for key in _leaves(config):
            assert classify(key) is not None, f"{key} ({overrides}): add it to imgcls.config.saved.POLICY"
            seen.add(key)
        if overrides == []:
            # what evaluate, predict and export take for a current-only key is train.yaml's default
            assert config["data"]["cache_dir"] == READER_VALUES["data.cache_dir"]
            assert config["resume"] is READER_VALUES["resume"] and "tracking" not in config
    assert {"tracking.uri", "tracking.experiment", "data.cache_dir", "model.weights"} <= seen
    # every rule names keys that exist (hydra and defaults: directives a saved file could carry)
    stale = [
        k
        for k in POLICY
        if k not in ("hydra", "defaults") and not any(s == k or s.startswith(k + ".") for s in seen)
    ]
    assert stale == []
    assert {k for k, (kind, _) in POLICY.items() if kind == CURRENT} == {
        "tracking", "data.cache_dir", "resume", "hydra", "defaults",
    }  # fmt: skip


@pytest.mark.parametrize(
    "text, resolver",
    [
        ("${oc.env:SECRET_VAR}", "oc.env"),
        ("${oc.env:SECRET_VAR,fallback}", "oc.env"),
        ("${oc.decode:'${oc.env:SECRET_VAR}'}", "oc.decode"),
        ("${oc.create:{a: 1}}", "oc.create"),
        ("${now:%Y-%m-%d}", "now"),
        ("${hydra:runtime.cwd}", "hydra"),
        ("${run_label:x}", "run_label"),  # the project's own
        ("${some_plugin:x}", "some_plugin"),  # one not registered here: refused all the same
        ("prefix/${oc.env:HOME}/suffix", "oc.env"),
        ("${trainer.${oc.env:KEY}}", "oc.env"),  # inside a reference to an own key
    ],
)
def test_a_resolver_anywhere_in_a_saved_config_is_refused(text, resolver):
    raw = {"trainer": {"epochs": 2}, "data": {"exclude": ["a", text]}}
    with pytest.raises(ConfigError) as exc:
        read_saved(raw, "run/config.yaml")
    assert str(exc.value).startswith(
        f"run/config.yaml: data.exclude[1]={text!r} calls the resolver {resolver!r}"
    )


def test_references_to_own_keys_and_escaped_text_stay():
    raw = {"trainer": {"epochs": 4}, "scheduler": {"epochs": "${trainer.epochs}"}, "x": r"\${oc.env:HOME}"}
    config, ignored = read_saved(raw, "c.yaml")
    assert config["scheduler"]["epochs"] == "${trainer.epochs}" and config["x"] == r"\${oc.env:HOME}"
    assert ignored == {}


def test_current_only_keys_come_from_the_command():
    raw = {
        "data": {"root": "r", "cache_dir": "/their/cache"},
        "tracking": {"uri": "http://their.host"},
        "hydra": {"searchpath": ["file:///their"]},
        "defaults": ["_self_"],
        "resume": "/their/last.pt",
    }
    config, ignored = read_saved(raw, "c.yaml")
    assert config == {"data": {"root": "r", "cache_dir": READER_VALUES["data.cache_dir"]}, "resume": None}
    assert set(ignored) == {"data.cache_dir", "tracking", "hydra", "defaults"}
    mine = {"data": {"cache_dir": "/my/cache"}, "tracking": {"uri": "sqlite:///mine.db"}, "resume": "x.pt"}
    config, _ = read_saved(raw, "c.yaml", current=mine)
    assert config["data"]["cache_dir"] == "/my/cache" and config["tracking"] == {"uri": "sqlite:///mine.db"}


# --- real runs: a copy of the session's tiny run, edited as a sender could -------------------------


@pytest.fixture
def listener():
    """A TCP port that is listening and never answers: a client that connects stays queued."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0)
    yield sock
    sock.close()


def connections(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.accept()[0].close()
            n += 1
        except BlockingIOError:
            return n


@pytest.fixture
def quick_mlflow(monkeypatch):
    """Without the fix the resume talks to the listener: fail in seconds, not after MLflow's retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SECRET_VAR", SECRET)


def foreign_copy(trained_run: Path, dest: Path) -> Path:
    return Path(
        shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns("eval", "predict", "export"))
    )


def edit_checkpoint(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    for key in ("config", "config_unresolved"):
        if state.get(key):
            edit(state[key])
    state["mlflow_run_id"] = FOREIGN_RUN_ID
    path.unlink()
    torch.save(state, path)


def edit_config_yaml(run: Path, edit) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    edit(config)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def files_holding(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def tracked(uri: str):
    return lambda c: c.update(tracking={"uri": uri, "experiment": "theirs", "log_checkpoint": True})


@pytest.mark.parametrize("store", ["http", "sqlite"])
def test_resume_of_a_foreign_checkpoint_reaches_no_store_it_names(
    trained_run: Path, tmp_path: Path, listener, quick_mlflow, store
):
    run = foreign_copy(trained_run, tmp_path / "run")
    db = tmp_path / "elsewhere" / "x.db"
    db.parent.mkdir()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}" if store == "http" else f"sqlite:///{db}"
    edit_checkpoint(run / "weights" / "last.pt", tracked(uri))
    result = cli_here(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert connections(listener) == 0, "the resume connected to the server the checkpoint named"
    assert not db.exists() and list(tmp_path.glob("*.db")) == [] and not (tmp_path / "mlruns").exists()
    assert f"tracking={{'uri': '{uri}'" in result.stderr and "so this resume is not tracked" in result.stderr
    assert "mlflow:" not in (run / "summary.txt").read_text()
    assert "epoch:          3 of 3" in (run / "summary.txt").read_text()
    assert "tracking" not in yaml.safe_load((run / "config.yaml").read_text())


def test_tracking_asked_for_on_the_command_line_starts_a_new_mlflow_run(
    trained_run: Path, tmp_path: Path, listener, quick_mlflow
):
    """The person resuming chooses the store; the checkpoint's MLflow run id (not in that store,
    not this folder's) is not continued."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = foreign_copy(trained_run, tmp_path / "run")
    edit_checkpoint(run / "weights" / "last.pt", tracked(f"http://127.0.0.1:{listener.getsockname()[1]}"))
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    result = cli_here(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=3", "tracking=mlflow",
        f"tracking.uri={mine}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert connections(listener) == 0
    assert f"the checkpoint's MLflow run {FOREIGN_RUN_ID} is not a run of" in result.stderr
    client = MlflowClient(mine)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
    assert mlrun.info.run_id != FOREIGN_RUN_ID and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["tracking.uri"] == mine


@pytest.mark.parametrize("command", ["evaluate", "predict", "resume"])
@pytest.mark.parametrize("where", ["config.yaml", "checkpoint"])
def test_a_saved_config_never_reads_the_readers_environment(
    trained_run: Path, tmp_path: Path, quick_mlflow, command, where
):
    run = foreign_copy(trained_run, tmp_path / "run")
    ckpt = "last" if command == "resume" else "best"

    def poison(config):
        config["data"]["exclude"] = ["${oc.env:SECRET_VAR}"]

    if where == "config.yaml":
        if command == "resume":
            pytest.skip("a resume reads the checkpoint only")
        edit_config_yaml(run, poison)
    else:
        (run / "config.yaml").unlink()
        edit_checkpoint(run / "weights" / f"{ckpt}.pt", poison)
    source = (
        run / "config.yaml" if where == "config.yaml" else f"{run / 'weights' / f'{ckpt}.pt'} (its config)"
    )
    root = yaml.safe_load((trained_run / "config.yaml").read_text())["data"]["root"]
    args = {
        "evaluate": ("imgcls.evaluate", f"run_dir={run}", "split=val"),
        "predict": ("imgcls.predict", f"run_dir={run}", f"inputs=[{Path(root) / 'val'}]"),
        "resume": ("imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=3"),
    }[command]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = cli_here(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: {source}: data.exclude[0]='${{oc.env:SECRET_VAR}}' calls the resolver 'oc.env'"
        in result.stderr
    )
    assert "Traceback" not in result.stderr and SECRET not in result.stderr
    assert files_holding(tmp_path, SECRET) == []
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, "nothing written into the run"


def test_evaluate_takes_no_cache_folder_or_hydra_settings_from_the_run(trained_run: Path, tmp_path: Path):
    """The run's data.cache_dir and a hydra node it carries do not reach the evaluation; a warning
    names what was ignored, and the evaluation's config.yaml holds this machine's value."""
    run = foreign_copy(trained_run, tmp_path / "run")
    theirs = tmp_path / "their-cache"

    def edit(config):
        config["data"].update(cache="disk", cache_dir=str(theirs))
        config["hydra"] = {"searchpath": [f"file://{tmp_path}"]}
        config["tracking"] = {"uri": f"sqlite:///{tmp_path / 'x.db'}"}

    edit_config_yaml(run, edit)
    mine = tmp_path / "my-cache"
    result = cli_here(
        "imgcls.evaluate", f"run_dir={run}", "split=val", f"data.cache_dir={mine}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data.cache_dir='{theirs}' from {run / 'config.yaml'} ignored" in result.stderr
    assert (
        f"hydra={{'searchpath': ['file://{tmp_path}']}} from {run / 'config.yaml'} ignored" in result.stderr
    )
    assert not theirs.exists() and not (tmp_path / "x.db").exists()
    (out,) = (run / "eval").iterdir()
    saved = yaml.safe_load((out / "config.yaml").read_text())["run"]
    assert saved["data"]["cache_dir"] == str(mine) and "hydra" not in saved and "tracking" not in saved
    assert run_dirs(tmp_path) == []


@pytest.mark.parametrize("weights", ["DEFAULT", "/etc/hostname"])
def test_a_saved_model_weights_setting_is_neither_downloaded_nor_read(
    trained_run: Path, tmp_path: Path, monkeypatch, weights
):
    """The checkpoint holds every weight: a saved `model.weights` (a hub name that would download, a
    path on the reader's machine) is not acted on by evaluate or resume; the torch hub cache stays empty."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    run = foreign_copy(trained_run, tmp_path / "run")

    def edit(config):
        config["model"]["weights"] = weights

    edit_config_yaml(run, edit)
    edit_checkpoint(run / "weights" / "last.pt", edit)
    evaluated = cli_here("imgcls.evaluate", f"run_dir={run}", "split=val", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    resumed = cli_here(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=3", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "model.weights" not in evaluated.stderr + resumed.stderr
    assert not (tmp_path / "hub").exists(), "a weights download was started"
