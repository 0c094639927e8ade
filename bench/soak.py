"""Soak test: churn real clients and failure paths through one dbward for a long time and watch
for anything that grows with the load and does not come back.

    PYTHONPATH=src python bench/soak.py --duration 600 --workers 12

Starts a throwaway PostgreSQL (the test fixture) and one `dbward serve` (TLS optional, strict
audit), then runs `--workers` threads, each picking scenarios at random: psycopg sessions over
TLS and plain, pipelines, prepared statements, COPY in and out, LISTEN/NOTIFY, cancels with
the right and wrong keys, denied statements, errors, statements large enough for the
classifier worker pool, sessions ending inside a transaction, and the failure paths: wrong
passwords, unknown users, connections dropped mid-SCRAM, mid-TLS-handshake, right after the
password (while dbward connects upstream), mid-message and mid-query, and clients that never
log in (auth timeout).

Every `--sample` seconds it records dbward's RSS, open fds, threads, child processes and the
PostgreSQL backends of the service role; every `--probe` seconds (gdb attached while the event
loop waits in epoll, see soak_probe.py: read only) the listener's tables (sessions,
unauthenticated, partial_message_bytes, cancel keys and buckets), the classifier caches, the
audit sink's queues, asyncio tasks and live PgSession objects. After the load it waits
`--grace` seconds and prints start / peak / end-of-load / after-grace for each, with the RSS
and fd slope over the second half of the load, and flags what did not come back.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from harness import _stop_process, _wait_port  # noqa: E402

from dbward.wire.postgres import messages  # noqa: E402
from dbward.wire.postgres.scram import ScramClient, make_verifier  # noqa: E402
from fixtures.ports import free_port  # noqa: E402
from fixtures.postgres import PgServer, _clean_env, start_pg_server, stop_pg_server  # noqa: E402
from fixtures.tls import make_test_ca  # noqa: E402

USER = "soak"
TABLE = "soak_t"
PROBE_FILE = ROOT / "bench" / "soak_probe.py"
AUTH_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------- environment


@dataclass
class SoakEnv:
    pg: PgServer
    pg_base: Path
    work: Path
    port: int
    password: str
    ca_cert: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def conninfo(self, *, tls: bool = False, **over: Any) -> dict[str, Any]:
        info: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": USER,
            "password": self.password,
            "dbname": self.pg.database,
            "sslmode": "require" if tls else "disable",
            "connect_timeout": 10,
        }
        info.update(over)
        return info


def start_env(tracemalloc_frames: int = 0) -> SoakEnv:
    pg, pg_base = start_pg_server(None)
    work = Path(tempfile.mkdtemp(prefix="dbward-soak-"))
    os.chmod(work, 0o755)
    traced: dict[str, str] = {}
    if tracemalloc_frames:
        (work / "tracemalloc").mkdir()
        traced = {
            "PYTHONTRACEMALLOC": str(tracemalloc_frames),
            "DBWARD_SOAK_TRACEMALLOC_DIR": str(work / "tracemalloc"),
        }
    ca = make_test_ca(work / "ca")
    pg.psql(
        f"CREATE TABLE {TABLE} (id int, v text);\n"
        f"ALTER TABLE {TABLE} OWNER TO {pg.service_user};\n"
        f"INSERT INTO {TABLE} SELECT g, md5(g::text) FROM generate_series(1, 1000) g;\n"
    )
    password = secrets.token_urlsafe(12)
    port = free_port()
    secret = work / "upstream-password"
    secret.write_text(pg.service_password)
    secret.chmod(0o600)
    config = {
        "audit": {"path": str(work / "audit.db"), "durability": "strict"},
        "users": [{"name": USER, "password_verifier": make_verifier(password), "groups": []}],
        "listeners": [
            {
                "name": "soak",
                "protocol": "postgres",
                "listen": f"127.0.0.1:{port}",
                "tls": {
                    "mode": "optional",
                    "cert_file": str(ca.server_cert),
                    "key_file": str(ca.server_key),
                },
                "auth_timeout_s": AUTH_TIMEOUT_S,
                # Every failure mode here comes from 127.0.0.1, as the good traffic does: a
                # budget this large runs the login throttle's accounting on each failure
                # without ever refusing (refusals: tests/e2e/test_startup_auth.py).
                "auth_fail_burst": 1_000_000,
                "auth_fail_rate_per_s": 10_000,
                "upstream": {
                    "host": "127.0.0.1",
                    "port": pg.port,
                    "database": pg.database,
                    "user": pg.service_user,
                    "password_file": str(secret),
                    "tls": {"mode": "disable"},
                },
            }
        ],
        "shutdown_grace_s": 5,
        "log_level": "warning",
    }
    config_path = work / "dbward.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = work / "dbward.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbward", "serve", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**_clean_env(), "PYTHONUNBUFFERED": "1", **traced},
        )
    _wait_port(port, proc, log_path, "dbward")
    return SoakEnv(pg, pg_base, work, port, password, ca.ca_cert, proc, log_path)


def stop_env(env: SoakEnv, keep: bool) -> None:
    _stop_process(env.process)
    stop_pg_server(env.pg, env.pg_base)
    if keep:
        print(f"[soak] kept {env.work}", file=sys.stderr)
    else:
        shutil.rmtree(env.work, ignore_errors=True)


# ---------------------------------------------------------------------- raw-protocol helpers


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _read_msg(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _recv_exact(sock, 5)
    length = int.from_bytes(head[1:], "big")
    return head[:1], _recv_exact(sock, length - 4)


def _connect(env: SoakEnv) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    sock.settimeout(10)
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): a client that vanishes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def _login(env: SoakEnv, app: str) -> tuple[socket.socket, int, bytes]:
    sock = _connect(env)
    sock.sendall(
        messages.startup_message(
            {"user": USER, "database": env.pg.database, "application_name": app}
        )
    )
    client = ScramClient(env.password)
    _read_msg(sock)
    sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
    _, payload = _read_msg(sock)
    sock.sendall(
        messages.sasl_response(client.client_final(messages.parse_authentication(payload)[1]))
    )
    pid, key = 0, b""
    while True:
        kind, payload = _read_msg(sock)
        if kind == b"K":
            pid, key = messages.parse_backend_key_data(payload)
        elif kind == b"Z":
            return sock, pid, key
        elif kind == b"E":
            raise RuntimeError(messages.parse_error_fields(payload).get("M"))


# ---------------------------------------------------------------------- scenarios


class Expected(Exception):
    """The failure the scenario was meant to provoke."""


def sc_plain(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-plain")) as conn:
        for _ in range(random.randint(1, 20)):
            conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id < %s", (random.randint(1, 999),))
        conn.execute("SELECT %s::text, now()", (secrets.token_hex(8),)).fetchall()


def sc_tls(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(tls=True, application_name="soak-tls")) as conn:
        for _ in range(random.randint(1, 10)):
            conn.execute(f"SELECT v FROM {TABLE} WHERE id = %s", (random.randint(1, 999),))


def sc_wrong_password(env: SoakEnv) -> None:
    try:
        psycopg.connect(**env.conninfo(password="wrong", tls=random.random() < 0.3)).close()
    except psycopg.OperationalError as exc:
        raise Expected from exc


def sc_unknown_user(env: SoakEnv) -> None:
    try:
        psycopg.connect(**env.conninfo(user=f"nobody{random.randint(0, 10**6)}")).close()
    except psycopg.OperationalError as exc:
        raise Expected from exc


def sc_drop_mid_scram(env: SoakEnv) -> None:
    sock = _connect(env)
    sock.sendall(messages.startup_message({"user": USER, "database": env.pg.database}))
    _read_msg(sock)
    client = ScramClient(env.password)
    sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
    _read_msg(sock)
    (_reset if random.random() < 0.5 else socket.socket.close)(sock)


def sc_drop_after_password(env: SoakEnv) -> None:
    """The client's last SCRAM message, then gone: dbward is connecting upstream."""
    sock = _connect(env)
    sock.sendall(messages.startup_message({"user": USER, "database": env.pg.database}))
    _read_msg(sock)
    client = ScramClient(env.password)
    sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
    _, payload = _read_msg(sock)
    sock.sendall(
        messages.sasl_response(client.client_final(messages.parse_authentication(payload)[1]))
    )
    if random.random() < 0.5:
        time.sleep(random.random() * 0.01)
    _reset(sock)


