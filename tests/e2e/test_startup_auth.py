"""Startup and authentication through a real `dbward serve`: logins, refusals, odd packets, config.

Every refusal must be a FATAL ErrorResponse with the right SQLSTATE, leave an audit record, and
leave the proxy serving the next client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.wire.postgres import messages
from dbward.wire.postgres.scram import ScramClient
from fixtures.clients import assert_not_in_audit_files
from fixtures.postgres import PgServer
from fixtures.proxy import USERS, Proxy, write_config
from fixtures.raw import expect_fatal as _expect_fatal
from fixtures.raw import read_message as _read_message
from fixtures.raw import recv_exact as _recv_exact

TIMEOUT = 5.0
AUTH_FAILED = "password authentication failed"


def _app(tag: str) -> str:
    return f"startup-{tag}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ raw wire helpers


def _connect_raw(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def _client_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _scram_authenticate(
    sock: socket.socket,
    user: str,
    password: str,
    app: str,
    database: str = "app",
    **params: str,
) -> dict[str, str] | None:
    """Send a StartupMessage (with any extra `params`) and run SCRAM by hand up to dbward's
    verified SASLFinal; returns the error fields if dbward refused before that."""
    sock.sendall(
        messages.startup_message(
            {"user": user, "database": database, "application_name": app, **params}
        )
    )
    msg_type, payload = _read_message(sock)
    assert msg_type == b"R", (msg_type, payload)
    code, data = messages.parse_authentication(payload)
    assert code == 10 and b"SCRAM-SHA-256" in data
    client = ScramClient(password)
    sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
    msg_type, payload = _read_message(sock)
    assert msg_type == b"R", (msg_type, messages.parse_error_fields(payload))
    code, data = messages.parse_authentication(payload)
    assert code == 11
    sock.sendall(messages.sasl_response(client.client_final(data)))
    msg_type, payload = _read_message(sock)
    if msg_type == b"E":
        return messages.parse_error_fields(payload)
    code, data = messages.parse_authentication(payload)
    assert code == 12
    client.verify_server_final(data)
    return None


def _scram_login(
    sock: socket.socket, user: str, password: str, app: str, database: str = "app"
) -> dict[str, Any]:
    """Log in over an already-negotiated socket by hand; returns what the server announced."""
    error = _scram_authenticate(sock, user, password, app, database)
    if error is not None:
        return {"error": error}
    announced: dict[str, Any] = {"params": {}}
    while True:
        msg_type, payload = _read_message(sock)
        if msg_type == b"R":
            assert messages.parse_authentication(payload)[0] == 0
        elif msg_type == b"S":
            name, value = messages.parse_parameter_status(payload)
            announced["params"][name] = value
        elif msg_type == b"K":
            announced["pid"], announced["key"] = messages.parse_backend_key_data(payload)
        elif msg_type == b"Z":
            return announced
        else:
            raise AssertionError((msg_type, payload))


def _raw_query(sock: socket.socket, sql: str) -> list[tuple[bytes, bytes]]:
    sock.sendall(messages.query(sql))
    out = []
    while True:
        msg_type, payload = _read_message(sock)
        out.append((msg_type, payload))
        if msg_type == b"Z":
            return out


# ------------------------------------------------------------------ client helpers


def _psql(
    proxy: Proxy, app: str, sql: str, *, password: str | None = None, **conn: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {
        "PGPASSWORD": password or USERS["alice"][0],
        "PGAPPNAME": app,
        "PGCONNECT_TIMEOUT": "10",
    }
    params = {"host": "127.0.0.1", "port": str(proxy.port), "user": "alice", "dbname": "app"}
    params |= {"sslmode": "disable"} | conn
    conninfo = " ".join(f"{k}={v}" for k, v in params.items())
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", sql],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def _assert_still_serving(proxy: Proxy) -> None:
    """A fresh psql login and query works after whatever the test did."""
    app = _app("alive")
    proc = _psql(proxy, app, "SELECT 40 + 2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"
    assert proxy.process.poll() is None, proxy.log()


def _session(
    proxy: Proxy, app: str, until: Callable[[list[AuditRecord]], bool]
) -> list[AuditRecord]:
    """This app's session records, waiting until `until` holds for them."""
    proxy.audit(until=lambda recs: until([r for r in recs if r.application_name == app]))
    return proxy.session_records(app)


def _has_event(event: AuditEvent) -> Callable[[list[AuditRecord]], bool]:
    return lambda recs: any(r.event == event for r in recs)


def _by_addr(proxy: Proxy, addr: str, event: AuditEvent) -> list[AuditRecord]:
    """Records of a raw connection that never got as far as an application_name."""

    def mine(recs: list[AuditRecord]) -> list[AuditRecord]:
        return [r for r in recs if r.client_addr == addr]

    recs = proxy.audit(until=lambda rs: any(r.event == event for r in mine(rs)))
    return mine(recs)


def _events(records: list[AuditRecord]) -> list[str]:
    return [str(r.event) for r in records]


# ------------------------------------------------------------------ successful logins


def test_scram_login_with_psql(proxy: Proxy, pg_server: PgServer) -> None:
    app = _app("psql")
    proc = _psql(proxy, app, "SELECT current_user, current_database()")
    assert proc.returncode == 0, proc.stderr
    # dbward logs in upstream with its service account, never as the client's name.
    assert proc.stdout.strip() == f"{pg_server.service_user}|app"
    records = _session(proxy, app, _has_event(AuditEvent.DISCONNECT))
    events = _events(records)
    assert events[:2] == ["connect", "auth_ok"], events
    assert events[-1] == "disconnect"
    assert {r.identity for r in records if r.event != AuditEvent.CONNECT} == {"alice"}
    statement = next(r for r in records if r.event == AuditEvent.STATEMENT)
    assert statement.sql_text == "SELECT current_user, current_database()"
    assert statement.decision == "allow"
    # A quick read: its outcome arrived before the intent was written, so one record has both.
    assert (statement.status, statement.rows) == ("ok", 1)
    assert not any(r.event == AuditEvent.OUTCOME for r in records)


