"""report.html in an evaluation folder (eval/<split>-<ckpt>/): the metrics, the per-class table, both
confusion matrices, the reliability diagram, the most confident errors, the most confused pairs, and
the comparison an ensemble (each member) or test-time augmentation (without it) computed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from imgcls.pages import html as h

LABELS = {"acc": "accuracy", "loss": "loss", "ece": "expected calibration error", "samples": "images"}


def write_eval_page(out: Path, pairs_shown: int = 10) -> Path | None:
    """Write out/report.html from the files evaluate wrote there; None without metrics.json."""
    try:
        metrics = json.loads(h.read(out / "metrics.json") or "")
    except json.JSONDecodeError:
        return None
    split = str(metrics.get("split", ""))
    sections = [
        h.section("metrics", "Metrics", _metrics(metrics, split)),
        h.section("comparison", "Comparison", _comparison(metrics, split, out)),
        h.section("classes", "Per class", _classes(out)),
        h.section(
            "confusion",
            "Confusion matrices",
            h.figures(
                [
                    (out / "confusion_matrix.png", "counts"),
                    (out / "confusion_matrix_normalized.png", "normalized by true class"),
                ],
                small=True,
            ),
        ),
        h.section(
            "calibration",
            "Calibration",
            h.figures([(out / "reliability_diagram.png", "reliability diagram")], small=True),
        ),
        h.section(
            "errors",
            "Most confident errors",
            h.figures([(out / "most_confident_errors.png", "the most confidently wrong images")]),
        ),
        h.section("confused", "Most confused pairs", _confused(out / "predictions.csv", pairs_shown)),
        h.section(
            "config",
            "Config",
            f"<pre>{h.esc(h.read(out / 'config.yaml') or '')}</pre>"
            if (out / "config.yaml").is_file()
            else "",
        ),
    ]
    checkpoint = metrics.get("checkpoint") or metrics.get("combination", "")
    title = f"Evaluation {out.name}"
    return h.write(
        out / "report.html",
        h.page(title, f"{split} split, {checkpoint} (epoch {metrics.get('epoch', '-')})", sections),
    )


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


def _metrics(metrics: dict, split: str) -> str:
    rows = _metric_rows(metrics, split)
    for key in ("checkpoint", "combination", "epoch", "top_k", "calibration_bins"):
        if key in metrics:
            rows.append((key, metrics[key]))
    return h.fields(rows)


def _comparison(metrics: dict, split: str, out: Path) -> str:
    parts = []
    tta = metrics.get("tta")
    if isinstance(tta, dict) and isinstance(tta.get("without_tta"), dict):
        with_, without = dict(_metric_rows(metrics, split)), dict(_metric_rows(tta["without_tta"], split))
        rows = [(k, without.get(k, "-"), v) for k, v in with_.items()]
        views = ", ".join(map(str, tta.get("views") or []))
        parts.append(
            f"<p>Test-time augmentation over the views {h.esc(views)} against the same images without it.</p>"
        )
        parts.append(h.table(["metric", "without TTA", "with TTA"], rows, numeric=(1, 2)))
    members = h.read_csv(out / "members.csv")
    if members:
        head = list(members[0])
        rows = [[(h.pct(r[c]) if c in ("acc", "top_k_acc") else r[c]) for c in head] for r in members]
        parts.append(
            "<p>Each member alone, and the ensemble (mean of the members' softmax probabilities).</p>"
        )
        parts.append(h.table(head, rows))
    return "".join(parts)


def _classes(out: Path) -> str:
    try:
        scores = json.loads(h.read(out / "classification_report.json") or "")
    except json.JSONDecodeError:
        return ""
    rows = [
        (name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", s["support"])
        for name, s in (scores.get("classes") or {}).items()
    ]
    for name in ("macro avg", "weighted avg"):  # beside "classes", so no class name collides with them
        s = scores.get(name)
        if isinstance(s, dict):
            rows.append((name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", s["support"]))
    return (
        h.table(["class", "precision", "recall", "F1", "support"], rows, numeric=(1, 2, 3, 4)) if rows else ""
    )


def _confused(predictions: Path, limit: int) -> str:
    rows = h.read_csv(predictions)
    if not rows or "true" not in rows[0]:
        return ""
    per_class = Counter(r["true"] for r in rows)
    wrong = Counter((r["true"], r["predicted"]) for r in rows if r["true"] != r["predicted"])
    if not wrong:
        return "<p>No image of this split was misclassified.</p>"
    top = sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    table = [(t, p, n, f"{100 * n / per_class[t]:.1f}%") for (t, p), n in top]
    return h.table(["true class", "predicted as", "images", "share of the true class"], table, numeric=(2, 3))
