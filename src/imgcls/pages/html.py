"""What every page is rendered with: the Jinja2 templates beside this module (autoescaped), the run's
files read if present, figures embedded as data URIs, a classification report's rows from its JSON,
and an atomic write. No JavaScript, nothing fetched: a page opens in any browser, offline."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from imgcls.files import WriteError, atomic_write
from imgcls.names import read_csv_text, shown_text

TEMPLATES = Path(__file__).with_name("templates")  # shipped in the wheel (pyproject package-data)


@functools.cache
def _environment():
    # lazy for start-up time: jinja2 and markupsafe take ~40 ms to import (python -X importtime,
    # 3 runs), paid by the first page a process writes, not by `python -m imgcls.train --help`
    import jinja2
    from markupsafe import Markup

    def finalize(value: object) -> object:
        """Every value a template prints, before autoescaping: a name that is not UTF-8 shown as
        backslash escapes (names.shown_text), so any name a file system allows reaches the page as
        text. Markup (a macro's output) is the templates' own HTML and passes as it is."""
        return value if isinstance(value, Markup) else shown_text(value)

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every value is text: a class named <script> is shown, never run
        undefined=jinja2.StrictUndefined,  # a value a template names and the page lacks is a bug
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    """The page `template` (a file in templates/) rendered with `context`."""
    return _environment().get_template(template).render(**context)


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_json(path: Path) -> Any:
    """A JSON file this project wrote; None when it is missing or unreadable (a page shows what is there)."""
    try:
        return json.loads(read(path) or "")
    except json.JSONDecodeError:
        return None


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV this project wrote, its cells as they were before csv_text kept them from being formulas."""
    text = read(path)
    return read_csv_text(text) if text else []


def number(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if result == result else None  # NaN is no number


def pct(value: object) -> str:
    x = number(value)
    return "-" if x is None else f"{100 * x:.2f}%"


def figure(path: Path, caption: str) -> dict[str, str] | None:
    """The PNG for the `figures` macro, embedded in the page (a data URI) so the page is one file
    that can be mailed or moved; None when the figure does not exist."""
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None
    return {"data": data, "caption": caption, "name": path.name}


def figures(items: Iterable[tuple[Path, str]]) -> list[dict[str, str]]:
    """The figures of `items` (path, caption) that exist."""
    return [f for f in (figure(p, c) for p, c in items) if f is not None]


def report_rows(scores: object) -> list[tuple[object, ...]]:
    """The rows of a classification report's JSON (evaluation.metrics.per_class_scores: `classes`
    by name, then `accuracy`, `macro avg`, `weighted avg` beside them, so no class name collides
    with an average): a row per class, then the accuracy and the averages. [] for anything else."""
    if not isinstance(scores, Mapping) or not isinstance(scores.get("classes"), Mapping):
        return []

    def row(name: str, s: Mapping) -> tuple[object, ...]:
        return (name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", s["support"])

    rows = [row(name, s) for name, s in scores["classes"].items()]
    macro = scores.get("macro avg")
    if number(scores.get("accuracy")) is not None and isinstance(macro, Mapping):
        rows.append(("accuracy", "", "", f"{scores['accuracy']:.4f}", macro["support"]))
    for name in ("macro avg", "weighted avg"):
        if isinstance(scores.get(name), Mapping):
            rows.append(row(name, scores[name]))
    return rows


def write(path: Path, text: str) -> Path:
    """Write atomically: a browser reloading the page never reads half of it. A page that cannot be
    written is removed rather than left stale (a finished run's page saying `running`)."""
    try:
        return atomic_write(path, text, durable=False)  # a view, rebuilt from the run's files at will
    except WriteError as exc:
        try:
            path.unlink(missing_ok=True)
            gone = f"; the older {path.name} was removed (it showed an earlier state)"
        except OSError:
            gone = ""
        raise WriteError(
            f"{exc}{gone}; rebuild it with python -m imgcls.pages {path.parent}", exc.errno
        ) from None
