"""How statements become audit records: one record for a quick statement, two for a long one."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg

from dbward.audit.records import AuditRecord
from dbward.wire.postgres import messages
from fixtures.clients import app_name, has_disconnect, is_outcome, outcomes, statements
from fixtures.proxy import Proxy
from fixtures.raw import RawSession


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
    max_statement_bytes, 16 MB), and a Bind or Execute of a name dbward never saw quoted the
    name (up to a message's size). They are kept to their start, like a claimed name."""
    app = app_name("bounded-after-login")
    session = RawSession(proxy, app)
    try:
        big = 200_000
        replies = session.query("SELECT 'never closed " + "q" * big)
        errors = [messages.parse_error_fields(p) for t, p in replies if t == b"E"]
        assert len(errors) == 1 and errors[0]["C"] == "42501", errors
        assert len(errors[0]["M"]) < 500, len(errors[0]["M"])
        replies = session.send(messages.execute_message("p" * 60_000) + messages.sync())
        errors = [messages.parse_error_fields(p) for t, p in replies if t == b"E"]
        assert len(errors) == 1 and errors[0]["C"] == "42501", errors
        assert len(errors[0]["M"]) < 500, len(errors[0]["M"])
        assert session.query("SELECT 1")[-1][0] == b"Z"
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [r.decision for r in intents] == ["deny", "deny", "allow"], intents
    unterminated, portal = intents[0].detail, intents[1].detail
    assert unterminated.startswith("""unterminated quoted string at or near "'never closed qqq""")
    assert portal.startswith("portal 'pppp")
    assert all("…[truncated: " in text for text in (unterminated, portal))
    for record in records:
        assert _record_text(record) < 6000, (record.event, record.command, len(record.detail))
