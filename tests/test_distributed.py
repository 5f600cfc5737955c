"""torchrun with 2 CPU processes (gloo): one run directory, reduced metrics, portable checkpoints."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, make_tree, run_dirs
from test_resume import assert_same_state, metrics

ARGS = [
    "data=imagefolder", "transforms=digits", TINY_MODEL, "data.batch_size=4", "device=cpu", "deterministic=true",
    "seed=5", "data.num_workers=0", "trainer.log_every_n_steps=1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path, nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "imgcls.train", *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("ddp") / "tree", counts={"train": 8, "val": 5, "test": 3})


@pytest.fixture(scope="module")
def ddp_run(tree, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ddp_run")
    rc, out = finish(torchrun(*ARGS, f"data.root={tree}", "trainer.epochs=3", cwd=cwd))
    assert rc == 0, out[-3000:]
    (run,) = run_dirs(cwd)
    return run


@pytest.mark.slow
def test_two_processes_write_one_run_directory(ddp_run: Path):
    cwd = ddp_run.parents[2]
    assert run_dirs(cwd) == [ddp_run]
    summary = (ddp_run / "summary.txt").read_text()
    assert "status:         completed" in summary
    assert (
        # SGD's rule: the rate for the batch per optimizer step, both processes' (conf/optimizer/sgd.yaml)
        "4 per process x 2 process(es) x 1 accumulated = 8 per optimizer step; optimizer.lr 0.00625 = 0.2 x 8 / 256 "
        "(the rule, linear in the batch per optimizer step"
        in summary
    )
    assert len(list((ddp_run / "tensorboard").glob("events.*"))) == 1, "rank 0 alone writes TensorBoard"
    assert "rank 1" not in (ddp_run / "logs" / "train.log").read_text()
    rows = metrics(ddp_run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    state = torch.load(ddp_run / "weights" / "last.pt", weights_only=True)
    assert state["world_size"] == 2
    assert not any(k.startswith("module.") for k in state["model"]), "no DDP prefix in checkpoints"


@pytest.mark.slow
def test_validation_equals_one_process_evaluating_the_checkpoint(ddp_run: Path, tree: Path):
    from imgcls.config import build as b
    from imgcls.data.loaders import make_loader
    from imgcls.training.engine import Placement, evaluate

    best = torch.load(ddp_run / "weights" / "best.pt", weights_only=True)
    config = best["config"]
    data = b.build_data(config["data"])
    record = data.scan()
    pipelines, normalize = b.build_transforms(config["transforms"])
    model = b.build_model(config["model"], num_classes=len(record.class_names))
    model.load_state_dict(best["model"])
    model = model.to(memory_format=torch.channels_last)
    loss_fn = b.build_loss(config["loss"])
    loader = make_loader(data, record, "val", pipelines["val"], train=False)
    single, targets, preds = evaluate(
        model, loader, loss_fn, Placement(torch.device("cpu"), normalize, channels_last=True)
    )
    assert len(targets) == 15  # every val image once: 5 per class, nothing padded or dropped
    assert single["val/acc"] == best["best_acc"] == best["history"][best["epoch"] - 1]["val/acc"]
    assert single["val/loss"] == pytest.approx(best["history"][best["epoch"] - 1]["val/loss"], rel=1e-5)


@pytest.mark.slow
def test_recalibrated_statistics_equal_one_process_over_both_ranks_batches(ddp_run: Path):
    """Each rank recalibrates on its own share; the checkpoint holds their sums added, which is
    what one process gets from all the ranks' batches together."""
    from imgcls.config import build as b
    from imgcls.data.sampling import set_epoch
    from imgcls.training.batchnorm import batchnorm_layers, build_recalibration, recalibrate
    from imgcls.training.engine import Placement

    last = torch.load(ddp_run / "weights" / "last.pt", weights_only=True)
    config = last["config"]
    assert config["trainer"]["bn_recalibration"]["enabled"], "on by default"
    data = b.build_data(config["data"])
    record = data.scan()
    pipelines, normalize = b.build_transforms(config["transforms"])
    model = b.build_model(config["model"], num_classes=len(record.class_names))
    model.load_state_dict(last["model"])
    model = model.to(memory_format=torch.channels_last)
    batches = []
    for rank in (0, 1):
        shard = {"seed": config["seed"], "pin_memory": False, "rank": rank, "world": 2}
        place = Placement(torch.device("cpu"), normalize, channels_last=True)
        recal = build_recalibration(config["trainer"]["bn_recalibration"], data, record, pipelines, shard, place,
                                    epoch_batches=3)  # fmt: skip
        set_epoch(recal.loader, last["epoch"])
        batches += list(recal.loader)
    # each rank trains 3 batches of 4 an epoch (24 images over 2 ranks); max_share 0.5 keeps 2
    assert len(batches) == 2 * 2, "2 batches of 4 per rank, shuffled"
    from imgcls.data.sampling import mix

    recalibrate(
        model,
        batches,
        torch.device("cpu"),
        normalize,
        channels_last=True,
        seed=mix(config["seed"], last["epoch"], 3),
    )
    names = dict(model.named_modules())
    for name, layer in names.items():
        if layer in batchnorm_layers(model):
            torch.testing.assert_close(
                layer.running_mean, last["model"][f"{name}.running_mean"], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                layer.running_var, last["model"][f"{name}.running_var"], rtol=1e-4, atol=1e-5
            )
    assert "BatchNorm recalibrated" in (ddp_run / "logs" / "train.log").read_text()


