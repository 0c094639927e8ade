"""asyncpg through dbward: prepared statements, binary codecs, a 100k-row fetch."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import uuid

import asyncpg

from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.proxy import Proxy


async def _connect(proxy: Proxy, app: str) -> asyncpg.Connection:
    info = proxy.conninfo()
    return await asyncpg.connect(
        host=info["host"],
        port=info["port"],
        user=info["user"],
        password=info["password"],
        database=info["dbname"],
        server_settings={"application_name": app},
    )


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
