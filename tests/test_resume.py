"""Resume exactly; survive Ctrl-C, SIGTERM and kill -9; refuse broken checkpoints. Real CLI runs."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, cli_here, make_tree, run_dirs

EXACT = [
    "data=imagefolder", "transforms=digits", TINY_MODEL, "data.batch_size=4", "trainer.epochs=3", "device=cpu",
    "deterministic=true", "seed=11", "trainer.log_every_n_steps=1",
    "trainer.bn_recalibration.batches=5",  # on by default; 5 of the 12 batches, drawn from (seed, epoch)
]  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    # 3 classes x 16 train images: 12 steps per epoch, random affine augmentation, shuffling
    return make_tree(tmp_path_factory.mktemp("resume") / "tree", counts={"train": 16, "val": 4, "test": 2})


def metrics(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-time columns, which no two runs share."""
    with open(run / "metrics.csv") as f:
        return [
            {k: v for k, v in r.items() if "time_s" not in k and "per_s" not in k} for r in csv.DictReader(f)
        ]


def assert_same_state(a: Path, b: Path) -> None:
    sa = torch.load(a / "weights" / "last.pt", weights_only=True)
    sb = torch.load(b / "weights" / "last.pt", weights_only=True)
    assert sa["epoch"] == sb["epoch"]
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for i, state in sa["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], sb["optimizer"]["state"][i]["momentum_buffer"])
    assert sa["scheduler"] == sb["scheduler"]
    assert metrics(a) == metrics(b)
    assert [{k: v for k, v in h.items() if "time" not in k and "per_s" not in k} for h in sa["history"]] == [
        {k: v for k, v in h.items() if "time" not in k and "per_s" not in k} for h in sb["history"]
    ]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args], cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def signal_when(proc: subprocess.Popen, marker: str, signum: int) -> tuple[int, str]:
    """Send `signum` once stderr shows `marker`; return the exit code and all of stderr."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            proc.send_signal(signum)
            time.sleep(0.05)
            proc.send_signal(signum)  # a second one, impatient, while it saves: still nothing breaks
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + err


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs, with 0 and 2 loader workers."""
    runs = {}
    for workers in (0, 2):
        cwd = tmp_path_factory.mktemp(f"ref{workers}")
        result = cli_here("imgcls.train", *EXACT, f"data.root={tree}", f"data.num_workers={workers}", cwd=cwd)
        assert result.returncode == 0, result.stderr[-2000:]
        (runs[workers],) = run_dirs(cwd)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "signum", "code"), [(0, signal.SIGINT, 130), (2, signal.SIGTERM, 143)])
