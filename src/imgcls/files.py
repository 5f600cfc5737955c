"""Writing files so that a reader sees the old version or the new one, never half of one, and a
write that fails (a full disk, a read-only folder) says so in words and leaves nothing behind.

Every file imgcls publishes goes through here: a temp file `.<name>.tmp-<pid>` beside the target
(the same file system, so the rename is atomic), fsync, os.replace, fsync of the folder. On any
failure the temp file is removed and the target keeps what it held; an OSError (ENOSPC, EDQUOT,
EROFS, EACCES, EFBIG, ...) becomes a WriteError whose message names the file, the system's reason
and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from imgcls.errors import UserError
from imgcls.names import SHOWN_ERRORS

# the failures of a write itself; any other OSError in a block (a missing input file) is not ours to rename
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
# the ones only a write raises: the CLI reports them as `error:` wherever the write was (imgcls.cli)
FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# below this many free bytes left after a failed write, the file system is taken to be full: torch.save
# and matplotlib report a full disk as their own errors (torch: "enforce fail at inline_container.cc")
FULL_BYTES = 64 * 1024


class WriteError(UserError):
    """A file or folder imgcls cannot write; the message names it, the reason and what to do."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def temp_name(path: Path) -> Path:
    """`.<name>.tmp-<pid>`: hidden, beside its target, and recognised by a resume's clean-up of a
    kill -9 (training.resume) by that pattern."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_error(path: Path | str, exc: OSError, hint: str = "", *, into: bool = False) -> WriteError:
    """The WriteError for `exc` at `path`: "cannot write <path>: <reason>; <what to do>". `hint` is
    the caller's way out (e.g. "pass out_dir=<a writable folder>"); `into`: `path` is a folder."""
    path = Path(path)
    folder = path if into else path.parent
    code = exc.errno
    fixes = {
        errno.ENOSPC: f"free space on the file system that holds {folder} (df -h {folder})",
        errno.EDQUOT: f"free space within your disk quota on {folder} (quota -s)",
        errno.EACCES: f"make {folder} writable for you",
        errno.EPERM: f"make {folder} writable for you",
    }
    reason = exc.strerror or (os.strerror(code) if code else str(exc))
    todo = "; ".join(part for part in (fixes.get(code, ""), hint) if part) or "write it elsewhere"
    return WriteError(f"cannot write {'into ' if into else ''}{path}: {reason}; {todo}", code)


def atomic_write(path: Path | str, data: bytes | str, *, hint: str = "", durable: bool = True) -> Path:
    """Write `data` (str: UTF-8) to `path` atomically; see `atomic_file`."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb", hint=hint, durable=durable) as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_file(
    path: Path | str, mode: str = "wb", *, hint: str = "", durable: bool = True
) -> Iterator[IO[Any]]:
    """A temp file opened for writing (mode "wb" or "w", UTF-8); when the block ends it replaces
    `path`. torch.save(state, f) and fig.savefig(f, format=...) write into it as into any file.
    Text that is not valid UTF-8 (a file name's surrogate escapes in an error message) is written
    escaped as names.shown_text escapes it, never a UnicodeEncodeError in place of the file."""
    text = {"encoding": "utf-8", "errors": SHOWN_ERRORS}
    with atomic_path(path, hint=hint, durable=durable) as tmp:
        with open(tmp, mode, **({} if "b" in mode else text)) as f:
            yield f  # closed here, before atomic_path fsyncs and publishes it


@contextlib.contextmanager
def atomic_path(path: Path | str, *, hint: str = "", durable: bool = True) -> Iterator[Path]:
    """The temp path that becomes `path` when the block ends, for writers that want a path (ONNX
    export, a memory-mapped cache, a folder tree). A folder published over an existing non-empty
    folder is discarded: another process finished the same work first, and theirs is kept."""
    path = Path(path)
    tmp = temp_name(path)
    _make_parent(path, hint)
    try:
        _remove(tmp)  # a leftover of a process that had our pid before
        yield tmp
        if durable and tmp.is_file():
            _fsync(tmp)
        _publish(tmp, path)
    except BaseException as exc:
        full = _full(tmp.parent)  # before the temp file's space is freed
        _remove(tmp)
        if isinstance(exc, UserError):
            raise  # the block's own error says what it means
        cause = _os_error(exc)
        if cause is not None:
            raise write_error(path, cause, hint) from None
        if full and isinstance(exc, Exception) and not isinstance(exc, UserError):
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), hint) from None
        raise
    if durable:
        _fsync_dir(path.parent)  # make the rename itself durable


@contextlib.contextmanager
def writing_into(folder: Path | str, *, hint: str = "") -> Iterator[None]:
    """The writes in the block that a full or read-only disk stops (reports, plots, logs: files
    written in place inside a new output folder) raise a WriteError naming the file, or `folder`
    where the system names none (a write() on an open file), instead of an OSError traceback."""
    try:
        yield
    except Exception as exc:
        cause = None if isinstance(exc, UserError) else _os_error(exc)
        if cause is None or cause.errno not in FULL_OR_READ_ONLY:
            raise
        named = cause.filename is not None
        raise write_error(cause.filename if named else folder, cause, hint, into=not named) from None


def make_dir(folder: Path | str, *, hint: str = "") -> Path:
    """Create `folder` (and its parents) and prove it writable by writing a file in it, so that a
    read-only or full location is an error before the long work, not a traceback after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc, hint, into=True) from None
    return check_writable(folder, hint=hint)


def check_writable(folder: Path | str, *, hint: str = "") -> Path:
    """Raise WriteError unless a file can be written into `folder`, or (while it does not exist
    yet) into its nearest existing parent, where it would be created. Creates nothing: a command
    that fails later leaves no empty folder behind. os.access cannot tell: root passes it on a
    folder it may not write (a read-only bind mount), and it says nothing about free space."""
    folder = Path(folder)
    existing = folder
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".imgcls-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # a page, not an empty file: a full disk refuses it
            f.flush()
            os.fsync(f.fileno())  # a quota or a full disk may only refuse the data when it is flushed
    except OSError as exc:
        raise write_error(folder, exc, hint, into=True) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


def _make_parent(path: Path, hint: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path.parent, exc, hint, into=True) from None


def _publish(tmp: Path, path: Path) -> None:
    if not tmp.is_dir():
        os.replace(tmp, path)
        return
    try:
        os.rename(tmp, path)  # a folder replaces only a missing or empty one
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not path.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published it first: keep theirs


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or one it was raised from or during (torch.save raises
    RuntimeError("enforce fail ...") while the file's OSError(ENOSPC) is being handled)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BYTES


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def rewrite_in_place(path: Path | str, text: str) -> bool:
    """The last resort for a run's final status on a full disk, where not even a temp file fits:
    overwrite `path` in its own blocks (a file system allocates whole blocks, so a summary a few
    lines longer still fits). Not atomic, hence only for a status that would otherwise stay
    `running`; the status line comes first, so even a cut-off rewrite states it. False: it failed."""
    try:
        with open(path, "r+b") as f:
            f.write(text.encode("utf-8", SHOWN_ERRORS))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    return True
