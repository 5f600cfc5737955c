"""Console and file logging (loguru) and per-epoch progress: a bar on a terminal, lines elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from imgcls.names import SHOWN_ERRORS, shown_text

console = Console(stderr=True)
_sinks: set[int] = set()  # the sinks setup_logging added and teardown_logging has not removed
CONSOLE_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"


def is_terminal() -> bool:
    return console.is_terminal


def setup_logging(log_file: Path | None, level: str = "INFO", prefix: str = "") -> list[int]:
    """Replace loguru's sinks: colored console (through rich, so it prints above a live bar) and
    a file rotated at 10 MB and kept 30 days. Returns the sink ids for `teardown_logging`."""
    logger.remove()
    # a message naming a file that is not UTF-8 holds lone surrogates, which no UTF-8 file or
    # terminal takes: every sink gets them as backslash escapes (b"\xff" -> "\xff")
    logger.configure(patcher=_escape_message)
    ids = [
        logger.add(
            lambda m: console.print(Text.from_ansi(str(m).rstrip("\n")), soft_wrap=True),
            level=level,
            format=prefix.replace("<", "\\<") + CONSOLE_FORMAT,
            colorize=is_terminal(),
        )
    ]
    if log_file is not None:
        ids.append(
            logger.add(
                log_file,
                level="DEBUG",
                format=FILE_FORMAT,
                rotation="10 MB",
                retention="30 days",
                encoding="utf-8",
                errors=SHOWN_ERRORS,  # the last guard: a log line is never a crash
                enqueue=False,
            )
        )
    _sinks.clear()  # logger.remove() above removed every earlier sink
    _sinks.update(ids)
    return ids


def _escape_message(record: dict) -> None:
    record["message"] = shown_text(record["message"])


def teardown_logging(ids: list[int]) -> None:
    for i in ids:
        try:
            logger.remove(i)
        except ValueError:
            pass
        _sinks.discard(i)
    if not _sinks:  # keep a console sink for whatever runs next in this process
        logger.add(sys.stderr, level="INFO", format=CONSOLE_FORMAT)


@contextmanager
def logged(log_file: Path, what: str) -> Iterator[None]:
    """Console and `log_file` sinks for one command (evaluate, predict, export); an exception is
    logged as `<what> failed: ...` in the file too, then re-raised; the sinks are removed after."""
    ids = setup_logging(log_file)
    try:
        yield
    except Exception as exc:
        logger.error(f"{what} failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        teardown_logging(ids)


@contextmanager
def progress(description: str, total: int, every: int = 50) -> Iterator:
    """Yields `advance(**fields)`: a transient bar on a terminal; a log line every `every` steps
    (and at the end) when output goes to a file or a pipe."""
    if is_terminal():
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        with bar:
            task = bar.add_task(description, total=total, info="")

            def advance(**fields: float) -> None:
                bar.update(task, advance=1, info=_fmt(fields))

            yield advance
    else:
        step = 0

        def advance(**fields: float) -> None:
            nonlocal step
            step += 1
            if every and (step % every == 0) and step < total:
                logger.info(f"{description} {step}/{total} {_fmt(fields)}")

        yield advance


def _fmt(fields: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in fields.items())
