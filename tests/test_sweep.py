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
from conftest import TINY, cli, make_tree
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from imgcls import gpu_slots
from imgcls.train import CONFIG_DIR

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


def test_grid_gives_a_run_directory_per_job_and_a_ranked_summary(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", *SWEEP_TINY, f"data.root={tree}", "optimizer.lr=0.01,0.001", "data.batch_size=4,8"]
    result = cli("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    # numbered in launch order, named from the overrides that differ
    assert [j.name.split(",lr=")[0].split("_", 1)[0] for j in jobs] == ["0", "1", "2", "3"]
    assert {re.sub(r"^\d+_", "", j.name) for j in jobs} == {
        f"batch_size={b},data=imagefolder,epochs=1,lr={lr},root=tiny,transforms=digits"
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


def test_a_failing_job_does_not_stop_the_grid(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    # lr=-1: torch refuses it when the optimizer is built, a ConfigError inside the job
    args = ["-m", *SWEEP_TINY, f"data.root={tree}", "optimizer.lr=0.01,-1,0.02"]
    result = cli("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    failed, after = job_dirs(sweep)[1:]
    assert "lr=-1" in failed.name and status_of(failed) == "failed"
    assert "Invalid learning rate: -1" in (failed / "summary.txt").read_text()
    assert status_of(after) == "completed"  # the job after the failure still ran
    assert "job failed, the sweep goes on" in result.stdout + result.stderr

    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    assert rows[-1]["optimizer.lr"] == "-1" and rows[-1]["val/acc_best"] == "" and rows[-1]["epochs"] == "0/1"
    assert re.search(r"^3\s+1\s+failed\s+-\s+0/1\s+optimizer.lr=-1\s", result.stdout, re.M)


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
            if list(tmp_path.glob("multirun/*/*/1_*/summary.txt")):  # the second job is training
                break
            time.sleep(0.1)
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
                states = count_states(db)
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
    result = cli("imgcls.sweep", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in read_summary(sweep)] == ["completed", "completed", "killed"]

    result = cli("imgcls.train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
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


def test_workers_racing_to_create_the_tables_retry(monkeypatch, tmp_path: Path):
    from sqlalchemy.exc import OperationalError

    from hydra_plugins.imgcls_sweepers import _optuna

    calls, real = [], optuna.create_study

    def racing(**kwargs):  # what the loser of the race saw: sqlite's "table ... already exists"
        calls.append(kwargs)
        if len(calls) == 1:
            raise OperationalError("CREATE TABLE trial_heartbeats", {}, Exception("already exists"))
        return real(**kwargs)

    monkeypatch.setattr(_optuna.optuna, "create_study", racing)
    monkeypatch.setattr(_optuna.time, "sleep", lambda s: None)
    study = _optuna._open_study("s", f"sqlite:///{tmp_path / 'o.db'}", None, ["maximize"])
    assert len(calls) == 2 and study.study_name == "s"


def test_job_directory_names_shorten_sampled_floats():
    from imgcls.naming import run_label

    # an Optuna suggestion is cut to 6 significant digits in the name; config.yaml keeps it whole
    assert run_label("optimizer.lr=0.0013292918943162175,data.batch_size=4") == "batch_size=4,lr=0.00132929"
    assert run_label("optimizer.weight_decay=2.9380279387035334e-05") == "weight_decay=2.93803e-05"
    for kept in ["lr=0.01", "lr=1e-05", "lr=-1", "seed=123456789012", "name=abc.defghijklmnop"]:
        assert run_label(kept) == kept


def test_leaderboard_cli_needs_a_sweep_directory(tmp_path: Path):
    result = cli("imgcls.sweep", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: {tmp_path} holds no job directories" in result.stderr


# -- configs: every option composes and builds -----------------------------------------------


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_hparams_search_options_compose_and_build(tmp_path: Path, monkeypatch):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    assert sorted(p.stem for p in (Path(CONFIG_DIR) / "hparams_search").glob("*.yaml")) == [
        "grid",
        "optuna",
        "optuna_shared",
    ]
    grid = compose_train("hydra.sweep.dir=x")
    assert instantiate(grid.hydra.sweeper).__class__.__name__ == "GridSweeper"

    cfg = compose_train("hparams_search=optuna", f"hydra.sweep.dir={tmp_path}")
    sweeper = instantiate(cfg.hydra.sweeper).sweeper
    assert type(sweeper).__name__ == "ResumableImpl"
    assert sweeper.direction == "maximize" and sweeper.n_trials == 20 and sweeper.max_failure_rate == 1.0
    assert sweeper.storage == f"sqlite:///{tmp_path}/optuna.db" and sweeper.study_name == "imgcls"
    assert isinstance(sweeper.sampler, optuna.samplers.TPESampler)
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    assert space["optimizer.lr"] == LogUniformDistribution(1e-4, 1e-1) and not fixed
    assert space["data.batch_size"] == CategoricalDistribution([16, 32, 64])

    monkeypatch.setenv("IMGCLS_OPTUNA_STORAGE", "postgresql://u:p@db/optuna")
    monkeypatch.setenv("IMGCLS_OPTUNA_STUDY", "lr_bs")
    shared = instantiate(compose_train("hparams_search=optuna_shared").hydra.sweeper).sweeper
    assert (shared.storage, shared.study_name) == ("postgresql://u:p@db/optuna", "lr_bs")
    assert shared.direction == "maximize"
    assert compose_train("hparams_search=optuna_shared").hydra.sweeper.sampler.seed is None
    monkeypatch.delenv("IMGCLS_OPTUNA_STORAGE")
    with pytest.raises(Exception, match="IMGCLS_OPTUNA_STORAGE"):
        instantiate(compose_train("hparams_search=optuna_shared").hydra.sweeper)


def test_help_lists_the_search_options(tmp_path: Path):
    result = cli("imgcls.train", "--help", cwd=tmp_path)
    assert "hparams_search: grid, optuna, optuna_shared" in result.stdout


def test_launcher_options_compose_and_build():
    parallel = instantiate(compose_train("hydra/launcher=parallel", "hydra.sweep.dir=x").hydra.launcher)
    assert type(parallel).__name__ == "JoblibLauncher" and parallel.joblib["n_jobs"] == 2
    cfg = compose_train("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=s")
    slurm = instantiate(cfg.hydra.launcher)
    assert type(slurm).__name__ == "SlurmLauncher"
    assert slurm.params["gpus_per_node"] == 1 and slurm.params["partition"] == "gpu"
    assert slurm.params["submitit_folder"] == "s/.submitit/%j"


# -- one GPU per parallel job ---------------------------------------------------------------


def test_parallel_jobs_claim_different_gpus_and_release_them(tmp_path: Path):
    first = gpu_slots.claim_gpu(2, tmp_path)
    second = gpu_slots.claim_gpu(2, tmp_path)
    assert (first[0], second[0]) == (0, 1)
    gpu_slots.release_gpu(first[1])
    third = gpu_slots.claim_gpu(2, tmp_path)
    assert third[0] == 0  # freed by the job that ended
    # a process that dies holds nothing: the kernel drops its lock
    code = f"from imgcls.gpu_slots import claim_gpu; from pathlib import Path; print(claim_gpu(3, Path({str(tmp_path)!r}))[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"
    assert gpu_slots.claim_gpu(3, tmp_path, wait_s=0.01)[0] == 2


def test_a_sweep_job_gets_its_own_gpu_and_frees_memory_at_the_end(tmp_path: Path, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(gpu_slots, "LOCK_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    cfg = compose_train("hydra.sweep.dir=x", "hydra.mode=MULTIRUN")
    a, b = gpu_slots.OneGpuPerJob(), gpu_slots.OneGpuPerJob()  # two parallel workers
    a.on_job_start(config=cfg)
    b.on_job_start(config=cfg)
    assert calls == [("set_device", 0), ("set_device", 1)]
    a.on_job_end(config=cfg, job_return=None)
    assert calls[-1] == ("empty_cache",) and a.fd is None
    calls.clear()
    a.on_job_start(config=compose_train("hydra.sweep.dir=x", "hydra.mode=MULTIRUN", "device=cuda:1"))
    a.on_job_start(config=compose_train("hydra.sweep.dir=x", "hydra.mode=RUN"))
    assert calls == []  # an explicit device, and a single run, are left alone
    a.on_job_start(config=cfg)
    assert calls == [("set_device", 0)]  # the GPU that a's last job released
    b.on_job_end(config=cfg, job_return=None)
    a.on_job_end(config=cfg, job_return=None)
