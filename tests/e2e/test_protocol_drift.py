"""Messages PostgreSQL ignores or answers late: dbward's replies, maps and audit stay in step.

Found by the eighth review (each failed before its fix). Where PostgreSQL's own answer matters,
the same bytes are sent to it directly first, so the test shows what a client expects.
"""

from __future__ import annotations

import socket

from dbward.wire.postgres import messages as m
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession, libpq_copy_in, read_message
from fixtures.raw import direct_session as _direct
from fixtures.raw import scratch_table as _table

FAILING = (
    m.parse_message("", "SELECT 1/(random()*0)::int")
    + m.bind_message("", "", [])
    + m.execute_message("")
)


def _kinds(sock: socket.socket, count: int) -> list[bytes]:
    """The types of the next `count` messages; fewer if the connection goes quiet (3 s)."""
    found: list[bytes] = []
    try:
        while len(found) < count:
            found.append(read_message(sock)[0])
    except TimeoutError:
        pass
    return found


def _both(proxy: Proxy, pg: PgServer, data: bytes, count: int) -> tuple[list[bytes], list[bytes]]:
    """What PostgreSQL answers to `data` directly, and what dbward answers."""
    direct = _direct(pg)
    try:
        direct.sendall(data)
        expected = _kinds(direct, count + 1)
    finally:
        direct.close()
    session = RawSession(proxy, app_name("drift"))
    session.sock.settimeout(3)
    try:
        session.sock.sendall(data)
        got = _kinds(session.sock, count + 1)
    finally:
        session.close()
    return expected, got


