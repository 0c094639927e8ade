"""A database that misbehaves after login (a fake server: a real PostgreSQL cannot be made to).

dbward must end the session cleanly (the client gets a readable error, the audit says why, the
log has no traceback) and keep serving.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import psycopg
import pytest

from dbward.audit.records import AuditEvent
from dbward.wire.postgres import messages
from fixtures.clients import app_name
from fixtures.hostile import HostileConn, HostileServer, hostile_server, start_hostile_proxy
from fixtures.proxy import Proxy, stop_proxy


def _frame(msg_type: bytes, body: bytes) -> bytes:
    return msg_type + struct.pack("!I", len(body) + 4) + body


_READY = messages.ready_for_query(b"I")
_ROW_DESCRIPTION = _frame(
    b"T", struct.pack("!H", 1) + b"a\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
)

# What the fake server answers to the first query, by the session's application_name.
_REPLIES = {
    # An ErrorResponse / ParameterStatus whose last string has no terminator.
    "bad-error": _frame(b"E", b"SERROR\0C42000\0Mboom") + _READY,
    "bad-param": _frame(b"S", b"is_superuser\0on") + _READY,
    # Messages PostgreSQL sends only at login.
    "auth-again": messages.authentication_cleartext(),
    "key-again": messages.backend_key_data(999, b"\x12\x34\x56\x78")
    + messages.command_complete("SELECT 1")
    + _READY,
    # Half a DataRow (its header says 32 bytes), then the connection closes.
    "torn-row": _ROW_DESCRIPTION + b"D\x00\x00\x00\x20\x00\x01\x00\x00",
}


def _script(conn: HostileConn) -> None:
    conn.login()
    app = conn.startup.split(b"application_name\0")[1].split(b"\0")[0].decode()
    conn.read_message()
    conn.send(_REPLIES[app.split(":")[0]])
    if not app.startswith("torn-row"):
        conn.idle_until_closed()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileServer, Proxy]]:
    for server in hostile_server():
        server.script = _script
        proxy = start_hostile_proxy(tmp_path_factory.mktemp("hostile"), server)
        try:
            yield server, proxy
        finally:
            stop_proxy(proxy)


def _query(proxy: Proxy, app: str) -> psycopg.Error:
    with (
        psycopg.connect(
            **proxy.conninfo(), application_name=app, autocommit=True, connect_timeout=5
        ) as conn,
        pytest.raises(psycopg.Error) as caught,
    ):
        conn.execute("select 1").fetchall()
    return caught.value


def _lost_reason(proxy: Proxy, app: str) -> str:
    records = proxy.session_records(
        app, until=lambda rs: any(r.event == AuditEvent.DISCONNECT for r in rs)
    )
    lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
    assert len(lost) == 1, [(r.event, r.reason) for r in records]
    statement = next(r for r in records if r.event == AuditEvent.STATEMENT)
    assert statement.status == "unknown", statement
    return lost[0].reason


@pytest.mark.parametrize("kind", ["bad-error", "bad-param", "auth-again", "key-again"])
def test_invalid_upstream_message_ends_the_session_cleanly(
    hostile: tuple[HostileServer, Proxy], kind: str
) -> None:
    server, proxy = hostile
    app = app_name(f"{kind}:")
    error = _query(proxy, app)
    assert "the database sent an invalid message" in str(error), error
    assert _lost_reason(proxy, app) == "the database sent an invalid message"
    log = proxy.log()
    assert "Traceback" not in log and "Fatal error on transport" not in log, log[-3000:]
    assert not server.errors
    assert proxy.process.poll() is None


def test_row_cut_off_by_the_database_is_not_spliced_with_an_error(
    hostile: tuple[HostileServer, Proxy],
) -> None:
    """The FATAL written after half a DataRow would be read as the rest of the row (libpq:
    'lost synchronization with server'); the client is just disconnected instead."""
    _, proxy = hostile
    app = app_name("torn-row:")
    error = _query(proxy, app)
    assert isinstance(error, psycopg.OperationalError), error
    assert "lost synchronization" not in str(error), error
    assert "server closed the connection unexpectedly" in str(error), error
    assert _lost_reason(proxy, app) == "dbward: lost the connection to the database"
