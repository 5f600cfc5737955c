"""torchrun support: one process group, rank 0 the only writer, metrics reduced across ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from imgcls.errors import UserError
from imgcls.log import setup_logging


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # one process, no process group


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def init(device_spec: str) -> tuple[Dist, str]:
    """Join the process group torchrun describes in the environment; pick this rank's device.

    gloo on CPU, nccl on CUDA (one GPU per local rank). Returns the Dist and the device to use."""
    if not launched_by_torchrun():
        return Dist(), device_spec
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device_spec = f"cuda:{local}"
    elif device_spec == "auto":
        device_spec = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local), device_spec


def enter(cfg: Any, run_dir: Path) -> tuple[Dist, str, Path, list[int]]:
    """A training process's start: (its Dist, device spec, the run directory, its log handler ids).
    Under torchrun every rank runs this; rank 0 names the run directory and alone writes to it and
    logs into it (a resume once it is accepted: a refused one leaves the run as it was); the other
    ranks log errors only, or everything with trainer.log_all_ranks."""
    d, device_spec = init(str(cfg.get("device") or "auto"))
    if not d.main and run_dir.name.startswith("imgcls-rank"):
        run_dir.rmdir()  # the placeholder naming.run_dir gave Hydra on this rank
    run_dir = Path(broadcast(str(run_dir), d))
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_ids = setup_logging(None if cfg.get("resume") else run_dir / "logs" / "train.log")
    else:
        log_all = bool((cfg.get("trainer") or {}).get("log_all_ranks"))
        log_ids = setup_logging(None, level="INFO" if log_all else "ERROR", prefix=f"[rank {d.rank}] ")
    return d, device_spec, run_dir, log_ids


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sync_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them at the
    start of each training forward, so after an epoch's last step every rank holds statistics of
    its own last batch: evaluating with those would not be evaluating the checkpoint."""
    if d.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def rank0_first(d: Dist, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on rank 0, then on the others (which then find its files and caches
    ready); returns this rank's result. A user error on rank 0 stops every rank with its message,
    instead of leaving them waiting forever."""
    if not d.enabled:
        return fn(*args, **kwargs)
    result = None
    if d.main:
        try:
            result = fn(*args, **kwargs)
        except UserError as exc:
            broadcast(f"{type(exc).__name__}: {exc}", d)
            raise
    error = broadcast(None, d)  # rank 0 sends None (it succeeded); the others receive it
    if error is not None:
        raise UserError(f"rank 0 stopped: {error}")
    if not d.main:
        result = fn(*args, **kwargs)
    return result


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast(value: Any, d: Dist) -> Any:
    """Rank 0's value on every rank (any picklable value)."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Element-wise sum over ranks, in float64 (counts and loss sums stay exact)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: int | None, d: Dist, device: torch.device) -> int | None:
    """The largest flag any rank raised (a signal number), or None: every rank then stops at the
    same step, so none waits forever in a collective."""
    if not d.enabled:
        return flag
    t = torch.tensor([flag or 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def gather(array: Any, d: Dist) -> list[Any]:
    """Every rank's object, in rank order."""
    if not d.enabled:
        return [array]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, array)
    return out
