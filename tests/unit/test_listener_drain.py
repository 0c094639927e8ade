"""The drain (SIGTERM) ends every connection it could hear from, before the audit log closes."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dbward.audit.records import AuditEvent
from dbward.audit.sink import MemorySink
from dbward.config.model import AuditSettings, ListenerSettings, UpstreamSettings
from dbward.identity.local import LocalAuthenticator
from dbward.relay.postgres import PgSession
from dbward.relay.services import CancelRegistry, ListenerServices
from dbward.server.listener import PgListener
from dbward.sql.postgres import PostgresClassifier
from dbward.wire.postgres import messages
from fixtures.detached import PeerTransport, detached_session


class _Settled:
    """A session the drain ends at once (it holds the listener's one slot)."""

    def request_shutdown(self) -> None: ...

    def force_close(self) -> None: ...

    def abort(self) -> None: ...


class _Socket(PeerTransport):
    """A client socket whose closing ends its session, as asyncio's transports do."""

    def __init__(self, address: str, session: PgSession) -> None:
        super().__init__(address)
        self.session = session

    def close(self) -> None:
        if not self.closed:
            asyncio.get_running_loop().call_soon(self.session.connection_lost, None)
        super().close()


def _full_listener(sink: MemorySink) -> ListenerServices:
    services = ListenerServices(
        settings=ListenerSettings(
            name="t",
            upstream=UpstreamSettings(user="svc", tls={"mode": "disable"}),
            max_connections=1,
        ),
        audit_settings=AuditSettings(),
        audit=sink,
        classifier=PostgresClassifier(),
        authenticator=LocalAuthenticator([], mock_secret=b"\x07" * 32),
        client_tls=None,
        upstream_tls=None,
        cancels=CancelRegistry(5),
    )
    services.sessions.add(_Settled())  # type: ignore[arg-type]
    return services


def test_a_connection_over_max_connections_is_ended_by_the_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review 38: a connection over max_connections (refused with 53300 and a protocol_error
    record once its StartupMessage comes) was not among the sessions the drain ends. Its
    StartupMessage could arrive after the drain, while the audit log was closing: the client
    was told it was refused, and the record of it was lost ("audit unavailable")."""
    sink = MemorySink()
    services = _full_listener(sink)
    caplog.set_level(logging.ERROR, logger="dbward")

    async def run() -> PeerTransport:
        late = PgSession(services)
        transport = _Socket("192.0.2.5", late)
        late.connection_made(transport)  # type: ignore[arg-type]
        assert late not in services.sessions  # over max_connections
        for _ in range(5):
            await asyncio.sleep(0)  # waiting for its StartupMessage
        await PgListener(services).drain(0)
        sink.fail = True  # the runtime closes the audit log once the drain returns
        late.data_received(messages.startup_message({"user": "alice", "database": "app"}))
        for _ in range(20):
            await asyncio.sleep(0)
        return transport

    transport = asyncio.run(run())
    assert transport.closed
    fields = messages.parse_error_fields(bytes(transport.written[5:]))
    assert (fields["S"], fields["C"]) == ("FATAL", "57P01")  # told by the drain, not later
    assert b"53300" not in transport.written
    assert "record lost" not in caplog.text
    assert sink.records == []  # nothing was claimed of it: no record
    assert services.unauthenticated == {}


def test_a_refusal_over_max_connections_read_before_the_drain_is_written() -> None:
    """A StartupMessage over max_connections already read when the drain begins (its refusal
    not yet made, grace 0: the drain does not wait) is refused, and its record appended, before
    the drain returns."""
    sink = MemorySink()
    services = _full_listener(sink)

    async def run() -> PeerTransport:
        late = PgSession(services)
        transport = _Socket("192.0.2.5", late)
        late.connection_made(transport)  # type: ignore[arg-type]
        for _ in range(5):
            await asyncio.sleep(0)
        startup = {"user": "alice", "database": "app", "application_name": "late"}
        late.data_received(messages.startup_message(startup))  # read, not handled yet
        await PgListener(services).drain(0)
        sink.fail = True
        for _ in range(5):
            await asyncio.sleep(0)
        return transport

    assert asyncio.run(run()).closed
    assert [(str(r.event), r.application_name, r.sqlstate) for r in sink.records] == [
        ("protocol_error", "late", "53300")
    ]


class _NotReading(PeerTransport):
    """A client that stopped reading: closing waits for a send buffer that never drains;
    an abort ends the connection (connection_lost on the next turn, as asyncio's does)."""

    def __init__(self, session: PgSession) -> None:
        super().__init__("192.0.2.9")
        self.session = session
        self.aborted_at: float | None = None

    def abort(self) -> None:
        if self.aborted_at is None:
            self.aborted_at = asyncio.get_running_loop().time()
            asyncio.get_running_loop().call_soon(self.session.connection_lost, None)
        super().abort()


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "answered-during-the-grace"])
def test_a_session_whose_client_does_not_read_its_57p01_does_not_hold_the_drain(
    busy: bool,
) -> None:
    """Review 45: an idle session told 57P01 at the drain's start, whose client had stopped
    reading, stayed open (closing waits for its send buffer) for the whole shutdown_grace_s;
    so did a busy one told once its answer came. Each is now dropped 1 s after its 57P01,
    its disconnect record written first."""
    sink = MemorySink()
    session, _, _ = detached_session(sink)
    services = session.services
    services.sessions.add(session)
    session._connect_audited = True
    client = _NotReading(session)
    session.transport = client  # type: ignore[assignment]

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        if busy:
            session.data_received(messages.query("SELECT 1"))
        started = loop.time()
        drain = asyncio.ensure_future(PgListener(services).drain(30))
        await asyncio.sleep(0)  # the drain begins: request_shutdown
        told = started
        if busy:
            await asyncio.sleep(0.3)  # in flight: the drain waits for it
            assert b"57P01" not in client.written
            session._on_upstream_data(
                messages.command_complete("SELECT 0") + messages.ready_for_query(b"I")
            )
            told = loop.time()
        assert b"57P01" in client.written and client.is_closing()
        await asyncio.wait_for(drain, 5)  # not the 30 s grace period
        assert client.aborted_at is not None
        return told, client.aborted_at

    told, aborted = asyncio.run(run())
    assert 0.9 < aborted - told < 2.0  # a moment to read it first
    assert session not in services.sessions
    assert sink.records[-1].event == AuditEvent.DISCONNECT
