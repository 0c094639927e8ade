"""Pipelines around errors answered on Flush, COPY and parked messages, as PostgreSQL answers.

Each test sends the same bytes to PostgreSQL directly (trust login) and through dbward, step
by step, and compares the message types received (ninth review: each failed before its fix).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from dbward.wire.postgres import messages as m
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession, libpq_copy_in, read_message, replies_to_marker
from fixtures.raw import direct_session as _direct
from fixtures.raw import scratch_table as _table

FAILING = (
    m.parse_message("", "SELECT 1/(random()*0)::int")
    + m.bind_message("", "", [])
    + m.execute_message("")
)


def _kind(kind: bytes, payload: bytes) -> str:
    if kind == b"E":
        f = m.parse_error_fields(payload)
        return f"E:{f['S']}:{f['C']}"
    return kind.decode()


def _kinds(sock: socket.socket, count: int, timeout: float = 3) -> list[str]:
    found: list[str] = []
    sock.settimeout(timeout)
    try:
        while len(found) < count:
            found.append(_kind(*read_message(sock)))
    except (TimeoutError, ConnectionError):
        pass
    return found


def _script(sock: socket.socket, steps: list[tuple[bytes, int]]) -> list[list[str]]:
    """Send each step's bytes, read that many messages; then look for extras: whatever comes
    before the answer to a marker Query (fixtures.raw.replies_to_marker; every script leaves
    the session idle or closed), instead of waiting for 1 s of silence."""
    got = []
    for data, count in steps:
        try:
            sock.sendall(data)
        except OSError:
            got.append(["<send failed>"])
            break
        got.append(_kinds(sock, count))
    sock.settimeout(3)
    got.append([_kind(*reply) for reply in replies_to_marker(sock)])
    return got


def _both(
    proxy: Proxy, pg: PgServer, steps: list[tuple[bytes, int]], app: str = ""
) -> tuple[list[list[str]], list[list[str]]]:
    direct = _direct(pg)
    try:
        expected = _script(direct, steps)
    finally:
        direct.close()
    session = RawSession(proxy, app or app_name("r9b"))
    try:
        got = _script(session.sock, steps)
    finally:
        session.close()
    return expected, got


# Non-ASCII SQL parked for quiet when an error answered on a Flush empties the queue.
def test_nonascii_query_parked_behind_skipped_query_after_flush_error(
    proxy: Proxy, pg_server: PgServer
) -> None:
    steps = [
        (
            FAILING
            + m.flush()
            + m.query("SELECT 2")
            + m.query("SELECT 'é'")
            + m.sync()
            + m.query("SELECT 3"),
            8,
        )
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert expected == [["1", "2", "E:ERROR:22012", "Z", "T", "D", "C", "Z"], []]
    assert got == expected


def _batched(proxy_factory: Callable[..., Proxy], tmp_path: Path) -> Proxy:
    return proxy_factory(
        extra={"audit": {"path": str(tmp_path / "audit-batched.db"), "durability": "batched"}}
    )


# A COPY behind a Query PostgreSQL skips after a Flush-answered error (batched audit:
# under strict durability the COPY's intent wait happens to hide it)
def test_a_copy_behind_a_skipped_query_after_flush_error(
    proxy_factory: Callable[..., Proxy], tmp_path: Path, pg_server: PgServer
) -> None:
    proxy = _batched(proxy_factory, tmp_path)
    steps = [
        (
            FAILING
            + m.flush()
            + m.query("SELECT 2")
            + m.query("COPY r9b_no_such_table FROM STDIN")
            + m.sync()
            + m.query("SELECT 3"),
            8,
        )
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert expected == [["1", "2", "E:ERROR:22012", "Z", "T", "D", "C", "Z"], []]
    assert got == expected


# Eager data after a COPY that fails: the Sync sent before it is still answered.
def test_eager_copy_data_of_a_failing_copy(proxy: Proxy, pg_server: PgServer) -> None:
    steps = [
        (
            m.query("COPY r9b_no_such_table FROM STDIN")
            + m.sync()
            + m.copy_data(b"1\n")
            + m.copy_done()
            + m.query("SELECT 3"),
            7,
        )
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert expected == [["E:ERROR:42P01", "Z", "Z", "T", "D", "C", "Z"], []]
    assert got == expected


def test_eager_copy_data_of_a_failing_extended_copy(proxy: Proxy, pg_server: PgServer) -> None:
    steps = [
        (
            libpq_copy_in("r9b_no_such_table") + m.query("SELECT 3"),
            8,
        )
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert expected == [["1", "2", "E:ERROR:42P01", "Z", "Z", "T", "D", "C"], ["Z"]]
    assert got == expected


# A Query pipelined behind a simple-Query COPY before its CopyInResponse.
def test_query_pipelined_behind_copy_before_copy_in_response(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """The Query waits until the copy starts, then is no copy data: refused (PostgreSQL reads it
    as a bad copy message and ends the session too). It was audited as run and failed."""
    table = _table(pg_server, "r9b_copy", "(1), (2), (3)")
    app = app_name("r9b-copyq")
    steps = [(m.query(f"COPY {table} FROM STDIN") + m.query("SELECT 42"), 3)]
    expected, got = _both(proxy, pg_server, steps, app)
    assert expected[0] == ["G", "E:ERROR:08P01", "E:FATAL:08P01"]
    assert got[0][:2] == ["G", "E:FATAL:08P01"]
    records = proxy.session_records(app, until=has_disconnect)
    assert "SELECT 42" not in {s.sql_text for s in statements(records)}


# An extended COPY failing mid-data: PostgreSQL skips the CopyDone too.
def test_extended_copy_failing_mid_data_then_copydone_sync_and_more(
    proxy: Proxy, pg_server: PgServer
) -> None:
    table = _table(pg_server, "r9b_mid")
    steps = [
        (
            m.parse_message("", f"COPY {table} FROM STDIN")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.flush(),
            3,
        ),
        (m.copy_data(b"not-a-number\n") + m.flush(), 1),
        (
            m.copy_done()
            + m.sync()
            + m.parse_message("", "SELECT 1")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync(),
            6,
        ),
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert expected == [["1", "2", "G"], ["E:ERROR:22P02"], ["Z", "1", "2", "D", "C", "Z"], []]
    assert got == expected


def _types(rows: list[list[str]]) -> list[list[str]]:
    """Kinds only; an ERROR keeps its severity, not its SQLSTATE (dbward rewrites denials)."""
    return [[k.rsplit(":", 1)[0] if k.startswith("E:") else k for k in row] for row in rows]


# Strict durability: an INSERT parked for its intent when the Flush error arrives.
def test_strict_write_after_flush_error(proxy: Proxy, pg_server: PgServer) -> None:
    table = _table(pg_server, "r9b_strict")
    app = app_name("r9b-strict")
    steps = [
        (
            FAILING
            + m.flush()
            + m.query(f"INSERT INTO {table} VALUES (1)")
            + m.parse_message("", f"INSERT INTO {table} VALUES (2)")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()
            + m.query("SELECT 3"),
            8,
        )
    ]
    expected, got = _both(proxy, pg_server, steps, app)
    assert expected == [["1", "2", "E:ERROR:22012", "Z", "T", "D", "C", "Z"], []]
    assert got == expected
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "0"
    records = proxy.session_records(app, until=has_disconnect)
    for s in statements(records):
        if s.sql_text.startswith("INSERT"):
            assert outcome_of(records, s).status != "ok"


# An error answered on Flush by a Describe, then every kind of message, then Sync.
def test_describe_error_on_flush_then_every_message(proxy: Proxy, pg_server: PgServer) -> None:
    steps = [
        (m.describe_message("S", "r9b_nosuch") + m.flush(), 1),
        (
            m.parse_message("a", "SELECT 1")
            + m.bind_message("pa", "a", [])
            + m.describe_message("P", "pa")
            + m.execute_message("pa")
            + m.close_message("S", "a")
            + m.query("SELECT 2")
            + m.function_call_message(1598, [])  # random()
            + m.copy_data(b"x\n")
            + m.copy_done()
            + m.copy_fail("nope")
            + m.flush()
            + m.sync(),
            1,
        ),
        (m.query("SELECT 3") + m.parse_message("a", "SELECT 4") + m.sync(), 6),
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert got == expected


# dbward's denials around an error answered on Flush.
def test_denied_query_behind_flush_error(proxy: Proxy, pg_server: PgServer) -> None:
    steps = [
        (FAILING + m.flush() + m.query("SET ROLE postgres") + m.sync() + m.query("SELECT 3"), 8),
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert _types(got) == _types(expected)


def test_denied_parse_and_execute_after_flush_error(proxy: Proxy, pg_server: PgServer) -> None:
    steps = [
        (FAILING + m.flush(), 3),
        (m.parse_message("", "SET ROLE postgres") + m.flush() + m.query("SET ROLE postgres"), 1),
        (m.sync() + m.query("SELECT 3"), 5),
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert _types(got) == _types(expected)


def _locked(pg: PgServer, table: str) -> psycopg.Connection:
    conn = psycopg.connect(host="127.0.0.1", port=pg.port, user=pg.trust_user, dbname=pg.database)
    conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    return conn


# FATAL (pg_terminate_backend) while a Query is parked behind an undecided COPY.
def test_fatal_while_parked_behind_a_copy(proxy: Proxy, pg_server: PgServer) -> None:
    table = _table(pg_server, "r9b_fatal")
    other = _table(pg_server, "r9b_fatal_other")
    app = app_name("r9b-fatal")
    lock = _locked(pg_server, table)
    session = RawSession(proxy, app)
    try:
        session.sock.sendall(
            m.query(f"COPY {table} FROM STDIN")
            + m.sync()
            + m.query(f"INSERT INTO {other} VALUES (1)")
        )
        time.sleep(0.5)  # the COPY waits for the lock; the INSERT is parked
        assert pg_server.psql(f"SELECT pg_terminate_backend({session.pid})") == "t"
        got = _kinds(session.sock, 5)
    finally:
        session.close()
        lock.close()
    assert got[0] == "E:FATAL:57P01"
    assert pg_server.psql(f"SELECT count(*) FROM {other}") == "0"
    records = proxy.session_records(app, until=has_disconnect)
    inserts = [s for s in statements(records) if s.sql_text.startswith("INSERT")]
    # Never sent before the FATAL: not recorded, or recorded as not executed.
    assert all(outcome_of(records, s).status == "not_executed" for s in inserts)
    assert "Traceback" not in proxy.log()


# The client leaves while a Query is parked behind an undecided COPY.
def test_client_leaves_while_parked_behind_a_copy(proxy: Proxy, pg_server: PgServer) -> None:
    table = _table(pg_server, "r9b_leave")
    other = _table(pg_server, "r9b_leave_other")
    app = app_name("r9b-leave")
    lock = _locked(pg_server, table)
    session = RawSession(proxy, app)
    try:
        session.sock.sendall(
            m.query(f"COPY {table} FROM STDIN")
            + m.sync()
            + m.query(f"INSERT INTO {other} VALUES (1)")
        )
        time.sleep(0.5)
    finally:
        session.close()
    time.sleep(0.5)
    lock.close()
    time.sleep(0.5)
    assert pg_server.psql(f"SELECT count(*) FROM {other}") == "0"
    records = proxy.session_records(app, until=has_disconnect)
    inserts = [s for s in statements(records) if s.sql_text.startswith("INSERT")]
    assert not inserts
    assert "Traceback" not in proxy.log()
    # Another session is fine.
    again = RawSession(proxy, app_name("r9b-after"))
    try:
        assert [k for k, _ in again.query("SELECT 1")] == [b"T", b"D", b"C", b"Z"]
    finally:
        again.close()


def _ext(sql: str) -> bytes:
    return m.parse_message("", sql) + m.bind_message("", "", []) + m.execute_message("")


def test_bind_error_on_flush_then_every_message(proxy: Proxy, pg_server: PgServer) -> None:
    steps = [
        (m.bind_message("p", "r9b_nosuch", []) + m.flush(), 1),
        (
            m.execute_message("p")
            + m.describe_message("P", "p")
            + m.close_message("P", "p")
            + m.query("SELECT 'é'")
            + m.parse_message("", "SELECT 'é'")
            + m.function_call_message(1598, [])
            + m.copy_fail("x")
            + m.sync(),
            1,
        ),
        (m.query("SELECT 3"), 4),
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert got == expected


def test_notices_notifications_and_settings_around_flush_error(
    proxy: Proxy, pg_server: PgServer
) -> None:
    steps = [
        (m.query("LISTEN r9b_chan"), 2),
        (
            _ext("DO $$BEGIN RAISE NOTICE 'hello'; END$$")
            + _ext("SELECT pg_notify('r9b_chan', 'x')")
            + _ext("SET application_name = 'r9b-renamed'")
            + m.flush(),
            11,
        ),
        (FAILING + m.flush(), 3),
        (m.query("SELECT 2") + m.sync() + m.query("SHOW application_name"), 6),
    ]
    expected, got = _both(proxy, pg_server, steps)
    assert got == expected


def test_extended_and_simple_copy_after_flush_error_batched(
    proxy_factory: Callable[..., Proxy], tmp_path: Path, pg_server: PgServer
) -> None:
    proxy = _batched(proxy_factory, tmp_path)
    for copy in (
        m.query("COPY r9b_no_such_table FROM STDIN"),
        _ext("COPY r9b_no_such_table FROM STDIN"),
    ):
        steps = [(FAILING + m.flush() + copy + m.sync() + m.query("SELECT 3"), 8)]
        expected, got = _both(proxy, pg_server, steps)
        assert got == expected
    assert "Traceback" not in proxy.log()


def test_zz_no_traceback_in_the_module_proxy_log(proxy: Proxy) -> None:
    assert "Traceback" not in proxy.log(), proxy.log()[-3000:]


# PostgreSQL refuses `COPY view FROM STDIN` and `COPY ... (FREEZE)` after its CopyInResponse,
# before it reads the Sync libpq's PQsendQueryParams sends with the Execute: that Sync is
# answered. dbward dropped it as one PostgreSQL ignores during a copy, then skipped everything
# to the next Sync: the client's Query was never answered (tenth review).
def test_a_copy_refused_after_copy_in_response_answers_the_sync_sent_with_it(
    proxy: Proxy, pg_server: PgServer
) -> None:
    table = _table(pg_server, "copy_view")
    pg_server.psql(f"CREATE VIEW {table}_v AS SELECT * FROM {table}")
    pg_server.psql(f"GRANT ALL ON {table}_v TO PUBLIC")
    execute = (
        m.parse_message("", f"COPY {table}_v FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
    )
    freeze = (
        m.parse_message("", f"COPY {table} FROM STDIN (FREEZE)")
        + m.bind_message("", "", [])
        + m.execute_message("")
    )
    for copy, sqlstate in ((execute, "42809"), (freeze, "55000")):
        for _ in range(3):  # CopyInResponse and the error in one read or two: timing varies
            steps = [(copy + m.sync(), 5), (m.query("SELECT 3"), 4)]
            expected, got = _both(proxy, pg_server, steps)
            assert expected == [
                ["1", "2", "G", f"E:ERROR:{sqlstate}", "Z"],
                ["T", "D", "C", "Z"],
                [],
            ]
            assert got == expected


# COPY TO STDOUT answered where it belongs (dbward now refuses a CopyOutResponse answering
# any other statement): inside a multi-statement Query, as `TO STDIN` (PostgreSQL's grammar
# takes either word for the client), and as a prepared statement run by Execute, twice.
def test_copy_to_stdout_in_a_query_and_by_execute(proxy: Proxy, pg_server: PgServer) -> None:
    app = app_name("copy-out")
    prepared = "COPY (SELECT generate_series(1, 3)) TO STDOUT"
    run = m.bind_message("", "cp", []) + m.execute_message("") + m.sync()
    steps = [
        (
            m.query(
                "SELECT 1; COPY (SELECT 2) TO STDOUT; COPY (SELECT 3) TO STDIN (FORMAT csv);"
                " SELECT 4"
            ),
            15,
        ),
        (m.parse_message("cp", prepared) + run + run, 17),
    ]
    expected, got = _both(proxy, pg_server, steps, app)
    copy_out = ["H", "d", "c", "C"]
    assert expected == [
        ["T", "D", "C", *copy_out, *copy_out, "T", "D", "C", "Z"],
        ["1", "2", "H", "d", "d", "d", "c", "C", "Z", "2", "H", "d", "d", "d", "c", "C", "Z"],
        [],
    ]
    assert got == expected
    records = proxy.session_records(app, until=has_disconnect)
    copies = [s for s in statements(records) if s.command == "COPY"]
    assert [(c.path, outcome_of(records, c).rows) for c in copies] == [
        ("copy", 1),
        ("copy", 1),
        ("copy", 3),
        ("copy", 3),
    ]
