"""MLflow tracking (tracking=mlflow): a run's config, metrics and reports in an MLflow store, its status
following the imgcls run's; NullTracker, which does nothing, for everyone else."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from loguru import logger

from imgcls.errors import ConfigError
from imgcls.files import atomic_write
from imgcls.run_record import RunRecord

RUN_ID_KEY = "mlflow_run_id"  # the checkpoint entry a resume reads to continue the same MLflow run
PARENT_FILE = "mlflow_parent.json"  # in a sweep's directory: the parent run its jobs are nested under
# what a run's directory holds that the MLflow run gets as artifacts, under the same relative paths
REPORT_GLOBS = ("logs/classification_report_*.txt", "plots/confusion_matrix_*.png")


def tracking_uri(uri: str | None) -> tuple[str, str]:
    """The store and where it came from: tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite
    store in the current folder (MLflow 3's own default; it has frozen the ./mlruns file store)."""
    if uri:
        return uri, "tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}", "the default store"


def continued_store(settings: dict, run_id: str | None, run_dir: Path) -> str | None:
    """The store in which a plain `resume=` (no tracking on its command line) continues the
    checkpoint's MLflow run, or None: the resume is not tracked.

    The checkpoint's `tracking` is someone else's text until this machine shows the run is its own:
    its store is the one $MLFLOW_TRACKING_URI names (the user's own setting), or a local SQLite file
    that already exists and holds MLflow run `run_id` tagged with this very run directory (read
    read-only with sqlite3: nothing is created or contacted to find out). A server named only by
    the checkpoint, a database file that is not there: None."""
    if not run_id or not isinstance(settings, dict):
        return None
    saved = settings.get("uri")
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and (saved in (None, env)):
        return env
    uri = str(saved) if saved else f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return uri if _local_store_holds(uri, run_id, run_dir) else None


def _local_store_holds(uri: str, run_id: str, run_dir: Path) -> bool:
    """Whether `uri` is an existing SQLite MLflow store holding `run_id` as a run of `run_dir`."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri.split("?")[0][len("sqlite:///") :])
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # never a FIFO or a device: nothing that blocks
            return False
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return False
        db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute(
                "SELECT value FROM tags WHERE run_uuid = ? AND key = 'imgcls.run_dir'", (run_id,)
            ).fetchone()
        finally:
            db.close()
    except (OSError, sqlite3.Error):
        return False
    return row is not None and row[0] == str(Path(run_dir).resolve())


# conf/tracking/mlflow.yaml's timeout_s: how long the first request may wait for a tracking server.
# MLflow's own defaults (7 retries with backoff, 120 s per request) took about 4 minutes to report
# a server that is down; a server that answers at all answers its first request in well under that.
TIMEOUT_S = 10.0


def open_client(uri: str, source: str = "tracking.uri", timeout_s: float | None = None):
    """An MlflowClient on the store, opened now: a missing package or a store that cannot be
    opened is the user's error, before the run is built. `source` names where `uri` came from.
    A tracking server gets one try of at most `timeout_s` seconds (tracking.timeout_s); the run's
    later requests keep MLflow's retries, for a server that is up but briefly busy."""
    try:
        # lazy: mlflow (seconds to import) for tracked runs only, and it is an optional extra
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ConfigError(
            f"tracking=mlflow needs the mlflow package ({exc}): pip install 'imgcls[mlflow]' "
            "(or pip install mlflow-skinny), or leave tracking unset"
        ) from None
    timeout_s = TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not timeout_s > 0:
        raise ConfigError(f"tracking.timeout_s={timeout_s}: give a number of seconds above 0, e.g. 10")
    try:
        with _first_open(uri), _one_quick_try(timeout_s):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates a new store's tables
    except Exception as exc:
        unreachable = _unreachable(exc) if uri.split(":", 1)[0].lower() in ("http", "https") else None
        if unreachable:
            raise ConfigError(
                f"{source}={uri}: the tracking server did not answer within tracking.timeout_s={timeout_s:g} s "
                f"({unreachable}); start it or correct the address, raise tracking.timeout_s for a slow "
                "network, or leave tracking unset"
            ) from None
        raise ConfigError(
            f"{source}={uri}: MLflow cannot open this store ({type(exc).__name__}: {exc}); "
            "give tracking.uri=sqlite:///<file>.db, a server's http(s)://host:port, or set MLFLOW_TRACKING_URI"
        ) from None
    return client


@contextlib.contextmanager
def _one_quick_try(timeout_s: float) -> Iterator[None]:
    """MLflow's request settings for this check only: one try, at most `timeout_s` (connect and
    read each). MLflow reads them from the environment at every request; the user's values are
    put back afterwards."""
    quick = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s))),
    }
    saved = {key: os.environ.get(key) for key in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _unreachable(exc: Exception) -> str | None:
    """Why a server could not be reached, in words, from MLflow's text of the requests error
    (it keeps only the text): None when the server answered (with an error of its own)."""
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out"
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip()
    if "Max retries exceeded" in text or "Failed to establish a new connection" in text:
        return "no connection"
    return None


@contextlib.contextmanager
def _first_open(uri: str) -> Iterator[None]:
    """One process at a time opens a SQLite store: parallel sweep jobs that each create the tables of
    a new store collide ("table ... already exists"). The lock is flock on the database file itself
    (SQLite locks with fcntl, which flock does not touch on Linux); an empty file is an empty database."""
    path = Path(uri.split("?")[0][len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    if path is None or not path.parent.is_dir():
        yield
        return
    with open(path, "a") as db:
        fcntl.flock(db, fcntl.LOCK_EX)  # released when the file closes
        yield


def experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # a parallel job created it first
        return client.get_experiment_by_name(name).experiment_id


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: `optimizer.lr` -> "0.01"; lists as JSON. MLflow refuses values
    over 6000 characters and keys over 250: those are cut, and the value says so."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH  # lazy: see open_client

    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
            continue
        text = _param_text(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 30] + f"... ({len(text)} chars, cut)"
        out[name[:MAX_ENTITY_KEY_LENGTH]] = text
    return out


def _param_text(value: Any) -> str:
    if value is None:
        return "null"
    return json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)


def sweep_parent(client, experiment: str, sweep_dir: Path) -> str:
    """The id of the sweep's parent run, created by the first job that asks: the file lock makes
    parallel jobs (and workers of a shared Optuna study) agree on one. Its id and store go to
    <sweep_dir>/mlflow_parent.json, where the sweep's end reads them."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = sweep_dir / PARENT_FILE
    with open(sweep_dir / f".{PARENT_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if record.is_file():
            return json.loads(record.read_text())["run_id"]
        run = client.create_run(
            experiment,
            run_name=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}",
            tags={"imgcls.sweep_dir": str(sweep_dir.resolve())},
        )
        text = json.dumps({"tracking_uri": client.tracking_uri, "run_id": run.info.run_id}, indent=1)
        atomic_write(record, text + "\n")
        return run.info.run_id


def read_parent(sweep_dir: Path) -> dict[str, str] | None:
    record = Path(sweep_dir) / PARENT_FILE
    return json.loads(record.read_text()) if record.is_file() else None


class NullTracker:
    """No tracker: what a run without tracking=mlflow (and every rank but 0 under torchrun) gets."""

    run_id: str | None = None

    def start(self, config: dict, ckpt: dict | None) -> str | None:
        """Open or continue the tracked run; returns a line for the summary (None: nothing tracked)."""
        return None

    def checkpoint_entries(self) -> dict[str, Any]:
        return {}

    def log_epoch(self, metrics: dict[str, float]) -> None:
        pass

    def log_final(self, record: RunRecord) -> None:
        """The run's results as its record (run.json) holds them, once the final reports are written."""

    @contextlib.contextmanager
    def ended(self, interrupted: tuple[type[BaseException], ...]) -> Iterator[None]:
        yield


class MlflowTracker(NullTracker):
    """One imgcls run as one MLflow run (resumed runs continue it), nested under its sweep's parent."""

    def __init__(self, settings: dict, run_dir: Path, sweep_dir: Path | None = None):
        self.settings, self.run_dir, self.sweep_dir = settings, Path(run_dir), sweep_dir
        self.client = None
        self._warned = False

    def start(self, config: dict, ckpt: dict | None) -> str:
        uri, source = tracking_uri(self.settings.get("uri"))
        self.client = client = open_client(uri, source, self.settings.get("timeout_s"))
        resumed = (ckpt or {}).get(RUN_ID_KEY)
        if resumed and not self._holds(resumed):
            # a checkpoint from elsewhere (or this run moved): its MLflow run is not this folder's here
            logger.warning(
                f"mlflow: the checkpoint's MLflow run {resumed} is not a run of {self.run_dir} in {uri}; "
                "this resume is tracked as a new MLflow run"
            )
            resumed = None
        if resumed:
            self.run_id = self._continue(resumed, flat_params(config))
        else:
            exp = experiment_id(client, self.settings.get("experiment") or "imgcls")
            tags = {"imgcls.run_dir": str(self.run_dir.resolve())}
            if self.sweep_dir is not None:
                tags["mlflow.parentRunId"] = sweep_parent(client, exp, self.sweep_dir)
            self.run_id = client.create_run(exp, run_name=self.run_dir.name, tags=tags).info.run_id
            self._log_params(flat_params(config))
        line = f"run {self.run_id} in {uri}" + (" (continued)" if resumed else "")
        logger.info(f"mlflow: {line}; browse with `mlflow ui --backend-store-uri {uri}`")
        return line

    def _holds(self, run_id: str) -> bool:
        """Whether the store has MLflow run `run_id`, started for this run directory."""
        try:
            tags = self.client.get_run(run_id).data.tags
        except Exception:  # MlflowException: no such run (a server may word it otherwise)
            return False
        return tags.get("imgcls.run_dir") == str(self.run_dir.resolve())

    def _continue(self, run_id: str, params: dict[str, str]) -> str:
        """The checkpoint's MLflow run, RUNNING again. A param the resume changed (trainer.epochs)
        becomes a tag `resumed.<key>`: MLflow refuses a new value for a logged param."""
        logged = self.client.get_run(run_id).data.params  # there: start() asked _holds
        self.client.update_run(run_id, status="RUNNING")
        for key, value in params.items():
            if logged.get(key, value) != value:
                self.client.set_tag(run_id, f"resumed.{key}", value)
        self._log_params({k: v for k, v in params.items() if k not in logged}, run_id)
        return run_id

    def _log_params(self, params: dict[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import Param  # lazy: see open_client

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per request
            self.client.log_batch(run_id or self.run_id, params=items[i : i + 100])

    def checkpoint_entries(self) -> dict[str, Any]:
        return {RUN_ID_KEY: self.run_id}

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """The epoch's row of metrics.csv, under the same keys, at step = epoch."""
        step = int(metrics["epoch"])
        self._metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def log_final(self, record: RunRecord) -> None:
        """<split>/acc_best_weights from the record's `final`, and best_epoch: the epoch best.pt,
        the summary and the study name (run_record.best_of)."""
        values = {f"{split}/acc_best_weights": v["acc"] for split, v in record.final.items() if "acc" in v}
        if record.best is not None:
            values["best_epoch"] = record.best.epoch
        self._metrics(values, 0)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: see open_client

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        # a store that hiccups mid-run costs the tracked copy of some points, never the training
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:
            if not self._warned:
                logger.warning(f"mlflow: could not log metrics at step {step} ({exc}); training goes on")
            self._warned = True

    @contextlib.contextmanager
    def ended(self, interrupted: tuple[type[BaseException], ...]) -> Iterator[None]:
        """The MLflow run ends as the imgcls run did: FINISHED, KILLED (a signal, Ctrl-C: resume
        continues it) or FAILED; with summary.txt and the reports as artifacts."""
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except interrupted:
            status = "KILLED"
            raise
        finally:
            if self.run_id is not None:
                self._end(status)

    def _end(self, status: str) -> None:
        files = [self.run_dir / "summary.txt"]
        files += [p for pattern in REPORT_GLOBS for p in sorted(self.run_dir.glob(pattern))]
        if status == "FINISHED" and self.settings.get("log_checkpoint"):
            files.append(self.run_dir / "weights" / "best.pt")
        # the imgcls run has ended as it has: a store that fails now is a warning, never its outcome
        try:
            for path in files:
                if path.is_file():
                    folder = path.parent.relative_to(self.run_dir).as_posix()
                    self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
        except Exception as exc:
            logger.warning(f"mlflow: could not upload the run's files to run {self.run_id}: {exc}")
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            logger.warning(f"mlflow: could not end run {self.run_id} as {status}: {exc}")


def make_tracker(settings: dict | None, run_dir: Path, sweep_dir: Path | None = None) -> NullTracker:
    """The tracker the config asks for: MlflowTracker for tracking=mlflow, else NullTracker."""
    return MlflowTracker(settings, run_dir, sweep_dir) if settings else NullTracker()
