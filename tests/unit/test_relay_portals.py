"""The relay's portal map follows PostgreSQL's portal lifetime (no network: bytes in, bytes out)."""

from __future__ import annotations

from dbward.audit.sink import MemorySink
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import RecordingTransport, detached_session

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
