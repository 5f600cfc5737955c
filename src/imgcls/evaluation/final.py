"""A training run's final reports: every split evaluated with best.pt's weights, once training ends."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from loguru import logger

from imgcls.checkpoint import load_checkpoint
from imgcls.files import atomic_write
from imgcls.training.engine import evaluate


def report_best_weights(run, run_dir: Path, recorder, best_epoch: int) -> dict[str, dict[str, float]]:
    """Every split of a built training run evaluated with best.pt's weights (train through the eval
    pipeline): the classification report (logs/classification_report_<split>.txt and .json, the
    record's files.reports), confusion matrices and TensorBoard entries (rank 0), and
    {<split>: {acc, loss}}, the record's `final`."""
    # scikit-learn and matplotlib: lazy for start-up time, imported when the reports are due
    from imgcls.evaluation.reports import write_split_report
    from imgcls.evaluation.scores import report_dict

    run.model.load_state_dict(load_checkpoint(run_dir / "weights" / "best.pt")["model"])
    # progress lines every 50 batches, as these reports always logged them
    place, final = replace(run.place, log_every=50), {}
    for split in run.loaders:
        metrics, targets, preds = evaluate(run.model, run.eval_loader(split), run.loss_fn, place, split)
        final[split] = {"acc": metrics[f"{split}/acc"], "loss": metrics[f"{split}/loss"]}
        if not place.d.main:
            continue
        note = one_class_note(targets, preds, run.class_names) if split == "val" else None
        if note:
            logger.warning(note)
            recorder.add_note(note)
        text = write_split_report(
            split, targets, preds, run.class_names, run_dir, recorder.writer, best_epoch
        )
        # the same JSON as evaluate's classification_report.json: what pages and scripts read
        scores = report_dict(targets, preds, run.class_names)
        atomic_write(
            run_dir / "logs" / f"classification_report_{split}.json", json.dumps(scores, indent=2) + "\n"
        )
        logger.info(
            f"{split} (best weights, epoch {best_epoch}): accuracy {metrics[f'{split}/acc']:.4f}\n{text}"
        )
    return final


def one_class_note(targets, preds, class_names) -> str | None:
    """A note when the model predicts one class for every image of a split that has several: its
    accuracy is that class's share, what a constant guess gets (a diverged lr, too few epochs,
    features that cannot tell the classes apart). None otherwise."""
    import numpy as np

    targets, preds = np.asarray(targets), np.asarray(preds)
    predicted = np.unique(preds)
    if len(predicted) != 1 or len(np.unique(targets)) < 2:
        return None
    only = int(predicted[0])
    return (
        f"the best weights predict one class, {class_names[only]!r}, for every one of the {len(preds)} "
        f"val images (val accuracy {np.mean(targets == only):.4f} is that class's share: what a constant "
        "guess gets). The model learned nothing that tells the classes apart: try a lower optimizer.lr, "
        "more trainer.epochs, or check the data."
    )
