"""Run directory names: readable from the command-line overrides, and never shared by two runs."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from imgcls.config.rules import linear_lr
from imgcls.errors import UserError
from imgcls.run_record import run_status

# locked (see _held) before Hydra writes anything: of two runs given one directory, exactly one
# gets it, whatever names the directory (a generated name or hydra.run.dir=); a resume holds it too
CLAIM_FILE = ".imgcls-run"

# a run directory is passed back on the command line (resume=<run>/weights/last.pt), so its name
# keeps to characters Hydra's override grammar reads unquoted: no '=', ',', brackets or spaces
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_named: dict[str, str] = {}  # unique_dir's answers: the name asked for -> the name given


def run_label(override_dirname: str) -> str:
    """`data.batch_size=32,optimizer.lr=0.01` -> `batch_size-32_lr-0.01`; no overrides -> `base`.

    Keys listed in hydra.job.config.override_dirname.exclude_keys are already left out by Hydra.
    Keys keep their last component, group choices stay whole (`data=hymenoptera`), and a path
    value keeps its last component, so the name stays one readable folder name.
    """
    parts = []
    for item in _split_overrides(override_dirname):
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra."):
            continue
        if "/" in value:
            value = Path(value.rstrip("/")).name or value
        value = _short_float(value)
        parts.append(_UNSAFE.sub("-", f"{key.rsplit('.', 1)[-1]}-{value}").strip("-"))
    label = "_".join(sorted(parts))
    return label[:120] or "base"


def _short_float(value: str) -> str:
    """`0.0013292918943162175` (an Optuna suggestion) -> `0.00132929`; config.yaml keeps it whole."""
    if len(value) <= 10 or not re.fullmatch(r"[-+]?\d*\.\d+(e[-+]?\d+)?|[-+]?\d+e[-+]?\d+", value, re.I):
        return value
    return f"{float(value):.6g}"


def _split_overrides(text: str) -> list[str]:
    """Split Hydra's override_dirname on the commas that separate overrides, not those in values."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i for i in items + [current] if i]


def unique_dir(path: str) -> str:
    """`path`, or `path_2`, `path_3`, ... when a folder of that name exists: a name, nothing more.

    Resolving a config never touches the filesystem; the run that uses the name claims the folder
    (claim_new_run_dir, from imgcls.config.preflight). The answer is cached per process because
    Hydra resolves the run directory more than once, the last times after the run created it."""
    if path not in _named:
        candidate, n = path, 1
        while Path(candidate).exists():
            n += 1
            candidate = f"{path}_{n}"
        _named[path] = candidate
    return _named[path]


