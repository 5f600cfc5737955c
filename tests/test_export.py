"""`python -m imgcls.export`: ONNX, TorchScript and safetensors exports of a tiny finished run,
checked against PyTorch, read back, run without PyTorch, and refused when corrupt or mismatched."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import cli, cli_here
from odd_files import UNREADABLE, check_predictions, mixed_inputs

from imgcls.config import build as b
from imgcls.deploy.formats import read_safetensors, read_torchscript
from imgcls.models.torchvision import create_model
from imgcls.runs import find_checkpoint, load_run, restore


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def data_root(run: Path) -> Path:
    return Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])


@pytest.fixture(scope="module")
def run(trained_run: Path, tmp_path_factory) -> Path:
    """A private copy of the shared tiny run (exports are written into it)."""
    dest = tmp_path_factory.mktemp("export") / trained_run.name
    shutil.copytree(
        trained_run, dest, copy_function=os.link, ignore=shutil.ignore_patterns("eval", "predict")
    )
    return dest


def export(run: Path, *args: str, runner=None) -> subprocess.CompletedProcess:
    """The export command, in-process unless `runner=cli` (a real process)."""
    return (runner or cli_here)("imgcls.export", f"run_dir={run}", *args, cwd=run.parent, timeout=300)


@pytest.fixture(scope="module")
def onnx_file(run: Path) -> tuple[Path, str]:
    result = export(run, "format=onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "export" / "best.onnx", result.stdout + result.stderr


def reference(run: Path, images: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
    """The run's own eval pipeline and best weights in PyTorch: (uint8 batch, logits)."""
    from imgcls.data.cache import decode

    config, state = load_run(run, find_checkpoint(run, "best"), [])
    restored = restore({**config, "device": "cpu"}, state, find_checkpoint(run, "best"))
    batch = torch.stack([restored.pipelines["val"](decode(p)) for p in images])
    with torch.inference_mode():
        return batch, restored.model.eval()(restored.normalize(batch)).numpy()


@pytest.mark.slow
def test_onnx_export_matches_pytorch_and_documents_itself(run: Path, onnx_file):
    path, output = onnx_file
    # the check ran and says what it measured
    assert (
        "max |logit difference|" in output
        and "(tolerance 0.0001 x the largest |logit|" in output
        and "top-1 agrees on 8/8" in output
    )
    check = json.loads((run / "export" / "best.onnx.check.json").read_text())
    assert check["passed"] and check["batch_sizes_checked"] == [8, 1]
    assert check["max_abs_diff"] <= 1e-4 * check["logit_scale"] == check["allowed_abs_diff"]
    assert check["torch_free"]["top1_agree"] == 8
    # metadata: class names and the preprocessing, readable by any ONNX tool
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == ["cat", "dog", "fox"]
    pre = json.loads(props["preprocessing"])
    assert pre["steps"] == [{"op": "resize", "size": [32, 32], "max_size": None}]
    assert pre["normalize"]["in_model"] is True and pre["normalize"]["mean"] == [0.30, 0.30, 0.30]
    # ONNX Runtime directly, batch sizes 1 and 5: the same logits as PyTorch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [3, 32, 32]
    assert isinstance(inp.shape[0], str)  # a dynamic batch dimension
    images = sorted((data_root(run) / "test").glob("*/*.jpg"))[:5]
    batch, logits = reference(run, images)
    for n in (1, 5):
        got = session.run(None, {"images": batch[:n].numpy()})[0]
        np.testing.assert_allclose(got, logits[:n], atol=1e-4 * max(1, np.abs(logits).max()), rtol=0)