def sc_drop_mid_tls(env: SoakEnv) -> None:
    sock = _connect(env)
    sock.sendall(messages.ssl_request())
    if _recv_exact(sock, 1) != b"S":
        raise RuntimeError("TLS refused")
    how = random.randrange(3)
    if how == 0:  # gone right after 'S'
        _reset(sock)
        return
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if how == 1:  # half a ClientHello
        sock.sendall(hello[: len(hello) // 2])
        time.sleep(0.01)
        _reset(sock)
    else:  # a whole ClientHello, read the ServerHello, then gone
        sock.sendall(hello)
        try:
            sock.recv(4096)
        except OSError:
            pass
        (_reset if random.random() < 0.5 else socket.socket.close)(sock)


def sc_garbage_tls(env: SoakEnv) -> None:
    """Not TLS at all after 'S': the handshake fails on dbward's side."""
    sock = _connect(env)
    sock.sendall(messages.ssl_request())
    _recv_exact(sock, 1)
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)
    try:
        sock.recv(100)
    except OSError:
        pass
    sock.close()


def sc_idle_unauthenticated(env: SoakEnv) -> None:
    """Connect and say nothing (or only half a startup packet): ended by auth_timeout_s."""
    sock = _connect(env)
    if random.random() < 0.5:
        sock.sendall(messages.startup_message({"user": USER})[:6])
    sock.settimeout(AUTH_TIMEOUT_S + 5)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    sock.close()


def sc_pipeline(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-pipe")) as conn, conn.pipeline():
        cur = conn.cursor()
        for i in range(random.randint(5, 50)):
            cur.execute(f"SELECT v FROM {TABLE} WHERE id = %s", (i,))


def sc_pipeline_error(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-pipe-err")) as conn:
        try:
            with conn.pipeline():
                cur = conn.cursor()
                for i in range(random.randint(1, 10)):
                    cur.execute("SELECT %s::int", (i,))
                cur.execute("SELECT 1/0")
                for i in range(5):
                    cur.execute("SELECT %s::int", (i,))
        except psycopg.errors.DivisionByZero as exc:
            raise Expected from exc


def sc_prepared(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-prep")) as conn:
        for i in range(random.randint(5, 30)):
            conn.execute(f"SELECT v FROM {TABLE} WHERE id = %s", (i,), prepare=True)
        conn.execute("PREPARE soak_p(int) AS SELECT $1 + 1")
        conn.execute("EXECUTE soak_p(1)")
        with conn.transaction(), conn.cursor(name="soak_cur") as cur:
            cur.execute(f"SELECT * FROM {TABLE}")
            cur.fetchmany(10)
        if random.random() < 0.5:
            conn.execute("DEALLOCATE ALL")


def sc_copy(env: SoakEnv) -> None:
    with (
        psycopg.connect(**env.conninfo(application_name="soak-copy")) as conn,
        conn.cursor() as cur,
    ):
        with cur.copy(f"COPY {TABLE} (id, v) FROM STDIN") as copy:
            for i in range(random.randint(1, 200)):
                copy.write_row((10_000 + i, "copied"))
        with cur.copy(f"COPY (SELECT * FROM {TABLE} LIMIT 500) TO STDOUT") as copy:
            for _ in copy:
                pass
        cur.execute(f"DELETE FROM {TABLE} WHERE id >= 10000")


def sc_copy_fail(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-copyfail")) as conn:
        try:
            with conn.cursor() as cur, cur.copy(f"COPY {TABLE} (id, v) FROM STDIN") as copy:
                copy.write_row((1, "x"))
                raise ValueError("abandon the copy")
        except (ValueError, psycopg.errors.QueryCanceled) as exc:
            raise Expected from exc


def sc_cancel(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-cancel")) as conn:
        timer = threading.Timer(0.2, conn.cancel_safe)
        timer.start()
        try:
            conn.execute("SELECT pg_sleep(3)")
        except psycopg.errors.QueryCanceled as exc:
            raise Expected from exc
        finally:
            timer.cancel()


def sc_cancel_wrong_key(env: SoakEnv) -> None:
    sock = _connect(env)
    sock.sendall(messages.cancel_request(random.randint(1, 2**31 - 1), secrets.token_bytes(4)))
    try:
        sock.recv(10)
    except OSError:
        pass
    sock.close()


def sc_vanish_mid_query(env: SoakEnv) -> None:
    sock, _, _ = _login(env, "soak-vanish")
    sock.sendall(messages.query("SELECT pg_sleep(2)"))
    time.sleep(random.random() * 0.2)
    _reset(sock)


def sc_vanish_mid_message(env: SoakEnv) -> None:
    """Half of a 2 MB Query, then gone: its bytes were counted in partial_message_bytes."""
    sock, _, _ = _login(env, "soak-halfmsg")
    frame = messages.query("SELECT '" + "x" * 2_000_000 + "'")
    sock.sendall(frame[: len(frame) // 2])
    time.sleep(0.05)
    _reset(sock)


def sc_vanish_mid_result(env: SoakEnv) -> None:
    """A large result not read, then gone (dbward paused reading the upstream)."""
    sock, _, _ = _login(env, "soak-bigresult")
    sock.sendall(messages.query("SELECT repeat('y', 1000) FROM generate_series(1, 20000)"))
    time.sleep(0.1)
    _reset(sock)


def sc_denied(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-denied")) as conn:
        try:
            conn.execute("SELECT set_config('role', 'postgres', false)")
        except psycopg.errors.InsufficientPrivilege as exc:
            raise Expected from exc


def sc_large(env: SoakEnv) -> None:
    """Statements the classifier worker pool reads: 70 KB of SQL, a 5 KB DO block."""
    with psycopg.connect(**env.conninfo(application_name="soak-large")) as conn:
        values = ",".join(str(i) for i in range(14_000))
        tag = secrets.token_hex(4)
        conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id IN ({values}) /*{tag}*/")
        body = "\n".join(f"  x := x + {i};" for i in range(300))
        conn.execute(f"DO $$ DECLARE x int := 0; BEGIN\n{body}\nEND $$")


def sc_errors(env: SoakEnv) -> None:
    with psycopg.connect(**env.conninfo(application_name="soak-errors"), autocommit=True) as conn:
        for sql in ("SELECT 1/0", "SELEC oops", "SELECT * FROM no_such_table", "SELECT 'a'::int"):
            try:
                conn.execute(sql)
            except psycopg.Error:
                pass
        conn.execute("SELECT 1")


def sc_listen_notify(env: SoakEnv) -> None:
    channel = f"soak_{random.randint(0, 3)}"
    with (
        psycopg.connect(**env.conninfo(application_name="soak-listen"), autocommit=True) as a,
        psycopg.connect(**env.conninfo(application_name="soak-notify"), autocommit=True) as b,
    ):
        a.execute(f"LISTEN {channel}")
        b.execute(f"NOTIFY {channel}, 'hello'")
        for _ in a.notifies(timeout=2, stop_after=1):
            pass


def sc_end_in_transaction(env: SoakEnv) -> None:
    conn = psycopg.connect(**env.conninfo(application_name="soak-intx"))
    conn.execute(f"INSERT INTO {TABLE} VALUES (-1, 'never committed')")
    if random.random() < 0.5:
        try:
            conn.execute("SELECT 1/0")  # aborted block
        except psycopg.Error:
            pass
    if random.random() < 0.5:
        conn.pgconn.finish()  # Terminate inside the block
    else:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        _reset(sock)  # vanish inside the block
        conn.pgconn.finish()


SCENARIOS: dict[str, tuple[float, Callable[[SoakEnv], None]]] = {
    "plain": (10, sc_plain),
    "tls": (6, sc_tls),
    "wrong_password": (4, sc_wrong_password),
    "unknown_user": (3, sc_unknown_user),
    "drop_mid_scram": (3, sc_drop_mid_scram),
    "drop_after_password": (3, sc_drop_after_password),
    "drop_mid_tls": (4, sc_drop_mid_tls),
    "garbage_tls": (2, sc_garbage_tls),
    "idle_unauthenticated": (0.5, sc_idle_unauthenticated),
    "pipeline": (4, sc_pipeline),
    "pipeline_error": (2, sc_pipeline_error),
    "prepared": (4, sc_prepared),
    "copy": (3, sc_copy),
    "copy_fail": (2, sc_copy_fail),
    "cancel": (2, sc_cancel),
    "cancel_wrong_key": (2, sc_cancel_wrong_key),
    "vanish_mid_query": (3, sc_vanish_mid_query),
    "vanish_mid_message": (1, sc_vanish_mid_message),
    "vanish_mid_result": (2, sc_vanish_mid_result),
    "denied": (3, sc_denied),
    "large": (1.5, sc_large),
    "errors": (3, sc_errors),
    "listen_notify": (2, sc_listen_notify),
    "end_in_transaction": (3, sc_end_in_transaction),
}


# ---------------------------------------------------------------------- sampling


def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sample(env: SoakEnv, pg_conn: psycopg.Connection[Any]) -> dict[str, float]:
    pid = env.process.pid
    status = _proc_status(pid)
    kids = _descendants(pid)
    kid_rss = 0
    for kid in kids:
        try:
            kid_rss += _proc_status(kid).get("VmRSS", 0)
        except OSError:
            pass
    row = pg_conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE state = 'idle in transaction') "
        "FROM pg_stat_activity WHERE usename = %s",
        (env.pg.service_user,),
    ).fetchone()
    assert row is not None
    return {
        "rss_kb": status["VmRSS"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": status["Threads"],
        "children": len(kids),
        "children_rss_kb": kid_rss,
        "pg_backends": row[0],
        "pg_idle_in_tx": row[1],
    }


_GDB_SCRIPT = """
set pagination off
set confirm off
python
import gdb
min(gdb.selected_inferior().threads(), key=lambda t: t.num).switch()  # the event loop
frame, names = gdb.newest_frame(), []
while frame is not None and len(names) < 8:
    names.append(frame.name() or "")
    frame = frame.older()
if any("epoll" in name for name in names):
    gdb.execute("set $soak_gil = (int)PyGILState_Ensure()", to_string=True)
    gdb.execute(%s, to_string=True)
    gdb.execute("call (void)PyGILState_Release($soak_gil)", to_string=True)
    print("SOAK_PROBED")
else:
    print("SOAK_BUSY " + ",".join(names))
end
detach
quit
"""


def probe(pid: int, out: Path, attempts: int = 30) -> dict[str, Any] | None:
    """The internal tables, read in-process with gdb while the event loop waits in epoll."""
    code = f"import runpy; runpy.run_path('{PROBE_FILE}')['_soak_snapshot']('{out}')"
    script = out.with_suffix(".gdb")
    call = 'call (int)PyRun_SimpleString("' + code.replace('"', '\\"') + '")'
    script.write_text(_GDB_SCRIPT % repr(call))
    for _ in range(attempts):
        out.unlink(missing_ok=True)
        proc = subprocess.run(
            ["gdb", "-q", "-batch", "-nx", "-p", str(pid), "-x", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if "SOAK_PROBED" in proc.stdout and out.exists():
            try:
                return dict(json.loads(out.read_text()))
            except ValueError:
                return None
        time.sleep(0.1)
    print(f"[soak] probe failed: {proc.stdout[-600:]} {proc.stderr[-600:]}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------- driver


@dataclass
class Stats:
    ok: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    samples_of_unexpected: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def worker(env: SoakEnv, stop: threading.Event, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    names = list(SCENARIOS)
    weights = [SCENARIOS[n][0] for n in names]
    while not stop.is_set():
        name = rng.choices(names, weights)[0]
        try:
            SCENARIOS[name][1](env)
            outcome = "ok"
        except Expected:
            outcome = "expected"
        except Exception as exc:
            outcome = "unexpected"
            with stats.lock:
                stats.samples_of_unexpected.setdefault(name, f"{type(exc).__name__}: {exc}"[:300])
        with stats.lock:
            getattr(stats, outcome)[name] += 1


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.2f}"


def slope_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


# Bounded by design (LRU caches, the cancel rate table): reported, not expected back at zero.
_BOUNDED = ("cache_entries", "template_entries", "cached_bytes", "cancel_buckets", "probe_failed")
# Allocator figures explain RSS; they are judged through rss_kb, not on their own.
_ALLOCATOR = ("pymalloc_blocks", "malloc_", "tracemalloc_kb")


def _traced_growth(snap_dir: Path, top: int = 15) -> list[str]:
    """Top allocating lines by growth between the first and the last tracemalloc snapshot."""
    import tracemalloc

    snaps = sorted(snap_dir.glob("*.snap")) if snap_dir.is_dir() else []
    if len(snaps) < 2:
        return []
    first = tracemalloc.Snapshot.load(str(snaps[0]))
    last = tracemalloc.Snapshot.load(str(snaps[-1]))
    stats = last.compare_to(first, "traceback")
    lines = []
    for stat in stats[:top]:
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback[:4])
        lines.append(f"{stat.size_diff / 1024:+9.0f} KiB {stat.count_diff:+7d} blocks  {frames}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--workers", type=int, default=12, help="client threads")
    parser.add_argument("--sample", type=float, default=5, help="seconds between samples")
    parser.add_argument("--probe", type=float, default=30, help="seconds between gdb probes")
    parser.add_argument("--grace", type=float, default=20, help="seconds after the load")
    parser.add_argument("--no-gdb", action="store_true", help="skip the in-process probe")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, audit)")
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="run dbward under tracemalloc (slower) and print what grew between the first and"
        " last probe, by allocating line",
    )
    args = parser.parse_args()
    use_gdb = not args.no_gdb and shutil.which("gdb") is not None

    print("[soak] starting PostgreSQL and dbward", file=sys.stderr, flush=True)
    env = start_env(args.tracemalloc)
    out_file = env.work / "probe.json"
    series: list[dict[str, Any]] = []
    stats = Stats()
    t0 = time.monotonic()

    def take(phase: str, with_probe: bool) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - t0, 1), "phase": phase}
        row.update(sample(env, pg_conn))
        if with_probe and use_gdb:
            row.update(probe(env.process.pid, out_file) or {"probe_failed": 1})
        series.append(row)
        return row

    try:
        pg_conn = psycopg.connect(env.pg.dsn(user=env.pg.trust_user), autocommit=True)
        # Warm up: one of each scenario, so one-time allocations are in the baseline.
        for name, (_, fn) in SCENARIOS.items():
            if name == "idle_unauthenticated":
                continue
            try:
                fn(env)
            except Expected:
                pass
        time.sleep(AUTH_TIMEOUT_S + 2)
        base = take("start", True)
        print(f"[soak] baseline {base}", file=sys.stderr, flush=True)
        stop = threading.Event()
        threads = [
            threading.Thread(target=worker, args=(env, stop, stats, i), daemon=True)
            for i in range(args.workers)
        ]
        for thread in threads:
            thread.start()
        load_start = time.monotonic()
        next_probe = load_start + args.probe
        while time.monotonic() - load_start < args.duration:
            time.sleep(args.sample)
            due = time.monotonic() >= next_probe
            if due:
                next_probe = time.monotonic() + args.probe
            row = take("load", due)
            with stats.lock:
                done = sum(stats.ok.values()) + sum(stats.expected.values())
                bad = sum(stats.unexpected.values())
            print(
                f"[soak] t={row['t']:.0f}s runs={done} unexpected={bad} "
                f"rss={row['rss_kb'] // 1024}MB fds={row['fds']} backends={row['pg_backends']}"
                + (f" sessions={row.get('listener0.sessions')}" if due else ""),
                file=sys.stderr,
                flush=True,
            )
        stop.set()
        for thread in threads:
            thread.join(60)
        take("end-of-load", True)
        time.sleep(args.grace)
        end = take("after-grace", True)
    finally:
        with_log = env.log_path.read_text(errors="replace")
        grown = _traced_growth(env.work / "tracemalloc") if args.tracemalloc else []
        stop_env(env, args.keep)

    if args.json:
        args.json.write_text(json.dumps(series, indent=1))
    load = [r for r in series if r["phase"] == "load"]
    half = load[len(load) // 2 :]
    print("\n== soak report ==")
    print(
        f"duration {args.duration:.0f}s, {args.workers} workers, host {os.uname().nodename},"
        f" {os.cpu_count()} CPUs"
    )
    total_ok = sum(stats.ok.values())
    total_expected = sum(stats.expected.values())
    print(
        f"scenario runs: {total_ok} ok, {total_expected} failed as intended, "
        f"{sum(stats.unexpected.values())} unexpected"
    )
    for name in SCENARIOS:
        print(
            f"  {name:22s} ok={stats.ok[name]:6d} expected={stats.expected[name]:6d} "
            f"unexpected={stats.unexpected[name]:5d}"
        )
    for name, msg in stats.samples_of_unexpected.items():
        print(f"  unexpected in {name}: {msg}")
    keys: list[str] = []
    for row in series:
        for key, value in row.items():
            if key not in keys and key not in ("t", "phase") and not isinstance(value, str):
                keys.append(key)
    print(
        f"\n{'metric':38s} {'start':>12s} {'peak':>12s} {'end-of-load':>12s} "
        f"{'after-grace':>12s} {'slope/min*':>11s}"
    )
    findings = []
    for key in keys:
        values = [r[key] for r in series if key in r]
        if not values:
            continue
        start = base.get(key, values[0])
        eol = next((r[key] for r in series if r["phase"] == "end-of-load" and key in r), 0)
        after = end.get(key, values[-1])
        pts = [(r["t"], r[key]) for r in half if key in r]
        slope = slope_per_min(pts)
        print(
            f"{key:38s} {_fmt(start):>12s} {_fmt(max(values)):>12s} {_fmt(eol):>12s} "
            f"{_fmt(after):>12s} {slope:>11.2f}"
        )
        if key == "rss_kb" and args.tracemalloc:
            continue  # tracemalloc's traces and snapshots live in the process: judge its own count
        if key in ("rss_kb", "children_rss_kb", "gc_objects"):
            if after > start * 1.25 + 8192:
                findings.append(f"{key}: {start} -> {after}")
        elif key in ("fds", "threads", "python_threads"):
            # The default executor (uvloop_N threads) starts up to min(32, CPUs + 4) on demand.
            if after > start + (2 if key == "fds" else min(32, (os.cpu_count() or 1) + 4)):
                findings.append(f"{key}: {start} -> {after}")
        elif key == "tracemalloc_kb":
            if after > start * 1.1 + 1024:
                findings.append(f"{key}: {start} -> {after}")
        elif key.startswith(_ALLOCATOR):
            continue
        elif not any(word in key for word in _BOUNDED) and after > start:
            findings.append(f"{key}: {start} -> {after} (not back to baseline)")
    print("* least-squares slope over the second half of the load")
    errors = [line for line in with_log.splitlines() if " ERROR " in line or "Traceback" in line]
    print(f"\ndbward log: {len(with_log.splitlines())} lines, {len(errors)} ERROR/Traceback")
    for line in errors[:10]:
        print("  " + line[:200])
    if grown:
        print("\ntracemalloc, first probe -> last probe, top growth by line:")
        for line in grown:
            print("  " + line)
    print("\nfindings: " + ("none" if not findings else ""))
    for finding in findings:
        print("  " + finding)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
