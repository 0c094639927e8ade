"""The audit log says when a statement's transaction was undone after it finished, with real
drivers, and keeps statement order (eleventh review: each failed before its fix)."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from fixtures.clients import app_name, has_disconnect, run_psql, statements
from fixtures.drivers import aconnect as _aconnect
from fixtures.drivers import connect as _connect
from fixtures.drivers import count_rows as _count
from fixtures.drivers import outcomes_of as _outcomes
from fixtures.proxy import Proxy


@pytest.fixture(scope="module", autouse=True)
def _tables(proxy: Proxy) -> None:
    with _connect(proxy, "setup-txn", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS tx_child, tx_parent, tx_t")
        conn.execute("CREATE TABLE tx_parent (id int primary key)")
        conn.execute(
            "CREATE TABLE tx_child (id int, pid int REFERENCES tx_parent"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
        conn.execute("CREATE TABLE tx_t (id int primary key, v text)")


def test_a_commit_failing_at_sync_rolls_back_the_statement(proxy: Proxy) -> None:
    """The deferred constraint fails at the implicit commit on Sync, after CommandComplete: the
    INSERT was `ok` and nothing recorded the error."""
    app, app_asyncpg = app_name("txn-defer"), app_name("txn-defer-asyncpg")
    with (
        _connect(proxy, app, autocommit=True) as conn,
        pytest.raises(psycopg.errors.ForeignKeyViolation),
    ):
        conn.execute("INSERT INTO tx_child VALUES (%s, %s)", (2, 999))

    async def with_asyncpg() -> None:
        conn = await _aconnect(proxy, app_asyncpg)
        try:
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                await conn.execute("INSERT INTO tx_child VALUES ($1, $2)", 3, 999)
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())
    assert _count(proxy, "SELECT count(*) FROM tx_child") == 0
    for name in (app, app_asyncpg):
        records = proxy.session_records(name, until=has_disconnect)
        (insert,) = [s for s in statements(records) if s.command == "INSERT"]
        assert _outcomes(records, insert) == [("ok", ""), ("rolled_back", "23503")]


def test_earlier_statements_of_a_failed_implicit_transaction_are_rolled_back(
    proxy: Proxy,
) -> None:
    app, app_pipeline = app_name("txn-implicit"), app_name("txn-implicit-pipeline")
    result = run_psql(
        proxy.dsn(application_name=app), "INSERT INTO tx_t VALUES (7, 'ms'); SELECT 1/0"
    )
    assert "division by zero" in result.stderr
    with (
        _connect(proxy, app_pipeline, autocommit=True) as conn,
        pytest.raises(psycopg.errors.UniqueViolation),
        conn.pipeline(),
    ):
        conn.execute("INSERT INTO tx_t VALUES (%s, 'p')", (1,))
        conn.execute("INSERT INTO tx_t VALUES (%s, 'p')", (1,))
        conn.execute("INSERT INTO tx_t VALUES (%s, 'p')", (2,))
    assert _count(proxy, "SELECT count(*) FROM tx_t") == 0
    records = proxy.session_records(app, until=has_disconnect)
    (insert,) = [s for s in statements(records) if s.command == "INSERT"]
    assert _outcomes(records, insert) == [("ok", ""), ("rolled_back", "22012")]
    records = proxy.session_records(app_pipeline, until=has_disconnect)
    inserts = [s for s in statements(records) if s.command == "INSERT"]
    assert [_outcomes(records, s)[-1] for s in inserts] == [
        ("rolled_back", "23505"),
        ("error", "23505"),
        ("not_executed", ""),
    ]


def test_asyncpg_executemany_failing_midway(proxy: Proxy) -> None:
    app = app_name("txn-executemany")

    async def run() -> None:
        conn = await _aconnect(proxy, app)
        try:
            await conn.execute("CREATE TEMP TABLE em (id int CHECK (id < 3))")
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.executemany("INSERT INTO em VALUES ($1)", [(1,), (2,), (3,), (4,)])
            assert await conn.fetchval("SELECT count(*) FROM em") == 0
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    inserts = [s for s in statements(records) if s.command == "INSERT"]
    assert [_outcomes(records, s)[-1][0] for s in inserts] == [
        "rolled_back",
        "rolled_back",
        "error",
        "not_executed",
    ]


def test_a_denial_in_a_pipeline_rolls_back_the_insert_before_it(proxy: Proxy) -> None:
    app = app_name("txn-denied")
    with _connect(proxy, app, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("INSERT INTO tx_t VALUES (%s, 'd')", (11,))
            conn.execute("SET ROLE postgres")
        assert conn.execute("SELECT count(*) FROM tx_t WHERE v = 'd'").fetchone() == (0,)
    records = proxy.session_records(app, until=has_disconnect)
    (insert,) = [s for s in statements(records) if s.command == "INSERT"]
    assert _outcomes(records, insert) == [("ok", ""), ("rolled_back", "42501")]


def test_commit_of_a_failed_transaction_is_rolled_back(proxy: Proxy) -> None:
    app = app_name("txn-commit")
    with _connect(proxy, app) as conn:
        conn.execute("INSERT INTO tx_t VALUES (21, 'x')")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("COMMIT")  # PostgreSQL answers ROLLBACK
    assert _count(proxy, "SELECT count(*) FROM tx_t WHERE id = 21") == 0
    records = proxy.session_records(app, until=has_disconnect)
    (commit,) = [s for s in statements(records) if s.command == "COMMIT"]
    assert _outcomes(records, commit) == [("rolled_back", "")]


def test_a_denial_in_a_pipeline_is_logged_after_the_statements_before_it(proxy: Proxy) -> None:
    """The denial is answered at once, before the statement sent ahead of it: its merged
    record went out first (the log promises statement order)."""
    app = app_name("txn-order")
    with (
        _connect(proxy, app, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        conn.pipeline(),
    ):
        conn.execute("SELECT pg_sleep(0.2), %s::int", (1,))
        conn.execute("SET ROLE postgres")
    records = proxy.session_records(app, until=has_disconnect)
    ids = [r.statement_id for r in statements(records)]
    assert ids == sorted(ids)


def test_a_write_returning_rows_in_chunks_does_not_claim_the_chunk_as_its_row_count(
    proxy: Proxy,
) -> None:
    """asyncpg's fetchval sends Execute with a limit of 1 row: the UPDATE ran whole (50 rows)
    but the portal was suspended after 1; the log said 1 row changed."""
    app = app_name("txn-returning")

    async def run() -> None:
        conn = await _aconnect(proxy, app)
        try:
            await conn.execute(
                "CREATE TEMP TABLE fr AS SELECT g AS id, 0 AS n FROM generate_series(1, 50) g"
            )
            assert await conn.fetchval("UPDATE fr SET n = n + 1 RETURNING id") is not None
            assert await conn.fetchval("SELECT count(*) FROM fr WHERE n = 1") == 50
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    (update,) = [s for s in statements(records) if s.command == "UPDATE"]
    final = [r for r in records if r.statement_id == update.statement_id and r.status][-1]
    assert (final.status, final.rows) == ("suspended", None)
