"""`rolled_back` is claimed only where PostgreSQL undid the statement (twelfth review: each
false claim was proven against the table contents before its fix)."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from dbward.audit.records import AuditRecord
from fixtures.clients import app_name, has_disconnect, run_psql, statements
from fixtures.drivers import aconnect as _aconnect
from fixtures.drivers import connect as _connect
from fixtures.drivers import count_rows as _count
from fixtures.drivers import outcomes_of as _outcomes
from fixtures.proxy import Proxy


@pytest.fixture(scope="module", autouse=True)
def _r12(proxy: Proxy) -> None:
    with _connect(proxy, "setup-r12", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS r12")
        conn.execute("CREATE TABLE r12 (id int primary key, v text)")
        conn.execute(
            "CREATE OR REPLACE PROCEDURE r12_commit() LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$"
        )


def _last(records: list[AuditRecord], stmt: AuditRecord) -> tuple[str, str]:
    return _outcomes(records, stmt)[-1]


@pytest.mark.parametrize(
    ("middle", "row", "tag"),
    [
        # DO with COMMIT commits the sync group's transaction so far.
        ("DO $$ BEGIN COMMIT; END $$", 101, "do"),
        ("CALL r12_commit()", 102, "call"),
        # PREPARE TRANSACTION with no block: warning, tag ROLLBACK, but the sync group's
        # transaction so far is committed at once.
        ("PREPARE TRANSACTION 'r12x'", 103, "prep"),
    ],
)
def test_statement_that_commits_in_a_pipeline_keeps_the_write_ok(
    proxy: Proxy, middle: str, row: int, tag: str
) -> None:
    """Extended protocol: the INSERT before it stays, although the sync group then fails."""
    app = app_name(f"r12-{tag}")
    with (
        _connect(proxy, app, autocommit=True) as conn,
        pytest.raises(psycopg.errors.UniqueViolation),
        conn.pipeline(),
    ):
        conn.execute("INSERT INTO r12 VALUES (%s, %s)", (row, tag))
        conn.execute(middle)
        conn.execute("INSERT INTO r12 VALUES (%s, %s)", (row, tag))
    assert _count(proxy, f"SELECT count(*) FROM r12 WHERE id = {row}") == 1  # PG kept it
    records = proxy.session_records(app, until=has_disconnect)
    insert = next(s for s in statements(records) if s.command == "INSERT")
    assert _last(records, insert) == ("ok", "")


def test_prepare_transaction_alone_is_not_rolled_back(proxy: Proxy) -> None:
    app = app_name("r12-prep1")
    with _connect(proxy, app, autocommit=True) as conn:
        conn.execute("INSERT INTO r12 VALUES (%s, 'prep1')", (104,))
        conn.execute("PREPARE TRANSACTION 'r12y'")
    records = proxy.session_records(app, until=has_disconnect)
    (prep,) = [s for s in statements(records) if s.command == "PREPARE TRANSACTION"]
    assert _outcomes(records, prep) == [("ok", "")]


def test_rollback_to_savepoint_is_not_rolled_back(proxy: Proxy) -> None:
    """psycopg nested conn.transaction() in autocommit: SAVEPOINT / ROLLBACK TO SAVEPOINT;
    the outer transaction commits."""
    app = app_name("r12-sp")

    class Boom(Exception):
        pass

    with _connect(proxy, app, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO r12 VALUES (%s, 'sp')", (105,))
        try:
            with conn.transaction():
                conn.execute("INSERT INTO r12 VALUES (%s, 'sp')", (106,))
                raise Boom
        except Boom:
            pass
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 105") == 1
    records = proxy.session_records(app, until=has_disconnect)
    (rb,) = [s for s in statements(records) if s.command == "ROLLBACK TO SAVEPOINT"]
    assert _outcomes(records, rb) == [("ok", "")]


def test_vacuum_in_pipeline(proxy: Proxy) -> None:
    app = app_name("r12-vac")
    with (
        _connect(proxy, app, autocommit=True) as conn,
        pytest.raises(psycopg.Error),
        conn.pipeline(),
    ):
        conn.execute("INSERT INTO r12 VALUES (%s, 'vac')", (107,))
        conn.execute("VACUUM r12")
        conn.execute("INSERT INTO r12 VALUES (%s, 'vac')", (107,))
    kept = _count(proxy, "SELECT count(*) FROM r12 WHERE id = 107")
    records = proxy.session_records(app, until=has_disconnect)
    insert = next(s for s in statements(records) if s.command == "INSERT")
    assert (_last(records, insert)[0] == "rolled_back") == (kept == 0)


def test_fatal_ends_implicit_transaction(proxy: Proxy) -> None:
    app = app_name("r12-fatal")
    result = run_psql(
        proxy.dsn(application_name=app),
        "INSERT INTO r12 VALUES (112, 'fatal'); SELECT pg_terminate_backend(pg_backend_pid())",
    )
    assert "terminating connection" in result.stderr, result.stderr
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 112") == 0
    records = proxy.session_records(app, until=has_disconnect)
    (i1,) = [s for s in statements(records) if s.command == "INSERT"]
    assert _last(records, i1)[0] == "rolled_back"


def test_sync_separates_write_from_error(proxy: Proxy) -> None:
    app = app_name("r12-sync")
    with (
        _connect(proxy, app, autocommit=True) as conn,
        pytest.raises(psycopg.errors.UniqueViolation),
        conn.pipeline() as p,
    ):
        conn.execute("INSERT INTO r12 VALUES (%s, 'sync')", (113,))
        p.sync()
        conn.execute("INSERT INTO r12 VALUES (%s, 'sync')", (114,))
        conn.execute("INSERT INTO r12 VALUES (%s, 'sync')", (113,))
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 113") == 1
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 114") == 0
    records = proxy.session_records(app, until=has_disconnect)
    i1, i2, _i3 = [s for s in statements(records) if s.command == "INSERT"]
    assert _outcomes(records, i1) == [("ok", "")]
    assert _last(records, i2) == ("rolled_back", "23505")


def test_do_with_handler_no_error(proxy: Proxy) -> None:
    app = app_name("r12-dohandler")
    run_psql(
        proxy.dsn(application_name=app),
        "INSERT INTO r12 VALUES (115, 'h'); "
        "DO $$ BEGIN PERFORM 1/0; EXCEPTION WHEN others THEN RAISE WARNING 'x'; END $$",
    )
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 115") == 1
    records = proxy.session_records(app, until=has_disconnect)
    (i1,) = [s for s in statements(records) if s.command == "INSERT"]
    assert _outcomes(records, i1) == [("ok", "")]


def test_copy_then_error(proxy: Proxy) -> None:
    app = app_name("r12-copy")
    run_psql(
        proxy.dsn(application_name=app + "p"),
        "COPY r12 (id, v) FROM STDIN; SELECT 1/0",
        stdin="120\tcopy\n\\.\n",
    )
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 120") == 0
    records = proxy.session_records(app + "p", until=has_disconnect)
    (c,) = [s for s in statements(records) if s.command == "COPY"]
    assert _last(records, c) == ("rolled_back", "22012")


def test_asyncpg_transaction_executemany(proxy: Proxy) -> None:
    app = app_name("r12-apg")

    async def run() -> None:
        conn = await _aconnect(proxy, app)
        try:
            await conn.executemany("INSERT INTO r12 VALUES ($1, 'apg')", [(121,), (122,)])
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany("INSERT INTO r12 VALUES ($1, 'apg')", [(123,), (121,)])
        finally:
            await conn.close()

    asyncio.run(run())
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id IN (121,122)") == 2
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 123") == 0
    records = proxy.session_records(app, until=has_disconnect)
    ins = [s for s in statements(records) if s.command == "INSERT"]
    outs = [_last(records, s)[0] for s in ins]
    assert outs == ["ok", "ok", "rolled_back", "error"]


@pytest.mark.parametrize("slow", [False, True])
def test_denial_in_later_sync_group(proxy: Proxy, slow: bool) -> None:
    app = app_name("r12-deny")
    base = 140 if slow else 150
    with (
        _connect(proxy, app, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        conn.pipeline() as p,
    ):
        if slow:
            conn.execute("SELECT pg_sleep(0.3)")
        conn.execute("INSERT INTO r12 VALUES (%s, 'deny')", (base,))
        p.sync()
        conn.execute("INSERT INTO r12 VALUES (%s, 'deny')", (base + 1,))
        conn.execute("SET ROLE postgres")
    assert _count(proxy, f"SELECT count(*) FROM r12 WHERE id = {base}") == 1
    assert _count(proxy, f"SELECT count(*) FROM r12 WHERE id = {base + 1}") == 0
    records = proxy.session_records(app, until=has_disconnect)
    i1, i2 = [s for s in statements(records) if s.command == "INSERT"]
    assert _outcomes(records, i1) == [("ok", "")]
    assert _last(records, i2) == ("rolled_back", "42501")


def test_psql_backslash_semicolon(proxy: Proxy) -> None:
    app = app_name("r12-bs")
    run_psql(
        proxy.dsn(application_name=app),
        stdin="INSERT INTO r12 VALUES (160, 'bs') \\; SELECT 1/0;\n"
        "INSERT INTO r12 VALUES (161, 'bs');\n",
    )
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 160") == 0
    assert _count(proxy, "SELECT count(*) FROM r12 WHERE id = 161") == 1
    records = proxy.session_records(app, until=has_disconnect)
    i1, i2 = [s for s in statements(records) if s.command == "INSERT"]
    assert _outcomes(records, i1) == [("ok", ""), ("rolled_back", "22012")]
    assert _outcomes(records, i2) == [("ok", "")]


def test_sql_prepare_survives_failed_implicit_transaction(proxy: Proxy) -> None:
    """SQL PREPARE / DEALLOCATE are not transactional: the error does not undo them."""
    app = app_name("r12-sqlprep")
    with _connect(proxy, app, autocommit=True) as conn:
        conn.execute("PREPARE r12gone AS SELECT 2")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("PREPARE r12p AS SELECT 1; DEALLOCATE r12gone; SELECT 1/0")
        names = {r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements")}
        assert "r12p" in names and "r12gone" not in names  # PG kept both effects
    records = proxy.session_records(app, until=has_disconnect)
    prep = [s for s in statements(records) if s.command == "PREPARE"][1]
    (dealloc,) = [s for s in statements(records) if s.command == "DEALLOCATE"]
    assert _outcomes(records, prep) == [("ok", "")]
    assert _outcomes(records, dealloc) == [("ok", "")]
