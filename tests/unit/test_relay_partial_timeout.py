"""partial_message_timeout_s: a large message left unfinished ends its session (review 25).

A client could announce a large message and send it a byte every few seconds: a handful of
such sessions held the listener's whole max_partial_message_bytes for as long as they liked,
and everyone else's large messages were refused (53200).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from dbward.audit.records import AuditEvent
from dbward.audit.sink import MemorySink
from dbward.config.model import AuditSettings
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import RecordingTransport, detached_session, frames

MIB = 1024 * 1024
LIMIT = 0.2  # partial_message_timeout_s in these tests


class _HeldDurable(MemorySink):
    """Durable writes stay pending until the test commits them: the session is parked."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[asyncio.Future[int]] = []

    def append_durable(self, record: Any) -> asyncio.Future[int]:
        self.append(record)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return future


def _session(
    sink: MemorySink | None = None,
) -> tuple[PgSession, RecordingTransport, RecordingTransport, MemorySink]:
    sink = sink if sink is not None else MemorySink()
    session, client, upstream = detached_session(sink)
    services = session.services
    services.settings = services.settings.model_copy(update={"partial_message_timeout_s": LIMIT})
    session._framer.max_message_bytes = services.settings.max_message_bytes  # logged in
    return session, client, upstream, sink


def _large_query_start(size: int = 2 * MIB, sent: int = 64 * 1024) -> bytes:
    """The header of a Query of `size` bytes and the first `sent` bytes of its text."""
    return b"Q" + struct.pack("!I", 4 + size) + b"SELECT '" + b"x" * (sent - 8)


def _fatal(written: bytearray) -> str | None:
    for kind, body in frames(written):
        if kind == b"E" and b"SFATAL\x00" in body:
            return body.split(b"\x00C", 1)[1][:5].decode()
    return None


def test_a_large_message_left_unfinished_ends_the_session() -> None:
    async def run() -> None:
        session, client, upstream, sink = _session()
        session.data_received(m.query("SELECT 1"))  # in flight: its outcome is unknown
        session.data_received(_large_query_start())
        assert session.services.partial_message_bytes == 64 * 1024 + 5
        for _ in range(6):  # a byte now and then keeps nothing alive
            await asyncio.sleep(LIMIT / 4)
            session.data_received(b"x")
        assert _fatal(client.written) == "08P01"
        assert b"was not complete after 0.2 s" in client.written
        assert session._closing
        assert session.services.partial_message_bytes == 0  # the budget is back at once
        assert session._framer.pending_bytes == 0
        assert upstream.written.endswith(m.terminate())
        refusals = [r for r in sink.records if r.event == AuditEvent.PROTOCOL_ERROR]
        assert [(r.sqlstate, r.reason) for r in refusals] == [
            ("08P01", "message not complete within partial_message_timeout_s (0.2 s)")
        ]
        # The statement in flight is cancelled and recorded when the connection is gone, as
        # after any FATAL to a client (end to end: test_faults).
        assert len(session._ops) == 1

    asyncio.run(run())


def test_a_large_message_completed_in_time_ends_nothing() -> None:
    async def run() -> None:
        session, client, upstream, _ = _session()
        data = m.copy_data(b"x" * (2 * MIB))  # passed on untouched, in a copy or not
        step = len(data) // 4 + 1
        for start in range(0, len(data), step):
            session.data_received(data[start : start + step])
            await asyncio.sleep(LIMIT / 10)
        await asyncio.sleep(LIMIT * 2)
        assert _fatal(client.written) is None and not session._closing
        assert session._partial_timer is None  # not armed again once nothing is unfinished
        assert upstream.written == data  # passed on whole

    asyncio.run(run())


def test_small_unfinished_messages_arm_no_timer() -> None:
    """A client may leave part of an ordinary message unsent for as long as it likes (libpq in
    pipeline mode sends in 8 KB blocks until PQflush): only large ones are timed."""

    async def run() -> None:
        session, client, _, _ = _session()
        session.data_received(m.query("SELECT 1")[:7])
        session.data_received(b"Q\x00\x00\x00")  # a header cut short of its length
        await asyncio.sleep(LIMIT * 2)
        assert session._partial_timer is None
        assert _fatal(client.written) is None

    asyncio.run(run())


def test_the_clock_stands_still_while_dbward_is_not_reading_the_client() -> None:
    """A large message whose start came in with a statement waiting for its durable audit
    record: dbward reads nothing more meanwhile, so the client is not timed for it."""

    async def run() -> None:
        sink = _HeldDurable()
        session, client, upstream, _ = _session(sink)
        session.services.audit_settings = AuditSettings(durability="strict")
        session.data_received(m.query("CREATE TABLE t (x int)") + _large_query_start())
        assert sink.waiting and not client.reading  # parked: reading paused
        await asyncio.sleep(LIMIT * 3)
        assert _fatal(client.written) is None
        sink.waiting[0].set_result(1)  # durable: forwarded, reading resumes, the clock restarts
        await asyncio.sleep(LIMIT / 2)
        assert client.reading and _fatal(client.written) is None
        assert upstream.written.startswith(m.query("CREATE TABLE t (x int)"))
        await asyncio.sleep(LIMIT)
        assert _fatal(client.written) == "08P01"

    asyncio.run(run())


def _large_error_start(size: int = 2 * MIB) -> bytes:
    return b"E" + struct.pack("!I", 4 + size) + b"SERROR\x00C22P02\x00M" + b"x" * 60_000


def test_a_large_message_the_database_leaves_unfinished_ends_the_session() -> None:
    async def run() -> None:
        session, client, _, sink = _session()
        session.data_received(m.query("SELECT 1"))
        session._on_upstream_data(_large_error_start())
        assert session.services.partial_message_bytes > 60_000
        await asyncio.sleep(LIMIT * 2)
        assert _fatal(client.written) == "08006"
        assert b"the database did not finish a message in 0.2 s" in client.written
        assert session.services.partial_message_bytes == 0
        lost = [r for r in sink.records if r.event == AuditEvent.UPSTREAM_LOST]
        assert [r.sqlstate for r in lost] == ["08006"]
        assert [r.status for r in sink.records if r.status] == ["unknown"]  # SELECT 1

    asyncio.run(run())


def test_the_database_is_not_timed_while_the_client_does_not_read() -> None:
    async def run() -> None:
        session, client, _, _ = _session()
        session.data_received(m.query("SELECT 1"))
        session._on_upstream_data(_large_error_start())
        session.pause_writing()  # the client's socket is full: dbward stops reading upstream
        await asyncio.sleep(LIMIT * 3)
        assert _fatal(client.written) is None
        session.resume_writing()
        await asyncio.sleep(LIMIT / 2)
        assert _fatal(client.written) is None
        await asyncio.sleep(LIMIT)
        assert _fatal(client.written) == "08006"

    asyncio.run(run())
