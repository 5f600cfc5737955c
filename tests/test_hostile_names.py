"""Names are data wherever they are shown: class folders and files named like math, formulas, markup,
control characters or bytes that are not UTF-8 are checked, trained on, evaluated and reported; what is
written (text, CSV, pages, logs, console) escapes them, and no figure reads them as math."""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, cli_here, run_dirs
from PIL import Image

from imgcls.names import csv_text, read_csv_text, shown

# every one a valid Linux folder name ("/" and NUL are the only bytes a name cannot hold)
HOSTILE = [
    b"$\\frac{$",  # matplotlib's mathtext fails on it: the run died at its first confusion matrix
    b"a$b$",  # mathtext would draw "ab" in italics
    b"=cmd|' -C calc'!A0",  # a spreadsheet formula
    b"@SUM(1)",
    b"<img src=x onerror=alert(1)>",  # markup on a page
    b"a\"b'c&d",
    b"[bold]",  # rich markup in a console table: the name would vanish
    b"\xff\xfe",  # not UTF-8: Python reads it as "\udcff\udcfe"
    b"new\nline\x1b[31m",  # a line break and a terminal escape
]
SHOWN = ["$\\frac{$", "a$b$", "=cmd|' -C calc'!A0", "@SUM(1)", "<img src=x onerror=alert(1)>",
         "a\"b'c&d", "[bold]", "\\xff\\xfe", "new\\nline\\x1b[31m"]  # fmt: skip
FORMULA = tuple("=+-@\t\r")


def hostile_tree(root: Path) -> Path:
    """<root>/<split>/<hostile class>/: a few noisy images, one of them named with bytes that are not
    UTF-8 and one like a formula."""
    rng = np.random.default_rng(0)
    base = os.fsencode(root)
    for split, n in {"train": 4, "val": 2, "test": 2}.items():
        for k, name in enumerate(HOSTILE):
            folder = os.path.join(base, split.encode(), name)
            os.makedirs(folder)
            for i in range(n):
                color = np.array([25 * k, 255 - 25 * k, 120])
                pixels = np.clip(color + rng.integers(-30, 30, size=(16, 20, 3)), 0, 255).astype(np.uint8)
                file = (b"\xfe%d.jpg", b"=1+%d.jpg", b"%d.jpg")[min(i, 2)] % i
                # PIL opens a str path: the name as Python reads it from the file system
                Image.fromarray(pixels).save(os.fsdecode(os.path.join(folder, file)), "JPEG")
    return root


def assert_utf8_text(folder: Path) -> None:
    """Every text file a command wrote is valid UTF-8 (a lone surrogate could not be written)."""
    for path in folder.rglob("*"):
        if path.suffix in {".txt", ".csv", ".html", ".log", ".yaml", ".json"}:
            path.read_bytes().decode("utf-8")  # raises on bytes that are not UTF-8


