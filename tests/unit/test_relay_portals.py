"""The relay's portal map follows PostgreSQL's portal lifetime (no network: bytes in, bytes out)."""

from __future__ import annotations

import struct

from dbward.audit.sink import MemorySink
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import RecordingTransport, detached_session, frames

SQL = "SELECT g FROM generate_series(1, 100) g"


def _session() -> tuple[PgSession, RecordingTransport, MemorySink]:
    sink = MemorySink()
    session, _, upstream = detached_session(sink)
    return session, upstream, sink


def _bind_execute(portal: str, rows: int = 10) -> bytes:
    return m.bind_message(portal, "s1", []) + m.execute_message(portal, rows)


PARSED = m._frame(b"1", b"") + m.ready_for_query(b"I")
FETCHED = m.data_row([b"1"]) + m._frame(b"s", b"")  # an Execute's reply, the portal suspended
SUSPENDED = m._frame(b"2", b"") + FETCHED  # a Bind's and an Execute's


def _prepare(session: PgSession) -> None:
    session.data_received(m.parse_message("s1", SQL) + m.sync())
    session._on_upstream_data(PARSED)


def test_portals_are_forgotten_when_postgres_drops_them() -> None:
    # An asyncpg-style client that abandons a named portal per transaction.
    session, _, _ = _session()
    _prepare(session)
    for i in range(500):
        session.data_received(_bind_execute(f"__cursor_{i}__") + m.sync())
        session._on_upstream_data(SUSPENDED + m.ready_for_query(b"I"))
    assert session._portals == {}


def test_portals_live_until_the_transaction_ends() -> None:
    session, upstream, _ = _session()
    _prepare(session)
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
    session.data_received(_bind_execute("c1") + m.sync())
    session._on_upstream_data(SUSPENDED + m.ready_for_query(b"T"))
    assert set(session._portals) == {"c1"}  # still open in PostgreSQL: fetch more
    upstream.written.clear()
    session.data_received(m.execute_message("c1", 10) + m.sync())
    assert m.execute_message("c1", 10) in upstream.written  # forwarded, not refused
    session._on_upstream_data(FETCHED + m.ready_for_query(b"T"))
    session.data_received(m.query("COMMIT"))
    session._on_upstream_data(m.command_complete("COMMIT") + m.ready_for_query(b"I"))
    assert session._portals == {}


def test_a_portal_bound_after_the_sync_survives_its_ready_for_query() -> None:
    # Pipelining: the second Bind is sent before the first Sync is answered, so the
    # ReadyForQuery('I') of that Sync says nothing about it.
    session, upstream, sink = _session()
    _prepare(session)
    session.data_received(_bind_execute("p1") + m.sync() + m.bind_message("p2", "s1", []))
    session._on_upstream_data(SUSPENDED + m.ready_for_query(b"I"))
    assert "p2" in session._portals
    upstream.written.clear()
    session.data_received(m.execute_message("p2", 10) + m.sync())
    assert upstream.written == m.execute_message("p2", 10) + m.sync()
    session._on_upstream_data(SUSPENDED + m.ready_for_query(b"I"))
    assert session._portals == {}
    denied = [r for r in sink.records if r.decision == "deny"]
    assert denied == []


# In place of an Execute of a portal dbward never saw: a Describe of it, then the poison Parse.
PROBE = m.describe_message("P", "p9") + m.parse_message("__dbward_denied__", "DBWARD_POLICY_DENIED")
POISON_ERROR = m.error_response("ERROR", "42601", 'syntax error at or near "DBWARD_POLICY_DENIED"')


def _statement_records(sink: MemorySink) -> list[str]:
    return [r.event for r in sink.records if r.event in ("statement", "outcome")]


def test_an_execute_of_a_portal_that_does_not_exist_gets_postgresqls_answer() -> None:
    """Its Bind failed, its transaction ended, it never was: PostgreSQL answers 34000, and so
    does the client through dbward (not a refusal of a statement nobody defined), and no record
    claims a statement. Before, dbward refused it as uninspected (42501)."""
    sink = MemorySink()
    session, client, upstream = detached_session(sink)
    session.data_received(m.execute_message("p9") + m.sync())
    assert upstream.written == PROBE + m.sync()  # the Execute never reaches PostgreSQL
    missing = m.error_response("ERROR", "34000", 'portal "p9" does not exist')
    session._on_upstream_data(missing + m.ready_for_query(b"I"))  # it skipped the poison
    assert client.written == missing + m.ready_for_query(b"I")
    assert _statement_records(sink) == []
    assert not session._ops


