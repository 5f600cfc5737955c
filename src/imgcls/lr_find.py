"""`python -m imgcls.lr_find`: an LR range test (Smith 2017) that plots loss against learning
rate and suggests the override to use."""

from __future__ import annotations

import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import DictConfig

from imgcls.cli import run_command
from imgcls.config.build import plain
from imgcls.errors import UserError
from imgcls.log import setup_logging, teardown_logging
from imgcls.names import csv_text, literal_text


def lr_schedule(start_lr: float, end_lr: float, num_iter: int) -> list[float]:
    """Exponentially spaced rates from start_lr to end_lr."""
    if not 0 < start_lr < end_lr or num_iter < 2:
        raise UserError(
            f"lr_find: need 0 < start_lr < end_lr and num_iter >= 2, got {start_lr}, {end_lr}, {num_iter}"
        )
    return [start_lr * (end_lr / start_lr) ** (i / (num_iter - 1)) for i in range(num_iter)]


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (so the first points are not pulled to 0)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The rate where the smoothed loss falls fastest (steepest slope against log lr), looked for
    before the loss minimum; the rule of thumb of fastai's and Lightning's finders."""
    end = max(range(len(smoothed)), key=lambda i: -smoothed[i]) + 1
    if end < 3:
        return lrs[max(end - 1, 0)]
    slopes = [
        (smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
        for i in range(1, end - 1)
    ]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def find(config: dict, run_dir: Path) -> float:
    # lazy: torch and the run builder load after Hydra has parsed the command line (--help stays fast)
    from imgcls.training.engine import to_device
    from imgcls.training.run import build_run

    opts = config["lr_find"]
    lrs = lr_schedule(float(opts["start_lr"]), float(opts["end_lr"]), int(opts["num_iter"]))
    # the training run as `train` builds it: model, data, loss, precision and memory format
    run = build_run(config, train=True)
    model, optimizer, loss_fn, loader, place = (
        run.model,
        run.optimizer,
        run.loss_fn,
        run.loaders["train"],
        run.place,
    )
    model.train()
    losses: list[float] = []
    batches = iter(())
    for i, lr in enumerate(lrs):
        try:
            batch = next(batches)
        except StopIteration:  # cycle over the split, a new order each pass
            loader.sampler.set_epoch(i)
            batches = iter(loader)
            batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = to_device(batch, place.device, place.normalize, place.channels_last)
        with place.amp.autocast():
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        place.amp.backward(loss)
        place.amp.step(optimizer)
        losses.append(loss.item())
        smoothed = smooth(losses, float(opts["smoothing"]))
        if not math.isfinite(losses[-1]) or smoothed[-1] > float(opts["diverge_factor"]) * min(smoothed):
            logger.info(f"lr_find: the loss diverged at lr {lr:.3g}; stopping after {i + 1} steps")
            break
    lrs, smoothed = lrs[: len(losses)], smooth(losses, float(opts["smoothing"]))
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    lrs, losses, smoothed = (
        [lrs[i] for i in finite],
        [losses[i] for i in finite],
        [smoothed[i] for i in finite],
    )
    best = suggest(lrs, smoothed)
    with open(run_dir / "lr_find.csv", "w", newline="", encoding="utf-8") as f:
        f.write(csv_text(["lr", "loss", "smoothed_loss"], zip(lrs, losses, smoothed, strict=True)))
    plot(lrs, smoothed, best, run_dir / "lr_find.png")
    (run_dir / "suggestion.txt").write_text(f"optimizer.lr={best:.3g}\n")
    logger.info(f"lr_find: {len(losses)} steps, plot {run_dir / 'lr_find.png'}")
    print(f"suggested learning rate: {best:.3g}\nuse: python -m imgcls.train optimizer.lr={best:.3g}")
    return best


@literal_text()  # every figure of the project draws its text as written (names.literal_text)
def plot(lrs: list[float], smoothed: list[float], best: float, path: Path) -> None:
    import matplotlib  # lazy: matplotlib's start-up, for the one figure at the end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, smoothed, label="smoothed training loss")
    ax.axvline(best, color="tab:red", linestyle="--", label=f"suggested lr {best:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)  # no title cut at the edges
    plt.close(fig)


def main() -> None:
    """`python -m imgcls.lr_find` and `imgcls-lr-find` (nothing returned: a console script exits 0)."""
    run_command("lr_find", job)


def job(cfg: DictConfig) -> float:
    """The range test as Hydra's job, logging to <its directory>/lr_find.log."""

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ids = setup_logging(run_dir / "lr_find.log")
    try:
        return find(plain(cfg), run_dir)
    finally:
        teardown_logging(ids)


if __name__ == "__main__":
    main()