def claim_new_run_dir(path: Path) -> Path:
    """Claim `path` for this run (claim_run_dir) and return it. For a name unique_dir gave, a run
    that took the folder since (started the same second with the same overrides) moves this one
    on to the next free name, returned instead: two runs never share a directory."""
    base = next((b for b, named in _named.items() if named == str(path)), None)
    if base is None:  # a folder the user named (hydra.run.dir=...): this one or none
        claim_run_dir(path)
        return path
    n = 1
    while True:
        candidate = Path(base if n == 1 else f"{base}_{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)  # of two runs, the one that creates it owns it
        except FileExistsError:
            n += 1
            continue
        claim_run_dir(candidate)
        _named[base] = str(candidate)
        return candidate


def run_dir(resume: str | None, new_dir: str) -> str:
    """A resumed run continues in its own directory (<run>/weights/<ckpt>.pt -> <run>); any other
    run is named `new_dir` through unique_dir."""
    if env_rank() > 0:
        # torchrun: rank 0 owns the run directory and hands its path to the others
        return str(Path(tempfile.gettempdir()) / f"imgcls-rank{env_rank()}-{os.getpid()}")
    return str(resumed_dir(resume) or unique_dir(new_dir))


def resumed_dir(resume: str | None) -> Path | None:
    """The run directory a `resume=<run>/weights/<ckpt>.pt` continues in, or None."""
    if resume:
        ckpt = Path(resume)
        if ckpt.is_file() and ckpt.parent.name == "weights":
            return ckpt.parent.parent
    return None


class RunDirTaken(UserError):
    """A run directory that already holds a run (or anything else), or that another run claimed."""


class RunDirBusy(RunDirTaken):
    """A run directory another live process is writing (a second resume of a running run)."""


# One writer per run: the process that writes a run holds an flock on <run>/CLAIM_FILE from its
# start (before Hydra writes anything) until its final summary is written, a new run and a resume
# alike. The kernel drops the lock when the holder dies, however it dies (kill -9, a lost node), so
# a claim whose lock is free is stale by definition: no pid guessing, and it works across hosts.
# On NFS, Linux (2.6.12+) emulates flock with whole-file POSIX locks that the server arbitrates, so
# two hosts sharing a run folder exclude each other too; POSIX locks drop when the process closes
# ANY descriptor of the file, which is why the holder writes its content through the locked
# descriptor and never opens the file again (only other processes read it, for their message).
# resolved run directory -> (the descriptor holding its flock, what this process wrote in the file,
# what the file said before)
_held: dict[Path, tuple[int, str]] = {}


class _Held(Exception):
    def __init__(self, holder: str):
        self.holder = holder


def _lock_claim(path: Path, create_new: bool) -> tuple[int, bool, str]:
    """(descriptor holding the flock on path/CLAIM_FILE, whether this call created the file, the
    file's content before) or _Held(content) when a live process holds it. `create_new`: try an
    exclusive create first (a new run), so the caller learns whether the directory was new."""
    claim = path / CLAIM_FILE
    while True:
        created = False
        try:
            if create_new:
                try:
                    fd, created = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
                except FileExistsError:
                    pass
            if not created:
                fd = os.open(claim, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:  # a read-only or full location: the run could not be written anyway
            raise RunDirTaken(
                f"run {path}: cannot write there ({exc.strerror}); a run is written into its own "
                "directory: make it writable, or copy the run somewhere writable and use the copy"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _Held(_holder(claim)) from None
        except OSError as exc:  # a file system without locks (some FUSE mounts, NFS without lockd)
            from loguru import logger

            logger.warning(
                f"run {path}: its file system cannot lock {CLAIM_FILE} ({exc.strerror}): nothing stops "
                "a second process from writing this run at the same time"
            )
        try:
            same = os.stat(claim).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file a refused run unlinked while this process waited for its lock
            return fd, created, os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        os.close(fd)


def _holder(claim: Path) -> str:
    try:
        return claim.read_text(encoding="utf-8", errors="replace").strip() or "a process"
    except OSError:
        return "a process"


def _take(path: Path, fd: int, before: str) -> None:
    """Record this process as the holder (through the locked descriptor); a claim its holder never
    released belongs to a process that died while it held it: say so, and go on."""
    if before.startswith("claimed by"):
        from loguru import logger

        logger.warning(
            f"run {path}: taking over the claim of a process that ended without releasing it ({before})"
        )
    stamp = _stamp("claimed")
    _write_claim(fd, stamp)
    _held[path.resolve()] = fd, stamp, before


def _stamp(what: str) -> str:
    return f"{what} by pid {os.getpid()} on {socket.gethostname()} at {datetime.now():%Y-%m-%d %H:%M:%S}"


def _write_claim(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{text}\n".encode(), 0)


def claim_run_dir(path: Path) -> None:
    """Make `path` this run's, or raise RunDirTaken and leave it exactly as it was.

    A new or empty directory is claimed by taking CLAIM_FILE's lock (creating it exclusively); a
    directory holding anything else (a finished run, a failed one, the user's files) is refused,
    so no run ever replaces another run's best.pt, metrics or summary, nor mixes its files into
    them. A directory holding only the claim of a process that died is taken over."""
    path.mkdir(parents=True, exist_ok=True)
    if path.resolve() in _held:  # this process's own run (on NFS its lock would not refuse it)
        raise RunDirTaken(_taken_message(path, _held[path.resolve()][1]))
    try:
        fd, created, before = _lock_claim(path, create_new=True)
    except _Held as held:
        raise RunDirTaken(_taken_message(path, held.holder)) from None
    if any(p.name != CLAIM_FILE for p in path.iterdir()):
        if created:
            (path / CLAIM_FILE).unlink()  # under the lock: a waiter notices (_lock_claim) and retries
        os.close(fd)
        raise RunDirTaken(_taken_message(path))
    _take(path, fd, before)


def hold_run_dir(path: Path) -> None:
    """Hold the claim on an existing run directory that this process continues writing (a resume,
    a sweep's job folder), or raise RunDirBusy naming the live process that holds it; nothing is
    written then. Already held by this process: nothing to do."""
    if Path(path).resolve() in _held:
        return
    try:
        fd, _, before = _lock_claim(Path(path), create_new=False)
    except _Held as held:
        # the holder writes its name right after it takes the lock: until then the file says who held it before
        who = re.fullmatch(r"claimed by pid (\d+) on (\S+) at (.+)", held.holder)
        by = f"pid {who[1]} on host {who[2]} since {who[3]}" if who else "another process (starting now)"
        raise RunDirBusy(
            f"run {path} is being written by {by}: wait for it to end or stop it, then run this "
            "again; nothing was written"
        ) from None
    _take(Path(path), fd, before)


def release_run_dir(path: Path) -> None:
    """Let go of this process's claim on `path` (its final summary is written): the claim then
    says it was released, so the next process that takes it does not call it stale. A claim that
    was released before (a resumed run, a sweep job) gets its old text back: a refused resume
    leaves its run byte for byte as it was."""
    fd, _, before = _held.pop(Path(path).resolve(), (None, "", ""))
    if fd is None:
        return
    try:
        _write_claim(fd, before if before.startswith("released by") else _stamp("released"))
    except OSError:
        pass  # a full disk: the lock still goes with the descriptor, and a stale claim is harmless
    os.close(fd)


def release_all() -> None:
    for path in list(_held):
        release_run_dir(path)


def _taken_message(path: Path, holder: str | None = None) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if p.name != CLAIM_FILE)
    last = path / "weights" / "last.pt"
    if not entries:
        what = f"is taken by another run that started there ({holder or _holder(path / CLAIM_FILE)})"
    elif (path / "summary.txt").is_file() or (path / ".hydra").is_dir() or last.is_file():
        status = run_status(path)  # the run's record: run.json, or an old run's summary.txt
        what = f"already holds a run{f' (status {status})' if status else ''}"
        what += f", being written now ({holder})" if holder else ""
    else:
        shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
        what = f"is not empty (it holds {shown})"
    ways = [f"resume={last} to continue that run (trainer.epochs=<more> extends a finished one)"]
    ways = ways if last.is_file() else []
    ways.append("another directory: a new or empty hydra.run.dir, or none for a new dated one")
    return f"hydra.run.dir={path} {what}; nothing was written there. Use {', or '.join(ways)}."


def sweep_dir(resume: str | None, new_dir: str) -> str:
    """hydra.sweep.dir: for `-m ... resume=<sweep>/<job>/weights/last.pt`, the job's own sweep (its
    leaderboard is rebuilt with the resumed result in the job's row); else `new_dir`."""
    resumed = resumed_dir(resume)
    return str(resumed.parent) if resumed else new_dir


def sweep_subdir(resume: str | None, new_subdir: str) -> str:
    """hydra.sweep.subdir: a resumed job's own folder, absolute (Hydra joins it to the sweep dir
    with os.path.join, which keeps an absolute path: right even when resume= itself is swept),
    so it continues with its overrides and .hydra record; else `new_subdir`."""
    resumed = resumed_dir(resume)
    return str(resumed.resolve()) if resumed else new_subdir


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def hydra_subdir(resume: str | None) -> str | None:
    """Where Hydra records the composition: `.hydra`; nothing for a resumed run, whose record
    (`.hydra/resume-<time>`, see resume_record_dir) is written only once the resume is accepted,
    so a refused one leaves the run as it was."""
    if env_rank() > 0 or resume:
        return None  # only rank 0 records the composition, and a resume only once accepted
    return ".hydra"


def resume_record_dir(run_dir: Path) -> Path:
    """`.hydra/resume-<time>`: a resume's record beside the original run's, never over it."""
    return Path(run_dir) / ".hydra" / f"resume-{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"


def write_resume_record(run_dir: Path, nodes: dict[str, Any]) -> None:
    """What Hydra writes to .hydra/ for a new run (config, hydra, overrides), for an accepted resume."""
    from omegaconf import OmegaConf

    folder = resume_record_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in nodes.items():
        (folder / f"{name}.yaml").write_text(OmegaConf.to_yaml(node), encoding="utf-8")


def register_resolvers() -> None:
    resolvers = {
        "run_label": run_label,
        "unique_dir": unique_dir,
        "run_dir": run_dir,
        "hydra_subdir": hydra_subdir,
        "sweep_dir": sweep_dir,
        "sweep_subdir": sweep_subdir,
        "linear_lr": linear_lr,  # optimizer.lr's rule (conf/optimizer/sgd.yaml)
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_resolver(name, fn, use_cache=True)  # OmegaConf 2.4 name
