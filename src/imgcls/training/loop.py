"""The epoch loop: train, validate, schedule, record and checkpoint, until done or stopped."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn

from imgcls import __version__
from imgcls.checkpoint import load_checkpoint, save_checkpoint
from imgcls.training.distributed import SINGLE, Dist, any_rank, gather, sync_buffers
from imgcls.training.engine import NonFiniteLossError, StopTraining, evaluate, is_finite, train_one_epoch
from imgcls.training.recipes import (
    Recipe,
    early_stop_reason,
    plateau_metric,
    scheduler_interval,
    selection_score,
    top_k_epochs,
)  # fmt: skip
from imgcls.training.seeding import epoch_seed, rng_state, seed_everything
from imgcls.training.speed import FP32, Precision


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    epoch: int,
    history: list[dict[str, float]],
    best_acc: float,
    best_epoch: int,
    config: dict,
    class_names: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to resume or evaluate, as tensors and plain Python values only.

    `extra` adds entries of its own (plain values), e.g. a fingerprint of the data."""
    return {
        **(extra or {}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "history": [dict(row) for row in history],
        "best_acc": best_acc,
        "best_epoch": best_epoch,
        "config": config,
        "class_names": list(class_names),
        "rng": rng_state(),
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
        "imgcls_version": __version__,
    }


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable,
    loaders: dict[str, Any],
    normalize: nn.Module,
    device: torch.device,
    *,
    epochs: int,
    seed: int,
    weights_dir: Path,
    config: dict,
    class_names: list[str],
    on_epoch: Callable[[dict[str, float], list[dict[str, float]]], None] = lambda m, h: None,
    on_step: Callable[[], None] = lambda: None,
    checkpoint_extra: dict[str, Any] | None = None,
    channels_last: bool = False,
    log_every: int = 50,
    resume: dict[str, Any] | None = None,
    should_stop: Callable[[], int | None] = lambda: None,
    train_model: nn.Module | None = None,
    recipe: Recipe | None = None,
    early_stopping: tuple[int | None, float] = (None, 0.0),
    keep_top_k: int = 0,
    d: Dist = SINGLE,
    amp: Precision = FP32,
) -> dict[str, Any]:
    """for epoch: train, validate (the EMA too), step the schedule, record, save last.pt, best.pt
    on a new best score (the better of val/acc and the EMA's val/acc, whose weights best.pt then
    holds) and the top-k epochs; stop early when the score stalls for `early_stopping` =
    (patience, min_delta). `resume` is a checkpoint whose states were already restored: training
    continues after its epoch (and step, when it stopped mid-epoch).

    A signal (`should_stop`) or a non-finite loss stops the epoch at a step boundary: last.pt then
    holds that mid-epoch state and RunInterrupted / NonFiniteLossError propagate. Under torchrun,
    `train_model` is the DistributedDataParallel wrapper of `model`; every rank runs this loop in
    step and rank 0 alone writes checkpoints.

    Returns {"history", "best_acc", "best_epoch", "stopped_early"}.
    """
    from imgcls.data.sampling import set_epoch
    from imgcls.training.signals import RunInterrupted

    resume = resume or {}
    recipe = recipe or Recipe()
    interval = scheduler_interval(scheduler)
    if interval == "step":
        recipe.step_scheduler = scheduler
    ema = recipe.ema
    history: list[dict[str, float]] = [dict(h) for h in resume.get("history", [])]
    best_acc, best_epoch = resume.get("best_acc", -1.0), resume.get("best_epoch", 0)
    start_step, partial = resume.get("step", 0), resume.get("partial")
    if resume.get("partial_ranks") and d.enabled:
        partial = resume["partial_ranks"][d.rank]
    # `is None`, not `or`: a torch.compile wrapper raises on bool() (it forwards __len__)
    train_model = model if train_model is None else train_model
    last_path = weights_dir / "last.pt"
    stopped_early = early_stop_reason(history, *early_stopping)

    def state(epoch: int, partial: dict | None = None, **extra: Any) -> dict[str, Any]:
        if d.enabled:  # collectives: every rank builds the state, rank 0 saves it
            extra["rng_ranks"] = gather(rng_state(), d)
            extra["partial_ranks"] = gather(partial, d) if partial else None
        if ema is not None:
            extra["ema"] = ema.state_dict()
        return training_state(
            model, optimizer, scheduler, epoch=epoch, history=history, best_acc=best_acc,
            best_epoch=best_epoch, config=config, class_names=class_names,
            extra={**(checkpoint_extra or {}), **amp.state_dict(), **extra, "partial": partial},
        )  # fmt: skip

    def save(state: dict[str, Any], path: Path) -> None:
        if d.main:
            save_checkpoint(state, path)

    for epoch in range(resume.get("epoch", 0) + 1, epochs + 1):
        if stopped_early:
            break
        if start_step == 0:
            # this epoch's dropout, mixup and other in-loop draws follow from (seed, epoch);
            # mid-epoch, the caller restored the generators as they were when the run stopped
            seed_everything(epoch_seed(seed, epoch))
        set_epoch(loaders["train"], epoch, start_step)
        # the rate the epoch started with (a per-step schedule has moved it by a mid-epoch stop)
        lr = (
            resume.get("epoch_lr")
            if start_step and resume.get("epoch_lr")
            else optimizer.param_groups[0]["lr"]
        )
        try:
            train_metrics = train_one_epoch(
                train_model, loaders["train"], loss_fn, optimizer, device, normalize,
                channels_last=channels_last, description=f"epoch {epoch}/{epochs}", log_every=log_every,
                start_step=start_step, partial=partial, should_stop=should_stop, on_step=on_step,
                recipe=recipe, d=d, amp=amp,
            )  # fmt: skip
        except StopTraining as stop:
            save(state(epoch - 1, step=stop.step, partial=stop.partial, epoch_lr=lr), last_path)
            raise RunInterrupted(stop.signum, epoch, stop.step, str(last_path)) from None
        except NonFiniteLossError as exc:
            # the forward pass may already have pushed BatchNorm statistics to inf: save only a
            # finite state, so last.pt and best.pt never hold a NaN
            if is_finite(model):
                save(state(epoch - 1, step=exc.step, partial=exc.partial, epoch_lr=lr), last_path)
                where = f"{last_path} holds the weights before that step"
            else:
                where = f"the weights were no longer finite; {last_path} keeps the last finite epoch"
            raise NonFiniteLossError(f"{exc} ({where})", exc.step, exc.partial) from None
        start_step, partial = 0, None
        sync_buffers(model, d)  # evaluate and save rank 0's model, the same on every rank
        # BatchNorm statistics recomputed for these weights: validation, best.pt and every report
        # then measure the model itself; the next epoch trains on from them (as on resume)
        recal = (
            recipe.recalibrate([model] + ([ema.module] if ema else []), epoch) if recipe.recalibrate else {}
        )
        evaluation = {
            "split": "val",
            "channels_last": channels_last,
            "log_every": log_every,
            "d": d,
            "amp": amp,
        }
        val_metrics, _, _ = evaluate(model, loaders["val"], loss_fn, device, normalize, **evaluation)
        if ema is not None:
            ema_metrics, _, _ = evaluate(ema.module, loaders["val"], loss_fn, device, normalize, **evaluation)
            val_metrics["val/loss_ema"], val_metrics["val/acc_ema"] = (
                ema_metrics["val/loss"],
                ema_metrics["val/acc"],
            )
        if not is_finite(model):
            raise NonFiniteLossError(
                f"epoch {epoch}: the weights became non-finite (an optimizer step overflowed); "
                f"{last_path} keeps the last finite epoch. Lower optimizer.lr."
            )
        if interval == "epoch":
            scheduler.step()
        elif interval == "plateau":
            scheduler.step(plateau_metric(scheduler, val_metrics))
        score = selection_score(val_metrics)
        improved = score > best_acc
        if improved:
            best_acc, best_epoch = score, epoch
        metrics = {
            "epoch": epoch,
            **train_metrics,
            **recal,
            **val_metrics,
            "val/acc_best": best_acc,
            "lr": lr,
        }
        history.append(metrics)
        ema_note = f", ema {val_metrics['val/acc_ema']:.4f}" if ema is not None else ""
        recal_s = recal.get("bn_recal/time_s", 0.0)
        recal_note = f", BatchNorm recalibrated {recal_s:.1f} s" if recal else ""
        logger.info(
            f"epoch {epoch}/{epochs}  train loss {metrics['train/loss']:.4f} acc {metrics['train/acc']:.4f}"
            f"  | val loss {metrics['val/loss']:.4f} acc {metrics['val/acc']:.4f}{ema_note}"
            f" (best {best_acc:.4f} @{best_epoch})  | lr {lr:.3g}"
            f"  | {metrics['train/time_s'] + recal_s + metrics['val/time_s']:.1f} s"
            f" ({metrics['train/images_per_s']:.0f} img/s train{recal_note})" + ("  *" if improved else "")
        )
        # record first, then save: a kill in between redoes this epoch on resume, and the
        # TensorBoard writer of the resumed run purges the orphaned points
        on_epoch(metrics, history)
        epoch_state = state(epoch, step=0, partial=None)
        save(epoch_state, last_path)
        if improved:
            use_ema = ema is not None and val_metrics["val/acc_ema"] > val_metrics["val/acc"]
            best_state = dict(epoch_state, model=ema.module.state_dict(), best_source="ema") if use_ema else (
                dict(epoch_state, best_source="raw"))  # fmt: skip
            save(best_state, weights_dir / "best.pt")
        if keep_top_k and d.main:
            keep_top(epoch_state, history, keep_top_k, weights_dir, ema)
        stopped_early = early_stop_reason(history, *early_stopping)
        if stopped_early:
            logger.info(stopped_early)
        signum = any_rank(should_stop(), d, device)
        if signum is not None and epoch < epochs and not stopped_early:
            raise RunInterrupted(signum, epoch + 1, 0, str(last_path))
    return {
        "history": history,
        "best_acc": best_acc,
        "best_epoch": best_epoch,
        "stopped_early": stopped_early,
    }


