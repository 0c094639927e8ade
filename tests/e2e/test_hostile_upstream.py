"""A database that misbehaves after login (a fake server: a real PostgreSQL cannot be made to).

dbward must end the session cleanly (the client gets a readable error, the audit says why, the
log has no traceback) and keep serving.
"""

from __future__ import annotations

import datetime as dt
import itertools
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from dbward.audit.records import AuditEvent
from dbward.wire.postgres import messages
from fixtures.clients import app_name, is_outcome
from fixtures.hostile import HostileConn, HostileServer, hostile_server, start_hostile_proxy
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy, stop_proxy
from fixtures.raw import RawSession, read_message
from fixtures.tls import LeafCert, TestCA, make_ed25519_leaf, make_test_ca


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
    # A ReadyForQuery whose transaction status PostgreSQL never sends, and one too long.
    "bad-ready": messages.command_complete("SELECT 1") + _frame(b"Z", b"X"),
    "long-ready": messages.command_complete("SELECT 1") + _frame(b"Z", b"II"),
    # Half a DataRow (its header says 32 bytes), then the connection closes.
    "torn-row": _ROW_DESCRIPTION + b"D\x00\x00\x00\x20\x00\x01\x00\x00",
    # The start of a 2 MiB ErrorResponse, then nothing more (the connection stays open).
    "dribble": b"E"
    + struct.pack("!I", 4 + 2 * 1024 * 1024)
    + b"SERROR\0C22P02\0M"
    + b"x" * 100_000,
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


def _lost_reason(proxy: Proxy, app: str, status: str | None = None) -> str:
    """The reason of the session's one `upstream_lost` record (SQLSTATE 08006); its (first)
    statement's outcome is `status`, unless that is None."""
    records = proxy.session_records(
        app, until=lambda rs: any(r.event == AuditEvent.DISCONNECT for r in rs)
    )
    lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
    assert len(lost) == 1, [(r.event, r.reason) for r in records]
    assert lost[0].sqlstate == "08006", lost[0]
    if status is not None:
        statement = next(r for r in records if r.event == AuditEvent.STATEMENT)
        assert statement.status == status, statement
    return lost[0].reason


def _assert_invalid_message_ended(proxy: Proxy, app: str, status: str | None = None) -> None:
    """The session `app` was ended for an invalid message from the database, and only it: the
    audit says so, the log has no traceback, the proxy still runs."""
    assert _lost_reason(proxy, app, status) == "the database sent an invalid message"
    log = proxy.log()
    assert "Traceback" not in log and "Fatal error" not in log, log[-3000:]
    assert proxy.process.poll() is None


@pytest.mark.parametrize(
    "kind", ["bad-error", "bad-param", "auth-again", "key-again", "bad-ready", "long-ready"]
)
def test_invalid_upstream_message_ends_the_session_cleanly(
    hostile: tuple[HostileServer, Proxy], kind: str
) -> None:
    server, proxy = hostile
    app = app_name(f"{kind}:")
    error = _query(proxy, app)
    assert "the database sent an invalid message" in str(error), error
    # A ReadyForQuery comes after the statement's CommandComplete: that outcome stands.
    status = "ok" if kind.endswith("-ready") else "unknown"
    _assert_invalid_message_ended(proxy, app, status)
    assert not server.errors


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
    assert _lost_reason(proxy, app, "unknown") == "dbward: lost the connection to the database"


# ------------------------------------------------------------------ TLS to the database


def _tls_script(conn: HostileConn, first: bytes, tls: ssl.SSLContext | None) -> None:
    """Answer the SSLRequest with `first` (then a TLS handshake with `tls`), then log in."""
    conn.recv_exact(8)
    conn.send(first)
    if tls is not None:
        assert isinstance(conn.sock, socket.socket)
        conn.sock = tls.wrap_socket(conn.sock, server_side=True)
    elif first != b"N":
        conn.idle_until_closed()
        return
    conn.login()
    conn.read_message()
    conn.send(messages.command_complete("SELECT 0"), _READY)
    conn.idle_until_closed()


@pytest.fixture
def tls_server() -> Iterator[HostileServer]:
    yield from hostile_server()


def _server_context(leaf: LeafCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.cert, leaf.key)
    return context


def _login(proxy: Proxy, app: str) -> str:
    """'ok', or the FATAL message the client got."""
    try:
        with psycopg.connect(
            **proxy.conninfo(), application_name=app, autocommit=True, connect_timeout=20
        ) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as exc:
        return str(exc)
    return "ok"


def test_plaintext_after_the_databases_s_is_refused_and_blamed_on_it(
    tls_server: HostileServer, tmp_path: Path
) -> None:
    """CVE-2021-23222: bytes sent right after 'S' are refused, not read as TLS-protected; the
    failure is the database's (upstream_lost), not a protocol error of the client."""
    injected = b"S" + messages.authentication_ok() + _READY
    tls_server.script = lambda conn: _tls_script(conn, injected, None)
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "require"}})
    try:
        app = app_name("inject")
        message = _login(proxy, app)
        assert "the database sent an invalid message during login" in message, message
        assert "unencrypted data after accepting SSLRequest" in message, message
        assert "invalid message from client" not in message
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.DISCONNECT for r in rs)
        )
        events = [r.event for r in records]
        assert AuditEvent.UPSTREAM_LOST in events and AuditEvent.PROTOCOL_ERROR not in events
    finally:
        stop_proxy(proxy)


@pytest.mark.parametrize("mode", ["require", "verify-full"])
def test_tls_required_upstream_never_falls_back_to_plaintext(
    tls_server: HostileServer, tmp_path: Path, test_ca: TestCA, mode: str
) -> None:
    tls_server.script = lambda conn: _tls_script(conn, b"N", None)
    tls = (
        {"mode": mode, "ca_file": str(test_ca.ca_cert)} if mode == "verify-full" else {"mode": mode}
    )
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": tls})
    try:
        message = _login(proxy, app_name("no-tls"))
        assert f"does not accept TLS but upstream.tls.mode is {mode}" in message, message
    finally:
        stop_proxy(proxy)


