"""tracking=mlflow with the real mlflow: a local store in a temp folder, read back with MlflowClient."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, cli_here, make_tree, run_dirs

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from imgcls.tracking import NullTracker, flat_params  # noqa: E402

ONE_EPOCH = [o for o in TINY if not o.startswith("trainer.epochs=")] + ["trainer.epochs=1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes ~1.5 s); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tracking") / "tiny", counts={"train": 4, "val": 2, "test": 2})


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, folder):
        found |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def artifact_text(client: MlflowClient, run_id: str, path: str, folder: Path) -> str:
    folder.mkdir(exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(folder))).read_text()


def test_without_tracking_nothing_changes():
    from hydra import compose, initialize_config_dir

    from imgcls.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR):
        assert "tracking" not in compose(config_name="train")  # config.yaml and summary.txt as before
        assert dict(compose(config_name="train", overrides=["tracking=mlflow"]).tracking) == {
            "uri": None, "experiment": "imgcls", "log_checkpoint": False, "timeout_s": 10,
        }  # fmt: skip
    assert NullTracker().checkpoint_entries() == {}  # checkpoints as before


def test_params_are_flat_and_within_mlflow_limits():
    params = flat_params({"optimizer": {"lr": 0.01, "betas": [0.9, 0.99]}, "resume": None, "x": "y" * 7000})
    assert params["optimizer.lr"] == "0.01" and params["optimizer.betas"] == "[0.9, 0.99]"
    assert params["resume"] == "null"
    assert len(params["x"]) <= 6000 and params["x"].endswith("(7000 chars, cut)")


@pytest.mark.slow  # a tracked training and its resume
def test_tracked_run_logs_everything_and_resume_continues_it(tree: Path, store: str, tmp_path: Path):
    args = [*ONE_EPOCH, f"data.root={tree}", "tracking=mlflow", f"tracking.uri={store}"]
    args += ["tracking.experiment=run", "tracking.log_checkpoint=true"]
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert "tracking" not in run_dir.name  # where a run is tracked is not what it trains
    (run,) = runs_of(store, "run")
    client, run_id = MlflowClient(store), run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.tags["imgcls.run_dir"] == str(run_dir)
    # the rate SGD's rule gave for the batch of 4 (0.2 x 4 / 256), as the run trained with it
    assert run.data.params["optimizer.lr"] == "0.003125" and run.data.params["data.batch_size"] == "4"
    assert run.data.params["trainer.epochs"] == "1" and run.data.params["tracking.experiment"] == "run"
    with open(run_dir / "metrics.csv") as f:
        (row,) = csv.DictReader(f)
    for key in ("train/loss", "val/acc", "val/acc_best", "lr"):
        (point,) = client.get_metric_history(run_id, key)
        assert point.step == 1 and point.value == pytest.approx(float(row[key]))
    assert {"train/acc_best_weights", "val/acc_best_weights", "test/acc_best_weights"} <= set(
        run.data.metrics
    )
    assert artifacts(client, run_id) == {
        "summary.txt", "weights/best.pt",
        *(f"logs/classification_report_{s}.txt" for s in ("train", "val", "test")),
        *(f"plots/confusion_matrix_{s}.png" for s in ("train", "val", "test")),
    }  # fmt: skip
    assert f"mlflow:         run {run_id} in {store}" in (run_dir / "summary.txt").read_text()
    assert (run_dir / "tensorboard").is_dir()  # TensorBoard goes on beside MLflow

    # extending the finished run: the same MLflow run, its history carried on at step 2
    last = run_dir / "weights" / "last.pt"
    result = cli_here("imgcls.train", f"resume={last}", "trainer.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (again,) = runs_of(store, "run")
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert [p.step for p in client.get_metric_history(run_id, "val/acc")] == [1, 2]
    assert again.data.params["trainer.epochs"] == "1" and again.data.tags["resumed.trainer.epochs"] == "2"
    summary = artifact_text(client, run_id, "summary.txt", tmp_path / "dl")
    assert "status:         completed" in summary and "epoch:          2 of 2" in summary


def test_failed_run_is_failed_in_the_default_store(tree: Path, tmp_path: Path, monkeypatch):
    # lr=-1: torch refuses it as the run is built, after the MLflow run has started
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = cli_here(
        "imgcls.train", *ONE_EPOCH, f"data.root={tree}", "tracking=mlflow", "optimizer.lr=-1", cwd=tmp_path
    )
    assert result.returncode == 2 and "Invalid learning rate: -1" in result.stderr
    (run,) = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "imgcls")  # the current folder's store
    assert run.info.status == "FAILED"
    summary = artifact_text(
        MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), run.info.run_id, "summary.txt", tmp_path
    )
    assert "status:         failed" in summary


def test_a_store_that_cannot_open_is_an_error_before_the_run(tree: Path, tmp_path: Path):
    result = cli_here(
        "imgcls.train",
        *ONE_EPOCH,
        f"data.root={tree}",
        "tracking=mlflow",
        "tracking.uri=nosuch://x",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: tracking.uri=nosuch://x: MLflow cannot open this store" in result.stderr
    assert "Traceback" not in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert not (run_dir / "weights").exists()  # nothing was trained


def test_without_the_package_the_error_says_what_to_install(tree: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # what `import` meets without mlflow
    result = cli_here("imgcls.train", *ONE_EPOCH, f"data.root={tree}", "tracking=mlflow", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: tracking=mlflow needs the mlflow package" in result.stderr
    assert "pip install 'imgcls[mlflow]'" in result.stderr


@pytest.mark.slow
def test_parallel_grid_jobs_are_children_of_one_parent_with_the_leaderboard(
    tree: Path, tmp_path: Path, monkeypatch
):
    """Two jobs at once in worker processes, on a new store: one parent, the tables created once."""
    store = f"sqlite:///{tmp_path / 'sweeps.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the environment points at the store
    args = ["-m", *ONE_EPOCH, f"data.root={tree}", "tracking=mlflow", "tracking.experiment=sweep"]
    args += ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    result = cli_here("imgcls.train", *args, "optimizer.lr=0.01,0.02", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    parent_id = json.loads((sweep / "mlflow_parent.json").read_text())["run_id"]
    runs = runs_of(store, "sweep")
    (parent,) = [r for r in runs if r.info.run_id == parent_id]
    children = [r for r in runs if r.info.run_id != parent_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["imgcls.sweep_dir"] == str(sweep)
    assert {"sweep_summary.csv", "report.html"} <= artifacts(MlflowClient(store), parent_id)
    assert sorted(r.data.params["optimizer.lr"] for r in children) == ["0.01", "0.02"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)


@pytest.mark.slow
def test_interrupted_run_is_killed_and_resume_finishes_it(tree: Path, store: str, tmp_path: Path):
    """Only a real process shows a signal: SIGINT mid-epoch, the MLflow run KILLED, then resumed."""
    args = [*TINY, f"data.root={tree}", "trainer.log_every_n_steps=1", "tracking=mlflow"]
    args += [f"tracking.uri={store}", "tracking.experiment=interrupted"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if "epoch 2/2 1/" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    (run,) = runs_of(store, "interrupted")
    assert run.info.status == "KILLED"
    (run_dir,) = run_dirs(tmp_path)
    result = cli_here("imgcls.train", f"resume={run_dir / 'weights' / 'last.pt'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(store, "interrupted")
    assert run.info.status == "FINISHED"
    assert [p.step for p in MlflowClient(store).get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
