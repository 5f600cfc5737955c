"""The config a training run runs (config_to_run), and resuming: the config comes from the
checkpoint, only overrides that keep the run the same run are accepted, and the built run gets the
checkpoint's state back (resume_into)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from imgcls.checkpoint import CheckpointError, load_checkpoint
from imgcls.config import build as b
from imgcls.config.naming import resumed_dir
from imgcls.config.overrides import apply_overrides
from imgcls.config.renamed import current_names
from imgcls.config.saved import CURRENT, classify, read_saved, resolved, warn_ignored, with_recorded_values
from imgcls.errors import ConfigError
from imgcls.models.pretrained_input import with_pretrained_input
from imgcls.run_record import run_status
from imgcls.tracking import RUN_ID_KEY, continued_store
from imgcls.training.seeding import set_rng_state

# Where and how fast a run goes, and how long: everything else (model, data, transforms, loss,
# optimizer, scheduler, seed) would make the resumed run a different run than the one saved.
RESUMABLE_KEYS = (
    "resume", "trainer.epochs", "device", "deterministic", "data.num_workers",
    "trainer.num_threads", "trainer.log_every_n_steps", "trainer.compile", "trainer.channels_last",
    "data.cache",
)  # fmt: skip
# and the keys a saved run never decides (imgcls.config.saved: tracking, data.cache_dir, ...), which
# a resume takes from its own command line whether given or not


def resume_config(ckpt: dict[str, Any], composed: Any, overrides: list[str], path: str) -> tuple[dict, dict]:
    """The checkpoint's config with the command line's resumable overrides applied: resolved,
    and unresolved (what the next checkpoint keeps).

    The checkpoint is read as a saved run (imgcls.config.saved): no resolver in it runs, and what it
    may not decide (tracking, cache folders, ...) comes from this command's composed config.
    References to its own keys stay live (the checkpoint keeps the unresolved config too), so a
    scheduler horizon written as ${trainer.epochs} follows an extended trainer.epochs."""
    source = f"{path} (its config)"
    raw = ckpt.get("config_unresolved") or ckpt["config"]
    if ckpt.get("config_unresolved") and isinstance(ckpt.get("config"), dict):
        raw = with_recorded_values(raw, ckpt["config"])
    saved, ignored = read_saved(current_names(raw), source, current=composed)
    # a plain resume= of a tracked run continues its MLflow run only where this machine shows the
    # run is its own (tracking.continued_store); tracking on the command line decides by itself
    tracking = ignored.pop("tracking", None) if "tracking" not in saved else None
    if tracking:
        run_dir = resumed_dir(path) or Path(path).parent.parent
        if continued_store(tracking, ckpt.get(RUN_ID_KEY), run_dir) is not None:
            saved["tracking"] = tracking
        else:
            logger.warning(
                f"tracking={tracking} from {source} ignored: its MLflow store is not one "
                "this machine shows to hold this run (an existing local SQLite file, or "
                "$MLFLOW_TRACKING_URI), so this resume is not tracked; to track it, give "
                "tracking=mlflow tracking.uri=<store> on the command line"
            )
    warn_ignored(ignored, source)
    kept, refused = [], []
    # Hydra parsed these once already (they composed `composed`): its parser names their keys
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if classify(o.key_or_group) == CURRENT:
            continue  # read_saved took it from the command already
        if o.key_or_group not in RESUMABLE_KEYS:
            refused.append(o.input_line)
        elif o.is_delete():
            kept.append(o.input_line)
        else:  # ++: set whether or not the checkpoint has the key (an older one may lack data.cache)
            kept.append("++" + o.input_line.lstrip("+"))
    if refused:
        raise ConfigError(
            f"resume={path}: {', '.join(refused)} would change the saved run (its model, data or "
            f"recipe); a resumed run keeps the config in its checkpoint. Only {', '.join(RESUMABLE_KEYS)} "
            "and tracking may be given with resume=; start a new run for anything else."
        )
    unresolved = apply_overrides(saved, kept, source, resolve=False)
    config = resolved(unresolved, source)
    done, epochs = ckpt["epoch"], config["trainer"]["epochs"]
    if epochs < done or (epochs == done and not ckpt.get("step")):
        if epochs == done and final_reports_due(path):
            # trained to the end, reports cut short: train_run writes only those
            return config, unresolved
        raise ConfigError(
            f"resume={path}: the run already finished {done} of {epochs} epochs; extend it with "
            f"trainer.epochs=<more than {done}>"
        )
    return config, unresolved


def check_classes(saved: list[str], found: list[str], root: Any) -> None:
    if saved != found:
        missing, extra = sorted(set(saved) - set(found)), sorted(set(found) - set(saved))
        raise ConfigError(
            f"the classes in {root} differ from the checkpoint's: missing {missing or 'none'}, "
            f"extra {extra or 'none'}. A run's classes cannot change; start a new run for new classes."
        )


def restore(ckpt: dict[str, Any], path: str, model, optimizer, scheduler, scheduler_args: dict) -> None:
    """Load the states into the live objects; a checkpoint of another model is a clear error."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({first[0]} {first[1] if len(first) > 1 else ''})."
        ) from exc
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is None or ckpt.get("scheduler") is None:
        return
    scheduler.load_state_dict(ckpt["scheduler"])
    # the saved state carries the old horizon (T_max, epochs): where the resolved config now
    # differs from the checkpoint's (an interpolated ${trainer.epochs}), the new value wins
    saved_args = (ckpt.get("config") or {}).get("scheduler") or {}
    changed = []
    for key, value in scheduler_args.items():
        if key in saved_args and saved_args[key] != value and hasattr(scheduler, key):
            changed.append(f"{key} {saved_args[key]} -> {value}")
            setattr(scheduler, key, value)
    if changed:
        logger.warning(
            f"the scheduler's horizon is rebuilt for the new trainer.epochs ({', '.join(changed)}): "
            "the learning rate from here on differs from a run started with these epochs"
        )