def test_sni_is_sent_in_require_mode(
    tls_server: HostileServer, tmp_path: Path, test_ca: TestCA
) -> None:
    """As libpq (sslsni=1): SNI names the host whatever the mode; poolers route on it."""
    seen: list[str | None] = []
    context = _server_context(test_ca.make_leaf("sni", dns_names=["localhost"]))
    context.sni_callback = lambda _sock, name, _ctx: seen.append(name)
    tls_server.script = lambda conn: _tls_script(conn, b"S", context)
    proxy = start_hostile_proxy(
        tmp_path, tls_server, upstream={"host": "localhost", "tls": {"mode": "require"}}
    )
    try:
        assert _login(proxy, app_name("sni")) == "ok"
        assert seen == ["localhost"]
    finally:
        stop_proxy(proxy)


@pytest.mark.parametrize("case", ["other-name", "expired", "self-signed", "ip-not-in-cert"])
def test_verify_full_refuses_a_certificate_that_does_not_prove_the_host(
    tls_server: HostileServer, tmp_path: Path, test_ca: TestCA, case: str
) -> None:
    host = "localhost"
    if case == "other-name":
        leaf = test_ca.make_leaf("other-name", dns_names=["db.example.com"])
    elif case == "expired":
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
        leaf = test_ca.make_leaf("expired", dns_names=["localhost"], not_before=past, days=2)
    elif case == "self-signed":
        leaf = make_test_ca(tmp_path / "self", common_name="localhost").make_leaf(
            "self", dns_names=["localhost"]
        )
    else:
        host = "127.0.0.1"
        leaf = test_ca.make_leaf("dns-only", dns_names=["localhost"])
    context = _server_context(leaf)
    tls_server.script = lambda conn: _tls_script(conn, b"S", context)
    upstream = {"host": host, "tls": {"mode": "verify-full", "ca_file": str(test_ca.ca_cert)}}
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream=upstream)
    try:
        app = app_name(case)
        assert "could not connect to the database" in _login(proxy, app)
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.UPSTREAM_LOST for r in rs)
        )
        lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
        assert lost and "certificate" in lost[0].reason.lower(), lost
        assert tls_server.connections == 1
    finally:
        stop_proxy(proxy)


# ------------------------------------------------------------------ cancel requests

_CANCEL = messages.cancel_request(4242, b"\x00\x00\x00\x01")  # the key HostileConn.login sends


def _read_upto(conn: HostileConn, n: int) -> bytes:
    """Up to n bytes, fewer if the peer closes or the TLS handshake failed."""
    data = b""
    try:
        while len(data) < n and (chunk := conn.sock.recv(n - len(data))):
            data += chunk
    except OSError:
        pass
    return data


@pytest.mark.parametrize("case", ["verify-full", "tls-declined", "wrong-certificate", "plaintext"])
def test_cancel_goes_over_tls_when_the_session_does(
    tls_server: HostileServer, tmp_path: Path, test_ca: TestCA, case: str
) -> None:
    """A CancelRequest in plaintext beside a TLS session shows anyone on the path the backend's
    secret key (and with it the power to cancel that session's statements at will). As libpq
    17 does, the cancel of a TLS session starts with an SSLRequest and goes inside TLS checked
    as the session's login was; it is never sent in plaintext then, even if the database (or
    someone in between) declines TLS or presents another certificate. A plaintext session's
    cancel stays plaintext."""
    leaf = test_ca.make_leaf("cancel", dns_names=["localhost"])
    session_tls = None if case == "plaintext" else _server_context(leaf)
    cancel_tls = session_tls
    if case == "wrong-certificate":
        other = make_test_ca(tmp_path / "other", common_name="localhost")
        cancel_tls = _server_context(other.make_leaf("other", dns_names=["localhost"]))
    connections = itertools.count()
    query_seen, release = threading.Event(), threading.Event()
    seen: list[tuple[bytes, bytes, bool]] = []  # first 8 bytes, the request, inside TLS

    def script(conn: HostileConn) -> None:
        if next(connections) == 0:  # the session
            conn.read_startup(tls=session_tls, answer=b"S" if session_tls else b"N")
            conn.accept_login()
            conn.read_message()
            query_seen.set()
            release.wait(10)
            if any(request == _CANCEL for _, request, _ in seen):
                conn.send(messages.error_response("ERROR", "57014", "canceling statement"))
            else:
                conn.send(messages.command_complete("SELECT 0"))
            conn.send(_READY)
            conn.idle_until_closed()
            return
        first = conn.recv_exact(8)
        request = first
        if first == messages.ssl_request():
            conn.send(b"N" if case == "tls-declined" else b"S")
            if case != "tls-declined":
                assert isinstance(conn.sock, socket.socket) and cancel_tls is not None
                try:
                    conn.sock = cancel_tls.wrap_socket(conn.sock, server_side=True)
                except (ssl.SSLError, OSError):
                    seen.append((first, b"", False))
                    return
            request = b""
        request += _read_upto(conn, 16 - len(request))
        seen.append((first, request, isinstance(conn.sock, ssl.SSLSocket)))

    tls_server.script = script
    if case == "plaintext":
        tls = {"mode": "disable"}
    elif case == "tls-declined":
        tls = {"mode": "prefer"}  # a login would fall back to plaintext; its cancel must not
    else:
        tls = {"mode": "verify-full", "ca_file": str(test_ca.ca_cert)}
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"host": "localhost", "tls": tls})
    try:
        with (
            psycopg.connect(
                **proxy.conninfo(), application_name=app_name("cancel"), autocommit=True
            ) as conn,
            ThreadPoolExecutor(1) as pool,
        ):
            running = pool.submit(conn.execute, "select pg_sleep(30)")
            assert query_seen.wait(5)
            conn.cancel_safe(timeout=10)
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                time.sleep(0.02)
            release.set()
            if case in ("verify-full", "plaintext"):
                with pytest.raises(psycopg.errors.QueryCanceled):
                    running.result(timeout=5)
            else:
                running.result(timeout=5)
        assert len(seen) == 1, seen
        sent = case in ("verify-full", "plaintext")
        first, request, inside_tls = seen[0]
        if case == "plaintext":
            assert (first, request, inside_tls) == (_CANCEL[:8], _CANCEL, False)
        else:
            assert first == messages.ssl_request(), f"the cancel began with {first!r}"
            if case == "verify-full":
                assert (request, inside_tls) == (_CANCEL, True)
            else:
                assert request == b"", "the cancel was sent anyway"
                log = proxy.log()
                assert "cannot send a cancel request to the database" in log, log[-3000:]
                reason = "not sent in plaintext" if case == "tls-declined" else "certificate"
                assert reason in log, log[-3000:]
        # The audit trail says whether the cancel reached the database, not only the log.
        cancels = proxy.audit(event="cancel", until=lambda rs: len(rs) >= (1 if sent else 2))
        assert [r.status for r in cancels] == (["forwarded"] if sent else ["forwarded", "failed"])
        if not sent:
            assert reason in cancels[1].reason, cancels[1]
    finally:
        release.set()
        stop_proxy(proxy)


