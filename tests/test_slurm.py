"""Sweeps on a real SLURM cluster (tools/slurm_cluster.sh): a grid through hydra/launcher=slurm_cpu, and the
accounting facts the sweep's fault handling relies on, as submitit reads them."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import pytest
from conftest import TINY, cli_here, make_tree
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from imgcls.cli import CONFIG_DIR

# one epoch per job, one torch thread: the two jobs share the node's two cores
SLURM_TINY = [o for o in TINY if not o.startswith("trainer.epochs=")] + [
    "trainer.epochs=1",
    "trainer.num_threads=1",
]


def test_slurm_cpu_launcher_asks_for_no_gpu():
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("train", ["hydra/launcher=slurm_cpu", "hydra.sweep.dir=s"], return_hydra_config=True)
    node = cfg.hydra.launcher
    launcher = instantiate(node, _recursive_=False, _execution_whitelist_=node._target_)
    assert type(launcher).__name__ == "SlurmLauncher"
    # submitit writes no sbatch line for a None: no --gpus-per-node, no --gres
    assert launcher.params["gpus_per_node"] is None and launcher.params["gres"] is None
    assert launcher.params["cpus_per_task"] == 1 and launcher.params["mem_gb"] == 2


def _wait(what: str, check, timeout: float = 120, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_grid_sweep_runs_on_slurm(slurm_cluster, tmp_path: Path):
    # tmp_path is readable by the cluster's daemons and jobs (root); the jobs start in it, as sbatch does
    tree = make_tree(tmp_path / "tiny")
    args = [
        "-m",
        "hydra/launcher=slurm_cpu",
        f"hydra.launcher.partition={slurm_cluster.partition}",
        *SLURM_TINY,
        f"data.root={tree}",
        "optimizer.lr=0.01,0.001",
    ]
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    jobs = sorted(p for p in sweep.iterdir() if re.match(r"\d+_", p.name))
    assert len(jobs) == 2
    for job in jobs:
        assert re.search(r"^status:\s*completed$", (job / "summary.txt").read_text(), re.M), job
        assert (job / "weights" / "last.pt").is_file()
    with open(sweep / "sweep_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["optimizer.lr"] for r in rows) == ["0.001", "0.01"]
    assert [r["status"] for r in rows] == ["completed", "completed"]

    # the jobs ran as SLURM jobs: submitit's folders per job, each COMPLETED in the accounting
    submitted = sorted((sweep / ".submitit").glob("*/*_submission.sh"))
    assert submitted, sorted((sweep / ".submitit").rglob("*"))
    ids = sorted({p.parent.name for p in (sweep / ".submitit").glob("*/*_result.pkl")})
    assert len(ids) == 2, sorted((sweep / ".submitit").rglob("*"))
    for job_id in ids:  # sacct records the end a moment after the job wrote its result
        _wait(
            f"job {job_id} COMPLETED", lambda j=job_id: slurm_cluster.job_state(j) == "COMPLETED", timeout=30
        )
    # and asked for what a CPU partition gives: no GPU flag reached sbatch
    sbatch = submitted[0].read_text()
    assert f"#SBATCH --partition={slurm_cluster.partition}" in sbatch
    assert "#SBATCH --cpus-per-task=1" in sbatch
    assert not re.search(r"^#SBATCH --(gpus|gres)", sbatch, re.M), sbatch


@pytest.mark.slurm
@pytest.mark.slow
def test_a_cancelled_job_reads_cancelled_through_submitit(slurm_cluster, tmp_path: Path):
    """What the sweep's fault handling builds on: a job scancel'ed while it runs is CANCELLED in `sacct`,
    submitit's job.state says so, and its result() raises UncompletedJobError naming that state."""
    import submitit
    from submitit.core.utils import UncompletedJobError

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        slurm_partition=slurm_cluster.partition,
        timeout_min=5,
        cpus_per_task=1,
        mem_gb=1,
        name="imgcls-cancel",
    )
    job = executor.submit(time.sleep, 600)
    _wait(f"job {job.job_id} running", lambda: job.get_info(mode="force").get("State") == "RUNNING")

    cancel = slurm_cluster.run("scancel", job.job_id)
    assert cancel.returncode == 0, cancel.stderr
    # SLURM sends SIGTERM, then SIGKILL KillWait (10 s) later; sacct has the end a moment after
    _wait(f"job {job.job_id} done", lambda: job.done(force_check=True), timeout=60)
    assert job.state.startswith("CANCELLED"), job.state
    assert slurm_cluster.job_state(job.job_id).startswith("CANCELLED")
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        job.result()
    # nothing of it runs on: squeue has forgotten it
    queue = slurm_cluster.run("squeue", "-h", "-j", job.job_id, "-o", "%T")
    assert queue.stdout.strip() in ("", "CANCELLED", "COMPLETING"), queue.stdout