def test_an_execute_of_a_portal_dbward_never_saw_but_postgresql_holds_is_refused() -> None:
    """A cursor a function opened, or one dbward forgot: what it runs was never inspected. The
    Describe's answer is dropped (the client asked for none) and the poison's error becomes
    the refusal, recorded once."""
    row = b"\x00\x01x\x00" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0)  # one int4 column
    for described in (m._frame(b"n", b""), m._frame(b"T", row)):
        sink = MemorySink()
        session, client, upstream = detached_session(sink)
        session.data_received(m.execute_message("p9") + m.sync())
        assert upstream.written == PROBE + m.sync()
        session._on_upstream_data(described + POISON_ERROR + m.ready_for_query(b"T"))
        replies = frames(client.written)
        assert [kind for kind, _ in replies] == [b"E", b"Z"], replies
        error = m.parse_error_fields(replies[0][1])
        assert error["C"] == "42501" and "portal <...> was not seen by dbward" in error["M"]
        intent, outcome = (r for r in sink.records if r.event in ("statement", "outcome"))
        assert (intent.event, intent.decision, intent.rule) == (
            "statement",
            "deny",
            "guard.unparseable",
        )
        assert intent.detail == "portal 'p9' was not seen by dbward"
        assert (outcome.event, outcome.status, outcome.sqlstate) == ("outcome", "denied", "42501")
        assert not session._ops


def test_an_execute_of_a_portal_never_seen_skipped_by_postgresql_is_not_recorded() -> None:
    """An error earlier in the sync group: PostgreSQL skips the Describe and the poison, as it
    would have skipped the Execute."""
    sink = MemorySink()
    session, client, upstream = detached_session(sink)
    session.data_received(m.describe_message("S", "nosuch") + m.execute_message("p9") + m.sync())
    assert upstream.written == m.describe_message("S", "nosuch") + PROBE + m.sync()
    missing = m.error_response("ERROR", "26000", 'prepared statement "nosuch" does not exist')
    session._on_upstream_data(missing + m.ready_for_query(b"I"))
    assert client.written == missing + m.ready_for_query(b"I")
    assert _statement_records(sink) == []
    assert not session._ops


def test_a_refused_query_fails_where_the_statement_it_replaces_would() -> None:
    """PostgreSQL runs each statement of a Query in the unnamed portal, replacing the client's;
    in a transaction block the failed one stays (a Describe of it answers NoData). So a refused
    statement it could parse is replaced by one that fails as it runs; text its grammar rejects,
    and a FunctionCall (no portal), by one that fails to parse, leaving the client's portal."""
    cases = [
        (m.query("EXECUTE nosuch"), m.query('SET "dbward: policy denied" = on')),
        (m.query("SELEC 1"), m.query("DBWARD_POLICY_DENIED")),
        (m.function_call_message(1234), m.query("DBWARD_POLICY_DENIED")),
    ]
    for sent, forwarded in cases:
        sink = MemorySink()
        session, client, upstream = detached_session(sink)
        session.data_received(sent)
        assert upstream.written == forwarded
        session._on_upstream_data(POISON_ERROR + m.ready_for_query(b"E"))
        replies = frames(client.written)
        assert [kind for kind, _ in replies] == [b"E", b"Z"]
        assert m.parse_error_fields(replies[0][1])["C"] == "42501"


# In place of a Bind of a statement dbward never saw: a Describe of it, then the poison Parse.
STATEMENT_PROBE = m.describe_message("S", "s9") + m.parse_message(
    "__dbward_denied__", "DBWARD_POLICY_DENIED"
)


