"""Messages PostgreSQL ignores or answers late: dbward's replies, maps and audit stay in step.

Found by the eighth review (each failed before its fix). Where PostgreSQL's own answer matters,
the same bytes are sent to it directly first, so the test shows what a client expects.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from dbward.audit.records import AuditRecord
from dbward.wire.postgres import messages as m
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import CLOSED, MARKER, RawSession, libpq_copy_in, read_message, replies_to_marker
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


# A reply too many (one ReadyForQuery more than PostgreSQL sends, the bug most of these tests
# target) was seen by reading one message past the expected ones until the connection went
# quiet: 1-3 s of silence per side and case. Instead, once the expected number of replies has
# arrived, the reader sends a marker (fixtures.raw.replies_to_marker) and reads up to its
# answer. Never when fewer came (a Sync held back until the client's next message must not be
# released by the marker: what was read is the answer) nor after the connection closed; every
# sequence here leaves the session idle.


def _replies(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """The next `count` messages and any that follow before the marker's answer; fewer if the
    connection goes quiet (its timeout), CLOSED last if it closes."""
    found: list[tuple[bytes, bytes]] = []
    try:
        while len(found) < count:
            found.append(read_message(sock))
    except TimeoutError:
        return found  # the missing replies are not coming: no marker
    except ConnectionError:
        return [*found, CLOSED]
    return found + replies_to_marker(sock)


def _code(kind: bytes, payload: bytes) -> str:
    """A message as its type, an error with its SQLSTATE (`E:22P02`)."""
    code = m.parse_error_fields(payload)["C"] if kind == b"E" else ""
    return kind.decode() + (":" + code if code else "")


def _both(
    proxy: Proxy, pg: PgServer, data: bytes, count: int, wait: float = 3
) -> tuple[list[bytes], list[bytes]]:
    """What PostgreSQL answers to `data` directly, and what dbward answers: the `count`
    expected replies and any more before the marker's answer (`wait`: seconds of silence that
    end the reading when fewer come)."""
    direct = _direct(pg, wait)
    try:
        direct.sendall(data)
        expected = [kind for kind, _ in _replies(direct, count)]
    finally:
        direct.close()
    session = RawSession(proxy, app_name("drift"))
    session.sock.settimeout(wait)
    try:
        session.sock.sendall(data)
        got = [kind for kind, _ in _replies(session.sock, count)]
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
    """libpq's Sync after a COPY's Execute was dropped while PostgreSQL copied (it is now sent
    into the copy, see the statement-trigger tests below); when PostgreSQL refuses the copy
    before reading anything (here a statement trigger, after CopyInResponse)
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
    """What follows a CopyDone waits for the copy's answer when a Sync was sent into the copy;
    PostgreSQL holds an Execute's CommandComplete until a Sync or Flush, so dbward asks for it
    with a Flush (without it, this hung: found by the protocol fuzzer)."""
    table = _table(pg_server, "drift_copyok")
    data = libpq_copy_in(table) + m.query("SELECT 1")
    expected, got = _both(proxy, pg_server, data, 9)
    assert expected == [b"1", b"2", b"G", b"C", b"Z", b"T", b"D", b"C", b"Z"]
    assert got == expected
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "2"


def _statement_trigger(pg: PgServer, table: str, body: str) -> None:
    """A BEFORE INSERT ... FOR EACH STATEMENT trigger on `table` running the PL/pgSQL `body`:
    PostgreSQL fires it for a COPY after the CopyInResponse, before reading any copy data."""
    pg.psql(
        f"""
        CREATE FUNCTION {table}_bs() RETURNS trigger LANGUAGE plpgsql
            AS $$BEGIN {body} RETURN NULL; END$$;
        CREATE TRIGGER bs BEFORE INSERT ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION {table}_bs();
        """
    )