@pytest.mark.slow
def test_ddp_checkpoint_resumes_in_one_process(ddp_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(ddp_run, run)
    result = subprocess.run(
        [sys.executable, "-m", "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(run / "weights" / "last.pt", weights_only=True)["epoch"] == 4
    assert "1 process(es)" in (run / "summary.txt").read_text()


def rank_pid(agent: subprocess.Popen, rank: int) -> int:
    """The pid of the worker torchrun started for `rank`."""
    for _ in range(600):
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        for pid in children:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError("no worker found")


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_and_resume_under_ddp_is_exact(ddp_run, tree, tmp_path):
    agent = torchrun(
        *ARGS, f"data.root={tree}", "trainer.epochs=3", "trainer.log_all_ranks=true", cwd=tmp_path
    )
    pid = rank_pid(agent, 1)
    for line in agent.stderr:
        if "[rank 1]" in line and "epoch 2/3 1/3" in line:
            os.kill(pid, signal.SIGTERM)
            break
    rc, out = finish(agent)
    assert rc != 0
    (run,) = run_dirs(tmp_path)
    summary = (run / "summary.txt").read_text()
    assert "status:         interrupted" in summary and "SIGTERM during epoch 2, after step " in summary
    last = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["step"] in (1, 2) and len(last["partial_ranks"]) == 2

    rc, out = finish(torchrun(f"resume={run / 'weights' / 'last.pt'}", cwd=tmp_path))
    assert rc == 0, out[-3000:]
    assert run_dirs(tmp_path) == [run]
    assert_same_state(run, ddp_run)


@pytest.mark.slow
def test_sync_batchnorm_on_cpu_is_a_clear_error(tree, tmp_path):
    rc, out = finish(
        torchrun(*ARGS, f"data.root={tree}", "trainer.epochs=1", "trainer.sync_batchnorm=true", cwd=tmp_path)
    )
    assert rc != 0
    assert "error: trainer.sync_batchnorm=true needs CUDA devices" in out
    (run,) = run_dirs(tmp_path)
    assert "status:         failed" in (run / "summary.txt").read_text()


@pytest.mark.slow
def test_bad_data_stops_every_rank_with_a_clear_message(tmp_path):
    rc, out = finish(torchrun(*ARGS, f"data.root={tmp_path / 'nope'}", "trainer.epochs=1", cwd=tmp_path))
    assert rc != 0
    assert f"data.root='{tmp_path / 'nope'}' is not a folder" in out
    assert "error: rank 0 stopped: DataError: data.root=" in out  # rank 1 heard it from rank 0
