"""The operations endpoint of a real `dbward serve`: /metrics, /healthz, /readyz over real HTTP.

The counters must move by exactly what the test did through psycopg, agree with the audit log,
and never show SQL, identities or addresses; readiness follows the drain and the audit writer.
"""

from __future__ import annotations

import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbward.audit.query import search
from fixtures.clients import app_name
from fixtures.ports import free_port
from fixtures.postgres import PgServer
from fixtures.proxy import USERS, Proxy, write_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _http(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def _scrape(proxy: Proxy) -> tuple[str, Samples]:
    assert proxy.metrics_port is not None
    status, text, headers = _http(proxy.metrics_port, "/metrics")
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _moved(before: Samples, after: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The series of `name` that changed, by labels, and by how much."""
    out = {}
    for (metric, labels), value in after.items():
        if metric == name and value != before.get((metric, labels), 0.0):
            out[labels] = value - before.get((metric, labels), 0.0)
    return out


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_counters_move_by_what_was_done_and_agree_with_the_audit_log(
    proxy_factory: Callable[..., Proxy], pg_server: PgServer
) -> None:
    proxy = proxy_factory(metrics=True)
    assert proxy.metrics_port is not None
    _, before = _scrape(proxy)
    app = app_name("metrics")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.execute("CREATE TEMP TABLE m (x int)")
        conn.execute("INSERT INTO m VALUES (1), (2)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET ROLE postgres")
        conn.cancel_safe()  # idle: forwarded to PostgreSQL, which ignores it
        _, during = _scrape(proxy)
        assert _value(during, "dbward_sessions_active", listener="test") == 1
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**{**proxy.conninfo(), "password": "wrong-password"}, connect_timeout=10)

    records = proxy.audit(
        until=lambda rs: (
            sum(r.event == "disconnect" for r in rs) == 1 and any(r.event == "cancel" for r in rs)
        )
    )

    # Quiet now: every record committed is in the log, and the counters have settled.
    def settled() -> bool:
        _, now = _scrape(proxy)
        return _value(now, "dbward_audit_queue_records") == 0 and _value(
            now, "dbward_audit_records_total"
        ) == len(search(proxy.audit_path, limit=1_000_000))

    _wait_for(settled, "the audit queue to empty")
    text, after = _scrape(proxy)
    records = search(proxy.audit_path, limit=1_000_000)

    # Statements: exactly the five sent, by decision and kind, as the audit log has them.
    statements = [r for r in records if r.event == "statement" and r.application_name == app]
    assert [(r.command, r.decision) for r in statements] == [
        ("SELECT", "allow"),
        ("SELECT", "allow"),
        ("CREATE TABLE", "allow"),
        ("INSERT", "allow"),
        ("SET", "deny"),
    ]
    by_audit = Counter((r.decision, r.kind) for r in statements)
    moved = _moved(before, after, "dbward_statements_total")
    assert {(dict(k)["decision"], dict(k)["kind"]): v for k, v in moved.items()} == by_audit
    assert all(dict(k)["listener"] == "test" for k in moved)
    assert sum(v for k, v in moved.items() if dict(k)["decision"] == "allow") == 4
    assert by_audit[("allow", "read")] == 2

    # Logins: one ok, one failed (wrong password); three connections (the session, the cancel
    # request's own, the failed login); one cancel forwarded.
    assert _moved(before, after, "dbward_logins_total") == {
        (("listener", "test"), ("result", "ok")): 1,
        (("listener", "test"), ("result", "failed")): 1,
    }
    assert [r.event for r in records if r.event in ("auth_ok", "auth_fail")] == [
        "auth_ok",
        "auth_fail",
    ]
    assert _moved(before, after, "dbward_connections_total") == {(("listener", "test"),): 3}
    assert _moved(before, after, "dbward_cancel_requests_total") == {
        (("listener", "test"), ("result", "forwarded")): 1
    }
    assert [r.status for r in records if r.event == "cancel"] == ["forwarded"]
    for quiet in (
        "dbward_upstream_lost_total",
        "dbward_protocol_errors_total",
        "dbward_privilege_escalations_total",
        "dbward_connections_refused_total",
    ):
        assert _moved(before, after, quiet) == {}, quiet
    assert _value(after, "dbward_sessions_active", listener="test") == 0
    assert _value(after, "dbward_sessions_max", listener="test") == 500
    assert _value(after, "dbward_listener_up", listener="test") == 1
    assert _value(after, "dbward_audit_failing") == 0
    assert _value(after, "dbward_draining") == 0
    assert _value(after, "dbward_audit_records_total") == len(records) > 0
    assert ("dbward_build_info", (("version", "0.1.0"),)) in after
    assert _value(after, "process_open_fds") > 0

    # Nothing a client sent or is: no SQL, identities, passwords, addresses, names.
    password, _ = USERS["alice"]
    forbidden = [
        "alice",
        "SELECT",
        "ROLE",
        "INSERT",
        app,
        password,
        "wrong-password",
        "127.0.0.1",
        pg_server.service_user,
        str(proxy.port),
    ]
    for needle in forbidden:
        assert needle not in text, needle


def test_health_readiness_and_http_errors(proxy_factory: Callable[..., Proxy]) -> None:
    proxy = proxy_factory(metrics=True)
    port = proxy.metrics_port
    assert port is not None
    assert _http(port, "/healthz")[:2] == (200, "ok\n")
    assert _http(port, "/readyz")[:2] == (200, "ready\n")
    # No versions of aiohttp or Python for whoever can reach the port.
    assert {_http(port, path)[2].get("Server") for path in ("/healthz", "/metrics", "/x")} == {
        "dbward"
    }
    assert _http(port, "/metrics?name[]=x")[0] == 200  # a query string changes nothing
    assert _http(port, "/")[0] == 404
    assert _http(port, "/metrics/")[0] == 404
    assert _http(port, "/admin")[0] == 404
    for method in ("POST", "PUT", "DELETE"):
        status, _, headers = _http(port, "/metrics", method)
        assert (status, headers.get("Allow")) == (405, "GET"), method
    # Headers beyond aiohttp's limits (8190-byte field) are refused, not buffered.
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/healthz", headers={"X-Big": "a" * 20_000}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code in (400, 431)
    many = urllib.request.Request(
        f"http://127.0.0.1:{port}/healthz", headers={f"X-H{i}": "1" for i in range(200)}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(many, timeout=5)
    assert refused.value.code in (400, 431)
    assert _http(port, "/healthz")[0] == 200  # and it carries on


def test_readyz_is_503_while_draining(proxy_factory: Callable[..., Proxy]) -> None:
    proxy = proxy_factory(metrics=True)
    port = proxy.metrics_port
    assert port is not None
    conn = psycopg.connect(**proxy.conninfo(), autocommit=True)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(conn.execute, "SELECT pg_sleep(3)")
            time.sleep(0.5)  # the statement is in flight: the drain waits for it
            proxy.process.send_signal(signal.SIGTERM)
            _wait_for(lambda: _http(port, "/readyz")[0] == 503, "/readyz to say 503", 3.0)
            status, body, _ = _http(port, "/readyz")
            assert (status, body) == (503, "not ready: draining: shutting down\n")
            assert _http(port, "/healthz")[0] == 200  # alive: still draining
            _, samples = _scrape(proxy)
            assert _value(samples, "dbward_draining") == 1
            assert _value(samples, "dbward_listener_up", listener="test") == 0
            running.result(timeout=10)  # the in-flight statement finished
    finally:
        conn.close()
    assert proxy.process.wait(timeout=15) == 0
    with pytest.raises(urllib.error.URLError):  # closed with the proxy
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def _writer_pid(proxy: Proxy) -> int:
    children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children")
    for pid in children.read_text().split():
        if b"dbward.audit.writer_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError("no audit writer")


def test_readyz_is_503_while_the_audit_writer_is_down(proxy_factory: Callable[..., Proxy]) -> None:
    proxy = proxy_factory(metrics=True)
    port = proxy.metrics_port
    assert port is not None
    _, before = _scrape(proxy)
    assert _value(before, "dbward_audit_failing") == 0
    os.kill(_writer_pid(proxy), signal.SIGKILL)  # restarted within a second or so
    answers: list[tuple[int, str]] = []

    def refused() -> bool:
        answers.append(_http(port, "/readyz")[:2])
        return answers[-1][0] == 503

    _wait_for(refused, "/readyz to say 503", 3.0)
    assert answers[-1][1] == "not ready: audit log failing: statements are refused\n"
    _wait_for(lambda: _http(port, "/readyz")[0] == 200, "/readyz to recover", 10.0)
    _, after = _scrape(proxy)
    assert _value(after, "dbward_audit_failing") == 0
    assert _value(after, "dbward_audit_writer_restarts_total") == 1


def _ask(endpoint: http.client.HTTPConnection, path: str) -> tuple[int, str]:
    endpoint.request("GET", path)
    response = endpoint.getresponse()
    return response.status, response.read().decode()


def _accept_failing(endpoint: http.client.HTTPConnection) -> float:
    status, text = _ask(endpoint, "/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        if family.name == "dbward_accept_failing":
            return float(family.samples[0].value)
    raise AssertionError("no dbward_accept_failing")


def test_readyz_is_503_while_accepts_fail_for_want_of_file_descriptors(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """Review 45: with its file descriptors used up, dbward's listeners cannot accept (uvloop
    accepts and closes each new connection, saying nothing), and /readyz still said 200."""
    proxy = proxy_factory(metrics=True)
    assert proxy.metrics_port is not None
    pid = proxy.process.pid
    # Opened while descriptors are left: a new HTTP connection could not be accepted later.
    endpoint = http.client.HTTPConnection("127.0.0.1", proxy.metrics_port, timeout=5)
    assert _ask(endpoint, "/readyz") == (200, "ready\n")
    limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    clients: list[socket.socket] = []
    try:
        # Room for two more connections (a connection before its StartupMessage holds one).
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 2, limit[1]))
        for _ in range(6):
            clients.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        clients[-1].settimeout(5)
        assert clients[-1].recv(1) == b""  # accepted and closed at once: no descriptor for it
        _wait_for(lambda: _ask(endpoint, "/readyz")[0] == 503, "/readyz to say 503", 5.0)
        assert _ask(endpoint, "/readyz") == (
            503,
            "not ready: out of file descriptors: new connections cannot be accepted\n",
        )
        assert _accept_failing(endpoint) == 1
        assert "out of file descriptors (Too many open files)" in proxy.log()
    finally:
        for client in clients:
            client.close()  # their sessions end: descriptors are free again
    resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
    # Ready again a few seconds (ACCEPT_RECOVERY_S) after the last failure, by itself.
    _wait_for(lambda: _ask(endpoint, "/readyz") == (200, "ready\n"), "/readyz to recover", 10.0)
    assert _accept_failing(endpoint) == 0
    _wait_for(lambda: "file descriptors available again" in proxy.log(), "the log to say so")
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    endpoint.close()


def test_a_metrics_port_in_use_stops_startup_with_exit_1(
    pg_server: PgServer, tmp_path: Path
) -> None:
    with socket_bound() as taken:
        config = tmp_path / "dbward.yaml"
        write_config(
            config,
            pg_server,
            free_port(),
            extra={
                "metrics": {"listen": f"127.0.0.1:{taken}"},
                "audit": {"path": str(tmp_path / "audit.db")},
            },
        )
        done = subprocess.run(
            [sys.executable, "-m", "dbward", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert (
        f"dbward: cannot start: metrics.listen: cannot listen on 127.0.0.1:{taken}: "
        "Address already in use"
    ) in done.stderr


@contextmanager
def socket_bound() -> Iterator[int]:
    """A listening loopback socket on a free port, for the duration of the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port: int = sock.getsockname()[1]
        yield port
