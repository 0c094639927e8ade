"""Client-claimed names as dbward keeps them: cut to CLAIMED_TEXT_MAX characters, the cut marked."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbward.audit import query
from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.render import escape_text
from dbward.audit.sqlite import SqliteAuditSink
from dbward.core.errors import ProtocolError
from dbward.core.text import (
    CLAIMED_TEXT_MAX,
    capped,
    one_line,
    text_sha256,
    without_quoted_values,
)
from dbward.relay.startup import StartupRefusedError, upstream_parameters
from dbward.wire.postgres import messages

_MARKER = re.compile(r"…\[truncated: (\d+) bytes, sha256 ([0-9a-f]{64})\]\Z")


def _split(stored: str) -> tuple[str, int, str]:
    """(kept text, full length in bytes, full SHA-256) of a cut value."""
    found = _MARKER.search(stored)
    assert found is not None, stored
    return stored[: found.start()], int(found.group(1)), found.group(2)


def test_a_name_up_to_the_limit_is_kept_whole() -> None:
    assert CLAIMED_TEXT_MAX == 63
    for name in ("", "alice", "x" * 63, "é" * 63, "\U0001f600" * 63):
        assert capped(name) == name


def test_a_longer_name_keeps_its_start_its_length_and_its_hash() -> None:
    name = "mallory" + "x" * 10_000
    stored = capped(name)
    kept, size, digest = _split(stored)
    assert kept == name[:63]
    assert size == len(name.encode())
    assert digest == hashlib.sha256(name.encode()).hexdigest() == text_sha256(name)
    assert len(stored) < 200


@pytest.mark.parametrize("char", ["é", "日", "\U0001f600", "e\u0301"])
def test_multibyte_names_are_cut_between_characters(char: str) -> None:
    name = char * 5000
    stored = capped(name)
    kept, size, _ = _split(stored)
    assert kept == name[:63]
    assert size == len(name.encode("utf-8"))
    # Valid UTF-8 whole: the cut never falls inside a character's bytes.
    assert stored.encode("utf-8").decode("utf-8") == stored


def test_a_lone_surrogate_is_hashed_not_an_error() -> None:
    name = "\udcff" * 100
    kept, _, digest = _split(capped(name))
    assert kept == name[:63]
    assert digest == hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


@given(st.text(max_size=200))
def test_a_value_is_cut_exactly_when_stored_longer_than_the_limit(name: str) -> None:
    # The marker alone is longer than the limit: a client cannot claim a name that reads as
    # a cut one, because a stored value of at most 63 characters is always the whole name.
    stored = capped(name)
    assert (stored != name) == (len(name) > CLAIMED_TEXT_MAX)
    assert (len(stored) > CLAIMED_TEXT_MAX) == (stored != name)
    assert len(stored) <= CLAIMED_TEXT_MAX + len("…[truncated: 99999 bytes, sha256 ]") + 64


def test_a_cut_name_is_still_rendered_escaped() -> None:
    name = "\x1b[2J\nforged line\u202e" + "A" * 5000
    shown = escape_text(capped(name))
    assert shown.isprintable() and "\x1b" not in shown and "\n" not in shown
    assert len(shown) < 250


# ------------------------------------------------------------------ refusal messages


def test_a_refused_startup_parameter_name_is_quoted_cut() -> None:
    name = "x-" + "y" * 9000  # not a valid parameter name
    with pytest.raises(StartupRefusedError) as caught:
        upstream_parameters({"user": "alice", name: "1"}, "app")
    assert len(caught.value.message) < 250
    assert "truncated: 9002 bytes" in caught.value.message


def test_a_padded_role_parameter_is_quoted_cut() -> None:
    name = " " * 9000 + "role"  # read as 'role' once stripped
    with pytest.raises(StartupRefusedError) as caught:
        upstream_parameters({"user": "alice", name: "postgres"}, "app")
    assert len(caught.value.message) < 250
    assert "role switching is refused" in caught.value.message


def test_a_refused_startup_option_is_named_by_its_switch_only() -> None:
    word = "-d" + "9" * 4000
    with pytest.raises(StartupRefusedError) as caught:
        upstream_parameters({"user": "alice", "options": word}, "app")
    assert caught.value.message == "startup option '-d' is not allowed through dbward"


@pytest.mark.parametrize("options", ["Hunter2x-secret", "-c a=1 Hunter2x-secret", "-9Hunter2x"])
def test_a_word_typed_into_the_startup_options_is_not_quoted_in_the_refusal(options: str) -> None:
    """The refusal's reason is audited: a password typed into `options` was quoted in it."""
    with pytest.raises(StartupRefusedError) as caught:
        upstream_parameters({"user": "alice", "options": options}, "app")
    assert "Hunter2x" not in caught.value.message
    assert "not allowed through dbward" in caught.value.message


