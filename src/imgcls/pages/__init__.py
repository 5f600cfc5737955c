"""What a person opens to see how a run went: training curves and one HTML page per run, evaluation
and sweep.

Owns: `curves` (plots/curves.png from the metric history), `templates/` (the Jinja2 layout, one
template per page and the macros for tables, fields and figures), `html` (renders them with
autoescaping; reads files, embeds images, writes atomically), `run_page` (report.html in a run
directory), `eval_page` (report.html in eval/<split>-<ckpt>/) and `sweep_page` (report.html beside
sweep_summary.csv).

Pages are built from the machine-readable files a run, an evaluation or a sweep has already written
(run.json through imgcls.run_record, metrics.csv, metrics.json, the reports' JSON, the leaderboard
CSV, the figures), never from a text view, so any of them can be rebuilt at any time. Self-contained:
images are embedded, no network, no JavaScript.

May import: `imgcls.errors`, `imgcls.run_record`, matplotlib and jinja2; never training, evaluation
or the entries (they call it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_page(writer: Callable[..., Path | None], *args: Any) -> Path | None:
    """Call a page writer where a run, an evaluation or a sweep goes on: a page that cannot be
    written (a full disk, an odd file) is a warning, never the end of the work it describes."""
    from loguru import logger

    try:
        return writer(*args)
    except Exception as exc:  # noqa: BLE001 - the page is a view; the run's own files are the record
        logger.warning(
            f"{writer.__name__} failed ({type(exc).__name__}: {exc}); the run's files are unaffected"
        )
        return None