# ------------------------------------------------------------------ a man in the middle


def _relay(mitm: HostileConn, pg: PgServer, leaf: LeafCert) -> None:
    """Terminate dbward's TLS with our own certificate, open TLS to the real server, and pass
    the bytes (which we can read, and could change) both ways."""
    mitm.recv_exact(8)  # SSLRequest
    mitm.send(b"S")
    assert isinstance(mitm.sock, socket.socket)
    mitm.sock = _server_context(leaf).wrap_socket(mitm.sock, server_side=True)
    upstream = socket.create_connection((pg.host, pg.port), timeout=5)
    upstream.sendall(messages.ssl_request())
    assert upstream.recv(1) == b"S"
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    tls_up = client_context.wrap_socket(upstream)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    threading.Thread(target=pump, args=(tls_up, mitm.sock), daemon=True).start()
    pump(mitm.sock, tls_up)


def test_scram_relayed_by_a_man_in_the_middle_is_refused(
    tls_server: HostileServer,
    proxy_factory: Callable[..., Proxy],
    pg_server: PgServer,
    test_ca: TestCA,
) -> None:
    """With tls.mode require (or the default prefer) the database's certificate is not checked:
    someone on the path can present his own and relay the SCRAM exchange to the real server,
    ending up holding dbward's authenticated session as the service role. SCRAM-SHA-256-PLUS
    (channel binding, what libpq uses by default) binds the proof to the TLS connection it was
    computed on, so the real server refuses the relayed one."""
    assert pg_server.ssl_mode_available, "the test PostgreSQL runs without SSL"
    leaf = test_ca.make_leaf("mitm", dns_names=["localhost"])
    tls_server.script = lambda conn: _relay(conn, pg_server, leaf)
    proxy = proxy_factory(
        upstream={"host": "127.0.0.1", "port": tls_server.port, "tls": {"mode": "require"}}
    )
    message = _login(proxy, app_name("mitm"))
    assert "channel binding" in message, message
    # Without the man in the middle the same configuration logs in with channel binding.
    direct = proxy_factory(upstream={"tls": {"mode": "require"}})
    assert _login(direct, app_name("direct")) == "ok"


def test_scram_relayed_through_a_certificate_allowing_no_binding_is_refused(
    tls_server: HostileServer,
    proxy_factory: Callable[..., Proxy],
    pg_server: PgServer,
    tmp_path: Path,
) -> None:
    """The man in the middle presents an Ed25519 certificate: there is no tls-server-end-point
    hash to bind to, and dbward fell back to plain SCRAM ('n') although the server offered
    -PLUS; the real server accepted the relayed exchange and the man in the middle held the
    logged-in session (found by the twenty-ninth review)."""
    assert pg_server.ssl_mode_available, "the test PostgreSQL runs without SSL"
    leaf = make_ed25519_leaf(tmp_path)
    tls_server.script = lambda conn: _relay(conn, pg_server, leaf)
    proxy = proxy_factory(
        upstream={"host": "127.0.0.1", "port": tls_server.port, "tls": {"mode": "require"}}
    )
    message = _login(proxy, app_name("mitm-ed25519"))
    assert "its certificate allows none" in message, message


def test_cleartext_request_over_unverified_tls_is_refused(
    tls_server: HostileServer, tmp_path: Path, test_ca: TestCA
) -> None:
    """With require, whoever is on the path can present his own certificate and ask for the
    service password in clear text (the real server uses SCRAM): it must not be sent."""
    received: list[bytes] = []
    context = _server_context(test_ca.make_leaf("phish", dns_names=["localhost"]))

    def phish(conn: HostileConn) -> None:
        conn.read_startup(tls=context, answer=b"S")
        conn.send(messages.authentication_cleartext())
        received.append(conn.read_message()[1])

    tls_server.script = phish
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "require"}})
    try:
        assert "whose certificate is not verified" in _login(proxy, app_name("phish"))
        assert received == []
    finally:
        stop_proxy(proxy)


@pytest.mark.parametrize("mode", ["disable", "require"])
def test_md5_request_from_a_server_not_known_to_be_the_database_is_refused(
    tls_server: HostileServer, tmp_path: Path, test_ca: TestCA, mode: str
) -> None:
    """Whoever is on the path (no TLS, or his own certificate with require) asks for md5 and
    relays the real server's salt: dbward's answer would log him in as the service role. It is
    not sent; the refusal is the database's (upstream_lost), as for a cleartext request."""
    received: list[bytes] = []
    context = _server_context(test_ca.make_leaf("md5", dns_names=["localhost"]))

    def phish(conn: HostileConn) -> None:
        conn.read_startup(tls=context, answer=b"S" if mode == "require" else b"N")
        conn.send(messages.authentication_md5(b"salt"))
        received.append(conn.read_message()[1])

    tls_server.script = phish
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": mode}})
    try:
        app = app_name("md5")
        message = _login(proxy, app)
        assert "asks for an md5 password hash on a connection without TLS or" in message, message
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.UPSTREAM_LOST for r in rs)
        )
        assert [r.sqlstate for r in records if r.event == AuditEvent.UPSTREAM_LOST] == ["28000"]
        assert received == []
    finally:
        stop_proxy(proxy)


def test_channel_binding_required_refuses_scram_without_it(
    tls_server: HostileServer, tmp_path: Path, test_ca: TestCA
) -> None:
    """With channel_binding require, a server over TLS offering only SCRAM-SHA-256 (the -PLUS
    offer stripped by someone relaying to a database that does not bind) gets no answer."""
    received: list[bytes] = []
    context = _server_context(test_ca.make_leaf("nobind", dns_names=["localhost"]))

    def strip(conn: HostileConn) -> None:
        conn.read_startup(tls=context, answer=b"S")
        conn.send(messages.authentication_sasl(["SCRAM-SHA-256"]))
        received.append(conn.read_message()[1])

    tls_server.script = strip
    upstream = {"tls": {"mode": "require"}, "channel_binding": "require"}
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream=upstream)
    try:
        message = _login(proxy, app_name("nobind"))
        assert "does not offer channel binding (SCRAM-SHA-256-PLUS)" in message, message
        assert received == []
    finally:
        stop_proxy(proxy)


