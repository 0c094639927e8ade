"""psycopg 3 through dbward: parameters, binary, executemany, pipeline, COPY, cancel, NOTIFY."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.proxy import Proxy


def connect(proxy: Proxy, app: str, **kw: object) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(application_name=app), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def _table(proxy: Proxy) -> None:
    with connect(proxy, "setup", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute(
            "CREATE TABLE items (id int primary key, name text, price numeric(10,2), data bytea)"
        )


def test_parameters_and_binary_results(proxy: Proxy) -> None:
    app = app_name("pg3-params")
    with connect(proxy, app) as conn:
        conn.execute(
            "INSERT INTO items VALUES (%s, %s, %s, %s)", (1, "widget", "9.99", b"\x00\x01\xff")
        )
        conn.commit()
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT id, name, price, data FROM items WHERE id = %s", (1,))
            row = cur.fetchone()
        assert row is not None
        assert row[0] == 1 and row[1] == "widget" and str(row[2]) == "9.99"
        assert bytes(row[3]) == b"\x00\x01\xff"
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    # psycopg opens a transaction implicitly and commits when the block ends
    assert [s.command for s in intents] == [
        "BEGIN",
        "INSERT",
        "COMMIT",
        "BEGIN",
        "SELECT",
        "COMMIT",
    ]
    assert [s.kind for s in intents] == [
        "transaction",
        "write",
        "transaction",
        "transaction",
        "read",
        "transaction",
    ]
    insert = next(s for s in intents if s.command == "INSERT")
    assert insert.path == "extended" and insert.kind == "write" and insert.tables == ("items",)
    assert outcome_of(records, insert).rows == 1
    select = next(s for s in intents if s.command == "SELECT")
    assert outcome_of(records, select).rows == 1 and outcome_of(records, select).status == "ok"


def test_executemany_and_pipeline(proxy: Proxy) -> None:
    app = app_name("pg3-pipe")
    with connect(proxy, app, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO items (id, name) VALUES (%s, %s)",
                [(i, f"item {i}") for i in range(100, 150)],
            )
        with conn.pipeline():
            cursors = []
            for i in range(100, 110):
                cur = conn.cursor()
                cur.execute("SELECT name FROM items WHERE id = %s", (i,))
                cursors.append(cur)
            conn.execute(
                "UPDATE items SET name = name || '!' WHERE id >= %s AND id < %s", (100, 105)
            )
        assert [c.fetchone() for c in cursors] == [(f"item {i}",) for i in range(100, 110)]
        names = conn.execute("SELECT name FROM items WHERE id BETWEEN 100 AND 105 ORDER BY id")
        assert [r[0] for r in names] == [f"item {i}!" for i in range(100, 105)] + ["item 105"]
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    inserts = [s for s in intents if s.command == "INSERT"]
    assert len(inserts) == 50
    assert all(outcome_of(records, s).rows == 1 for s in inserts)
    update = next(s for s in intents if s.command == "UPDATE")
    assert outcome_of(records, update).rows == 5


def test_copy_both_ways(proxy: Proxy) -> None:
    app = app_name("pg3-copy")
    with connect(proxy, app, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE c (id int, t text)")
        with conn.cursor().copy("COPY c FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row((i, f"row {i}"))
        with conn.cursor().copy("COPY c (id, t) FROM STDIN (FORMAT binary)") as copy:
            copy.set_types(["int4", "text"])
            copy.write_row((-1, "binary"))
        out = []
        with conn.cursor().copy("COPY (SELECT id, t FROM c ORDER BY id) TO STDOUT") as copy:
            for row in copy.rows():
                out.append(row)
        assert len(out) == 5001 and out[0] == ("-1", "binary") and out[-1] == ("4999", "row 4999")
        with conn.cursor().copy("COPY c TO STDOUT (FORMAT csv)") as copy:
            csv = b"".join(bytes(b) for b in copy)
        assert csv.count(b"\n") == 5001
    records = proxy.session_records(app, until=has_disconnect)
    copies = [s for s in statements(records) if s.command == "COPY"]
    assert [c.path for c in copies] == ["copy"] * 4
    assert [outcome_of(records, c).rows for c in copies] == [5000, 1, 5001, 5001]


def test_cancel(proxy: Proxy) -> None:
    app = app_name("pg3-cancel")
    with connect(proxy, app, autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 5
        assert conn.execute("SELECT 42").fetchone() == (42,)
    records = proxy.session_records(app, until=has_disconnect)
    sleep = next(s for s in statements(records) if "pg_sleep" in s.sql_text)
    assert outcome_of(records, sleep).sqlstate == "57014"
    cancels = proxy.audit(
        event="cancel", until=lambda rs: any(r.detail == f"session={sleep.session_id}" for r in rs)
    )
    assert any(
        r.status == "forwarded" and r.detail == f"session={sleep.session_id}" for r in cancels
    )


def test_listen_notify(proxy: Proxy) -> None:
    app = app_name("pg3-notify")
    with (
        connect(proxy, app, autocommit=True) as listener,
        connect(proxy, app, autocommit=True) as sender,
    ):
        listener.execute("LISTEN dbward_events")
        sender.execute("SELECT pg_notify('dbward_events', 'hello')")
        sender.execute("NOTIFY dbward_events, 'again'")
        received = []
        for note in listener.notifies(timeout=5, stop_after=2):
            received.append((note.channel, note.payload))
        assert received == [("dbward_events", "hello"), ("dbward_events", "again")]
    records = proxy.session_records(
        app, until=lambda rs: [r.event for r in rs].count("disconnect") == 2
    )
    assert {s.command for s in statements(records)} >= {"LISTEN", "NOTIFY", "SELECT"}


def test_prepared_statements_server_side(proxy: Proxy) -> None:
    app = app_name("pg3-prepared")
    with connect(proxy, app, autocommit=True, prepare_threshold=0) as conn:
        for i in range(5):
            assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
    records = proxy.session_records(app, until=has_disconnect)
    intents = [s for s in statements(records) if s.command == "SELECT"]
    assert len(intents) == 5 and all(s.path == "extended" for s in intents)
    assert all(outcome_of(records, s).status == "ok" for s in intents)


def test_copy_in_through_the_extended_protocol(proxy: Proxy) -> None:
    """libpq-style extended COPY: Parse/Bind/Execute/Sync, data, CopyDone, Sync (raw socket)."""
    from dbward.wire.postgres import messages as m
    from fixtures.raw import RawSession, read_message

    app = app_name("copy-ext")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE ce (x int)")
        sock = session.sock
        sock.sendall(
            m.parse_message("", "COPY ce FROM STDIN")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()
        )
        kinds = []
        while not kinds or kinds[-1] != b"G":
            kinds.append(read_message(sock)[0])
        assert kinds == [b"1", b"2", b"G"]
        sock.sendall(m.copy_data(b"1\n2\n3\n") + m.copy_done() + m.sync())
        kinds = []
        while not kinds or kinds[-1] != b"Z":
            kinds.append(read_message(sock)[0])
        assert kinds == [b"C", b"Z"]
        replies = session.query("SELECT count(*) FROM ce")
        assert [k for k, _ in replies] == [b"T", b"D", b"C", b"Z"]
        assert replies[1][1].endswith(b"3")
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    copy = next(s for s in statements(records) if s.command == "COPY")
    assert (copy.path, copy.kind) == ("copy", "write")
    assert outcome_of(records, copy).rows == 3
    assert [outcome_of(records, s).status for s in statements(records)] == ["ok"] * 3
