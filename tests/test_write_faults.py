"""Faults while writing say what happened and lose nothing: a full disk (a real, small tmpfs), a
read-only location (a read-only bind mount), a storage URL that cannot work, a tracking server that
does not answer. Mounting needs root (or CAP_SYS_ADMIN): where it is refused, those tests skip."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, cli, cli_here, make_tree, run_dirs

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
READ_ONLY = os.strerror(errno.EROFS)  # "Read-only file system"


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not permitted here ({result.stderr.strip()})")


@pytest.fixture
def mounts():
    """mount_tmpfs(folder, size) and bind_read_only(source, folder), unmounted at the end."""
    done: list[Path] = []

    def mount_tmpfs(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
        done.append(folder)
        return folder

    def bind_read_only(source: Path, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        _mount("--bind", str(source), str(folder))
        done.append(folder)
        _mount("-o", "remount,bind,ro", str(folder))
        return folder

    yield mount_tmpfs, bind_read_only
    for folder in reversed(done):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> None:
    """Take every free byte of the file system that holds `folder`."""
    with open(folder / "filler", "wb", buffering=0) as f:  # unbuffered: close has nothing left to write
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)


def temp_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or ".unpack-" in p.name
    )


# -- the one helper, at every call site ---------------------------------------------------------


def test_checkpoint_save_on_a_full_disk_keeps_the_old_file_and_says_so(tmp_path: Path, mounts):
    from imgcls.checkpoint import load_checkpoint, save_checkpoint
    from imgcls.files import WriteError

    disk = mounts[0](tmp_path / "disk", "256k")
    good = {"model": {"w": torch.arange(10.0)}, "epoch": 1}
    save_checkpoint(good, disk / "last.pt")
    with pytest.raises(WriteError) as caught:
        save_checkpoint({"model": {"w": torch.zeros(200_000)}, "epoch": 2}, disk / "last.pt")
    message = str(caught.value)
    # torch.save says "enforce fail at inline_container.cc"; the user reads the file and the reason
    assert message.startswith(f"cannot write {disk / 'last.pt'}: {NO_SPACE}; free space"), message
    assert "inline_container" not in message and "the previous last.pt is kept" in message
    assert load_checkpoint(disk / "last.pt")["epoch"] == 1
    assert torch.equal(load_checkpoint(disk / "last.pt")["model"]["w"], torch.arange(10.0))
    assert temp_files(disk) == []


def test_a_read_only_file_system_is_a_write_error_and_the_file_stays(tmp_path: Path, mounts):
    from imgcls.files import WriteError, atomic_write

    disk = mounts[0](tmp_path / "disk", "64k")
    (disk / "summary.txt").write_text("status: finished\n")
    _mount("-o", "remount,ro", str(disk))
    with pytest.raises(WriteError, match=f"cannot write {disk / 'summary.txt'}: {READ_ONLY}"):
        atomic_write(disk / "summary.txt", "status: running\n")
    assert (disk / "summary.txt").read_text() == "status: finished\n"


def _writers(tmp_path: Path):
    """(name, write into a folder) for every kind of file imgcls publishes."""
    import zipfile

    from imgcls.data.cache import build_store
    from imgcls.data.digits import write_digits
    from imgcls.data.download import unpack
    from imgcls.files import atomic_write
    from imgcls.pages.curves import write_curves
    from imgcls.pages.html import write
    from imgcls.sweeps.summary import write_csv

    tree = make_tree(tmp_path / "tiny", counts={"train": 16})
    samples = [(str(p), 0) for p in sorted(tree.rglob("*.jpg"))]
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a/1.jpg", os.urandom(100_000))  # random: it does not compress
    history = [
        {"epoch": e, "train/loss": 1.0 / e, "val/loss": 1.0, "val/acc": 0.5, "lr": 0.1} for e in (1, 2)
    ]
    job = {"rank": 1, "job": 0, "status": "completed", "val/acc_best": 0.5, "best_epoch": 1, "epochs": "1",
           "params": {"lr": "x" * 20000}, "overrides": "lr=0.1", "run_dir": "r"}  # fmt: skip
    return {
        "report.html": lambda d: write(d / "report.html", "<p>" + "x" * 200_000),
        "curves.png": lambda d: write_curves(history, d / "plots" / "curves.png"),
        "metrics.csv": lambda d: atomic_write(d / "metrics.csv", "epoch\n" * 50_000),
        "sweep_summary.csv": lambda d: write_csv([job] * 20, ["lr"], d / "sweep_summary.csv"),
        "image cache": lambda d: build_store(samples, "disk", None, d / "cache"),
        "digits": lambda d: write_digits(d / "digits"),
        "downloaded archive": lambda d: unpack(archive, d / "data", None),
    }


@pytest.mark.parametrize(
    "what",
    [
        "report.html",
        "curves.png",
        "metrics.csv",
        "sweep_summary.csv",
        "image cache",
        "digits",
        "downloaded archive",
    ],
)
def test_every_writer_on_a_full_disk_names_the_file_and_leaves_no_temp_file(
    what: str, tmp_path: Path, mounts
):
    from imgcls.files import WriteError

    write = _writers(tmp_path)[what]
    disk = mounts[0](tmp_path / "disk", "16k")
    with pytest.raises(WriteError) as caught:
        write(disk)
    assert f": {NO_SPACE}; free space on the file system that holds" in str(caught.value)
    assert str(disk) in str(caught.value)
    assert temp_files(disk) == []
    assert [p.name for p in disk.rglob("*")] in ([], ["plots"], ["cache"])  # nothing half-written


def test_a_page_that_cannot_be_written_is_removed_not_left_stale(tmp_path: Path, mounts):
    """A run's last page write failing must not leave a page that says `running`."""
    from imgcls.pages import write_page
    from imgcls.pages.run_page import write_run_page

    disk = mounts[0](tmp_path / "disk", "256k")
    (disk / "summary.txt").write_text("imgcls training run\nstatus:         running\n")
    (disk / "report.html").write_text("<p>status running</p>")
    fill(disk)
    assert write_page(write_run_page, disk, []) is None  # a warning: the page is a view
    assert not (disk / "report.html").exists()
    assert temp_files(disk) == []


