"""`python -m imgcls.train`: compose the config, build it, fit, report; returns the record's best score."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from imgcls.cli import run_command
from imgcls.errors import UserError
from imgcls.run_record import Best
from imgcls.sweeps.pruning import RunPruned, TrialLink, TrialReporter, trial_link, trial_pruned


def run(
    cfg: DictConfig | dict,
    run_dir: Path,
    overrides: list[str] = (),
    record: Callable[[Path], None] | None = None,
    sweep_dir: Path | None = None,
    trial: TrialLink | None = None,
) -> float:
    """Train the composed config in run_dir. Heavy imports live here so --help stays instant.
    `record(run_dir)` writes a resume's record once the resume is accepted; `sweep_dir` is set for
    a job of a -m sweep (a tracked job is nested under the sweep's parent run); `trial` links a job
    of an Optuna sweep to its trial: it reports each epoch and stops when the pruner says so,
    raising optuna.TrialPruned (its record then says `pruned`)."""
    from imgcls.config.naming import env_rank, hold_run_dir, release_run_dir
    from imgcls.log import setup_logging, teardown_logging
    from imgcls.tracking import NullTracker, make_tracker
    from imgcls.training import distributed
    from imgcls.training.recorder import NullRecorder, RunRecorder, outcome, record_refused_config
    from imgcls.training.resume import config_to_run
    from imgcls.training.signals import RunInterrupted, release_signals

    claimed = Path(run_dir)
    if env_rank() == 0:  # under torchrun rank 0 alone writes the run
        # one writer per run: a single run claimed its directory before Hydra wrote (preflight), a
        # sweep's job claims its numbered folder here; held until the final summary is written
        hold_run_dir(claimed)
    try:
        d, device_spec, run_dir, log_ids = distributed.enter(cfg, claimed)
        try:
            config, unresolved, ckpt = config_to_run(cfg, list(overrides))
        except UserError:
            if not OmegaConf.is_config(cfg) or cfg.get("resume") or not d.main:
                teardown_logging(log_ids)
                raise  # a refused resume leaves the saved run's summary as it was
            record_refused_config(run_dir, OmegaConf.to_container(cfg, resolve=False), str(sys.exc_info()[1]))
            teardown_logging(log_ids)
            raise
        if d.main:
            if ckpt:
                log_ids = setup_logging(run_dir / "logs" / "train.log")
                if record is not None:
                    record(run_dir)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
            recorder = RunRecorder(
                run_dir, config, config["trainer"]["epochs"], info={},
                history=ckpt["history"] if ckpt else None, started=ckpt.get("run_started") if ckpt else None,
            )  # fmt: skip
        else:
            recorder = NullRecorder()
        tracker = make_tracker(config.get("tracking"), run_dir, sweep_dir) if d.main else NullTracker()
        try:
            # the tracker ends its run after the recorder has written the final summary.txt
            # a pruned run ends KILLED in MLflow, as an interrupted one: resume= continues it
            with tracker.ended(interrupted=(RunInterrupted, KeyboardInterrupt, RunPruned)), outcome(recorder):
                return train_run(config, unresolved, run_dir, recorder, ckpt, d, device_spec, tracker, trial)
        finally:
            recorder.close()
            teardown_logging(log_ids)
            distributed.shutdown()
            release_signals()  # a stopped run held its signal handler until its summary was written
    except RunPruned as exc:
        raise trial_pruned(exc) from None  # the sweeper tells the trial PRUNED
    finally:
        release_run_dir(claimed)


def train_run(
    config: dict,
    unresolved: dict,
    run_dir: Path,
    recorder,
    ckpt: dict | None,
    d,
    device_spec: str,
    tracker,
    trial: TrialLink | None = None,
) -> float:
    """Build the run from the plain config, restore the checkpoint if any, fit, report."""
    from loguru import logger

    from imgcls.evaluation.final import report_best_weights
    from imgcls.files import atomic_write
    from imgcls.training import distributed
    from imgcls.training.loop import FitHooks, fit
    from imgcls.training.recorder import log_setup
    from imgcls.training.resume import remove_stale_temp_files, resume_into
    from imgcls.training.run import build_run, describe
    from imgcls.training.signals import stop_on_signals
    from imgcls.training.speed import FirstStep

    logger.info(f"run directory: {run_dir}")
    if ckpt:
        logger.info(f"resuming {config['resume']}: epoch {ckpt['epoch']} done, step {ckpt.get('step', 0)}")
    tracked = tracker.start(config, ckpt)  # before the run is built: a store that cannot open stops here
    run = build_run(
        config, d, train=True, device_spec=device_spec if d.enabled else None, ckpt=ckpt,
        split_file=run_dir / "data_split.json",
    )  # fmt: skip
    state = resume_into(run, ckpt)
    if d.main:
        atomic_write(run_dir / "data_check.txt", run.record.report.text())  # shown on report.html
    if ckpt and d.main:
        remove_stale_temp_files(run_dir / "weights")
    recorder.info.update(describe(run, (unresolved.get("optimizer") or {}).get("lr")))
    if tracked:
        recorder.info["mlflow"] = tracked
    log_setup(recorder.info)

    def started(seconds: float) -> None:
        recorder.startup(seconds)
        logger.info(f"first training step after {seconds:.1f} s (from process start)")

    def on_epoch(metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        recorder.log_epoch(metrics, history)
        tracker.log_epoch(metrics)

    with stop_on_signals() as stop:
        hooks = FitHooks(
            on_epoch=on_epoch, on_step=FirstStep(recorder.heartbeat, started), should_stop=stop.requested,
            # rank 0 alone reports to the study (fit stops every rank with it)
            should_prune=TrialReporter(trial, run.epochs, run_dir / "weights" / "last.pt") if trial and d.main else FitHooks.should_prune,
            # the unresolved config keeps interpolations live for a later resume (${trainer.epochs});
            # a tracked run adds its MLflow run id, which a resume continues
            checkpoint_extra={
                "config_unresolved": unresolved, "run_started": recorder.started.isoformat(),
                **tracker.checkpoint_entries(),
            },
        )  # fmt: skip
        if ckpt and state.epoch >= run.epochs and not state.step:
            logger.info(
                f"training finished before (epoch {state.epoch} of {run.epochs}); only the final "
                "reports are written"
            )
        result = fit(run, state, run_dir / "weights", hooks)
        distributed.barrier(d)  # rank 0 has written best.pt before anyone reads it
        recorder.reporting()  # a kill from here on leaves `reporting`: resume= writes the reports
        final = report_best_weights(run, run_dir, recorder, result["best_epoch"])
    recorder.finish("completed", final, note=result["stopped_early"])
    record = recorder.record()  # what run.json now says: MLflow, the log and the study read it
    tracker.log_final(record)
    # no epoch at all (trainer.epochs=0): the -1 fit starts from, as before the record
    return log_done(record.best or Best(0, float(result["best_acc"]), "val/acc"), run_dir)


def log_done(best: Best, run_dir: Path) -> float:
    """The run's last line; returns its best score, the sweep's objective (Optuna): the record's best."""
    from loguru import logger

    ema = " (the EMA's weights)" if best.metric == "val/acc_ema" else ""
    logger.info(
        f"done: best val acc {best.score:.4f} at epoch {best.epoch}{ema}; "
        f"finished {datetime.now():%H:%M:%S}; results in {run_dir}"
    )
    return best.score


def main() -> None:
    """`python -m imgcls.train` and `imgcls-train` (a console script exits with what main returns:
    nothing, so 0; a sweep gets each job's objective from `job`)."""
    run_command("train", job)


def job(cfg: DictConfig) -> float:
    """One training run as Hydra's job: its directory and overrides come from HydraConfig."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from imgcls.config.naming import write_resume_record

    hc = HydraConfig.get()
    nodes = {"config": cfg, "hydra": HydraConfig.instance().cfg, "overrides": hc.overrides.task}
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    record = functools.partial(write_resume_record, nodes=nodes)
    trial = trial_link(os.environ, hc.sweeper)  # set per job by the Optuna sweeper (sweeps/pruning.py)
    return run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), record, sweep_dir, trial)


if __name__ == "__main__":
    main()
