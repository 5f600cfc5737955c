"""A training run's data, built once: the tree checked and split, the loaders, the recalibration
batches, and what the summary and checkpoints say about them (`run.build_run` calls `build_data`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from imgcls.config import build as b
from imgcls.data.augment import resolve as resolve_augment
from imgcls.data.loaders import make_loader
from imgcls.data.splits import describe
from imgcls.names import shown
from imgcls.training import distributed
from imgcls.training.batchnorm import build_recalibration
from imgcls.training.engine import Placement
from imgcls.training.losses import class_counts
from imgcls.training.resume import check_classes


@dataclass
class DataParts:
    """What a training run is given about its data: the options, the scan's record, the loaders,
    the recalibration batches and what the summary and the checkpoint say of them."""

    data: Any
    record: Any
    class_names: list[str]
    loaders: dict[str, Any]
    eval_loader: Callable[[str], Any]
    class_counts: list[int]
    recalibration: Any
    info: dict[str, str]
    loading: str
    batch_size: int
    checkpoint_entries: dict[str, Any]


def build_data(config: dict, pipelines: dict, place: Placement, ckpt: dict | None, split_file) -> DataParts:
    """Every use of the data object while a training run is built: checked, split, loaded."""
    d, device = place.d, place.device
    data = b.build(config["data"], "data")  # its sizes checked with the whole config (build_run)
    recorded = ckpt.get("data_split") if ckpt else None  # a carved val split or fold: the same files
    # rank 0 writes, downloads and caches for the others; a resume's config comes from a checkpoint,
    # maybe someone else's: it neither downloads nor writes the data set (see ImageFolderData.prepare)
    record = distributed.rank0_first(d, data.scan, fetch=not ckpt, recorded_split=recorded)
    if ckpt:
        check_classes(ckpt["class_names"], list(record.class_names), record.root)
        for change in record.changes_since(ckpt):  # same classes, other files: resume, but say so
            logger.warning(f"the data changed since the checkpoint: {change}")
    for warning in record.report.warnings:  # the data check's findings; errors stopped the scan
        logger.warning(warning)
    if d.main and split_file is not None:
        record.write_split(split_file)  # only when data.val_fraction or data.folds drew val
    shard = {
        "seed": int(config["seed"]),
        "pin_memory": device.type == "cuda",
        "rank": d.rank,
        "world": d.world,
    }
    crop = resolve_augment(
        data.device_augment, pipelines["train"], cached=data.cache != "none", device=device,
        resumed=bool(ckpt.get("device_augment")) if ckpt else None,
    )  # fmt: skip
    train_collate = crop.collate if crop is not None else None  # None: the default stacking
    train_transform = crop if crop is not None else pipelines["train"]
    loaders = {
        "train": make_loader(
            data, record, "train", train_transform, train=True, collate_fn=train_collate, **shard
        )
    }
    for split in record.splits:
        if split != "train":
            loaders[split] = make_loader(data, record, split, pipelines[split], train=False, **shard)

    def eval_loader(split: str):
        pipeline = pipelines["val"] if split == "train" else pipelines[split]
        return make_loader(data, record, split, pipeline, train=False, **shard)

    trainer = config["trainer"]
    recalibration = build_recalibration(
        trainer.get("bn_recalibration"),
        data,
        record,
        pipelines,
        shard,
        place,
        epoch_batches=len(loaders["train"]),
    )
    sizes = ", ".join(f"{s} {len(v)}" for s, v in record.samples.items())
    info = {
        "data": f"{shown(record.root)}: {len(record.class_names)} classes; {sizes} images",
        # "fold 2 of 5 of train, ..."; a test split alone carved from train: "test split"
        **(
            {f"{'val' if 'val' in record.carved else 'test'} split": describe(record.carved)}
            if record.carved
            else {}
        ),
        "classes": ", ".join(map(shown, record.class_names)),  # names as text: b"\xff" -> "\xff"
        "data check": record.report.summary_line(),
    }
    loading = f"{data.num_workers} loader worker(s), device augment {crop is not None}"
    counts = class_counts(record.samples["train"], len(record.class_names))
    entries = {
        "class_counts": counts,  # of train/: class-weighted losses are rebuilt from them
        "device_augment": crop is not None,  # what data.device_augment=auto resolved to, for a resume
        **record.checkpoint_entries(),  # data fingerprint, carved val split
    }
    return DataParts(
        data, record, list(record.class_names), loaders, eval_loader, counts, recalibration, info, loading, data.batch_size,
        entries,
    )  # fmt: skip
