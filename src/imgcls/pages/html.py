"""The pieces every page is made of: escaped text, tables, embedded images, files read if present,
and an atomic write. No templates engine, no JavaScript: a page opens in any browser, offline."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from imgcls.names import read_csv_text, shown_text

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",sans-serif;
  margin:1.5rem auto;max-width:1280px;padding:0 1rem;color:#1f2328;line-height:1.4}
h1{font-size:1.5rem;margin-bottom:.25rem} h2{font-size:1.15rem;border-bottom:1px solid #d0d7de;
  padding-bottom:.2rem;margin-top:2rem} .sub{color:#59636e;margin-top:0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{font-weight:600;padding:.1rem .5rem;border-radius:.3rem}
.status.completed{background:#dafbe1;color:#116329} .status.running{background:#ddf4ff;color:#0550ae}
.status.failed,.status.interrupted,.status.killed,.status.stale{background:#ffebe9;color:#a40e26}
.error{border-left:4px solid #cf222e;background:#fff5f5;padding:.5rem 1rem}
.figures{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}
figure{margin:0;max-width:100%} .figures.small figure{max-width:560px} figcaption{font-size:.85rem;color:#59636e}
img{max-width:100%;height:auto;border:1px solid #eaeef2}
pre{background:#f6f8fa;padding:.75rem;overflow:auto;font-size:.8rem;max-height:40rem}
.muted{color:#59636e}
"""


def esc(value: object) -> str:
    """Text for HTML: markup characters escaped, and bytes of a name that are not UTF-8 shown as
    backslash escapes (names.shown_text), so any name a file system allows reaches the page as text."""
    return html.escape(shown_text(value), quote=True)


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
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


def table(
    head: Sequence[str], rows: Iterable[Sequence[object]], numeric: Iterable[int] = (), raw: bool = False
) -> str:
    """A table; cells are escaped unless `raw` (cells the caller built as HTML, e.g. links)."""
    right = set(numeric)
    cell = (lambda v: str(v)) if raw else esc
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in right else ''}>{cell(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>{body}</tbody></table>"


def image(path: Path, caption: str) -> str:
    """The PNG embedded in the page (a data URI), so the page is one file that can be mailed or
    moved; empty when the figure does not exist."""
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)} <span class=muted>({esc(path.name)})</span></figcaption></figure>"
    )


def figures(items: Iterable[tuple[Path, str]], small: bool = False) -> str:
    """Figures side by side (`small`: several to a row, e.g. one confusion matrix per split)."""
    shown = [image(p, c) for p, c in items]
    shown = [s for s in shown if s]
    return f'<div class="figures{" small" if small else ""}">{"".join(shown)}</div>' if shown else ""


def fields(rows: Iterable[tuple[str, object]]) -> str:
    """A two-column table of names and values, without a header."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table class=fields><tbody>{body}</tbody></table>" if body else ""


def section(key: str, heading: str, body: str) -> str:
    """A section with a stable id (tests and links find it by `id`); nothing when it has no body."""
    return f'<section id="{key}"><h2>{esc(heading)}</h2>{body}</section>' if body else ""


def page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<meta name=generator content=imgcls><title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{esc(title)}</h1><p class=sub>{esc(subtitle)}</p>{''.join(sections)}</body></html>\n"
    )


def write(path: Path, text: str) -> Path:
    """Write atomically: a browser reloading the page never reads half of it. A page that cannot be
    written is removed rather than left stale (a finished run's page saying `running`)."""
    from imgcls.files import WriteError, atomic_write

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


def report_table(text: str) -> str:
    """A classification report (the text of classification_report_<split>.txt) as a table: one row
    per class, then the averages. Class names may contain spaces: the numbers are read from the right."""
    rows, averages = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[:3] == ["precision", "recall", "f1-score"]:
            continue
        numbers = []
        while parts and number(parts[-1]) is not None and len(numbers) < 4:
            numbers.insert(0, parts.pop())
        name = " ".join(parts)
        if not name:
            continue
        if name == "accuracy" and len(numbers) == 2:
            averages.append((name, "", "", numbers[0], numbers[1]))
        elif len(numbers) == 4:
            (averages if name in ("macro avg", "weighted avg", "micro avg") else rows).append(
                (name, *numbers)
            )
    if not rows:
        return f"<pre>{esc(text)}</pre>"
    return table(
        ["class", "precision", "recall", "f1-score", "support"], rows + averages, numeric=(1, 2, 3, 4)
    )