def test_a_large_message_the_database_leaves_unfinished_ends_the_session(
    hostile: tuple[HostileServer, Proxy], tmp_path: Path
) -> None:
    """Review 25: a database that starts a large message and never finishes it held the
    session's share of max_partial_message_bytes for good. After partial_message_timeout_s
    the session ends as when the connection to the database is lost (08006)."""
    server, _ = hostile
    proxy = start_hostile_proxy(tmp_path, server, listener={"partial_message_timeout_s": 1})
    try:
        app = app_name("dribble:")
        started = time.monotonic()
        error = _query(proxy, app)
        assert 0.9 < time.monotonic() - started < 5
        assert error.sqlstate == "08006", error
        assert "the database did not finish a message in 1 s" in str(error), error
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.DISCONNECT for r in rs)
        )
        lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
        assert [(r.sqlstate, r.reason) for r in lost] == [
            ("08006", "dbward: the database did not finish a message in 1 s")
        ]
        assert [r.status for r in records if is_outcome(r)] == ["unknown"], records
        assert not server.errors
    finally:
        stop_proxy(proxy)


@pytest.mark.parametrize("answer", [b"", b"S"], ids=["silent", "tls-handshake-stalls"])
def test_database_that_never_answers_is_reported_as_such(
    tls_server: HostileServer, tmp_path: Path, answer: bytes
) -> None:
    """connect_timeout_s covers the whole login (TCP accepted, then silence; or 'S' and no
    handshake); the client is told the database did not answer, and the audit says so — not
    'authentication timed out', which blames the client."""
    release = threading.Event()

    def stall(conn: HostileConn) -> None:
        conn.recv_exact(8)
        conn.send(answer)
        release.wait(10)

    tls_server.script = stall
    upstream = {"connect_timeout_s": 1, "tls": {"mode": "require"}}
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream=upstream)
    try:
        app = app_name("stall")
        started = time.monotonic()
        message = _login(proxy, app)
        assert time.monotonic() - started < 5
        assert "the database did not complete the login within 1 s" in message, message
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.UPSTREAM_LOST for r in rs)
        )
        lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
        assert [r.sqlstate for r in lost] == ["08001"], records
    finally:
        release.set()
        stop_proxy(proxy)


def test_the_database_login_has_its_own_timeout_not_the_clients(
    tls_server: HostileServer, tmp_path: Path
) -> None:
    """auth_timeout_s bounds the client's startup and authentication; the login to the database
    after it has connect_timeout_s (configuration.md). With connect_timeout_s the longer, a
    database that never answered was reported as 'authentication timed out' (08006, blaming
    the client, no audit record) once auth_timeout_s ran out."""
    release = threading.Event()

    def stall(conn: HostileConn) -> None:
        conn.recv_exact(8)
        release.wait(10)

    tls_server.script = stall
    upstream = {"connect_timeout_s": 3, "tls": {"mode": "require"}}
    proxy = start_hostile_proxy(
        tmp_path, tls_server, listener={"auth_timeout_s": 1.5}, upstream=upstream
    )
    try:
        app = app_name("slow-db")
        message = _login(proxy, app)
        assert "the database did not complete the login within 3 s" in message, message
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.UPSTREAM_LOST for r in rs)
        )
        assert [r.sqlstate for r in records if r.event == AuditEvent.UPSTREAM_LOST] == ["08001"]
    finally:
        release.set()
        stop_proxy(proxy)


# ------------------------------------------------------------------ the copy probe

_COPY_IN_RESPONSE = _frame(b"G", b"\x00\x00\x01\x00\x00")  # text, one column
_CLOSE_COMPLETE = _frame(b"3", b"")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # A transaction status PostgreSQL never sends: it was re-encoded for the client, and
        # ready_for_query's ValueError escaped the upstream callback (a traceback in the log).
        (_frame(b"Z", b"X") + _READY + _CLOSE_COMPLETE + _READY, [b"G", b"E", b"Z", b"E"]),
        # More ReadyForQuery than Syncs were sent: refused as soon as one is one too many, not
        # kept (the session waited, holding every one, for a CloseComplete that never came).
        # The second could still answer the client's Sync sent into the copy: it goes on.
        (_READY * 3, [b"G", b"E", b"Z", b"Z", b"E"]),
    ],
    ids=["bad-status", "too-many"],
)
def test_a_database_answering_the_copy_probe_wrongly_ends_the_session_cleanly(
    tls_server: HostileServer, tmp_path: Path, answer: bytes, expected: list[bytes]
) -> None:
    """After a failed COPY FROM STDIN with a Sync sent into it, dbward sends its probe (Sync,
    Close, Sync); the database's answer to it is checked like any other message."""
    probe: list[bytes] = []

    def script(conn: HostileConn) -> None:
        conn.login()
        conn.read_message()  # the COPY
        conn.send(_COPY_IN_RESPONSE)
        assert conn.read_message()[0] == b"S"  # the Sync sent into the copy
        conn.send(messages.error_response("ERROR", "P0001", "no copies"), _READY)
        while not probe or probe[-2:-1] != [b"C"]:  # up to the probe's Close and last Sync
            probe.append(conn.read_message()[0])
        conn.send(answer)
        conn.idle_until_closed()

    tls_server.script = script
    proxy = start_hostile_proxy(tmp_path, tls_server)
    try:
        app = app_name("probe")
        session = RawSession(proxy, app)
        session.sock.sendall(messages.query("COPY t FROM STDIN") + messages.sync())
        kinds: list[bytes] = []
        while not kinds or kinds[-1] != b"E" or len(kinds) < 4:
            kinds.append(read_message(session.sock)[0])
        session.close()
        assert kinds == expected, kinds
        assert probe[-3:] == [b"S", b"C", b"S"], probe
        _assert_invalid_message_ended(proxy, app)
    finally:
        stop_proxy(proxy)


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_database_answering_a_cancel_with_a_flood_is_not_buffered(
    tls_server: HostileServer, tmp_path: Path
) -> None:
    """PostgreSQL answers a CancelRequest with nothing and closes; dbward waits for the close
    (up to 5 s). Whatever the database sent meanwhile was kept: one answering with a stream
    made dbward buffer all of it, at every cancel."""
    connections = itertools.count()
    query_seen, streamed = threading.Event(), threading.Event()

    def script(conn: HostileConn) -> None:
        if next(connections) == 0:  # the session
            conn.login()
            conn.read_message()
            query_seen.set()
            conn.idle_until_closed()
            return
        conn.recv_exact(16)
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(300):
                conn.sock.sendall(chunk)
        finally:
            streamed.set()
        conn.idle_until_closed()

    tls_server.script = script
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "disable"}})
    try:
        session = RawSession(proxy, app_name("cancel-flood"))
        session.sock.sendall(messages.query("SELECT 1"))
        assert query_seen.wait(5)
        before = _peak_rss_mb(proxy.process.pid)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.settimeout(10)
            sock.sendall(messages.cancel_request(session.pid, session.key))
            assert sock.recv(16) == b""  # dbward hangs up once the cancel is done
        session.close()
        grown = _peak_rss_mb(proxy.process.pid) - before
        assert grown < 100, f"dbward's peak memory grew by {grown:.0f} MB"
        assert "Traceback" not in proxy.log()
    finally:
        stop_proxy(proxy)


