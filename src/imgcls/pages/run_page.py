"""report.html in a run directory: status and timings, the curves, the accuracy of the best
weights per split, the confusion matrices, the classification reports, the data check and the
config; rewritten with the record while the run goes on. Every fact comes from the run's record
(imgcls.run_record.read_run: run.json, or an old run's summary.txt read by its legacy reader) and
from the files the record points to, never from a text view."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from imgcls.pages import html as h
from imgcls.pages.curves import write_curves
from imgcls.run_record import SPLITS, RunRecord, pruned_reason, read_metrics, read_run, run_files


def write_run_page(run_dir: Path, history: list[dict[str, float]] | None = None) -> Path | None:
    """Write plots/curves.png (from `history`, or metrics.csv) and report.html; None when the
    directory holds no run record yet."""
    record = read_run(run_dir)
    if record is None:
        return None
    write_curves(read_metrics(run_dir) if history is None else history, run_dir / "plots" / "curves.png")
    files = record.files or run_files(run_dir, record.final)
    last = run_dir / files.get("last", "weights/last.pt")
    page = h.render(
        "run.html.j2",
        title=f"Run {run_dir.resolve().name}",
        subtitle=f"{record.status}: {record.run_dir or run_dir}",
        status=record.status,
        facts=_facts(record),
        why=(
            {
                "error": record.error or pruned_reason(record) or record.status,
                "resume": last if last.is_file() else None,
            }
            if record.error or record.status in ("failed", "interrupted", "pruned")
            else None
        ),
        curves=h.figures([(run_dir / "plots" / "curves.png", "loss, accuracy and learning rate per epoch")]),
        accuracy=[(s, h.pct(record.final[s].get("acc"))) for s in SPLITS if s in record.final],
        confusion=h.figures((run_dir / f"plots/confusion_matrix_{s}.png", s) for s in SPLITS),
        reports=_reports(run_dir, files.get("reports") or {}),
        data_check={"summary": record.setup.get("data check"), "found": h.read(run_dir / "data_check.txt")},
        setup=list(record.setup.items()),
        config=h.read(run_dir / files.get("config", "config.yaml")),
    )
    return h.write(run_dir / "report.html", page)


def _facts(r: RunRecord) -> list[tuple[str, str]]:
    """The status table: where and when the run ran, how far it got, its best and last epochs."""
    last = r.last_epoch
    rows = [("run dir", r.run_dir), ("started", _time(r.started))]
    rows += [("resumed", _time(r.resumed))] if r.resumed else []
    rows += [("ended", _time(r.ended))]
    if "total_s" in r.durations:
        rows.append(("duration", _seconds(r.durations["total_s"])))
    if r.heartbeat:
        rows.append(("heartbeat", f"{_time(r.heartbeat)} (pid {r.pid} on {r.host})"))
    if r.slurm_job_id:
        array = f" (array {r.slurm_array_job_id}_{r.slurm_array_task_id})" if r.slurm_array_job_id else ""
        rows.append(("slurm job", f"{r.slurm_job_id}{array}"))
    rows.append(("epoch", f"{r.epochs_done} of {r.epochs_planned}"))
    rows += [("note", note) for note in r.notes]
    if r.best:
        weights = " (EMA weights)" if r.best.metric == "val/acc_ema" else ""
        rows.append(("best val acc", f"{h.pct(r.best.score)} at epoch {r.best.epoch}{weights}"))
    if "val/acc" in last:
        rows.append(("final val acc", h.pct(last["val/acc"])))
    if "train/acc" in last:
        rows.append(("final train acc", h.pct(last["train/acc"])))
    if "train/loss" in last or "val/loss" in last:
        loss = [f"{s} {last[f'{s}/loss']:.4f}" for s in ("train", "val") if f"{s}/loss" in last]
        rows.append(("final losses", ", ".join(loss)))
    if last.get("train/images_per_s") and "train/time_s" in last:
        speed = f"train {last['train/images_per_s']:.1f} images/s ({last['train/time_s']:.1f} s/epoch)"
        if "val/images_per_s" in last:
            speed += f", val {last['val/images_per_s']:.1f} images/s"
        rows.append(("speed", speed))
    if last.get("bn_recal/time_s") is not None and last.get("train/time_s"):
        share = last["bn_recal/time_s"] / last["train/time_s"]
        rows.append(
            (
                "bn recal cost",
                f"{last['bn_recal/time_s']:.1f} s before each validation ({share:.0%} of a training epoch)",
            )
        )
    times = [(k.removesuffix("_s").replace("_", " "), v) for k, v in r.durations.items() if k != "total_s"]
    rows += [(f"time: {name}", _seconds(v)) for name, v in times]
    return rows


def _reports(run_dir: Path, reports: dict) -> list[tuple[str, list, str | None]]:
    """(split, the report's rows from its JSON, else the text report shown as it is) for each split
    the final reports wrote: the page reads the machine-readable report, never parses the text."""
    shown = []
    for split in SPLITS:
        paths = reports.get(split) or {}
        rows = h.report_rows(
            h.read_json(run_dir / paths.get("json", f"logs/classification_report_{split}.json"))
        )
        text = (
            None if rows else h.read(run_dir / paths.get("text", f"logs/classification_report_{split}.txt"))
        )
        if rows or text:
            shown.append((split, rows, text))
    return shown


def _time(iso: str | None) -> str:
    """An ISO 8601 time as the summary shows it: 2026-01-02 10:00:00 +0100."""
    try:
        return datetime.fromisoformat(iso or "").strftime("%Y-%m-%d %H:%M:%S %z").strip()
    except ValueError:
        return iso or "-"


def _seconds(s: float) -> str:
    """Seconds as h:mm:ss, as the summary shows a duration."""
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