def test_a_failed_run_on_a_full_disk_still_says_failed(tmp_path: Path, mounts):
    """Not even a temp file fits: the final summary is rewritten in place."""
    from imgcls.training.recorder import RunRecorder

    disk = mounts[0](tmp_path / "disk", "512k")
    recorder = RunRecorder(disk, {"trainer": {"epochs": 2}}, 2, info={})
    fill(disk)
    recorder.finish("failed", error="WriteError: cannot write weights/last.pt: No space left on device")
    recorder.close()
    summary = (disk / "summary.txt").read_text()
    assert "status:         failed" in summary and "No space left on device" in summary
    assert temp_files(disk) == []


# -- a training run on a disk that fills up ----------------------------------------------------


@pytest.mark.slow
def test_training_on_a_full_disk_ends_with_an_error_and_keeps_the_last_checkpoint(tmp_path: Path, mounts):
    """7 MB: epoch 1's last.pt and best.pt (3 MB each with this model) fit, epoch 2's last.pt not."""
    tree = make_tree(tmp_path / "tiny")
    disk = mounts[0](tmp_path / "disk", "7m")
    run = disk / "run"
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    last = run / "weights" / "last.pt"
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [
        f"error: cannot write {last}: {NO_SPACE}; free space on the file system that holds {last.parent} "
        f"(df -h {last.parent}); the previous last.pt is kept; continue with python -m imgcls.train resume={last}"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "inline_container" not in result.stderr
    summary = (run / "summary.txt").read_text()
    assert "status:         failed" in summary and NO_SPACE in summary
    assert torch.load(last, weights_only=True)["epoch"] == 1  # the last good checkpoint
    assert temp_files(run) == []


# -- evaluate, predict and export of a run they cannot write into -------------------------------


def test_commands_over_a_read_only_run_say_out_dir_before_the_work(trained_run: Path, tmp_path: Path, mounts):
    run = mounts[1](trained_run, tmp_path / "ro_run")
    image = next(
        (Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]) / "test").rglob("*.jpg")
    )
    commands = {
        "imgcls.evaluate": ([f"run_dir={run}"], run / "eval"),
        "imgcls.predict": ([f"run_dir={run}", f"inputs=[{image}]"], run / "predict"),
        "imgcls.export": ([f"run_dir={run}", "format=safetensors"], run / "export"),
    }
    for module, (args, folder) in commands.items():
        result = cli_here(module, *args, cwd=tmp_path)
        assert result.returncode == 2, (module, result.stderr[-3000:])
        assert (
            f"error: cannot write into {folder}: {READ_ONLY}; pass out_dir=<a writable folder>"
            in result.stderr
        )
        assert "Traceback" not in result.stderr
    out = tmp_path / "elsewhere"
    result = cli_here("imgcls.evaluate", f"run_dir={run}", f"out_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "metrics.json").is_file()


# -- a sweep's storage, checked before any trial runs ------------------------------------------

SWEEP = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *TINY]


