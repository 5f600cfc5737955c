"""What a run writes as it goes: its record run.json (imgcls.run_record) and the views rendered from
it, summary.txt, metrics.csv, TensorBoard scalars and (through imgcls.pages) curves.png and report.html."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from imgcls.files import WriteError, atomic_write, rewrite_in_place
from imgcls.names import csv_text
from imgcls.pages import write_page
from imgcls.pages.run_page import write_run_page
from imgcls.run_record import METRICS_FILE, RUN_FILE, SPLITS, SUMMARY_FILE, RunRecord, best_of, run_files
from imgcls.sweeps.pruning import RunPruned


def _now() -> datetime:
    return datetime.now().astimezone()


def _fmt_time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S %Z") if t else "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f} ({100 * x:.2f}%)"


@contextlib.contextmanager
def outcome(recorder):
    """Whatever ends a run early is said in its summary: pruned (by an Optuna sweep's pruner, the
    epoch and the reason in a note), interrupted (a signal, Ctrl-C) or failed (with the traceback,
    unless it is a user's error whose message says what to do)."""
    import traceback

    from loguru import logger

    from imgcls.errors import UserError
    from imgcls.training.signals import RunInterrupted

    try:
        yield
    except RunPruned as exc:  # the sweep's pruner stopped it: not an error, last.pt resumes it
        recorder.finish("pruned", note=str(exc))
        logger.info(str(exc))
        raise
    except RunInterrupted as exc:
        recorder.finish("interrupted", error=str(exc))
        logger.warning(f"interrupted: {exc}")
        raise
    except KeyboardInterrupt:
        recorder.finish("interrupted", error="KeyboardInterrupt (before or after training)")
        raise
    except Exception as exc:
        detail = "" if isinstance(exc, UserError) else f"\n\n{traceback.format_exc()}"
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}{detail}")
        raise


def record_refused_config(run_dir: Path, config: dict[str, Any], error: str) -> None:
    """A fresh run whose config was refused still says so in its summary, with the config as asked."""
    recorder = RunRecorder(run_dir, config, config["trainer"]["epochs"], info={})
    recorder.finish("failed", error=error)
    recorder.close()


def log_setup(info: dict[str, str]) -> None:
    """The setup lines of the summary, in the log too: what runs where, on what data."""
    from loguru import logger

    if "bn recalibration" in info:
        logger.info(info["bn recalibration"])
    logger.info(f"device {info['device']} | model {info['model']}")
    logger.info(f"data {info['data']}")
    for key in ("val split", "test split"):
        if key in info:
            logger.info(f"{key}: {info[key]}")


# the summary's note while the final reports are written: after a kill -9 it is the one left
REPORTING_NOTE = (
    "training finished; the final reports (every split evaluated with best.pt) are being written. If the "
    "process above is gone, `python -m imgcls.train resume={last}` writes them without training again"
)