def keep_top(state: dict[str, Any], history: list[dict], k: int, weights_dir: Path, ema) -> None:
    """weights/top-epoch<NNN>-acc<score>.pt for the k best epochs; the others are removed."""
    keep = set(top_k_epochs(history, k))
    epoch = state["epoch"]
    if epoch in keep:
        row = history[-1]
        name = f"top-epoch{epoch:03d}-acc{selection_score(row):.4f}.pt"
        use_ema = ema is not None and row.get("val/acc_ema", -1) > row["val/acc"]
        save_checkpoint(dict(state, model=ema.module.state_dict()) if use_ema else state, weights_dir / name)
    for path in weights_dir.glob("top-epoch*.pt"):
        if int(path.name[len("top-epoch") : len("top-epoch") + 3]) not in keep:
            path.unlink()


def report_best_weights(
    model, run_dir: Path, data, record, pipelines: dict, shard: dict, loss_fn, device, normalize, recorder,
    best_epoch: int, *, channels_last: bool, d, amp,
) -> dict[str, float]:  # fmt: skip
    """Every split evaluated with best.pt's weights (train through the eval pipeline): the
    classification report, confusion matrices and TensorBoard entries (rank 0), and
    {<split>/acc_best_weights} for the summary."""
    from imgcls.data.loaders import make_loader
    from imgcls.evaluation.reports import write_split_report  # matplotlib: imported when the reports are due

    model.load_state_dict(load_checkpoint(run_dir / "weights" / "best.pt")["model"])
    final: dict[str, float] = {}
    for split in record.splits:
        pipeline = pipelines["val"] if split == "train" else pipelines[split]
        loader = make_loader(data, record, split, pipeline, train=False, **shard)
        metrics, targets, preds = evaluate(
            model, loader, loss_fn, device, normalize, split=split, channels_last=channels_last, d=d, amp=amp
        )
        final[f"{split}/acc_best_weights"] = metrics[f"{split}/acc"]
        if not d.main:
            continue
        note = one_class_note(targets, preds, record.class_names) if split == "val" else None
        if note:
            logger.warning(note)
            recorder.add_note(note)
        text = write_split_report(
            split, targets, preds, record.class_names, run_dir, recorder.writer, best_epoch
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
