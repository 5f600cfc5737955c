"""The evaluate command (`python -m imgcls.evaluate`, the entry in imgcls.evaluate): a run's
checkpoint, or an ensemble of runs, on one split, sample by sample; the metrics, reports, figures,
TensorBoard entries, console tables and page of its evaluation folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import yaml
from loguru import logger
from torch.utils.tensorboard import SummaryWriter

from imgcls.data.splits import describe as describe_split
from imgcls.errors import ConfigError
from imgcls.evaluation import metrics as m
from imgcls.evaluation import tables
from imgcls.evaluation.ensemble import Member, ensemble_dir, ensemble_predictions, load_member, member_row
from imgcls.evaluation.inference import check_views
from imgcls.evaluation.plots import error_grid_figure, reliability_figure, save_figure, write_class_index
from imgcls.evaluation.prediction_rows import prediction_rows, topk_indices, write_csv
from imgcls.evaluation.reports import confusion_figure
from imgcls.evaluation.scores import confusion, report_dict, report_text  # scikit-learn: lazy, see scores.py
from imgcls.files import check_writable, writing_into
from imgcls.log import logged
from imgcls.names import shown
from imgcls.pages import write_page
from imgcls.pages.eval_page import write_eval_page
from imgcls.runs import OUT_DIR_HINT, find_run, output_dir


def evaluate(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Evaluate as conf/evaluate.yaml's keys say, with `overrides` applied to the run's saved
    config (to each member's, for an ensemble); returns the new evaluation folder."""
    single, many, views = _checked_request(cfg)
    split = str(cfg["split"])
    runs = [find_run(d) for d in (many or [single])]
    # where the results go can take them (not read-only, not full) before any checkpoint is loaded
    default = ensemble_dir(runs) if many else runs[0] / "eval"
    check_writable(Path(cfg["out_dir"]).parent if cfg.get("out_dir") else default, hint=OUT_DIR_HINT)
    # every member found, loaded and its data checked before any of them predicts
    members: list[Member] = [load_member(r, cfg, overrides, split) for r in runs]
    _check_ensemble(members, split)
    first = members[0]
    suffix = "_tta" if views else ""
    label = str(cfg["checkpoint"]) if cfg["checkpoint"] in ("best", "last") else first.checkpoint.stem
    if cfg.get("out_dir"):
        out = output_dir(Path(cfg["out_dir"]).parent, Path(cfg["out_dir"]).name, [])
    elif many:
        out = output_dir(
            ensemble_dir([member.run_dir for member in members]), f"{split}-{label}{suffix}", overrides
        )
    else:
        out = output_dir(first.run_dir / "eval", f"{split}-{label}{suffix}", overrides)
    with writing_into(out, hint=OUT_DIR_HINT), logged(out / "inference.log", "evaluation"):
        for member in members:
            logger.info(
                f"evaluating {member.checkpoint} (epoch {member.state.get('epoch', '?')}) on {split}: {member.data.root}"
                + (f", test-time augmentation over {', '.join(['identity', *views])}" if views else "")
            )
        if overrides:
            logger.info(f"overrides of the run's config: {' '.join(overrides)}")
        saved = {"evaluate": cfg, "overrides": overrides}
        if many:
            saved["members"] = [
                {"run_dir": str(member.run_dir), "checkpoint": str(member.checkpoint)} for member in members
            ]
        else:
            saved |= {"checkpoint": str(first.checkpoint), "run": first.config}
        (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        for member in members:
            start = time.perf_counter()
            member.predict(views, float(cfg.get("tta_crop_scale", 1.15)))
            seconds = time.perf_counter() - start
            logger.info(
                f"predicted {len(member.paths)} images in {seconds:.1f} s ({len(member.paths) / seconds:.0f} images/s, "
                f"loading and decoding included)"
            )
        if many:
            k = max(1, min(int(cfg["top_k"]), len(first.class_names)))
            rows = [member_row(member, split, k, int(cfg["calibration_bins"])) for member in members]
            p = ensemble_predictions([member.predictions for member in members])
            source = {"combination": "mean of the members' softmax probabilities"}
            title = f"{split}, ensemble of {len(members)} runs"
            report(out, cfg, split, first.record, p, epoch=0, title=title, source=source, members=rows)
        else:
            source = {"checkpoint": str(first.checkpoint)}
            title = f"{split}, {first.checkpoint.name} (epoch {int(first.state.get('epoch', 0))})"
            report(out, cfg, split, first.record, first.predictions, epoch=int(first.state.get("epoch", 0)),
                   title=title, source=source, state=first.state)  # fmt: skip
        logger.info(f"results in {out}")
        write_page(write_eval_page, out)
        return out


def _checked_request(cfg: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """(run_dir, run_dirs, TTA views) once evaluate's own keys are checked."""
    single, many = cfg.get("run_dir"), cfg.get("run_dirs")
    if single and many:
        raise ConfigError("set run_dir=<a run> or run_dirs=[<run>,<run>,...] (an ensemble), not both")
    if not single and not many:
        raise ConfigError(
            "run_dir is required: set it on the command line, run_dir=... (or run_dirs=[a,b] for an ensemble)"
        )
    if many is not None and (isinstance(many, str) or len(many) < 2):
        raise ConfigError(f"run_dirs={many}: an ensemble needs a list of at least two runs, run_dirs=[a,b]")
    try:
        views = check_views(cfg.get("tta_views") or []) if cfg.get("tta") else []
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.get("tta") and not views:
        raise ConfigError("tta=true needs at least one view: tta_views=[hflip] (hflip, vflip, crops)")
    return single, many, views


def _check_ensemble(members: list, split: str) -> None:
    """An ensemble's members share their classes and the files of the split."""
    first = members[0]
    for member in members[1:]:
        if member.class_names != first.class_names:
            raise ConfigError(
                f"run_dirs: {member.run_dir} has the classes {member.class_names}, {first.run_dir} has "
                f"{first.class_names}: an ensemble needs runs trained on the same classes"
            )
        if member.paths != first.paths:
            raise ConfigError(
                f"run_dirs: {member.run_dir}'s {split} split holds other files than {first.run_dir}'s "
                f"({len(member.paths)} vs {len(first.paths)}): an ensemble is evaluated on one set of images"
            )


def report(
    out: Path, cfg: dict, split: str, record, p, *, epoch: int, title: str, source: dict,
    state: dict | None = None, members: list[dict] | None = None,
) -> None:  # fmt: skip
    """Write the files, TensorBoard entries and console tables of one split's predictions `p`
    (a run's, or an ensemble's with each member's figures in `members`)."""
    class_names = list(record.class_names)
    k = max(1, min(int(cfg["top_k"]), len(class_names)))
    n_bins = int(cfg["calibration_bins"])
    metrics = m.summary(split, p, k, n_bins)
    extra: dict = {}
    if p.plain is not None:  # test-time augmentation: the same images without it, for comparison
        views = ["identity", *(cfg.get("tta_views") or [])]
        extra["tta"] = {"views": views, "crop_scale": cfg.get("tta_crop_scale"),
                        "without_tta": m.summary(split, p.plain, k, n_bins)}  # fmt: skip
    if members:
        extra["members"] = members
    paths = [path for path, _ in record.samples[split]]
    summary = {
        **metrics,
        "epoch": epoch,
        "split": split,
        **source,
        "top_k": k,
        "calibration_bins": n_bins,
        **extra,
    }
    scores = _write_files(out, split, p, paths, class_names, summary)
    cm = _write_figures(out, split, p, paths, class_names, metrics, title=title, epoch=epoch, cfg=cfg)
    carved = record.carved is not None and split in record.carved  # drawn from train, no folder of its own
    where = (
        f"{record.root}, {describe_split(record.carved)}"
        if carved
        else record.root / record.split_dirs[split]
    )
    overall = [("split", f"{split} ({where})")]
    if "checkpoint" in source:
        overall.append(("checkpoint", f"{source['checkpoint']} (epoch {epoch})"))
    else:
        overall.append(("ensemble", f"{len(members or [])} runs, {source.get('combination')}"))
    recorded = {int(h["epoch"]): h for h in (state or {}).get("history", []) if "epoch" in h}
    trained = recorded.get(epoch) if split == "val" else None
    _show(out, summary, p, overall, trained, scores, m.confused_pairs(cm, class_names))


def _write_files(out: Path, split: str, p, paths: list[str], class_names: list[str], summary: dict) -> dict:
    """predictions.csv, classification_report.txt/.json and metrics.json; returns the per-class scores."""
    k = summary["top_k"]
    write_csv(
        out / "predictions.csv",
        prediction_rows(paths, p.probs, p.preds, topk_indices(p.logits, k), class_names, p.targets, p.losses),
    )
    (out / "classification_report.txt").write_text(report_text(p.targets, p.preds, class_names))
    scores = report_dict(p.targets, p.preds, class_names)
    (out / "classification_report.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return scores


def _write_figures(
    out: Path, split: str, p, paths, class_names, metrics: dict, *, title: str, epoch: int, cfg
):
    """The confusion matrices, reliability diagram and most confident errors (PNG and TensorBoard),
    the metrics, report and PR curves in TensorBoard; returns the confusion matrix."""
    confidence = p.confidence
    cm = confusion(p.targets, p.preds, len(class_names))
    bins = m.calibration_bins(confidence, p.correct, int(cfg["calibration_bins"]))
    acc = metrics[f"{split}/acc"]
    wrong = np.flatnonzero(~p.correct)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][: int(cfg["errors_shown"])]
    figures = {
        "confusion_matrix": confusion_figure(
            cm, class_names, f"{title}: accuracy {acc:.4f} ({cm.sum()} images)"
        ),
        "confusion_matrix_normalized": confusion_figure(
            cm, class_names, f"{title}: share of each true class", normalized=True
        ),
        "reliability_diagram": reliability_figure(bins, metrics[f"{split}/ece"], title),
        "most_confident_errors": error_grid_figure(
            [paths[i] for i in wrong],
            [class_names[p.targets[i]] for i in wrong],
            [class_names[p.preds[i]] for i in wrong],
            [float(confidence[i]) for i in wrong],
            f"{title}: the {len(wrong)} most confidently wrong of {int((~p.correct).sum())} errors",
        ),
    }
    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    try:
        for key, value in metrics.items():
            writer.add_scalar(key, value, epoch)
        write_class_index(out, class_names)  # only when no font draws the names
        for name, fig in figures.items():
            save_figure(fig, out / f"{name}.png", writer, f"{name}/{split}", epoch)
            plt.close(fig)
        text = (out / "classification_report.txt").read_text()
        # four leading spaces per line make TensorBoard's markdown keep the table's columns
        writer.add_text(f"classification_report/{split}", "    " + text.replace("\n", "\n    "), epoch)
        probs = p.probs
        for i, name in enumerate(class_names):
            tag = f"pr_curve/{split}/{shown(name)}"  # TensorBoard's tags are UTF-8: b"\xff" as "\xff"
            writer.add_pr_curve(tag, p.targets == i, probs[:, i], global_step=epoch)
    finally:
        writer.close()
    return cm


def _show(out: Path, metrics: dict, p, overall: list, trained: dict | None, scores: dict, confused) -> None:
    """The console tables (and the log file's copy), members.csv for an ensemble, the one-line
    result; `metrics` as metrics.json holds them."""
    split, k, n_bins, epoch = (
        metrics["split"],
        metrics["top_k"],
        metrics["calibration_bins"],
        metrics["epoch"],
    )
    acc, n = metrics[f"{split}/acc"], len(p.preds)
    overall = overall + [
        ("samples", str(n)),
        ("accuracy", f"{acc:.4f} ({int(p.correct.sum())}/{n})"),
        (f"top-{k} accuracy", f"{metrics[f'{split}/acc_top{k}']:.4f}"),
        ("mean loss", f"{metrics[f'{split}/loss']:.4f}"),
        (f"ECE ({n_bins} bins)", f"{metrics[f'{split}/ece']:.4f}"),
    ]
    if trained is not None:
        overall.append(("val acc in training", f"{trained['val/acc']:.4f} (epoch {epoch})"))
    if "tta" in metrics:
        plain = metrics["tta"]["without_tta"]
        overall.append(("without TTA", f"accuracy {plain[f'{split}/acc']:.4f}, loss {plain[f'{split}/loss']:.4f}, "
                                       f"ECE {plain[f'{split}/ece']:.4f} (views: {', '.join(metrics['tta']['views'])})"))  # fmt: skip
    parts = [tables.metrics_table("evaluation", overall)]
    if "members" in metrics:
        ensemble_row = {"run_dir": "ensemble", "epoch": "", "acc": acc, "top_k_acc": metrics[f"{split}/acc_top{k}"],
                        "loss": metrics[f"{split}/loss"], "ece": metrics[f"{split}/ece"]}  # fmt: skip
        write_csv(out / "members.csv", [*metrics["members"], ensemble_row])
        parts.append(tables.members_table([*metrics["members"], ensemble_row], k))
    text = tables.show([*parts, tables.class_table(scores), tables.confused_table(confused)])
    logger.debug("\n" + text)  # the file sink only: the console already shows the tables
    logger.info(
        f"{split}: accuracy {acc:.4f}, top-{k} {metrics[f'{split}/acc_top{k}']:.4f}, "
        f"loss {metrics[f'{split}/loss']:.4f}, ECE {metrics[f'{split}/ece']:.4f} on {n} images"
    )