def _no_job_ran(cwd: Path) -> bool:
    return not [p for p in cwd.glob("multirun/*/*/*") if p.is_dir() and p.name[0].isdigit()]


@pytest.mark.slow
def test_a_sweep_whose_storage_folder_is_missing_stops_before_any_trial(tmp_path: Path):
    result = cli(
        "imgcls.train", *SWEEP, "hydra.sweeper.storage=sqlite:////nonexistent/dir/x.db", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "error: hydra.sweeper.storage=sqlite:////nonexistent/dir/x.db: the folder /nonexistent/dir does not exist"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert _no_job_ran(tmp_path)


@pytest.mark.parametrize(
    "storage, says",
    [
        ("foo://x", "'foo' is not a database SQLAlchemy knows"),
        (
            "postgresql://user:secret@127.0.0.1/optuna",
            "driver psycopg (for postgresql://) is not installed: pip install",
        ),
        (
            "mysql://127.0.0.1/optuna",
            "driver MySQLdb (for mysql://) is not installed: pip install mysqlclient",
        ),
        ("optuna.db", "this is not a database URL"),
    ],
)
def test_a_storage_url_that_cannot_work_is_an_error_naming_it(storage: str, says: str, tmp_path: Path):
    for name in ("psycopg", "MySQLdb"):  # the drivers whose absence is the case
        if name in says and _importable(name):
            pytest.skip(f"{name} is installed here")
    result = cli_here("imgcls.train", *SWEEP, f"hydra.sweeper.storage={storage}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    shown = storage.replace(":secret@", ":***@")  # a password never reaches the console
    assert f"error: hydra.sweeper.storage={shown}: " in result.stderr and says in result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr
    assert _no_job_ran(tmp_path)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- a tracking server that does not answer ----------------------------------------------------


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def _server(kind: str):
    """A port that refuses (closed), accepts and never answers (silent), or drops the connection
    attempt as a firewall or an unroutable address does (blackhole: a full listen queue)."""
    if kind == "closed":
        yield _closed_port()
        return
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0 if kind == "blackhole" else 8)
    waiting = []
    if kind == "blackhole":  # the queue is full once a couple of connections wait unaccepted
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(server.getsockname())
            waiting.append(c)
        time.sleep(0.2)
    try:
        yield server.getsockname()[1]
    finally:
        for c in waiting:
            c.close()
        server.close()


@pytest.mark.parametrize("kind", ["closed", "silent", "blackhole"])
def test_a_tracking_server_that_does_not_answer_fails_within_the_timeout(kind: str, monkeypatch):
    from imgcls.errors import ConfigError
    from imgcls.tracking import open_client

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with _server(kind) as port:
        uri = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        with pytest.raises(ConfigError) as caught:
            open_client(uri, timeout_s=2)
        took = time.monotonic() - start
    assert took < 8, f"{kind}: {took:.1f} s"  # MLflow's own retries took about 4 minutes
    assert str(caught.value).startswith(
        f"tracking.uri={uri}: the tracking server did not answer within tracking.timeout_s=2 s ("
    )
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # set for the check only


def test_a_training_run_with_an_unreachable_tracking_server_stops_in_seconds(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny", counts={"train": 4, "val": 2, "test": 2})
    uri = f"http://127.0.0.1:{_closed_port()}"
    args = [*TINY, f"data.root={tree}", "tracking=mlflow", f"tracking.uri={uri}", "tracking.timeout_s=3"]
    start = time.monotonic()
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert time.monotonic() - start < 60  # the command's own start-up included
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: tracking.uri={uri}: the tracking server did not answer within tracking.timeout_s=3 s" in (
        result.stderr
    )
    (run,) = run_dirs(tmp_path)
    assert not (run / "weights").exists()  # nothing was trained


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-n", "0", "-q"]))


def test_a_disk_that_fills_during_an_evaluation_is_an_error_not_a_traceback(
    trained_run: Path, tmp_path: Path, mounts
):
    """Any write on a full disk, not only those through imgcls.files (reports, plots, logs)."""
    disk = mounts[0](tmp_path / "disk", "64k")  # room for the check up front, not for the reports
    result = cli_here("imgcls.evaluate", f"run_dir={trained_run}", f"out_dir={disk / 'eval'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: cannot write into {disk / 'eval'}: {NO_SPACE}; free space"), error
    assert error.endswith("; pass out_dir=<a writable folder>")
    assert "Traceback" not in result.stderr
