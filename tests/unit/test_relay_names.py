"""Names PostgreSQL might read as other names are refused, and a simple Query drops the unnamed
statement and portal from dbward's maps as it does from PostgreSQL's (bytes in, bytes out).

PostgreSQL keys prepared statements and portals by their first 63 bytes (NAMEDATALEN - 1) in
the server's encoding: "A"*63+"x" and "A"*63+"y" are one statement to it. Checked against
PostgreSQL end to end in tests/e2e/test_protocol_names.py.
"""

from __future__ import annotations

import pytest

from dbward.audit.sink import MemorySink
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import RecordingTransport, frames, prepare, sinked_session

PARSED, BOUND = m._frame(b"1", b""), m._frame(b"2", b"")
POISON = m.parse_message("__dbward_denied__", "DBWARD_POLICY_DENIED")
SYNTAX_ERROR = m.error_response("ERROR", "42601", 'syntax error at or near "DBWARD_POLICY_DENIED"')
LONG = "A" * 63 + "x"  # 64 bytes: PostgreSQL would key it as "A" * 63
FITS = "A" * 63


def _raw(kind: bytes, *parts: bytes) -> bytes:
    """A message whose names are given as bytes (not UTF-8 encoded from str)."""
    return m._frame(kind, b"".join(parts))


def _denials(sink: MemorySink) -> list[tuple[str, str, str]]:
    """(sql_text, rule, status of its outcome) of each statement refused."""
    status = {r.statement_id: r.status for r in sink.records if r.status}
    return [
        (r.sql_text, r.rule, status.get(r.statement_id, ""))
        for r in sink.records
        if r.event == "statement" and r.decision == "deny"
    ]


