"""The epoch loop: train, validate, schedule, record and checkpoint, until done or stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn

from imgcls import __version__
from imgcls.checkpoint import save_checkpoint
from imgcls.run_record import best_of, selected_metric, selection_score
from imgcls.sweeps.pruning import RunPruned
from imgcls.training.distributed import any_rank, gather, sync_buffers
from imgcls.training.engine import NonFiniteLossError, StopTraining, evaluate, is_finite, train_one_epoch
from imgcls.training.recipes import (
    early_stop_reason,
    plateau_metric,
    scheduler_interval,
    top_k_epochs,
)
from imgcls.training.resume import TrainingState
from imgcls.training.run import Run
from imgcls.training.seeding import epoch_seed, rng_state, seed_everything


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


@dataclass(frozen=True)
class FitHooks:
    """What the caller gives the loop besides the run: callbacks after each epoch (the recorder)
    and each optimizer step (the heartbeat), a stop request (a signal's number) checked at step
    boundaries, a pruning check after each epoch (an Optuna sweep's trial: the reason to stop, or
    None) and checkpoint entries of its own (plain values)."""

    on_epoch: Callable[[dict[str, float], list[dict[str, float]]], None] = lambda m, h: None
    on_step: Callable[[], None] = lambda: None
    should_stop: Callable[[], int | None] = lambda: None
    should_prune: Callable[[int, list[dict[str, float]]], str | None] = lambda epoch, history: None
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)


def fit(run: Run, state: TrainingState, weights_dir: Path, hooks: FitHooks = FitHooks()) -> dict[str, Any]:
    """for epoch: train, validate (the EMA too), step the schedule, record, save last.pt, best.pt
    on a new best score (the better of val/acc and the EMA's val/acc, whose weights best.pt then
    holds) and the top-k epochs; stop early when the score stalls (trainer.early_stopping).
    Training continues after `state` (a resumed run's, restored by resume.resume_into; mid-epoch
    too). A signal or a non-finite loss stops the epoch at a step boundary: last.pt then holds that
    mid-epoch state and RunInterrupted / NonFiniteLossError propagate; a run the study's pruner
    stops (hooks.should_prune) raises RunPruned after its epoch is saved. Under torchrun every rank
    runs this loop in step and rank 0 alone writes checkpoints.

    Returns {"history", "best_acc", "best_epoch", "stopped_early"}."""
    from imgcls.data.sampling import set_epoch
    from imgcls.training.signals import RunInterrupted

    state = state.copy()  # the caller's state and recipe stay as they were
    recipe = replace(run.recipe, on_step=hooks.on_step, should_stop=hooks.should_stop)
    saver = Checkpoints(run, weights_dir, hooks.checkpoint_extra)
    stopped_early = early_stop_reason(state.history, *run.early_stopping)
    for epoch in range(state.epoch + 1, run.epochs + 1):
        if stopped_early:
            break
        if state.step == 0:
            # this epoch's dropout, mixup and other in-loop draws follow from (seed, epoch);
            # mid-epoch, resume_into restored the generators as they were when the run stopped
            seed_everything(epoch_seed(run.seed, epoch))
        set_epoch(run.loaders["train"], epoch, state.step)
        # the rate the epoch started with (a per-step schedule has moved it by a mid-epoch stop)
        lr = state.epoch_lr if state.step and state.epoch_lr else run.optimizer.param_groups[0]["lr"]
        with saved_when_stopped(run, state, epoch, lr, saver):
            train_metrics = train_one_epoch(
                run.train_model, run.loaders["train"], run.loss_fn, run.optimizer, run.place, recipe=recipe,
                description=f"epoch {epoch}/{run.epochs}", start=(state.step, state.partial),
            )  # fmt: skip
        state.step, state.partial = 0, None
        sync_buffers(run.model, run.dist)  # evaluate and save rank 0's model, the same on every rank
        val_metrics = validate(run, epoch, saver.last)
        step_schedule(run.scheduler, val_metrics)
        row = {"epoch": epoch, **train_metrics, **val_metrics}
        # the one definition of best (run_record.best_of), as the record and every view name it
        best = best_of([*state.history, row])
        improved = best.epoch == epoch
        state.best_acc, state.best_epoch = best.score, best.epoch
        metrics = {**row, "val/acc_best": best.score, "lr": lr}
        state.history.append(metrics)
        log_epoch(metrics, run.epochs, state, improved)
        # record first, then save: a kill in between redoes this epoch on resume, and the
        # TensorBoard writer of the resumed run purges the orphaned points
        hooks.on_epoch(metrics, state.history)
        saver.epoch_end(state, epoch, improved)
        stopped_early = early_stop_reason(state.history, *run.early_stopping)
        if stopped_early:
            logger.info(stopped_early)
        # beside early stopping, after last.pt holds this epoch (resume= continues a pruned run);
        # rank 0 alone asks the study, and every rank stops with it
        reason = None if stopped_early else hooks.should_prune(epoch, state.history)
        if any_rank(1 if reason else None, run.dist, run.device) and epoch < run.epochs:
            raise RunPruned(reason or f"pruned at epoch {epoch} of {run.epochs}", epoch)
        signum = any_rank(hooks.should_stop(), run.dist, run.device)
        if signum is not None and epoch < run.epochs and not stopped_early:
            raise RunInterrupted(signum, epoch + 1, 0, str(saver.last))
    return {
        "history": state.history,
        "best_acc": state.best_acc,
        "best_epoch": state.best_epoch,
        "stopped_early": stopped_early,
    }


@contextmanager
def saved_when_stopped(run: Run, state: TrainingState, epoch: int, lr: float, saver) -> Iterator[None]:
    """Around an epoch's training: a stop or a non-finite loss saves last.pt at the step boundary
    (a finite state only) before it propagates."""
    from imgcls.training.signals import RunInterrupted

    try:
        yield
    except StopTraining as stop:
        saver.save(
            saver.state(state, epoch - 1, step=stop.step, partial=stop.partial, epoch_lr=lr), saver.last
        )
        raise RunInterrupted(stop.signum, epoch, stop.step, str(saver.last)) from None
    except NonFiniteLossError as exc:
        # the forward pass may already have pushed BatchNorm statistics to inf: save only a
        # finite state, so last.pt and best.pt never hold a NaN
        if is_finite(run.model):
            saver.save(
                saver.state(state, epoch - 1, step=exc.step, partial=exc.partial, epoch_lr=lr), saver.last
            )
            where = f"{saver.last} holds the weights before that step"
        else:
            where = f"the weights were no longer finite; {saver.last} keeps the last finite epoch"
        raise NonFiniteLossError(f"{exc} ({where})", exc.step, exc.partial) from None


def validate(run: Run, epoch: int, last_path: Path) -> dict[str, float]:
    """The recalibration's cost, then val/loss and val/acc (and the EMA's: val/loss_ema, val/acc_ema)."""
    ema, model, recipe = run.recipe.ema, run.model, run.recipe
    # BatchNorm statistics recomputed for these weights: validation, best.pt and every report
    # then measure the model itself; the next epoch trains on from them (as on resume)
    recal = recipe.recalibrate([model] + ([ema.module] if ema else []), epoch) if recipe.recalibrate else {}
    metrics, _, _ = evaluate(model, run.loaders["val"], run.loss_fn, run.place)
    if ema is not None:
        ema_metrics, _, _ = evaluate(ema.module, run.loaders["val"], run.loss_fn, run.place)
        metrics["val/loss_ema"], metrics["val/acc_ema"] = ema_metrics["val/loss"], ema_metrics["val/acc"]
    if not is_finite(model):
        raise NonFiniteLossError(
            f"epoch {epoch}: the weights became non-finite (an optimizer step overflowed); "
            f"{last_path} keeps the last finite epoch. Lower optimizer.lr."
        )
    return {**recal, **metrics}


def step_schedule(scheduler: Any, val_metrics: dict[str, float]) -> None:
    """After validation: a per-epoch schedule steps, a plateau schedule watches its metric (a
    per-step schedule stepped after each optimizer step, in the recipe)."""
    interval = scheduler_interval(scheduler)
    if interval == "epoch":
        scheduler.step()
    elif interval == "plateau":
        scheduler.step(plateau_metric(scheduler, val_metrics))


def log_epoch(metrics: dict[str, float], epochs: int, state: TrainingState, improved: bool) -> None:
    ema_note = f", ema {metrics['val/acc_ema']:.4f}" if "val/acc_ema" in metrics else ""
    recal_s = metrics.get("bn_recal/time_s", 0.0)
    recal_note = f", BatchNorm recalibrated {recal_s:.1f} s" if "bn_recal/time_s" in metrics else ""
    logger.info(
        f"epoch {metrics['epoch']}/{epochs}  train loss {metrics['train/loss']:.4f} acc {metrics['train/acc']:.4f}"
        f"  | val loss {metrics['val/loss']:.4f} acc {metrics['val/acc']:.4f}{ema_note}"
        f" (best {state.best_acc:.4f} @{state.best_epoch})  | lr {metrics['lr']:.3g}"
        f"  | {metrics['train/time_s'] + recal_s + metrics['val/time_s']:.1f} s"
        f" ({metrics['train/images_per_s']:.0f} img/s train{recal_note})" + ("  *" if improved else "")
    )


class Checkpoints:
    """What fit writes (rank 0 only; every rank builds the states, which gather across ranks):
    last.pt, best.pt (the EMA's weights when they scored better) and the top-k epochs."""

    def __init__(self, run: Run, weights_dir: Path, extra: dict[str, Any]):
        self.run, self.weights_dir, self.extra = run, weights_dir, {**run.checkpoint_entries, **extra}
        self.last = weights_dir / "last.pt"

    def state(
        self, ts: TrainingState, epoch: int, partial: dict | None = None, **extra: Any
    ) -> dict[str, Any]:
        run, d, ema = self.run, self.run.dist, self.run.recipe.ema
        if d.enabled:  # collectives: every rank builds the state, rank 0 saves it
            extra["rng_ranks"] = gather(rng_state(), d)
            extra["partial_ranks"] = gather(partial, d) if partial else None
        if ema is not None:
            extra["ema"] = ema.state_dict()
        return training_state(
            run.model, run.optimizer, run.scheduler, epoch=epoch, history=ts.history, best_acc=ts.best_acc,
            best_epoch=ts.best_epoch, config=run.config, class_names=run.class_names,
            extra={**self.extra, **run.amp.state_dict(), **extra, "partial": partial},
        )  # fmt: skip

    def save(self, state: dict[str, Any], path: Path) -> None:
        if self.run.dist.main:
            save_checkpoint(state, path)

    def epoch_end(self, ts: TrainingState, epoch: int, improved: bool) -> None:
        ema, row = self.run.recipe.ema, ts.history[-1]
        epoch_state = self.state(ts, epoch, step=0, partial=None)
        self.save(epoch_state, self.last)
        if improved:
            use_ema = ema is not None and selected_metric(row) == "val/acc_ema"
            best_state = dict(epoch_state, model=ema.module.state_dict(), best_source="ema") if use_ema else (
                dict(epoch_state, best_source="raw"))  # fmt: skip
            self.save(best_state, self.weights_dir / "best.pt")
        if self.run.keep_top_k and self.run.dist.main:
            keep_top(epoch_state, ts.history, self.run.keep_top_k, self.weights_dir, ema)


def keep_top(state: dict[str, Any], history: list[dict], k: int, weights_dir: Path, ema) -> None:
    """weights/top-epoch<NNN>-acc<score>.pt for the k best epochs; the others are removed."""
    keep = set(top_k_epochs(history, k))
    epoch = state["epoch"]
    if epoch in keep:
        row = history[-1]
        name = f"top-epoch{epoch:03d}-acc{selection_score(row):.4f}.pt"
        use_ema = ema is not None and selected_metric(row) == "val/acc_ema"
        save_checkpoint(dict(state, model=ema.module.state_dict()) if use_ema else state, weights_dir / name)
    for path in weights_dir.glob("top-epoch*.pt"):
        if int(path.name[len("top-epoch") : len("top-epoch") + 3]) not in keep:
            path.unlink()
