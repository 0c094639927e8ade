"""Terminal-safe rendering of audit records: escaped text, rich tables and JSON lines."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Final

from rich.cells import cell_len, set_cell_size
from rich.console import Group
from rich.table import Table
from rich.text import Text

from dbward.audit.records import AuditRecord

__all__ = ["WIDE_TABLE_COLUMNS", "escape_text", "format_ts", "record_json", "records_table"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


# Default-ignorable code points that `str.isprintable` accepts (they are not Cf): they draw
# nothing, so "alice" and "alice\ufe0f" would look the same. Variation selectors, the combining
# grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian free variation selectors.
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0100-\U000e01ef]"
)


def _shown(ch: str) -> str:
    return ch if ch.isprintable() and not _INVISIBLE.match(ch) else _escape_char(ch)


def escape_text(value: str) -> str:
    """Client text made safe for a terminal: one line, no control sequences.

    Everything `str.isprintable` rejects is escaped: C0/C1 controls and ESC (\\xNN), newlines,
    bidi overrides and zero-width characters (Cf), line separators, lone surrogates
    (undecodable bytes) and unassigned code points; so are the printable characters that draw
    nothing (`_INVISIBLE`). Backslashes are left alone, so the result is for reading, not for
    parsing back.
    """
    if value.isprintable() and not _INVISIBLE.search(value):
        return value
    return "".join(_shown(ch) for ch in value)


def format_ts(ts_ms: int) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2024-05-01T12:00:00.123Z."""
    dt = datetime.fromtimestamp(ts_ms / 1000.0, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def _truncate(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"


def _status(rec: AuditRecord) -> str:
    if rec.status and rec.sqlstate:
        return f"{rec.status} {rec.sqlstate}"
    return rec.status or rec.sqlstate


# Below this many columns every field no longer fits on one line: the compact table is used.
WIDE_TABLE_COLUMNS: Final = 140


def records_table(
    records: list[AuditRecord], *, sql_width: int = 80, compact: bool = False, width: int = 80
) -> Table | Group:
    """A rich Table of records. Cells are Text objects, so client text is never markup.

    `compact` (a terminal `width` columns wide, narrower than WIDE_TABLE_COLUMNS): seq, time
    (no year), identity, what (a statement's kind, else the event), outcome (decision and
    status) and SQL, one line per record.
    """
    if compact:
        return _compact_lines(records, sql_width, width)
    table = Table(show_lines=False, highlight=False, pad_edge=False)
    for name, justify in (
        ("seq", "right"),
        ("time (UTC)", "left"),
        ("event", "left"),
        ("identity", "left"),
        ("session", "left"),
        ("kind", "left"),
        ("decision", "left"),
        ("status", "left"),
        ("rows", "right"),
        ("ms", "right"),
        ("sql", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for rec in records:
        sql = escape_text(rec.sql_text) if rec.sql_text else escape_text(rec.detail)
        cells = (
            str(rec.seq),
            format_ts(rec.ts_ms),
            str(rec.event),
            rec.identity,
            rec.session_id[:8],
            rec.kind,
            rec.decision,
            _status(rec),
            "" if rec.rows is None else str(rec.rows),
            "" if rec.duration_ms is None else f"{rec.duration_ms:.1f}",
            _truncate(sql, sql_width),
        )
        table.add_row(*(Text(escape_text(c)) for c in cells))
    return table


_COMPACT_HEADERS: Final = ("seq", "time (UTC)", "identity", "what", "outcome", "sql")
_COMPACT_CAPS: Final = (12, 18, 16, 12, 18)  # widest each column may get; the SQL takes the rest
# On a narrow terminal (80 columns: also a pipe) the caps alone leave the SQL no room at all
# (follow_lines' fixed columns took 81): there the columns give up room, in _SHRINK_ORDER, down to
# these floors, until the SQL has _MIN_SQL columns. The floors still show a 10-digit seq, an
# event such as "disconnect" and an outcome such as "deny denied 42501" whole.
_COMPACT_FLOORS: Final = (10, 18, 8, 10, 17)
_SHRINK_ORDER: Final = (2, 0, 3, 4)  # identity, seq, what, outcome
_MIN_SQL: Final = 16


def follow_lines(records: list[AuditRecord], *, header: bool, width: int = 80) -> Group:
    """Compact lines (as records_table's) in fixed column widths, so that lines printed one
    batch at a time (`audit tail --follow`) align; the header line only if `header`."""
    return _compact_lines(records, 80, width, fixed=True, header=header)


def _compact_lines(
    records: list[AuditRecord],
    sql_width: int,
    width: int,
    *,
    fixed: bool = False,
    header: bool = True,
) -> Group:
    rows: list[tuple[str, ...]] = []
    for rec in records:
        sql = escape_text(rec.sql_text) if rec.sql_text else escape_text(rec.detail)
        outcome = " ".join(part for part in (rec.decision, _status(rec)) if part)
        rows.append(
            tuple(
                escape_text(c)
                for c in (
                    str(rec.seq),
                    format_ts(rec.ts_ms)[5:23].replace("T", " "),  # MM-DD HH:MM:SS.mmm
                    rec.identity,
                    rec.kind if rec.event == "statement" else str(rec.event),
                    outcome,
                    _truncate(sql, sql_width),
                )
            )
        )
    widths = [
        cap
        if fixed
        else min(cap, max([cell_len(_COMPACT_HEADERS[i])] + [cell_len(row[i]) for row in rows]))
        for i, cap in enumerate(_COMPACT_CAPS)
    ]
    # (Widths from the content leave the SQL what the records themselves do not need.)
    over = sum(widths) + len(widths) + _MIN_SQL - width if fixed else 0
    for i in _SHRINK_ORDER:
        if over <= 0:
            break
        give = min(over, max(0, widths[i] - _COMPACT_FLOORS[i]))
        widths[i] -= give
        over -= give
    widths.append(max(8, width - sum(widths) - len(widths)))

    def line(cells: tuple[str, ...]) -> str:
        fitted = []
        for i, (cell, size) in enumerate(zip(cells, widths, strict=True)):
            shown = set_cell_size(cell, size - 1) + "…" if cell_len(cell) > size else cell
            fitted.append(shown.rjust(size) if i == 0 else set_cell_size(shown, size))
        return " ".join(fitted).rstrip()

    texts = [Text(line(_COMPACT_HEADERS), style="bold", no_wrap=True)] if header else []
    texts.extend(Text(line(row), no_wrap=True, overflow="crop") for row in rows)
    return Group(*texts)


def record_json(rec: AuditRecord) -> str:
    """One JSON line with every field. ASCII-only, so control bytes arrive as \\u escapes."""
    data = rec._asdict()
    data["event"] = str(rec.event)
    data["tables"] = list(rec.tables)
    data["time"] = format_ts(rec.ts_ms)
    return json.dumps(data, ensure_ascii=True, separators=(",", ":"))
