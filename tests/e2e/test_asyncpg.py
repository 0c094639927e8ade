"""asyncpg through dbward: prepared statements, binary codecs, cursors, a 100k-row fetch."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import uuid
from collections.abc import Callable

import asyncpg
import pytest

from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.drivers import aconnect as _connect
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy


def test_prepared_statements_and_binary_codecs(proxy: Proxy) -> None:
    app = app_name("asyncpg")

    async def run() -> None:
        conn = await _connect(proxy, app)
        try:
            stmt = await conn.prepare(
                "SELECT $1::int + 1, $2::text, $3::numeric, $4::uuid,"
                " $5::timestamptz, $6::jsonb, $7::int[]"
            )
            when = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.UTC)
            ident = uuid.uuid4()
            for i in range(3):
                row = await stmt.fetchrow(
                    i, "ü", decimal.Decimal("1.50"), ident, when, '{"a": 1}', [1, 2]
                )
                assert row is not None
                assert tuple(row) == (
                    i + 1,
                    "ü",
                    decimal.Decimal("1.50"),
                    ident,
                    when,
                    '{"a": 1}',
                    [1, 2],
                )
            await conn.execute("CREATE TEMP TABLE t (id int, b bytea)")
            await conn.executemany(
                "INSERT INTO t VALUES ($1, $2)", [(i, bytes([i])) for i in range(10)]
            )
            assert await conn.fetchval("SELECT sum(length(b)) FROM t") == 10
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    selects = [s for s in intents if s.sql_text.startswith("SELECT $1::int + 1")]
    assert len(selects) == 3 and all(s.path == "extended" for s in selects)
    # asyncpg's fetchrow executes with a row limit of 1: the portal is suspended after one row
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in selects] == [
        ("suspended", 1)
    ] * 3
    inserts = [s for s in intents if s.command == "INSERT"]
    assert len(inserts) == 10 and {s.identity for s in inserts} == {"alice"}


def test_100k_row_fetch(proxy: Proxy) -> None:
    app = app_name("asyncpg-100k")

    async def run() -> list[asyncpg.Record]:
        conn = await _connect(proxy, app)
        try:
            return await conn.fetch(
                "SELECT g, md5(g::text) AS h, g * 1.5 AS f FROM generate_series(1, 100000) g"
            )
        finally:
            await conn.close()

    rows = asyncio.run(run())
    assert len(rows) == 100_000
    assert rows[-1]["g"] == 100_000 and rows[0]["h"] == "c4ca4238a0b923820dcc509a6f75849b"
    records = proxy.session_records(app, until=has_disconnect)
    big = next(s for s in statements(records) if "generate_series" in s.sql_text)
    assert outcome_of(records, big).rows == 100_000
    assert outcome_of(records, big).status == "ok"


def test_cursors_abandoned_and_finished_in_transactions(proxy: Proxy) -> None:
    # asyncpg cursors are named portals; one left before its end is never closed by the
    # client, only dropped by PostgreSQL when the transaction ends. dbward forgets it then
    # too, and must not forget one that is still open.
    app = app_name("asyncpg-cursor")
    query = "SELECT g FROM generate_series(1, 1000) g"

    async def run() -> None:
        conn = await _connect(proxy, app)
        try:
            for _ in range(20):
                async with conn.transaction():
                    cursor = await conn.cursor(query)
                    assert [r[0] for r in await cursor.fetch(5)] == [1, 2, 3, 4, 5]
            async with conn.transaction():
                first = await conn.cursor(query)
                second = await conn.cursor(query)
                await first.fetch(3)
                await conn.execute("SELECT 1")  # a whole round trip while both stay open
                assert [r[0] for r in await second.fetch(2)] == [1, 2]
                assert [r[0] for r in await first.fetch(2)] == [4, 5]
                values = [r[0] async for r in conn.cursor(query, prefetch=64)]
                assert values == list(range(1, 1001))
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    assert [r for r in records if r.decision == "deny"] == []
    fetches = [s for s in statements(records) if s.sql_text == query]
    # one Execute per fetch: 20 abandoned cursors, 2 + 1 for the pair, 16 for the iteration
    # (1000 rows in batches of 64)
    assert len(fetches) == 20 + 3 + 16
    assert all(outcome_of(records, s).status in ("suspended", "ok") for s in fetches)


def test_terminated_backend_reports_postgres_reason(proxy: Proxy, pg_server: PgServer) -> None:
    """r60, asyncpg's own test_execute_script_interrupted_by_server: a backend terminated
    mid-query. asyncpg reports the last ErrorResponse before the connection closed; dbward
    added its FATAL 08006 after PostgreSQL's 57P01, so the reason was dbward's."""
    app = app_name("asyncpg-terminated")

    async def run() -> BaseException | None:
        conn = await _connect(proxy, app)
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(10)"))
            await asyncio.sleep(0.3)
            assert pg_server.psql(f"SELECT pg_terminate_backend({pid})") == "t"
            with pytest.raises(asyncpg.ConnectionDoesNotExistError) as caught:
                await asyncio.wait_for(running, 5)
            assert "closed in the middle of operation: terminating connection" in str(caught.value)
            return caught.value.__cause__
        finally:
            conn.terminate()

    cause = asyncio.run(run())
    assert isinstance(cause, asyncpg.AdminShutdownError), repr(cause)


def test_every_timed_out_call_is_cancelled(proxy_factory: Callable[..., Proxy]) -> None:
    """r60, asyncpg's test_timeout_05/06: asyncpg sends a CancelRequest for every call that
    times out. Each one spent the client address's cancel budget (burst 10), so past it the
    cancels were dropped: the statement ran on, its transaction did not fail, and the next
    call waited for it. Only attempts naming no live session (guesses) spend it now."""
    slow = proxy_factory(listener={"cancel_rate_per_s": 0.1})  # the burst of 10, no refill
    app = app_name("asyncpg-timeouts")

    async def run() -> None:
        conn = await _connect(slow, app)
        try:
            for _ in range(15):
                tr = conn.transaction()
                await tr.start()
                with pytest.raises(asyncio.TimeoutError):
                    await conn.execute("SELECT pg_sleep(5)", timeout=0.1)
                # Cancelled: the transaction failed (a dropped cancel let pg_sleep finish).
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.fetchval("SELECT 1")
                await tr.rollback()
        finally:
            await conn.close()

    asyncio.run(run())
    records = slow.session_records(app, until=has_disconnect)
    sleeps = [s for s in statements(records) if "pg_sleep" in s.sql_text]
    assert [(outcome_of(records, s).status, outcome_of(records, s).sqlstate) for s in sleeps] == [
        ("error", "57014")
    ] * 15
