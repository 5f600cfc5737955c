"""`python -m imgcls.train`: compose the config, build it, fit, report; returns best val accuracy."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from imgcls.errors import ConfigError, UserError
from imgcls.naming import register_resolvers

# conf/ sits at the repository root, beside src/ (the project installs editable: pip install -e .)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_resolvers()


def run(cfg: DictConfig | dict, run_dir: Path) -> float:
    """Train the composed config in run_dir. Heavy imports live here so --help stays instant."""
    import torch
    from loguru import logger

    from imgcls import build as b
    from imgcls.engine import evaluate, fit, resolve_device
    from imgcls.log import setup_logging, teardown_logging
    from imgcls.models import count_parameters
    from imgcls.recorder import RunRecorder
    from imgcls.reports import write_split_report
    from imgcls.seeding import configure_determinism, seed_everything

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_ids = setup_logging(run_dir / "logs" / "train.log")
    try:
        config = b.plain(cfg)
        resolve_error = None
    except OmegaConfBaseException as exc:  # still say so in the summary, with what was asked for
        config = OmegaConf.to_container(cfg, resolve=False)
        if isinstance(exc, MissingMandatoryValue):
            resolve_error = ConfigError(
                f"{exc.full_key} is required: set it on the command line, {exc.full_key}=..."
            )
        else:
            resolve_error = ConfigError(f"the config does not resolve: {exc}")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    trainer = config["trainer"]
    recorder = RunRecorder(run_dir, config, trainer["epochs"], info={})
    try:
        logger.info(f"run directory: {run_dir}")
        if resolve_error is not None:
            raise resolve_error
        if trainer["epochs"] < 1:
            raise ConfigError(f"trainer.epochs must be at least 1, got {trainer['epochs']}")
        seed = int(config["seed"])
        seed_everything(seed)
        configure_determinism(bool(config["deterministic"]))
        device = resolve_device(str(config["device"]))
        if trainer.get("num_threads"):
            torch.set_num_threads(int(trainer["num_threads"]))

        # data first: a broken tree is reported before any model is built
        data = b.build_data(config["data"])
        data.setup()
        for split, files in data.skipped.items():
            if files:
                shown = ", ".join(str(Path(f).relative_to(data.root)) for f in files[:5])
                more = f" and {len(files) - 5} more" if len(files) > 5 else ""
                logger.warning(
                    f"{split}: skipped {len(files)} file(s) that are not images by suffix: {shown}{more}"
                )
        pipelines, normalize = b.build_transforms(config["transforms"])
        model = b.build_model(config["model"], num_classes=len(data.class_names))
        optimizer = b.build_optimizer(config["optimizer"], model)
        scheduler = b.build_scheduler(config["scheduler"], optimizer)
        loss_fn = b.build_loss(config["loss"])

        channels_last = bool(trainer.get("channels_last")) and device.type != "mps"
        model = model.to(
            device, memory_format=torch.channels_last if channels_last else torch.preserve_format
        )
        normalize = normalize.to(device)
        pin = device.type == "cuda"
        loaders = {"train": data.loader("train", pipelines["train"], train=True, pin_memory=pin)}
        for split in data.splits:
            if split != "train":
                loaders[split] = data.loader(split, pipelines[split], train=False, pin_memory=pin)

        sizes = ", ".join(f"{s} {len(v)}" for s, v in data.samples.items())
        recorder.info.update(
            {
                "device": _describe(device, torch),
                "model": f"{config['model'].get('name', config['model']['_target_'])}, "
                f"{count_parameters(model):,} parameters",
                "data": f"{data.root}: {len(data.class_names)} classes; {sizes} images",
                "classes": ", ".join(data.class_names),
            }
        )
        logger.info(f"device {recorder.info['device']} | model {recorder.info['model']}")
        logger.info(f"data {recorder.info['data']}")

        result = fit(
            model, optimizer, scheduler, loss_fn, loaders, normalize, device,
            epochs=trainer["epochs"], seed=seed, weights_dir=run_dir / "weights", config=config,
            class_names=data.class_names, on_epoch=recorder.log_epoch,
            channels_last=channels_last, log_every=trainer.get("log_every_n_steps", 50),
        )  # fmt: skip

        # reports with the best weights, on every split; train is read with the eval pipeline
        from imgcls.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(run_dir / "weights" / "best.pt")["model"])
        final: dict[str, float] = {}
        for split in data.splits:
            pipeline = pipelines["val"] if split == "train" else pipelines[split]
            loader = data.loader(split, pipeline, train=False, pin_memory=pin)
            metrics, targets, preds = evaluate(
                model, loader, loss_fn, device, normalize, split=split, channels_last=channels_last
            )
            final[f"{split}/acc_best_weights"] = metrics[f"{split}/acc"]
            text = write_split_report(
                split, targets, preds, data.class_names, run_dir, recorder.writer, result["best_epoch"]
            )
            logger.info(
                f"{split} (best weights, epoch {result['best_epoch']}): accuracy {metrics[f'{split}/acc']:.4f}\n{text}"
            )
        recorder.finish("completed", final)
        logger.info(
            f"done: best val acc {result['best_acc']:.4f} at epoch {result['best_epoch']}; results in {run_dir}"
        )
        return float(result["best_acc"])
    except KeyboardInterrupt:
        recorder.finish("interrupted", error="KeyboardInterrupt")
        raise
    except Exception as exc:
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        raise
    finally:
        recorder.close()
        teardown_logging(log_ids)


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

    hc = HydraConfig.get()
    try:
        return run(cfg, Path(hc.runtime.output_dir))
    except (UserError, OmegaConfBaseException) as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