@pytest.mark.slow
def test_predict_runs_the_onnx_model_without_torch(run: Path, onnx_file, tmp_path: Path):
    path, _ = onnx_file
    tree = data_root(run)
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['imgcls.predict', 'onnx={path}', 'inputs=[{tree / 'test'}]', 'out_dir={tmp_path / 'onnx'}']\n"
        "try:\n    runpy.run_module('imgcls.predict', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch imported: False" in result.stdout
    torch_run = cli_here("imgcls.predict", f"run_dir={run}", f"inputs=[{tree / 'test'}]", f"out_dir={tmp_path / 'pt'}",
                    cwd=tmp_path)  # fmt: skip
    assert torch_run.returncode == 0, torch_run.stderr[-3000:]
    onnx_rows, pt_rows = (
        read_csv(tmp_path / "onnx" / "predictions.csv"),
        read_csv(tmp_path / "pt" / "predictions.csv"),
    )
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in pt_rows] and len(onnx_rows) == 12
    for o, p in zip(onnx_rows, pt_rows, strict=True):
        assert o["predicted"] == p["predicted"]
        assert abs(float(o["confidence"]) - float(p["confidence"])) < 1e-4


@pytest.mark.slow
def test_onnx_predict_lists_unreadable_inputs_and_predicts_the_rest(run: Path, onnx_file, tmp_path: Path):
    path, _ = onnx_file
    good = mixed_inputs(data_root(run), tmp_path / "in")

    def predict(inputs: list, out: str) -> subprocess.CompletedProcess:
        return cli_here("imgcls.predict", f"onnx={path}", f"inputs=[{','.join(map(str, inputs))}]",
                   f"out_dir={tmp_path / out}", cwd=tmp_path, timeout=120)  # fmt: skip

    result = predict([tmp_path / "in"], "mixed")
    assert result.returncode == 0, result.stderr[-3000:]
    alone = predict(good, "alone")
    assert alone.returncode == 0, alone.stderr[-3000:]
    rows = read_csv(tmp_path / "mixed" / "predictions.csv")
    check_predictions(rows, tmp_path / "in", result.stderr, read_csv(tmp_path / "alone" / "predictions.csv"))
    none = predict([tmp_path / "in" / name for name in UNREADABLE], "none")
    assert none.returncode == 2, none.stderr[-3000:]
    assert "error: inputs: none of the 4 image(s) can be read, nothing to predict\n" in none.stderr
    assert "ValueError: Decompressed data too large" in none.stderr and "Traceback" not in none.stderr


