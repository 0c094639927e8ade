"""TLS on both sides of dbward, and the upstream authentication methods, with real clients."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.wire.postgres import messages
from fixtures.postgres import PgServer
from fixtures.proxy import USERS, Proxy
from fixtures.tls import TestCA, make_test_ca


def _app(tag: str) -> str:
    return f"tls-{tag}-{uuid.uuid4().hex[:8]}"


def _session(proxy: Proxy, app: str, event: AuditEvent) -> list[AuditRecord]:
    """This app's session records, once one of them is `event`."""
    proxy.audit(until=lambda rs: any(r.application_name == app and r.event == event for r in rs))
    return proxy.session_records(app)


def _events(records: list[AuditRecord]) -> list[str]:
    return [str(r.event) for r in records]


def _connect(proxy: Proxy, app: str, **params: Any) -> psycopg.Connection[Any]:
    info = {**proxy.conninfo(), "application_name": app, "connect_timeout": 10, **params}
    return psycopg.connect(**info)


def _upstream_ssl(conn: psycopg.Connection[Any]) -> tuple[str, bool]:
    """The upstream role and whether the upstream backend's own connection uses TLS."""
    row = conn.execute(
        "SELECT current_user, coalesce("
        "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def _client_tls(test_ca: TestCA, mode: str) -> dict[str, Any]:
    return {
        "mode": mode,
        "cert_file": str(test_ca.server_cert),
        "key_file": str(test_ca.server_key),
    }


def _require_pg_ssl(pg_server: PgServer) -> None:
    if not pg_server.ssl_mode_available:
        pytest.fail("the test PostgreSQL runs without SSL; upstream TLS cannot be tested")


def _ssl_role_upstream(
    tmp_path: Path, pg_server: PgServer, tls: dict[str, str], **extra: str
) -> dict[str, object]:
    """Upstream settings for the role pg_hba only admits over TLS."""
    path = tmp_path / "ssl-user-password"
    path.write_text(pg_server.ssl_password)
    path.chmod(0o600)
    return {"user": pg_server.ssl_user, "password_file": str(path), "tls": tls, **extra}


# ------------------------------------------------------------------ client side


def test_client_tls_required_verify_full(tls_proxy: Proxy, test_ca: TestCA) -> None:
    app = _app("req")
    verify = {"host": "localhost", "sslmode": "verify-full", "sslrootcert": str(test_ca.ca_cert)}
    with _connect(tls_proxy, app, **verify) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    records = _session(tls_proxy, app, AuditEvent.DISCONNECT)
    assert _events(records)[:2] == ["connect", "auth_ok"]
    assert records[1].identity == "alice"

    # psql too, verifying the proxy's certificate against the test CA.
    assert _psql_verify_full(tls_proxy, test_ca, f"{app}-psql", "SELECT 'over tls'") == "over tls"


def test_client_tls_required_refuses_plaintext(tls_proxy: Proxy) -> None:
    app = _app("plain")
    since = int(time.time() * 1000)
    with pytest.raises(psycopg.OperationalError) as caught:
        _connect(tls_proxy, app, sslmode="disable")
    message = str(caught.value)
    assert "FATAL" in message and "requires TLS" in message, message
    # The refusal comes before the startup parameters are read, so find it by time.
    records = tls_proxy.audit(
        since_ms=since, until=lambda rs: any(r.event == AuditEvent.PROTOCOL_ERROR for r in rs)
    )
    refusals = [r for r in records if r.event == AuditEvent.PROTOCOL_ERROR]
    assert refusals, records
    assert {r.sqlstate for r in refusals} == {"28000"}
    assert all("requires TLS" in r.reason for r in refusals)
    # The password was never asked for, so nothing was authenticated.
    assert not any(r.event in (AuditEvent.AUTH_OK, AuditEvent.AUTH_FAIL) for r in records)
    # The proxy still serves TLS clients.
    with _connect(tls_proxy, _app("after"), sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use


def test_client_tls_wrong_ca_fails_verification(
    tls_proxy: Proxy, test_ca: TestCA, tmp_path: Path
) -> None:
    other = make_test_ca(tmp_path / "other-ca", common_name="some other CA")
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        _connect(
            tls_proxy,
            _app("badca"),
            host="localhost",
            sslmode="verify-full",
            sslrootcert=str(other.ca_cert),
        )
    assert tls_proxy.process.poll() is None
    with _connect(tls_proxy, _app("ok"), sslmode="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_tls_optional_accepts_both(
    proxy_factory: Callable[..., Proxy], test_ca: TestCA
) -> None:
    tls_proxy = proxy_factory(tls=_client_tls(test_ca, "optional"))
    app_tls, app_plain = _app("opt-tls"), _app("opt-plain")
    with _connect(tls_proxy, app_tls, sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with _connect(tls_proxy, app_plain, sslmode="disable") as conn:
        assert not conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 2").fetchone() == (2,)
    for app in (app_tls, app_plain):
        records = _session(tls_proxy, app, AuditEvent.DISCONNECT)
        assert _events(records)[:2] == ["connect", "auth_ok"]


def test_client_tls_disabled_declines_sslrequest(proxy: Proxy) -> None:
    # The module proxy has TLS disabled: sslmode=require must fail rather than go plaintext.
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        _connect(proxy, _app("nossl"), sslmode="require")
    with _connect(proxy, _app("prefer"), sslmode="prefer") as conn:
        assert not conn.info.pgconn.ssl_in_use


# ------------------------------------------------------------------ upstream side


def test_upstream_tls_verify_full(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, test_ca: TestCA, tmp_path: Path
) -> None:
    _require_pg_ssl(pg_server)
    up = proxy_factory(
        upstream=_ssl_role_upstream(
            tmp_path,
            pg_server,
            {"mode": "verify-full", "ca_file": str(test_ca.ca_cert)},
            host="localhost",
        )
    )
    app = _app("up-vf")
    with _connect(up, app, sslmode="disable") as conn:
        # The client leg is plaintext; the upstream leg is TLS (pg_hba rejects this role without).
        assert not conn.info.pgconn.ssl_in_use
        assert _upstream_ssl(conn) == (pg_server.ssl_user, True)
    records = _session(up, app, AuditEvent.DISCONNECT)
    assert _events(records)[:2] == ["connect", "auth_ok"]
    assert not any(r.event == AuditEvent.UPSTREAM_LOST for r in records)


def test_upstream_tls_disable_with_ssl_only_role_fails_cleanly(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, tmp_path: Path
) -> None:
    _require_pg_ssl(pg_server)
    up = proxy_factory(upstream=_ssl_role_upstream(tmp_path, pg_server, {"mode": "disable"}))
    app = _app("up-dis")
    with pytest.raises(psycopg.OperationalError) as caught:
        _connect(up, app)
    message = str(caught.value)
    assert "FATAL" in message and "pg_hba.conf rejects connection" in message, message
    records = _session(up, app, AuditEvent.UPSTREAM_LOST)
    # The client authenticated to dbward; the database then refused dbward's service login.
    assert _events(records)[:2] == ["connect", "auth_ok"]
    lost = next(r for r in records if r.event == AuditEvent.UPSTREAM_LOST)
    assert lost.identity == "alice" and lost.sqlstate == "28000"
    assert up.process.poll() is None


def test_upstream_tls_require(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, tmp_path: Path
) -> None:
    _require_pg_ssl(pg_server)
    up = proxy_factory(upstream=_ssl_role_upstream(tmp_path, pg_server, {"mode": "require"}))
    app = _app("up-req")
    with _connect(up, app) as conn:
        assert _upstream_ssl(conn) == (pg_server.ssl_user, True)
    assert _events(_session(up, app, AuditEvent.DISCONNECT))[:2] == ["connect", "auth_ok"]


def test_upstream_tls_prefer_default_uses_tls(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    _require_pg_ssl(pg_server)
    up = proxy_factory(upstream={"tls": {"mode": "prefer"}})
    with _connect(up, _app("up-prefer")) as conn:
        assert _upstream_ssl(conn) == (pg_server.service_user, True)


def test_upstream_tls_verify_full_wrong_ca_fails_cleanly(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, tmp_path: Path
) -> None:
    _require_pg_ssl(pg_server)
    other = make_test_ca(tmp_path / "wrong-ca", common_name="not the database's CA")
    up = proxy_factory(
        upstream={
            "tls": {"mode": "verify-full", "ca_file": str(other.ca_cert)},
            "host": "localhost",
        }
    )
    app = _app("up-badca")
    with pytest.raises(psycopg.OperationalError) as caught:
        _connect(up, app)
    message = str(caught.value)
    assert "FATAL" in message and "could not connect to the database" in message, message
    records = _session(up, app, AuditEvent.UPSTREAM_LOST)
    lost = next(r for r in records if r.event == AuditEvent.UPSTREAM_LOST)
    assert lost.identity == "alice" and lost.sqlstate == "08001"
    assert "certificate" in lost.reason.lower(), lost.reason
    # The log names where it tried (nineteenth review: it did not say which database).
    assert f"cannot reach the database at localhost:{pg_server.port}" in up.log(), up.log()
    # The proxy keeps running and keeps refusing cleanly.
    assert up.process.poll() is None
    with pytest.raises(psycopg.OperationalError, match="could not connect to the database"):
        _connect(up, _app("up-badca2"))


# ------------------------------------------------------------------ upstream auth methods


def _refused_upstream_login(proxy: Proxy, app: str) -> tuple[str, AuditRecord]:
    """The FATAL the client got, and the upstream_lost record of its session."""
    with pytest.raises(psycopg.OperationalError) as caught:
        _connect(proxy, app)
    records = _session(proxy, app, AuditEvent.UPSTREAM_LOST)
    # The client authenticated to dbward; dbward then refused to complete its service login.
    assert _events(records)[:2] == ["connect", "auth_ok"]
    lost = next(r for r in records if r.event == AuditEvent.UPSTREAM_LOST)
    assert lost.identity == "alice" and lost.sqlstate == "28000", lost
    assert "upstream refused" in proxy.log()
    return str(caught.value), lost


@pytest.mark.parametrize("case", ["prefer", "disable", "verify-full", "require_auth-md5"])
def test_upstream_md5_only_where_it_cannot_be_relayed(
    proxy_factory: Callable[..., Proxy],
    pg_server: PgServer,
    tmp_path: Path,
    test_ca: TestCA,
    case: str,
) -> None:
    """A role PostgreSQL authenticates with md5 (pg_hba md5, stored as an md5 hash). Someone on
    the path (his own certificate with prefer/require, TLS stripped, or no TLS) can relay the
    database's salt and dbward's answer and keep the logged-in session, or attack the hash
    offline: as a cleartext password, the answer goes only over verify-full TLS (or a unix
    socket), unless upstream.require_auth lists md5."""
    _require_pg_ssl(pg_server)
    password_file = tmp_path / "md5-password"
    password_file.write_text(pg_server.md5_password + "\n")  # a trailing newline is tolerated
    upstream: dict[str, Any] = {"user": pg_server.md5_user, "password_file": str(password_file)}
    if case == "verify-full":
        upstream |= {
            "host": "localhost",
            "tls": {"mode": "verify-full", "ca_file": str(test_ca.ca_cert)},
        }
    elif case == "require_auth-md5":
        upstream |= {"tls": {"mode": "prefer"}, "require_auth": ["scram-sha-256", "md5"]}
    else:
        upstream |= {"tls": {"mode": case}}
    up = proxy_factory(upstream=upstream)
    app = _app("md5")
    if case in ("prefer", "disable"):
        message, lost = _refused_upstream_login(up, app)
        assert "asks for an md5 password hash on a connection without TLS or" in message, message
        assert "md5 password hash" in lost.reason, lost
        return
    with _connect(up, app) as conn:
        assert _upstream_ssl(conn) == (pg_server.md5_user, True)
    assert _events(_session(up, app, AuditEvent.DISCONNECT))[:2] == ["connect", "auth_ok"]


@pytest.mark.parametrize("case", ["md5-not-listed", "trust-not-listed", "binding-trust"])
def test_upstream_login_without_the_required_method_is_refused(
    proxy_factory: Callable[..., Proxy],
    pg_server: PgServer,
    tmp_path: Path,
    test_ca: TestCA,
    case: str,
) -> None:
    """upstream.require_auth and upstream.channel_binding, as libpq's: a database asking for
    another method (or none) is refused, and the client told why, as for any refused login."""
    _require_pg_ssl(pg_server)
    password_file = tmp_path / "md5-password"
    password_file.write_text(pg_server.md5_password)
    verify = {"mode": "verify-full", "ca_file": str(test_ca.ca_cert)}
    if case == "md5-not-listed":
        upstream: dict[str, Any] = {
            "user": pg_server.md5_user,
            "password_file": str(password_file),
            "host": "localhost",
            "tls": verify,
            "require_auth": ["scram-sha-256"],
        }
        expected = "asks for an md5 password hash (md5), but upstream.require_auth allows only"
    elif case == "trust-not-listed":
        upstream = {"user": pg_server.trust_user, "password_file": None}
        upstream |= {"require_auth": "scram-sha-256,password"}
        expected = "without authentication, but upstream.require_auth allows only"
    else:
        upstream = {"user": pg_server.trust_user, "password_file": None, "tls": verify}
        upstream |= {"host": "localhost", "channel_binding": "require"}
        expected = "without authentication, so without channel binding"
    up = proxy_factory(upstream=upstream)
    message, lost = _refused_upstream_login(up, _app("reqauth"))
    assert expected in message and expected in lost.reason, (message, lost)


def test_upstream_channel_binding_required(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, tmp_path: Path
) -> None:
    """channel_binding require with tls.mode require: SCRAM-SHA-256-PLUS, so logged in."""
    _require_pg_ssl(pg_server)
    up = proxy_factory(
        upstream=_ssl_role_upstream(
            tmp_path,
            pg_server,
            {"mode": "require"},
            channel_binding="require",
            require_auth="scram-sha-256",
        )
    )
    with _connect(up, _app("cb-req")) as conn:
        assert _upstream_ssl(conn) == (pg_server.ssl_user, True)


def test_upstream_cleartext_password_is_sent_only_over_tls(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, tmp_path: Path, test_ca: TestCA
) -> None:
    """A server asking for the password in clear text gets it only over TLS whose certificate
    is verified: with require, a man in the middle presenting his own certificate could ask."""
    password_file = tmp_path / "plain-password"
    password_file.write_text(pg_server.plain_password)
    upstream = {"user": pg_server.plain_user, "password_file": str(password_file)}
    plain = proxy_factory(upstream={**upstream, "tls": {"mode": "disable"}})
    with pytest.raises(psycopg.OperationalError, match="in clear text on a connection without TLS"):
        _connect(plain, _app("plain-notls"))
    _require_pg_ssl(pg_server)
    unverified = proxy_factory(upstream={**upstream, "tls": {"mode": "require"}})
    with pytest.raises(psycopg.OperationalError, match="whose certificate is not verified"):
        _connect(unverified, _app("plain-require"))
    verified = {"mode": "verify-full", "ca_file": str(test_ca.ca_cert)}
    encrypted = proxy_factory(upstream={**upstream, "host": "localhost", "tls": verified})
    app = _app("plain-tls")
    with _connect(encrypted, app) as conn:
        assert _upstream_ssl(conn) == (pg_server.plain_user, True)


def test_upstream_trust(proxy_factory: Callable[..., Proxy], pg_server: PgServer) -> None:
    up = proxy_factory(upstream={"user": pg_server.trust_user, "password_file": None})
    app = _app("trust")
    with _connect(up, app) as conn:
        assert _upstream_ssl(conn)[0] == pg_server.trust_user
    records = _session(up, app, AuditEvent.DISCONNECT)
    assert _events(records)[:2] == ["connect", "auth_ok"]
    assert all(r.identity == "alice" for r in records if r.event != AuditEvent.CONNECT)


def test_upstream_wrong_service_password(
    proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    password_file = tmp_path / "wrong-service-password"
    password_file.write_text("definitely-not-it")
    up = proxy_factory(upstream={"password_file": str(password_file)})
    app = _app("badsvc")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(up, app)
    records = _session(up, app, AuditEvent.UPSTREAM_LOST)
    lost = next(r for r in records if r.event == AuditEvent.UPSTREAM_LOST)
    assert lost.sqlstate == "28P01"
    assert up.process.poll() is None


def test_plaintext_pipelined_after_sslrequest_refused(
    proxy_factory: Callable[..., Proxy], test_ca: TestCA
) -> None:
    # CVE-2021-23214: bytes sent in the clear right behind SSLRequest must never be trusted.
    tls_proxy = proxy_factory(tls=_client_tls(test_ca, "optional"))
    startup = messages.startup_message({"user": "alice", "database": "app"})
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(messages.ssl_request() + startup)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    # Either refused outright (FATAL 08P01 in the clear) or the TLS handshake fails on the
    # injected bytes; in no case does the proxy start authenticating the plaintext startup.
    assert received[:1] in (b"E", b"S"), received
    assert b"R\x00\x00\x00" not in received
    if received[:1] == b"E":
        fields = messages.parse_error_fields(received[5:])
        assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
        records = tls_proxy.audit(
            until=lambda rs: any(r.event == AuditEvent.PROTOCOL_ERROR for r in rs)
        )
        assert any(r.event == AuditEvent.PROTOCOL_ERROR for r in records)
    assert tls_proxy.process.poll() is None


def _cancel_a_sleep(conn: psycopg.Connection[Any], pg: PgServer, app: str) -> None:
    """Run pg_sleep on `conn`, cancel it once PostgreSQL runs it, and expect it cancelled
    within 2 s."""
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(conn.execute, "SELECT pg_sleep(30)")
        deadline = time.monotonic() + 5
        while "active" not in pg.psql(
            f"SELECT state FROM pg_stat_activity WHERE application_name = '{app}'"
        ):
            assert time.monotonic() < deadline, "pg_sleep never started"
            time.sleep(0.05)
        started = time.monotonic()
        conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            running.result(timeout=5)
        assert time.monotonic() - started < 2.0


def test_cancel_over_tls(tls_proxy: Proxy, test_ca: TestCA, pg_server: PgServer) -> None:
    # libpq 17+ sends CancelRequest inside TLS when the connection used TLS.
    app = _app("tls-cancel")
    with _connect(tls_proxy, app, sslmode="require", autocommit=True) as conn:
        _cancel_a_sleep(conn, pg_server, app)
    session_id = _session(tls_proxy, app, AuditEvent.DISCONNECT)[0].session_id
    records = tls_proxy.audit(
        event="cancel", until=lambda rs: any(r.detail == f"session={session_id}" for r in rs)
    )
    assert [r.status for r in records if r.detail == f"session={session_id}"] == ["forwarded"]


def test_cancel_with_upstream_verify_full(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, test_ca: TestCA, tmp_path: Path
) -> None:
    """The session's upstream connection uses verify-full TLS: its cancel goes inside TLS,
    verified the same way, and PostgreSQL acts on it."""
    _require_pg_ssl(pg_server)
    up = proxy_factory(
        upstream=_ssl_role_upstream(
            tmp_path,
            pg_server,
            {"mode": "verify-full", "ca_file": str(test_ca.ca_cert)},
            host="localhost",
        )
    )
    app = _app("up-cancel")
    with _connect(up, app, autocommit=True) as conn:
        _cancel_a_sleep(conn, pg_server, app)
    assert "cannot send a cancel request" not in up.log()


# ------------------------------------------------------------------ channel binding


def test_channel_binding_required_by_the_client(tls_proxy: Proxy, test_ca: TestCA) -> None:
    """SCRAM-SHA-256-PLUS over TLS: libpq's channel_binding=require logs in (libpq checks
    dbward's tls-server-end-point hash of its certificate through the proof)."""
    app = _app("cbind")
    with _connect(tls_proxy, app, sslmode="require", channel_binding="require") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    records = _session(tls_proxy, app, AuditEvent.DISCONNECT)
    assert _events(records)[:2] == ["connect", "auth_ok"]

    # psql (the system libpq) too.
    bound = _psql_verify_full(
        tls_proxy, test_ca, f"{app}-psql", "SELECT 'bound'", "channel_binding=require"
    )
    assert bound == "bound"


def _psql_as_alice(conninfo: str, sql: str) -> subprocess.CompletedProcess[str]:
    """Run `sql` with psql (the system libpq) as alice, with no PG* setting but her password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {"PGPASSWORD": USERS["alice"][0], "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-d", conninfo, "-c", sql],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def _psql_verify_full(proxy: Proxy, test_ca: TestCA, app: str, sql: str, extra: str = "") -> str:
    """Run `sql` with psql (the system libpq) over TLS, verifying the proxy against the CA."""
    proc = _psql_as_alice(
        f"host=localhost port={proxy.port} user=alice dbname=app sslmode=verify-full "
        f"sslrootcert={test_ca.ca_cert} application_name={app} {extra}",
        sql,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _tls_socket(proxy: Proxy, test_ca: TestCA) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    raw.sendall(messages.ssl_request())
    assert raw.recv(1) == b"S"
    context = ssl.create_default_context(cafile=str(test_ca.ca_cert))
    return context.wrap_socket(raw, server_hostname="localhost")


def _read(sock: socket.socket) -> tuple[bytes, bytes]:
    header = b""
    while len(header) < 5:
        chunk = sock.recv(5 - len(header))
        assert chunk, "connection closed"
        header += chunk
    size = int.from_bytes(header[1:], "big") - 4
    body = b""
    while len(body) < size:
        body += sock.recv(size - len(body))
    return header[:1], body


def test_channel_binding_downgrade_is_refused(tls_proxy: Proxy, test_ca: TestCA) -> None:
    """RFC 5802: a client that can bind ('y') but was told the server cannot, while dbward
    offered SCRAM-SHA-256-PLUS, had the offer stripped on its way: FATAL 28P01, audited."""
    app = _app("cbind-y")
    with _tls_socket(tls_proxy, test_ca) as sock:
        sock.sendall(
            messages.startup_message({"user": "alice", "database": "app", "application_name": app})
        )
        msg_type, body = _read(sock)
        assert msg_type == b"R" and body[:4] == b"\x00\x00\x00\x0a"
        assert body[4:] == b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
        sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", b"y,,n=,r=abcdefgh"))
        msg_type, body = _read(sock)
    assert msg_type == b"E"
    fields = messages.parse_error_fields(body)
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL",
        "28P01",
        "password authentication failed",
    )
    records = _session(tls_proxy, app, AuditEvent.AUTH_FAIL)
    fail = next(r for r in records if r.event == AuditEvent.AUTH_FAIL)
    assert fail.sqlstate == "28P01" and "negotiation error" in fail.reason


def test_a_reset_during_the_tls_handshake_frees_its_slots(
    proxy_factory: Callable[..., Proxy], test_ca: TestCA
) -> None:
    """A client that resets the connection after dbward's 'S' (before or during the handshake)
    never reached connection_lost: the TLS layer does not report a connection it never made.
    Each one kept a max_connections slot and a max_unauthenticated_per_host slot for good, so
    a few anonymous resets locked every client out until dbward restarted."""
    small = proxy_factory(
        tls=_client_tls(test_ca, "required"),
        listener={"max_connections": 2, "max_unauthenticated_per_host": 2},
    )
    for _ in range(3):
        for hello in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):  # a ClientHello cut
            for _ in range(50):
                sock = socket.create_connection(("127.0.0.1", small.port), timeout=5)
                sock.sendall(messages.ssl_request())
                if sock.recv(1) == b"S":
                    break
                # Refused (53300) only while the previous reset is on its way; a leak never
                # clears and fails below.
                sock.close()
                time.sleep(0.1)
            else:
                pytest.fail("a reset's slots were not freed")
            if hello:
                sock.sendall(hello)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
    for _ in range(50):
        try:
            with _connect(small, _app("after-rst"), sslmode="require") as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            break
        except psycopg.OperationalError as exc:
            # Only while the last resets are still on their way; a leak never clears.
            last = str(exc)
            time.sleep(0.1)
    else:
        pytest.fail(f"still refused after the resets: {last}")
    assert "cannot reach the database" not in small.log()


def test_libpq_sslmode_prefer_tries_a_failed_login_twice_on_an_optional_listener(
    proxy_factory: Callable[..., Proxy], test_ca: TestCA
) -> None:
    """libpq's default sslmode=prefer (and allow) tries a login that failed over TLS again in
    plaintext where the listener allows it: one mistyped password is two failed logins against
    auth_fail_burst (docs/configuration.md says so; sslmode=require tries once)."""
    optional = proxy_factory(tls=_client_tls(test_ca, "optional"))
    app = _app("prefer-retry")
    for mode in ("prefer", "require"):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(optional, f"{app}-{mode}", password="not-the-password", sslmode=mode)

    def fails(records: list[AuditRecord], mode: str) -> int:
        return sum(
            r.event == AuditEvent.AUTH_FAIL and r.application_name == f"{app}-{mode}"
            for r in records
        )

    records = optional.audit(until=lambda rs: fails(rs, "require") == 1)
    assert (fails(records, "prefer"), fails(records, "require")) == (2, 1)


def _psql_error(proxy: Proxy, app: str, sslmode: str) -> str:
    """psql's (the system libpq's) error for a login through `proxy` with `sslmode`."""
    proc = _psql_as_alice(
        f"host=127.0.0.1 port={proxy.port} user=alice dbname=app sslmode={sslmode} "
        f"application_name={app}",
        "SELECT 1",
    )
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_a_locked_out_address_costs_no_tls_handshake(
    proxy_factory: Callable[..., Proxy], test_ca: TestCA
) -> None:
    """auth_fail_burst's refusal came after the TLS handshake: a guesser locked out made
    dbward do a handshake (the CPU of a signature and a key exchange) for every try, only to
    be refused. Its SSLRequest is now answered 'N': a client with sslmode prefer (libpq's
    default) reads the refusal in the clear, one with require hangs up, neither costs a
    handshake; another address still gets TLS."""
    locked = proxy_factory(
        tls=_client_tls(test_ca, "optional"),
        listener={"auth_fail_burst": 2, "auth_fail_rate_per_s": 0.01},
    )
    app = _app("lockout-tls")
    for i in range(2):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(locked, f"{app}-wrong{i}", password="not-the-password", sslmode="require")
    with socket.create_connection(("127.0.0.1", locked.port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(messages.ssl_request())
        assert sock.recv(1) == b"N"
        sock.sendall(messages.startup_message({"user": "alice", "database": "app"}))
        msg_type, payload = _read(sock)
    fields = messages.parse_error_fields(payload)
    assert (msg_type, fields["C"]) == (b"E", "28000")
    assert fields["M"].startswith("dbward: too many failed logins from this address")
    # The system psql (libpq 15) and psycopg's libpq (18) alike.
    assert "too many failed logins from this address" in _psql_error(locked, app, "prefer")
    with pytest.raises(psycopg.OperationalError, match="too many failed logins from this"):
        _connect(locked, f"{app}-prefer", sslmode="prefer")
    assert "server does not support SSL" in _psql_error(locked, app, "require")
    # Another address: TLS as before.
    with socket.create_connection(
        ("127.0.0.1", locked.port), timeout=5, source_address=("127.0.0.2", 0)
    ) as sock:
        sock.sendall(messages.ssl_request())
        assert sock.recv(1) == b"S"
    # Every refusal is counted in the audit's aggregate, the client that hung up included.

    def refused(records: list[AuditRecord]) -> int:
        return sum(
            int(r.detail.removeprefix("refused="))
            for r in records
            if r.event == AuditEvent.AUTH_FAIL and r.sqlstate == "28000"
        )

    locked.audit(until=lambda rs: refused(rs) == 4, timeout=15)