def test_scram_login_with_psycopg(proxy: Proxy) -> None:
    # libpq sends an empty SCRAM user name (n=,r=...): the startup packet's user is what counts.
    app = _app("psycopg")
    with psycopg.connect(**proxy.conninfo("bob", application_name=app), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.backend_pid > 0
    records = _session(proxy, app, _has_event(AuditEvent.DISCONNECT))
    assert _events(records)[:2] == ["connect", "auth_ok"]
    assert all(r.identity == "bob" for r in records)


def test_scram_login_raw_with_username_in_client_first(proxy: Proxy) -> None:
    # A client that repeats its name in client-first-message (allowed by RFC 5802) works too.
    app = _app("rawname")
    with _connect_raw(proxy) as sock:
        sock.sendall(
            messages.startup_message({"user": "alice", "database": "app", "application_name": app})
        )
        msg_type, _ = _read_message(sock)
        assert msg_type == b"R"
        client = ScramClient(USERS["alice"][0], username="alice")
        sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
        _, payload = _read_message(sock)
        sock.sendall(
            messages.sasl_response(client.client_final(messages.parse_authentication(payload)[1]))
        )
        msg_type, payload = _read_message(sock)
        assert msg_type == b"R", messages.parse_error_fields(payload)
        client.verify_server_final(messages.parse_authentication(payload)[1])
        while _read_message(sock)[0] != b"Z":
            pass
        rows = _raw_query(sock, "SELECT 7")
        assert [t for t, _ in rows] == [b"T", b"D", b"C", b"Z"]
        sock.sendall(messages.terminate())
    records = _session(proxy, app, _has_event(AuditEvent.DISCONNECT))
    assert _events(records)[:2] == ["connect", "auth_ok"]


# ------------------------------------------------------------------ failed logins


def _failed_login(proxy: Proxy, user: str, password: str) -> tuple[str, dict[str, str], str]:
    """Try psycopg and a raw SCRAM exchange; returns (psycopg message, raw error fields, app)."""
    app = _app(f"fail-{user}")
    info = {**proxy.conninfo(), "user": user, "password": password, "application_name": app}
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(**info, connect_timeout=10)
    with _connect_raw(proxy) as sock:
        answer = _scram_login(sock, user, password, app)
        assert "error" in answer, answer
        # after the error the proxy hangs up
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass
    return str(caught.value), answer["error"], app


def test_wrong_password_is_refused_and_audited(proxy: Proxy) -> None:
    text, fields, app = _failed_login(proxy, "alice", "not-the-password")
    assert AUTH_FAILED in text
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28P01", AUTH_FAILED)
    records = _session(proxy, app, lambda rs: sum(r.event == AuditEvent.AUTH_FAIL for r in rs) >= 2)
    fails = [r for r in records if r.event == AuditEvent.AUTH_FAIL]
    assert len(fails) == 2
    assert {(r.identity, r.sqlstate) for r in fails} == {("alice", "28P01")}
    assert not any(r.event == AuditEvent.AUTH_OK for r in records)
    _assert_still_serving(proxy)


def test_unknown_user_gets_the_same_error(proxy: Proxy) -> None:
    known_text, known_fields, _ = _failed_login(proxy, "alice", "wrong-password-1")
    text, fields, app = _failed_login(proxy, "mallory", "wrong-password-1")
    # No user enumeration: the same message and code whether or not the user exists.
    assert fields == known_fields
    assert text == known_text
    assert "mallory" not in text
    records = _session(proxy, app, lambda rs: sum(r.event == AuditEvent.AUTH_FAIL for r in rs) >= 2)
    fails = [r for r in records if r.event == AuditEvent.AUTH_FAIL]
    assert {(r.identity, r.sqlstate) for r in fails} == {("mallory", "28P01")}
    _assert_still_serving(proxy)


# ------------------------------------------------------------------ refused startup parameters


def _refused_via_psycopg(proxy: Proxy, app: str, **params: str) -> str:
    info = {**proxy.conninfo(), "application_name": app, **params}
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(**info, connect_timeout=10)
    return str(caught.value)


def _refused_raw(proxy: Proxy, params: dict[str, str]) -> tuple[dict[str, str], str]:
    with _connect_raw(proxy) as sock:
        addr = _client_addr(sock)
        sock.sendall(messages.startup_message(params))
        return _expect_fatal(sock), addr


def _assert_refusal_audited(proxy: Proxy, app: str, needle: str) -> None:
    records = _session(proxy, app, _has_event(AuditEvent.PROTOCOL_ERROR))
    refusals = [r for r in records if r.event == AuditEvent.PROTOCOL_ERROR]
    assert refusals, records
    assert refusals[0].sqlstate == "28000"
    assert needle in refusals[0].reason
    # Refused before authentication: nothing was authenticated, nothing reached the database.
    assert not any(r.event in (AuditEvent.AUTH_OK, AuditEvent.STATEMENT) for r in records)


def test_replication_connection_refused(proxy: Proxy) -> None:
    app = _app("repl")
    text = _refused_via_psycopg(proxy, app, replication="database")
    assert "replication connections are not allowed" in text
    _assert_refusal_audited(proxy, app, "replication")
    fields, _ = _refused_raw(
        proxy, {"user": "alice", "database": "app", "replication": "true", "application_name": app}
    )
    assert (fields["C"], fields["S"]) == ("28000", "FATAL")
    assert "replication" in fields["M"]
    _assert_still_serving(proxy)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ("-c role=postgres", "'role'"),
        ("-crole=postgres", "'role'"),
        ("--session_authorization=x", "'session_authorization'"),
        ("-c session-authorization=postgres", "'session_authorization'"),
        ("-c ROLE=postgres", "'role'"),
    ],
)
def test_role_switch_in_startup_options_refused(proxy: Proxy, options: str, needle: str) -> None:
    app = _app("opts")
    text = _refused_via_psycopg(proxy, app, options=options)
    assert needle in text and "not allowed" in text, text
    _assert_refusal_audited(proxy, app, needle)
    fields, _ = _refused_raw(
        proxy, {"user": "alice", "database": "app", "options": options, "application_name": app}
    )
    assert fields["C"] == "28000"
    assert "role switching is refused" in fields["M"]
    _assert_still_serving(proxy)


@pytest.mark.parametrize("name", ["role", "session_authorization", "Role"])
def test_role_startup_parameter_refused(proxy: Proxy, name: str) -> None:
    app = _app("roleparam")
    fields, _ = _refused_raw(
        proxy, {"user": "alice", "database": "app", name: "postgres", "application_name": app}
    )
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert "not allowed" in fields["M"] and "role switching" in fields["M"]
    _assert_refusal_audited(proxy, app, name)
    _assert_still_serving(proxy)


def test_harmless_options_pass_through(proxy: Proxy) -> None:
    app = _app("okopts")
    info = {**proxy.conninfo(), "application_name": app, "options": "-c statement_timeout=1234"}
    with psycopg.connect(**info, connect_timeout=10) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)


# ------------------------------------------------------------------ encryption requests


def test_gssenc_request_answered_n_then_login(proxy: Proxy) -> None:
    app = _app("gss")
    with _connect_raw(proxy) as sock:
        sock.sendall(messages.gssenc_request())
        assert _recv_exact(sock, 1) == b"N"
        # This listener has TLS disabled, so an SSLRequest is declined as well.
        sock.sendall(messages.ssl_request())
        assert _recv_exact(sock, 1) == b"N"
        announced = _scram_login(sock, "alice", USERS["alice"][0], app)
        assert "error" not in announced, announced
        assert announced["pid"] > 0 and len(announced["key"]) == 4
        assert announced["params"]["application_name"] == app
        rows = _raw_query(sock, "SELECT 1")
        assert [t for t, _ in rows] == [b"T", b"D", b"C", b"Z"]
        sock.sendall(messages.terminate())
    records = _session(proxy, app, _has_event(AuditEvent.DISCONNECT))
    assert _events(records)[:2] == ["connect", "auth_ok"]

    app2 = _app("gss-libpq")
    info = {**proxy.conninfo(), "application_name": app2, "gssencmode": "prefer"}
    with psycopg.connect(**info, connect_timeout=10) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


