"""One GPU per parallel sweep job, claimed with a file lock; a job's memory is freed when it ends."""

from __future__ import annotations

import fcntl
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

# machine-wide, so two sweeps started side by side share the GPUs out instead of doubling up
LOCK_DIR = Path(tempfile.gettempdir()) / f"imgcls-gpu-slots-{os.getuid()}"


def claim_gpu(count: int, lock_dir: Path | None = None, wait_s: float = 1.0) -> tuple[int, int]:
    """(index, fd) of the first of `count` GPUs no other job holds; waits while all are held.

    flock is released by the kernel when the holder exits, so a killed job never strands a GPU.
    """
    lock_dir = lock_dir or LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            fd = os.open(lock_dir / f"gpu{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return index, fd
        time.sleep(wait_s)


def release_gpu(fd: int) -> None:
    os.close(fd)  # closing the descriptor drops its flock


class OneGpuPerJob(Callback):
    """Hydra callback (hydra.callbacks in train.yaml) for sweeps on a machine with several GPUs.

    Before each job of a -m sweep whose device is `auto` or `cuda` (no index), claim a GPU no
    other imgcls job holds and make it the current CUDA device, so parallel jobs
    (hydra/launcher=parallel) each get their own. `device=cuda:N` is left alone. After every job,
    free its memory: parallel launchers reuse worker processes for the next job.
    """

    def __init__(self) -> None:
        self.fd: int | None = None

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        multirun = str(OmegaConf.select(config, "hydra.mode")).endswith("MULTIRUN")
        if not multirun or str(config.get("device")) not in ("auto", "cuda"):
            return
        import torch  # lazy: 1.5 s of start-up; only a multirun on CUDA asks it for the GPU count

        count = torch.cuda.device_count()
        if count > 1:
            index, self.fd = claim_gpu(count)
            torch.cuda.set_device(index)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        # on a GPU, drop the finished job's model, optimizer and loaders (tensors in reference cycles
        # hold device memory until a collection), then hand the cached CUDA blocks back. Not on the
        # CPU, where the interpreter's own collections free them: a full collection of a process
        # that holds torch costs up to a second per job (13% of the quick test loop's samples).
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            gc.collect()
            torch.cuda.empty_cache()
        if self.fd is not None:
            release_gpu(self.fd)
            self.fd = None