def corrupt(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_corrupt_or_mismatched_onnx_is_refused(run: Path, onnx_file, tmp_path: Path):
    path, _ = onnx_file
    image = next((data_root(run) / "test").glob("*/*.jpg"))

    def predict_with(model: Path) -> subprocess.CompletedProcess:
        return cli_here("imgcls.predict", f"onnx={model}", f"inputs=[{image}]", f"out_dir={tmp_path / model.stem}",
                   cwd=tmp_path, timeout=120)  # fmt: skip

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # one flipped byte in the middle of the largest weight tensor: still parses, digest differs
    flipped = tmp_path / "flipped.onnx"
    shutil.copy(path, flipped)
    model = onnx.load(str(path))
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    corrupt(flipped, path.read_bytes().find(raw[:64]) + len(raw) // 2)
    # metadata naming 2 classes for a 3-way model
    mismatched = tmp_path / "mismatched.onnx"
    meta = next(p for p in model.metadata_props if p.key == "imgcls")
    doc = json.loads(meta.value)
    doc["class_names"] = ["cat", "dog"]
    meta.value = json.dumps(doc)
    onnx.save(model, str(mismatched))
    for bad, message in [
        (truncated, "not a readable ONNX model"),
        (flipped, "changed since export (digest mismatch)"),
        (mismatched, "gives 3 outputs per image but its metadata names 2 classes"),
        (tmp_path / "missing.onnx", "no such file"),
    ]:
        result = predict_with(bad)
        assert result.returncode == 2, (bad, result.stderr[-2000:])
        assert message in result.stderr and str(bad) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_export_outside_the_tolerance_is_refused_and_the_previous_one_kept(run: Path, onnx_file):
    path, _ = onnx_file
    before = path.read_bytes()
    # ONNX Runtime's kernels differ from PyTorch's in the last bits (about 1e-5 here): tolerance 0 fails
    result = export(run, "format=onnx", "tolerance=0")
    assert result.returncode == 2
    assert "onnx export does not match PyTorch: max |logit difference|" in result.stderr
    assert (path.parent / "best.onnx.rejected").is_file() and path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_torchscript_and_safetensors_round_trip(run: Path):
    for fmt in ("torchscript", "safetensors"):
        result = export(run, f"format={fmt}", "checkpoint=last")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "max |logit difference| 0 (tolerance 0.0001 x" in result.stderr + result.stdout
    images = sorted((data_root(run) / "val").glob("*/*.jpg"))[:6]
    config, state = load_run(run, find_checkpoint(run, "last"), [])
    restored = restore({**config, "device": "cpu"}, state, find_checkpoint(run, "last"))
    from imgcls.data.cache import decode

    batch = torch.stack([restored.pipelines["val"](decode(p)) for p in images])
    with torch.inference_mode():
        expected = restored.model.eval()(restored.normalize(batch))
    scripted, meta = read_torchscript(run / "export" / "last.torchscript.pt")
    assert meta["class_names"] == ["cat", "dog", "fox"] and meta["source"]["epoch"] == state["epoch"]
    with torch.inference_mode():
        # uint8 in, normalized inside; a batch of 6 (traced with 8) may take other kernels: float32 rounding
        torch.testing.assert_close(scripted(batch), expected, rtol=1e-5, atol=1e-5)
    weights, meta = read_safetensors(run / "export" / "last.safetensors")
    assert (
        meta["config"]["model"]["name"] == "shufflenet_v2_x0_5"  # TINY_MODEL
        and meta["preprocessing"]["normalize"]["in_model"] is False
    )
    assert weights.keys() == state["model"].keys()
    assert all(
        torch.equal(weights[k], state["model"][k]) for k in weights
    )  # the checkpoint's weights, exactly
    model = create_model("shufflenet_v2_x0_5", num_classes=3)
    model.load_state_dict(weights)
    _, normalize = b.build_transforms(meta["config"]["transforms"])
    with torch.inference_mode():
        # (the run's model may sit in channels_last, whose kernels round differently)
        torch.testing.assert_close(model.eval()(normalize(batch)), expected, rtol=1e-5, atol=1e-5)
    # a flipped byte in the tensor data (after the 8-byte length and the JSON header)
    path = run / "export" / "last.safetensors"
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    corrupt(path, 8 + header + (path.stat().st_size - 8 - header) // 2)
    from imgcls.deploy.exported import ExportError

    with pytest.raises(ExportError, match="digest mismatch"):
        read_safetensors(path)


@pytest.mark.slow
def test_bad_export_arguments(run: Path):
    result = export(run, "format=tflite", runner=cli)  # the real exit code and error line
    assert (
        result.returncode == 2
        and "format=tflite: choose one of onnx, torchscript, safetensors" in result.stderr
    )
    result = cli_here("imgcls.export", "--help", cwd=run.parent)
    assert result.returncode == 0 and "format: onnx" in result.stdout


@pytest.mark.slow
def test_predict_needs_a_run_or_an_export_not_both(run: Path, onnx_file, tmp_path: Path):
    path, _ = onnx_file
    image = next((data_root(run) / "test").glob("*/*.jpg"))
    result = cli_here("imgcls.predict", f"inputs=[{image}]", cwd=tmp_path)
    assert (
        result.returncode == 2
        and "run_dir is required: set it on the command line, run_dir=..." in result.stderr
    )
    result = cli_here("imgcls.predict", f"run_dir={run}", f"onnx={path}", f"inputs=[{image}]", cwd=tmp_path)
    assert result.returncode == 2 and "not both" in result.stderr
    result = cli_here("imgcls.predict", f"onnx={path}", f"inputs=[{image}]", "device=cpu", cwd=tmp_path)
    assert (
        result.returncode == 2
        and "device=cpu: an exported model has no run config to override" in result.stderr
    )
