"""Checkpoints: plain dicts of tensors and Python values, written atomically, loaded safely."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from imgcls.errors import UserError
from imgcls.files import atomic_file


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    A crash or kill -9 at any moment leaves either the old file or the new one, never a torn one;
    a full disk or a read-only folder is a WriteError naming the file, and the old file stays.
    """
    path = Path(path)
    kept = f"the previous {path.name} is kept" if path.is_file() else ""
    last = path.parent / "last.pt"
    resume = f"continue with python -m imgcls.train resume={last}" if last.is_file() else ""
    # torch.save streams into the file; its RuntimeError for a full disk is mapped back to ENOSPC
    with atomic_file(path, hint="; ".join(p for p in (kept, resume) if p)) as f:
        torch.save(state, f)


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


class Unloadable(Exception):
    """torch.load(weights_only=True) refused a file or could not read it. `detail` says why in
    words, never torch's advice to retry with weights_only=False; `objects` is True when the file
    holds more than tensors and plain values (a pickled class or function)."""

    def __init__(self, detail: str, objects: bool = False):
        super().__init__(detail)
        self.detail, self.objects = detail, objects


def _first_sentence(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line.split(". ")[0].rstrip(".")


def load_weights_only(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(path, weights_only=True), the one way imgcls reads a .pt file; a file it
    refuses or cannot read raises Unloadable."""
    if path.stat().st_size == 0:
        raise Unloadable("the file is empty")
    try:
        with warnings.catch_warnings():  # a plain pickle.dump file: refused below, no warning first
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False and add_safe_globals: both would run the
        # file's code. Keep only what it found ("GLOBAL posix.system", "Unsupported operand 149").
        named = re.search(r"GLOBAL (\S+)", str(exc))
        if named:
            raise Unloadable(f"it names {named.group(1)}", objects=True) from None
        boilerplate = ("weights_only", "Weights only load failed", "torch.load")
        found = [
            line for line in str(exc).splitlines() if line.strip() and not any(b in line for b in boilerplate)
        ]
        cause = _first_sentence(found[0]) if found else "a pickle instruction it does not allow"
        raise Unloadable(f"the weights-only unpickler stopped at: {cause}") from None
    except Exception as exc:  # torch.load of other bytes: KeyError, IndexError, RuntimeError, ...
        detail = _first_sentence(str(exc))
        raise Unloadable(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True), never a fallback to full unpickling; clear errors."""
    path = Path(path)
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        hint = f" Found: {', '.join(siblings)}." if siblings else ""
        raise CheckpointError(f"checkpoint {path} does not exist.{hint}")
    _verify_crc(path)
    try:
        state = load_weights_only(path, map_location)
    except Unloadable as exc:
        if exc.objects:
            raise CheckpointError(
                f"checkpoint {path} holds more than tensors and plain values ({exc.detail}); refusing to "
                "load it (weights_only=True): imgcls loads only weights-only files. Use a checkpoint "
                "that imgcls wrote, e.g. best.pt."
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({exc.detail}). Use another checkpoint, e.g. best.pt."
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an imgcls checkpoint (no 'model' entry)")
    return state
