"""The relay's portal map follows PostgreSQL's portal lifetime (no network: bytes in, bytes out)."""

from __future__ import annotations

from typing import Any

from dbward.audit.sink import MemorySink
from dbward.config.model import AuditSettings, ListenerSettings, UpstreamSettings
from dbward.core.types import Identity, SessionContext
from dbward.relay.postgres import _PHASE_READY, PgSession
from dbward.relay.services import CancelRegistry, ListenerServices
from dbward.server.upstream import UpstreamConnection, UpstreamProtocol
from dbward.sql.postgres import PostgresClassifier
from dbward.wire.postgres import messages as m
from dbward.wire.postgres.framing import BackendScanner

SQL = "SELECT g FROM generate_series(1, 100) g"


class RecordingTransport:
    """Collects what the session writes."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555)


def _session() -> tuple[PgSession, RecordingTransport, MemorySink]:
    sink = MemorySink()
    services = ListenerServices(
        settings=ListenerSettings(
            name="t", upstream=UpstreamSettings(user="svc", tls={"mode": "disable"})
        ),
        audit_settings=AuditSettings(durability="batched"),
        audit=sink,
        classifier=PostgresClassifier(),
        authenticator=None,  # type: ignore[arg-type]
        client_tls=None,
        upstream_tls=None,
        cancels=CancelRegistry(5),
    )
    session = PgSession(services)
    session.transport = RecordingTransport()  # type: ignore[assignment]
    identity = Identity("alice")
    session.identity = identity
    session._context = SessionContext("s", identity, "t", "db", "127.0.0.1:1", "test")
    session._framer.startup = False
    upstream_transport = RecordingTransport()
    session._upstream = UpstreamConnection(
        transport=upstream_transport,  # type: ignore[arg-type]
        protocol=UpstreamProtocol(),
    )
    session._scanner = BackendScanner()
    session._phase = _PHASE_READY
    return session, upstream_transport, sink


def _bind_execute(portal: str, rows: int = 10) -> bytes:
    return m.bind_message(portal, "s1", []) + m.execute_message(portal, rows)


PARSED = m._frame(b"1", b"") + m.ready_for_query(b"I")
SUSPENDED = m._frame(b"2", b"") + m.data_row([b"1"]) + m._frame(b"s", b"")


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
    session._on_upstream_data(SUSPENDED + m.ready_for_query(b"T"))
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
    session._on_upstream_data(m._frame(b"2", b"") + SUSPENDED + m.ready_for_query(b"I"))
    assert session._portals == {}
    denied = [r for r in sink.records if r.decision == "deny"]
    assert denied == []