def assert_no_formula(path: Path) -> list[list[str]]:
    """No cell of the CSV starts a formula, except a plain number (-0.5 stays a number)."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    for row in rows:
        for cell in row:
            if cell.startswith(FORMULA):
                float(cell)  # a formula-like cell that is not a number fails here
    return rows


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> tuple[Path, Path]:
    """The data check, a 1-epoch training and an evaluation of the hostile tree."""
    cwd = tmp_path_factory.mktemp("hostile")
    tree = hostile_tree(cwd / "tree")
    check = cli_here("imgcls.data", "check", "data=imagefolder", f"data.root={tree}", cwd=cwd)
    assert check.returncode == 0, check.stderr[-3000:]
    check.stdout.encode("utf-8")  # the console got text it can print: no lone surrogate
    for name in SHOWN:
        assert name in check.stdout
    train = cli_here("imgcls.train", *TINY, "trainer.epochs=1", f"data.root={tree}", cwd=cwd)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "Traceback" not in train.stderr
    (run,) = run_dirs(cwd)
    evaluation = cli_here("imgcls.evaluate", f"run_dir={run}", "device=cpu", cwd=cwd)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "Traceback" not in evaluation.stderr and "failed" not in evaluation.stderr
    (train.stdout + train.stderr + evaluation.stdout + evaluation.stderr).encode("utf-8")
    assert "[bold]" in evaluation.stdout  # the per-class table shows the name, not a style
    (out,) = (run / "eval").iterdir()
    return run, out


def test_a_training_run_of_hostile_names_finishes_with_every_report(hostile_run):
    run, _ = hostile_run
    summary = (run / "summary.txt").read_text(encoding="utf-8")
    assert "status:         completed" in summary
    classes = next(line for line in summary.splitlines() if line.startswith("classes:"))
    assert all(name in classes for name in SHOWN), classes
    for split in ("train", "val", "test"):
        assert (run / "plots" / f"confusion_matrix_{split}.png").stat().st_size > 0
        report = (run / "logs" / f"classification_report_{split}.txt").read_text(encoding="utf-8")
        assert all(name in report for name in SHOWN)
    assert_utf8_text(run)
    # the log names the files that are not UTF-8 (the small-image warning), escaped
    assert "\\xfe0.jpg" in (run / "logs" / "train.log").read_text(encoding="utf-8")
    assert_no_formula(run / "metrics.csv")


def test_pages_show_hostile_names_as_text(hostile_run):
    run, out = hostile_run
    for page in (run / "report.html", out / "report.html"):
        text = page.read_text(encoding="utf-8")  # escaped by Jinja2: &lt; &#34; &#39; &amp;
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
        assert "a\"b'c&d" not in text and "a\"b'c&d" in html.unescape(text) and "\\xff\\xfe" in text
    # the evaluation page reads its confusions back from predictions.csv: the names as they are
    evaluation = html.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert "=cmd|' -C calc'!A0" in evaluation and "'=cmd" not in evaluation


def test_evaluation_files_neutralise_formulas_and_escape_names(hostile_run):
    _, out = hostile_run
    assert_utf8_text(out)
    rows = assert_no_formula(out / "predictions.csv")
    cells = {cell for row in rows for cell in row}
    assert "'=cmd|' -C calc'!A0" in cells and "'@SUM(1)" in cells  # OWASP: a leading '
    assert "\\xff\\xfe" in cells and any(c.endswith("/\\xfe0.jpg") for c in cells)
    for name in (
        "confusion_matrix",
        "confusion_matrix_normalized",
        "reliability_diagram",
        "most_confident_errors",
    ):
        assert (out / f"{name}.png").stat().st_size > 0
    report = (out / "classification_report.txt").read_text(encoding="utf-8")
    assert all(name in report for name in SHOWN)


def test_a_sweep_leaderboard_of_hostile_overrides(tmp_path):
    """Override values like formulas and math: the CSV neutralises them, keeps numbers as numbers,
    the objective plot draws them, and the sweep page shows them as they were given."""
    from imgcls.sweeps.summary import summarize

    values = [("0.1", "$\\frac{$"), ("-0.5", "=HYPERLINK(1)"), ("0.01", "+x")]
    for num, (lr, tag) in enumerate(values):
        job = tmp_path / f"{num}_job"
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"optimizer.lr={lr}", f"model.name={tag}"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
        (job / "metrics.csv").write_text(f"epoch,val/acc\n1,0.{num + 5}\n", encoding="utf-8")
        (job / "summary.txt").write_text("status: completed\n", encoding="utf-8")
    summarize(tmp_path, stream=io.StringIO())
    rows = assert_no_formula(tmp_path / "sweep_summary.csv")
    head = rows[0]
    by_job = {r[head.index("job")]: r for r in rows[1:]}
    assert by_job["1"][head.index("optimizer.lr")] == "-0.5"  # a number stays a number
    assert by_job["1"][head.index("model.name")] == "'=HYPERLINK(1)"
    assert (tmp_path / "sweep_objective.png").stat().st_size > 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "=HYPERLINK(1)" in page and "&#x27;=HYPERLINK" not in page and "$\\frac{$" in page


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("\udcff\udcfe.jpg", "\\xff\\xfe.jpg"),  # b"\xff\xfe.jpg" as os.listdir gives it
        ("a\nb\tc\r", "a\\nb\\tc\\r"),
        ("\x1b[31mred\x7f", "\\x1b[31mred\\x7f"),
        ("\u202egpj.exe", "\\u202egpj.exe"),  # right-to-left override: shows as "exe.jpg"
        ("\ud800", "\\ud800"),  # half a pair, not from surrogateescape
        ("猫 $x$ C:\\dir", "猫 $x$ C:\\dir"),  # printable names are left alone
    ],
)
def test_shown_escapes_what_a_text_file_or_terminal_cannot_show(name, text):
    assert shown(name) == text
    assert shown(text) == text  # shown twice is shown once
    text.encode("utf-8")


def test_csv_cells_round_trip_and_numbers_stay_numbers():
    cells = ["=1+2", "+1", "-x", "@a", "\tx", "'=x", "'x", "-0.5", "-2", "+1e-3", "-inf", "x", "\udcff"]
    text = csv_text(["a", "=b"], [[c, -0.5] for c in cells])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["a", "'=b"]
    assert [r[0] for r in rows[1:]] == [
        "'=1+2", "+1", "'-x", "'@a", "\\tx", "''=x", "'x", "-0.5", "-2", "+1e-3", "'-inf", "x", "\\xff",
    ]  # fmt: skip
    assert {r[1] for r in rows[1:]} == {"-0.5"}
    back = read_csv_text(text)
    assert [r["=b"] for r in back] == ["-0.5"] * len(cells)
    assert [r["a"] for r in back] == [shown(c) for c in cells]  # what was written, escaped


def test_text_files_hold_a_name_that_is_not_utf8_escaped(tmp_path: Path):
    """An error message naming a file that is not UTF-8 reaches summary.txt and the logs through the
    one atomic writer: written as shown_text writes it, never a UnicodeEncodeError in its place."""
    from imgcls.files import atomic_write, rewrite_in_place

    name = b"\xff\xfe.jpg".decode("utf-8", "surrogateescape")
    atomic_write(tmp_path / "summary.txt", f"status: failed\nerror: cannot decode {name}\n")
    assert (tmp_path / "summary.txt").read_text(encoding="utf-8") == (
        "status: failed\nerror: cannot decode \\xff\\xfe.jpg\n"
    )
    assert rewrite_in_place(tmp_path / "summary.txt", f"status: failed {name}\n")
    assert (tmp_path / "summary.txt").read_text(encoding="utf-8") == "status: failed \\xff\\xfe.jpg\n"
