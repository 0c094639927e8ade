"""Fault injection against a real `dbward serve`: malformed frames, cancels, lost peers, SIGTERM.

Raw sockets are used only where a test must send bytes no real client would; logins over them
use dbward's own SCRAM client and message builders.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbward.audit.query import search
from dbward.audit.records import AuditEvent, AuditRecord
from dbward.wire.postgres import messages
from fixtures.clients import app_name, is_outcome
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession, expect_fatal, read_message

TIMEOUT = 5.0


def _app(tag: str) -> str:
    return f"faults-{tag}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ raw wire helpers


def _expect_fatal(sock: socket.socket) -> dict[str, str]:
    return expect_fatal(sock, skip_notices=True)


def _client_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _send_cancel(proxy: Proxy, pid: int, key: bytes) -> str:
    """A raw CancelRequest on its own connection; returns the client address used."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        addr = _client_addr(sock)
        sock.sendall(messages.cancel_request(pid, key))
        # The proxy answers a cancel with nothing and hangs up.
        try:
            assert sock.recv(16) == b""
        except ConnectionResetError:
            pass
    return addr


# ------------------------------------------------------------------ database-side observation


def _active(pg: PgServer, app: str) -> list[str]:
    """Queries the upstream is running right now for this application_name."""
    out = pg.psql(
        "SELECT state || ':' || query FROM pg_stat_activity "
        f"WHERE application_name = '{app}' AND pid <> pg_backend_pid()"
    )
    return [line for line in out.splitlines() if line]


def _backends(pg: PgServer, app: str) -> int:
    return len(_active(pg, app))


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_running(pg: PgServer, app: str, needle: str = "pg_sleep") -> None:
    _wait_for(
        lambda: any(line.startswith("active:") and needle in line for line in _active(pg, app)),
        what=f"{needle} to run upstream for {app}",
    )


def _wait_sleep_cancelled(pg: PgServer, app: str) -> None:
    """The pg_sleep a vanished client left running upstream gets cancelled promptly."""
    _wait_for(
        lambda: (
            not any(line.startswith("active:") and "pg_sleep" in line for line in _active(pg, app))
        ),
        3.0,
        "the orphaned pg_sleep to be cancelled upstream",
    )


# ------------------------------------------------------------------ audit helpers


def _sessions_of(records: list[AuditRecord], app: str) -> list[AuditRecord]:
    """The records of every session whose records name `app` (its later ones may not)."""
    sessions = {r.session_id for r in records if r.application_name == app}
    return [r for r in records if r.session_id in sessions]


def _session(
    proxy: Proxy, app: str, until: Callable[[list[AuditRecord]], bool]
) -> list[AuditRecord]:
    proxy.audit(until=lambda recs: until(_sessions_of(recs, app)))
    return proxy.session_records(app)


def _records_after_exit(proxy: Proxy, app: str) -> list[AuditRecord]:
    """`app`'s sessions' records, read from the audit log once the proxy has exited (it
    flushed the log before exit)."""
    return _sessions_of(search(proxy.audit_path, limit=100_000), app)


def _has(event: AuditEvent, **fields: Any) -> Callable[[list[AuditRecord]], bool]:
    def check(records: list[AuditRecord]) -> bool:
        return any(
            r.event == event and all(getattr(r, k) == v for k, v in fields.items()) for r in records
        )

    return check


