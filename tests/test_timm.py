"""timm models (model=timm): heads, weights through timm's own loading, the pretrained input config,
and every command with a tiny timm model (test_resnet: 0.37M parameters)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, cli, cli_here, make_tree, run_dirs
from test_resume import assert_same_state

timm = pytest.importorskip("timm", minversion="1.0.11")  # its tiny test models came in 1.0.11

from imgcls.errors import ConfigError  # noqa: E402
from imgcls.models.pretrained_input import with_pretrained_input  # noqa: E402
from imgcls.models.timm import create_model  # noqa: E402

NAME = "test_resnet.r160_in1k"  # timm's tiny test model with a pretrained config: 160 px, mean/std 0.5
ONE = [*TINY, "trainer.epochs=1", "model=timm", f"model.name={NAME}"]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A timm state dict (1000 classes, as timm's pretrained files are) saved as safetensors."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("timm") / "tiny", counts={"train": 4, "val": 2, "test": 2})


@pytest.fixture(scope="module")
def timm_run(tree, weights_file, tmp_path_factory) -> Path:
    """Two epochs of test_resnet from the local weights file, deterministic (resume compares to it)."""
    cwd = tmp_path_factory.mktemp("timm_run")
    args = [
        *ONE,
        f"data.root={tree}",
        f"model.weights={weights_file}",
        "deterministic=true",
        "scheduler=none",
    ]
    result = cli_here("imgcls.train", *args, "trainer.epochs=2", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(cwd)
    return run


def test_head_is_sized_to_the_classes_and_freezing_leaves_the_head():
    for name in ("test_resnet", "test_vit"):
        model = create_model(name, num_classes=3)
        assert model(torch.randn(1, 3, 160, 160)).shape == (1, 3)
    model = create_model("test_resnet", num_classes=3, freeze_backbone=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_a_local_file_loads_through_timm_and_only_the_head_is_new(weights_file, tmp_path):
    from safetensors.torch import load_file

    saved = load_file(str(weights_file))
    pth = tmp_path / "w.pth"
    torch.save(saved, pth)
    for path in (weights_file, pth):
        model = create_model(NAME, num_classes=3, weights=str(path))
        state = model.state_dict()
        assert state["fc.weight"].shape == (3, saved["fc.weight"].shape[1])
        assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("fc."))


def test_bad_weights_files_are_named(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    torch.save(timm.create_model("test_vit", num_classes=1000).state_dict(), tmp_path / "vit.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for file, message in [
        ("evil.pth", "holds more than tensors and plain values (it names posix.system)"),
        ("vit.pth", f"does not fit timm's {NAME}"),
        ("junk.safetensors", "not a safetensors file"),
        ("missing.pth", "not a file"),
    ]:
        with pytest.raises(
            ConfigError, match=rf"^{re.escape(f'model.weights={tmp_path / file}: ')}.*{re.escape(message)}"
        ):
            create_model(NAME, num_classes=3, weights=str(tmp_path / file))


def test_a_model_without_pretrained_weights_says_so():
    with pytest.raises(
        ConfigError, match="^model.weights=pretrained: timm has no pretrained weights for test_mambaout"
    ):
        create_model("test_mambaout", num_classes=3, weights="pretrained")


def test_pretrained_comes_from_the_hugging_face_cache_without_network(weights_file, tmp_path, monkeypatch):
    """The layout huggingface_hub writes (refs/main -> snapshots/<commit>/model.safetensors)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / f"models--timm--{NAME}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(weights_file, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = create_model(NAME, num_classes=2, weights="pretrained")
    from safetensors.torch import load_file

    assert torch.equal(model.state_dict()["conv1.0.weight"], load_file(str(weights_file))["conv1.0.weight"])


def test_pretrained_input_replaces_sizes_and_normalize_once():
    from hydra import compose, initialize_config_dir

    from imgcls.cli import CONFIG_DIR
    from imgcls.config.build import plain

    with initialize_config_dir(config_dir=CONFIG_DIR):
        config = plain(
            compose("train", ["data=imagefolder", "model=timm", f"model.name={NAME}", "data.root=x"])
        )
        digits = plain(compose("train", ["model=timm", f"model.name={NAME}", "model.weights=pretrained"]))
    assert with_pretrained_input(config) == (config, None)  # no weights: the transforms stay
    adapted, line = with_pretrained_input({**config, "model": {**config["model"], "weights": "pretrained"}})
    t = adapted["transforms"]
    assert [n["size"] for n in t["train"] if "size" in n] == [160]  # RandomResizedCrop
    assert (
        [n["size"] for n in t["val"]] == [168, 160] == [n["size"] for n in t["test"]]
    )  # 160 / crop_pct 0.95
    assert t["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert line.startswith("160x160 px, mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5], crop_pct 0.95 ")
    assert with_pretrained_input(adapted)[0] == adapted  # idempotent: a saved config reads back the same
    # a pipeline of Resize alone (digits) resizes to both sides
    assert with_pretrained_input(digits)[0]["transforms"]["val"][0]["size"] == [160, 160]