@pytest.mark.parametrize(
    ("message", "recorded"),
    [
        (m.parse_message(LONG, "DELETE FROM victim"), "DELETE FROM victim"),
        (m.parse_message(LONG, ""), ""),  # an empty query string has no statement of its own
        (m.bind_message(LONG, "s1", []), "SELECT 1"),  # the statement it binds
        (m.bind_message("", LONG, []), ""),  # a statement name never looked up
        (m.execute_message(LONG), ""),
        (m.describe_message("S", LONG), None),  # runs nothing: in no record, as ever
        (m.describe_message("P", LONG), None),
        (m.close_message("S", LONG), None),
        (m.close_message("P", LONG), None),
    ],
)
def test_a_name_over_63_bytes_is_refused_in_every_message(
    message: bytes, recorded: str | None
) -> None:
    session, client, upstream, sink = sinked_session()
    prepare(session, "s1", "SELECT 1")
    prepare(session, FITS, "SELECT 2")
    upstream.written.clear()
    client.written.clear()
    prepared, portals = dict(session._prepared), dict(session._portals)
    session.data_received(message + m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    # Nothing of it reaches PostgreSQL: the poison Parse in its place, the rest skipped to Sync.
    assert upstream.written == POISON + m.sync()
    assert session._prepared == prepared and session._portals == portals
    session._on_upstream_data(SYNTAX_ERROR + m.ready_for_query(b"I"))
    replies = frames(client.written)
    assert [kind for kind, _ in replies] == [b"E", b"Z"], replies
    error = m.parse_error_fields(replies[0][1])
    assert error["C"] == "42622" and "limited to 63 bytes" in error["M"], error
    expected = [] if recorded is None else [(recorded, "guard.name_limit", "denied")]
    assert _denials(sink) == expected
    assert not session._ops and not session._discard_until_sync
    # Recorded or not (a Describe or Close is in no record), the refusal is in the metrics.
    denied = session.services.counts.denied
    assert sum(denied.values()) == 1, denied


def test_names_of_63_bytes_are_forwarded_as_sent() -> None:
    session, _, upstream, _ = sinked_session()
    sent = (
        m.parse_message(FITS, "SELECT 1")
        + m.bind_message(FITS, FITS, [])
        + m.describe_message("P", FITS)
        + m.execute_message(FITS)
        + m.close_message("P", FITS)
        + m.close_message("S", FITS)
        + m.sync()
    )
    session.data_received(sent)
    assert upstream.written == sent


def test_a_name_that_is_not_ascii_is_refused() -> None:
    """PostgreSQL converts a name from the client's encoding to the server's before it looks
    it up: b"\\xe9" under LATIN1 and b"\\xc3\\xa9" under UTF8 are one statement to it, and
    b"\\xe9" * 32 + b"x" (33 bytes in LATIN1, 65 in UTF8) is cut to 63 bytes."""
    session, client, upstream, sink = sinked_session()
    upstream.written.clear()
    session.data_received(_raw(b"P", b"\xc3\xa9\x00", b"SELECT 1\x00", b"\x00\x00") + m.sync())
    assert upstream.written == POISON + m.sync()
    session._on_upstream_data(SYNTAX_ERROR + m.ready_for_query(b"I"))
    replies = frames(client.written)
    error = m.parse_error_fields(replies[0][1])
    assert error["C"] == "42602" and "must be ASCII" in error["M"], error
    assert _denials(sink) == [("SELECT 1", "guard.name_limit", "denied")]
    assert session._prepared == {}


def test_a_query_drops_the_unnamed_statement_and_portal() -> None:
    """PostgreSQL drops the unnamed statement as a Query starts and runs the Query's statements
    in the unnamed portal: an Execute of it then answers 34000 (25P02 in a failed block). dbward
    decided and recorded it as the statement bound before."""
    session, _, upstream, sink = sinked_session()
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
    session.data_received(m.parse_message("", "SELECT 1") + m.bind_message("", "", []) + m.sync())
    session._on_upstream_data(PARSED + BOUND + m.ready_for_query(b"T"))
    assert "" in session._prepared and "" in session._portals
    session.data_received(m.query("SELECT 2"))
    assert "" not in session._prepared and "" not in session._portals
    session._on_upstream_data(m.command_complete("SELECT 1") + m.ready_for_query(b"T"))
    assert session._pending_statements == {} and session._pending_portals == {}
    upstream.written.clear()
    session.data_received(m.execute_message("") + m.sync())
    # asked about as a portal dbward does not hold: a Describe of it, then the poison
    assert upstream.written == m.describe_message("P", "") + POISON + m.sync()
    assert [r.sql_text for r in sink.records if r.event == "statement"] == ["BEGIN", "SELECT 2"]


def test_an_empty_query_drops_the_unnamed_statement_only() -> None:
    session, _, _, _ = sinked_session()
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
    session.data_received(m.parse_message("", "SELECT 1") + m.bind_message("", "", []) + m.sync())
    session._on_upstream_data(PARSED + BOUND + m.ready_for_query(b"T"))
    session.data_received(m.query(""))  # runs no statement: the portal stays
    session._on_upstream_data(m._frame(b"I", b"") + m.ready_for_query(b"T"))
    assert "" not in session._prepared and "" in session._portals


def test_a_query_postgresql_skips_drops_nothing() -> None:
    """An error earlier in an extended-protocol group with no Sync after it yet: PostgreSQL
    ignores the Query (up to the Sync) and keeps both unnamed names."""
    session, _, _, _ = sinked_session()
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
    session.data_received(m.parse_message("", "SELECT 1") + m.bind_message("", "", []) + m.sync())
    session._on_upstream_data(PARSED + BOUND + m.ready_for_query(b"T"))
    session.data_received(
        m.parse_message("bad", "SELECT * FROM missing") + m.query("SELECT 2") + m.sync()
    )
    assert "" not in session._prepared and "" not in session._portals
    session._on_upstream_data(
        m.error_response("ERROR", "42P01", "x") + m.ready_for_query(b"E")  # the Sync's
    )
    assert session._prepared[""][0].text == "SELECT 1"
    assert session._portals[""].statements[0].text == "SELECT 1"
    assert not session._ops


def test_an_earlier_bind_undone_after_the_query_was_sent_stays_dropped() -> None:
    """A Bind of the unnamed portal PostgreSQL skips, answered after a Query was sent behind
    it: what the name meant before the Bind goes to the Query's drop, not back in the map."""
    session, _, _, _ = sinked_session()
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
    prepare(session, "s1", "SELECT 1")
    session.data_received(m.bind_message("", "s1", []) + m.sync())
    session._on_upstream_data(BOUND + m.ready_for_query(b"T"))
    session.data_received(
        m.parse_message("bad", "SELECT * FROM missing")
        + m.bind_message("", "s1", [])
        + m.sync()
        + m.query("SELECT 2")
    )
    session._on_upstream_data(m.error_response("ERROR", "42P01", "x") + m.ready_for_query(b"E"))
    assert "" not in session._portals  # the Bind was skipped; the Query has not answered yet
    session._on_upstream_data(m.error_response("ERROR", "25P02", "x") + m.ready_for_query(b"E"))
    assert "" not in session._portals and "" not in session._prepared
    assert session._pending_statements == {} and session._pending_portals == {}


def _cursor_names(session: PgSession, client: RecordingTransport, sql: str) -> dict[str, str]:
    client.written.clear()
    session.data_received(m.query(sql))
    session._on_upstream_data(
        m.error_response("ERROR", "42704", 'unrecognized configuration parameter "x"')
        + m.ready_for_query(b"I")
    )
    return m.parse_error_fields(frames(client.written)[0][1])


def test_sql_names_the_scanner_cut_are_refused() -> None:
    """PREPARE/EXECUTE/DEALLOCATE and DECLARE/FETCH/MOVE/CLOSE: pglast cuts an identifier to 63
    bytes as PostgreSQL does with NAMEDATALEN 64; a server built with a larger one would not."""
    session, client, upstream, sink = sinked_session()
    for sql in (
        f"PREPARE {LONG} AS SELECT 1",
        f'EXECUTE "{LONG}"',
        f"DEALLOCATE {LONG}",
        f"DECLARE {LONG} CURSOR FOR SELECT 1",
        f"FETCH 1 FROM {LONG}",
        f"MOVE 1 IN {LONG}",
        f"CLOSE {LONG}",
        'DECLARE "' + "é" * 32 + '" CURSOR FOR SELECT 1',  # 64 bytes, cut to 62
    ):
        upstream.written.clear()
        error = _cursor_names(session, client, sql)
        assert upstream.written == m.query('SET "dbward: policy denied" = on'), sql
        assert error["C"] == "42622", (sql, error)
    assert {rule for _, rule, _ in _denials(sink)} == {"guard.name_limit"}
    assert session._prepared == {} and session._portals == {}


def test_sql_names_not_in_ascii_need_utf8_on_both_sides() -> None:
    """The parser reads names in UTF-8; PostgreSQL in the server's encoding (and a single-byte
    one folds É to é where the parser does not), converted from the client's."""
    sql = 'DECLARE "curseur_é" CURSOR FOR SELECT 1'
    session, client, upstream, _ = sinked_session()
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
    upstream.written.clear()
    session.data_received(m.query(sql))
    assert upstream.written == m.query(sql)  # UTF8 client, UTF8 server: forwarded
    session._on_upstream_data(m.command_complete("DECLARE CURSOR") + m.ready_for_query(b"T"))
    assert "curseur_é" in session._portals
    # The server's encoding is not UTF8.
    session._server_encoding = "LATIN1"
    upstream.written.clear()
    assert _cursor_names(session, client, "FETCH 1 FROM curseur_é")["C"] == "42602"
    # UTF8 server, LATIN1 client.
    session._server_encoding = "UTF8"
    session._on_upstream_data(m.parameter_status("client_encoding", "LATIN1"))
    upstream.written.clear()
    assert _cursor_names(session, client, "CLOSE curseur_é")["C"] == "42602"