# ------------------------------------------------------------------ malformed startup packets


@pytest.mark.parametrize(
    ("version", "needle"),
    [((2, 0), "2.0"), ((4, 0), "4.0")],
)
def test_unsupported_protocol_version(proxy: Proxy, version: tuple[int, int], needle: str) -> None:
    major, minor = version
    body = struct.pack("!I", (major << 16) | minor) + b"user\x00alice\x00database\x00app\x00\x00"
    with _connect_raw(proxy) as sock:
        addr = _client_addr(sock)
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        fields = _expect_fatal(sock)
    assert fields["C"] in ("08P01", "0A000"), fields
    assert needle in fields["M"], fields
    records = _by_addr(proxy, addr, AuditEvent.PROTOCOL_ERROR)
    assert [r.sqlstate for r in records if r.event == AuditEvent.PROTOCOL_ERROR] == [fields["C"]]
    _assert_still_serving(proxy)


def test_newer_minor_version_is_negotiated_down(proxy: Proxy) -> None:
    """Protocol 3.2 and _pq_ options get NegotiateProtocolVersion(3.0), as from PostgreSQL."""
    body = (
        struct.pack("!I", (3 << 16) | 2)
        + b"user\x00alice\x00database\x00app\x00_pq_.future\x00on\x00\x00"
    )
    with _connect_raw(proxy) as sock:
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        msg_type, payload = _read_message(sock)
        assert msg_type == b"v"
        version, count = struct.unpack("!II", payload[:8])
        assert (version >> 16, version & 0xFFFF, count) == (3, 0, 1)
        assert payload[8:] == b"_pq_.future\x00"
        msg_type, payload = _read_message(sock)
        assert msg_type == b"R" and struct.unpack("!I", payload[:4])[0] == 10  # SASL
        assert b"SCRAM-SHA-256" in payload


