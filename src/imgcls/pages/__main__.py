"""`python -m imgcls.pages <dir> [<dir> ...]`: (re)write the page of a run, an evaluation or a sweep
from its files, e.g. for a run made before pages existed or one still running on another machine."""

from __future__ import annotations

import sys
from pathlib import Path

from imgcls.pages.eval_page import write_eval_page
from imgcls.pages.run_page import write_run_page
from imgcls.pages.sweep_page import write_sweep_page


def write_any(folder: Path) -> Path | None:
    """The page for what `folder` holds: a sweep (sweep_summary.csv), an evaluation (metrics.json)
    or a run (summary.txt)."""
    if (folder / "sweep_summary.csv").is_file():
        return write_sweep_page(folder)
    if (folder / "metrics.json").is_file():
        return write_eval_page(folder)
    return write_run_page(folder)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python -m imgcls.pages <run, eval or sweep dir> [...]", file=sys.stderr)
        return 2
    status = 0
    for arg in argv:
        page = write_any(Path(arg))
        if page is None:
            print(
                f"error: {arg} holds no summary.txt, metrics.json or sweep_summary.csv: no page to write",
                file=sys.stderr,
            )
            status = 2
        else:
            print(page)
    return status


if __name__ == "__main__":
    sys.exit(main())
