"""run.json, the one record of a run (imgcls.run_record): written atomically by the recorder, read by
every view, old run directories read through the legacy reader, and one definition of best."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, make_tree

from imgcls.run_record import RUN_FILE, Best, best_of, read_metrics, read_run
from imgcls.sweeps.summary import read_job
from imgcls.training import recorder as recorder_module
from imgcls.training.recorder import RunRecorder, summary_text
from imgcls.training.resume import final_reports_due

CONFIG = {"trainer": {"epochs": 3, "ema_decay": 0.9}, "optimizer": {"lr": 0.01}}
SETUP = {"device": "cpu (2 threads)", "model": "resnet18, 11,000 parameters", "data": "3 classes"}
# three epochs where the EMA's weights score better than the raw ones at epochs 1 and 3
ACCS = [(0.5, 0.55), (0.75, 0.7), (0.6, 0.8)]


def epoch_row(epoch: int, acc: float, ema: float) -> dict[str, float]:
    return {
        "epoch": epoch, "train/loss": 1.0 / epoch, "train/acc": 0.4 + 0.1 * epoch, "train/time_s": 2.0,
        "train/images_per_s": 12.0, "val/loss": 0.9 / epoch, "val/acc": acc, "val/acc_ema": ema,
        "val/time_s": 0.5, "val/images_per_s": 24.0, "val/acc_best": 0.0, "lr": 0.01,
    }  # fmt: skip


# -- an old run directory, as the recorder wrote it before run.json (checked in: the fixture
# must not follow the code). Its best line names raw val/acc's epoch 2; best.pt held epoch 3's EMA.
OLD_SUMMARY = """\
imgcls training run
status:         {status}
run dir:        {run_dir}
started:        2026-12-07 18:41:05 UTC
ended:          2026-12-07 18:41:05 UTC
duration:       1:02:03
heartbeat:      2026-12-07 18:41:05 UTC (pid {pid} on {host})
epoch:          3 of 3
note:           the best weights predict one class

best val acc:   0.7500 (75.00%) at epoch 2
final val acc:  0.6000 (60.00%)
final train acc: 0.7000 (70.00%)
final losses:   train 0.3333, val 0.3000
speed:          train 12.0 images/s (2.0 s/epoch), val 24.0 images/s
train acc (best weights): 0.8750 (87.50%)
val acc (best weights): 0.8000 (80.00%)
test acc (best weights): 0.7500 (75.00%)

device:         cpu (2 threads)
model:          resnet18, 11,000 parameters
data:           3 classes; train 24, val 12, test 12 images

error:
  Traceback (most recent call last):
    ValueError: boom

config:
  trainer:
    epochs: 3
    ema_decay: 0.9
  optimizer:
    lr: 0.01
"""
OLD_METRICS = """\
epoch,train/loss,train/acc,train/time_s,train/images_per_s,val/loss,val/acc,val/acc_ema,val/time_s,val/images_per_s,val/acc_best,lr
1,1.0,0.5,2.0,12.0,0.9,0.5,0.55,0.5,24.0,0.55,0.01
2,0.5,0.6000000000000001,2.0,12.0,0.45,0.75,0.7,0.5,24.0,0.75,0.01
3,0.3333333333333333,0.7000000000000001,2.0,12.0,0.3,0.6,0.8,0.5,24.0,0.8,0.01
"""


def old_run(folder: Path, status: str = "completed", pid: int = 1, host: str = "elsewhere") -> Path:
    folder.mkdir(parents=True)
    text = OLD_SUMMARY.format(status=status, run_dir=folder, pid=pid, host=host)
    (folder / "summary.txt").write_text(text)
    (folder / "metrics.csv").write_text(OLD_METRICS)
    (folder / "weights").mkdir()
    (folder / "weights" / "last.pt").write_bytes(b"a checkpoint")
    return folder


def dead_pid() -> int:
    """A pid that no process holds now: a child's, once it has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def no_pages(monkeypatch):
    """The recorder's pages (matplotlib) are the page tests' business, not these."""
    monkeypatch.setattr(recorder_module, "write_page", lambda *a, **k: None)


