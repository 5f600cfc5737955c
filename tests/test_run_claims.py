"""One writer per run: a resume claims its run as a new run does, a second one is refused naming the
process that holds it, and a claim left by a dead process is taken over. Final reports that a kill -9
cut short are completed by resume=, without training again. Real processes where only they show it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli, cli_here, make_tree, run_dirs

# `python -m imgcls.train ...` that kills itself with SIGKILL the moment its console shows a marker
# (argv[1]): a kill -9 at an exact point, which a signal sent from outside can only approximate
KILL_AT = """
import os, runpy, signal, sys

marker = sys.argv.pop(1)


class KillAt:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        if marker in text:
            self.stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


sys.stderr = KillAt(sys.stderr)
runpy.run_module("imgcls.train", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("claims") / "tree")


@pytest.fixture(scope="module")
def one_epoch(tree, tmp_path_factory) -> Path:
    """A finished one-epoch run, copied by the tests that resume it."""
    cwd = tmp_path_factory.mktemp("one-epoch")
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", "trainer.epochs=1", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(cwd)
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args], cwd=cwd, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_second_resume_is_refused_then_a_dead_ones_claim_taken_over(one_epoch, tmp_path):
    run = copy_of(one_epoch, tmp_path)
    last = run / "weights" / "last.pt"
    first = start([f"resume={last}", "trainer.epochs=500", "trainer.log_every_n_steps=1"], tmp_path)
    try:
        for line in first.stderr:  # until the first one trains: it holds the run
            if "epoch 2/500 " in line and " loss " in line:
                break
        else:
            pytest.fail(f"the first resume ended: {first.communicate()}")
        second = cli("imgcls.train", f"resume={last}", "trainer.epochs=3", cwd=tmp_path, timeout=120)
        assert first.poll() is None, "the first one still runs"
    finally:
        first.kill()
        first.communicate()
    assert second.returncode == 2, second.stderr[-2000:]
    host = socket.gethostname()
    assert f"error: run {run} is being written by pid {first.pid} on host {host} since " in second.stderr
    assert "wait for it to end or stop it" in second.stderr and "Traceback" not in second.stderr
    log = (run / "logs" / "train.log").read_text()
    assert log.count("resuming ") == 1 and "epoch 3/3" not in log, "the second trained nothing"
    assert len(list((run / ".hydra").glob("resume-*"))) == 1, "nor left a record"

    # the first died by kill -9 holding the claim: the kernel dropped its lock, the next resume goes on
    assert f"claimed by pid {first.pid} on {host}" in (run / ".imgcls-run").read_text()
    epoch = torch.load(last, weights_only=True)["epoch"]
    third = cli_here("imgcls.train", f"resume={last}", f"trainer.epochs={epoch + 1}", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert (
        f"taking over the claim of a process that ended without releasing it (claimed by pid {first.pid}"
        in (third.stderr)
    )
    assert "status:         completed" in (run / "summary.txt").read_text()
    assert (run / ".imgcls-run").read_text().startswith(f"released by pid {os.getpid()} on {host}")


def test_a_stale_claim_is_taken_over_and_a_held_one_refused(tmp_path):
    from imgcls.config.naming import (
        CLAIM_FILE,
        RunDirBusy,
        RunDirTaken,
        claim_run_dir,
        hold_run_dir,
        release_run_dir,
    )

    stale = f"claimed by pid {dead_pid()} on {socket.gethostname()} at 2024-01-01 00:00:00\n"
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / CLAIM_FILE).write_text(stale)  # its process died: no lock is held on the file
    hold_run_dir(run)
    assert (run / CLAIM_FILE).read_text().startswith(f"claimed by pid {os.getpid()} ")
    # held by a live process (another one): refused, and the file is left as it was
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(run / CLAIM_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    release_run_dir(run)
    try:
        assert holder.stdout.readline() == "held\n"
        before = (run / CLAIM_FILE).read_text()
        with pytest.raises(RunDirBusy, match=f"run {run} is being written by another process"):
            hold_run_dir(run)
        assert (run / CLAIM_FILE).read_text() == before
    finally:
        holder.kill()
        holder.wait()
    hold_run_dir(run)  # its holder is gone
    release_run_dir(run)

    # a new run's folder holding only the claim of a run that died before writing anything is free
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / CLAIM_FILE).write_text(stale)
    claim_run_dir(empty)
    assert (empty / CLAIM_FILE).read_text().startswith(f"claimed by pid {os.getpid()} ")
    with pytest.raises(RunDirTaken):  # and this process's own claim is not taken twice
        claim_run_dir(empty)
    release_run_dir(empty)


@pytest.mark.slow
def test_kill_9_during_the_final_reports_then_resume_writes_only_them(tree, tmp_path):
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, "train (best weights", *TINY, f"data.root={tree}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    last = run / "weights" / "last.pt"
    summary = (run / "summary.txt").read_text()
    assert "status:         reporting" in summary
    assert "the final reports (every split evaluated with best.pt) are being written" in summary
    assert f"python -m imgcls.train resume={last}` writes them without training again" in summary
    assert (run / "logs" / "classification_report_train.txt").is_file()
    assert not (run / "logs" / "classification_report_test.txt").exists()
    from imgcls.run_record import read_run
    from imgcls.sweeps.summary import job_status

    assert job_status(read_run(run)) == "reports incomplete"  # the sweep leaderboard's view

    metrics, weights = (run / "metrics.csv").read_bytes(), last.read_bytes()
    result = cli_here("imgcls.train", f"resume={last}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training finished before (epoch 2 of 2); only the final reports are written" in result.stderr
    summary = (run / "summary.txt").read_text()
    assert "status:         completed" in summary and "test acc (best weights):" in summary
    assert "being written" not in summary
    for split in ("train", "val", "test"):
        assert (run / "logs" / f"classification_report_{split}.txt").is_file()
        assert (run / "plots" / f"confusion_matrix_{split}.png").is_file()
    assert (run / "metrics.csv").read_bytes() == metrics and last.read_bytes() == weights, (
        "no epoch ran again"
    )
    assert (run / "logs" / "train.log").read_text().count("epoch 2/2  train loss") == 1
    again = cli_here("imgcls.train", f"resume={last}", cwd=tmp_path)  # now finished: refused as before
    assert again.returncode == 2 and "the run already finished 2 of 2 epochs" in again.stderr