# ------------------------------------------------------------------ the database's login


_PARAMS = messages.parameter_status("server_version", "16.0") + messages.parameter_status(
    "session_authorization", "svc"
)
_LOGIN_PARAMS = _PARAMS + messages.backend_key_data(4242, b"\x00\x00\x00\x01")


@pytest.mark.parametrize(
    "answer",
    [
        # A row before the login's end: PostgreSQL sends nothing of the kind at login.
        messages.authentication_ok() + messages.data_row([b"x"]) + _READY,
        # The login's ReadyForQuery with a transaction open (or an unknown status): the client
        # would start inside a transaction dbward does not know about.
        messages.authentication_ok() + _frame(b"Z", b"T"),
        messages.authentication_ok() + _frame(b"Z", b"X"),
        # ... 500 KB of it, which the audit record and the log quoted whole.
        messages.authentication_ok() + _frame(b"Z", b"T" * 500_000),
        # A login that never says AuthenticationOk (libpq: "expected authentication request
        # from server"): whoever is on the path skips the authentication that channel binding
        # and require_auth are checked in, and dbward relayed its clients' statements to him.
        _LOGIN_PARAMS + _READY,
        _LOGIN_PARAMS + messages.authentication_ok() + _READY,
        # SCRAM begun and never finished: the server never proved it knows the password.
        messages.authentication_sasl(["SCRAM-SHA-256"]) + _LOGIN_PARAMS + _READY,
        # An authentication request after AuthenticationOk (libpq: "unexpected response").
        messages.authentication_ok() + messages.authentication_sasl(["SCRAM-SHA-256"]) + _READY,
    ],
    ids=[
        "row",
        "in-transaction",
        "unknown-status",
        "huge-status",
        "no-authentication",
        "parameters-before-authentication",
        "scram-unfinished",
        "authentication-after-ok",
    ],
)
def test_an_invalid_login_reply_is_blamed_on_the_database(
    tls_server: HostileServer, tmp_path: Path, answer: bytes
) -> None:
    """A login that ends inside a transaction, or in a state PostgreSQL never reports, was
    accepted: the client hung at its first query ("another command is already in progress").
    Like any message PostgreSQL never sends at login (the row), it is the database's fault:
    FATAL 08P01 to the client, an `upstream_lost` record, no `protocol_error`."""

    def script(conn: HostileConn) -> None:
        conn.read_startup()
        conn.send(answer)
        while True:  # a login dbward accepts: its query is answered (no hang, the test fails)
            conn.read_message()
            conn.send(messages.command_complete("SELECT 0"), _READY)

    tls_server.script = script
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "disable"}})
    try:
        app = app_name("bad-login")
        message = _login(proxy, app)
        assert "the database sent an invalid message during login" in message, message
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.DISCONNECT for r in rs)
        )
        events = [r.event for r in records]
        assert AuditEvent.PROTOCOL_ERROR not in events, records
        lost = [r for r in records if r.event == AuditEvent.UPSTREAM_LOST]
        assert [r.sqlstate for r in lost] == ["08P01"], records
        assert len(lost[0].reason) < 1000, len(lost[0].reason)
        assert not tls_server.errors
    finally:
        stop_proxy(proxy)
    assert len(proxy.log()) < 20_000


def test_a_cancel_for_a_login_without_a_cancel_key_fails_cleanly(
    tls_server: HostileServer, tmp_path: Path
) -> None:
    """A database that sends no BackendKeyData at login (PostgreSQL always does; a pooler or
    someone on the path need not): a client's cancel raised ValueError building the request,
    which ended the cancel's task; the cancelling client was never answered (its connection,
    and its unauthenticated slot, held until it gave up) and no `failed` record was written.
    It is not sent, the client is let go, and the audit says why."""
    connections = itertools.count()
    query_seen, release = threading.Event(), threading.Event()

    def script(conn: HostileConn) -> None:
        if next(connections) == 0:
            conn.read_startup()
            conn.send(messages.authentication_ok(), _PARAMS, _READY)
            conn.read_message()
            query_seen.set()
            release.wait(10)
            conn.send(messages.command_complete("SELECT 0"), _READY)
            conn.idle_until_closed()
            return
        conn.idle_until_closed()  # a cancel connection: whatever arrives is not a cancel

    tls_server.script = script
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "disable"}})
    try:
        app = app_name("no-key")
        with (
            psycopg.connect(**proxy.conninfo(), application_name=app, autocommit=True) as conn,
            ThreadPoolExecutor(1) as pool,
        ):
            running = pool.submit(conn.execute, "select pg_sleep(30)")
            assert query_seen.wait(5)
            conn.cancel_safe(timeout=10)
            cancels = proxy.audit(event="cancel", until=lambda rs: len(rs) >= 2)
            release.set()
            running.result(timeout=5)
        assert [r.status for r in cancels] == ["forwarded", "failed"], cancels
        assert "no cancel key" in cancels[1].reason, cancels[1]
        log = proxy.log()
        assert "Traceback" not in log and "exception" not in log.lower(), log[-3000:]
    finally:
        release.set()
        stop_proxy(proxy)