def test_the_recorder_writes_run_json_first_then_the_summary_from_it(tmp_path, no_pages, monkeypatch):
    written: list[str] = []
    real = recorder_module.atomic_write

    def spy(path, data, **kw):
        written.append(Path(path).name)
        return real(path, data, **kw)

    monkeypatch.setattr(recorder_module, "atomic_write", spy)
    recorder = RunRecorder(tmp_path, CONFIG, 3, info=dict(SETUP))
    start = json.loads((tmp_path / RUN_FILE).read_text())
    assert written == [RUN_FILE, "summary.txt"], "the record first, through the one atomic writer"
    assert (start["schema"], start["status"], start["epochs_done"], start["epochs_planned"]) == (1, "running", 0, 3)  # fmt: skip
    assert (start["pid"], start["host"], start["best"], start["final"]) == (os.getpid(), socket.gethostname(), None, {})  # fmt: skip
    history = []
    for epoch, (acc, ema) in enumerate(ACCS, 1):
        history.append(epoch_row(epoch, acc, ema))
        recorder.log_epoch(history[-1], history)
        record = read_run(tmp_path)
        assert record.epochs_done == epoch and record.last_epoch == history[-1]
        assert record.best == best_of(history)
    assert read_run(tmp_path).best == Best(3, 0.8, "val/acc_ema")
    recorder.startup(4.25)
    recorder.reporting()
    record = read_run(tmp_path)
    assert record.status == "reporting" and "resume=" in record.notes[-1]
    assert "status:         reporting" in (tmp_path / "summary.txt").read_text()
    final = {s: {"acc": a, "loss": 0.5} for s, a in (("train", 0.875), ("val", 0.8), ("test", 0.75))}
    recorder.finish("completed", final, note="stopped early")
    recorder.close()

    record = read_run(tmp_path)
    assert record.status == "completed" and record.ended and record.notes == ["stopped early"]
    assert record.final == final and record.setup["startup"].startswith("4.2 s from process start")
    assert record.durations["startup_s"] == 4.25 and record.durations["final_reports_s"] >= 0
    assert (record.durations["train_s"], record.durations["validation_s"]) == (6.0, 1.5)
    assert record.files["metrics"] == "metrics.csv" and read_metrics(tmp_path)[-1]["val/acc_ema"] == 0.8
    # summary.txt is a view: exactly the record rendered (its heartbeat line is the record's)
    summary = (tmp_path / "summary.txt").read_text()
    assert summary == summary_text(record, CONFIG)
    assert "best val acc:   0.8000 (80.00%) at epoch 3 (the EMA's weights: val/acc_ema)\n" in summary
    assert "val acc (best weights): 0.8000 (80.00%)\n" in summary and "\nconfig:\n  trainer:\n" in summary
    assert f"(pid {record.pid} on {record.host})" in summary and "epoch:          3 of 3\n" in summary


def test_without_ema_the_summary_reads_as_before_run_json(tmp_path: Path, no_pages):
    """Byte for byte the lines the recorder wrote before (times, pid and folder aside)."""
    recorder = RunRecorder(tmp_path, CONFIG, 3, info=dict(SETUP))
    history = []
    for epoch, (acc, _) in enumerate(ACCS, 1):
        history.append({k: v for k, v in epoch_row(epoch, acc, 0).items() if k != "val/acc_ema"})
        recorder.log_epoch(history[-1], history)
    recorder.finish("completed", {"val": {"acc": 0.75, "loss": 0.4}})
    recorder.close()
    lines = (tmp_path / "summary.txt").read_text().split("\n\n")[1]
    assert lines == (
        "best val acc:   0.7500 (75.00%) at epoch 2\n"
        "final val acc:  0.6000 (60.00%)\n"
        "final train acc: 0.7000 (70.00%)\n"
        "final losses:   train 0.3333, val 0.3000\n"
        "speed:          train 12.0 images/s (2.0 s/epoch), val 24.0 images/s\n"
        "val acc (best weights): 0.7500 (75.00%)"
    )


def test_an_old_run_directory_reads_as_a_record(tmp_path: Path):
    run = old_run(tmp_path / "old")
    record = read_run(run)
    assert record.legacy and record.status == "completed" and record.run_dir == str(run)
    assert (record.pid, record.host, record.started) == (1, "elsewhere", "2026-12-07T18:41:05")
    assert (record.epochs_done, record.epochs_planned, record.durations) == (3, 3, {"total_s": 3723.0})
    # best by the one definition, from metrics.csv: the epoch best.pt held, not the old best line's
    assert record.best == Best(3, 0.8, "val/acc_ema")
    assert record.final == {"train": {"acc": 0.875}, "val": {"acc": 0.8}, "test": {"acc": 0.75}}
    assert record.notes == ["the best weights predict one class"]
    assert record.setup == {"device": "cpu (2 threads)", "model": "resnet18, 11,000 parameters",
                            "data": "3 classes; train 24, val 12, test 12 images"}  # fmt: skip
    assert record.error == "Traceback (most recent call last):\n  ValueError: boom"
    assert record.last_epoch["val/loss"] == 0.3
    # the views that read it: resume's final-reports check, and the sweep leaderboard
    assert not final_reports_due(str(run / "weights" / "last.pt"))
    reporting = old_run(tmp_path / "reporting", status="reporting")
    assert final_reports_due(str(reporting / "weights" / "last.pt"))