# What dbward's log and audit keep of the database's refusal of a login: the message without
# what it quotes of the client's values (PostgreSQL's messages, English and translated).
_REFUSALS = [
    (
        'invalid value for parameter "password_encryption": "Hunter2x"',
        'invalid value for parameter "password_encryption": <...>',
    ),
    # A value holding quotes, and the name pattern again: cut from the first quote to the last.
    (
        'invalid value for parameter "DateStyle": "x" for parameter "Hunter2x" ""',
        'invalid value for parameter "DateStyle": <...>',
    ),
    ('invalid value for parameter "x": "Hunter2x', 'invalid value for parameter "x": <...>'),
    ("-c Hunter2x requires a value", "-c <...> requires a value"),
    ("--Hunter2x requires a value", "--<...> requires a value"),
    (
        '12345678 ms is outside the valid range for parameter "statement_timeout" (0 .. 100)',
        '<...> is outside the valid range for parameter "statement_timeout" (0 .. 100)',
    ),
    (
        '-12345678 is outside the valid range for parameter "x" (0 .. 1)',
        '<...> is outside the valid range for parameter "x" (0 .. 1)',
    ),
    (
        "ungültiger Wert für Parameter »password_encryption«: »Hunter2x«",
        "ungültiger Wert für Parameter <...>",
    ),
    (
        "valeur invalide pour le paramètre « a » : « Hunter2x »",
        "valeur invalide pour le paramètre <...>",
    ),
    ('パラメータ"a"の値が不正です: 「Hunter2x」', "パラメータ<...>"),
    # A name that is not a name's characters is cut as a value.
    ('invalid value for parameter "a b": "Hunter2x"', "invalid value for parameter <...>"),
    # Names are kept: what the client claimed (its database is in every record anyway).
    ('database "app2" does not exist', 'database "app2" does not exist'),
    ('unrecognized configuration parameter "foo"', 'unrecognized configuration parameter "foo"'),
    ('role "svc" is not permitted to log in', 'role "svc" is not permitted to log in'),
    ("the database system is starting up", "the database system is starting up"),
    (
        'no pg_hba.conf entry for host "127.0.0.1", user "svc", database "app", no encryption',
        'no pg_hba.conf entry for host "127.0.0.1", user "svc", database "app", no encryption',
    ),
    (
        'password authentication failed for user "svc"',
        'password authentication failed for user "svc"',
    ),
    # Names after a value are the value's: cut with it.
    (
        'invalid value for parameter "a": "x" user "Hunter2x" role "b"',
        'invalid value for parameter "a": <...>',
    ),
]


@pytest.mark.parametrize(("message", "kept"), _REFUSALS)
def test_a_login_refusal_keeps_names_and_none_of_the_values(message: str, kept: str) -> None:
    assert without_quoted_values(message) == kept


def test_a_duplicate_startup_parameter_is_quoted_cut() -> None:
    name = "n" * 4000
    packet = messages.startup_message({"user": "alice"})[4:-1]  # code and params, no end
    packet += name.encode() + b"\x001\x00" + name.encode() + b"\x002\x00\x00"
    with pytest.raises(ProtocolError) as caught:
        messages.parse_startup_packet(packet)
    assert "duplicate parameter" in caught.value.message
    assert len(caught.value.message) < 250


# ------------------------------------------------------------------ searching for a cut name


def test_search_finds_a_cut_identity_by_the_full_name_or_as_stored(tmp_path: Path) -> None:
    claimed = "mallory" + "z" * 5000
    path = tmp_path / "audit.db"

    async def write() -> None:
        sink = SqliteAuditSink(path)
        sink.start()
        for identity in (capped(claimed), "alice"):
            sink.append(AuditRecord(AuditEvent.CONNECT, 1_700_000_000_000, "s1", identity))
        await sink.close()

    asyncio.run(write())
    for asked in (claimed, capped(claimed)):
        found = query.search(path, identity=asked)
        assert [r.identity for r in found] == [capped(claimed)]
    assert query.search(path, identity=claimed[:63]) == []  # exact, not a prefix


def test_one_line_escapes_what_would_begin_or_rewrite_a_log_line() -> None:
    assert one_line("a\nb\r\x1b[2K\x85\u2028\u2029\x7f\t\x00") == (
        "a\\nb\\r\\x1b[2K\\x85\\u2028\\u2029\\x7f\\t\\x00"
    )
    assert one_line("plain text, é, 日本") == "plain text, é, 日本"