def _by_addr(proxy: Proxy, addr: str, event: AuditEvent) -> list[AuditRecord]:
    recs = proxy.audit(until=lambda rs: any(r.client_addr == addr and r.event == event for r in rs))
    return [r for r in recs if r.client_addr == addr]


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def bystander(proxy: Proxy) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg session that must keep working while other sessions misbehave."""
    app = _app("bystander")
    with psycopg.connect(**proxy.conninfo("bob", application_name=app), connect_timeout=10) as conn:
        conn.autocommit = True
        assert conn.execute("SELECT 1").fetchone() == (1,)
        yield conn
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    assert not any(r.event == AuditEvent.PROTOCOL_ERROR for r in records)


# ------------------------------------------------------------------ malformed frames


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (b"Q\x00\x00\x00\x02", "invalid message length 2"),
        (b"Z\x00\x00\x00\x04", "invalid frontend message type 'Z'"),
        (b"Q" + struct.pack("!I", 2**31 - 1), "exceeds the limit"),
        (b"Q\xff\xff\xff\xff", "exceeds the limit"),
        (b"\x00\x00\x00\x00\x08", "invalid frontend message type 0x00"),
    ],
    ids=["length-2", "type-Z", "length-2^31-1", "length-2^32-1", "type-NUL"],
)
def test_malformed_frame_after_login(
    proxy: Proxy,
    pg_server: PgServer,
    bystander: psycopg.Connection[Any],
    frame: bytes,
    needle: str,
) -> None:
    app = _app("malformed")
    raw = RawSession(proxy, app)
    try:
        rows = raw.query("SELECT 1")
        assert [t for t, _ in rows] == [b"T", b"D", b"C", b"Z"]
        assert _backends(pg_server, app) == 1
        started = time.monotonic()
        raw.sock.sendall(frame)
        fields = _expect_fatal(raw.sock)
        assert time.monotonic() - started < 2.0
    finally:
        raw.close()
    assert fields["C"] == "08P01"
    assert needle in fields["M"], fields
    # The bystander is unaffected, and the misbehaving session's upstream backend is gone.
    assert bystander.execute("SELECT 2").fetchone() == (2,)
    _wait_for(lambda: _backends(pg_server, app) == 0, 3.0, "the upstream backend to exit")
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    errors = [r for r in records if r.event == AuditEvent.PROTOCOL_ERROR]
    assert len(errors) == 1, records
    assert (errors[0].identity, errors[0].sqlstate) == ("alice", "08P01")
    assert needle in errors[0].reason
    assert [str(r.event) for r in records][-1] == "disconnect"


def test_malformed_message_body_after_login(
    proxy: Proxy, pg_server: PgServer, bystander: psycopg.Connection[Any]
) -> None:
    # Well framed, but the Query string lacks its NUL terminator.
    app = _app("body")
    raw = RawSession(proxy, app)
    try:
        raw.sock.sendall(b"Q\x00\x00\x00\x0cSELECT 1")
        fields = _expect_fatal(raw.sock)
    finally:
        raw.close()
    assert fields["C"] == "08P01"
    assert bystander.execute("SELECT 3").fetchone() == (3,)
    records = _session(proxy, app, _has(AuditEvent.PROTOCOL_ERROR))
    assert any(r.event == AuditEvent.PROTOCOL_ERROR and r.identity == "alice" for r in records)
    _wait_for(lambda: _backends(pg_server, app) == 0, 3.0, "the upstream backend to exit")


def _garbage() -> list[bytes]:
    rng = random.Random(20240607)
    return [
        b"GET / HTTP/1.1\r\nHost: db\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        + bytes(rng.randrange(256) for _ in range(64)),
        struct.pack("!II", 8, 0),  # protocol 0.0
        struct.pack("!II", 4, 196608),  # length shorter than its own header
        struct.pack("!II", 16, 80877103) + b"\x00" * 8,  # SSLRequest with a wrong length
        struct.pack("!II", 8, (1234 << 16) | 9999),  # an unknown special request code
        b"\x00\x00\x00\x09\x00\x03\x00\x00\x01",  # parameters without a terminator
        b"\x00\x00\x00" + bytes(rng.randrange(256) for _ in range(200)),
    ]


@pytest.mark.parametrize("index", range(len(_garbage())))
def test_garbage_before_startup(
    proxy: Proxy, bystander: psycopg.Connection[Any], index: int
) -> None:
    payload = _garbage()[index]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        addr = _client_addr(sock)
        sock.sendall(payload)
        fields = _expect_fatal(sock)
    assert fields["C"] in ("08P01", "0A000"), fields
    records = _by_addr(proxy, addr, AuditEvent.PROTOCOL_ERROR)
    assert [r.sqlstate for r in records if r.event == AuditEvent.PROTOCOL_ERROR] == [fields["C"]]
    assert not any(r.event == AuditEvent.AUTH_OK for r in records)
    assert bystander.execute("SELECT 4").fetchone() == (4,)


def test_silent_client_times_out_or_leaves_cleanly(
    proxy: Proxy, bystander: psycopg.Connection[Any]
) -> None:
    # A connection that sends half a header and hangs up must not disturb anything.
    for partial in (b"", b"\x00\x00", b"\x00\x00\x00\x50\x00\x03\x00\x00user\x00"):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(partial)
    assert bystander.execute("SELECT 5").fetchone() == (5,)
    assert proxy.process.poll() is None


# ------------------------------------------------------------------ cancel


def _run_async(
    pool: ThreadPoolExecutor, conn: psycopg.Connection[Any], sql: str
) -> Future[tuple[float, Any]]:
    def run() -> tuple[float, Any]:
        try:
            return time.monotonic(), conn.execute(sql).fetchall()
        except psycopg.Error as exc:
            return time.monotonic(), exc

    return pool.submit(run)


@contextmanager
def _sleeping_session(
    proxy: Proxy, pg_server: PgServer, app: str
) -> Iterator[tuple[psycopg.Connection[Any], Future[tuple[float, Any]]]]:
    """A session through `proxy` whose `SELECT pg_sleep(10)` is running upstream."""
    with (
        psycopg.connect(
            **proxy.conninfo(application_name=app), connect_timeout=10, autocommit=True
        ) as conn,
        ThreadPoolExecutor(1) as pool,
    ):
        running = _run_async(pool, conn, "SELECT pg_sleep(10)")
        _wait_running(pg_server, app)
        yield conn, running


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_running_query(proxy: Proxy, pg_server: PgServer, method: str) -> None:
    app = _app(method)
    with _sleeping_session(proxy, pg_server, app) as (conn, running):
        asked = time.monotonic()
        getattr(conn, method)()
        ended, result = running.result(timeout=5)
        assert isinstance(result, psycopg.errors.QueryCanceled), result
        assert result.sqlstate == "57014"
        assert ended - asked < 2.0
        # The session stays usable after the cancel.
        assert conn.execute("SELECT 6").fetchone() == (6,)
    records = _session(
        proxy, app, lambda rs: any(is_outcome(r) and r.sqlstate == "57014" for r in rs)
    )
    sleep_stmt = next(
        r for r in records if r.event == AuditEvent.STATEMENT and "pg_sleep" in r.sql_text
    )
    outcome = next(
        r for r in records if is_outcome(r) and r.statement_id == sleep_stmt.statement_id
    )
    assert (outcome.status, outcome.sqlstate, outcome.identity) == ("error", "57014", "alice")
    session_id = sleep_stmt.session_id
    cancels = proxy.audit(
        event="cancel", until=lambda rs: any(r.detail == f"session={session_id}" for r in rs)
    )
    mine = [r for r in cancels if r.detail == f"session={session_id}"]
    assert [r.status for r in mine] == ["forwarded"]


def test_cancel_with_wrong_key_does_nothing(proxy: Proxy, pg_server: PgServer) -> None:
    app = _app("wrongkey")
    with _sleeping_session(proxy, pg_server, app) as (conn, running):
        pid = conn.info.backend_pid
        addr = _send_cancel(proxy, pid, b"\x00\x00\x00\x00")
        addr2 = _send_cancel(proxy, pid, b"\xde\xad\xbe\xef")
        time.sleep(1.0)
        assert not running.done(), running.result()
        assert any(line.startswith("active:") for line in _active(pg_server, app))
        conn.cancel()
        _, result = running.result(timeout=5)
        assert isinstance(result, psycopg.errors.QueryCanceled), result
    for a in (addr, addr2):
        refused = [r for r in _by_addr(proxy, a, AuditEvent.CANCEL) if r.event == AuditEvent.CANCEL]
        assert [r.status for r in refused] == ["refused"]
        assert refused[0].reason == "unknown cancel key"


def test_cancel_from_a_client_that_hangs_up_at_once_is_still_sent(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """tokio-postgres sends its CancelRequest, shuts its side down and closes without waiting.
    dbward forwarded the cancel on the client connection's own task, which the hang-up cancelled
    before the request reached the database: the statement ran on, and the audit said only
    'forwarded' (found by the twenty-ninth review)."""
    app = _app("hangup")
    session = RawSession(proxy, app)
    session.sock.settimeout(10)
    try:
        session.sock.sendall(messages.query("SELECT pg_sleep(8)"))
        _wait_running(pg_server, app)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(messages.cancel_request(session.pid, session.key))
            sock.shutdown(socket.SHUT_WR)
        asked = time.monotonic()
        kind, payload = read_message(session.sock)
        if kind == b"T":  # PostgreSQL describes the row before it runs (sent with the error)
            kind, payload = read_message(session.sock)
        assert kind == b"E", kind
        assert messages.parse_error_fields(payload)["C"] == "57014"
        assert time.monotonic() - asked < 3.0
    finally:
        session.close()
    assert "Traceback" not in proxy.log()


def test_cancel_flood_is_rate_limited(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    flooded = proxy_factory()
    app = _app("flood")
    with _sleeping_session(flooded, pg_server, app) as (conn, running):
        pid = conn.info.backend_pid
        started = time.monotonic()
        for i in range(50):
            _send_cancel(flooded, pid, struct.pack("!I", 0x10000 + i))
        assert time.monotonic() - started < 10
        assert not running.done(), running.result()
        assert flooded.process.poll() is None
        # A fresh login still works during the flood's aftermath.
        with psycopg.connect(**flooded.conninfo("bob"), connect_timeout=10) as other:
            assert other.execute("SELECT 7").fetchone() == (7,)
        # Once the bucket refills, the rightful owner can still cancel.
        time.sleep(0.6)
        conn.cancel()
        _, result = running.result(timeout=5)
        assert isinstance(result, psycopg.errors.QueryCanceled), result
    cancels = flooded.audit(
        event="cancel", until=lambda rs: any(r.status == "forwarded" for r in rs)
    )
    refused = [r for r in cancels if r.status == "refused"]
    forwarded = [r for r in cancels if r.status == "forwarded"]
    assert 1 <= len(refused) < 50, len(refused)
    assert len(forwarded) == 1
    # The rate-limited attempts: the first in one log line at once, the rest held back and
    # reported when the 10 s interval ends, although no attempt follows (they were lost).
    limited = 50 - len(refused)
    pattern = re.compile(r"rate-limited: (\d+) refused since the last report")
    deadline = time.monotonic() + 15
    while True:
        counts = [int(n) for n in pattern.findall(flooded.log())]
        if sum(counts) >= limited or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts[:1] == [1] and sum(counts) == limited, (counts, limited)


# ------------------------------------------------------------------ peers going away


def test_client_disconnect_mid_query_cancels_upstream(proxy: Proxy, pg_server: PgServer) -> None:
    app = _app("dropped")
    raw = RawSession(proxy, app)
    raw.sock.sendall(messages.query("SELECT pg_sleep(30)"))
    _wait_running(pg_server, app)
    # Reset, not a polite Terminate: the client process died.
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    _wait_sleep_cancelled(pg_server, app)
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    outcome = next(r for r in records if is_outcome(r))
    # Cancelled upstream, but whether it had finished first nobody can hear any more.
    assert (outcome.status, outcome.sqlstate) == ("unknown", "")
    assert [str(r.event) for r in records][-1] == "disconnect"
    # and the backend itself is closed, not left idle
    _wait_for(lambda: _backends(pg_server, app) == 0, 3.0, "the upstream backend to exit")


def test_upstream_terminated_while_idle(proxy: Proxy, pg_server: PgServer) -> None:
    app = _app("killed-idle")
    conn = psycopg.connect(
        **proxy.conninfo(application_name=app), connect_timeout=10, autocommit=True
    )
    try:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert pid == conn.info.backend_pid
        assert pg_server.psql(f"SELECT pg_terminate_backend({pid})") == "t"
        _wait_for(lambda: _backends(pg_server, app) == 0, 3.0, "the backend to be terminated")
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("SELECT 1")
        text = str(caught.value)
        assert "terminating connection due to administrator command" in text, text
    finally:
        conn.close()
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    events = [str(r.event) for r in records]
    assert events[-1] == "disconnect", events
    lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
    assert len(lost) <= 1
    assert all(r.identity == "alice" for r in lost)
    # The proxy serves new sessions afterwards.
    with psycopg.connect(**proxy.conninfo(application_name=app + "-2"), connect_timeout=10) as c2:
        assert c2.execute("SELECT 8").fetchone() == (8,)


def test_upstream_terminated_mid_query(proxy: Proxy, pg_server: PgServer) -> None:
    app = _app("killed-busy")
    conn = psycopg.connect(
        **proxy.conninfo(application_name=app), connect_timeout=10, autocommit=True
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            running = _run_async(pool, conn, "SELECT pg_sleep(10)")
            _wait_running(pg_server, app)
            killed = time.monotonic()
            pg_server.psql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE application_name = '{app}'"
            )
            ended, result = running.result(timeout=5)
        assert isinstance(result, psycopg.OperationalError), result
        assert ended - killed < 2.0
        assert conn.closed or conn.broken
    finally:
        conn.close()
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    stmt = next(r for r in records if r.event == AuditEvent.STATEMENT and "pg_sleep" in r.sql_text)
    outcomes = [r for r in records if is_outcome(r) and r.statement_id == stmt.statement_id]
    # Exactly one outcome: the error PostgreSQL sent (57P01) or "unknown" when the link died.
    assert len(outcomes) == 1, outcomes
    assert (outcomes[0].status, outcomes[0].sqlstate) in (("error", "57P01"), ("unknown", "08006"))
    assert [str(r.event) for r in records][-1] == "disconnect"


def _until_closed(sock: socket.socket) -> list[str]:
    """Every message up to EOF, as type letters (errors with severity and code)."""
    got = []
    while True:
        try:
            kind, payload = read_message(sock)
        except (ConnectionError, TimeoutError):
            return got
        if kind == b"E":
            fields = messages.parse_error_fields(payload)
            got.append(f"E:{fields['S']}:{fields['C']}")
        else:
            got.append(kind.decode())


def _terminated_replies(pg: PgServer, sock: socket.socket, busy: bool) -> list[str]:
    """Terminate the backend of a logged-in raw session (running pg_sleep when `busy`) and
    return everything the client reads after that, up to EOF."""
    sock.sendall(messages.query("SELECT pg_backend_pid()"))
    pid = 0
    while (reply := read_message(sock))[0] != b"Z":
        if reply[0] == b"D":
            pid = int(reply[1][6:])  # one column: count (2 bytes), length (4), the digits
    if busy:
        sock.sendall(messages.query("SELECT pg_sleep(10)"))
        time.sleep(0.3)
    assert pg.psql(f"SELECT pg_terminate_backend({pid})") == "t"
    return _until_closed(sock)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_upstream_fatal_is_the_last_message(proxy: Proxy, pg_server: PgServer, busy: bool) -> None:
    """r60 (asyncpg's test_execute_script_interrupted_by_server): PostgreSQL's own FATAL
    (pg_terminate_backend: 57P01) was relayed and then followed by dbward's FATAL 08006 "lost
    the connection to the database"; asyncpg reports the last error, so the client saw
    dbward's instead of PostgreSQL's. Now the session ends as it does directly: the FATAL, EOF."""
    direct = socket.create_connection(("127.0.0.1", pg_server.port), timeout=TIMEOUT)
    direct.settimeout(TIMEOUT)
    direct.sendall(
        messages.startup_message({"user": pg_server.trust_user, "database": pg_server.database})
    )
    while read_message(direct)[0] != b"Z":
        pass
    try:
        expected = _terminated_replies(pg_server, direct, busy)
    finally:
        direct.close()
    app = _app("fatal-last")
    session = RawSession(proxy, app)
    try:
        got = _terminated_replies(pg_server, session.sock, busy)
    finally:
        session.close()
    # (pg_sleep's RowDescription is sent before it sleeps)
    assert expected == ["T", "E:FATAL:57P01"] if busy else ["E:FATAL:57P01"]
    assert got == expected
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    assert [str(r.event) for r in records][-1] == "disconnect"
    # The record says why PostgreSQL ended the session, not that dbward saw a socket close.
    lost = [(r.sqlstate, r.reason) for r in records if r.event == AuditEvent.UPSTREAM_LOST]
    assert lost == [
        (
            "57P01",
            "the database ended the session: terminating connection due to administrator command",
        )
    ]


# ------------------------------------------------------------------ SIGTERM drain


def test_sigterm_drains_sessions(proxy_factory: Callable[..., Proxy], pg_server: PgServer) -> None:
    drained = proxy_factory()
    idle_app, busy_app, raw_app = _app("drain-idle"), _app("drain-busy"), _app("drain-raw")
    idle = psycopg.connect(
        **drained.conninfo(application_name=idle_app), connect_timeout=10, autocommit=True
    )
    busy = psycopg.connect(
        **drained.conninfo("bob", application_name=busy_app), connect_timeout=10, autocommit=True
    )
    raw = RawSession(drained, raw_app)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = _run_async(pool, busy, "SELECT pg_sleep(1), 'finished'")
            _wait_running(pg_server, busy_app)
            signalled = time.monotonic()
            drained.process.send_signal(signal.SIGTERM)
            # An idle session is told at once, with admin_shutdown, and then closed.
            fields = _expect_fatal(raw.sock)
            assert (fields["C"], fields["S"]) == ("57P01", "FATAL")
            assert "shutting down" in fields["M"]
            _, result = running.result(timeout=10)
        # In-flight work completes normally.
        assert result == [("", "finished")], result
        # Then both psycopg sessions are gone (libpq words an async FATAL its own way).
        for conn in (idle, busy):
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        # New connections are refused.
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(**drained.conninfo(), connect_timeout=3)
        assert drained.process.wait(timeout=10) == 0
        assert time.monotonic() - signalled < 5.0  # well inside the grace period
    finally:
        idle.close()
        busy.close()
        raw.close()
    # The audit log was flushed before exit: read it after the process is gone.
    records = search(drained.audit_path, limit=100_000)
    for app, who in ((idle_app, "alice"), (busy_app, "bob"), (raw_app, "alice")):
        sessions = {r.session_id for r in records if r.application_name == app}
        assert len(sessions) == 1
        mine = [r for r in records if r.session_id in sessions]
        assert [str(r.event) for r in mine][:2] == ["connect", "auth_ok"]
        assert str(mine[-1].event) == "disconnect", [str(r.event) for r in mine]
        assert mine[-1].identity == who
    busy_outcomes = [r for r in records if is_outcome(r) and r.identity == "bob"]
    assert [(r.status, r.rows) for r in busy_outcomes][-1] == ("ok", 1)
    _wait_for(lambda: _backends(pg_server, busy_app) + _backends(pg_server, idle_app) == 0, 3.0)


def test_sigterm_force_closes_after_grace(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    # A query longer than shutdown_grace_s is cut off when the grace period ends.
    drained = proxy_factory(extra={"shutdown_grace_s": 1})
    app = _app("drain-long")
    conn = psycopg.connect(
        **drained.conninfo(application_name=app), connect_timeout=10, autocommit=True
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            running = _run_async(pool, conn, "SELECT pg_sleep(20)")
            _wait_running(pg_server, app)
            signalled = time.monotonic()
            drained.process.send_signal(signal.SIGTERM)
            ended, result = running.result(timeout=10)
        assert isinstance(result, psycopg.OperationalError), result
        assert 0.8 < ended - signalled < 4.0
        assert drained.process.wait(timeout=10) == 0
    finally:
        conn.close()
    mine = _records_after_exit(drained, app)
    outcomes = [r for r in mine if is_outcome(r)]
    assert [(r.status, r.sqlstate) for r in outcomes] == [("unknown", "57P01")]
    assert str(mine[-1].event) == "disconnect"
    # The long query must not keep running upstream after dbward has gone.
    _wait_for(
        lambda: (
            not any(
                "pg_sleep" in line and line.startswith("active:")
                for line in _active(pg_server, app)
            )
        ),
        3.0,
        "the cut-off query to stop upstream (dbward exited; pg_sleep(20) still active)",
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_the_grace_period_at_once(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, sig: signal.Signals
) -> None:
    """Review r61: a second SIGTERM or Ctrl-C during the drain did nothing (not even a log
    line): an operator had to wait out shutdown_grace_s or kill -9, losing the records. It now
    ends the grace period at once, as its deadline would: the statement still running gets
    57P01 and is cancelled upstream, and the audit log is flushed (exit 0)."""
    drained = proxy_factory(extra={"shutdown_grace_s": 60})
    app = _app("drain-hurry")
    conn = psycopg.connect(
        **drained.conninfo(application_name=app), connect_timeout=10, autocommit=True
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            running = _run_async(pool, conn, "SELECT pg_sleep(60)")
            _wait_running(pg_server, app)
            drained.process.send_signal(sig)
            _wait_for(lambda: "shutting down: draining" in drained.log(), TIMEOUT, "the drain")
            assert drained.process.poll() is None  # the grace period holds it
            drained.process.send_signal(sig)
            _, result = running.result(timeout=30)
        assert isinstance(result, psycopg.OperationalError), result
        assert drained.process.wait(timeout=30) == 0, drained.log()
    finally:
        conn.close()
    assert "second signal: ending the grace period now" in drained.log()
    mine = _records_after_exit(drained, app)
    assert [(r.status, r.sqlstate) for r in mine if is_outcome(r)] == [("unknown", "57P01")]
    assert str(mine[-1].event) == "disconnect"
    _wait_for(
        lambda: not any("pg_sleep" in line for line in _active(pg_server, app)),
        5.0,
        "the cut-off query to stop upstream",
    )


def test_sigterm_ends_connections_over_max_connections(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    """Review 38: a connection over max_connections (refused with 53300, and a protocol_error
    record, once its StartupMessage comes) was not among the sessions the drain ends: it
    could send that message while the audit log was closing (refused, its record lost), or
    wait unanswered until dbward exited. The drain now tells it 57P01 with the others."""
    drained = proxy_factory(listener={"max_connections": 1})
    app = _app("drain-full")
    for _ in range(50):  # the fixture's probe of the port holds the slot until dbward sees it go
        try:
            busy = psycopg.connect(
                **drained.conninfo(application_name=app), connect_timeout=10, autocommit=True
            )
            break
        except psycopg.OperationalError:
            time.sleep(0.05)
    else:
        pytest.fail("the one slot never freed")
    over = [
        socket.create_connection(("127.0.0.1", drained.port), timeout=TIMEOUT) for _ in range(4)
    ]
    refused = over.pop()  # refused before the drain: its record is written
    ended = {_client_addr(sock) for sock in over}
    try:
        for sock in [*over, refused]:
            sock.settimeout(TIMEOUT)
            sock.sendall(messages.ssl_request())  # answered: dbward has this connection
            assert sock.recv(1) == b"N"
        startup = {"user": "alice", "database": "app", "application_name": app + "-refused"}
        refused.sendall(messages.startup_message(startup))
        assert _expect_fatal(refused)["C"] == "53300"
        with ThreadPoolExecutor(1) as pool:
            running = _run_async(pool, busy, "SELECT pg_sleep(2), 'finished'")
            _wait_running(pg_server, app)
            drained.process.send_signal(signal.SIGTERM)
            for sock in over:  # told at once, while the drain waits for the busy statement
                fields = _expect_fatal(sock)
                assert (fields["C"], fields["S"]) == ("57P01", "FATAL")
            assert not running.done()
            _, result = running.result(timeout=10)
        assert result == [("", "finished")], result
        assert drained.process.wait(timeout=10) == 0
    finally:
        busy.close()
        for sock in [*over, refused]:
            sock.close()
    assert "record lost" not in drained.log() and "not written" not in drained.log()
    records = search(drained.audit_path, limit=100_000)
    refusals = [r for r in records if r.application_name == app + "-refused"]
    assert [(str(r.event), r.sqlstate) for r in refusals] == [("protocol_error", "53300")]
    # The connections the drain ended had sent no StartupMessage: nothing to record of them.
    assert not [r for r in records if r.client_addr in ended], ended


def test_sighup_keeps_serving(proxy_factory: Callable[..., Proxy]) -> None:
    # SIGHUP (`systemctl reload`, a closed terminal) must not kill the proxy without draining.
    running = proxy_factory()
    conn = psycopg.connect(**running.conninfo(), connect_timeout=10, autocommit=True)
    try:
        running.process.send_signal(signal.SIGHUP)
        _wait_for(lambda: "SIGHUP ignored" in running.log(), TIMEOUT, "the SIGHUP warning")
        assert running.process.poll() is None, running.log()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(**running.conninfo("bob"), connect_timeout=10) as other:
            assert other.execute("SELECT 2").fetchone() == (2,)
    finally:
        conn.close()
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=15) == 0, running.log()


def test_protocol_error_mid_query_cancels_upstream(proxy: Proxy, pg_server: PgServer) -> None:
    app = _app("garbage-busy")
    raw = RawSession(proxy, app)
    try:
        raw.sock.sendall(messages.query("SELECT pg_sleep(30)"))
        _wait_running(pg_server, app)
        raw.sock.sendall(b"Z\x00\x00\x00\x04")
        fields = _expect_fatal(raw.sock)
    finally:
        raw.close()
    assert fields["C"] == "08P01"
    # The session is over, so the statement it left running upstream must not run on alone.
    _wait_sleep_cancelled(pg_server, app)
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    events = [str(r.event) for r in records]
    assert "protocol_error" in events and events[-1] == "disconnect", events
    outcomes = [r for r in records if is_outcome(r)]
    assert len(outcomes) == 1 and outcomes[0].status == "unknown", outcomes


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "no-sync"])
def test_pipelining_client_that_never_reads_is_paused(
    proxy_factory: Callable[..., Proxy], sync: bool
) -> None:
    """Statements pipelined without reading a reply: dbward stops reading at its in-flight limit.

    Without the limit this client made dbward hold ~230 MB (every statement sent was tracked
    until answered, and kernel buffers let ~270k through); now it holds at most
    MAX_REPLIES_IN_FLIGHT owed replies. Other sessions are served meanwhile. A pipeline with
    no Sync at all (PostgreSQL answers as its output buffer fills) was exempt: ~400 MB.
    A proxy of its own: what the flood leaves behind (100,000 statements to account for when
    it leaves) is not the next test's business.
    """
    proxy = proxy_factory()
    flood = RawSession(proxy, app_name("flood"))
    rss_before = _rss_bytes(proxy.process.pid)
    unit = (
        messages.parse_message("", "SELECT 1")
        + messages.bind_message("", "", [])
        + messages.execute_message("")
        + (messages.sync() if sync else b"")
    )
    chunk = memoryview(unit * 5000)
    pending = chunk
    sent = 0
    flood.sock.setblocking(False)
    stalled_since: float | None = None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                n = flood.sock.send(pending)
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.5:
                    break  # the proxy has stopped reading us
                time.sleep(0.02)
                continue
            stalled_since = None
            sent += n
            pending = pending[n:] or chunk
        assert stalled_since is not None, "the client was never paused"
        grown = _rss_bytes(proxy.process.pid) - rss_before
        assert grown < 100_000_000, f"proxy grew {grown / 1e6:.0f} MB for {sent // len(unit)} units"
        with psycopg.connect(**proxy.conninfo(), autocommit=True, connect_timeout=5) as other:
            assert other.execute("SELECT 41 + 1").fetchone() == (42,)
    finally:
        flood.close()
    # And once it leaves with 100,000 statements in flight (0.1 s here; 30 s is only a bound
    # for a loaded machine, not a speed target).
    with psycopg.connect(**proxy.conninfo(), autocommit=True, connect_timeout=30) as after:
        assert after.execute("SELECT 43").fetchone() == (43,)


def test_terminate_lets_statements_sent_before_it_finish(proxy: Proxy, pg_server: PgServer) -> None:
    """Query then Terminate: PostgreSQL runs the query, then ends; dbward does the same (a
    lost connection, by contrast, is cancelled)."""
    app = _app("terminate")
    raw = RawSession(proxy, app)
    table = f"term_{uuid.uuid4().hex[:8]}"
    pg_server.psql(
        f"CREATE TABLE {table} (x int); GRANT ALL ON {table} TO {pg_server.service_user}",
        dbname="app",
    )
    raw.sock.sendall(
        messages.query(f"INSERT INTO {table} SELECT 1 FROM pg_sleep(0.3)") + messages.terminate()
    )
    raw.close()
    _wait_for(
        lambda: pg_server.psql(f"SELECT count(*) FROM {table}", dbname="app") == "1",
        5.0,
        "the INSERT sent before Terminate to commit",
    )
    records = _session(proxy, app, _has(AuditEvent.DISCONNECT))
    outcome = next(r for r in records if is_outcome(r))
    assert outcome.status == "unknown"  # dbward no longer hears the answer


def test_large_unfinished_messages_share_one_budget(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    """Fourteenth review: every message is buffered whole until its last byte (four 250 MB
    CopyData messages at once: +1.5 GB). Past max_partial_message_bytes for the listener, the
    session adding a large unfinished message is ended with 53200; the others carry on."""
    mib = 1024 * 1024
    small = proxy_factory(
        listener={"max_partial_message_bytes": 16 * mib, "max_message_bytes": 12 * mib}
    )
    table = f"partial_{uuid.uuid4().hex[:6]}"
    pg_server.psql(f"CREATE TABLE {table} (v text); GRANT ALL ON {table} TO PUBLIC")
    row = b"x" * (10 * mib - 1) + b"\n"
    header = b"d" + struct.pack("!I", 4 + len(row))
    first, second = RawSession(small, _app("partial-a")), RawSession(small, _app("partial-b"))
    try:
        for session in (first, second):
            session.sock.sendall(messages.query(f"COPY {table} FROM STDIN"))
            msg_type, _ = read_message(session.sock)
            assert msg_type == b"G"
        first.sock.sendall(header + row[: 9 * mib])
        time.sleep(0.3)  # dbward has read it: 9 MiB unfinished
        second.sock.sendall(header + row[: 9 * mib])
        fields = expect_fatal(second.sock)
        assert fields["C"] == "53200", fields
        # The first session, and everyone else, carry on.
        replies = first.send(row[9 * mib :] + messages.copy_done())
        assert (b"C", b"COPY 1\x00") in replies, replies
        with psycopg.connect(**small.conninfo(), autocommit=True) as other:
            assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
    finally:
        first.close()
        second.close()
    refused = small.audit(event="protocol_error", until=bool)
    assert [r.sqlstate for r in refused] == ["53200"]


def test_large_messages_from_the_database_share_the_budget(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    """Review 21: an error or notice from the database is held whole too, and any client can
    make PostgreSQL send a large one (`select repeat('x', 500000000)::int` echoes the value:
    ~2 GB in dbward per session). Past max_partial_message_bytes the session is ended with
    53200; the others carry on."""
    mib = 1024 * 1024
    small = proxy_factory(
        listener={"max_partial_message_bytes": 4 * mib, "max_message_bytes": 2 * mib}
    )
    app = _app("big-error")
    with psycopg.connect(**small.conninfo(), application_name=app, autocommit=True) as conn:
        # 3 MiB fits the budget (held once); 6 MiB does not.
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute(f"select repeat('x', {3 * mib})::int")
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute(f"select repeat('x', {6 * mib})::int")
    assert caught.value.sqlstate == "53200", caught.value
    assert "large message from the database" in str(caught.value)
    with psycopg.connect(**small.conninfo(), autocommit=True) as other:
        assert other.execute("select 1").fetchone() == (1,)
    records = small.session_records(
        app, until=lambda rs: any(r.event == AuditEvent.DISCONNECT for r in rs)
    )
    lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
    assert [r.sqlstate for r in lost] == ["53200"], lost
    assert [r.status for r in records if is_outcome(r)] == ["error", "unknown"], records
    assert small.process.poll() is None


def test_a_large_message_left_unfinished_ends_its_session_in_time(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    """Review 25: a client announcing a large message and sending it a byte now and then held
    its share of max_partial_message_bytes for good (a handful of them: everyone's large
    messages refused with 53200). After partial_message_timeout_s it gets FATAL 08P01, the
    budget is given back at once, its statement in flight is cancelled, others carry on."""
    mib = 1024 * 1024
    small = proxy_factory(
        listener={
            "max_partial_message_bytes": 16 * mib,
            "max_message_bytes": 12 * mib,
            "partial_message_timeout_s": 1,
        }
    )
    table = f"dribble_{uuid.uuid4().hex[:6]}"
    pg_server.psql(f"CREATE TABLE {table} (v text); GRANT ALL ON {table} TO PUBLIC")
    app = _app("dribble")
    slow, other = RawSession(small, app), RawSession(small, _app("dribble-other"))
    done = False

    def dribble() -> None:
        while not done:
            time.sleep(0.3)
            try:
                slow.sock.sendall(b"x")
            except OSError:
                return

    try:
        slow.sock.sendall(messages.query("SELECT pg_sleep(30)"))
        _wait_running(pg_server, app)
        text = b"SELECT '" + b"x" * (10 * mib)
        slow.sock.sendall(b"Q" + struct.pack("!I", 4 + len(text) + 2) + text[: 9 * mib])
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            sender = pool.submit(dribble)
            try:
                fields = _expect_fatal(slow.sock)
            finally:
                done = True
            sender.result()
        elapsed = time.monotonic() - started
        assert fields["C"] == "08P01", fields
        assert "was not complete after 1 s" in fields["M"], fields
        assert 0.9 < elapsed < 5, elapsed
        slow.close()
        _wait_sleep_cancelled(pg_server, app)
        # Its 9 MiB are free again: another session's 9 MiB fit the 16 MiB budget.
        other.sock.sendall(messages.query(f"COPY {table} FROM STDIN"))
        assert read_message(other.sock)[0] == b"G"
        row = b"y" * (10 * mib - 1) + b"\n"
        other.sock.sendall(b"d" + struct.pack("!I", 4 + len(row)) + row[: 9 * mib])
        time.sleep(0.3)
        replies = other.send(row[9 * mib :] + messages.copy_done())
        assert (b"C", b"COPY 1\x00") in replies, replies
    finally:
        done = True
        slow.close()
        other.close()
    records = _session(small, app, _has(AuditEvent.DISCONNECT))
    refused = [r for r in records if r.event == AuditEvent.PROTOCOL_ERROR]
    assert [(r.sqlstate, r.reason) for r in refused] == [
        ("08P01", "message not complete within partial_message_timeout_s (1 s)")
    ]
    outcomes = [r for r in records if is_outcome(r)]
    assert [r.status for r in outcomes] in (["unknown"], ["cancelled"]), outcomes
    assert small.process.poll() is None


def test_sigterm_with_a_client_that_stopped_reading(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    """Review 40: a client that stops reading leaves its 57P01 (and the end of the rows it
    asked for) in dbward's send buffer, and closing a transport waits for that buffer to
    empty: the session was never let go. The drain waited its whole grace period for a
    session that was idle, and its disconnect record never came (the audit log had closed);
    the drain now aborts such connections at the deadline, before the log closes."""
    drained = proxy_factory(extra={"shutdown_grace_s": 2})
    app = _app("drain-stuck")
    raw = RawSession(drained, app)
    try:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # ~100 MB of rows nobody reads: the socket's buffers and dbward's fill up, and dbward
        # stops reading PostgreSQL (which waits to send the rest).
        raw.sock.sendall(messages.query("SELECT repeat('x', 1000) FROM generate_series(1, 100000)"))
        _wait_for(
            lambda: any(line.startswith("active:") for line in _active(pg_server, app)),
            10.0,
            "the query to run upstream",
        )
        time.sleep(0.5)
        signalled = time.monotonic()
        drained.process.send_signal(signal.SIGTERM)
        assert drained.process.wait(timeout=15) == 0
        took = time.monotonic() - signalled
    finally:
        raw.close()
    mine = _records_after_exit(drained, app)
    assert str(mine[-1].event) == "disconnect", [str(r.event) for r in mine]
    assert took < 8.0, took  # grace 2 s, 1 s to take the 57P01, at most 5 s for the cancel