def test_a_statement_trigger_refusing_a_pipelined_copy(proxy: Proxy, pg_server: PgServer) -> None:
    """A statement trigger that raises refuses the copy before PostgreSQL reads the Sync sent
    with its Execute, so PostgreSQL answers that Sync. dbward sent it on only for an error
    without context, and a PL/pgSQL error names its function: one ReadyForQuery was missing
    (the client hung). Pauses of 0 and 0.3 s: the data goes out with the error or before it."""
    for pause in ("", "PERFORM pg_sleep(0.3);"):
        table = _table(pg_server, "drift_bsraise")
        _statement_trigger(pg_server, table, f"{pause} RAISE EXCEPTION 'no copies';")
        for _ in range(3 if not pause else 1):  # timing varies when nothing pauses
            data = libpq_copy_in(table) + m.query("SELECT 1")
            expected, got = _both(proxy, pg_server, data, 10, wait=1)
            assert expected == [b"1", b"2", b"G", b"E", b"Z", b"Z", b"T", b"D", b"C", b"Z"]
            assert got == expected
            # The same in a simple Query with a Sync before the data: answered after the Query.
            data = (
                m.query(f"COPY {table} FROM STDIN")
                + m.sync()
                + m.copy_data(b"1\n")
                + m.copy_done()
                + m.query("SELECT 1")
            )
            expected, got = _both(proxy, pg_server, data, 8, wait=1)
            assert expected == [b"G", b"E", b"Z", b"Z", b"T", b"D", b"C", b"Z"]
            assert got == expected
    assert "Traceback" not in proxy.log()


BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension


def test_a_binary_copy_refused_after_reading_its_header(proxy: Proxy, pg_server: PgServer) -> None:
    """A binary COPY reads its header (and the Sync before it) before checking its target, so
    its errors without context came after PostgreSQL read the Sync: dbward took them for
    refusals before reading (a view or FREEZE) and sent the Sync on, one ReadyForQuery too
    many. Here a bad signature, and a view with a good header."""
    table = _table(pg_server, "drift_binary")
    pg_server.psql(f"CREATE VIEW {table}_v AS SELECT * FROM {table}")
    pg_server.psql(f"GRANT ALL ON {table}_v TO PUBLIC")
    for target, data, sqlstate in (
        (table, b"not a header", "22P04"),
        (f"{table}_v", BINARY_HEADER + b"\xff\xff", "42809"),
    ):
        copy = libpq_copy_in(target, data, " (FORMAT binary)")
        expected, got = _both(proxy, pg_server, copy + m.query("SELECT 1"), 9, wait=1)
        assert expected == [b"1", b"2", b"G", b"E", b"Z", b"T", b"D", b"C", b"Z"], sqlstate
        assert got == expected


def _cancel_copy(pg: PgServer, table: str) -> None:
    """Cancel the session running `COPY <table> ...` (pg_cancel_backend, as a cancel request)."""
    cancelled = pg.psql(
        "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity"
        f" WHERE query LIKE 'COPY {table} %' AND pid <> pg_backend_pid()"
    )
    assert cancelled == "1"


def _kinds_cancelled(
    sock: socket.socket,
    pg: PgServer,
    table: str,
    steps: list[tuple[bytes, float]],
    count: int,
    then: bytes = b"",
) -> list[str]:
    """Send each step's bytes and wait its pause, cancel the COPY, send `then`, read replies
    (the `count` expected and any more before the marker's answer, see _replies)."""
    for data, pause in steps:
        sock.sendall(data)
        time.sleep(pause)
    _cancel_copy(pg, table)
    if then:
        time.sleep(0.2)  # the cancel has arrived
        sock.sendall(then)
    return [_code(kind, payload) for kind, payload in _replies(sock, count)]


def _both_cancelled(
    proxy: Proxy, pg: PgServer, table: str, steps: list[tuple[bytes, float]], count: int
) -> tuple[list[str], list[str]]:
    direct = _direct(pg, 1.5)
    try:
        expected = _kinds_cancelled(direct, pg, table, steps, count)
    finally:
        direct.close()
    session = RawSession(proxy, app_name("drift-cancel"))
    session.sock.settimeout(1.5)
    try:
        got = _kinds_cancelled(session.sock, pg, table, steps, count)
    finally:
        session.close()
    return expected, got


