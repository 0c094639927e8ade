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
