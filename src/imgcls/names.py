"""Names from the file system are data wherever they are shown: escaped for text files, logs and the
console (`shown`), neutralised for spreadsheets (`csv_text`), drawn literally in figures (`literal_text`).

A Linux file or folder name is any bytes but "/" and NUL: not valid UTF-8 (Python reads b"\\xff" as the
lone surrogate "\\udcff", which a UTF-8 file refuses to hold), control characters (a newline splits a
log line, ESC drives the terminal), "$...$" (matplotlib typesets it as math, and fails on "$\\frac{$"),
or a leading "=" (a spreadsheet runs the cell as a formula). The name itself is kept as it is for
opening the file; these functions make the text that is written or drawn."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

# lone surrogates: surrogateescape's bytes 0x80-0xff (U+DC80-U+DCFF) and any other half of a pair
_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls, DEL and C1 controls (they end lines, move the cursor, drive a terminal), the line and
# paragraph separators, and the bidirectional overrides that show "gpj.exe" as "exe.jpg"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _surrogate(match: re.Match) -> str:
    code = ord(match.group())
    # the byte surrogateescape stood for, as Python writes a byte (b"\xff" -> "\xff"); a lone half
    # of a pair from elsewhere (a JSON "\ud800") as its code point
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _control(match: re.Match) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def shown(name: object) -> str:
    """A name (a path, a class) as one line of valid UTF-8 text: bytes that are not UTF-8 and
    control characters become Python's backslash escapes (b"\\xff\\xfe.jpg" -> "\\xff\\xfe.jpg",
    a newline -> "\\n"); every other name is returned as it is."""
    text = str(name)
    if text.isascii() and text.isprintable():  # the common case, without the regular expressions
        return text
    return _CONTROL.sub(_control, _SURROGATE.sub(_surrogate, text))


def shown_text(text: object) -> str:
    """A whole message (several lines, names inside it) as valid UTF-8: only the bytes that are
    not UTF-8 are escaped, so its own line breaks stay. The last guard of the log sinks."""
    text = str(text)
    return _SURROGATE.sub(_surrogate, text) if _SURROGATE.search(text) else text


def _encode_shown(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return shown_text(exc.object[exc.start : exc.end]), exc.end


# the `errors=` of every text file imgcls writes (files.atomic_file, the log file): a lone surrogate
# from a name inside a message is written as shown_text writes it, never a UnicodeEncodeError
SHOWN_ERRORS = "imgcls.shown"
codecs.register_error(SHOWN_ERRORS, _encode_shown)


# OWASP's CSV injection list: a cell starting with these is a formula in Excel, LibreOffice and Google
# Sheets (tab and CR start one after the spreadsheet strips them); a leading ' makes it text
_FORMULA = re.compile(r"'*[=+\-@\t\r]")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: object) -> object:
    """A value as a CSV cell: numbers (and numbers written as text, "-0.5") unchanged; text shown
    escaped, with a leading ' when it would start a formula. Names that already start with ' and
    then a formula character get one more, so `csv_value` gives back exactly what was written."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = shown(value)
    if _FORMULA.match(text) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_value(cell: str) -> str:
    """A cell of a CSV this project wrote, as the text before csv_cell neutralised it."""
    return cell[1:] if cell.startswith("'") and _FORMULA.match(cell, 1) else cell


def csv_text(head: Sequence[object], rows: Iterable[Sequence[object] | Mapping[str, object]]) -> str:
    """The CSV file (header, then one line per row) with every cell through csv_cell: the one way
    this project writes a CSV. A row may be a mapping (its values in `head`'s order; missing: empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([csv_cell(h) for h in head])
    for row in rows:
        cells = [row.get(h, "") for h in head] if isinstance(row, Mapping) else row
        writer.writerow([csv_cell(c) for c in cells])
    return buf.getvalue()


def read_csv_text(text: str) -> list[dict[str, str]]:
    """A CSV this project wrote (csv_text), read back as rows of the values before neutralising."""

    def value(cell):  # DictReader's None for a short row's missing cells stays None
        return csv_value(cell) if isinstance(cell, str) else cell

    rows = csv.DictReader(io.StringIO(text))
    return [{value(k): value(v) for k, v in row.items()} for row in rows]


@contextmanager
def literal_text() -> Iterator[None]:
    """Inside: every text matplotlib makes is drawn as written. Figures show names (classes, files,
    overrides), and matplotlib reads text with two "$" as math: "a$b$" loses its dollars and
    "$\\frac{$" raises at the first draw (tight_layout, savefig). A Text keeps the setting it was
    made with; figures are built and saved inside this context, so the tick labels matplotlib
    makes while it draws are literal too. usetex off: LaTeX would read a name as markup."""
    import matplotlib  # lazy: names is on every command's start-up path, figures are not

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        yield


def draw_literally(fig) -> None:
    """Every text already in `fig` drawn as written (for a figure made outside literal_text)."""
    from matplotlib.text import Text  # lazy: see literal_text

    for text in fig.findobj(Text):
        text.set_parse_math(False)
        text.set_usetex(False)
