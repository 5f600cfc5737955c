"""What `python -m imgcls.train` refuses before it writes: a directory that holds a run, a
digits root that is a typo, +keys that nothing reads, strings where numbers belong."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, cli_here, make_tree, run_dirs
from hydra import compose, initialize_config_dir

from imgcls.cli import CONFIG_DIR
from imgcls.config import build as b
from imgcls.errors import ConfigError, DataError


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path below `folder` (hidden ones too: .hydra/) with its bytes; None for a folder."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")
    }


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imgcls.train", *args], cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )  # fmt: skip


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name="train", overrides=list(overrides))


def check(*overrides: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        from imgcls.config.preflight import check_added_keys

        check_added_keys(cfg, list(overrides))


# -- a run directory holds one run ---------------------------------------------------------------


def test_a_finished_run_directory_is_refused_and_left_byte_identical(trained_run: Path, tmp_path: Path):
    run = tmp_path / "finished"
    shutil.copytree(trained_run, run)  # a copy: the session's run stays intact for other tests
    before = snapshot(run)
    assert {".hydra/config.yaml", "logs/train.log", "weights/best.pt", "summary.txt"} <= set(before)
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in before)
    tree = make_tree(tmp_path / "tiny")
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"error: hydra.run.dir={run} already holds a run (status completed); nothing was written"
        in result.stderr
    )
    assert f"resume={run / 'weights' / 'last.pt'} to continue that run" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(run) == before
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_two_runs_started_on_one_directory_one_wins(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny", counts={"train": 2, "val": 1})
    run = tmp_path / "shared"
    run.mkdir()  # an empty folder the user made may be used
    args = [*TINY, f"data.root={tree}", "trainer.epochs=1", f"hydra.run.dir={run}"]
    procs = {seed: start([*args, f"seed={seed}"], tmp_path) for seed in (1, 2)}
    done = {seed: (p.wait(timeout=300), p.stderr.read()) for seed, p in procs.items()}
    codes = sorted(code for code, _ in done.values())
    assert codes == [0, 2], {s: err[-1500:] for s, (_, err) in done.items()}
    (winner,) = [s for s, (code, _) in done.items() if code == 0]
    (loser_err,) = [err for code, err in done.values() if code == 2]
    assert f"error: hydra.run.dir={run} " in loser_err and "nothing was written there" in loser_err
    # every file is the winner's: its config, summary and checkpoint, one log
    assert f"seed: {winner}\n" in (run / "config.yaml").read_text()
    assert f"  seed: {winner}\n" in (run / "summary.txt").read_text()
    assert "status:         completed" in (run / "summary.txt").read_text()
    import torch

    assert torch.load(run / "weights" / "best.pt", weights_only=True)["config"]["seed"] == winner
    assert (run / "logs" / "train.log").read_text().count("run directory:") == 1


def test_a_claimed_directory_is_refused(tmp_path: Path):
    from imgcls.config.naming import CLAIM_FILE, RunDirTaken, claim_run_dir

    run = tmp_path / "claimed"
    claim_run_dir(run)  # as a run that has just started there
    with pytest.raises(RunDirTaken, match="is taken by another run that started there"):
        claim_run_dir(run)
    result = cli_here("imgcls.train", *TINY, "data.root=nowhere", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"error: hydra.run.dir={run} is taken by another run that started there (claimed by pid"
        in result.stderr
    )
    assert [p.name for p in run.iterdir()] == [CLAIM_FILE]


def test_a_folder_of_other_files_is_refused_and_an_empty_one_claimed(tmp_path: Path):
    from imgcls.config.naming import CLAIM_FILE, RunDirTaken, claim_run_dir

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirTaken, match=r"is not empty \(it holds notes.txt\)"):
        claim_run_dir(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    claim_run_dir(tmp_path / "empty")
    claim_run_dir(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run" / CLAIM_FILE).is_file()


# -- +keys that nothing reads --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["+optimizer.foreach=true"],  # an argument of torch.optim.SGD the YAML does not list
        ["optimizer=adam", "+optimizer.amsgrad=true"],
        ["+model.dropout=0.2"],  # create_model passes **kwargs to torchvision
        ["++trainer.epochs=3"],  # ++ on a key that exists is an ordinary override
        ["+hydra.job.env_set.X=1"],
        ["experiment=digits_fast"],
    ],
)
def test_added_keys_that_are_read_pass(overrides):
    check(*overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+optimzer.lr=0.1"], "+optimzer.lr: no such key; did you mean optimizer.lr?"),
        (["+optimizer.nesterow=true"], "+optimizer.nesterow: no such key; did you mean optimizer.nesterov?"),
        (["+trainer.epoch=3"], "+trainer.epoch: no such key; did you mean trainer.epochs?"),
        (["++optimizer.foreech=true"], "++optimizer.foreech: no such key; did you mean optimizer.foreach?"),
        (
            ["+optimizer.betas=[0.9,0.99]"],
            "+optimizer.betas: no such key; torch.optim.SGD takes no argument 'betas'",
        ),
        (["+seeed=1"], "+seeed: no such key; did you mean seed?"),
    ],
)
def test_added_keys_that_nothing_reads_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        check(*overrides)
    assert str(info.value).startswith(message)


def test_unread_key_is_refused_before_anything_is_written(tmp_path: Path):
    result = cli_here("imgcls.train", "+optimzer.lr=0.1", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: +optimzer.lr: no such key; did you mean optimizer.lr?" in result.stderr
    assert "Traceback" not in result.stderr
    # a sweep is refused as a whole, before its first job
    result = cli_here("imgcls.train", "-m", "+optimzer.lr=0.1,0.2", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: +optimzer.lr: no such key; did you mean optimizer.lr?" in result.stderr
    assert list(tmp_path.iterdir()) == []


# -- a refused resume --------------------------------------------------------------------------


def test_a_refused_resume_leaves_the_run_byte_identical(trained_run: Path, tmp_path: Path):
    run = tmp_path / "finished"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    last = run / "weights" / "last.pt"
    for args, message in [
        (["optimizer.lr=0.3"], "optimizer.lr=0.3 would change the saved run"),
        ([], "the run already finished 2 of 2 epochs"),
    ]:
        result = cli_here("imgcls.train", f"resume={last}", *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr
        assert snapshot(run) == before, "no .hydra/resume-<time>/, no log lines, nothing"


# -- the digits are written only where they belong ----------------------------------------------


def test_a_missing_digits_root_elsewhere_is_a_typo_not_a_place_to_write(tmp_path: Path):
    typo = tmp_path / "my_imagez"
    result = cli_here("imgcls.train", f"data.root={typo}", "trainer.epochs=1", "device=cpu", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: data.root='{typo}' does not exist." in result.stderr
    assert "add data=imagefolder" in result.stderr and "Traceback" not in result.stderr
    assert not typo.exists() and not list(tmp_path.glob(".my_imagez*"))
    (run,) = run_dirs(tmp_path)
    assert not (run / "weights").exists()


def test_digits_are_written_into_their_default_or_an_empty_folder(tmp_path: Path, monkeypatch):
    from imgcls.data.digits import DEFAULT_ROOT, MARKER, DigitsData, write_digits

    assert str(DEFAULT_ROOT) == compose_train().data.root  # the YAML's default is the one allowed
    monkeypatch.chdir(tmp_path)
    splits = {"train": "train", "val": "val"}
    with pytest.raises(DataError, match="does not exist"):
        DigitsData(str(tmp_path / "typo"), splits, batch_size=8).prepare()
    assert not (tmp_path / "typo").exists()
    written: list[Path] = []
    monkeypatch.setattr("imgcls.data.digits.write_digits", lambda root: written.append(root))
    DigitsData(str(DEFAULT_ROOT), splits, batch_size=8).prepare()
    (tmp_path / "made").mkdir()
    DigitsData(str(tmp_path / "made"), splits, batch_size=8).prepare()
    assert written == [DEFAULT_ROOT, tmp_path / "made"]
    # a tree imgcls wrote (its marker) is read wherever it lives
    write_digits(tmp_path / "copy")
    assert (tmp_path / "copy" / MARKER).is_file()
    DigitsData(str(tmp_path / "copy"), splits, batch_size=8).prepare()


# -- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=abc", "optimizer.lr='abc': expected a number"),
        ("trainer.epochs=abc", "trainer.epochs='abc': expected a number"),
        ("scheduler.warmup_epochs=x", "scheduler.warmup_epochs='x': expected a number"),
        ("data.batch_size=x", "data.batch_size='x': expected a number"),
        ("trainer.grad_clip_norm=true", "trainer.grad_clip_norm=True: expected a number"),
    ],
)
def test_a_string_where_a_number_belongs_names_the_key(override, message, tmp_path):
    cfg = compose_train("data=imagefolder", f"data.root={tmp_path}", override)
    config = b.plain(cfg)
    with pytest.raises(ConfigError) as info:
        b.check_number_keys(config)
        b.check_numbers(config)
    assert str(info.value) == message


def test_a_string_learning_rate_fails_before_training_with_the_key(tmp_path: Path, tiny_tree: Path):
    result = cli_here(
        "imgcls.train", *TINY, f"data.root={tiny_tree}", "optimizer.lr=abc", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: optimizer.lr='abc': expected a number" in result.stderr
    assert "not supported between" not in result.stderr
    (run,) = run_dirs(tmp_path)
    assert "status:         failed" in (run / "summary.txt").read_text()
