"""Sweeps: real `-m` grid and Optuna runs on tiny data, a killed-and-resumed study, the leaderboard."""

from __future__ import annotations

import csv
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY, cli, cli_here, make_tree
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

# one epoch per job: a sweep of four jobs takes about 15 s on 2 cores
SWEEP_TINY = [o for o in TINY if not o.startswith("trainer.epochs=")] + ["trainer.epochs=1"]


def sweep_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "multirun").glob("*/*") if p.is_dir())


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(
        (p for p in sweep.iterdir() if re.match(r"\d+_", p.name)), key=lambda p: int(p.name.split("_")[0])
    )


def read_summary(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def status_of(job: Path) -> str:
    return re.search(r"^status:\s*(\S+)", (job / "summary.txt").read_text(), re.M).group(1)


def hparams_sessions(sweep: Path) -> dict[str, dict[str, object]]:
    """{job dir name: {hparam: value}} from the HParams session entries TensorBoard will read."""
    sessions = {}
    for run in sorted((sweep / "hparams").iterdir()):
        acc = EventAccumulator(str(run))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        sessions[run.name] = {k: v.number_value or v.string_value for k, v in info.hparams.items()}
        assert [s.value for s in acc.Scalars("val/acc_best")], run
    return sessions


@pytest.mark.slow
def test_grid_gives_a_run_directory_per_job_and_a_ranked_summary(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", *SWEEP_TINY, f"data.root={tree}", "optimizer.lr=0.01,0.001", "data.batch_size=4,8"]
    result = cli("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    # numbered in launch order, named from the overrides that differ
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1", "2", "3"]
    assert {re.sub(r"^\d+_", "", j.name) for j in jobs} == {
        f"batch_size-{b}_data-imagefolder_epochs-1_lr-{lr}_name-shufflenet_v2_x0_5_root-tiny_transforms-digits"
        for b in (4, 8)
        for lr in ("0.01", "0.001")
    }
    for job in jobs:  # each job is a complete run directory
        for rel in ["config.yaml", "summary.txt", "metrics.csv", "weights/best.pt", "weights/last.pt"]:
            assert (job / rel).is_file(), job / rel
        assert status_of(job) == "completed"

    rows = read_summary(sweep)
    assert len(rows) == 4
    values = [float(r["val/acc_best"]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    for r in rows:
        job = Path(r["run_dir"])
        assert job.parent == sweep.resolve() and r["job"] == job.name.split("_")[0]
        with open(job / "metrics.csv") as f:
            assert float(r["val/acc_best"]) == max(float(m["val/acc"]) for m in csv.DictReader(f))
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert float(r["optimizer.lr"]) == config["optimizer"]["lr"]
        assert int(r["data.batch_size"]) == config["data"]["batch_size"]
        assert r["status"] == "completed" and r["epochs"] == "1/1"
        assert f"optimizer.lr={r['optimizer.lr']}" in r["overrides"].split()

    # the printed table ranks the same jobs, with the overrides that differ
    table = result.stdout[result.stdout.index("rank  job  status") :].splitlines()[1:5]
    for line, r in zip(table, rows, strict=True):
        assert line.split()[:3] == [r["rank"], r["job"], "completed"], line
        assert {f"optimizer.lr={r['optimizer.lr']}", f"data.batch_size={r['data.batch_size']}"} < set(
            line.split()
        )
        assert line.endswith(Path(r["run_dir"]).name)
    assert f"tensorboard --logdir {sweep.relative_to(tmp_path)}" in result.stdout

    assert (sweep / "sweep_objective.png").stat().st_size > 10_000
    sessions = hparams_sessions(sweep)
    assert set(sessions) == {j.name for j in jobs}
    for r in rows:
        hp = sessions[Path(r["run_dir"]).name]
        assert hp["optimizer.lr"] == pytest.approx(float(r["optimizer.lr"]))
        assert hp["data.batch_size"] == int(r["data.batch_size"]) and hp["status"] == "completed"


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_grid(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    # lr=-1: torch refuses it when the optimizer is built, a ConfigError inside the job
    args = ["-m", *SWEEP_TINY, f"data.root={tree}", "optimizer.lr=0.01,-1,0.02"]
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    failed, after = job_dirs(sweep)[1:]
    assert "lr--1" in failed.name and status_of(failed) == "failed"
    assert "Invalid learning rate: -1" in (failed / "summary.txt").read_text()
    assert status_of(after) == "completed"  # the job after the failure still ran
    assert "job failed, the sweep goes on" in result.stdout + result.stderr

    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    assert rows[-1]["optimizer.lr"] == "-1" and rows[-1]["val/acc_best"] == "" and rows[-1]["epochs"] == "0/1"
    assert re.search(r"^3\s+1\s+failed\s+-\s+0/1\s+optimizer.lr=-1\s", result.stdout, re.M)


@pytest.mark.slow
def test_parallel_launcher_runs_jobs_at_the_same_time(tmp_path: Path):
    from datetime import datetime

    tree = make_tree(tmp_path / "tiny")
    # 4 epochs: each job outlasts the few seconds a worker process may take to start
    tiny = [o for o in SWEEP_TINY if not o.startswith("trainer.epochs=")] + ["trainer.epochs=4"]
    args = ["-m", "hydra/launcher=parallel", "trainer.num_threads=1", *tiny, f"data.root={tree}"]
    result = cli("imgcls.train", *args, "optimizer.lr=0.01,0.02", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    spans = []
    for job in job_dirs(sweep):
        assert status_of(job) == "completed"
        text = (job / "summary.txt").read_text()
        times = [re.search(rf"^{k}:\s*(\S+ \S+)", text, re.M).group(1) for k in ("started", "ended")]
        spans.append([datetime.fromisoformat(t) for t in times])
        assert pid_of(job) != os.getpid()
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # the two runs overlap in time
    assert pid_of(job_dirs(sweep)[0]) != pid_of(job_dirs(sweep)[1])  # in two worker processes
    assert len(read_summary(sweep)) == 2


def pid_of(job: Path) -> int:
    return int(re.search(r"^heartbeat:.*\(pid (\d+) on", (job / "summary.txt").read_text(), re.M).group(1))


def count_states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall())


def load_trials(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="imgcls", storage=f"sqlite:///{sweep / 'optuna.db'}").trials


# the batch size is searched here: a fixed data.batch_size=... would take it out of the space
OPTUNA = ["-m", "hparams_search=optuna", "data.batch_size=choice(4,8)"]
OPTUNA += [o for o in SWEEP_TINY if not o.startswith("data.batch_size=")]


@pytest.mark.slow
@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_ctrl_c_stops_the_whole_sweep(tmp_path: Path, search: str):
    tree = make_tree(tmp_path / "tiny")
    if search == "grid":
        args = ["-m", *SWEEP_TINY, f"data.root={tree}", "optimizer.lr=0.01,0.02,0.03"]
    else:
        args = [*OPTUNA, "hydra.sweeper.n_trials=3", f"data.root={tree}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list(tmp_path.glob("multirun/*/*/1_*/logs/train.log"))
            if logs and "first training step" in logs[0].read_text():  # the second job is training
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    (sweep,) = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    assert [j.name[0] for j in jobs] == ["0", "1"]  # the third job never started
    assert status_of(jobs[0]) == "completed" and status_of(jobs[1]) == "interrupted"
    if search == "optuna":  # the interrupted trial is closed, and will not count on resume
        trials = load_trials(sweep)
        assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
        assert trials[1].user_attrs["interrupted"] is True


@pytest.mark.slow
def test_optuna_search_stores_its_study_and_ranks_the_trials(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = [*OPTUNA, "hydra.sweeper.n_trials=3", f"data.root={tree}"]
    result = cli("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    trials = load_trials(sweep)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    jobs = job_dirs(sweep)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2"]
    for trial, job in zip(trials, jobs, strict=True):
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == trial.params["optimizer.lr"]  # log-uniform in [1e-4, 1e-1]
        assert 1e-4 <= trial.params["optimizer.lr"] <= 1e-1
        assert config["data"]["batch_size"] == trial.params["data.batch_size"] in (4, 8)
        assert trial.value == max(float(m["val/acc"]) for m in csv.DictReader(open(job / "metrics.csv")))
        assert trial.user_attrs["job_num"] == int(job.name.split("_")[0])
    rows = read_summary(sweep)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    best = max(trials, key=lambda t: t.value)
    assert float(rows[0]["val/acc_best"]) == best.value
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == best.value


@pytest.mark.slow
def test_killed_optuna_sweep_resumes_without_losing_or_rerunning_a_trial(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = [*OPTUNA, "hydra.sweeper.n_trials=3", f"data.root={tree}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # kill it mid-way through the third trial: two COMPLETE, one RUNNING with its job dir
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            sweeps = sweep_dirs(tmp_path)
            db = sweeps[0] / "optuna.db" if sweeps else None
            if db and db.is_file():
                try:
                    states = count_states(db)
                except sqlite3.OperationalError:  # the file exists, optuna has not created its tables yet
                    states = {}
                third = list(sweeps[0].glob("2_*/summary.txt"))
                if states.get("COMPLETE") == 2 and states.get("RUNNING") == 1 and third:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (sweep,) = sweep_dirs(tmp_path)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for j in job_dirs(sweep) for p in j.rglob("*")}
    killed = next(sweep.glob("2_*"))
    assert status_of(killed) == "running"  # what the killed process last wrote

    # the leaderboard can be rebuilt at any time; it sees the dead job for what it is
    result = cli_here("imgcls.sweep", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in read_summary(sweep)] == ["completed", "completed", "killed"]

    result = cli_here("imgcls.train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load_trials(sweep)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs["killed"] is True
    # no finished job rerun or overwritten: the earlier files are untouched, the new job is number 3
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for j in job_dirs(sweep)[:3] for p in j.rglob("*")}
    assert after == before
    jobs = job_dirs(sweep)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2", "3"]
    assert status_of(jobs[3]) == "completed" and trials[3].user_attrs["job_num"] == 3
    # the resumed sampler does not replay the first run's proposals
    assert trials[3].params["optimizer.lr"] not in {t.params["optimizer.lr"] for t in trials[:3]}
    rows = read_summary(sweep)
    assert sorted(r["status"] for r in rows) == ["completed", "completed", "completed", "killed"]
    assert rows[-1]["run_dir"] == str(killed.resolve())


@pytest.mark.slow
def test_two_workers_share_one_study_and_its_budget(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    db = tmp_path / "shared.db"
    env = {**os.environ, "IMGCLS_OPTUNA_STORAGE": f"sqlite:///{db}", "IMGCLS_OPTUNA_STUDY": "shared"}
    args = [
        "-m",
        "hparams_search=optuna_shared",
        *OPTUNA[2:],
        "hydra.sweeper.n_trials=3",
        f"data.root={tree}",
    ]
    workers = []
    for name in ("a", "b"):  # two machines, as far as the study can tell: separate working dirs
        (tmp_path / name).mkdir()
        cmd = [sys.executable, "-m", "imgcls.train", *args]
        log = open(tmp_path / name / "worker.log", "w")  # a pipe could fill up and stall the worker
        workers.append(subprocess.Popen(cmd, cwd=tmp_path / name, env=env, stdout=log, stderr=log))
    for w, name in zip(workers, ("a", "b"), strict=True):
        assert w.wait(timeout=600) == 0, (tmp_path / name / "worker.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}").trials
    counted = [t for t in trials if not t.user_attrs.get("over_budget")]
    assert [t.state.name for t in counted] == ["COMPLETE"] * 3
    ran = [j for name in ("a", "b") for j in job_dirs(sweep_dirs(tmp_path / name)[0])]
    assert len(ran) == 3 and {status_of(j) for j in ran} == {"completed"}
    assert {t.user_attrs["pid"] for t in counted} == {w.pid for w in workers}  # both took a share
    assert len({t.params["optimizer.lr"] for t in counted}) == 3  # and proposed different trials


def test_leaderboard_cli_needs_a_sweep_directory(tmp_path: Path):
    result = cli("imgcls.sweep", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: {tmp_path} holds no job directories" in result.stderr


def test_help_lists_the_search_options(tmp_path: Path):
    result = cli_here("imgcls.train", "--help", cwd=tmp_path)
    assert "hparams_search: grid, optuna, optuna_shared" in result.stdout