def test_the_leaderboard_reads_old_and_new_jobs_alike(tmp_path: Path, no_pages):
    sweep = tmp_path / "sweep"
    old = old_run(sweep / "0_old", status="running", pid=dead_pid(), host=socket.gethostname())
    new = sweep / "1_new"
    new.mkdir()
    for job, lr in ((old, "0.1"), (new, "0.01")):
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}"]))
    recorder = RunRecorder(new, CONFIG, 3, info={})
    history = [epoch_row(1, 0.5, 0.6)]
    recorder.log_epoch(history[0], history)  # still running: this process is alive
    old_row, new_row = read_job(old), read_job(new)
    recorder.close()
    assert (old_row["status"], old_row["val/acc_best"], old_row["best_epoch"], old_row["epochs"]) == (
        "killed", 0.8, 3, "3/3")  # fmt: skip
    assert (new_row["status"], new_row["val/acc_best"], new_row["best_epoch"], new_row["epochs"]) == (
        "running", 0.6, 1, "1/3")  # fmt: skip
    (sweep / "2_died_in_setup" / ".hydra").mkdir(parents=True)  # Hydra ran it; it wrote no record
    assert read_job(sweep / "2_died_in_setup")["status"] == "failed"


def test_a_record_this_version_cannot_read_is_none_not_a_guess(tmp_path: Path):
    (tmp_path / RUN_FILE).write_text("{not json")
    assert read_run(tmp_path) is None
    (tmp_path / RUN_FILE).write_text(json.dumps({"schema": 2, "status": "completed", "new_key": 1}))
    assert read_run(tmp_path).status == "completed"  # keys it does not know are left out
    assert read_run(tmp_path / "nothing") is None


@pytest.mark.slow
def test_with_ema_every_view_names_the_same_best_epoch_and_score(tmp_path: Path, monkeypatch):
    """trainer.ema_decay=0.9, 4 epochs on the tiny tree, seed 2, one thread, lr 0.0125: the raw weights score best
    at epoch 3 (0.67), the better of the raw and the EMA's weights at epoch 1 (0.75). best.pt, run.json, summary.txt, the leaderboard, curves.png, MLflow's final
    metrics and the value train.run returns (the Optuna objective) name one epoch and one score."""
    from hydra import compose, initialize_config_dir

    from imgcls.cli import CONFIG_DIR
    from imgcls.pages.curves import described_epochs
    from imgcls.tracking import MlflowTracker
    from imgcls.train import run as train

    tree = make_tree(tmp_path / "tiny")
    job = tmp_path / "sweep" / "0_ema"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["trainer.ema_decay=0.9"]))
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=CONFIG_DIR):
        # one torch thread, as under pytest-xdist, so the numbers are the same however the suite runs
        cfg = compose("train", [*TINY, f"data.root={tree}", "trainer.epochs=4", "trainer.ema_decay=0.9",
                                "trainer.num_threads=1", "seed=2", "optimizer.lr=0.0125"])  # fmt: skip
    returned = train(cfg, job)

    rows = read_metrics(job)
    assert any(r["val/acc_ema"] != r["val/acc"] for r in rows), "the EMA and the raw weights never differed"
    # by hand: the better of the two accuracies per epoch, the first epoch that reached the highest
    scores = [max(r["val/acc"], r["val/acc_ema"]) for r in rows]
    epoch, score = scores.index(max(scores)) + 1, max(scores)
    raw = max(rows, key=lambda r: r["val/acc"])
    assert (raw["epoch"], raw["val/acc"]) != (epoch, score), "raw val/acc would name the same best"

    record = read_run(job)
    assert (record.best.epoch, record.best.score, record.best.metric) == (epoch, score, "val/acc_ema")
    assert returned == score
    best = torch.load(job / "weights" / "best.pt", weights_only=True)
    assert (best["epoch"], best["best_epoch"], best["best_acc"]) == (epoch, epoch, score)
    assert best["best_source"] == "ema"
    summary = (job / "summary.txt").read_text()
    assert re.search(rf"^best val acc:   {score:.4f} \(.*\) at epoch {epoch} \(the EMA's", summary, re.M)
    row = read_job(job)
    assert (row["val/acc_best"], row["best_epoch"], row["status"]) == (score, epoch, "completed")
    from PIL import Image

    assert described_epochs(job / "plots" / "curves.png") == [1, 2, 3, 4]
    with Image.open(job / "plots" / "curves.png") as image:
        assert image.text["Description"].endswith(f"best epoch {epoch}")
    for split in ("train", "val", "test"):  # the record points at each split's JSON report
        report = json.loads((job / record.files["reports"][split]["json"]).read_text())
        assert report["accuracy"] == pytest.approx(record.final[split]["acc"])

    class Client:  # MLflow's side is test_tracking's: here, what the tracker reads from the record
        def log_batch(self, run_id, metrics):
            logged.extend(metrics)

    logged = []
    tracker = MlflowTracker({}, job)
    tracker.run_id, tracker.client = "run", Client()
    tracker.log_final(record)
    assert {m.key: m.value for m in logged}["best_epoch"] == epoch
    assert {m.key: m.value for m in logged}["val/acc_best_weights"] == record.final["val"]["acc"]