def test_a_query_postgres_ignores_after_an_error_answered_on_flush(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """After an error answered on a Flush, PostgreSQL skips everything up to the client's Sync,
    a Query too. dbward tracked that Query: one ReadyForQuery stayed owed for good, every later
    outcome went to the statement before it, and non-ASCII SQL (which waits until nothing is in
    flight) hung."""
    table = _table(pg_server, "drift_flush")
    app = app_name("drift-flush")
    session = RawSession(proxy, app)
    try:
        session.sock.sendall(FAILING + m.flush())
        assert [read_message(session.sock)[0] for _ in range(3)] == [b"1", b"2", b"E"]
        ignored = session.send(m.query(f"INSERT INTO {table} VALUES (1)") + m.sync())
        assert [kind for kind, _ in ignored] == [b"Z"]  # the Query was skipped, as directly
        session.query(f"INSERT INTO {table} VALUES (2), (3), (4)")
        session.query(f"DELETE FROM {table} WHERE x = 2")
        assert [kind for kind, _ in session.query("SELECT 'é'")] == [b"T", b"D", b"C", b"Z"]
    finally:
        session.close()
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "2"
    records = proxy.session_records(app, until=has_disconnect)
    texts = {s.sql_text: s for s in statements(records)}
    assert f"INSERT INTO {table} VALUES (1)" not in texts  # never run, never recorded as run
    inserted = outcome_of(records, texts[f"INSERT INTO {table} VALUES (2), (3), (4)"])
    deleted = outcome_of(records, texts[f"DELETE FROM {table} WHERE x = 2"])
    assert (inserted.status, inserted.rows, deleted.rows) == ("ok", 3, 1)


def test_after_an_ignored_query_a_refused_redefinition_is_still_seen_refused(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """With the replies shifted by one, PostgreSQL's refusal of `Parse s1 'SELECT 1'` settled
    the wrong message: a DELETE then ran under s1 and was audited as `SELECT 1`, a read."""
    table = _table(pg_server, "drift_victim", "(1), (2), (3)")
    app = app_name("drift-redefine")
    session = RawSession(proxy, app)
    try:
        session.sock.sendall(FAILING + m.flush())
        assert [read_message(session.sock)[0] for _ in range(3)] == [b"1", b"2", b"E"]
        session.send(m.query("SELECT 2") + m.sync())
        session.send(m.parse_message("s1", f"DELETE FROM {table}") + m.sync())
        refused = session.send(m.parse_message("s1", "SELECT 1") + m.sync())
        assert m.parse_error_fields(refused[0][1])["C"] == "42P05"
        session.send(m.parse_message("x", "SELECT 3") + m.sync())
        session.send(m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    finally:
        session.close()
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "0"  # the DELETE ran
    records = proxy.session_records(app, until=has_disconnect)
    executed = [s for s in statements(records) if s.path == "extended"][-1]
    assert (executed.sql_text, executed.kind) == (f"DELETE FROM {table}", "write")


def test_a_sync_after_a_simple_query_copy_that_fails_is_answered(
    proxy: Proxy, pg_server: PgServer
) -> None:
    expected, got = _both(
        proxy, pg_server, m.query("COPY drift_no_such_table FROM STDIN") + m.sync(), 3
    )
    assert expected == [b"E", b"Z", b"Z"]
    assert got == expected


def test_a_query_after_a_failing_extended_copy_and_its_sync_is_answered(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """The Sync held back after the COPY's Execute was never released while a Query waited
    behind it: PostgreSQL waited for a Sync for ever."""
    data = (
        m.parse_message("", "COPY drift_no_such_table FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
        + m.query("SELECT 1")
    )
    expected, got = _both(proxy, pg_server, data, 8)
    assert expected == [b"1", b"2", b"E", b"Z", b"T", b"D", b"C", b"Z"]
    assert got == expected


def test_a_query_sent_before_a_copys_data_is_refused_once_the_copy_starts(
    proxy: Proxy, pg_server: PgServer
) -> None:
    table = _table(pg_server, "drift_copy")
    session = RawSession(proxy, app_name("drift-copy"))
    session.sock.settimeout(3)
    try:
        session.sock.sendall(
            m.parse_message("", f"COPY {table} FROM STDIN")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()
            + m.query("SELECT 1")
        )
        assert _kinds(session.sock, 3) == [b"1", b"2", b"G"]
        kind, payload = read_message(session.sock)
        assert kind == b"E" and m.parse_error_fields(payload)["S"] == "FATAL"
    finally:
        session.close()
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "0"


def test_fetch_keeps_the_cursor(proxy: Proxy, pg_server: PgServer) -> None:
    """FETCH made dbward forget the cursor, as CLOSE does: the next FETCH was audited without
    its query's tables and an Execute of the cursor's portal was refused."""
    table = _table(pg_server, "drift_notes", "(1), (2), (3)")
    app = app_name("drift-fetch")
    session = RawSession(proxy, app)
    try:
        session.query(f"BEGIN; DECLARE c CURSOR FOR SELECT x FROM {table}")
        for _ in range(2):
            assert [kind for kind, _ in session.query("FETCH 1 FROM c")] == [
                b"T",
                b"D",
                b"C",
                b"Z",
            ]
        executed = session.send(m.execute_message("c", 1) + m.sync())
        assert [kind for kind, _ in executed] == [b"D", b"s", b"Z"]
        session.query("COMMIT")
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    fetches = [s for s in statements(records) if s.command == "FETCH"]
    assert [f.tables for f in fetches] == [(table,), (table,)]


def test_syncs_dropped_in_a_copy_refused_after_its_data_was_sent(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """libpq's Sync after a COPY's Execute is dropped while PostgreSQL copies; when PostgreSQL
    refuses the copy before reading anything (here a statement trigger, after CopyInResponse)
    it answers that Sync. dbward sent it on only if no copy data had gone out yet: with the data
    pipelined (found by the protocol fuzzer, COPY into a view or WITH FREEZE when the error
    came a moment after CopyInResponse) one ReadyForQuery was missing for good."""
    table = _table(pg_server, "drift_slowcopy")
    pg_server.psql(
        f"""
        CREATE FUNCTION {table}_wait() RETURNS trigger LANGUAGE plpgsql
            AS $$BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END$$;
        CREATE TRIGGER a_wait BEFORE INSERT ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION {table}_wait();
        -- a built-in that fails on INSERT with no error context, like a view or FREEZE
        CREATE TRIGGER b_fail BEFORE INSERT ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION suppress_redundant_updates_trigger();
        """
    )
    data = libpq_copy_in(table) + m.query("SELECT 1")
    expected, got = _both(proxy, pg_server, data, 10)
    assert expected == [b"1", b"2", b"G", b"E", b"Z", b"Z", b"T", b"D", b"C", b"Z"]
    assert got == expected
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "0"


def test_an_empty_querys_portal_after_a_holdable_cursor(proxy: Proxy, pg_server: PgServer) -> None:
    """Once a WITH HOLD cursor was declared, portals are forgotten one by one at the end of a
    transaction, keeping the holdable ones; the portal of an empty query (`Parse ';'`) holds no
    statement, and looking at its first one raised IndexError: the session was lost (found by
    the protocol fuzzer)."""
    data = (
        m.query("DECLARE drift_held CURSOR WITH HOLD FOR SELECT 1")
        + m.parse_message("", ";")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
        + m.query("SELECT 1")
    )
    expected, got = _both(proxy, pg_server, data, 10)
    assert expected == [b"C", b"Z", b"1", b"2", b"I", b"Z", b"T", b"D", b"C", b"Z"]
    assert got == expected


def test_a_copy_that_succeeds_after_a_dropped_sync(proxy: Proxy, pg_server: PgServer) -> None:
    """What follows a CopyDone waits for the copy's answer when a Sync was dropped in the copy;
    PostgreSQL holds an Execute's CommandComplete until a Sync or Flush, so dbward asks for it
    with a Flush (without it, this hung: found by the protocol fuzzer)."""
    table = _table(pg_server, "drift_copyok")
    data = libpq_copy_in(table) + m.query("SELECT 1")
    expected, got = _both(proxy, pg_server, data, 9)
    assert expected == [b"1", b"2", b"G", b"C", b"Z", b"T", b"D", b"C", b"Z"]
    assert got == expected
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "2"