def test_unknown_name_lists_close_matches(tree, tmp_path):
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", "model=timm", "model.name=convnext_nanoo",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "error: model.name='convnext_nanoo' is not a timm model (closest: convnext_nano" in result.stderr
    assert "Traceback" not in result.stderr
    assert "smaller than 32 px" not in result.stderr  # refused before the data check (its warning)


@pytest.mark.slow
def test_offline_pretrained_says_what_to_fetch_and_where(tree, tmp_path, monkeypatch):
    """A real process: HF_HUB_OFFLINE and HF_HOME are read when huggingface_hub is imported."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("imgcls.train", *ONE, f"data.root={tree}", "model.weights=pretrained", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        f"error: model.weights=pretrained: cannot get timm's pretrained weights of {NAME} ("
    )
    assert f"hf download timm/{NAME} model.safetensors" in error
    assert str(tmp_path / "hf" / "hub") in error and "model.weights=/path/to/model.safetensors" in error
    assert "epoch 1/1" not in result.stderr  # before training
    summary = (run_dirs(tmp_path)[0] / "summary.txt").read_text()
    assert "status:         failed" in summary


@pytest.mark.slow  # a timm run evaluated, predicted and exported to ONNX
def test_the_run_states_its_input_and_evaluate_predict_export_use_it(timm_run, tree, tmp_path):
    line = "160x160 px, mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5], crop_pct 0.95"
    summary = (timm_run / "summary.txt").read_text()
    assert (
        f"input:          {line}" in summary
        and f"model:          {NAME} (timm), 372,979 parameters" in summary
    )
    assert f"input: {line}" in (timm_run / "logs" / "train.log").read_text()
    saved = yaml.safe_load((timm_run / "config.yaml").read_text())
    assert (
        saved["transforms"]["train"][0]["size"] == [160, 160]
        and saved["transforms"]["normalize"]["std"] == [0.5] * 3
    )

    # a run's checkpoint is a weights file too (timm's loader picks its "model" entry)
    best = torch.load(timm_run / "weights" / "best.pt", weights_only=True)["model"]
    model = create_model(NAME, num_classes=2, weights=str(timm_run / "weights" / "best.pt"))
    assert torch.equal(model.state_dict()["conv1.0.weight"], best["conv1.0.weight"])

    # the checkpoint holds every weight: the pretrained file (moved away here) is not needed
    gone = f"model.weights={tmp_path / 'moved.safetensors'}"
    result = cli_here(
        "imgcls.evaluate", f"run_dir={timm_run}", f"out_dir={tmp_path / 'eval'}", gone, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli_here("imgcls.predict", f"run_dir={timm_run}", f"inputs=[{tree / 'test'}]",
                      f"out_dir={tmp_path / 'pred'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    for fmt, suffix in [
        ("onnx", ".onnx"),
        ("torchscript", ".torchscript.pt"),
        ("safetensors", ".safetensors"),
    ]:
        out = tmp_path / "export"
        result = cli_here(
            "imgcls.export", f"run_dir={timm_run}", f"format={fmt}", f"out_dir={out}", cwd=tmp_path
        )
        assert result.returncode == 0, (fmt, result.stderr[-3000:])
        check = json.loads((out / f"best{suffix}.check.json").read_text())
        assert check["passed"], check
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out / "best.onnx")).metadata_props}
    assert '"height": 160' in json.dumps(json.loads(next(v for v in meta.values() if '"input"' in v)))


@pytest.mark.slow  # a resumed training
def test_resume_is_bit_exact_without_the_weights_file(timm_run, tree, weights_file, tmp_path):
    copy = Path(shutil.copy(weights_file, tmp_path / "copy.safetensors"))
    args = [*ONE, f"data.root={tree}", f"model.weights={copy}", "deterministic=true", "scheduler=none"]
    result = cli_here("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    last = run / "weights" / "last.pt"
    copy.unlink()  # the checkpoint holds every weight
    result = cli_here("imgcls.train", f"resume={last}", "trainer.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_state(run, timm_run)


@pytest.mark.slow  # a sweep
def test_lr_find_and_a_grid_sweep(tree, tmp_path):
    result = cli_here("imgcls.lr_find", *ONE, f"data.root={tree}", "lr_find.num_iter=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli_here("imgcls.train", "-m", *ONE, f"data.root={tree}", "optimizer.lr=0.01,0.02", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    with open(sweep / "sweep_summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed", "completed"]


@pytest.mark.slow
def test_torchrun_trains_a_timm_model(tree, tmp_path):
    from test_distributed import finish, torchrun

    rc, out = finish(torchrun(*ONE, f"data.root={tree}", cwd=tmp_path))
    assert rc == 0, out[-3000:]
    (run,) = run_dirs(tmp_path)
    assert "status:         completed" in (run / "summary.txt").read_text()
    assert "2 process(es)" in (run / "summary.txt").read_text()
