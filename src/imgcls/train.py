"""`python -m imgcls.train`: compose the config, build it, fit, report; returns best val accuracy."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from imgcls.cli import CONFIG_DIR
from imgcls.config.naming import register_resolvers
from imgcls.errors import ConfigError, UserError

register_resolvers()


def resolve(cfg: DictConfig | dict, overrides: list[str]) -> tuple[dict, dict, dict | None]:
    """The plain config to run, its unresolved form, and the checkpoint when `resume` names one
    (loaded first, so a corrupt file or a refused override stops before the run is touched)."""
    from imgcls.checkpoint import load_checkpoint
    from imgcls.config import build as b
    from imgcls.training.resume import resume_config

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
    if not config.get("resume"):
        return (
            config,
            OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else config,
            None,
        )
    ckpt = load_checkpoint(config["resume"])
    return *resume_config(ckpt, cfg, overrides, config["resume"]), ckpt


def run(
    cfg: DictConfig | dict,
    run_dir: Path,
    overrides: list[str] = (),
    record: Callable[[Path], None] | None = None,
) -> float:
    """Train the composed config in run_dir. Heavy imports live here so --help stays instant.
    `record(run_dir)` writes a resume's record once the resume is accepted."""
    from loguru import logger

    from imgcls.log import setup_logging, teardown_logging
    from imgcls.training import distributed
    from imgcls.training.recorder import NullRecorder, RunRecorder
    from imgcls.training.signals import RunInterrupted

    # under torchrun every rank runs this; rank 0 names the run directory and alone writes to it
    d, device_spec = distributed.init(str(cfg.get("device") or "auto"))
    if not d.main and Path(run_dir).name.startswith("imgcls-rank"):
        Path(run_dir).rmdir()  # the placeholder naming.run_dir gave Hydra on this rank
    run_dir = Path(distributed.broadcast(str(run_dir), d))
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a resume logs into the run once accepted: a refused one leaves the run as it was
        log_ids = setup_logging(None if cfg.get("resume") else run_dir / "logs" / "train.log")
    else:
        log_all = bool((cfg.get("trainer") or {}).get("log_all_ranks"))
        log_ids = setup_logging(None, level="INFO" if log_all else "ERROR", prefix=f"[rank {d.rank}] ")
    try:
        config, unresolved, ckpt = resolve(cfg, list(overrides))
    except UserError:
        if not OmegaConf.is_config(cfg) or cfg.get("resume") or not d.main:
            teardown_logging(log_ids)
            raise  # a refused resume leaves the saved run's summary as it was
        # a fresh run says in its summary why it failed, with the config as asked for
        config, ckpt = OmegaConf.to_container(cfg, resolve=False), None
        recorder = RunRecorder(run_dir, config, config["trainer"]["epochs"], info={})
        recorder.finish("failed", error=str(sys.exc_info()[1]))
        recorder.close()
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
    try:
        return train_run(config, unresolved, run_dir, recorder, ckpt, d, device_spec)
    except RunInterrupted as exc:
        recorder.finish("interrupted", error=str(exc))
        logger.warning(f"interrupted: {exc}")
        raise
    except KeyboardInterrupt:
        recorder.finish("interrupted", error="KeyboardInterrupt (before or after training)")
        raise
    except Exception as exc:
        detail = "" if isinstance(exc, UserError) else f"\n\n{traceback.format_exc()}"
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}{detail}")
        raise
    finally:
        recorder.close()
        teardown_logging(log_ids)
        distributed.shutdown()


