"""Asynchronous sweeps (issue 25, item 6): n_jobs jobs run at once and the next starts the moment any
of them ends, on the parallel launcher and on a real SLURM cluster; the Optuna study is told each
result before the next trial is asked, and pruning works with it. A job killed from outside ends as
its own row while the others run on."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY, cli_here, make_tree

BASE = [o for o in TINY if not o.startswith("trainer.epochs=")] + ["trainer.num_threads=1"]
# every trial that reaches epoch 50 is pruned there (its best is below 1.01): the pruner's verdict
# is known in advance, whatever the tiny data set's accuracies
PRUNE_AT_50 = "{_target_: optuna.pruners.ThresholdPruner, lower: 1.01, n_warmup_steps: 50}"
# 4 trials in 2 slots. At seed 0 the sampler proposes 1, 80, 1, 80 epochs (a tiny epoch takes
# ~0.15 s): trial 0 ends after one epoch while trial 1 trains on to its pruning at epoch 50, so a
# sweep that waits for its batch idles a slot, and one that keeps its slots busy starts trial 2
# before trial 1 ends
ASYNC = [
    "-m", "hparams_search=optuna", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4", "seed=0",
    "trainer.epochs=choice(1,80)", "optimizer.lr=choice(0.05,1e-7)", f"hydra.sweeper.pruner={PRUNE_AT_50}",
    *BASE,
]  # fmt: skip


def _time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _jobs(sweep: Path) -> dict[int, dict]:
    """Each job's run record, by job number."""
    out = {}
    for record in sweep.glob("*_*/run.json"):
        out[int(record.parent.name.split("_")[0])] = json.loads(record.read_text())
    return out


def _rows(sweep: Path) -> dict[str, dict]:
    with open(sweep / "sweep_summary.csv", newline="") as f:
        return {r["job"]: r for r in csv.DictReader(f)}


