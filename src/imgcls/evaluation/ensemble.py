"""Evaluation members: one run's checkpoint, config and data, loaded and checked before anything
predicts; and ensembles of them (the mean of their softmax probabilities)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.config import build as b
from imgcls.data.loaders import make_loader
from imgcls.evaluation import metrics as m
from imgcls.evaluation.inference import Predictions, predict
from imgcls.evaluation.labels import checked_record, labelled_record
from imgcls.runs import find_checkpoint, load_run, restore


@dataclass
class Member:
    run_dir: Path
    checkpoint: Path
    config: dict
    state: dict
    data: Any  # the run's data options (ImageFolderData)
    record: Any  # the split's samples labelled by the checkpoint's classes (DataRecord)
    split: str
    predictions: Any = None
    paths: list[str] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return list(self.state["class_names"])

    def predict(self, views: list[str], crop_scale: float) -> None:
        """Build the model on its device, predict every sample of the split, free the model."""
        restored = restore(self.config, self.state, self.checkpoint)
        # class-weighted losses weigh by the train split's counts, which the checkpoint keeps
        loss_fn = b.build_loss(self.config["loss"], class_counts=self.state.get("class_counts"))
        pipelines = restored.pipelines
        pipeline = pipelines["val"] if self.split == "train" else pipelines.get(self.split, pipelines["val"])
        loader = make_loader(
            self.data,
            self.record,
            self.split,
            pipeline,
            train=False,
            pin_memory=restored.device.type == "cuda",
        )
        self.predictions = predict(
            restored.model,
            loader,
            restored.place,
            loss_fn=loss_fn,
            description=self.split,
            views=views,
            crop_scale=crop_scale,
        )


def load_member(run_dir: Path, cfg: dict, overrides: list[str], split: str) -> Member:
    """The run's checkpoint and config (overrides on top, every _target_ checked) and its split's
    samples labelled by the checkpoint's classes: every error here comes before any prediction."""
    checkpoint = find_checkpoint(run_dir, cfg["checkpoint"])
    config, state = load_run(run_dir, checkpoint, overrides)
    class_names = list(state["class_names"])
    # the data next: a missing split or class folders that differ fail before any model is built
    data = b.build_data(config["data"])
    record = checked_record(data, split, class_names, state) or labelled_record(data, split, class_names)
    paths = [os.path.abspath(p) for p, _ in record.samples[split]]
    return Member(run_dir, checkpoint, config, state, data, record, split, paths=paths)


def ensemble_predictions(members: list[Any]):
    """The mean of the members' softmax probabilities, sample by sample (they share one loader
    order); logits are its log, losses the negative log-likelihood of the true class."""
    probs = np.mean([p.probs for p in members], axis=0)
    targets = members[0].targets
    log_probs = np.log(np.maximum(probs, np.finfo(np.float64).tiny))  # a 0 is floored, not -inf
    losses = -log_probs[np.arange(len(targets)), targets]
    return Predictions(log_probs.astype(np.float32), probs.argmax(1), targets, losses)


def member_row(member: Member, split: str, k: int, n_bins: int) -> dict:
    s = m.summary(split, member.predictions, k, n_bins)
    return {
        "run_dir": str(member.run_dir),
        "checkpoint": str(member.checkpoint),
        "epoch": int(member.state.get("epoch", 0)),
        "acc": s[f"{split}/acc"],
        "top_k_acc": s[f"{split}/acc_top{k}"],
        "loss": s[f"{split}/loss"],
        "ece": s[f"{split}/ece"],
    }


def ensemble_dir(run_dirs: list[Path]) -> Path:
    """<the runs' common parent>/ensemble (e.g. a sweep's folder); ./ensembles when they share
    nothing below the file system's root."""
    common = Path(os.path.commonpath([str(Path(r).resolve().parent) for r in run_dirs]))
    if common == Path(common.anchor):
        return Path.cwd() / "ensembles"
    return common / "ensemble"
