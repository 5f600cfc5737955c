"""report.html in an evaluation folder (eval/<split>-<ckpt>/): the metrics, the per-class table, both
confusion matrices, the reliability diagram, the most confident errors, the most confused pairs, and
the comparison an ensemble (each member) or test-time augmentation (without it) computed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from imgcls.pages import html as h

LABELS = {"acc": "accuracy", "loss": "loss", "ece": "expected calibration error", "samples": "images"}


def write_eval_page(out: Path, pairs_shown: int = 10) -> Path | None:
    """Write out/report.html from the files evaluate wrote there (metrics.json, classification_report.json,
    members.csv, predictions.csv, the figures, config.yaml); None without metrics.json."""
    metrics = h.read_json(out / "metrics.json")
    if not isinstance(metrics, dict):
        return None
    split = str(metrics.get("split", ""))
    checkpoint = metrics.get("checkpoint") or metrics.get("combination", "")
    page = h.render(
        "eval.html.j2",
        title=f"Evaluation {out.name}",
        subtitle=f"{split} split, {checkpoint} (epoch {metrics.get('epoch', '-')})",
        metrics=[
            *_metric_rows(metrics, split),
            *(
                (k, metrics[k])
                for k in ("checkpoint", "combination", "epoch", "top_k", "calibration_bins")
                if k in metrics
            ),
        ],
        tta=_tta(metrics, split),
        members=_members(out / "members.csv"),
        classes=h.report_rows(h.read_json(out / "classification_report.json")),
        confusion=h.figures(
            [
                (out / "confusion_matrix.png", "counts"),
                (out / "confusion_matrix_normalized.png", "normalized by true class"),
            ]
        ),
        calibration=h.figures([(out / "reliability_diagram.png", "reliability diagram")]),
        errors=h.figures([(out / "most_confident_errors.png", "the most confidently wrong images")]),
        confused=_confused(out / "predictions.csv", pairs_shown),
        config=h.read(out / "config.yaml"),
    )
    return h.write(out / "report.html", page)


def _metric_rows(metrics: dict, split: str) -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        if not key.startswith(f"{split}/"):
            continue
        name = key.split("/", 1)[1]
        label = LABELS.get(
            name, f"top-{name.removeprefix('acc_top')} accuracy" if name.startswith("acc_top") else name
        )
        x = h.number(value)
        shown = (
            h.pct(x)
            if name.startswith("acc")
            else "-"
            if x is None
            else f"{int(x)}"
            if name == "samples"
            else f"{x:.4f}"
        )
        rows.append((label, shown))
    return rows


def _tta(metrics: dict, split: str) -> dict | None:
    """The metrics with test-time augmentation beside those without it, when evaluate computed both."""
    tta = metrics.get("tta")
    if not (isinstance(tta, dict) and isinstance(tta.get("without_tta"), dict)):
        return None
    with_, without = dict(_metric_rows(metrics, split)), dict(_metric_rows(tta["without_tta"], split))
    return {
        "views": ", ".join(map(str, tta.get("views") or [])),
        "rows": [(k, without.get(k, "-"), v) for k, v in with_.items()],
    }


def _members(path: Path) -> dict | None:
    """An ensemble's members.csv: each member alone, then the ensemble."""
    members = h.read_csv(path)
    if not members:
        return None
    head = list(members[0])
    rows = [[(h.pct(r[c]) if c in ("acc", "top_k_acc") else r[c]) for c in head] for r in members]
    return {"head": head, "rows": rows}


def _confused(predictions: Path, limit: int) -> list[tuple] | None:
    """The most frequent (true, predicted) errors of predictions.csv; [] when there is none, None
    without the file (or without true labels)."""
    rows = h.read_csv(predictions)
    if not rows or "true" not in rows[0]:
        return None
    per_class = Counter(r["true"] for r in rows)
    wrong = Counter((r["true"], r["predicted"]) for r in rows if r["true"] != r["predicted"])
    top = sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [(t, p, n, f"{100 * n / per_class[t]:.1f}%") for (t, p), n in top]
