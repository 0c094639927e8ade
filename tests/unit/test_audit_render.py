"""Rendering audit records on a terminal: control characters escaped, markup never interpreted."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.render import escape_text, format_ts, record_json, records_table


def test_escape_text() -> None:
    assert escape_text("SELECT 1") == "SELECT 1"
    assert escape_text("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert escape_text("\x1b[31mred") == "\\x1b[31mred"
    assert escape_text("\x00\x7f\x85\x9b") == "\\x00\\x7f\\x85\\x9b"
    assert escape_text("\u202eevil\u2028") == "\\u202eevil\\u2028"  # bidi override, line sep
    assert escape_text("\udcff") == "\\udcff"
    assert escape_text("naïve ü 日本") == "naïve ü 日本"


@given(st.text())
def test_escaped_text_is_one_printable_line(s: str) -> None:
    out = escape_text(s)
    assert out.isprintable()
    assert escape_text(out) == out


def test_invisible_printable_characters_are_escaped() -> None:
    """Characters that draw nothing yet count as printable (variation selectors, the combining
    grapheme joiner, Hangul fillers, Mongolian free variation selectors) made two different
    texts look the same: `alice` and `alice\ufe0f`, a table `users` and `users\u3164`."""
    assert escape_text("alice\ufe0f") == "alice\\ufe0f"
    assert escape_text("users\u3164") == "users\\u3164"
    assert escape_text("a\u034fb\u115f\u1160\u17b4\u17b5\u180b\u180f\uffa0") == (
        "a\\u034fb\\u115f\\u1160\\u17b4\\u17b5\\u180b\\u180f\\uffa0"
    )
    assert escape_text("x\U000e0100") == "x\\U000e0100"
    assert escape_text("e\u0301 \u2800") == "e\u0301 \u2800"  # a visible accent stays


def test_format_ts() -> None:
    assert format_ts(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"


def hostile() -> AuditRecord:
    return AuditRecord(
        event=AuditEvent.STATEMENT,
        ts_ms=1_700_000_000_000,
        session_id="0123456789abcdef",
        identity="[bold]mallory[/bold]",
        sql_text="SELECT '[red]x[/red]'\n\x1b[2J:smile: \udcff",
        kind="read",
        decision="deny",
        status="error",
        sqlstate="42501",
        seq=7,
    )


def test_table_renders_client_text_literally() -> None:
    console = Console(width=300, record=True, force_terminal=True, color_system="truecolor")
    console.print(records_table([hostile()]))
    text = console.export_text(styles=False)
    assert "[red]x[/red]" in text
    assert "[bold]mallory[/bold]" in text
    assert "\\n" in text
    assert "\\x1b[2J" in text
    assert ":smile:" in text
    assert "\\udcff" in text
    assert "\x1b" not in text
    assert "01234567" in text
    assert "0123456789" not in text  # short session id
    assert "error 42501" in text


def test_json_line_has_all_fields_and_no_control_bytes() -> None:
    line = record_json(hostile())
    assert "\n" not in line
    assert "\x1b" not in line
    assert line.isascii()
    data = json.loads(line)
    assert data["sql_text"] == hostile().sql_text
    assert data["seq"] == 7
    assert data["event"] == "statement"
    assert data["tables"] == []
    assert data["time"] == "2023-11-14T22:13:20.000Z"
    assert {"rows", "duration_ms", "sql_sha256", "client_addr"} <= data.keys()


def test_compact_table_keeps_one_line_per_record_in_80_columns() -> None:
    """Nineteenth review: in 80 columns (a pipe, a small terminal) every column of the full
    table wrapped over five lines and the SQL was cut to a few letters."""
    records = [hostile(), hostile()._replace(seq=8, event="outcome", sql_text="", detail="")]
    console = Console(width=80, record=True, force_terminal=True, color_system="truecolor")
    console.print(records_table(records, compact=True, width=80))
    lines = console.export_text(styles=False).splitlines()
    assert len(lines) == 3, lines  # the header and one line per record
    first = lines[1]
    assert first.split()[:2] == ["7", "11-14"] and "[bold]mallory[/…" in first  # cut at 16
    assert "read" in first and "deny error 42501" in first and "SELECT" in first
    assert "outcome" in lines[2]
    assert all(len(line) <= 80 for line in lines)
    assert "\x1b" not in "".join(lines)
