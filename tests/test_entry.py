"""cli.run_command, the one entry of every command, in-process: what each command gets and how it exits."""

from __future__ import annotations

import sys

import pytest

from imgcls.cli import run_command
from imgcls.errors import DataError


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the entries' configs write nothing (hydra.run.dir: .), but be sure


def test_a_command_over_a_run_gets_its_own_keys_and_the_runs_overrides():
    seen = {}

    def task(cfg: dict, overrides: list[str]) -> None:
        seen.update(cfg=cfg, overrides=overrides)

    argv = ["run_dir=outputs/x/10-31-07_lr=0.1,bs=2", "split=val", "data.root=/t", "+data.extra=1", "~loss.x"]
    before = list(sys.argv)
    run_command("evaluate", task, argv, run_paths=("run_dir",))
    assert seen["cfg"]["run_dir"] == "outputs/x/10-31-07_lr=0.1,bs=2" and seen["cfg"]["split"] == "val"
    assert isinstance(seen["cfg"], dict)  # plain: nothing OmegaConf reaches the command
    assert seen["overrides"] == ["data.root=/t", "+data.extra=1", "~loss.x"]
    assert sys.argv == before  # Hydra reads sys.argv only while it parses


def test_a_command_returns_what_its_job_returns():
    assert run_command("check", lambda cfg: cfg.data.batch_size, ["data.batch_size=3"]) == 3
    assert run_command(None, lambda argv: len(argv), ["a", "b"]) == 2  # no config: python -m imgcls.sweep


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (DataError("3 problem(s) in tree"), 2, "error: 3 problem(s) in tree\n"),
        (KeyboardInterrupt(), 130, ""),
    ],
)
def test_user_errors_and_ctrl_c_exit_without_a_traceback(capsys, raised, code, message):
    def task(cfg):
        raise raised

    with pytest.raises(SystemExit) as exit_:
        run_command("check", task, [])
    assert exit_.value.code == code
    assert capsys.readouterr().err == message


def test_a_missing_mandatory_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_command("export", lambda cfg, overrides: None, [], run_paths=("run_dir",))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: run_dir is required: set it on the command line, run_dir=...\n"
