"""Sweep configs compose and build; GPU slots; the study-opening retry; job directory names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from imgcls.cli import CONFIG_DIR
from imgcls.sweeps import gpu_slots

# -- configs: every option composes and builds -----------------------------------------------


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def plugin(node):
    """A sweeper or launcher built as Hydra 1.4 builds it: its own _target_ only, nested nodes as config."""
    return instantiate(node, _recursive_=False, _execution_whitelist_=node._target_)


def test_hparams_search_options_compose_and_build(tmp_path: Path, monkeypatch):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    assert sorted(p.stem for p in (Path(CONFIG_DIR) / "hparams_search").glob("*.yaml")) == [
        "grid",
        "optuna",
        "optuna_shared",
    ]
    grid = compose_train("hydra.sweep.dir=x")
    assert plugin(grid.hydra.sweeper).__class__.__name__ == "GridSweeper"

    cfg = compose_train("hparams_search=optuna", f"hydra.sweep.dir={tmp_path}")
    sweeper = plugin(cfg.hydra.sweeper).sweeper
    assert type(sweeper).__name__ == "ResumableImpl"
    assert sweeper.direction == "maximize" and sweeper.n_trials == 20 and sweeper.max_failure_rate == 1.0
    assert sweeper.storage == f"sqlite:///{tmp_path}/optuna.db" and sweeper.study_name == "imgcls"
    assert isinstance(sweeper.sampler, optuna.samplers.TPESampler)
    space, fixed, _ = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True) and not fixed
    assert space["data.batch_size"] == CategoricalDistribution([16, 32, 64])

    monkeypatch.setenv("IMGCLS_OPTUNA_STORAGE", "postgresql://u:p@db/optuna")
    monkeypatch.setenv("IMGCLS_OPTUNA_STUDY", "lr_bs")
    shared = plugin(compose_train("hparams_search=optuna_shared").hydra.sweeper).sweeper
    assert (shared.storage, shared.study_name) == ("postgresql://u:p@db/optuna", "lr_bs")
    assert shared.direction == "maximize"
    assert compose_train("hparams_search=optuna_shared").hydra.sweeper.sampler.seed is None
    monkeypatch.delenv("IMGCLS_OPTUNA_STORAGE")
    with pytest.raises(Exception, match="IMGCLS_OPTUNA_STORAGE"):
        plugin(compose_train("hparams_search=optuna_shared").hydra.sweeper)


def test_launcher_options_compose_and_build():
    parallel = plugin(compose_train("hydra/launcher=parallel", "hydra.sweep.dir=x").hydra.launcher)
    assert type(parallel).__name__ == "ParallelLauncher" and parallel.n_slots() == 2
    cfg = compose_train("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=s")
    slurm = plugin(cfg.hydra.launcher)
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
    code = f"from imgcls.sweeps.gpu_slots import claim_gpu; from pathlib import Path; print(claim_gpu(3, Path({str(tmp_path)!r}))[0])"
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
    from imgcls.config.naming import run_label

    # an Optuna suggestion is cut to 6 significant digits in the name; config.yaml keeps it whole
    assert run_label("optimizer.lr=0.0013292918943162175,data.batch_size=4") == "batch_size-4_lr-0.00132929"
    assert run_label("optimizer.weight_decay=2.9380279387035334e-05") == "weight_decay-2.93803e-05"
    for kept in ["lr=0.01", "lr=1e-05", "lr=-1", "seed=123456789012", "name=abc.defghijklmnop"]:
        assert run_label(kept) == kept.replace("=", "-")


def test_a_study_an_older_optuna_wrote_is_refused_with_the_upgrade_command(tmp_path: Path, capsys):
    import sqlite3

    from hydra_plugins.imgcls_sweepers import _optuna

    db, storage = tmp_path / "optuna.db", f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="imgcls", storage=storage)
    with sqlite3.connect(db) as con:  # the schema version optuna 2.10 (imgcls's sweeps before Hydra 1.4) left
        con.execute("UPDATE alembic_version SET version_num = 'v2.6.0.a'")
    with pytest.raises(SystemExit) as exit_:
        _optuna._open_study("imgcls", storage, None, ["maximize"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: hydra.sweeper.storage={storage}: The runtime optuna version")
    assert f"`optuna storage upgrade --storage {storage}`" in err
