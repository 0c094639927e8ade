"""How statements become audit records: one record for a quick statement, two for a long one."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest

from dbward.audit.records import AuditRecord
from dbward.wire.postgres import messages
from fixtures import protofuzz as fz
from fixtures.clients import app_name, has_disconnect, is_outcome, outcomes, statements
from fixtures.drivers import aconnect, outcomes_of
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession, direct_session, read_message, scratch_table


def _intent(records: list[AuditRecord], needle: str) -> AuditRecord | None:
    return next((r for r in statements(records) if needle in r.sql_text), None)


def test_long_read_intent_is_written_while_it_runs(proxy: Proxy) -> None:
    # A read's intent is not waited for, but holding it back to share a record with its
    # outcome must never keep it out of the log past the batch delay (50 ms here).
    app = app_name("longread")
    with (
        psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn,
        ThreadPoolExecutor(1) as pool,
    ):
        started = time.monotonic()
        running = pool.submit(lambda: conn.execute("SELECT pg_sleep(2)").fetchone())
        records = proxy.session_records(
            app, until=lambda rs: _intent(rs, "pg_sleep") is not None, timeout=1.5
        )
        seen_after = time.monotonic() - started
        intent = _intent(records, "pg_sleep")
        assert intent is not None, "the intent of a running read is not in the log"
        assert not running.done() and seen_after < 1.5
        assert (intent.status, intent.rows, intent.duration_ms) == ("", None, None)
        running.result(timeout=10)
    records = proxy.session_records(app, until=has_disconnect)
    outcome = outcomes(records)[(intent.session_id, intent.statement_id)]
    assert outcome.event == "outcome"
    assert (outcome.status, outcome.rows) == ("ok", 1)
    assert outcome.duration_ms is not None and outcome.duration_ms >= 2000


def test_quick_statements_get_one_record_each(proxy: Proxy) -> None:
    app = app_name("quick")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        for i in range(20):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert len(intents) == 20
    # A statement whose outcome arrived before the next batch was written (within 50 ms)
    # is one record carrying intent and outcome; allow a few that straddled a batch.
    merged = [r for r in intents if r.status]
    assert len(merged) >= 15, [(r.statement_id, r.status) for r in intents]
    assert all((r.status, r.rows, r.decision) == ("ok", 1, "allow") for r in merged)
    assert all(r.duration_ms is not None and r.ts_ms > 0 for r in merged)
    assert len(outcomes(records)) == 20
    assert sum(1 for r in records if is_outcome(r)) == 20  # never both kinds for one statement
    # The same text executed again is hashed once per session; the hash must still be its own.
    assert {r.sql_text for r in intents} == {"SELECT $1::int"}
    assert {r.sql_sha256 for r in intents} == {hashlib.sha256(b"SELECT $1::int").hexdigest()}


def test_multi_statement_string_keeps_statement_order_in_strict_mode(proxy: Proxy) -> None:
    # The read's intent is held; the INSERT after it waits for a durable intent, which must
    # not overtake the read's in the log.
    app = app_name("order")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS order_t (id int)")
        conn.execute("SELECT 1; INSERT INTO order_t VALUES (1); SELECT 2")
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [r.command for r in intents] == ["CREATE TABLE", "SELECT", "INSERT", "SELECT"]
    ids = [r.statement_id for r in intents]
    assert ids == sorted(ids)
    select_1, insert = intents[1], intents[2]
    # the first SELECT was sent on ahead of the durable INSERT intent, so neither could merge
    assert select_1.status == "" and insert.status == ""
    by_id = outcomes(records)
    assert [by_id[(r.session_id, r.statement_id)].status for r in intents] == ["ok"] * 4
    assert by_id[(insert.session_id, insert.statement_id)].rows == 1


def test_application_name_is_stored_cut_on_every_statement_record(proxy: Proxy) -> None:
    """The application_name a client claims at login is repeated on every record of its
    session: a long one is kept to 63 characters, the cut marked with its length and hash."""
    claimed = app_name("huge-app") + "-" + "a" * 5000
    with psycopg.connect(**proxy.conninfo(application_name=claimed), autocommit=True) as conn:
        for i in range(3):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        # PostgreSQL itself keeps 63 bytes of it (NAMEDATALEN - 1).
        assert conn.execute("SHOW application_name").fetchone() == (claimed[:63],)
    raw = claimed.encode()
    cut = f"{claimed[:63]}…[truncated: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}]"
    records = proxy.session_records(cut, until=has_disconnect)
    assert [r.event for r in records][:2] == ["connect", "auth_ok"]
    assert len(statements(records)) == 4
    assert {r.application_name for r in records if r.event != "outcome"} == {cut}


def _record_text(record: AuditRecord) -> int:
    return sum(len(v) for v in record if isinstance(v, str)) + sum(map(len, record.tables))


def test_client_names_and_parser_errors_are_kept_bounded_after_login(proxy: Proxy) -> None:
    """sql_text is cut at sql_text_max, but the record's detail held the parser's message or
    dbward's own whole: an unterminated string quotes the rest of the statement (up to
    max_statement_bytes, 16 MB), and an Execute of a portal name refused as too long quotes the
    name (up to a message's size). They are kept to their start, like a claimed name."""
    app = app_name("bounded-after-login")
    session = RawSession(proxy, app)
    try:
        big = 200_000
        replies = session.query("SELECT 'never closed " + "q" * big)
        errors = [messages.parse_error_fields(p) for t, p in replies if t == b"E"]
        assert len(errors) == 1 and errors[0]["C"] == "42501", errors
        assert len(errors[0]["M"]) < 500, len(errors[0]["M"])
        # A portal name over 63 bytes is refused (guard.name_limit), whatever it names.
        long_name = "p" * 5_000
        replies = session.send(messages.execute_message(long_name) + messages.sync())
        errors = [messages.parse_error_fields(p) for t, p in replies if t == b"E"]
        assert len(errors) == 1 and errors[0]["C"] == "42622", errors
        assert len(errors[0]["M"]) < 500, len(errors[0]["M"])
        assert session.query("SELECT 1")[-1][0] == b"Z"
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [(r.decision, r.rule) for r in intents] == [
        ("deny", "guard.unparseable"),
        ("deny", "guard.name_limit"),
        ("allow", "default.allow"),
    ]
    unterminated, portal = intents[0].detail, intents[1].detail
    assert unterminated.startswith("""unterminated quoted string at or near "'never closed qqq""")
    assert portal.startswith("portal name 'pppp")
    assert all("…[truncated: " in text for text in (unterminated, portal))
    for record in records:
        assert _record_text(record) < 6000, (record.event, record.command, len(record.detail))


def test_a_portal_that_does_not_exist_is_in_no_record_and_a_refused_query_in_one(
    proxy: Proxy,
) -> None:
    """An Execute of a portal PostgreSQL does not hold (its Bind failed in an earlier sync
    group) gets PostgreSQL's 34000 and no record: nothing ran and nothing was refused. A Query
    refused in a transaction block is recorded denied once, whatever its stand-in does upstream
    (it fails as it runs, leaving the failed unnamed portal a Describe then finds)."""
    app = app_name("no-such-portal")
    session = RawSession(proxy, app)
    try:
        replies = session.send(
            messages.parse_message("s1", "SELECT $1::int AS d")
            + messages.bind_message("p1", "s1", [b"x"])
            + messages.sync()
        )
        assert [k for k, _ in replies] == [b"1", b"E", b"Z"]
        replies = session.send(messages.execute_message("p1") + messages.sync())
        assert [k for k, _ in replies] == [b"E", b"Z"]
        assert messages.parse_error_fields(replies[0][1])["C"] == "34000"
        session.query("BEGIN")
        replies = session.query("EXECUTE q2(7)")
        assert messages.parse_error_fields(replies[0][1])["C"] == "42501"
        replies = session.send(messages.describe_message("P", "") + messages.sync())
        assert [k for k, _ in replies] == [b"n", b"Z"]  # NoData, as from PostgreSQL
        session.query("ROLLBACK")
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    assert [(s.sql_text, s.decision, outcomes_of(records, s)) for s in statements(records)] == [
        ("BEGIN", "allow", [("ok", "")]),
        ("EXECUTE q2(7)", "deny", [("denied", "42501")]),
        ("ROLLBACK", "allow", [("ok", "")]),
    ]


def _answers(replies: list[tuple[bytes, bytes]]) -> list[str]:
    """Message types, errors with their SQLSTATE and message (not their routine or line)."""
    shown = []
    for kind, payload in replies:
        if kind == b"E":
            fields = messages.parse_error_fields(payload)
            shown.append(f"E {fields['C']} {fields['M']}")
        elif kind != b"N":
            shown.append(kind.decode())
    return shown


def _replies(sock: socket.socket, data: bytes, syncs: int) -> list[tuple[bytes, bytes]]:
    """Send `data`; the replies up to the `syncs`-th ReadyForQuery."""
    sock.sendall(data)
    out = []
    while syncs:
        kind, payload = read_message(sock)
        out.append((kind, payload))
        syncs -= kind == b"Z"
    return out


# (frames, ReadyForQuery messages they get): Binds of statements PostgreSQL does not hold.
_BINDS_OF_NOTHING = [
    # The unnamed statement, after a simple Query dropped it.
    (messages.parse_message("", "SELECT 'r51 old'") + messages.sync(), 1),
    (messages.query("SELECT 'r51 query'"), 1),
    (messages.bind_message("", "", []) + messages.execute_message("") + messages.sync(), 1),
    # A name that never existed.
    (messages.bind_message("p", "r51_never") + messages.execute_message("p") + messages.sync(), 1),
    # One whose Parse PostgreSQL refused in an earlier sync group.
    (messages.parse_message("r51_bad", "SELECT * FROM r51_no_table") + messages.sync(), 1),
    (messages.bind_message("p", "r51_bad") + messages.execute_message("p") + messages.sync(), 1),
    # One closed earlier in the same sync group; then, pipelined, two sync groups more, the
    # last running a statement.
    (messages.parse_message("r51_s", "SELECT 'r51 closed'") + messages.sync(), 1),
    (
        messages.close_message("S", "r51_s")
        + messages.bind_message("p", "r51_s")
        + messages.execute_message("p")
        + messages.sync()
        + messages.bind_message("", "r51_never2")
        + messages.describe_message("P", "")
        + messages.execute_message("")
        + messages.flush()
        + messages.sync()
        + messages.parse_message("", "SELECT 'r51 after'")
        + messages.bind_message("", "")
        + messages.execute_message("")
        + messages.sync(),
        3,
    ),
]


def test_a_bind_of_a_statement_postgresql_does_not_hold_is_in_no_record(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """A Bind of a statement neither dbward nor PostgreSQL holds: PostgreSQL answers 26000
    "prepared statement does not exist" and skips the Execute; nothing ran. dbward forwarded
    the Bind and recorded the Execute `deny`, `denied` (42501) while the client got the 26000.
    It now asks PostgreSQL (a Describe of the statement): its answer is the client's, as from
    PostgreSQL itself, and nothing is recorded."""

    def exact(replies: list[tuple[bytes, bytes]]) -> list[tuple[str, ...]]:
        # Every field of every reply, but an error's source file, line and routine.
        return [fz._normalize(kind, payload) for kind, payload in replies]

    direct = direct_session(pg_server)
    try:
        expected = [exact(_replies(direct, data, n)) for data, n in _BINDS_OF_NOTHING]
    finally:
        direct.close()
    missing = [reply for group in expected for reply in group if "C=26000" in reply]
    assert len(missing) == 5, expected
    app = app_name("r51-bind-nothing")
    session = RawSession(proxy, app)
    try:
        got = [exact(_replies(session.sock, data, n)) for data, n in _BINDS_OF_NOTHING]
    finally:
        session.close()
    assert got == expected
    records = proxy.session_records(app, until=has_disconnect)
    assert [(s.sql_text, s.decision, outcomes_of(records, s)) for s in statements(records)] == [
        ("SELECT 'r51 query'", "allow", [("ok", "")]),
        ("SELECT * FROM r51_no_table", "allow", [("error", "42P01")]),
        ("SELECT 'r51 after'", "allow", [("ok", "")]),
    ]


_PREPARING_FUNCTION = """
CREATE OR REPLACE FUNCTION public.r51_prepares(tab text) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
  EXECUTE 'PREPARE r51_rows(int) AS SELECT $1 + 1 AS n';
  EXECUTE format('PREPARE r51_write(int) AS INSERT INTO %I VALUES ($1)', tab);
END $f$;
"""


def test_a_bind_of_a_statement_a_function_prepared_is_refused_and_recorded(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """A function created before dbward (not through it: guard.dynamic_sql) may PREPARE: dbward
    never saw what that statement runs. A Bind of it is refused (42501) and recorded `deny`,
    `denied` once PostgreSQL has said it holds the statement; its description (the
    ParameterDescription, then RowDescription or NoData) is not passed on, nothing of it runs,
    and what follows the Sync runs as usual. dbward forwarded the Bind and refused the Execute:
    the client got BindComplete and the portal's description before the refusal."""
    table = scratch_table(pg_server, "r51_fn")
    pg_server.psql(_PREPARING_FUNCTION)
    app = app_name("r51-bind-fn")
    session = RawSession(proxy, app)
    try:
        assert _answers(session.query(f"SELECT r51_prepares('{table}')"))[-2:] == ["C", "Z"]
        for name in ("r51_rows", "r51_write"):
            replies = session.send(
                messages.bind_message("p", name, [b"5"])
                + messages.describe_message("P", "p")
                + messages.execute_message("p")
                + messages.sync()
            )
            answers = _answers(replies)
            assert [a[:7] for a in answers] == ["E 42501", "Z"], answers
            assert "prepared statement <...> was not seen by dbward" in answers[0], answers
        # Pipelined behind a Bind PostgreSQL refuses (26000, no record) and before a statement
        # that runs.
        replies = _replies(
            session.sock,
            messages.bind_message("", "r51_gone", [b"1"])
            + messages.execute_message("")
            + messages.sync()
            + messages.bind_message("", "r51_write", [b"6"])
            + messages.execute_message("")
            + messages.sync()
            + messages.parse_message("", "SELECT 'r51 next'")
            + messages.bind_message("", "")
            + messages.execute_message("")
            + messages.sync(),
            3,
        )
        answers = _answers(replies)
        assert [a[:7] for a in answers] == ["E 26000", "Z", "E 42501", "Z", "1", "2", "D", "C", "Z"]
    finally:
        session.close()
    assert pg_server.psql(f"SELECT count(*) FROM {table}") == "0"  # nothing was inserted
    records = proxy.session_records(app, until=has_disconnect)
    refused = ("", "deny", "guard.unparseable", [("denied", "42501")])
    found = [(s.sql_text, s.decision, s.rule, outcomes_of(records, s)) for s in statements(records)]
    # The last refusal is written once PostgreSQL has answered dbward's Describe: after the
    # intent of the statement pipelined behind it.
    assert sorted(found) == sorted(
        [
            (f"SELECT r51_prepares('{table}')", "allow", "default.allow", [("ok", "")]),
            refused,
            refused,
            refused,
            ("SELECT 'r51 next'", "allow", "default.allow", [("ok", "")]),
        ]
    )
    details = [s.detail for s in statements(records) if s.decision == "deny"]
    assert details == [
        "prepared statement 'r51_rows' was not seen by dbward",
        "prepared statement 'r51_write' was not seen by dbward",
        "prepared statement 'r51_write' was not seen by dbward",
    ]


def test_error_at_parse_or_bind_is_the_outcome_of_the_execute_that_needed_it(
    proxy: Proxy,
) -> None:
    """PostgreSQL skips to Sync after a failed Parse or Bind: the Execute of the portal bound
    from that statement (or of that portal) failed with that error; the other Executes skipped
    in the group were not executed. (All were `not_executed`, without SQLSTATE, before: what
    pgjdbc, node-postgres and psycopg send for a statement naming an unknown table.)"""
    app = app_name("parse-error")
    session = RawSession(proxy, app)
    try:
        kinds = [
            k for k, _ in session.send(messages.parse_message("ok_s", "SELECT 1") + messages.sync())
        ]
        assert kinds == [b"1", b"Z"]
        replies = session.send(
            messages.parse_message("bad_s", "SELECT * FROM r37_no_such_table")
            + messages.bind_message("p1", "ok_s")
            + messages.execute_message("p1")
            + messages.bind_message("p2", "bad_s")
            + messages.execute_message("p2")
            + messages.sync()
        )
        assert [k for k, _ in replies] == [b"E", b"Z"]
        assert messages.parse_error_fields(replies[0][1])["C"] == "42P01"
        replies = session.send(
            messages.parse_message("", "SELECT $1::int")
            + messages.bind_message("", "", [b"x"])
            + messages.execute_message("")
            + messages.bind_message("p3", "ok_s")
            + messages.execute_message("p3")
            + messages.sync()
        )
        assert [k for k, _ in replies] == [b"1", b"E", b"Z"]
        assert messages.parse_error_fields(replies[1][1])["C"] == "22P02"
        assert [k for k, _ in session.query("SELECT 2")][-1] == b"Z"
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    assert [(s.sql_text, outcomes_of(records, s)) for s in statements(records)] == [
        ("SELECT 1", [("not_executed", "")]),
        ("SELECT * FROM r37_no_such_table", [("error", "42P01")]),
        ("SELECT $1::int", [("error", "22P02")]),
        ("SELECT 1", [("not_executed", "")]),
        ("SELECT 2", [("ok", "")]),
    ]


def test_a_parse_refused_with_no_execute_after_it_is_recorded_with_its_error(
    proxy: Proxy,
) -> None:
    """asyncpg prepares a statement (Parse, Describe, Sync) before it executes it, pgjdbc's
    getParameterMetaData does the same: when PostgreSQL refuses that Parse (an unknown
    table), no Execute follows to carry the error, and the statement the client tried was in
    no record at all. It is recorded now, with the error."""
    app = app_name("parse-only")
    session = RawSession(proxy, app)
    try:
        replies = session.send(
            messages.parse_message("", "SELECT * FROM r37_missing_table")
            + messages.describe_message("S", "")
            + messages.sync()
        )
        assert [k for k, _ in replies] == [b"E", b"Z"]
        # a named one
        replies = session.send(
            messages.parse_message("named", "SELECT r37_missing_column FROM pg_class")
            + messages.sync()
        )
        assert [k for k, _ in replies] == [b"E", b"Z"]
        # a Parse that succeeds writes nothing until it is executed
        replies = session.send(messages.parse_message("fine", "SELECT 3") + messages.sync())
        assert [k for k, _ in replies] == [b"1", b"Z"]
        assert [k for k, _ in session.query("SELECT 2")][-1] == b"Z"
    finally:
        session.close()

    async def run() -> None:
        conn = await aconnect(proxy, f"{app}-asyncpg")
        try:
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM r37_missing_for_asyncpg WHERE x = $1", 1)
            assert await conn.fetchval("SELECT 4") == 4
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    assert [(s.path, s.sql_text, outcomes_of(records, s)) for s in statements(records)] == [
        ("extended", "SELECT * FROM r37_missing_table", [("error", "42P01")]),
        ("extended", "SELECT r37_missing_column FROM pg_class", [("error", "42703")]),
        ("simple", "SELECT 2", [("ok", "")]),
    ]
    assert {s.decision for s in statements(records)} == {"allow"}
    assert records[-1].detail == "statements=3"
    records = proxy.session_records(f"{app}-asyncpg", until=has_disconnect)
    assert [(s.sql_text, outcomes_of(records, s)) for s in statements(records)] == [
        ("SELECT * FROM r37_missing_for_asyncpg WHERE x = $1", [("error", "42P01")]),
        ("SELECT 4", [("suspended", "")]),  # fetchval: a row limit of 1
    ]


def test_errors_before_the_execute_across_sync_groups_flushes_and_redefinitions(
    proxy: Proxy,
) -> None:
    """Each statement gets one intent and one outcome, the error going to the statement that
    caused it: an unnamed statement redefined by a failed Parse after its portal was bound; a
    Bind failing after another portal's Execute was queued; a Parse refused on a Flush, the
    Bind/Execute after the error discarded; several sync groups with a Close between; a
    Query sent after the error in an extended group (PostgreSQL ignores it until Sync)."""
    app = app_name("parse-groups")
    session = RawSession(proxy, app)

    def kinds(replies: list[tuple[bytes, bytes]]) -> list[bytes]:
        return [k for k, _ in replies]

    try:
        # The portal of 'a1' is bound, then the unnamed statement is redefined by a Parse that
        # fails: the Execute (of 'a1') is skipped; the refused Parse carries the error.
        replies = session.send(
            messages.parse_message("", "SELECT 'a1'")
            + messages.bind_message("", "")
            + messages.parse_message("", "SELECT * FROM r40_nope1")
            + messages.execute_message("")
            + messages.sync()
        )
        assert kinds(replies) == [b"1", b"2", b"E", b"Z"]
        # p1's Bind fails after p2's Execute was queued: the error is p1's.
        assert kinds(
            session.send(messages.parse_message("s4", "SELECT $1::int AS v") + messages.sync())
        ) == [
            b"1",
            b"Z",
        ]
        replies = session.send(
            messages.bind_message("p1", "s4", [b"x"])
            + messages.bind_message("p2", "s4", [b"2"])
            + messages.execute_message("p2")
            + messages.execute_message("p1")
            + messages.sync()
        )
        assert kinds(replies) == [b"E", b"Z"]
        # Refused on a Flush: what the client sends before its Sync is skipped, unrecorded.
        session.sock.sendall(
            messages.parse_message("s6", "SELECT * FROM r40_nope6") + messages.flush()
        )
        assert read_message(session.sock)[0] == b"E"
        replies = session.send(
            messages.bind_message("p6", "s6") + messages.execute_message("p6") + messages.sync()
        )
        assert kinds(replies) == [b"Z"]
        # Two sync groups in one write, a Close in the second.
        session.sock.sendall(
            messages.parse_message("s1", "SELECT 's1'")
            + messages.bind_message("q1", "s1")
            + messages.execute_message("q1")
            + messages.sync()
            + messages.parse_message("s2", "SELECT * FROM r40_nope3")
            + messages.bind_message("q2", "s2")
            + messages.execute_message("q2")
            + messages.close_message("S", "s1")
            + messages.sync()
        )
        assert kinds(session.read_until_ready()) == [b"1", b"2", b"D", b"C", b"Z"]
        assert kinds(session.read_until_ready()) == [b"E", b"Z"]
        # 'a8' runs, then a failed Parse redefines the unnamed statement in the same group.
        replies = session.send(
            messages.parse_message("", "SELECT 'a8'")
            + messages.bind_message("", "")
            + messages.execute_message("")
            + messages.parse_message("", "SELECT * FROM r40_nope8")
            + messages.bind_message("", "")
            + messages.execute_message("")
            + messages.sync()
        )
        assert kinds(replies) == [b"1", b"2", b"D", b"C", b"E", b"Z"]
        # A Query after the error, before the Sync: PostgreSQL ignores it.
        replies = session.send(
            messages.parse_message("", "SELECT * FROM r40_nope10")
            + messages.bind_message("", "")
            + messages.execute_message("")
            + messages.query("SELECT 'q10'")
            + messages.sync()
        )
        assert kinds(replies) == [b"E", b"Z"]
        assert kinds(session.query("SELECT 'end'"))[-1] == b"Z"
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    assert [(s.sql_text, outcomes_of(records, s)) for s in statements(records)] == [
        ("SELECT 'a1'", [("not_executed", "")]),
        ("SELECT * FROM r40_nope1", [("error", "42P01")]),
        ("SELECT $1::int AS v", [("not_executed", "")]),  # p2
        ("SELECT $1::int AS v", [("error", "22P02")]),  # p1
        ("SELECT * FROM r40_nope6", [("error", "42P01")]),
        ("SELECT 's1'", [("ok", "")]),
        ("SELECT * FROM r40_nope3", [("error", "42P01")]),
        ("SELECT 'a8'", [("ok", "")]),
        ("SELECT * FROM r40_nope8", [("error", "42P01")]),
        ("SELECT * FROM r40_nope10", [("error", "42P01")]),
        ("SELECT 'q10'", [("not_executed", "")]),
        ("SELECT 'end'", [("ok", "")]),
    ]
