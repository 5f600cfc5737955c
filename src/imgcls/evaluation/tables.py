"""Rich console tables of an evaluation or a prediction, and the same tables as plain text for logs."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from imgcls.names import shown as shown_name


def name_text(value: object) -> Text:
    """A name (class, path) for a cell: escaped to one line of UTF-8 (names.shown), and a Text, not a
    str, so rich reads no markup in it: a class "[/]x" would raise, "[bold]x" would lose its brackets."""
    return Text(shown_name(value))


def metrics_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", overflow="fold")  # paths in full: a run directory name is long
    for name, value in rows:
        table.add_row(name, name_text(value))
    return table


def class_table(scores: dict) -> Table:
    """Per class precision, recall, F1 and support, then the macro and weighted averages."""
    table = Table(title="per class", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("class")
    for name in ("precision", "recall", "f1", "support"):
        table.add_column(name, justify="right")
    for name, row in scores["classes"].items():
        table.add_row(name_text(name), *_cells(row))
    table.add_section()
    for average in ("macro avg", "weighted avg"):
        table.add_row(average, *_cells(scores[average]), style="bold")
    return table


def _cells(row: dict) -> list[str]:
    return [f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"])]


def confused_table(pairs: Sequence[dict]) -> Table:
    table = Table(title="most confused pairs", box=box.SIMPLE_HEAVY, title_justify="left")
    for name in ("true", "predicted as"):
        table.add_column(name)
    table.add_column("count", justify="right")
    table.add_column("of the true class", justify="right")
    for p in pairs:
        table.add_row(
            name_text(p["true"]), name_text(p["predicted"]), str(p["count"]), f"{100 * p['share']:.1f}%"
        )
    if not pairs:
        table.add_row("-", "-", "0", "no confusions")
    return table


def predictions_table(rows: Sequence[dict], k: int, limit: int) -> Table:
    """One line per image: its path and its top-k classes with probabilities."""
    shown = rows[:limit] if limit >= 0 else rows
    more = f" (first {len(shown)} of {len(rows)}; all in the CSV)" if len(shown) < len(rows) else ""
    table = Table(title=f"top-{k} predictions{more}", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("image", overflow="fold")
    for j in range(1, k + 1):
        table.add_column(f"top {j}")
    for row in shown:
        table.add_row(
            name_text(row["path"]),
            *(
                name_text(f"{shown_name(row[f'top{j}'])} {float(row[f'top{j}_prob']):.3f}")
                for j in range(1, k + 1)
            ),
        )
    return table


def show(tables: Sequence[Table]) -> str:
    """Print the tables to stdout; return them as plain text (for the log file)."""
    console = Console()
    if not console.is_terminal:  # piped or logged: whole lines read and grep better than folded ones
        console = Console(width=160)
    for t in tables:
        console.print(t)
    buf = io.StringIO()
    plain = Console(file=buf, width=120, color_system=None, force_terminal=False)
    for t in tables:
        plain.print(t)
    return buf.getvalue()


def members_table(rows: Sequence[dict], k: int) -> Table:
    """An ensemble: each member's figures, then the ensemble's (the last row)."""
    table = Table(title="ensemble members", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("run", overflow="fold")
    for name in ("epoch", "accuracy", f"top-{k}", "loss", "ECE"):
        table.add_column(name, justify="right")
    for i, r in enumerate(rows):
        if i == len(rows) - 1:
            table.add_section()
        table.add_row(
            name_text(r["run_dir"]), str(r["epoch"]), f"{r['acc']:.4f}", f"{r['top_k_acc']:.4f}",
            f"{r['loss']:.4f}", f"{r['ece']:.4f}", style="bold" if i == len(rows) - 1 else None,
        )  # fmt: skip
    return table