class NullRecorder:
    """What ranks other than 0 get under torchrun: they train in step and write nothing (the best
    they return comes from the same history and the same best_of as rank 0's record)."""

    writer = None

    def __init__(self) -> None:
        self.info: dict[str, str] = {}
        self.started = _now()
        self.history: list[dict[str, float]] = []

    def log_epoch(self, metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        self.history = list(history)

    def startup(self, seconds: float) -> None:
        pass

    def heartbeat(self) -> None:
        pass

    def reporting(self) -> None:
        pass

    def finish(self, status: str, final=None, error: str | None = None, note: str | None = None) -> None:
        pass

    def add_note(self, note: str) -> None:
        pass

    def record(self) -> RunRecord:
        return RunRecord(best=best_of(self.history))

    def close(self) -> None:
        pass


class RunRecorder:
    """The one writer of a run's record (run.json, imgcls.run_record) and its views summary.txt,
    metrics.csv, the TensorBoard event file and (through imgcls.pages) curves.png and report.html.

    The record is rewritten atomically at the start, on a heartbeat, after every epoch and at the
    end, then summary.txt is rendered from it, so a reader never sees half a file and a run that
    died shows `running` with its last heartbeat (`reporting` when it died after training, in the
    final reports).
    """

    HEARTBEAT_S = 30.0  # how often a long epoch refreshes the record's heartbeat
    # how often the curves and report.html are redrawn after an epoch (always when the run ends):
    # a redraw costs about 0.5 s of matplotlib, nothing beside a real epoch, most of a tiny one
    PAGE_EVERY_S = 10.0

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        epochs: int,
        info: dict[str, str],
        history: list[dict[str, float]] | None = None,
        started: str | None = None,
    ):
        """`history` and `started` come from a checkpoint when a run resumes: its metrics file and
        record carry on, and TensorBoard drops any point recorded after the checkpoint."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.config = config
        self.epochs = epochs
        self.info = info  # device, model, data: fixed facts, the record's `setup`
        self.status = "running"
        self.started = datetime.fromisoformat(started) if started else _now()
        self.resumed = _now() if history is not None else None
        self.ended: datetime | None = None
        self.history: list[dict[str, float]] = list(history or [])
        self.final: dict[str, dict[str, float]] = {}  # split -> {acc, loss} with best.pt's weights
        self.error: str | None = None
        self.notes: list[str] = []  # early stopping, a model that predicts one class
        self.durations: dict[str, float] = {}  # startup_s, final_reports_s: measured, not summed
        self._reporting_since: float | None = None
        self._beat = 0.0
        self._page = time.monotonic()
        purge = len(self.history) + 1 if history is not None else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if history is not None:
            self.write_metrics()  # drop rows recorded after the checkpoint by the stopped process
        self.write()

    def startup(self, seconds: float) -> None:
        """The process's age at its first training step (the record's durations.startup_s)."""
        self.durations["startup_s"] = round(seconds, 3)
        self.info["startup"] = f"{seconds:.1f} s from process start to the first training step"

    def heartbeat(self) -> None:
        """Refresh the record's heartbeat, at most every HEARTBEAT_S seconds: a record that says
        `running` with an old heartbeat belongs to a process that died."""
        now = time.monotonic()
        if now - self._beat >= self.HEARTBEAT_S:
            self._beat = now
            self.write()

    # -- per epoch -------------------------------------------------------------------------
    def log_epoch(self, metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        self.history = list(history)
        self.write_metrics()
        self.write()
        if time.monotonic() - self._page >= self.PAGE_EVERY_S:
            self._page = time.monotonic()
            write_page(write_run_page, self.run_dir, self.history)  # curves.png and report.html

    def write_metrics(self) -> None:
        """metrics.csv: one row per epoch, every key a column (rewritten whole, so it stays rectangular)."""
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        # full precision: a script reading it gets the exact values; cells through csv_text, as every CSV
        atomic_write(self.run_dir / METRICS_FILE, csv_text(keys, self.history))

    # -- end -------------------------------------------------------------------------------
    def reporting(self) -> None:
        """Training is over; best.pt's final reports are being written. A record that a kill
        leaves saying so tells how to complete them (REPORTING_NOTE)."""
        self.status = "reporting"
        self._reporting_since = time.monotonic()
        self.write()

    def finish(
        self,
        status: str,
        final: dict[str, dict[str, float]] | None = None,
        error: str | None = None,
        note: str | None = None,
    ) -> None:
        """`final`: {split: {acc, loss}} of the final reports (evaluation.final.report_best_weights)."""
        if note:
            self.notes.append(note)
        if self._reporting_since is not None:
            self.durations["final_reports_s"] = round(time.monotonic() - self._reporting_since, 3)
        self.status = status
        self.final.update(final or {})
        self.error = error
        self.ended = _now()
        self.write()
        write_page(write_run_page, self.run_dir, self.history)
        self.writer.flush()

    def add_note(self, note: str) -> None:
        self.notes.append(note)

    def close(self) -> None:
        self.writer.close()

    # -- run.json, and summary.txt rendered from it ----------------------------------------
    def record(self) -> RunRecord:
        """The record as it stands now (imgcls.run_record lists every field)."""
        now = _now()
        last = dict(self.history[-1]) if self.history else {}
        notes = self.notes[:]
        if self.status == "reporting":
            notes.append(REPORTING_NOTE.format(last=self.run_dir / "weights" / "last.pt"))
        durations = {"total_s": round(((self.ended or now) - self.started).total_seconds(), 3)}
        for key, metric in SUMMED:
            if any(metric in row for row in self.history):
                durations[key] = round(sum(row.get(metric, 0.0) for row in self.history), 3)
        return RunRecord(
            status=self.status,
            run_dir=str(self.run_dir),
            pid=os.getpid(),
            host=socket.gethostname(),
            heartbeat=_iso(now),
            # which scheduler job runs the process: a sweep tells a killed job by it on any node
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_array_job_id=os.environ.get("SLURM_ARRAY_JOB_ID"),
            slurm_array_task_id=os.environ.get("SLURM_ARRAY_TASK_ID"),
            started=_iso(self.started),
            resumed=_iso(self.resumed),
            ended=_iso(self.ended),
            durations={**durations, **self.durations},
            epochs_done=int(last.get("epoch", 0)),
            epochs_planned=int(self.epochs),
            best=best_of(self.history),
            last_epoch=last,
            final={split: dict(values) for split, values in self.final.items()},
            error=self.error,
            notes=notes,
            setup=dict(self.info),
            files=run_files(self.run_dir, self.final),
        )

    def write(self) -> None:
        """run.json first, then summary.txt rendered from the same record."""
        record = self.record()
        self._publish(self.run_dir / RUN_FILE, record.to_json())
        self._publish(self.run_dir / SUMMARY_FILE, summary_text(record, self.config))

    def _publish(self, path: Path, text: str) -> None:
        try:
            atomic_write(path, text)
        except WriteError:
            # a full disk must not leave a failed run saying `running`: its last word goes in place
            if self.status == "running" or not path.is_file() or not rewrite_in_place(path, text):
                raise


# the record's durations that are sums of metrics.csv's per-epoch times
SUMMED = (("train_s", "train/time_s"), ("validation_s", "val/time_s"), ("bn_recal_s", "bn_recal/time_s"))


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t else None


def _shown_time(iso: str | None) -> str:
    """A record's ISO time as summary.txt shows it, in this machine's zone (its name, e.g. CET)."""
    return _fmt_time(datetime.fromisoformat(iso).astimezone()) if iso else "-"


def _slurm_text(record: RunRecord) -> str:
    array = record.slurm_array_job_id
    return record.slurm_job_id + (f" (array {array}_{record.slurm_array_task_id})" if array else "")


def summary_text(record: RunRecord, config: dict[str, Any]) -> str:
    """summary.txt: the record as text for people (and its config), the same lines as before run.json."""
    last, best = record.last_epoch, record.best
    total = timedelta(seconds=int(record.durations.get("total_s", 0)))
    ema = " (the EMA's weights: val/acc_ema)" if best and best.metric != "val/acc" else ""
    lines = [
        "imgcls training run",
        f"status:         {record.status}",
        f"run dir:        {record.run_dir}",
        f"started:        {_shown_time(record.started)}",
        *([f"resumed:        {_shown_time(record.resumed)}"] if record.resumed else []),
        f"ended:          {_shown_time(record.ended)}",
        f"duration:       {total}",
        f"heartbeat:      {_shown_time(record.heartbeat)} (pid {record.pid} on {record.host})",
        *([f"slurm job:      {_slurm_text(record)}"] if record.slurm_job_id else []),
        f"epoch:          {record.epochs_done} of {record.epochs_planned}",
        *(f"note:           {note}" for note in record.notes),
        "",
        f"best val acc:   {_pct(best.score if best else None)} at epoch {best.epoch if best else '-'}{ema}",
        f"final val acc:  {_pct(last.get('val/acc'))}",
        f"final train acc:{' '}{_pct(last.get('train/acc'))}",
        f"final losses:   train {last.get('train/loss', float('nan')):.4f}, val {last.get('val/loss', float('nan')):.4f}",
    ]
    if last.get("train/images_per_s"):
        lines.append(
            f"speed:          train {last['train/images_per_s']:.1f} images/s "
            f"({last['train/time_s']:.1f} s/epoch), val {last['val/images_per_s']:.1f} images/s"
        )
    if last.get("bn_recal/time_s") is not None and last.get("train/time_s"):
        lines.append(
            f"bn recal cost:  {last['bn_recal/time_s']:.1f} s before each validation "
            f"({last['bn_recal/time_s'] / last['train/time_s']:.0%} of a training epoch), "
            f"{int(last['bn_recal/images'])} images"
        )
    for split in SPLITS:
        if "acc" in record.final.get(split, {}):
            lines.append(f"{split} acc (best weights): {_pct(record.final[split]['acc'])}")
    lines.append("")
    lines += [f"{k + ':':<15} {v}" for k, v in record.setup.items()]
    if record.error:
        lines += ["", "error:", *("  " + line for line in record.error.rstrip().splitlines())]
    lines += [
        "",
        "config:",
        *("  " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines()),
    ]
    return "\n".join(lines) + "\n"
