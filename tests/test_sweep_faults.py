"""Sweeps through the faults of a real SLURM cluster (tools/slurm_cluster.sh): a job cancelled mid-run
becomes its row and the sweep goes on; each Optuna trial is told from its own job; Ctrl-C cancels the
sweep's jobs."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY, cli_here, make_tree

# one torch thread per job: two jobs share the node's two cores; 3 epochs leave time to cancel one
FAULT_TINY = [o for o in TINY if not o.startswith("trainer.epochs=")] + [
    "trainer.epochs=3",
    "trainer.num_threads=1",
]


def _rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "sweep_summary.csv", newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: int(r["job"]))


def _record(job: Path) -> dict:
    return json.loads((job / "run.json").read_text())


def _job(sweep: Path, num: int) -> Path:
    (job,) = [p for p in sweep.glob(f"{num}_*") if p.is_dir()]
    return job


def _training(root: Path, num: int) -> bool:
    """Job `num` of the one sweep under root has started training."""
    logs = list(root.glob(f"multirun/*/*/{num}_*/logs/train.log"))
    return bool(logs) and "first training step" in logs[0].read_text(errors="replace")


def _job_id(root: Path, num: int) -> str | None:
    """The SLURM id of job `num` of the one sweep under root, as its run record names it."""
    records = list(root.glob(f"multirun/*/*/{num}_*/run.json"))
    try:
        return json.loads(records[0].read_text()).get("slurm_job_id") if records else None
    except ValueError:  # being replaced at this moment
        return None


def _cancel_when_training(cluster, root: Path, num: int, out: dict) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if _training(root, num) and (job_id := _job_id(root, num)):
            out["job_id"] = job_id
            out["scancel"] = cluster.run("scancel", job_id)
            return
        time.sleep(0.2)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_cancelled_slurm_job_becomes_its_row_and_the_grid_goes_on(slurm_cluster, tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    # two slots: jobs 0 and 1, then job 2 as soon as one ends; job 0 is cancelled while it trains
    args = ["-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.partition={slurm_cluster.partition}",
            "hydra.launcher.array_parallelism=2", *FAULT_TINY, f"data.root={tree}", "optimizer.lr=0.01,0.02,0.03"]  # fmt: skip
    cancelled: dict = {}
    canceller = threading.Thread(target=_cancel_when_training, args=(slurm_cluster, tmp_path, 0, cancelled))
    canceller.start()
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    canceller.join()
    assert cancelled.get("scancel") and cancelled["scancel"].returncode == 0, cancelled
    assert result.returncode == 0, result.stderr[-3000:]  # today: UncompletedJobError, exit 1
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    rows = _rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "interrupted"),
        ("1", "completed"),
        ("2", "completed"),
    ]
    record = _record(_job(sweep, 0))
    # the scheduler's reason is in the job's record; the run saved last.pt on SIGTERM
    assert any(re.search(rf"SLURM job {cancelled['job_id']} ended CANCELLED", n) for n in record["notes"]), (
        record
    )
    assert (_job(sweep, 0) / "weights" / "last.pt").is_file()
    assert slurm_cluster.job_state(cancelled["job_id"]).startswith("CANCELLED")
    assert "CANCELLED" in result.stderr + result.stdout  # the sweep's log says which job and why


@pytest.mark.slurm
@pytest.mark.slow
def test_each_optuna_trial_is_told_from_its_own_slurm_job(slurm_cluster, tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", "hparams_search=optuna", "hydra/launcher=slurm_cpu",
            f"hydra.launcher.partition={slurm_cluster.partition}", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=2", *FAULT_TINY, f"data.root={tree}"]  # fmt: skip
    cancelled: dict = {}
    canceller = threading.Thread(target=_cancel_when_training, args=(slurm_cluster, tmp_path, 0, cancelled))
    canceller.start()
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    canceller.join()
    assert cancelled.get("scancel") and cancelled["scancel"].returncode == 0, cancelled
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    study = optuna.load_study(study_name="imgcls", storage=f"sqlite:///{sweep}/optuna.db")
    trials = sorted(study.trials, key=lambda t: t.number)
    # trial 0's job was cancelled: FAIL with the scheduler's reason; the trial beside it completed with its value
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["interrupted"] is True
    assert trials[0].user_attrs["slurm_job_id"] == cancelled["job_id"]
    assert trials[1].state.name == "COMPLETE"
    assert trials[1].value == _record(_job(sweep, 1))["best"]["score"]
    # the cancelled trial does not count: a third one ran, and the study holds 2 finished trials
    assert [t.state.name for t in trials[2:]] == ["COMPLETE"]
    rows = {r["job"]: r["status"] for r in _rows(sweep)}
    assert rows == {"0": "interrupted", "1": "completed", "2": "completed"}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("on_interrupt", ["cancel", "keep"])
def test_ctrl_c_of_a_slurm_sweep_cancels_its_jobs(slurm_cluster, tmp_path: Path, on_interrupt: str):
    tree = make_tree(tmp_path / "tiny")
    epochs = "trainer.epochs=40"  # long enough that the jobs still run when Ctrl-C comes
    args = ["-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.partition={slurm_cluster.partition}",
            f"hydra.launcher.on_interrupt={on_interrupt}", *FAULT_TINY, epochs, f"data.root={tree}",
            "optimizer.lr=0.01,0.02"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as from a terminal: SIGINT handled (a pytest-xdist worker may pass on an ignored SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (_training(tmp_path, 0) and _training(tmp_path, 1)):
            time.sleep(0.2)
        ids = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        assert len(ids) == 2, ids
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=150)
        assert proc.returncode == 130, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    if on_interrupt == "cancel":
        for job_id in ids:
            assert slurm_cluster.job_state(job_id).startswith("CANCELLED"), job_id
        for num in (0, 1):
            assert _record(_job(sweep, num))["status"] == "interrupted"
            assert (_job(sweep, num) / "weights" / "last.pt").is_file()
        assert [r["status"] for r in _rows(sweep)] == [
            "interrupted",
            "interrupted",
        ]  # the leaderboard is written
    else:  # the jobs run on
        queue = slurm_cluster.run("squeue", "-h", "-o", "%i %T").stdout
        assert all(f"{i} RUNNING" in queue for i in ids), queue
        assert "keep running (hydra.launcher.on_interrupt=keep)" in out
        slurm_cluster.run("scancel", *ids)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_killed_optuna_sweep_adopts_its_running_slurm_jobs(slurm_cluster, tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", "hparams_search=optuna", "hydra/launcher=slurm_cpu",
            f"hydra.launcher.partition={slurm_cluster.partition}", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=2", *FAULT_TINY, "trainer.epochs=6", f"data.root={tree}"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # kill -9 the sweep while both its SLURM jobs train: they run on
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (_training(tmp_path, 0) and _training(tmp_path, 1)):
            time.sleep(0.2)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    ids = slurm_cluster.run("squeue", "-h", "-t", "R", "-o", "%i").stdout.split()
    assert len(ids) == 2, ids  # still running on the cluster

    # the rerun waits for them and tells each trial its job's result: none rerun, none lost
    result = cli_here("imgcls.train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="imgcls", storage=f"sqlite:///{sweep}/optuna.db")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # today: FAIL killed, and 2 more run
    assert sorted(p.name.split("_")[0] for p in sweep.iterdir() if re.match(r"\d+_", p.name)) == ["0", "1"]
    for t in trials:
        assert t.value == _record(_job(sweep, t.user_attrs["job_num"]))["best"]["score"]
    rows = _rows(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert best == max(float(r["val/acc_best"]) for r in rows)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_running_record_of_an_ended_slurm_job_reads_killed_on_any_host(slurm_cluster, tmp_path: Path):
    from imgcls.run_record import RunRecord
    from imgcls.sweeps.summary import job_status

    def submit(command: str) -> str:
        out = slurm_cluster.run("sbatch", "--parsable", f"--partition={slurm_cluster.partition}",
                                f"--chdir={tmp_path}", "--wrap", command)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    ended, running = submit("true"), submit("sleep 120")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            slurm_cluster.job_state(ended) == "COMPLETED" and slurm_cluster.job_state(running) == "RUNNING"
        ):
            time.sleep(0.5)
        # records a job on another node left `running` (its pid means nothing here)
        dead = RunRecord(status="running", host="node-b", pid=1, slurm_job_id=ended)
        alive = RunRecord(status="running", host="node-b", pid=1, slurm_job_id=running)
        assert job_status(dead) == "killed"  # today: running
        assert job_status(alive) == "running"
        assert job_status(RunRecord(status="reporting", host="node-b", pid=1, slurm_job_id=ended)) == (
            "reports incomplete"
        )
    finally:
        slurm_cluster.run("scancel", running)