# ------------------------------------------------------------------ replies to nothing sent

_QUERY = messages.query("SELECT 1")
_PARSE = messages.parse_message("", "SELECT 1")
_COMPLETE = messages.command_complete("SELECT 1")
_IDLE = _COMPLETE + _READY  # the Query answered: nothing is in flight after it
_ERROR = messages.error_response("ERROR", "42P01", "relation does not exist")
_COPY_OUT_RESPONSE = _frame(b"H", b"\x00\x00\x01\x00\x00")  # text, one column
# A whole COPY TO STDOUT of one row, as PostgreSQL answers one.
_COPY_OUT = (
    _COPY_OUT_RESPONSE
    + messages.copy_data(b"1\n")
    + messages.copy_done()
    + messages.command_complete("COPY 1")
)
_EXECUTE_SELECT = (
    _PARSE + messages.bind_message("", "", []) + messages.execute_message("") + messages.sync()
)
_ROW = messages.data_row([b"1"])
_COPY_DATA = messages.copy_data(b"1\n")
_COPY_TO = messages.query("COPY (SELECT 1) TO STDOUT")


@pytest.mark.parametrize(
    ("request_", "answer", "before"),
    [
        # A ReadyForQuery with no Query or Sync in flight: it would answer the client's next
        # Query before PostgreSQL had, and end dbward's view of an open transaction block.
        (_QUERY, _COMPLETE + _READY + _READY, [b"C", b"Z"]),
        (_PARSE + messages.flush(), _frame(b"1", b"") + _READY, [b"1"]),
        # A CommandComplete with nothing in flight: a command the client never sent.
        (_QUERY, _COMPLETE + _READY + _COMPLETE, [b"C", b"Z"]),
        # A CopyInResponse nobody asked for: the client would send copy data (psql the rest of
        # its input) that dbward passed on as outside a copy.
        (_QUERY, _COPY_IN_RESPONSE, []),
        # CopyBothResponse (replication) and FunctionCallResponse: dbward lets neither start.
        (_QUERY, _frame(b"W", b"\x00\x00\x00"), []),
        (_QUERY, _frame(b"V", b"\xff\xff\xff\xff") + _READY, []),
        # A message that has no body, with one (libpq: "message contents do not agree with
        # length").
        (_PARSE + messages.sync(), _frame(b"1", b"\x00\x00") + _READY, []),
        # A notification whose payload string has no terminator (libpq reads on into the next
        # message).
        (_QUERY, _frame(b"A", b"\x00\x00\x00\x01chan\x00x") + _COMPLETE + _READY, []),
        # Notices malformed as the notification is (libpq: "lost synchronization with
        # server"): a field with no terminator, no final terminator, an empty field type
        # before the end; one arriving while idle is checked the same.
        (_QUERY, _COMPLETE + _frame(b"N", b"SNOTICE\0C00000\0Mhi") + _READY, [b"C"]),
        (_QUERY, _COMPLETE + _frame(b"N", b"SNOTICE\0C00000\0Mhi\0") + _READY, [b"C"]),
        (_QUERY, _frame(b"N", b"SNOTICE\0\0Mhi\0\0") + _IDLE, []),
        (_QUERY, _IDLE + _frame(b"N", b""), [b"C", b"Z"]),
        # A COPY TO STDOUT nobody asked for (no Query or Execute first in line), and the end
        # of one: the client would take the copy for its next command's answer.
        (_QUERY, _IDLE + _COPY_OUT_RESPONSE, [b"C", b"Z"]),
        (_PARSE + messages.flush(), _COPY_OUT_RESPONSE, []),
        (_QUERY, _IDLE + _frame(b"c", b""), [b"C", b"Z"]),
        # A CopyOutResponse answering a statement that is not a COPY TO STDOUT: a SELECT in
        # simple and extended protocol, the SELECT before or after a COPY TO STDOUT (or both
        # SELECTs) of a multi-statement Query. The client would take copy data for its rows.
        (_QUERY, _COPY_OUT_RESPONSE, []),
        (_EXECUTE_SELECT, _frame(b"1", b"") + _frame(b"2", b"") + _COPY_OUT_RESPONSE, [b"1", b"2"]),
        (messages.query("SELECT 1; SELECT 2"), _COMPLETE + _COPY_OUT_RESPONSE, [b"C"]),
        (messages.query("SELECT 1; COPY (SELECT 2) TO STDOUT"), _COPY_OUT_RESPONSE, []),
        (
            messages.query("COPY (SELECT 1) TO STDOUT; SELECT 2"),
            _COPY_OUT + _COPY_OUT_RESPONSE,
            [b"H", b"d", b"c", b"C"],
        ),
        # Describe's replies with no Describe first in line (a RowDescription also answers a
        # Query: refused only with nothing in flight).
        (_QUERY, _frame(b"t", b"\x00\x00") + _IDLE, []),
        (_QUERY, _frame(b"n", b"") + _IDLE, []),
        (_QUERY, _IDLE + _ROW_DESCRIPTION, [b"C", b"Z"]),
        # A RowDescription answering neither a Describe nor a statement of the Query first in
        # line: a Parse's or an Execute's (which gets none: its Describe's came before), one
        # after the Query's statements, or after the error that ended them, one amid a COPY
        # TO STDOUT. The client would start a result where none is.
        (_PARSE + messages.flush(), _ROW_DESCRIPTION, []),
        (_EXECUTE_SELECT, _frame(b"1", b"") + _frame(b"2", b"") + _ROW_DESCRIPTION, [b"1", b"2"]),
        (_QUERY, _COMPLETE + _ROW_DESCRIPTION + _READY, [b"C"]),
        (_QUERY, _ERROR + _ROW_DESCRIPTION + _READY, [b"E"]),
        (_COPY_TO, _COPY_OUT_RESPONSE + _COPY_DATA + _ROW_DESCRIPTION, [b"H", b"d"]),
        # Replies to Parse, Bind, Close and Execute with nothing in flight.
        (_QUERY, _IDLE + _frame(b"1", b""), [b"C", b"Z"]),
        (_QUERY, _IDLE + _frame(b"2", b""), [b"C", b"Z"]),
        (_QUERY, _IDLE + _CLOSE_COMPLETE, [b"C", b"Z"]),
        (_QUERY, _IDLE + _frame(b"s", b""), [b"C", b"Z"]),
        (_QUERY, _IDLE + _frame(b"I", b""), [b"C", b"Z"]),
        # Rows no request is owed: with nothing in flight; a Query's before its RowDescription,
        # after its CommandComplete or after its error; for a Parse, Bind or Describe first in
        # line, or the Sync after the Execute (whose own rows come with no RowDescription);
        # among a COPY TO STDOUT's data. The client would take them for the answer to another
        # request, or to its next command.
        (_QUERY, _IDLE + _ROW, [b"C", b"Z"]),
        (_QUERY, _ROW + _IDLE, []),
        (_QUERY, _ROW_DESCRIPTION + _ROW + _COMPLETE + _ROW + _READY, [b"T", b"D", b"C"]),
        (
            messages.query("SELECT 1; SELECT 2"),
            _ROW_DESCRIPTION + _ROW + _ERROR + _ROW + _READY,
            [b"T", b"D", b"E"],
        ),
        (_PARSE + messages.flush(), _ROW, []),
        (_EXECUTE_SELECT, _frame(b"1", b"") + _ROW, [b"1"]),
        (
            _PARSE + messages.describe_message("S", "") + messages.flush(),
            _frame(b"1", b"") + _ROW,
            [b"1"],
        ),
        (
            _EXECUTE_SELECT,
            _frame(b"1", b"") + _frame(b"2", b"") + _ROW + _ROW + _COMPLETE + _ROW + _READY,
            [b"1", b"2", b"D", b"D", b"C"],
        ),
        (_COPY_TO, _COPY_OUT_RESPONSE + _COPY_DATA + _ROW, [b"H", b"d"]),
        # Copy data, and the end of a copy, with no COPY TO STDOUT going on: while idle, as a
        # SELECT's answer (after its rows), after the copy's CopyDone, during a COPY FROM STDIN
        # (the client copying in would take it for the end of its copy).
        (_QUERY, _IDLE + _COPY_DATA, [b"C", b"Z"]),
        (_QUERY, _ROW_DESCRIPTION + _ROW + _COPY_DATA, [b"T", b"D"]),
        (_EXECUTE_SELECT, _frame(b"1", b"") + _frame(b"2", b"") + _COPY_DATA, [b"1", b"2"]),
        (
            _COPY_TO,
            _COPY_OUT_RESPONSE + _COPY_DATA + messages.copy_done() + _COPY_DATA,
            [b"H", b"d", b"c"],
        ),
        (_QUERY, _frame(b"c", b"") + _IDLE, []),
        (
            _EXECUTE_SELECT,
            _frame(b"1", b"") + _frame(b"2", b"") + _ROW + _frame(b"c", b""),
            [b"1", b"2", b"D"],
        ),
        (
            _COPY_TO,
            _COPY_OUT_RESPONSE + _COPY_DATA + messages.copy_done() + messages.copy_done(),
            [b"H", b"d", b"c"],
        ),
        (messages.query("COPY t FROM STDIN"), _COPY_IN_RESPONSE + _frame(b"c", b""), [b"G"]),
        # ... and with something else first in line: a BindComplete taken for the Parse's
        # answer (dbward held the statement prepared), a Query's replies taken for a Parse's.
        (_PARSE + messages.flush(), _frame(b"2", b""), []),
        (_QUERY, _frame(b"1", b"") + _IDLE, []),
        (_PARSE + messages.flush(), _COMPLETE, []),
        (_PARSE + messages.flush(), _frame(b"I", b""), []),
        (_QUERY, _frame(b"s", b"") + _IDLE, []),
        # More CommandCompletes than the Query has statements, one after the error that ended
        # the Query (PostgreSQL runs none of its statements after it), an EmptyQueryResponse
        # after the statements (it answers only an empty query string): the client would take
        # it for the answer to its next command, and dbward record it for a statement that
        # did not run.
        (_QUERY, _COMPLETE + _COMPLETE + _READY, [b"C"]),
        (messages.query("SELECT 1; SELECT 2"), _COMPLETE * 3 + _READY, [b"C", b"C"]),
        (messages.query("SELECT 1; SELECT 2"), _ERROR + _COMPLETE + _READY, [b"E"]),
        (_QUERY, _ERROR + _COMPLETE + _READY, [b"E"]),
        (_QUERY, _COMPLETE + _frame(b"I", b"") + _READY, [b"C"]),
        (messages.query("SELECT 1; SELECT 2"), _ERROR + _frame(b"I", b"") + _READY, [b"E"]),
        (messages.query(""), _frame(b"I", b"") + _frame(b"I", b"") + _READY, [b"I"]),
        (messages.query(""), _COMPLETE + _READY, []),
    ],
    ids=[
        "ready-while-idle",
        "ready-after-flush",
        "complete-while-idle",
        "copy-in-unasked",
        "copy-both",
        "function-call-response",
        "parse-complete-with-body",
        "notification-unterminated",
        "notice-unterminated",
        "notice-without-end",
        "notice-empty-field-type",
        "notice-empty-while-idle",
        "copy-out-while-idle",
        "copy-out-to-a-parse",
        "copy-done-while-idle",
        "copy-out-to-a-select",
        "copy-out-to-an-execute",
        "copy-out-to-a-second-select",
        "copy-out-to-the-select-before-a-copy",
        "copy-out-to-the-select-after-a-copy",
        "parameter-description-unasked",
        "no-data-unasked",
        "row-description-while-idle",
        "row-description-for-a-parse",
        "row-description-for-an-execute",
        "row-description-after-the-statements",
        "row-description-after-the-error",
        "row-description-amid-copy-data",
        "parse-complete-while-idle",
        "bind-complete-while-idle",
        "close-complete-while-idle",
        "portal-suspended-while-idle",
        "empty-query-while-idle",
        "row-while-idle",
        "row-before-row-description",
        "row-after-complete",
        "row-after-the-error-ending-a-query",
        "row-for-a-parse",
        "row-for-a-bind",
        "row-for-a-describe",
        "row-for-the-sync-after-an-execute",
        "row-amid-copy-data",
        "copy-data-while-idle",
        "copy-data-amid-rows",
        "copy-data-for-an-execute",
        "copy-data-after-copy-done",
        "copy-done-for-a-select",
        "copy-done-for-an-execute",
        "second-copy-done",
        "copy-done-during-copy-in",
        "bind-complete-for-a-parse",
        "parse-complete-for-a-query",
        "complete-for-a-parse",
        "empty-query-for-a-parse",
        "portal-suspended-for-a-query",
        "second-complete-for-one-statement",
        "third-complete-for-two-statements",
        "complete-after-the-error-ending-a-query",
        "complete-after-the-error-of-its-only-statement",
        "empty-query-after-the-statements",
        "empty-query-after-the-error-ending-a-query",
        "second-empty-query-for-an-empty-query",
        "complete-for-an-empty-query",
    ],
)
def test_a_reply_postgresql_never_sends_ends_the_session(
    tls_server: HostileServer, tmp_path: Path, request_: bytes, answer: bytes, before: list[bytes]
) -> None:
    """Replies to nothing the client sent, or malformed for their type, were forwarded: the
    client (and dbward's tracking of what it owes) lost step with PostgreSQL. They end the
    session as any invalid message from the database: what came before goes on, then FATAL.
    The next session is served as usual."""

    def script(conn: HostileConn) -> None:
        conn.login()
        conn.read_message()
        conn.send(_IDLE if b"still-served" in conn.startup else answer)
        conn.idle_until_closed()

    tls_server.script = script
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "disable"}})
    try:
        app = app_name("never-sent")
        session = RawSession(proxy, app)
        session.sock.settimeout(2)
        session.sock.sendall(request_)
        kinds: list[bytes] = []
        payload = b""
        try:
            # Up to dbward's FATAL (an ERROR from the database before it is forwarded).
            while not kinds or kinds[-1] != b"E" or b"SFATAL\x00" not in payload:
                kind, payload = read_message(session.sock)
                kinds.append(kind)
        except (TimeoutError, ConnectionError):
            pass
        session.close()
        assert kinds == [*before, b"E"], kinds
        fields = messages.parse_error_fields(payload)
        assert (fields["S"], fields["C"]) == ("FATAL", "08006"), fields
        assert "the database sent an invalid message" in fields["M"], fields
        _assert_invalid_message_ended(proxy, app)
        served = RawSession(proxy, app_name("still-served"))
        assert [kind for kind, _ in served.send(_QUERY)] == [b"C", b"Z"]
        served.close()
        assert not tls_server.errors
    finally:
        stop_proxy(proxy)