def test_a_bind_of_a_statement_that_does_not_exist_gets_postgresqls_answer() -> None:
    """Its Parse failed, a simple Query dropped it (the unnamed one), it never was: PostgreSQL
    answers 26000 and skips the Execute, and no record claims a statement. Before, the Bind
    was forwarded and its Execute recorded as refused (42501) while the client got 26000."""
    sink = MemorySink()
    session, client, upstream = detached_session(sink)
    session.data_received(m.bind_message("p1", "s9", []) + m.execute_message("p1") + m.sync())
    assert upstream.written == STATEMENT_PROBE + m.sync()  # neither reaches PostgreSQL
    missing = m.error_response("ERROR", "26000", 'prepared statement "s9" does not exist')
    session._on_upstream_data(missing + m.ready_for_query(b"I"))  # it skipped the poison
    assert client.written == missing + m.ready_for_query(b"I")
    assert _statement_records(sink) == []
    assert not session._ops and "p1" not in session._portals


def test_a_bind_of_a_statement_dbward_never_saw_but_postgresql_holds_is_refused() -> None:
    """A statement a function prepared (or one dbward forgot): what it runs was never
    inspected. Its description (ParameterDescription, then RowDescription or NoData) is
    dropped and the poison's error becomes the refusal, recorded once; the Execute pipelined
    behind it is not forwarded (PostgreSQL skips to the Sync)."""
    row = b"\x00\x01x\x00" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0)  # one int4 column
    parameters = m._frame(b"t", struct.pack("!hI", 1, 23))
    for described in (m._frame(b"n", b""), m._frame(b"T", row)):
        sink = MemorySink()
        session, client, upstream = detached_session(sink)
        session.data_received(m.bind_message("", "s9", [b"1"]) + m.execute_message("") + m.sync())
        assert upstream.written == STATEMENT_PROBE + m.sync()
        session._on_upstream_data(parameters + described + POISON_ERROR + m.ready_for_query(b"I"))
        replies = frames(client.written)
        assert [kind for kind, _ in replies] == [b"E", b"Z"], replies
        error = m.parse_error_fields(replies[0][1])
        assert error["C"] == "42501"
        assert "prepared statement <...> was not seen by dbward" in error["M"]
        intent, outcome = (r for r in sink.records if r.event in ("statement", "outcome"))
        assert (intent.decision, intent.rule, intent.command) == (
            "deny",
            "guard.unparseable",
            "EXECUTE",
        )
        assert intent.detail == "prepared statement 's9' was not seen by dbward"
        assert (outcome.status, outcome.sqlstate) == ("denied", "42501")
        assert not session._ops and "" not in session._portals


def test_a_bind_of_a_statement_never_seen_is_asked_about_in_its_own_sync_group() -> None:
    """Pipelined: what follows the Sync is handled as usual (a Bind of a statement dbward holds
    is forwarded as it came); an Execute of the portal the refused Bind named, in the next sync
    group, is asked about in turn (PostgreSQL holds no such portal)."""
    sink = MemorySink()
    session, client, upstream = detached_session(sink)
    _prepare(session)
    upstream.written.clear()
    client.written.clear()
    allowed = _bind_execute("p2") + m.sync()
    session.data_received(
        m.bind_message("p1", "s9", [])
        + m.execute_message("p1")
        + m.sync()
        + allowed
        + m.execute_message("p1")
        + m.sync()
    )
    assert (
        upstream.written
        == STATEMENT_PROBE + m.sync() + allowed + PROBE.replace(b"p9", b"p1") + m.sync()
    )
    missing = m.error_response("ERROR", "26000", 'prepared statement "s9" does not exist')
    no_portal = m.error_response("ERROR", "34000", 'portal "p1" does not exist')
    session._on_upstream_data(
        missing
        + m.ready_for_query(b"I")
        + SUSPENDED
        + m.ready_for_query(b"I")
        + no_portal
        + m.ready_for_query(b"I")
    )
    assert [kind for kind, _ in frames(client.written)] == [
        b"E",
        b"Z",
        b"2",
        b"D",
        b"s",
        b"Z",
        b"E",
        b"Z",
    ]
    # One statement ran (p2's); neither Bind nor Execute of nothing is recorded.
    assert [(r.sql_text, r.decision) for r in sink.records if r.event == "statement"] == [
        (SQL, "allow")
    ]
    assert [r.status for r in sink.records if r.event == "outcome"] == ["suspended"]
    assert not session._ops