def test_signal_stops_mid_epoch_and_resume_is_bit_exact(tree, reference, tmp_path, workers, signum, code):
    args = [*EXACT, f"data.root={tree}", f"data.num_workers={workers}"]
    rc, err = signal_when(start(args, tmp_path), "epoch 2/3 5/12", signum)
    assert rc == code, err[-2000:]
    (run,) = run_dirs(tmp_path)
    name = signal.Signals(signum).name
    summary = (run / "summary.txt").read_text()
    assert "status:         interrupted" in summary
    assert f"{name} during epoch 2, after step " in summary
    last = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and 5 <= last["step"] < 12, "stopped at a step boundary inside epoch 2"
    assert last["partial"]["seen"] == 4 * last["step"]
    assert len(metrics(run)) == 1
    assert not list((run / "weights").glob(".*tmp*"))

    result = cli_here(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", f"data.num_workers={workers}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert run_dirs(tmp_path) == [run], "a resumed run continues in its own directory"
    assert f"resuming {run / 'weights' / 'last.pt'}: epoch 1 done, step {last['step']}" in result.stderr
    assert "status:         completed" in (run / "summary.txt").read_text()
    assert_same_state(run, reference[workers])
    log = (run / "logs" / "train.log").read_text()
    assert log.count("epoch 1/3  train loss") == 1 and "epoch 3/3  train loss" in log  # the log carries on
    assert log.count("BatchNorm recalibrated") == 3, "before each validation, the resumed epochs too"
    assert (run / ".hydra" / "overrides.yaml").read_text().count("num_workers") == 1  # original record kept
    assert len(list((run / ".hydra").glob("resume-*"))) == 1


def wait_for_line(proc: subprocess.Popen, marker: str) -> str:
    """Read stderr until a line holds `marker` and return it; "" when the process ended first."""
    for line in proc.stderr:
        if marker in line:
            return line
    return ""


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_until_done(tree, reference, tmp_path):
    rng = random.Random(7)
    proc = start([*EXACT, f"data.root={tree}", "data.num_workers=0"], tmp_path)
    # before the first epoch ends there is nothing to resume: the first kill comes after it
    assert wait_for_line(proc, "epoch 1/3  train loss")
    (run,) = run_dirs(tmp_path)
    last = run / "weights" / "last.pt"
    kills = 0
    for _ in range(3):
        step = wait_for_line(proc, "/12 loss")  # a training step: the process is mid-epoch
        if not step or "epoch 3/3" in step:
            break  # a kill past the last epoch's checkpoint leaves a finished run: nothing to resume
        # anywhere: mid-step, validation, a checkpoint save; at most 0.5 s, so never past epoch 3's
        # end (TINY_MODEL's epoch here is about 1 s; 1.5 s once reached the final reports)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.communicate()
        kills += 1
        torch.load(last, weights_only=True)  # every last.pt we see loads
        summary = (run / "summary.txt").read_text()
        assert "status:         running" in summary and f"(pid {proc.pid} on " in summary  # stale, and whose
        proc = start([f"resume={last}", "data.num_workers=0"], tmp_path)
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert kills >= 1
    assert run_dirs(tmp_path) == [run]
    assert not list((run / "weights").glob(".*tmp*"))
    assert_same_state(run, reference[0])


@pytest.mark.slow
def test_epochs_can_be_extended_and_other_overrides_are_refused(tree, reference, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference[0], run)
    last = run / "weights" / "last.pt"
    before = (run / "summary.txt").read_text()
    refused = cli_here(
        "imgcls.train", f"resume={last}", "model.name=resnet34", "optimizer.lr=0.1", cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "model.name=resnet34, optimizer.lr=0.1 would change the saved run" in refused.stderr
    done = cli_here("imgcls.train", f"resume={last}", cwd=tmp_path)
    assert done.returncode == 2 and "already finished 3 of 3 epochs" in done.stderr
    assert (run / "summary.txt").read_text() == before, "a refused resume leaves the run as it was"

    extended = cli_here("imgcls.train", f"resume={last}", "trainer.epochs=4", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr[-2000:]
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 4 and len(metrics(run)) == 4 and metrics(run)[:3] == metrics(reference[0])
    assert "epoch:          4 of 4" in (run / "summary.txt").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2, 3, 4], "the curves continue"


@pytest.mark.slow
def test_cosine_horizon_is_rebuilt_with_a_warning(tree, tmp_path):
    first = cli_here(
        "imgcls.train", *EXACT, f"data.root={tree}", "scheduler=cosine", "trainer.epochs=1", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    result = cli_here(
        "imgcls.train", f"resume={run / 'weights' / 'last.pt'}", "trainer.epochs=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the scheduler's horizon is rebuilt for the new trainer.epochs (epochs 1 -> 2)" in result.stderr
    assert torch.load(run / "weights" / "last.pt", weights_only=True)["scheduler"]["epochs"] == 2


@pytest.mark.slow
def test_broken_checkpoints_are_clear_errors_never_a_fresh_start(tree, reference, tmp_path):
    good = (reference[0] / "weights" / "last.pt").read_bytes()
    cases = {
        "truncated.pt": (good[: len(good) // 2], "corrupt or truncated"),
        "flipped.pt": (good[: len(good) // 2] + bytes([good[len(good) // 2] ^ 0x08]) + good[len(good) // 2 + 1 :],
                       "fails its CRC check"),
    }  # fmt: skip
    for name, (content, message) in cases.items():
        path = tmp_path / "weights" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        result = cli_here("imgcls.train", f"resume={path}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"checkpoint {path} is" in result.stderr and message in result.stderr
        assert not list(tmp_path.glob("outputs/*/*/weights")), "nothing trained"
    missing = cli_here("imgcls.train", f"resume={tmp_path / 'nope.pt'}", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "epoch": 1, "x": Evil()}, path)
    result = cli_here("imgcls.train", f"resume={path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "refusing to load it (weights_only=True)" in result.stderr
    assert not marker.exists()


def test_non_finite_loss_fails_with_finite_checkpoints(tree, tmp_path):
    result = cli_here(
        "imgcls.train",
        *EXACT,
        f"data.root={tree}",
        "optimizer.lr=1e12",
        "optimizer.weight_decay=0",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the optimizer step was not taken" in result.stderr
    assert "last.pt holds the weights before that step" in result.stderr
    (run,) = run_dirs(tmp_path)
    summary = (run / "summary.txt").read_text()
    assert "status:         failed" in summary and "NonFiniteLossError" in summary
    for name in ("last.pt", "best.pt"):
        path = run / "weights" / name
        if path.exists():
            state = torch.load(path, weights_only=True)
            assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert (run / "weights" / "last.pt").exists()