def _check_asynchronous(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    """The sweep kept its two slots busy: the third trial was asked once the first of the first two
    ended (and was told) and started before the second one ended; every job is a row."""
    study = optuna.load_study(study_name="imgcls", storage=f"sqlite:///{sweep / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 4, [(t.number, t.state.name) for t in trials]
    # the premise (see ASYNC): short, long, short, long; the long ones pruned at epoch 50
    assert [t.params["trainer.epochs"] for t in trials] == [1, 80, 1, 80], [t.params for t in trials]
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    first, second = sorted(trials[:2], key=lambda t: t.datetime_complete)
    third = trials[2]
    assert first.datetime_complete < second.datetime_complete
    # the sampler saw the first result before it proposed the third trial...
    assert first.datetime_complete <= third.datetime_start, (first, third)
    # ...and did not wait for the second one (the batch-wise sweep does)
    assert third.datetime_start < second.datetime_complete, (third.datetime_start, second.datetime_complete)
    jobs = _jobs(sweep)
    assert sorted(jobs) == [0, 1, 2, 3]
    job_of = {t.number: t.user_attrs["job_num"] for t in trials}
    # the job of the third trial trained while the second trial's job was still running
    assert _time(jobs[job_of[third.number]]["started"]) < _time(jobs[job_of[second.number]]["ended"])
    rows = _rows(sweep)
    for t in trials:
        row, record = rows[str(job_of[t.number])], jobs[job_of[t.number]]
        assert (
            row["status"] == record["status"] == {"COMPLETE": "completed", "PRUNED": "pruned"}[t.state.name]
        )
        if t.state.name == "COMPLETE":
            assert t.value == record["best"]["score"]
    return trials


@pytest.mark.slow
def test_an_optuna_sweep_on_the_parallel_launcher_keeps_its_slots_busy_and_prunes(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = [*ASYNC, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"data.root={tree}"]
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    trials = _check_asynchronous(sweep)
    for t in trials[1::2]:  # a pruned run keeps last.pt and stopped at its pruning epoch
        record = _jobs(sweep)[t.user_attrs["job_num"]]
        assert (record["status"], record["epochs_done"], record["epochs_planned"]) == ("pruned", 50, 80)
        assert (sweep / Path(record["run_dir"]).name / "weights" / "last.pt").is_file()
    # each job ran in a process of its own, none in the sweep's
    pids = {r["pid"] for r in _jobs(sweep).values()}
    assert len(pids) == 4 and os.getpid() not in pids


@pytest.mark.slurm
@pytest.mark.slow
def test_an_optuna_sweep_on_slurm_keeps_its_slots_busy_and_prunes(slurm_cluster, tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = [*ASYNC, "hydra/launcher=slurm_cpu", f"hydra.launcher.partition={slurm_cluster.partition}",
            f"data.root={tree}"]  # fmt: skip
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    trials = _check_asynchronous(sweep)
    # each trial ran as its own SLURM job, which its record and the study name
    ids = [t.user_attrs["slurm_job_id"] for t in trials]
    assert len(set(ids)) == 4
    for t in trials:
        assert _jobs(sweep)[t.user_attrs["job_num"]]["slurm_job_id"] == t.user_attrs["slurm_job_id"]
        # sacct records the end a moment after the job's last write
        deadline = time.monotonic() + 60
        while (
            slurm_cluster.job_state(t.user_attrs["slurm_job_id"]) != "COMPLETED"
            and time.monotonic() < deadline
        ):
            time.sleep(1)
        assert slurm_cluster.job_state(t.user_attrs["slurm_job_id"]) == "COMPLETED"


@pytest.mark.slow
def test_a_parallel_job_killed_from_outside_is_its_own_failed_row_and_the_grid_goes_on(tmp_path: Path):
    """kill -9 of one job's process: that job's row says failed and why, the job beside it and the
    next one complete, and the sweep exits 0 (Hydra's joblib pool killed the others too, and raised)."""
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *BASE, "trainer.epochs=3",
            f"data.root={tree}", "optimizer.lr=0.01,0.02,0.03"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    killed = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and killed is None:
            for record in tmp_path.glob("multirun/*/*/0_*/run.json"):
                try:
                    data = json.loads(record.read_text())
                except ValueError:
                    continue
                if data["status"] == "running" and data["pid"]:
                    killed = data["pid"]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    rows = _rows(sweep)
    assert [(j, rows[j]["status"]) for j in sorted(rows)] == [
        ("0", "failed"),
        ("1", "completed"),
        ("2", "completed"),
    ]
    record = _jobs(sweep)[0]
    assert record["error"].startswith("its process died before the job ended"), record
    assert "job failed, the sweep goes on" in out


def _start(args: list[str], cwd: Path, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args], cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=stdout, stderr=subprocess.STDOUT, text=True,
        # as from a terminal: SIGINT handled (a pytest-xdist worker may pass on an ignored SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _wait_training(root: Path, nums: tuple[int, ...], timeout: float = 240) -> None:
    """Until jobs `nums` of the one sweep under root have started training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = [list(root.glob(f"multirun/*/*/{n}_*/logs/train.log")) for n in nums]
        if all(found and "first training step" in found[0].read_text(errors="replace") for found in logs):
            return
        time.sleep(0.2)
    raise AssertionError(f"jobs {nums} did not start training within {timeout} s")


@pytest.mark.slow
def test_ctrl_c_of_a_parallel_sweep_stops_its_jobs_and_writes_the_leaderboard(tmp_path: Path):
    """SIGINT to the sweep's process alone (not its jobs', as a terminal would): each running job
    is stopped, saves last.pt and says interrupted; the leaderboard is written; exit 130."""
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *BASE, "trainer.epochs=200",
            f"data.root={tree}", "optimizer.lr=0.01,0.02,0.03"]  # fmt: skip
    proc = _start(args, tmp_path)
    try:
        _wait_training(tmp_path, (0, 1))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    jobs = _jobs(sweep)
    assert sorted(jobs) == [0, 1]  # the third job never started
    for record in jobs.values():
        assert record["status"] == "interrupted" and record["epochs_done"] < 200, record
        assert (sweep / Path(record["run_dir"]).name / "weights" / "last.pt").is_file()
    assert [(j, r["status"]) for j, r in sorted(_rows(sweep).items())] == [
        ("0", "interrupted"),
        ("1", "interrupted"),
    ]


@pytest.mark.slow
def test_a_killed_optuna_sweep_adopts_its_parallel_jobs_that_still_run(tmp_path: Path):
    """kill -9 of the sweep while both its jobs train: their processes run on; the rerun waits for
    them and tells each trial its own job's result (none rerun, none lost, the best agrees)."""
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", "hparams_search=optuna", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", *BASE, "trainer.epochs=40",
            "optimizer.lr=choice(0.05,0.01)", f"data.root={tree}"]  # fmt: skip
    proc = _start(args, tmp_path, stdout=subprocess.DEVNULL)
    try:
        _wait_training(tmp_path, (0, 1))
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    assert {r["status"] for r in _jobs(sweep).values()} == {"running"}  # still training, orphaned

    result = cli_here("imgcls.train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="imgcls", storage=f"sqlite:///{sweep / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # before: FAIL killed, 2 more run
    jobs = _jobs(sweep)
    assert sorted(jobs) == [0, 1]
    for t in trials:
        assert t.value == jobs[t.user_attrs["job_num"]]["best"]["score"]
    rows = _rows(sweep)
    assert [r["status"] for r in rows.values()] == ["completed", "completed"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert best == max(float(r["val/acc_best"]) for r in rows.values())