def remove_stale_temp_files(weights_dir: Path) -> None:
    """A kill -9 during a save leaves `.last.pt.tmp-<pid>`; the checkpoint itself is intact."""
    for tmp in weights_dir.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def final_reports_due(resume: str) -> bool:
    """Whether the run `resume=<run>/weights/<ckpt>.pt` continues finished its training but not
    its final reports: its record (run.json, or an old run's summary.txt) says anything but
    `completed` (`reporting` after a kill -9 in them, `failed` after a fault there, `running`
    after a kill between the last checkpoint and the reports) or was lost. Such a resume trains
    nothing and writes the reports."""
    run_dir = resumed_dir(resume)
    return run_dir is not None and run_status(run_dir) != "completed"


@dataclass
class TrainingState:
    """Where training stands: epochs done, batches done of the next one (a mid-epoch stop) with
    their running sums and the rate that epoch started with, the metric history and the best."""

    epoch: int = 0
    step: int = 0
    partial: dict[str, float] | None = None
    epoch_lr: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], d) -> TrainingState:
        partial = ckpt.get("partial")
        if ckpt.get("partial_ranks") and d.enabled:
            partial = ckpt["partial_ranks"][d.rank]  # each rank's own running sums
        return cls(
            epoch=ckpt.get("epoch", 0), step=ckpt.get("step", 0), partial=partial, epoch_lr=ckpt.get("epoch_lr"),
            history=[dict(h) for h in ckpt.get("history", [])], best_acc=ckpt.get("best_acc", -1.0),
            best_epoch=ckpt.get("best_epoch", 0),
        )  # fmt: skip

    def copy(self) -> TrainingState:
        return replace(self, history=[dict(h) for h in self.history])


def resume_into(run, ckpt: dict[str, Any] | None) -> TrainingState:
    """The checkpoint's training state put back into a built run (weights, optimizer, schedule,
    loss scale, EMA, and mid-epoch the random generators), and where training stands; a fresh
    TrainingState without a checkpoint."""
    if not ckpt:
        return TrainingState()
    path, config, scheduler = run.config["resume"], run.config, run.scheduler
    saved_steps = (ckpt.get("scheduler") or {}).get("total_steps")
    if saved_steps is not None and saved_steps != getattr(scheduler, "total_steps", saved_steps):
        raise ConfigError(
            f"resume={path}: a onecycle schedule is fixed at its start ({saved_steps} steps) "
            "and cannot be extended; start a new run for more epochs"
        )
    scheduler_args = {k: v for k, v in (config["scheduler"] or {}).items() if not k.startswith("_")}
    restore(ckpt, path, run.model, run.optimizer, scheduler, scheduler_args)
    run.amp.load_state_dict(ckpt)  # the fp16 loss scale and its growth count
    ema = run.recipe.ema
    if ema is not None:
        # the EMA was copied from the weights as built: it starts again from the checkpoint's
        if ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        else:
            ema.module.load_state_dict(run.model.state_dict())
    d = run.dist
    if ckpt.get("step"):
        # mid-epoch: the in-loop draws continue where they stopped, each rank's its own
        ranks = ckpt.get("rng_ranks") or []
        set_rng_state(ranks[d.rank] if d.enabled and len(ranks) == d.world else ckpt["rng"])
    return TrainingState.from_checkpoint(ckpt, d)


def config_to_run(cfg: DictConfig | dict, overrides: list[str]) -> tuple[dict, dict, dict | None]:
    """The plain config to run, its unresolved form, and the checkpoint when `resume` names one
    (loaded first, so a corrupt file or a refused override stops before the run is touched)."""
    try:
        config = b.plain(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError(
            f"{exc.full_key} is required: set it on the command line, {exc.full_key}=..."
        ) from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the config does not resolve: {exc}") from exc
    # a string where a number belongs names its key here, before the data is read or anything built
    b.check_number_keys(config)
    b.check_targets(config)  # before check_numbers imports them to read their signatures
    b.check_numbers(config)
    # the transforms a timm model's pretrained weights ask for, in the run's config.yaml and checkpoints
    if not config.get("resume"):
        return (
            with_pretrained_input(config)[0],
            OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else config,
            None,
        )
    ckpt = load_checkpoint(config["resume"])
    config, unresolved = resume_config(ckpt, cfg, overrides, config["resume"])
    return with_pretrained_input(config)[0], unresolved, ckpt
