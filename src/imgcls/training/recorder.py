"""What a run writes as it goes: summary.txt, metrics.csv, TensorBoard scalars, and (through
imgcls.pages) plots/curves.png and report.html."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from imgcls.files import WriteError, atomic_write, rewrite_in_place
from imgcls.names import csv_text
from imgcls.pages import write_page
from imgcls.pages.run_page import write_run_page


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def _now() -> datetime:
    return datetime.now().astimezone()


def _fmt_time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S %Z") if t else "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f} ({100 * x:.2f}%)"


@contextlib.contextmanager
def outcome(recorder):
    """Whatever ends a run early is said in its summary: interrupted (a signal, Ctrl-C) or failed
    (with the traceback, unless it is a user's error whose message says what to do)."""
    import traceback

    from loguru import logger

    from imgcls.errors import UserError
    from imgcls.training.signals import RunInterrupted

    try:
        yield
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
    if "val split" in info:
        logger.info(f"val split: {info['val split']}")


# the summary's note while the final reports are written: after a kill -9 it is the one left
REPORTING_NOTE = (
    "training finished; the final reports (every split evaluated with best.pt) are being written. If the "
    "process above is gone, `python -m imgcls.train resume={last}` writes them without training again"
)


class NullRecorder:
    """What ranks other than 0 get under torchrun: they train in step and write nothing."""

    writer = None

    def __init__(self) -> None:
        self.info: dict[str, str] = {}
        self.started = _now()

    def log_epoch(self, metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        pass

    def heartbeat(self) -> None:
        pass

    def reporting(self) -> None:
        pass

    def finish(self, status: str, final=None, error: str | None = None, note: str | None = None) -> None:
        pass

    def add_note(self, note: str) -> None:
        pass

    def close(self) -> None:
        pass


class RunRecorder:
    """Keeps summary.txt, metrics.csv and the TensorBoard event file current.

    The summary is rewritten atomically at the start, after every epoch and at the end, so a
    reader never sees half a file and a run that died shows `running` with its last heartbeat
    (`reporting` when it died after training, in the final reports).
    """

    HEARTBEAT_S = 30.0  # how often a long epoch refreshes the summary's heartbeat
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
        summary carry on, and TensorBoard drops any point recorded after the checkpoint."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.config = config
        self.epochs = epochs
        self.info = info  # device, model, data: fixed facts shown in the summary
        self.status = "running"
        self.started = datetime.fromisoformat(started) if started else _now()
        self.resumed = _now() if history is not None else None
        self.ended: datetime | None = None
        self.history: list[dict[str, float]] = list(history or [])
        self.final: dict[str, float] = {}
        self.error: str | None = None
        self.notes: list[str] = []  # `note:` lines: early stopping, a model that predicts one class
        self._beat = 0.0
        self._page = time.monotonic()
        purge = len(self.history) + 1 if history is not None else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if history is not None:
            self.write_metrics()  # drop rows recorded after the checkpoint by the stopped process
        self.write_summary()

    def heartbeat(self) -> None:
        """Refresh the summary's heartbeat, at most every HEARTBEAT_S seconds: a summary that says
        `running` with an old heartbeat belongs to a process that died."""
        now = time.monotonic()
        if now - self._beat >= self.HEARTBEAT_S:
            self._beat = now
            self.write_summary()

    # -- per epoch -------------------------------------------------------------------------
    def log_epoch(self, metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        self.history = list(history)
        self.write_metrics()
        self.write_summary()
        if time.monotonic() - self._page >= self.PAGE_EVERY_S:
            self._page = time.monotonic()
            write_page(write_run_page, self.run_dir, self.history)  # curves.png and report.html

    def write_metrics(self) -> None:
        """metrics.csv: one row per epoch, every key a column (rewritten whole, so it stays rectangular)."""
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        # full precision: a script reading it gets the exact values; cells through csv_text, as every CSV
        atomic_write_text(self.run_dir / "metrics.csv", csv_text(keys, self.history))

    # -- end -------------------------------------------------------------------------------
    def reporting(self) -> None:
        """Training is over; best.pt's final reports are being written. A summary that a kill
        leaves saying so tells how to complete them (see summary_text)."""
        self.status = "reporting"
        self.write_summary()

    def finish(
        self,
        status: str,
        final: dict[str, float] | None = None,
        error: str | None = None,
        note: str | None = None,
    ) -> None:
        if note:
            self.notes.append(note)
        self.status = status
        self.final.update(final or {})
        self.error = error
        self.ended = _now()
        self.write_summary()
        write_page(write_run_page, self.run_dir, self.history)
        self.writer.flush()

    def add_note(self, note: str) -> None:
        self.notes.append(note)

    def close(self) -> None:
        self.writer.close()

    # -- summary.txt -----------------------------------------------------------------------
    def write_summary(self) -> None:
        path, text = self.run_dir / "summary.txt", self.summary_text()
        try:
            atomic_write(path, text)
        except WriteError:
            # a full disk must not leave a failed run saying `running`: its last word goes in place
            if self.status == "running" or not path.is_file() or not rewrite_in_place(path, text):
                raise

    def summary_text(self) -> str:
        now = self.ended or _now()
        last = self.history[-1] if self.history else {}
        best = max(self.history, key=lambda r: r.get("val/acc", -1), default={})
        notes = self.notes[:]
        if self.status == "reporting":
            notes.append(REPORTING_NOTE.format(last=self.run_dir / "weights" / "last.pt"))
        lines = [
            "imgcls training run",
            f"status:         {self.status}",
            f"run dir:        {self.run_dir}",
            f"started:        {_fmt_time(self.started)}",
            *([f"resumed:        {_fmt_time(self.resumed)}"] if self.resumed else []),
            f"ended:          {_fmt_time(self.ended)}",
            f"duration:       {str(now - self.started).split('.')[0]}",
            f"heartbeat:      {_fmt_time(_now())} (pid {os.getpid()} on {socket.gethostname()})",
            f"epoch:          {int(last.get('epoch', 0))} of {self.epochs}",
            *(f"note:           {note}" for note in notes),
            "",
            f"best val acc:   {_pct(best.get('val/acc'))} at epoch {int(best['epoch']) if best else '-'}",
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
        for split in ("train", "val", "test"):
            key = f"{split}/acc_best_weights"
            if key in self.final:
                lines.append(f"{split} acc (best weights): {_pct(self.final[key])}")
        lines.append("")
        lines += [f"{k + ':':<15} {v}" for k, v in self.info.items()]
        if self.error:
            lines += ["", "error:", *("  " + line for line in self.error.rstrip().splitlines())]
        lines += [
            "",
            "config:",
            *("  " + line for line in yaml.safe_dump(self.config, sort_keys=False).splitlines()),
        ]
        return "\n".join(lines) + "\n"