def test_a_complete_after_the_error_ending_a_query_is_recorded_for_no_statement(
    tls_server: HostileServer, tmp_path: Path
) -> None:
    """PostgreSQL runs none of a Query's statements after the first error: a CommandComplete
    then was forwarded and recorded as the next statement's outcome (`ok` for a statement that
    never ran). It ends the session; the statement after the error is not recorded `ok`."""

    def script(conn: HostileConn) -> None:
        conn.login()
        conn.read_message()
        conn.send(_ERROR + _COMPLETE + _READY)
        conn.idle_until_closed()

    tls_server.script = script
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "disable"}})
    try:
        app = app_name("complete-after-error")
        session = RawSession(proxy, app)
        session.sock.settimeout(2)
        session.sock.sendall(messages.query("SELECT 1; SELECT 2"))
        kinds: list[bytes] = []
        try:
            while True:
                kind, _ = read_message(session.sock)
                kinds.append(kind)
        except (TimeoutError, ConnectionError):
            pass
        session.close()
        records = proxy.session_records(
            app, until=lambda rs: any(r.event == AuditEvent.DISCONNECT for r in rs)
        )
        outcomes = [r.status for r in records if r.event == AuditEvent.STATEMENT and r.status]
        assert outcomes[0] == "error", outcomes
        assert len(outcomes) == 2 and outcomes[1] != "ok", outcomes
        assert kinds == [b"E", b"E"], kinds
        _assert_invalid_message_ended(proxy, app)
        assert not tls_server.errors
    finally:
        stop_proxy(proxy)


