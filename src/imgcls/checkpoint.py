"""Checkpoints: plain dicts of tensors and Python values, written atomically, loaded safely."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from imgcls.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    A crash or kill -9 at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _verify_crc(path: Path) -> None:
    """torch.load does not check the zip's CRC32s, so a flipped bit in a tensor loads silently
    as a wrong weight; zipfile checks every member against its CRC (about 1 ms per 10 MB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (not a readable torch zip archive: {exc}). "
            "Use another checkpoint, e.g. best.pt."
        ) from exc
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: entry {bad} fails its CRC check (the file changed after "
            "it was written). Use another checkpoint, e.g. best.pt."
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True), never a fallback to full unpickling; clear errors."""
    path = Path(path)
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        hint = f" Found: {', '.join(siblings)}." if siblings else ""
        raise CheckpointError(f"checkpoint {path} does not exist.{hint}")
    _verify_crc(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values; refusing to "
            f"load it (weights_only=True): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Use another checkpoint, e.g. best.pt."
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an imgcls checkpoint (no 'model' entry)")
    return state
