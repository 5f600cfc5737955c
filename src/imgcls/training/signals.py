"""Graceful stop: Ctrl-C and SIGTERM ask training to stop at the next step boundary."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from loguru import logger

HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Training stopped on a signal after saving last.pt; the CLI exits with 128 + signal."""

    def __init__(self, signum: int, epoch: int, step: int, checkpoint: str):
        self.signum, self.epoch, self.step, self.checkpoint = signum, epoch, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} during epoch {epoch}, after step {step}; saved {checkpoint}. "
            f"Resume with: python -m imgcls.train resume={checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopFlag:
    """Set by the first SIGINT/SIGTERM; `requested()` is the signal number or None."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def requested(self) -> int | None:
        return self.signum

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            logger.warning(
                f"{signal.Signals(signum).name}: stopping after the current step and saving last.pt"
            )
        else:
            # the save is atomic (temp file, fsync, rename): waiting is safe, kill -9 is too
            logger.warning(f"{signal.Signals(signum).name} again: already stopping, saving last.pt")


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install the handlers for the duration of training, then restore the previous ones."""
    flag = StopFlag()
    previous = {s: signal.signal(s, flag._handle) for s in HANDLED}
    try:
        yield flag
    finally:
        if flag.signum is None:
            _restore(previous)
        else:
            # a stopped run keeps its handler until release_signals(), once its summary and logs are
            # written: an impatient second signal meanwhile is logged, never fatal (with the previous
            # handler restored here, a second SIGTERM 50 ms after the first killed a run whose small
            # checkpoint was already saved, before its summary said `interrupted`)
            _held.update(previous)


_held: dict = {}  # the handlers a stopped run holds back until release_signals()


def release_signals() -> None:
    """The handlers from before a stopped run, back: the run has said how it ended."""
    _restore(dict(_held))
    _held.clear()


def _restore(handlers: dict) -> None:
    for s, handler in handlers.items():
        signal.signal(s, handler)