def test_a_copy_cancelled_before_postgres_read_its_data(proxy: Proxy, pg_server: PgServer) -> None:
    """A cancel (57014) while the statement trigger runs, after the CopyInResponse: PostgreSQL
    had not read the Sync sent with the Execute, and answers it. dbward never sent on a Sync it
    had dropped after a cancel (taking every cancel for one that struck while PostgreSQL waited
    for data): one ReadyForQuery was missing."""
    table = _table(pg_server, "drift_bscancel")
    _statement_trigger(pg_server, table, "PERFORM pg_sleep(5);")
    steps = [(libpq_copy_in(table) + m.query("SELECT 1"), 0.5)]
    expected, got = _both_cancelled(proxy, pg_server, table, steps, 10)
    assert expected == ["1", "2", "G", "E:57014", "Z", "Z", "T", "D", "C", "Z"]
    assert got == expected
    # statement_timeout strikes there too
    data = m.query("SET statement_timeout = 300") + libpq_copy_in(table) + m.query("SELECT 1")
    expected_kinds, got_kinds = _both(proxy, pg_server, data, 12, wait=1.5)
    assert expected_kinds == [
        b"C",
        b"Z",
        b"1",
        b"2",
        b"G",
        b"E",
        b"Z",
        b"Z",
        b"T",
        b"D",
        b"C",
        b"Z",
    ]
    assert got_kinds == expected_kinds
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "0"


