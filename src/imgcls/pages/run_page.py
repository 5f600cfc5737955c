"""report.html in a run directory: status and timings, the curves, the accuracy of the best
weights per split, the confusion matrices, the classification reports, the data check and the
config; rewritten with the summary while the run goes on."""

from __future__ import annotations

import re
from pathlib import Path

from imgcls.pages import html as h
from imgcls.pages.curves import write_curves

SPLITS = ("train", "val", "test")
_LINE = re.compile(r"^([a-z][\w ()/.-]*?):\s+(.*)$")
STATUS_KEYS = ("status", "run dir", "started", "resumed", "ended", "duration", "heartbeat", "epoch")
RESULT_KEYS = ("best val acc", "final val acc", "final train acc", "final losses", "speed", "bn recal cost")


def parse_summary(text: str) -> tuple[dict[str, str], list[str], str, str]:
    """(fields, notes, error, config) of a summary.txt: `key: value` lines, the `note:` lines, the
    indented block under `error:`, and the YAML under `config:`."""
    fields: dict[str, str] = {}
    notes: list[str] = []
    error: list[str] = []
    config: list[str] = []
    block = None
    for line in text.splitlines()[1:]:  # the first line names the kind of file
        if line in ("error:", "config:"):
            block = error if line == "error:" else config
            continue
        if block is not None and (line.startswith("  ") or not line):
            block.append(line[2:])
            continue
        block = None
        m = _LINE.match(line)
        if m:
            key, value = m.group(1).strip(), m.group(2).strip()
            if key == "note":
                notes.append(value)
            else:
                fields.setdefault(key, value)
    return fields, notes, "\n".join(error).strip(), "\n".join(config).rstrip()


def write_run_page(run_dir: Path, history: list[dict[str, float]] | None = None) -> Path | None:
    """Write plots/curves.png (from `history`, or metrics.csv) and report.html; None when the
    directory holds no summary.txt yet."""
    summary = h.read(run_dir / "summary.txt")
    if summary is None:
        return None
    if history is None:
        history = [
            {k: v for k, v in ((k, h.number(v)) for k, v in r.items()) if v is not None}
            for r in h.read_csv(run_dir / "metrics.csv")
        ]
    write_curves(history, run_dir / "plots" / "curves.png")
    fields, notes, error, config = parse_summary(summary)
    status = fields.get("status", "unknown")
    sections = [
        _status(fields, notes, error, run_dir),
        h.section(
            "curves",
            "Training curves",
            h.figures([(run_dir / "plots" / "curves.png", "loss, accuracy and learning rate per epoch")]),
        ),
        _accuracy(fields),
        h.section(
            "confusion",
            "Confusion matrices (best weights)",
            h.figures(((run_dir / "plots" / f"confusion_matrix_{s}.png", s) for s in SPLITS), small=True),
        ),
        _reports(run_dir),
        _data_check(fields, run_dir),
        h.section(
            "setup",
            "Setup",
            h.fields(
                (k, v)
                for k, v in fields.items()
                if k not in (*STATUS_KEYS, *RESULT_KEYS) and "acc (best weights)" not in k
            ),
        ),
        h.section("config", "Config", f"<pre>{h.esc(config)}</pre>" if config else ""),
    ]
    name = run_dir.resolve().name
    return h.write(
        run_dir / "report.html",
        h.page(f"Run {name}", f"{status}: {fields.get('run dir', run_dir)}", sections),
    )


def _status(fields: dict[str, str], notes: list[str], error: str, run_dir: Path) -> str:
    status = fields.get("status", "unknown")
    rows = [(k, fields[k]) for k in STATUS_KEYS if k in fields and k != "status"]
    rows += [(k, fields[k]) for k in RESULT_KEYS if k in fields]
    rows += [("note", n) for n in notes]
    body = f'<p>status: <span class="status {h.esc(status)}">{h.esc(status)}</span></p>' + h.fields(rows)
    if error or status in ("failed", "interrupted"):
        last = run_dir / "weights" / "last.pt"
        advice = (
            f"Resume it with <code>python -m imgcls.train resume={h.esc(last)}</code> (add "
            "<code>trainer.epochs=N</code> to extend it)."
            if last.is_file()
            else "No checkpoint was written (weights/last.pt is missing): fix the cause and start the run again."
        )
        body += f"<div class=error id=why><p><b>Why it stopped</b></p><pre>{h.esc(error or status)}</pre><p>{advice}</p></div>"
    return h.section("status", "Status", body)


def _accuracy(fields: dict[str, str]) -> str:
    rows = []
    for split in SPLITS:
        value = fields.get(f"{split} acc (best weights)")
        if value:
            rows.append((split, value.split(" (")[-1].rstrip(")") if "(" in value else value))
    return h.section(
        "accuracy",
        "Accuracy of the best weights",
        h.table(["split", "accuracy"], rows, numeric=(1,)) if rows else "",
    )


def _reports(run_dir: Path) -> str:
    parts = []
    for split in SPLITS:
        text = h.read(run_dir / "logs" / f"classification_report_{split}.txt")
        if text:
            parts.append(f"<h3>{split}</h3>{h.report_table(text)}")
    return h.section("reports", "Classification reports (best weights)", "".join(parts))


def _data_check(fields: dict[str, str], run_dir: Path) -> str:
    found = h.read(run_dir / "data_check.txt")
    body = f"<p>{h.esc(fields['data check'])}</p>" if "data check" in fields else ""
    if found:
        body += f"<pre>{h.esc(found)}</pre>"
    return h.section("data-check", "Data check", body)
