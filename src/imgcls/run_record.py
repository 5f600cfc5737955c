"""run.json: the one machine-readable record of what a training run did, and the one definition of best.

Every fact about a run is written once, here, by one writer: imgcls.training.recorder.RunRecorder
(rank 0 only), atomically (imgcls.files.atomic_write) at the start, on every heartbeat, after every
epoch, when the final reports start and when the run ends. Every view renders it and none is
parsed back: summary.txt (RunRecorder renders it from the record), report.html and curves.png
(imgcls.pages), the sweep leaderboard (imgcls.sweeps.summary.read_job), the resume's "are the final
reports due?" check (imgcls.training.resume.final_reports_due), MLflow's final metrics
(imgcls.tracking) and the Optuna objective (imgcls.train.run's return value).

Reader API (light: standard library only, so pages, sweeps and --help import it for free)::

    from imgcls.run_record import read_run
    record = read_run(run_dir)        # RunRecord, or None when the folder holds no run record
    record.status, record.best.epoch, record.best.score, record.final["val"]["acc"]
    record.to_dict()                  # the JSON object, as written

A run directory written before run.json existed (summary.txt and metrics.csv only) reads too:
read_run falls back to legacy_record, the one place left that parses summary.txt.

The schema of run.json (RUN_FILE; SCHEMA = 1), every key always present:

    schema          int     SCHEMA: the layout version of this file
    status          str     running | reporting (training done, the final reports being written: a
                            kill here is completed by `resume=<run>/weights/last.pt`) | completed |
                            interrupted (a signal, Ctrl-C: resume continues) | failed (see error) |
                            pruned (an Optuna sweep's pruner stopped it after epochs_done, with
                            last.pt saved: the reason is in notes, no final reports are written,
                            `resume=<run>/weights/last.pt` continues it and the status then follows
                            the resumed run; imgcls.sweeps.pruning). A pruned job's process raises
                            optuna.TrialPruned from train.run, which Hydra hands the sweeper as
                            the job's return value (JobReturn status FAILED, _return_value an
                            optuna.TrialPruned): the sweeper tells its trial PRUNED
    run_dir         str     the run directory as the run was given it
    pid             int?    the process that writes the record (null in a legacy record that
    host            str?      names none); with `heartbeat`, a reader on `host` can tell a dead
    heartbeat       str?      writer: status running, heartbeat old, pid gone -> killed
    slurm_job_id    str?    SLURM_JOB_ID of the process writing the record (null outside SLURM):
    slurm_array_job_id str?   with SLURM_ARRAY_JOB_ID / _TASK_ID (submitit's job arrays), what
    slurm_array_task_id str?  tells `sacct` which job ran the run, on any node
    started         str?    ISO 8601 times with their UTC offset: the run's first start, the
    resumed         str?      latest resume (null if never resumed), the end (null while it runs)
    ended           str?
    durations       {str: float}  seconds: total_s (started to ended, or to the heartbeat),
                            startup_s (process start to the first training step, this process),
                            train_s, validation_s, bn_recal_s (sums over metrics.csv's epochs),
                            final_reports_s (the final reports with best.pt); a key is absent
                            until it is known
    epochs_done     int     the last epoch in metrics.csv (0 before the first)
    epochs_planned  int     trainer.epochs
    best            {epoch: int, score: float, metric: str}?  the best epoch by selection_score
                            (best_of): metric is "val/acc" or "val/acc_ema" (the EMA's weights
                            scored better; best.pt then holds them). null before the first epoch
    last_epoch      {str: float}  the last row of metrics.csv (train/acc, val/loss, lr, speed ...)
    final           {split: {acc: float, loss: float}}  each split evaluated with best.pt's weights
                            (the final reports; the train split through the eval transforms);
                            empty until they are written
    error           str?    why the run failed or stopped (a traceback unless a user's error)
    notes           [str]   things to know: early stopping, a model that predicts one class, how
                            to complete reports a kill interrupted
    setup           {str: str}  what ran where: device, model, data, settings, batch, startup,
                            mlflow, ... (the summary's setup lines, in the words shown there)
    files           {str: ...}  paths relative to the run directory: metrics (metrics.csv), config
                            (config.yaml), summary (summary.txt), page (report.html), curves
                            (plots/curves.png), tensorboard, best / last (weights/*.pt), and
                            reports: {split: {json, text, confusion}} for each split in `final`
                            (logs/classification_report_<split>.json holds the per-class
                            precision, recall, F1 and support, as evaluate's classification_report.json)
    legacy          bool    true when read_run built the record from an old summary.txt
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from imgcls.names import read_csv_text

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.txt"
METRICS_FILE = "metrics.csv"
SCHEMA = 1
SPLITS = ("train", "val", "test")


# -- the one definition of best ----------------------------------------------------------------
def selected_metric(row: Mapping[str, float]) -> str:
    """Which validation accuracy an epoch is scored by: `val/acc_ema` when the EMA's weights did
    better (best.pt and the top-k checkpoints then hold the EMA's weights), else `val/acc`."""
    ema = row.get("val/acc_ema")
    return "val/acc_ema" if ema is not None and float(ema) > float(row["val/acc"]) else "val/acc"


def selection_score(row: Mapping[str, float]) -> float:
    """What best.pt, early stopping, top-k, the record, every view, the study and MLflow rank an
    epoch by: val/acc, or the EMA's when it is better."""
    return float(row[selected_metric(row)])


@dataclass(frozen=True)
class Best:
    """The best epoch so far, its score and which metric the score is."""

    epoch: int
    score: float
    metric: str  # "val/acc" or "val/acc_ema"


def best_of(history: Sequence[Mapping[str, Any]]) -> Best | None:
    """The first epoch with the highest selection_score (the first to reach a tie keeps it, as
    best.pt is replaced only on a strictly better score); None before any validated epoch."""
    best: Best | None = None
    for row in history:
        if _number(row.get("val/acc")) is None or _number(row.get("epoch")) is None:
            continue
        row = {k: v for k, v in row.items() if _number(v) is not None}  # metrics.csv's "" cells
        score = selection_score(row)
        if best is None or score > best.score:
            best = Best(int(float(row["epoch"])), score, selected_metric(row))
    return best


# -- the record ----------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """run.json as a value (the module docstring lists every field, its type and its writer)."""

    status: str = "unknown"
    run_dir: str = ""
    pid: int | None = None
    host: str | None = None
    heartbeat: str | None = None
    slurm_job_id: str | None = None
    slurm_array_job_id: str | None = None
    slurm_array_task_id: str | None = None
    started: str | None = None
    resumed: str | None = None
    ended: str | None = None
    durations: dict[str, float] = field(default_factory=dict)
    epochs_done: int = 0
    epochs_planned: int = 0
    best: Best | None = None
    last_epoch: dict[str, float] = field(default_factory=dict)
    final: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    setup: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    legacy: bool = False
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema": data.pop("schema"), **data}

    def to_json(self) -> str:
        # allow_nan=False: a NaN loss is written as null, so any JSON reader can read the file;
        # ensure_ascii: a name that is not UTF-8 (b"\xff" read as "\udcff") is written as the JSON
        # escape \udcff, read back as the same name (unescaped, the text file's error handler wrote
        # a bare \xff, an invalid JSON escape, and the record could not be read)
        return json.dumps(_finite(self.to_dict()), indent=1, ensure_ascii=True, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record from run.json's object; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        best = values.get("best")
        values["best"] = Best(int(best["epoch"]), float(best["score"]), str(best["metric"])) if best else None
        return cls(**values)


def read_run(run_dir: Path | str) -> RunRecord | None:
    """The record of the run in `run_dir`: its run.json, else one built from an old run's summary.txt
    and metrics.csv (legacy_record); None when there is neither, or run.json cannot be read."""
    run_dir = Path(run_dir)
    try:
        text = (run_dir / RUN_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return legacy_record(run_dir)
    except OSError:
        return None
    try:
        return RunRecord.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError):
        return None  # not a record this version wrote: say nothing rather than something wrong


def pruned_reason(record: RunRecord) -> str | None:
    """Why a pruned run was stopped (the note imgcls.sweeps.pruning wrote, with the epoch and how to
    resume it); None for a run that is not pruned."""
    if record.status != "pruned":
        return None
    return next((n for n in record.notes if n.startswith("pruned")), "pruned")


def run_status(run_dir: Path | str) -> str | None:
    """The status the run's record holds (running, reporting, completed, ...), or None."""
    record = read_run(run_dir)
    return record.status if record else None


def read_metrics(run_dir: Path | str) -> list[dict[str, float]]:
    """metrics.csv's rows as numbers (a cell that is empty or not a number left out); [] if none."""
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for row in read_csv_text(text):
        rows.append({k: n for k, v in row.items() if k is not None and (n := _number(v)) is not None})
    return rows


# -- old run directories: the one reader of summary.txt --------------------------------------
_FIELD = re.compile(r"^([a-z][\w ()/.-]*?):\s*(.*)$")
# the summary's lines that are not setup: status, timings, results (see RunRecorder.summary_text)
_NOT_SETUP = {
    "status", "run dir", "started", "resumed", "ended", "duration", "heartbeat", "slurm job", "epoch", "note",
    "best val acc", "final val acc", "final train acc", "final losses", "speed", "bn recal cost",
}  # fmt: skip
_PCT = re.compile(r"^(-?[\d.]+(?:e-?\d+)?)")


def legacy_record(run_dir: Path | str) -> RunRecord | None:
    """A record from a run directory written before run.json: summary.txt's lines, with best and
    the epochs from metrics.csv when it is there (best_of: the one definition of best, which best.pt
    followed then too). None without a summary.txt. The only code that parses summary.txt."""
    run_dir = Path(run_dir)
    try:
        text = (run_dir / SUMMARY_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    values: dict[str, str] = {}
    notes: list[str] = []
    error: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if line in ("error:", "config:"):
            block = error if line == "error:" else []
            continue
        if block is not None and (line.startswith("  ") or not line):
            block.append(line[2:])
            continue
        block = None
        m = _FIELD.match(line)
        if m:
            key, value = m.group(1).strip(), m.group(2).strip()
            if key == "note":
                notes.append(value)
            else:
                values.setdefault(key, value)
    history = read_metrics(run_dir)
    epoch = re.match(r"(\d+) of (\d+)", values.get("epoch", ""))
    beat = re.search(r"^(.*?)\s*\(pid (\d+) on (\S+)\)$", values.get("heartbeat", ""))
    done = int(epoch.group(1)) if epoch else 0
    best = best_of(history)
    if best is None:
        found = re.match(r"(\S+) .*at epoch (\d+)", values.get("best val acc", ""))
        if found and _number(found.group(1)) is not None:
            best = Best(int(found.group(2)), float(found.group(1)), "val/acc")
    final = {}
    for split in SPLITS:
        acc = _PCT.match(values.get(f"{split} acc (best weights)", ""))
        if acc:
            final[split] = {"acc": float(acc.group(1))}
    record = RunRecord(
        status=values.get("status", "unknown"),
        run_dir=values.get("run dir", str(run_dir)),
        pid=int(beat.group(2)) if beat else None,
        host=beat.group(3) if beat else None,
        heartbeat=_legacy_time(beat.group(1)) if beat else None,
        started=_legacy_time(values.get("started")),
        resumed=_legacy_time(values.get("resumed")),
        ended=_legacy_time(values.get("ended")),
        durations=_legacy_duration(values.get("duration")),
        epochs_done=int(history[-1].get("epoch", len(history))) if history else done,
        epochs_planned=int(epoch.group(2)) if epoch else 0,
        best=best,
        last_epoch=dict(history[-1]) if history else {},
        final=final,
        error="\n".join(error).strip() or None,
        notes=notes,
        setup={k: v for k, v in values.items() if k not in _NOT_SETUP and "acc (best weights)" not in k},
        legacy=True,
    )
    record.files = run_files(run_dir, record.final)
    return record


def run_files(run_dir: Path, final: Mapping[str, Any]) -> dict[str, Any]:
    """The record's `files`: what a run directory holds, relative to it (reports for the splits in
    `final`; a legacy run's JSON report only when it was written)."""
    reports = {}
    for split in final:
        report = {
            "json": f"logs/classification_report_{split}.json",
            "text": f"logs/classification_report_{split}.txt",
            "confusion": f"plots/confusion_matrix_{split}.png",
        }
        reports[split] = {k: v for k, v in report.items() if (Path(run_dir) / v).is_file()}
    return {
        "metrics": METRICS_FILE, "config": "config.yaml", "summary": SUMMARY_FILE, "page": "report.html",
        "curves": "plots/curves.png", "tensorboard": "tensorboard", "best": "weights/best.pt",
        "last": "weights/last.pt", "reports": reports,
    }  # fmt: skip


def _legacy_time(text: str | None) -> str | None:
    """summary.txt's "2026-01-02 10:00:00 CET" as ISO 8601 (its zone name has no offset: dropped)."""
    try:
        return datetime.strptime((text or "")[:19], "%Y-%m-%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def _legacy_duration(text: str | None) -> dict[str, float]:
    found = re.match(r"(?:(\d+) days?, )?(\d+):(\d\d):(\d\d)$", text or "")
    if not found:
        return {}
    days, h, m, s = (int(g or 0) for g in found.groups())
    return {"total_s": float(((days * 24 + h) * 60 + m) * 60 + s)}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