def test_a_copy_cancelled_while_postgres_waits_for_its_data(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """A cancel while PostgreSQL waits for copy data, having read and ignored the Sync sent with
    the Execute, strikes once data arrives: that Sync stays unanswered (round 23's case)."""
    table = _table(pg_server, "drift_waitcancel")
    start, data = libpq_copy_in(table).split(m.copy_data(b"1\n"))
    rest = m.copy_data(b"1\n") + data + m.query("SELECT 1")

    def run(sock: socket.socket) -> list[str]:
        sock.sendall(start)
        assert _kinds(sock, 3) == [b"1", b"2", b"G"]
        return _kinds_cancelled(sock, pg_server, table, [(b"", 0.3)], 6, then=rest)

    direct = _direct(pg_server, 1.5)
    try:
        expected = run(direct)
    finally:
        direct.close()
    session = RawSession(proxy, app_name("drift-waitcancel"))
    session.sock.settimeout(1.5)
    try:
        got = run(session.sock)
    finally:
        session.close()
    assert expected == ["E:57014", "Z", "T", "D", "C", "Z"]
    assert got == expected


# Round 28: a Sync sent into a COPY FROM STDIN after its data. PostgreSQL reads copy messages
# one at a time, as it needs data: a Sync it reads while copying it ignores, one it reads after
# the copy failed it answers (after an Execute's copy, the first ends the skip to a Sync).
# dbward ended the session (FATAL 08P01) for any Sync sent after the first CopyData.


def _run_copy(
    proxy: Proxy, pg: PgServer, messages: Callable[[str], list[bytes]], paced: bool, count: int
) -> tuple[tuple[list[str], str], tuple[list[str], str], str]:
    """Send `messages(table)` directly and through dbward, each into a fresh table of its own
    (`paced`: 0.15 s after each message but the last, so an error reaches dbward before what
    follows it; otherwise all at once). Returns (replies, the table's rows) for each, and
    dbward's session's application_name (its last statement is the marker's, see _replies)."""
    app = app_name("drift-copysync")
    runs: list[tuple[list[str], str]] = []
    for through_dbward in (False, True):
        table = _table(pg, "drift_copysync")
        if through_dbward:
            raw = RawSession(proxy, app)
            sock = raw.sock
        else:
            sock = _direct(pg)
        sock.settimeout(1)
        try:
            frames = messages(table)
            try:
                for i, frame in enumerate(frames if paced else [b"".join(frames)]):
                    if i:
                        time.sleep(0.15)
                    sock.sendall(frame)
            except ConnectionError:
                pass  # closed on us: the replies read so far say why
            replies = [_code(kind, payload) for kind, payload in _replies(sock, count)]
        finally:
            sock.close()
        rows = pg.psql(f"SELECT coalesce(string_agg(x::text, ',' ORDER BY x), '') FROM {table}")
        runs.append((replies, rows))
    return runs[0], runs[1], app


def _before_the_marker(records: list[AuditRecord]) -> list[AuditRecord]:
    """The session's statement records but the last, which must be the marker's."""
    found = statements(records)
    assert found and found[-1].sql_text.startswith(MARKER), found[-1:]
    return found[:-1]


def _execute_copy(table: str) -> list[bytes]:
    """Parse/Bind/Execute of COPY <table> FROM STDIN, no Sync after it."""
    return [
        m.parse_message("", f"COPY {table} FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
    ]


def _pipelined_after(table: str) -> list[bytes]:
    """What a client sends after the copy: an extended INSERT and its Sync, a simple Query."""
    return [
        m.parse_message("", f"INSERT INTO {table} VALUES (9)")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync(),
        m.query("SELECT 1"),
    ]


AFTER_REPLIES = ["1", "2", "C", "Z", "T", "D", "C", "Z"]
D1, D2, BAD, SYNC = m.copy_data(b"1\n"), m.copy_data(b"2\n"), m.copy_data(b"x\n"), m.sync()

# (name, copy messages after the Execute, replies to them up to the last Sync's, rows, outcome)
EXTENDED_COPIES = [
    ("succeeds", [D1, SYNC, D2, m.copy_done(), SYNC], ["C", "Z"], "1,2,9", ("ok", "", 2)),
    (
        "sync-mid-row",  # PostgreSQL reads the Sync before the row's end: ignored
        [m.copy_data(b"1"), SYNC, m.copy_data(b"\n2\n"), m.copy_done(), SYNC],
        ["C", "Z"],
        "1,2,9",
        ("ok", "", 2),
    ),
    (
        "bad-row-before-the-sync",  # the copy failed before PostgreSQL read it: answered
        [BAD, SYNC, D2, m.copy_done(), SYNC],
        ["E:22P02", "Z", "Z"],
        "9",
        ("error", "22P02", None),
    ),
    (
        "bad-row-after-the-sync",  # read while copying: ignored, then skipped to the last
        [D1, SYNC, BAD, m.copy_done(), SYNC],
        ["E:22P02", "Z"],
        "9",
        ("error", "22P02", None),
    ),
    (
        "copyfail-after-the-sync",
        [D1, SYNC, m.copy_fail("client gave up"), SYNC],
        ["E:57014", "Z"],
        "9",
        ("error", "57014", None),
    ),
    (
        "syncs-on-both-sides",  # two read while copying, two after the error, the last
        [D1, SYNC, SYNC, BAD, SYNC, SYNC, D2, m.copy_done(), SYNC],
        ["E:22P02", "Z", "Z", "Z"],
        "9",
        ("error", "22P02", None),
    ),
]


@pytest.mark.parametrize("paced", [False, True], ids=["at-once", "paced"])
@pytest.mark.parametrize(
    ("copy", "replies", "rows", "outcome"),
    [case[1:] for case in EXTENDED_COPIES],
    ids=[case[0] for case in EXTENDED_COPIES],
)
def test_a_sync_after_an_extended_copys_data(
    proxy: Proxy,
    pg_server: PgServer,
    copy: list[bytes],
    replies: list[str],
    rows: str,
    outcome: tuple[str, str, int | None],
    paced: bool,
) -> None:
    """Parse/Bind/Execute COPY, copy data with Syncs among it, CopyDone or CopyFail, Sync, then
    an INSERT and a Query: the same replies, rows and audit through dbward as directly."""
    expected, got, app = _run_copy(
        proxy,
        pg_server,
        lambda table: _execute_copy(table) + copy + _pipelined_after(table),
        paced,
        3 + len(replies) + len(AFTER_REPLIES),
    )
    assert expected == (["1", "2", "G", *replies, *AFTER_REPLIES], rows)
    assert got == expected
    records = proxy.session_records(app, until=has_disconnect)
    copied, inserted, selected = _before_the_marker(records)
    assert copied.command == "COPY" and inserted.command == "INSERT"
    found = outcome_of(records, copied)
    assert (found.status, found.sqlstate, found.rows) == outcome
    assert (outcome_of(records, inserted).status, outcome_of(records, inserted).rows) == ("ok", 1)
    assert (outcome_of(records, selected).status, outcome_of(records, selected).rows) == ("ok", 1)


def _query_copy(sql: str) -> Callable[[str], list[bytes]]:
    return lambda table: [m.query(sql.format(table=table))]


# (name, the Query, copy messages, replies up to the Query's ReadyForQuery and the Syncs', rows,
# outcomes of the Query's statements)
QUERY_COPIES = [
    (
        "succeeds",
        "COPY {table} FROM STDIN",
        [D1, SYNC, D2, m.copy_done()],
        ["G", "C", "Z"],
        "1,2,9",
        [("ok", "", 2)],
    ),
    (
        "bad-row-before-the-sync",
        "COPY {table} FROM STDIN",
        [BAD, SYNC, D2, m.copy_done()],
        ["G", "E:22P02", "Z", "Z"],
        "9",
        [("error", "22P02", None)],
    ),
    (
        "bad-row-after-the-sync",
        "COPY {table} FROM STDIN",
        [D1, SYNC, BAD, m.copy_done()],
        ["G", "E:22P02", "Z"],
        "9",
        [("error", "22P02", None)],
    ),
    (
        "copyfail-after-the-sync",
        "COPY {table} FROM STDIN",
        [D1, SYNC, m.copy_fail("client gave up")],
        ["G", "E:57014", "Z"],
        "9",
        [("error", "57014", None)],
    ),
    (
        "two-copies",
        "COPY {table} FROM STDIN; COPY {table} FROM STDIN",
        [D1, SYNC, m.copy_done(), D2, SYNC, m.copy_done()],
        ["G", "C", "G", "C", "Z"],
        "1,2,9",
        [("ok", "", 1), ("ok", "", 1)],
    ),
    (
        "two-copies-the-second-fails",  # the first one's row goes with the Query's transaction
        "COPY {table} FROM STDIN; COPY {table} FROM STDIN",
        [D1, SYNC, m.copy_done(), BAD, SYNC, SYNC, m.copy_done()],
        ["G", "C", "G", "E:22P02", "Z", "Z", "Z"],
        "9",
        [("rolled_back", "22P02", None), ("error", "22P02", None)],
    ),
]


@pytest.mark.parametrize("paced", [False, True], ids=["at-once", "paced"])
@pytest.mark.parametrize(
    ("sql", "copy", "replies", "rows", "outcomes"),
    [case[1:] for case in QUERY_COPIES],
    ids=[case[0] for case in QUERY_COPIES],
)
def test_a_sync_after_a_simple_query_copys_data(
    proxy: Proxy,
    pg_server: PgServer,
    sql: str,
    copy: list[bytes],
    replies: list[str],
    rows: str,
    outcomes: list[tuple[str, str, int | None]],
    paced: bool,
) -> None:
    """Query(COPY ... FROM STDIN), copy data with Syncs among it, then an INSERT and a Query."""
    expected, got, app = _run_copy(
        proxy,
        pg_server,
        lambda table: _query_copy(sql)(table) + copy + _pipelined_after(table),
        paced,
        len(replies) + len(AFTER_REPLIES),
    )
    assert expected == ([*replies, *AFTER_REPLIES], rows)
    assert got == expected
    records = proxy.session_records(app, until=has_disconnect)
    found = _before_the_marker(records)
    copies, (inserted, selected) = found[:-2], found[-2:]
    assert [c.command for c in copies] == ["COPY"] * len(outcomes)
    assert [
        (
            outcome_of(records, c).status,
            outcome_of(records, c).sqlstate,
            outcome_of(records, c).rows,
        )
        for c in copies
    ] == outcomes
    assert (outcome_of(records, inserted).status, outcome_of(records, inserted).rows) == ("ok", 1)
    assert (outcome_of(records, selected).status, outcome_of(records, selected).rows) == ("ok", 1)