def test_libpq_asking_for_protocol_3_2_logs_in_with_3_0(proxy: Proxy) -> None:
    """libpq 18 with max_protocol_version=3.2 reads NegotiateProtocolVersion's whole version.

    dbward sent 0 there (a bare minor), which libpq read as a downgrade to protocol 0.0 and
    refused: such clients could not connect at all.
    """
    # The dev extra pins psycopg[binary]>=3.3, whose wheel bundles libpq 18.
    assert psycopg.pq.version() >= 180000, "libpq 18 is needed for max_protocol_version"
    info = {**proxy.conninfo(), "application_name": _app("proto32")}
    with psycopg.connect(**info, max_protocol_version="3.2", connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.protocol_version == 3


def test_oversized_startup_packet(proxy: Proxy) -> None:
    with _connect_raw(proxy) as sock:
        addr = _client_addr(sock)
        # Only the header: the proxy must refuse on the length alone, not wait for 20 kB.
        sock.sendall(struct.pack("!II", 20000, 196608))
        fields = _expect_fatal(sock)
    assert fields["C"] == "08P01"
    assert "20000" in fields["M"]
    records = _by_addr(proxy, addr, AuditEvent.PROTOCOL_ERROR)
    assert any(r.event == AuditEvent.PROTOCOL_ERROR and r.sqlstate == "08P01" for r in records)
    _assert_still_serving(proxy)


def test_startup_without_user_refused(proxy: Proxy) -> None:
    app = _app("nouser")
    fields, _ = _refused_raw(proxy, {"database": "app", "application_name": app})
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert "no user name" in fields["M"]
    _assert_still_serving(proxy)


# ------------------------------------------------------------------ configuration errors


def _dbward(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbward", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=30,
        check=False,
    )


def _base_config(tmp_path: Path, pg_server: PgServer) -> dict[str, Any]:
    path = tmp_path / "base.yaml"
    write_config(path, pg_server, 6999)
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _break_unknown_key(config: dict[str, Any]) -> str:
    config["listeners"][0]["upstream"]["pasword_file"] = "/tmp/typo"
    return "listeners[0].upstream.pasword_file"


def _break_port(config: dict[str, Any]) -> str:
    config["listeners"][0]["upstream"]["port"] = 70000
    return "listeners[0].upstream.port"


def _break_tls(config: dict[str, Any]) -> str:
    config["listeners"][0]["tls"] = {"mode": "required"}
    return "listeners[0].tls"


def _break_cert_file(config: dict[str, Any]) -> str:
    # Valid as configuration, but the file is not a certificate: found only when loaded.
    cert = Path(config["audit"]["path"]).parent / "not-a-cert.pem"
    cert.write_text("this is not a certificate\n")
    config["listeners"][0]["tls"] = {
        "mode": "required",
        "cert_file": str(cert),
        "key_file": str(cert),
    }
    return "listeners[0].tls.cert_file"


def _break_top_level(config: dict[str, Any]) -> str:
    config["shutdown_grace"] = 3
    return "shutdown_grace"


def _break_statement_limit(config: dict[str, Any]) -> str:
    config["max_statements_per_query"] = 0
    return "max_statements_per_query"


def _break_auth_secret(config: dict[str, Any]) -> str:
    # Valid as configuration; found only when read, after `serve` has started the audit writer.
    secret = Path(config["audit"]["path"]).parent / "not-a-secret.key"
    secret.write_text("not hexadecimal\n")
    config["auth_secret_file"] = str(secret)
    return "auth_secret_file"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_unknown_key,
        _break_port,
        _break_tls,
        _break_cert_file,
        _break_top_level,
        _break_statement_limit,
        _break_auth_secret,
    ],
)
def test_invalid_config_exits_2_naming_the_key(
    tmp_path: Path, pg_server: PgServer, breaker: Callable[[dict[str, Any]], str]
) -> None:
    config = _base_config(tmp_path, pg_server)
    key = breaker(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    for args in (["serve", "--config", str(bad)], ["check-config", str(bad)]):
        proc = _dbward(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert key in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        # Stopped cleanly: not "the audit writer process exited; ... restarting it".
        assert "audit writer" not in proc.stderr, proc.stderr
    tls_message = "needs tls.cert_file and tls.key_file"
    if breaker is _break_tls:
        assert tls_message in proc.stderr


def test_upstream_password_source_is_checked_at_start(tmp_path: Path, pg_server: PgServer) -> None:
    """A missing password variable or file stops `serve` (exit 2, the key named), not logins."""
    config = _base_config(tmp_path, pg_server)
    upstream = config["listeners"][0]["upstream"]
    del upstream["password_file"]
    upstream["password_env"] = "DBWARD_TEST_UNSET_PASSWORD_VAR"
    env_yaml = tmp_path / "env.yaml"
    env_yaml.write_text(yaml.safe_dump(config))
    proc = _dbward("serve", "--config", str(env_yaml))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "listeners[0].upstream.password_env" in proc.stderr
    assert "DBWARD_TEST_UNSET_PASSWORD_VAR is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
    # check-config may run where the secret is not: it warns and accepts the file.
    proc = _dbward("check-config", str(env_yaml))
    assert proc.returncode == 0, proc.stderr
    assert "warning: listeners[0].upstream.password_env" in proc.stderr

    del upstream["password_env"]
    upstream["password_file"] = str(tmp_path / "no-such-password")
    file_yaml = tmp_path / "file.yaml"
    file_yaml.write_text(yaml.safe_dump(config))
    for args in (["serve", "--config", str(file_yaml)], ["check-config", str(file_yaml)]):
        proc = _dbward(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "listeners[0].upstream.password_file: cannot read" in proc.stderr, proc.stderr
        assert "No such file or directory" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_rotated_password_file_is_used_without_a_restart(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, tmp_path: Path
) -> None:
    """configuration.md/operations.md: password_file is read at every new connection, so
    rotating the service password (in the database, then in the file) needs no restart."""
    role = f"dbward_rotate_{uuid.uuid4().hex[:8]}"
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    pg_server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{old}'")
    try:
        password_file = tmp_path / "rotating-password"
        password_file.write_text(old + "\n")
        proxy = proxy_factory(upstream={"user": role, "password_file": str(password_file)})

        def current_user() -> str:
            with psycopg.connect(**proxy.conninfo(), connect_timeout=10) as conn:
                row = conn.execute("SELECT current_user").fetchone()
            assert row is not None
            return str(row[0])

        assert current_user() == role
        pg_server.psql(f"ALTER ROLE {role} PASSWORD '{new}'")
        with pytest.raises(psycopg.OperationalError):
            current_user()  # the file still holds the old password
        password_file.write_text(new + "\n")
        assert current_user() == role
        assert proxy.process.poll() is None
    finally:
        pg_server.psql(f"DROP ROLE IF EXISTS {role}", check=False)


def test_a_password_file_that_is_not_a_password_is_refused_safely(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer, tmp_path: Path
) -> None:
    """Review r61: the password file is read at every login, whole: rotated to bytes that are
    not UTF-8 it ended each login with FATAL XX000 "internal error" and a traceback quoting
    a byte of the new password; a huge file (a log, /dev/zero by mistake) was read whole
    into memory, by check-config as well as by each login on the event loop."""
    password_file = tmp_path / "rotating-password"
    password_file.write_text(pg_server.service_password + "\n")
    password_file.chmod(0o600)
    proxy = proxy_factory(upstream={"password_file": str(password_file)})
    password_file.write_bytes(b"new-\xe9-secret\n")  # Latin-1, not UTF-8
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(**proxy.conninfo(), connect_timeout=10)
    # (psycopg gives no sqlstate for a FATAL during connect: the message tells.)
    assert "FATAL:  dbward: the upstream credentials are unavailable" in str(info.value)
    log = proxy.log()
    assert f"cannot read the upstream password: {password_file} is not UTF-8 text" in log, log
    assert "Traceback" not in log and "0xe9" not in log and "secret" not in log
    password_file.write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(**proxy.conninfo(), connect_timeout=10)
    assert "the upstream credentials are unavailable" in str(info.value)
    assert f"{password_file} is larger than 64 KiB: not a password file" in proxy.log()
    proc = _dbward("check-config", str(proxy.config_path))
    assert proc.returncode == 2, proc.stderr
    assert (
        f"listeners[0].upstream.password_file: {password_file} is larger than 64 KiB: not a "
        "password file"
    ) in proc.stderr
    password_file.write_text(pg_server.service_password + "\n")
    with psycopg.connect(**proxy.conninfo(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_listen_address_in_use_names_the_key(tmp_path: Path, pg_server: PgServer) -> None:
    config = _base_config(tmp_path, pg_server)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        config["listeners"][0]["listen"] = taken
        path = tmp_path / "busy.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = _dbward("serve", "--config", str(path))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == (
        f"dbward: cannot start: listeners[0].listen: cannot listen on {taken}: "
        "Address already in use"
    )


def test_check_config_accepts_a_valid_file(tmp_path: Path, pg_server: PgServer) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_base_config(tmp_path, pg_server)))
    proc = _dbward("check-config", str(good))
    assert proc.returncode == 0, proc.stderr
    assert "ok: 1 listener(s), 2 user(s)" in proc.stdout
    # --config, as serve and audit take it, works too; both at once, or neither, is a usage error.
    proc = _dbward("check-config", "--config", str(good))
    assert proc.returncode == 0 and "ok: 1 listener(s)" in proc.stdout, proc.stderr
    for args in ((), (str(good), "--config", str(good))):
        proc = _dbward("check-config", *args)
        assert proc.returncode == 2 and "--config CONFIG" in proc.stderr, proc.stderr


def test_missing_and_unparseable_config(tmp_path: Path) -> None:
    proc = _dbward("serve", "--config", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "cannot read configuration file" in proc.stderr
    garbled = tmp_path / "garbled.yaml"
    garbled.write_text("listeners: [\n")
    proc = _dbward("check-config", str(garbled))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_a_config_that_is_not_utf8_or_not_a_config_exits_2_without_a_traceback(
    tmp_path: Path,
) -> None:
    """Review r61: a configuration file holding a byte that is not UTF-8 ended `serve`,
    `check-config` and `audit --config` with a UnicodeDecodeError traceback (exit 1), and one
    that is not a configuration at all (/dev/zero, a log given by mistake) was read whole into
    memory first."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"listeners:\n  - name: caf\xe9\n")
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as file:
        file.truncate(17 * 1024 * 1024)
    for path, needle in (
        (latin1, f"{latin1}: not UTF-8 text (line 2, byte 25 of the file)"),
        (huge, f"{huge}: larger than 16 MiB: not a dbward configuration file"),
    ):
        for args in (
            ["serve", "--config", str(path)],
            ["check-config", str(path)],
            ["audit", "tail", "--config", str(path)],
        ):
            proc = _dbward(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert needle in proc.stderr, (args, proc.stderr)
            assert "Traceback" not in proc.stderr


def test_a_key_given_twice_exits_2_naming_it(tmp_path: Path, pg_server: PgServer) -> None:
    """Review r61: PyYAML keeps the last of two equal keys, so a setting or a section written
    twice silently lost the first (here the audit log's path and a listener's port). Keys a
    merge brings in may still be overridden."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_base_config(tmp_path, pg_server), sort_keys=False))
    text = good.read_text()
    twice_top = tmp_path / "twice-top.yaml"
    twice_top.write_text(text + f"audit:\n  path: {tmp_path / 'elsewhere.db'}\n")
    twice_nested = tmp_path / "twice-nested.yaml"
    twice_nested.write_text(text.replace("    port: ", "    port: 1\n    port: ", 1))
    for path, key in ((twice_top, "'audit'"), (twice_nested, "'port'")):
        for args in (["serve", "--config", str(path)], ["check-config", str(path)]):
            proc = _dbward(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert f"the key {key} is given twice in one mapping" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
    config = _base_config(tmp_path, pg_server)
    (listener,) = config.pop("listeners")
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        yaml.safe_dump(config)
        + "listeners:\n  - &first\n"
        + textwrap.indent(yaml.safe_dump(listener), "    ")
        + "  - <<: *first\n    name: second\n    listen: 127.0.0.1:6998\n"
    )
    proc = _dbward("check-config", str(merged))
    assert proc.returncode == 0, (proc.stderr, merged.read_text())


def test_two_listeners_on_one_address_exit_2_naming_the_key(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """Review r61: check-config accepted two listeners (or a listener and the metrics
    endpoint) on one address; serve then bound the first and stopped on the second with
    "address already in use" (exit 1)."""
    config = _base_config(tmp_path, pg_server)
    first = {**config["listeners"][0], "listen": "127.0.0.1:6997"}
    cases = [
        ([first, {**first, "name": "again"}], None, "listeners[1].listen: 127.0.0.1:6997 overlaps"),
        ([first, {**first, "name": "all", "listen": "*:6997"}], None, "listeners[1].listen"),
        ([first], {"listen": "localhost:6997"}, "metrics.listen: localhost:6997 overlaps"),
    ]
    for listeners, metrics, needle in cases:
        config["listeners"] = listeners
        config["metrics"] = metrics
        path = tmp_path / "same-address.yaml"
        path.write_text(yaml.safe_dump(config))
        for args in (["serve", "--config", str(path)], ["check-config", str(path)]):
            proc = _dbward(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert needle in proc.stderr, proc.stderr
    # The same port on two addresses is fine, as is one IPv4 listener beside an IPv6 one.
    config["listeners"] = [first, {**first, "name": "v6", "listen": "[::1]:6997"}]
    config["metrics"] = {"listen": "127.0.0.2:6997"}
    path.write_text(yaml.safe_dump(config))
    proc = _dbward("check-config", str(path))
    assert proc.returncode == 0, proc.stderr


def test_a_password_file_open_to_other_users_is_warned_about(
    tmp_path: Path, proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    """Review r61: a service password file every local user could read went unmentioned."""
    password_file = tmp_path / "open-password"
    password_file.write_text(pg_server.service_password + "\n")
    password_file.chmod(0o644)
    config = _base_config(tmp_path, pg_server)
    config["listeners"][0]["upstream"]["password_file"] = str(password_file)
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(config))
    warning = (
        f"listeners[0].upstream.password_file: {password_file} is open to other users "
        f"(mode 0644): restrict it to dbward's user (chmod 600 {password_file})"
    )
    proc = _dbward("check-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"dbward: warning: {warning}" in proc.stderr
    assert pg_server.service_password not in proc.stdout + proc.stderr
    proxy = proxy_factory(upstream={"password_file": str(password_file)})
    with psycopg.connect(**proxy.conninfo(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert f"WARNING dbward: {warning}" in proxy.log()
    assert pg_server.service_password not in proxy.log()
    password_file.chmod(0o600)
    proc = _dbward("check-config", str(path))
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_hash_password_output_logs_in(proxy_factory: Callable[..., Proxy]) -> None:
    password = "carol-S3cret-pass"
    proc = _dbward("users", "hash-password", "--password-stdin", stdin=password + "\n")
    assert proc.returncode == 0, proc.stderr
    verifier = proc.stdout.strip()
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert password not in proc.stdout
    users = [{"name": "carol", "password_verifier": verifier, "groups": ["developers"]}]
    carol_proxy = proxy_factory(extra={"users": users})
    app = _app("carol")
    info = {
        **carol_proxy.conninfo(),
        "user": "carol",
        "password": password,
        "application_name": app,
    }
    with psycopg.connect(**info, connect_timeout=10) as conn:
        assert conn.execute("SELECT 5").fetchone() == (5,)
    with pytest.raises(psycopg.OperationalError, match=AUTH_FAILED):
        psycopg.connect(**{**info, "password": password + "x"}, connect_timeout=10)
    records = _session(carol_proxy, app, _has_event(AuditEvent.DISCONNECT))
    assert [r.identity for r in records if r.event == AuditEvent.AUTH_OK] == ["carol"]
    empty = _dbward("users", "hash-password", "--password-stdin", stdin="\n")
    assert empty.returncode == 2 and "empty password" in empty.stderr


def test_refused_startup_audit_names_the_claimed_user(proxy: Proxy) -> None:
    # "Who tried to become postgres?" must be answerable from the audit log alone, as it is
    # for a failed password (auth_fail carries the claimed user).
    app = _app("who")
    fields, _ = _refused_raw(
        proxy,
        {"user": "bob", "database": "app", "options": "-c role=postgres", "application_name": app},
    )
    assert fields["C"] == "28000"
    records = _session(proxy, app, _has_event(AuditEvent.PROTOCOL_ERROR))
    refusal = next(r for r in records if r.event == AuditEvent.PROTOCOL_ERROR)
    assert refusal.identity == "bob", refusal


def _assert_cut(stored: str, claimed: str) -> None:
    """`stored` is the start of `claimed`, marked as cut, with its length and SHA-256."""
    raw = claimed.encode()
    assert stored == (
        f"{claimed[:63]}…[truncated: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}]"
    )


def _record_text(record: AuditRecord) -> int:
    return sum(len(v) for v in record if isinstance(v, str))


def test_claimed_names_are_stored_cut_in_every_record(proxy: Proxy) -> None:
    """Before logging in, a client may claim names up to the 10 KB startup packet: records
    keep 63 characters of each, marked with the full length and SHA-256, not the whole names
    in every record of the connection."""
    user = "mallory\n\x1b[31m" + "é" * 2500  # 5 KB, with a newline and an ANSI escape
    app = _app("huge") + "-" + "A" * 2000
    database = "d" * 2000
    with _connect_raw(proxy) as sock:
        addr = _client_addr(sock)
        answer = _scram_login(sock, user, "guess", app, database)
        assert answer["error"]["C"] == "28P01", answer
    records = _by_addr(proxy, addr, AuditEvent.DISCONNECT)
    assert _events(records) == ["connect", "auth_fail", "disconnect"]
    for record in records:
        _assert_cut(record.identity, user)
        _assert_cut(record.application_name, app)
        _assert_cut(record.database, database)
        assert _record_text(record) < 1000, record
    # The readers show them bounded and escaped; the full name still finds them.
    path = str(proxy.audit_path)
    found = _dbward("audit", "search", "--audit-db", path, "--identity", user, "--json")
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert [json.loads(line)["client_addr"] for line in lines] == [addr] * 3
    assert all(len(line) < 3000 for line in lines)
    table = _dbward("audit", "search", "--audit-db", path, "--identity", user)
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "mallory\\n\\x1b" in table.stdout
    assert len(table.stdout) < 3000
    _assert_still_serving(proxy)


def test_a_refused_startup_keeps_the_claimed_names_and_the_reason_cut(proxy: Proxy) -> None:
    user = "u" * 3000
    app = _app("huge-refused") + "-" + "B" * 2000
    bad_name = "bad-" + "n" * 3000  # not a parameter name: refused, and quoted in the reason
    fields, addr = _refused_raw(proxy, {"user": user, "application_name": app, bad_name: "1"})
    assert fields["C"] == "28000"
    assert len(fields["M"]) < 250
    records = _by_addr(proxy, addr, AuditEvent.PROTOCOL_ERROR)
    refusal = next(r for r in records if r.event == AuditEvent.PROTOCOL_ERROR)
    _assert_cut(refusal.identity, user)
    _assert_cut(refusal.application_name, app)
    assert refusal.reason.startswith(f"invalid startup parameter name '{bad_name[:63]}…")
    assert all(_record_text(r) < 1000 for r in records), records


def test_a_long_startup_value_quoted_in_a_login_error_is_kept_out(proxy: Proxy) -> None:
    """PostgreSQL's refusal of a startup parameter quotes the client's value (up to 10 KB):
    the client gets the message whole, the upstream_lost record the message without it."""
    app = _app("datestyle")
    value = "x" * 8000
    with _connect_raw(proxy) as sock:
        # None: dbward logged the client in (SASLFinal); the database then refused it.
        assert _scram_authenticate(sock, "alice", USERS["alice"][0], app, DateStyle=value) is None
        fields = _expect_fatal(sock)
    assert fields["C"] == "22023" and value in fields["M"]
    records = _session(proxy, app, _has_event(AuditEvent.DISCONNECT))
    lost = next(r for r in records if r.event == AuditEvent.UPSTREAM_LOST)
    assert lost.reason == (
        'the database refused the connection: invalid value for parameter "DateStyle": <...>'
    )
    assert all(_record_text(r) < 1000 for r in records), records


# What psql sends in `options`, the message PostgreSQL refuses it with (the client's copy
# quotes the value), and that message as dbward's log and audit keep it.
_SECRET_IN_OPTIONS = [
    pytest.param(
        "-c password_encryption={secret}",
        'invalid value for parameter "password_encryption": <...>',
        id="quoted-value",
    ),
    pytest.param("-c {secret}", "-c <...> requires a value", id="option-without-value"),
    pytest.param(
        "-c statement_timeout=-{digits}",
        '<...> is outside the valid range for parameter "statement_timeout"',
        id="bare-number",
    ),
]


@pytest.mark.parametrize(("options", "kept"), _SECRET_IN_OPTIONS)
def test_a_secret_typed_into_a_startup_option_stays_out_of_the_log_and_audit(
    proxy: Proxy, options: str, kept: str
) -> None:
    """A user who types a password into the wrong option: PostgreSQL refuses the login
    quoting the value, and dbward wrote that message into its warning log and into the
    upstream_lost record. The client still gets PostgreSQL's message (its own value); the
    log and the audit database keep the message without the value."""
    app = _app("secret-option")
    secret = f"Hunter2x{uuid.uuid4().hex[:12]}"
    digits = str(int(uuid.uuid4().hex[:12], 16) % 10**9 + 10**9)  # ten digits, unique
    value = options.format(secret=secret, digits=digits)
    proc = _psql(proxy, app, "SELECT 1", options=f"'{value}'")
    assert proc.returncode != 0
    needle = secret if "{secret}" in options else digits
    assert needle.lower() in proc.stderr.lower(), proc.stderr  # PostgreSQL's own message, whole
    records = _session(proxy, app, _has_event(AuditEvent.DISCONNECT))
    lost = next(r for r in records if r.event == AuditEvent.UPSTREAM_LOST)
    assert lost.reason.startswith(f"the database refused the connection: {kept}"), lost.reason
    mark = f"session {lost.session_id}: upstream refused: "
    deadline = time.monotonic() + 5
    while mark not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"{mark}the database refused the connection: {kept}" in proxy.log()
    for text in (secret, secret.lower(), digits):
        assert text not in proxy.log()
        assert_not_in_audit_files(proxy, text)


def test_large_message_before_authentication_is_refused(proxy: Proxy) -> None:
    """Before login only small messages are accepted: no buffering for anonymous clients."""
    with _connect_raw(proxy) as sock:
        sock.sendall(messages.startup_message({"user": "alice", "database": "app"}))
        msg_type, _payload = _read_message(sock)
        assert msg_type == b"R"  # AuthenticationSASL
        # a SASLInitialResponse header claiming 1 MiB; the body never comes
        sock.sendall(b"p" + struct.pack("!I", 1024 * 1024 + 4))
        fields = _expect_fatal(sock)
    assert fields["C"] == "08P01" and "exceeds the limit" in fields["M"]
    _assert_still_serving(proxy)


def test_unusable_audit_log_refuses_to_start(tmp_path: Path, pg_server: PgServer) -> None:
    """Fail closed at start: no audit log, no proxy (exit 2, the key named, no traceback)."""
    config = _base_config(tmp_path, pg_server)
    not_a_file = tmp_path / "a-directory"
    not_a_file.mkdir()
    config["audit"] = {"path": str(not_a_file)}
    bad = tmp_path / "bad-audit.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = _dbward("serve", "--config", str(bad))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "audit.path" in proc.stderr and "is a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_max_connections_refuses_the_extra_client(proxy_factory: Callable[..., Proxy]) -> None:
    small = proxy_factory(listener={"max_connections": 2})
    first = psycopg.connect(**small.conninfo())
    second = psycopg.connect(**small.conninfo())
    with pytest.raises(psycopg.OperationalError, match="too many clients"):
        psycopg.connect(**small.conninfo())
    first.close()
    deadline_ok = False
    for _ in range(50):  # the slot frees when dbward sees the disconnect
        try:
            third = psycopg.connect(**small.conninfo())
        except psycopg.OperationalError:
            continue
        assert third.execute("SELECT 1").fetchone() == (1,)
        third.close()
        deadline_ok = True
        break
    assert deadline_ok
    second.close()
    refused = small.audit(until=lambda rs: any(r.sqlstate == "53300" for r in rs))
    assert any(r.event == "protocol_error" and r.sqlstate == "53300" for r in refused)


def test_one_host_cannot_hold_every_connection_before_logging_in(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """Connections that have not logged in need no credentials: before the cap, 500 idle
    sockets from one host took every slot (everyone got 53300 for as long as the attacker
    kept reconnecting every auth_timeout_s) and any number more were held open for 30 s each."""
    small = proxy_factory(listener={"max_unauthenticated_per_host": 3, "max_connections": 10})
    idle = [socket.create_connection(("127.0.0.1", small.port), timeout=5) for _ in range(3)]
    try:
        for sock in idle:
            sock.sendall(b"\x00\x00")  # half a length word, then nothing (slowloris)
        extra = socket.create_connection(("127.0.0.1", small.port), timeout=5)
        with extra:
            extra.sendall(messages.ssl_request())
            fields = _expect_fatal(extra)  # refused at once, readable even after SSLRequest
        assert fields["C"] == "53300" and "waiting to log in" in fields["M"]
        # Logged-in sessions do not count: once the idle ones leave, more than three log in.
        for sock in idle:
            sock.close()
        sessions = []
        for _ in range(50):
            try:
                sessions.append(psycopg.connect(**small.conninfo(), connect_timeout=5))
            except psycopg.OperationalError:
                continue  # an idle socket's close may not have been seen yet
            if len(sessions) == 5:
                break
        assert len(sessions) == 5
        for conn in sessions:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.close()
    finally:
        for sock in idle:
            sock.close()


def test_an_audit_path_under_a_file_is_reported_by_both_commands(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """Nineteenth review: check-config said ok, and serve said "File exists"."""
    config = _base_config(tmp_path, pg_server)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config["audit"] = {"path": str(blocker / "audit.db")}
    bad = tmp_path / "bad-audit.yaml"
    bad.write_text(yaml.safe_dump(config))
    for args in (["check-config", str(bad)], ["serve", "--config", str(bad)]):
        proc = _dbward(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"{blocker} is not a directory" in proc.stderr, proc.stderr
        assert "audit.path" in proc.stderr and "Traceback" not in proc.stderr


def test_a_login_that_times_out_is_an_audited_auth_failure(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """A client that announced a user and then never answered the SCRAM challenge left only
    connect and disconnect records: the trail could not tell a stalled login from one that
    never began. It is now an auth_fail, sqlstate 08006, naming the timeout."""
    quick = proxy_factory(listener={"auth_timeout_s": 1})
    app = _app("stalled")
    with _connect_raw(quick) as sock:
        sock.sendall(
            messages.startup_message({"user": "alice", "database": "app", "application_name": app})
        )
        msg_type, _ = _read_message(sock)
        assert msg_type == b"R"  # the SASL offer, never answered
        fields = _expect_fatal(sock)
    assert (fields["C"], fields["M"]) == ("08006", "dbward: authentication timed out")
    records = quick.session_records(app, until=_has_event(AuditEvent.DISCONNECT))
    assert _events(records) == ["connect", "auth_fail", "disconnect"], records
    failed = records[1]
    assert (failed.identity, failed.sqlstate) == ("alice", "08006")
    assert failed.reason == "authentication timed out (1 s)"


def test_an_audit_path_that_is_not_a_regular_file_is_refused_untouched(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """Review r61: check-config accepted a FIFO or a device as audit.path (`/dev/null`, to turn
    the log off); serve then made it private (chmod 0600: for a dbward run as root, /dev/null
    unwritable for every other user of the host) and hung opening the FIFO, or failed with
    "cannot rollback - no transaction is active"."""
    fifo = tmp_path / "audit-fifo"
    os.mkfifo(fifo, 0o644)
    fifo.chmod(0o644)
    config = _base_config(tmp_path, pg_server)
    config["audit"] = {"path": str(fifo)}
    bad = tmp_path / "fifo-audit.yaml"
    bad.write_text(yaml.safe_dump(config))
    for args in (["check-config", str(bad)], ["serve", "--config", str(bad)]):
        proc = _dbward(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "audit.path: cannot" in proc.stderr and f"{fifo} is not a regular file" in (
            proc.stderr
        ), proc.stderr
        assert fifo.stat().st_mode & 0o777 == 0o644


def test_an_audit_path_holding_another_database_is_reported_by_both_commands(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """Twenty-seventh review: check-config said ok for an audit.path holding some other SQLite
    database, which serve then refused (exit 2). An empty file, or an empty database, is
    fine for both: serve gives it the schema."""
    import sqlite3

    config = _base_config(tmp_path, pg_server)
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    conn.close()
    config["audit"] = {"path": str(foreign)}
    bad = tmp_path / "foreign-audit.yaml"
    bad.write_text(yaml.safe_dump(config))
    for args in (["check-config", str(bad)], ["serve", "--config", str(bad)]):
        proc = _dbward(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"{foreign} is not a dbward audit log (it holds other tables)" in proc.stderr
        assert "audit.path" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    empty_file = tmp_path / "empty.db"
    empty_file.write_bytes(b"")
    empty_database = tmp_path / "empty-database.db"
    with sqlite3.connect(empty_database) as conn:  # a header page, no tables
        conn.execute("CREATE TABLE gone (a int)")
        conn.execute("DROP TABLE gone")
    conn.close()
    assert empty_database.stat().st_size > 0
    for path in (empty_file, empty_database):
        config["audit"] = {"path": str(path)}
        good = tmp_path / "good-audit.yaml"
        good.write_text(yaml.safe_dump(config))
        proc = _dbward("check-config", str(good))
        assert proc.returncode == 0, (path, proc.stderr)


# ------------------------------------------------------------------ failed-login throttling

_THROTTLED = "too many failed logins from this address"


def _connect_from(proxy: Proxy, source: str) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", proxy.port), timeout=TIMEOUT, source_address=(source, 0)
    )
    sock.settimeout(TIMEOUT)
    return sock


def _psycopg_error(proxy: Proxy, app: str, password: str) -> str:
    info = {**proxy.conninfo(), "password": password, "application_name": app}
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(**info, connect_timeout=10)
    return str(caught.value)


def test_an_address_that_fails_too_many_logins_is_refused_for_a_while(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """Nothing limited how fast one address could guess passwords: every guess got a full
    SCRAM exchange. Past auth_fail_burst failures an address is refused (28000) before any
    SCRAM work, even with the right password, until its budget refills at
    auth_fail_rate_per_s; other addresses and sessions already logged in are not affected,
    and the refusals reach the audit log in aggregate."""
    throttled = proxy_factory(listener={"auth_fail_burst": 3, "auth_fail_rate_per_s": 0.2})
    app = _app("throttle")
    password = throttled.users["alice"][0]
    with psycopg.connect(**throttled.conninfo(application_name=f"{app}-live")) as live:
        assert live.execute("SELECT 1").fetchone() == (1,)
        for i in range(3):
            assert AUTH_FAILED in _psycopg_error(throttled, f"{app}-wrong{i}", "not-the-password")
        locked_at = time.monotonic()
        # Locked for 5 s (1 / 0.2): the right password is refused too, readably.
        text = _psycopg_error(throttled, f"{app}-right", password)
        assert _THROTTLED in text and "try again in" in text, text
        refused_raw = 20
        for _ in range(refused_raw):
            with _connect_from(throttled, "127.0.0.1") as sock:
                sock.sendall(messages.startup_message({"user": "alice", "database": "app"}))
                fields = _expect_fatal(sock)  # no SASL offer: refused before SCRAM
            assert fields["C"] == "28000" and fields["M"].startswith(f"dbward: {_THROTTLED}")
        assert time.monotonic() - locked_at < 4.0  # all of it inside the lockout
        # Another address logs in meanwhile, and the session already logged in keeps working.
        with _connect_from(throttled, "127.0.0.2") as sock:
            assert "error" not in _scram_login(sock, "alice", password, f"{app}-other")
        assert live.execute("SELECT 2").fetchone() == (2,)
        # The budget refills: one try per 5 s, and the right password logs in.
        time.sleep(max(0.0, locked_at + 5.5 - time.monotonic()))
        with psycopg.connect(**throttled.conninfo(application_name=f"{app}-again")) as again:
            assert again.execute("SELECT 3").fetchone() == (3,)
        assert live.execute("SELECT 4").fetchone() == (4,)
    refused_total = refused_raw + 1

    def from_here(records: list[AuditRecord]) -> list[AuditRecord]:
        return [
            r
            for r in records
            if r.event == AuditEvent.AUTH_FAIL and r.client_addr.startswith("127.0.0.1:")
        ]

    # The first refusal is recorded at once; the others held back and counted in one record
    # when the 10 s interval ends.
    records = throttled.audit(
        until=lambda rs: sum(_refused_count(r) for r in from_here(rs)) >= refused_total,
        timeout=15,
    )
    fails = from_here(records)
    wrong = [r for r in fails if r.sqlstate == "28P01"]
    assert [r.application_name for r in wrong] == [f"{app}-wrong{i}" for i in range(3)]
    assert [r.detail for r in wrong] == [
        "",
        "",
        "locked out: logins from 127.0.0.1 refused for 5 s",
    ]
    refusals = [r for r in fails if r.sqlstate == "28000"]
    assert [_refused_count(r) for r in refusals] == [1, refused_total - 1], refusals
    assert {r.reason for r in refusals} == {
        "too many failed logins from this client address (auth_fail_burst)"
    }
    assert refusals[0].application_name == f"{app}-right" and refusals[0].identity == "alice"
    # No connect record for a refused login: a spray writes one record per interval.
    connects = [
        r
        for r in records
        if r.event == AuditEvent.CONNECT and r.client_addr.startswith("127.0.0.1:")
    ]
    assert len(connects) == 1 + 3 + 1  # live, the wrong passwords, again
    assert not any(
        r.event == AuditEvent.AUTH_FAIL for r in records if r.client_addr.startswith("127.0.0.2:")
    )
    # The log file likewise: one line at once, one for the rest.
    pattern = re.compile(r"logins refused after too many failed ones: (\d+) refused since")
    assert [int(n) for n in pattern.findall(throttled.log())] == [1, refused_total - 1]
    assert password not in throttled.log()


def _refused_count(record: AuditRecord) -> int:
    return int(record.detail.removeprefix("refused=")) if record.sqlstate == "28000" else 0


def _begin_scram(sock: socket.socket, user: str, app: str) -> tuple[ScramClient, bytes]:
    """StartupMessage and client-first over `sock`: the client and the server-first data."""
    sock.sendall(
        messages.startup_message({"user": user, "database": "app", "application_name": app})
    )
    msg_type, payload = _read_message(sock)
    assert msg_type == b"R", (msg_type, payload)
    client = ScramClient("not-the-password")
    sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
    msg_type, payload = _read_message(sock)
    assert msg_type == b"R", (msg_type, payload)
    return client, messages.parse_authentication(payload)[1]


def test_logins_begun_together_get_no_more_guesses_than_the_budget(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """The budget was checked when a login began and a failure counted when it ended: a
    guesser that began many logins at once (up to max_unauthenticated_per_host, 128) had every
    one of their passwords checked, 128 guesses where auth_fail_burst allows 10. A password is
    checked only while the address has budget left; the others are refused (28000) unchecked."""
    throttled = proxy_factory(listener={"auth_fail_burst": 2, "auth_fail_rate_per_s": 0.01})
    app = _app("race")
    socks = [_connect_from(throttled, "127.0.0.1") for _ in range(8)]
    try:
        begun = [_begin_scram(sock, "alice", f"{app}-{i}") for i, sock in enumerate(socks)]
        # Every login is past the check at its StartupMessage: now all the proofs at once.
        for sock, (client, server_first) in zip(socks, begun, strict=True):
            sock.sendall(messages.sasl_response(client.client_final(server_first)))
        codes = [_expect_fatal(sock)["C"] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert sorted(codes) == ["28000"] * 6 + ["28P01"] * 2, codes
    # Each of them has its connect record, and its own auth_fail saying which it was.
    records = throttled.audit(
        until=lambda rs: sum(r.event == AuditEvent.DISCONNECT for r in rs) >= 8, timeout=10
    )
    fails = sorted(
        (r.sqlstate, r.reason, r.detail) for r in records if r.event == AuditEvent.AUTH_FAIL
    )
    assert fails == [
        ("28000", "too many failed logins from this client address (auth_fail_burst)", "")
    ] * 6 + [
        ("28P01", "SCRAM proof is invalid", ""),
        ("28P01", "SCRAM proof is invalid", "locked out: logins from 127.0.0.1 refused for 100 s"),
    ]
    assert sum(r.event == AuditEvent.CONNECT for r in records) == 8


def test_a_login_error_quoting_a_startup_value_cannot_forge_log_lines(proxy: Proxy) -> None:
    """PostgreSQL quotes a refused startup value as the client sent it, newlines included:
    dbward's log is one line per event, and keeps none of the value."""
    app = _app("datestyle-newline")
    forged = f"FORGED-{uuid.uuid4().hex} ERROR dbward.server: listener main: this line is forged"
    with _connect_raw(proxy) as sock:
        datestyle = f"x\n{forged}\r\x1b[2K"
        assert (
            _scram_authenticate(sock, "alice", USERS["alice"][0], app, DateStyle=datestyle) is None
        )
        assert _expect_fatal(sock)["C"] == "22023"
    records = _session(proxy, app, _has_event(AuditEvent.UPSTREAM_LOST))
    assert not any(forged in r.reason for r in records)
    mark = f"session {records[0].session_id}: upstream refused"
    deadline = time.monotonic() + 5
    while mark not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in proxy.log().splitlines() if mark in line]
    assert len(lines) == 1 and lines[0].endswith('parameter "DateStyle": <...>'), lines
    assert forged not in proxy.log() and "\x1b" not in proxy.log()
