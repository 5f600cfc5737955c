"""Bounded work before trust: only regular files are opened, no file is read past data.max_file_mb,
and sizes from any config (the command line, a saved run) are refused by key before anything is
allocated. Each test with real special files, within seconds, never reading gigabytes."""

from __future__ import annotations

import contextlib
import csv
import re
import resource
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, cli_here, make_tree
from odd_files import SPECIAL, release_fifos, special_files

from imgcls.data import ImageFolderData
from imgcls.data.images import BadImageError, load_image, read_image_file

LIMIT_S = 30  # each call below takes about a second; a FIFO opened for reading would block forever
HEADROOM = 2 * 2**30  # bytes the process may add while a test runs: a read of /dev/zero stops there


@contextlib.contextmanager
def bounded_memory():
    """RLIMIT_DATA at what the process holds now plus HEADROOM: a regression that reads /dev/zero
    or a sparse file whole fails with MemoryError instead of filling the machine."""
    held = next(
        int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmData:")
    )  # fmt: skip
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (held + HEADROOM, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def within_limit(fn, fifos=()):
    """fn() under bounded_memory, in this thread (cli_here sets signal handlers, which only the
    main thread may); it fails, never hangs, when it takes over LIMIT_S: a watchdog then gives the
    FIFOs a writer, so that a reader blocked on one reads EOF and the call returns."""
    done = threading.Event()

    def watchdog():
        if not done.wait(LIMIT_S):
            while not done.wait(0.2):
                release_fifos(fifos)

    threading.Thread(target=watchdog, daemon=True).start()
    start = time.monotonic()
    try:
        with bounded_memory():
            value = fn()
    finally:
        done.set()
    assert time.monotonic() - start < LIMIT_S, f"took over {LIMIT_S} s: something blocked on a special file"
    return value


def assert_reasons(lines: dict[str, str]) -> None:
    """{file name: its reason} holds each SPECIAL file with the reason SPECIAL gives."""
    assert sorted(lines) == sorted(SPECIAL), lines
    for name, why in lines.items():
        assert re.search(SPECIAL[name], why), (name, why)


@pytest.fixture
def special_tree(tmp_path: Path) -> Path:
    tree = make_tree(tmp_path / "tree")
    special_files(tree / "train" / "cat")
    return tree


def test_reading_refuses_special_and_huge_files_by_what_they_are(tmp_path: Path):
    paths = special_files(tmp_path / "odd")
    for path in paths:
        with pytest.raises(BadImageError) as caught:
            within_limit(lambda p=path: load_image(p), paths)
        assert re.search(SPECIAL[path.name], str(caught.value)), (path.name, str(caught.value))
    # the cap is data.max_file_mb's: a real image one byte over it is refused unread, at it read
    good = tmp_path / "good.png"
    make_tree(tmp_path / "t", {"train": 1})
    shutil.copy(next((tmp_path / "t" / "train" / "cat").iterdir()), good)
    size = good.stat().st_size
    assert len(read_image_file(good, size)) == size
    with pytest.raises(BadImageError, match=r"above data\.max_file_mb="):
        read_image_file(good, size - 1)


def test_the_check_lists_each_special_file_with_what_it_is(special_tree: Path):
    fifos = [special_tree / "train" / "cat" / "fifo.jpg"]
    report, record = within_limit(lambda: ImageFolderData(str(special_tree), {"train": "train", "val": "val"},
                                                           batch_size=4).inspect(), fifos)  # fmt: skip
    assert record is None
    (listing,) = [e for e in report.errors if "cannot be used" in e]
    assert listing.startswith(f"{len(SPECIAL)} file(s) cannot be used")
    lines = dict(line.split(": ", 1) for line in listing.splitlines()[1:])
    assert_reasons({Path(rel).name: why for rel, why in lines.items()})
    # skip mode: left out with a reported problem, the regular files still make the record
    report, record = within_limit(lambda: ImageFolderData(str(special_tree), {"train": "train", "val": "val"},
                                                           batch_size=4, on_bad_image="skip").inspect(), fifos)  # fmt: skip
    assert record is not None and report.skipped_bad == len(SPECIAL)
    assert len(record.samples["train"]) == 24 and not any("fifo" in p for p, _ in record.samples["train"])


def test_the_check_cli_exits_2_without_reading_gigabytes(special_tree: Path, tmp_path: Path):
    """A process: the exit code, and its peak memory (a 20 GB sparse file and /dev/zero in the tree)."""
    import subprocess
    import sys

    # at most 3 GB of data for the process (torch's libraries take under 1): reading /dev/zero or the
    # 20 GB file whole ends in MemoryError instead of filling the machine
    command = f"ulimit -d {3 * 2**20}; exec {sys.executable} -m imgcls.data check data=imagefolder data.root={special_tree}"
    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    assert f"{len(SPECIAL)} file(s) cannot be used" in result.stdout
    assert "error: 1 problem(s)" in result.stderr


def test_training_stops_before_it_starts_and_names_each_file(special_tree: Path, tmp_path: Path):
    fifos = [special_tree / "train" / "cat" / "fifo.jpg"]
    result = within_limit(
        lambda: cli_here("imgcls.train", *TINY, f"data.root={special_tree}", cwd=tmp_path), fifos
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = dict(re.findall(r"train/cat/(\w+\.\w+): (.*)", result.stderr))
    assert_reasons(lines)


def test_predict_reports_special_inputs_and_predicts_the_rest(trained_run: Path, tmp_path: Path):
    folder = tmp_path / "inputs"
    special_files(folder)
    good = sorted((Path(yaml.safe_load((trained_run / "config.yaml").read_text())["data"]["root"]) / "test").glob(
        "*/*_000.jpg"))  # fmt: skip
    for path in good:
        shutil.copy(path, folder / path.name)
    fifo = folder / "fifo.jpg"
    out = tmp_path / "out"
    # the folder (listed by suffix) and a special file named on its own, which is listed once
    result = within_limit(lambda: cli_here("imgcls.predict", f"run_dir={trained_run}", f"inputs=[{folder},{fifo}]",
                                           f"out_dir={out}", cwd=tmp_path), [fifo])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "predictions.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert_reasons({name: r["error"] for name, r in rows.items() if r["error"]})
    assert all(rows[p.name]["predicted"] and not rows[p.name]["error"] for p in good)
    assert f"{len(SPECIAL)} of {len(SPECIAL) + len(good)} input(s) cannot be read" in result.stderr
    # nothing readable: error, naming the file and what it is
    result = within_limit(lambda: cli_here("imgcls.predict", f"run_dir={trained_run}", f"inputs=[{fifo}]",
                                           f"out_dir={tmp_path / 'out2'}", cwd=tmp_path), [fifo])  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"error: inputs: none of the 1 image(s) can be read, nothing to predict\n  {fifo}: a FIFO"
        in result.stderr
    )


SIZES = [
    ("transforms.val[0].size=100000", r"error: transforms\.val\[0\]\.size=100000: above 4096 pixels"),
    (
        "transforms.train[0].size=[32,100000]",
        r"error: transforms\.train\[0\]\.size=100000: above 4096 pixels",
    ),
    ("data.batch_size=1000000000", r"error: data\.batch_size=1000000000: above 65536 images"),
    # 4096 px sides are allowed, and 64 of them are 12 GB of float input: more than a quarter of memory
    (
        "data.batch_size=64 transforms.val[0].size=[4096,4096]",
        r"error: data\.batch_size=64: a batch of 4096x4096 px images is 12\.0 GB as a float tensor alone",
    ),
    ("data.num_workers=100000", r"error: data\.num_workers=100000: above \d+"),
    ("data.max_image_pixels=1000000000000", r"error: data\.max_image_pixels=1,000,000,000,000: one image"),
    ("data.max_file_mb=1000000", r"error: data\.max_file_mb=1000000: the data check reads 8 files at once"),
]


@pytest.mark.parametrize("override, message", SIZES, ids=[s[0].split("=")[0] for s in SIZES])
def test_absurd_sizes_on_the_command_line_are_refused_by_key(tmp_path: Path, override: str, message: str):
    if "4096" in override and _memory() > 4 * 64 * 3 * 4096 * 4096 * 4:
        pytest.skip("this machine has the memory for that batch")
    tree = make_tree(tmp_path / "tree")
    result = cli_here("imgcls.train", *TINY, f"data.root={tree}", *override.split(), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def _memory() -> int:
    from imgcls.config.build import physical_memory

    return physical_memory() or 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            ("transforms", "val", 0, "size"),
            100000,
            r"error: transforms\.val\[0\]\.size=100000: above 4096 pixels",
        ),
        (("data", "batch_size"), 10**9, r"error: data\.batch_size=1000000000: above 65536 images"),
        (
            ("data", "max_image_pixels"),
            10**12,
            r"error: data\.max_image_pixels=1,000,000,000,000: one image that large takes up to",
        ),
    ],
    ids=["resize", "batch_size", "max_image_pixels"],
)
def test_a_saved_runs_absurd_sizes_are_refused_by_evaluate_and_predict(
    trained_run: Path, tmp_path: Path, key: tuple, value: int, message: str
):
    run = tmp_path / "sent" / trained_run.name
    shutil.copytree(trained_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    node = config
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    image = next((Path(config["data"]["root"]) / "test").glob("*/*_000.jpg"))
    for module, args in (
        ("imgcls.evaluate", [f"run_dir={run}", "split=val", f"out_dir={tmp_path / 'eval'}"]),
        ("imgcls.predict", [f"run_dir={run}", f"inputs=[{image}]", f"out_dir={tmp_path / 'pred'}"]),
    ):
        result = within_limit(lambda m=module, a=args: cli_here(m, *a, cwd=tmp_path))
        assert result.returncode == 2, (module, result.stderr[-3000:])
        assert re.search(message, result.stderr), (module, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_the_default_configs_pass_the_size_limits():
    """Every shipped transforms preset and model with each data option's batch: nothing refused."""
    from imgcls.config.build import check_sizes

    conf = Path(__file__).parents[1] / "conf"
    for preset in sorted((conf / "transforms").glob("*.yaml")):
        transforms = yaml.safe_load(preset.read_text())
        check_sizes({"transforms": transforms, "data": {"batch_size": 256, "num_workers": 8}})
    check_sizes({"model": {"image_size": 224}, "data": {"max_image_pixels": 89478485, "max_file_mb": 256}})
