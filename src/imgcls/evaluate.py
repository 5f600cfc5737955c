"""`python -m imgcls.evaluate run_dir=...`: a run's checkpoint on one split, sample by sample, reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgcls.cli import main_over_run


def run(cfg: dict[str, Any], overrides: list[str]) -> Path:
    """Evaluate as conf/evaluate.yaml's keys say, with `overrides` applied to the run's saved
    config; returns the new evaluation folder. Heavy imports live here so --help stays instant."""
    from loguru import logger

    from imgcls import build as b
    from imgcls.labels import checked_samples, labelled_samples
    from imgcls.log import setup_logging, teardown_logging
    from imgcls.runs import find_checkpoint, find_run, load_run, output_dir, restore

    run_dir = find_run(cfg["run_dir"])
    checkpoint = find_checkpoint(run_dir, cfg["checkpoint"])
    config, state = load_run(run_dir, checkpoint, overrides)  # every _target_ checked here
    split = str(cfg["split"])
    class_names = list(state["class_names"])
    # the data next: a missing split or class folders that differ fail before any model is built
    data = b.build_data(config["data"])
    if checked_samples(data, split, class_names, state) is None:
        labelled_samples(data, split, class_names)
    restored = restore(config, state, checkpoint)
    # class-weighted losses weigh by the train split's counts, which the checkpoint keeps
    loss_fn = b.build_loss(config["loss"], class_counts=state.get("class_counts"))

    label = str(cfg["checkpoint"]) if cfg["checkpoint"] in ("best", "last") else checkpoint.stem
    if cfg.get("out_dir"):
        out = output_dir(Path(cfg["out_dir"]).parent, Path(cfg["out_dir"]).name, [])
    else:
        out = output_dir(run_dir / "eval", f"{split}-{label}", overrides)
    log_ids = setup_logging(out / "inference.log")
    try:
        logger.info(f"evaluating {checkpoint} (epoch {state.get('epoch', '?')}) on {split}: {data.root}")
        if overrides:
            logger.info(f"overrides of the run's config: {' '.join(overrides)}")
        (out / "config.yaml").write_text(
            _yaml({"evaluate": cfg, "overrides": overrides, "checkpoint": str(checkpoint), "run": config})
        )
        report(out, cfg, split, data, restored, loss_fn, state, checkpoint)
        logger.info(f"results in {out}")
        return out
    except Exception as exc:
        logger.error(f"evaluation failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        teardown_logging(log_ids)


def report(out: Path, cfg: dict, split: str, data, restored, loss_fn, state: dict, checkpoint: Path) -> None:
    """Predict every sample of `split`, then write the files, TensorBoard entries and console tables."""
    import matplotlib.pyplot as plt
    import numpy as np
    from loguru import logger
    from torch.utils.tensorboard import SummaryWriter

    from imgcls import metrics as m
    from imgcls import tables
    from imgcls.inference import predict, topk_indices
    from imgcls.plots import error_grid_figure, reliability_figure
    from imgcls.reports import confusion, confusion_figure, prediction_rows, report_text, write_csv

    class_names = data.class_names
    pipeline = (
        restored.pipelines["val"]
        if split == "train"
        else restored.pipelines.get(split, restored.pipelines["val"])
    )
    loader = data.loader(split, pipeline, train=False, pin_memory=restored.device.type == "cuda")
    p = predict(
        restored.model, loader, restored.device, restored.normalize, loss_fn=loss_fn,
        channels_last=restored.channels_last, description=split, log_every=restored.log_every,
    )  # fmt: skip
    k = max(1, min(int(cfg["top_k"]), len(class_names)))
    n_bins = int(cfg["calibration_bins"])
    epoch = int(state.get("epoch", 0))
    metrics = m.summary(split, p, k, n_bins)
    paths = [path for path, _ in data.samples[split]]
    probs, confidence = p.probs, p.confidence

    write_csv(
        out / "predictions.csv",
        prediction_rows(paths, probs, p.preds, topk_indices(p.logits, k), class_names, p.targets, p.losses),
    )
    (out / "classification_report.txt").write_text(report_text(p.targets, p.preds, class_names))
    scores = m.per_class_scores(p.targets, p.preds, class_names)
    (out / "classification_report.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out / "metrics.json").write_text(
        json.dumps(
            {
                **metrics,
                "epoch": epoch,
                "split": split,
                "checkpoint": str(checkpoint),
                "top_k": k,
                "calibration_bins": n_bins,
            },
            indent=2,
        )
        + "\n"
    )

    cm = confusion(p.targets, p.preds, len(class_names))
    bins = m.calibration_bins(confidence, p.correct, n_bins)
    acc = metrics[f"{split}/acc"]
    wrong = np.flatnonzero(~p.correct)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][: int(cfg["errors_shown"])]
    title = f"{split}, {checkpoint.name} (epoch {epoch})"
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
        for name, fig in figures.items():
            fig.savefig(out / f"{name}.png", dpi=100)
            writer.add_figure(f"{name}/{split}", fig, global_step=epoch, close=False)
            plt.close(fig)
        text = (out / "classification_report.txt").read_text()
        # four leading spaces per line make TensorBoard's markdown keep the table's columns
        writer.add_text(f"classification_report/{split}", "    " + text.replace("\n", "\n    "), epoch)
        for i, name in enumerate(class_names):
            writer.add_pr_curve(f"pr_curve/{split}/{name}", p.targets == i, probs[:, i], global_step=epoch)
    finally:
        writer.close()

    overall = [
        ("split", f"{split} ({data.root / data.split_dirs[split]})"),
        ("checkpoint", f"{checkpoint} (epoch {epoch})"),
        ("samples", str(len(paths))),
        ("accuracy", f"{acc:.4f} ({int(p.correct.sum())}/{len(paths)})"),
        (f"top-{k} accuracy", f"{metrics[f'{split}/acc_top{k}']:.4f}"),
        ("mean loss", f"{metrics[f'{split}/loss']:.4f}"),
        (f"ECE ({n_bins} bins)", f"{metrics[f'{split}/ece']:.4f}"),
    ]
    recorded = {int(h["epoch"]): h for h in state.get("history", []) if "epoch" in h}
    if split == "val" and epoch in recorded:
        overall.append(("val acc in training", f"{recorded[epoch]['val/acc']:.4f} (epoch {epoch})"))
    text = tables.show(
        [
            tables.metrics_table("evaluation", overall),
            tables.class_table(scores),
            tables.confused_table(m.confused_pairs(cm, class_names)),
        ]
    )
    logger.debug("\n" + text)  # the file sink only: the console already shows the tables
    logger.info(
        f"{split}: accuracy {acc:.4f}, top-{k} {metrics[f'{split}/acc_top{k}']:.4f}, "
        f"loss {metrics[f'{split}/loss']:.4f}, ECE {metrics[f'{split}/ece']:.4f} on {len(paths)} images"
    )


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def main() -> None:
    main_over_run("evaluate", run)


if __name__ == "__main__":
    main()