def train_run(
    config: dict, unresolved: dict, run_dir: Path, recorder, ckpt: dict | None, d, device_spec: str
) -> float:
    """Build everything from the plain config, restore the checkpoint if any, fit, report."""
    import torch
    from loguru import logger

    from imgcls.config import build as b
    from imgcls.data.augment import resolve as resolve_augment
    from imgcls.data.splits import describe
    from imgcls.models import count_parameters
    from imgcls.training import distributed
    from imgcls.training.batchnorm import batchnorm_layers, build_recalibration
    from imgcls.training.engine import resolve_device
    from imgcls.training.loop import fit, report_best_weights
    from imgcls.training.losses import class_counts as count_classes
    from imgcls.training.recipes import Recipe, build_mix, make_ema
    from imgcls.training.recorder import atomic_write_text
    from imgcls.training.resume import check_classes, remove_stale_temp_files, restore
    from imgcls.training.seeding import configure_determinism, seed_everything, set_rng_state
    from imgcls.training.signals import stop_on_signals
    from imgcls.training.speed import (
        FirstStep,
        Precision,
        compile_model,
        resolve_channels_last,
        resolve_precision,
    )

    trainer = config["trainer"]
    logger.info(f"run directory: {run_dir}")
    if ckpt:
        logger.info(f"resuming {config['resume']}: epoch {ckpt['epoch']} done, step {ckpt.get('step', 0)}")
    if trainer["epochs"] < 1:
        raise ConfigError(f"trainer.epochs must be at least 1, got {trainer['epochs']}")
    seed = int(config["seed"])
    seed_everything(seed)
    configure_determinism(bool(config["deterministic"]))
    device = resolve_device(device_spec if d.enabled else str(config["device"]))
    if trainer.get("num_threads"):
        torch.set_num_threads(int(trainer["num_threads"]))
    # a checkpoint without trainer.precision was trained in fp32
    amp = Precision(resolve_precision(trainer.get("precision", "fp32"), device), device)
    channels_last = resolve_channels_last(trainer.get("channels_last", "auto"), device)

    # data first: a broken tree is reported before any model is built
    data = b.build_data(config["data"])
    if ckpt:
        data.recorded_split = ckpt.get("data_split")  # a carved val split or fold: exactly the same files
    # rank 0 writes, downloads and caches for the others; a resume's config comes from a checkpoint,
    # maybe someone else's: it neither downloads nor writes the data set (see ImageFolderData.prepare)
    distributed.rank0_first(lambda: data.setup(fetch=not ckpt), d)
    if ckpt:
        check_classes(ckpt["class_names"], data.class_names, data.root)
        for change in data.changes_since(ckpt):  # same classes, other files: resume, but say so
            logger.warning(f"the data changed since the checkpoint: {change}")
    for warning in data.report.warnings:  # the data check's findings; errors stopped setup()
        logger.warning(warning)
    if d.main:
        atomic_write_text(run_dir / "data_check.txt", data.report.text())  # shown on report.html
        data.write_split(run_dir / "data_split.json")  # only when data.val_fraction or data.folds drew val
    pipelines, normalize = b.build_transforms(config["transforms"])
    model = b.build_model(config["model"], num_classes=len(data.class_names))
    if d.enabled and trainer.get("sync_batchnorm"):
        if device.type != "cuda":
            raise ConfigError(
                "trainer.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs "
                "only); on CPU, set trainer.sync_batchnorm=false"
            )
        # same Parameter objects, new modules: batch statistics over the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = b.build_optimizer(config["optimizer"], model)
    pin = device.type == "cuda"
    shard = {"seed": seed, "pin_memory": pin, "rank": d.rank, "world": d.world}
    crop = resolve_augment(
        data.device_augment, pipelines["train"], cached=data.cache != "none", device=device,
        resumed=bool(ckpt.get("device_augment")) if ckpt else None,
    )  # fmt: skip
    train_collate = crop.collate if crop is not None else None  # None: the default stacking
    train_transform = crop if crop is not None else pipelines["train"]
    loaders = {"train": data.loader("train", train_transform, train=True, collate_fn=train_collate, **shard)}
    for split in data.splits:
        if split != "train":
            loaders[split] = data.loader(split, pipelines[split], train=False, **shard)
    accum = int(trainer.get("grad_accum_steps") or 1)
    if accum < 1:
        raise ConfigError(f"trainer.grad_accum_steps must be at least 1, got {accum}")
    steps_per_epoch = -(-len(loaders["train"]) // accum)  # optimizer steps, for per-step schedules
    scheduler = b.build_scheduler(config["scheduler"], optimizer, steps_per_epoch=steps_per_epoch)
    class_counts = count_classes(data.samples["train"], len(data.class_names))
    loss_fn = b.build_loss(config["loss"], class_counts=class_counts)
    if ckpt:
        scheduler_args = {k: v for k, v in (config["scheduler"] or {}).items() if not k.startswith("_")}
        saved_steps = (ckpt.get("scheduler") or {}).get("total_steps")
        if saved_steps is not None and saved_steps != getattr(scheduler, "total_steps", saved_steps):
            raise ConfigError(
                f"resume={config['resume']}: a onecycle schedule is fixed at its start ({saved_steps} steps) "
                "and cannot be extended; start a new run for more epochs"
            )
        restore(ckpt, config["resume"], model, optimizer, scheduler, scheduler_args)
        if d.main:
            remove_stale_temp_files(run_dir / "weights")
        if ckpt.get("step"):
            # mid-epoch: the in-loop draws continue where they stopped, each rank's its own
            ranks = ckpt.get("rng_ranks") or []
            set_rng_state(ranks[d.rank] if d.enabled and len(ranks) == d.world else ckpt["rng"])

    if ckpt:
        amp.load_state_dict(ckpt)  # the fp16 loss scale and its growth count
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    normalize = normalize.to(device)
    train_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    recalibration = build_recalibration(
        trainer.get("bn_recalibration"), data, pipelines, shard, device, normalize,
        channels_last=channels_last, amp=amp, d=d,
    )  # fmt: skip
    recipe = Recipe(
        recalibrate=recalibration,
        grad_accum_steps=accum,
        grad_clip_norm=trainer.get("grad_clip_norm"),
        mix=build_mix(
            trainer.get("mixup_alpha", 0.0), trainer.get("cutmix_alpha", 0.0), len(data.class_names)
        ),
        ema=make_ema(model, trainer.get("ema_decay")),
    )
    if recipe.ema is not None and ckpt and ckpt.get("ema"):
        recipe.ema.load_state_dict(ckpt["ema"])
    early = trainer.get("early_stopping") or {}
    train_model = compile_model(train_model, bool(trainer.get("compile")))

    sizes = ", ".join(f"{s} {len(v)}" for s, v in data.samples.items())
    recorder.info.update(
        {
            "device": _describe(device, torch),
            "model": f"{config['model'].get('name', config['model']['_target_'])}, "
            f"{count_parameters(model):,} parameters",
            "data": f"{data.root}: {len(data.class_names)} classes; {sizes} images",
            **({"val split": describe(data.carved)} if data.carved else {}),  # "fold 2 of 5 of train, ..."
            "classes": ", ".join(data.class_names),
            "data check": data.report.summary_line(),
            "settings": f"precision {amp.name}, channels_last {channels_last}, "
            f"compile {bool(trainer.get('compile'))}, {data.num_workers} loader worker(s), "
            f"device augment {crop is not None}",
            "batch": f"{data.batch_size} per process x {d.world} process(es) x {accum} accumulated = "
            f"{data.batch_size * d.world * accum} per optimizer step; optimizer.lr "
            f"{config['optimizer'].get('lr')} as configured (not scaled)",
        }
    )
    if recalibration is not None and batchnorm_layers(model):
        recorder.info["bn recalibration"] = (
            f"BatchNorm statistics recomputed before each validation over {len(recalibration.loader)} "
            f"batches of {data.batch_size} training images per process "
            f"({trainer['bn_recalibration'].get('transforms', 'eval')} transforms)"
        )
        logger.info(recorder.info["bn recalibration"])
    logger.info(f"device {recorder.info['device']} | model {recorder.info['model']}")
    logger.info(f"data {recorder.info['data']}")
    if data.carved:
        logger.info(f"val split: {recorder.info['val split']}")

    # the unresolved config keeps interpolations live for a later resume (${trainer.epochs})
    extra = {
        "config_unresolved": unresolved,
        "run_started": recorder.started.isoformat(),
        "world_size": d.world,
        "class_counts": class_counts,  # of train/: class-weighted losses are rebuilt from them
        "device_augment": crop is not None,  # what data.device_augment=auto resolved to, for a resume
        **data.checkpoint_entries(),  # data fingerprint, carved val split
    }

    def started(seconds: float) -> None:
        recorder.info["startup"] = f"{seconds:.1f} s from process start to the first training step"
        logger.info(f"first training step after {seconds:.1f} s (from process start)")

    with stop_on_signals() as stop:
        result = fit(
            model, optimizer, scheduler, loss_fn, loaders, normalize, device,
            epochs=trainer["epochs"], seed=seed, weights_dir=run_dir / "weights", config=config,
            class_names=data.class_names, on_epoch=recorder.log_epoch, on_step=FirstStep(recorder.heartbeat, started),
            checkpoint_extra=extra, channels_last=channels_last,
            log_every=trainer.get("log_every_n_steps", 50), resume=ckpt, should_stop=stop.requested,
            train_model=train_model, recipe=recipe, d=d, amp=amp,
            early_stopping=(early.get("patience"), float(early.get("min_delta") or 0.0)),
            keep_top_k=int(trainer.get("keep_top_k") or 0),
        )  # fmt: skip
        distributed.barrier(d)  # rank 0 has written best.pt before anyone reads it

        final = report_best_weights(
            model, run_dir, data, pipelines, shard, loss_fn, device, normalize, recorder, result["best_epoch"],
            channels_last=channels_last, d=d, amp=amp,
        )  # fmt: skip
    recorder.finish("completed", final, note=result["stopped_early"])
    logger.info(
        f"done: best val acc {result['best_acc']:.4f} at epoch {result['best_epoch']}; "
        f"finished {datetime.now():%H:%M:%S}; results in {run_dir}"
    )
    return float(result["best_acc"])


def _describe(device, torch) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from imgcls.config.naming import resume_record_dir
    from imgcls.training.signals import RunInterrupted

    hc = HydraConfig.get()

    def record(run_dir: Path) -> None:
        """What Hydra writes to .hydra/ for a new run, for an accepted resume."""
        folder = resume_record_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, node in [
            ("config.yaml", cfg), ("hydra.yaml", HydraConfig.instance().cfg), ("overrides.yaml", hc.overrides.task),
        ]:  # fmt: skip
            (folder / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")

    try:
        return run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), record)
    except RunInterrupted as exc:
        # SystemExit passes through Hydra's job runner: a signal stops a whole sweep too
        print(f"interrupted: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except (UserError, OmegaConfBaseException) as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