def test_rows_are_checked_once_per_run_across_reads(
    tls_server: HostileServer, tmp_path: Path
) -> None:
    """dbward looks only at the first DataRow of a run (rows with no other message between);
    a run goes on across reads and rows split between them. A result sent in pieces (a row cut
    in its header and in its body, a notice among the rows) is relayed whole. A row owed to
    nobody, arriving in a read of its own with its header apart from its body, is refused
    before any of it reaches the client."""
    rows = [messages.data_row([b"%d" % i]) for i in range(300)]
    notice = messages.notice_response("NOTICE", "00000", "half way")
    result = _ROW_DESCRIPTION + b"".join(rows[:150]) + notice + b"".join(rows[150:])
    first_row = len(_ROW_DESCRIPTION)
    cuts = [first_row + 3, first_row + 500, first_row + 502, len(result) - 7]
    stray = messages.data_row([b"stray"])

    def script(conn: HostileConn) -> None:
        conn.login()
        assert isinstance(conn.sock, socket.socket)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.read_message()
        for start, end in itertools.pairwise([0, *cuts, len(result)]):
            conn.send(result[start:end])
            time.sleep(0.05)
        conn.send(messages.command_complete("SELECT 300"), _READY)
        conn.read_message()
        conn.send(_IDLE)
        for piece in (stray[:3], stray[3:]):
            time.sleep(0.05)
            conn.send(piece)
        conn.idle_until_closed()

    tls_server.script = script
    proxy = start_hostile_proxy(tmp_path, tls_server, upstream={"tls": {"mode": "disable"}})
    try:
        app = app_name("rows-over-reads")
        session = RawSession(proxy, app)
        replies = session.send(_QUERY)
        assert b"".join(_frame(kind, payload) for kind, payload in replies[:-2]) == result
        assert [kind for kind, _ in replies[-2:]] == [b"C", b"Z"]
        session.sock.settimeout(2)
        session.sock.sendall(_QUERY)
        kinds: list[bytes] = []
        payload = b""
        try:
            while not kinds or kinds[-1] != b"E":
                kind, payload = read_message(session.sock)
                kinds.append(kind)
        except (TimeoutError, ConnectionError):
            pass
        session.close()
        assert kinds == [b"C", b"Z", b"E"], kinds
        fields = messages.parse_error_fields(payload)
        assert (fields["S"], fields["C"]) == ("FATAL", "08006"), fields
        _assert_invalid_message_ended(proxy, app)
        assert not tls_server.errors
    finally:
        stop_proxy(proxy)
