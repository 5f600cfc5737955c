"""A tracked sweep's MLflow parent run, ended when the sweep ends, with the leaderboard as its artifacts."""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from loguru import logger

from imgcls.tracking import PARENT_FILE, open_client, read_parent

# what imgcls.sweeps.summary writes at the sweep's end (the ones that exist are uploaded)
LEADERBOARD = ("sweep_summary.csv", "cv_summary.csv", "sweep_objective.png", "report.html")


def end_parent(sweep_dir: Path, status: str) -> None:
    """Upload the sweep's leaderboard to its parent run and end it with `status`; nothing for a sweep
    whose jobs were not tracked (no mlflow_parent.json, so mlflow is never imported)."""
    parent = read_parent(sweep_dir)
    if parent is None:
        return
    client = open_client(parent["tracking_uri"], f"{PARENT_FILE} tracking_uri")
    uploaded = [name for name in LEADERBOARD if (sweep_dir / name).is_file()]
    for name in uploaded:
        client.log_artifact(parent["run_id"], str(sweep_dir / name))
    client.set_terminated(parent["run_id"], status)
    files = f", with {', '.join(uploaded)}" if uploaded else ""
    logger.info(f"mlflow: sweep parent run {parent['run_id']} {status.lower()}{files}")


class SweepParentRun(Callback):
    """Hydra callback (hydra.callbacks in train.yaml, before sweep_summary so that its end runs after
    the leaderboard is written). The jobs create the parent run (imgcls.tracking.sweep_parent); a sweep
    that stops before its end (Ctrl-C, a signal) still ends the parent, as KILLED, when the process exits."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        atexit.register(self._stopped)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        atexit.unregister(self._stopped)
        self._end(Path(str(config.hydra.sweep.dir)), "FINISHED")

    def _stopped(self) -> None:
        self._end(self._sweep_dir, "KILLED")

    @staticmethod
    def _end(sweep_dir: Path, status: str) -> None:
        try:
            end_parent(sweep_dir, status)
        except Exception as exc:  # the jobs have run as they ran: the parent's end is a warning at most
            logger.warning(f"mlflow: could not end the sweep's parent run in {sweep_dir}: {exc}")
