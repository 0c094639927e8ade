"""The offload pool classifies exactly like the inline classifier and fails closed."""

from __future__ import annotations

import asyncio

from dbward.core.types import Statement, StatementKind
from dbward.sql.offload import ClassifierPool, should_offload
from dbward.sql.postgres import PostgresClassifier

BIG = "INSERT INTO t (a, b) VALUES " + ",".join(f"({i}, now())" for i in range(20_000))


def test_pool_answers_like_the_inline_classifier() -> None:
    pool = ClassifierPool()
    try:
        for text in (BIG, BIG + "; SET ROLE admin", "SELEC broken " + "x" * 70_000):
            got = asyncio.run(pool.classify(text))
            assert got == PostgresClassifier(cache_size=0).classify(text)
    finally:
        pool.close()


def test_timeout_classifies_as_unparseable() -> None:
    pool = ClassifierPool(timeout_s=0.000_001)
    try:
        (statement,) = asyncio.run(pool.classify(BIG))
    finally:
        pool.close()
    assert statement.kind is StatementKind.UNKNOWN
    assert "parse_error" in statement.flags
    assert statement.error == "classifier failure: timed out"


def test_a_failed_classification_still_withholds_a_password() -> None:
    pool = ClassifierPool(timeout_s=0.000_001)
    try:
        (statement,) = asyncio.run(pool.classify(BIG + "; ALTER ROLE app PASSWORD 'pw'"))
    finally:
        pool.close()
    assert {"parse_error", "carries_credential"} <= statement.flags


def test_code_goes_to_the_pool_from_a_few_kilobytes() -> None:
    """A PL/pgSQL body costs ~50x plain SQL per byte to classify (each expression is parsed on
    its own): a 50 KB function took 0.12 s on the event loop that serves every session."""
    body = " ".join(f"x := x + length('a{i}');" for i in range(200))
    code = f"DO $$ DECLARE x int := 0; BEGIN {body} END $$".encode()
    function = (
        f"CREATE FUNCTION f() RETURNS int LANGUAGE PLPGSQL AS 'DECLARE x int := 0; BEGIN {body} "
        "RETURN x; END'"
    ).encode()
    plain = ("INSERT INTO t VALUES " + ",".join(f"({i})" for i in range(1_000))).encode()
    assert 4_096 <= len(code) < 64 * 1024 and 4_096 <= len(plain) < 64 * 1024
    assert should_offload(code) and should_offload(function)
    assert not should_offload(plain)
    assert not should_offload(b"DO $$ BEGIN PERFORM 1; END $$")  # small: inline
    assert should_offload(BIG.encode())  # large: always


def test_a_unicode_escaped_name_may_hold_code() -> None:
    """`LANGUAGE U&"pl\0070gsql"` is plpgsql to PostgreSQL: such text goes to the pool too."""
    body = " ".join(f"x := x + {i};" for i in range(600))
    sql = (
        'CREATE FUNCTION f() RETURNS void LANGUAGE U&"pl\\0070gsql" AS '
        f"$$ DECLARE x int := 0; BEGIN {body} END $$"
    ).encode()
    assert b"plpgsql" not in sql.lower() and len(sql) > 4096
    assert should_offload(sql)


def test_a_timed_out_classification_does_not_hold_up_the_next_one() -> None:
    """The worker goes on computing after a timeout: every large statement after it timed out
    too, until it finished (eleventh review). The next one now gets a fresh worker."""
    # ~7 s to parse (~2 s at 200,000 rows left too thin a margin on a loaded machine, both
    # for the fresh worker's start and for the stale one's remaining time).
    slow = "INSERT INTO t (a, b) VALUES " + ",".join(f"({i}, now())" for i in range(600_000))
    pool = ClassifierPool(timeout_s=60.0)
    try:

        async def run() -> tuple[Statement, ...]:
            await pool.classify("SELECT 1")  # the worker is up
            pool._timeout_s = 0.3  # past the transfer of the text, well before its parse ends
            (timed_out,) = await pool.classify(slow)
            assert timed_out.error == "classifier failure: timed out"
            pool._timeout_s = 4.0  # the slow one needs ~6 s more: behind it, this timed out
            return await pool.classify(BIG)

        after = asyncio.run(run())
    finally:
        pool.close()
    assert after == PostgresClassifier(cache_size=0).classify(BIG)


def test_many_statements_go_to_the_pool_from_a_few_kilobytes() -> None:
    """64 KB of "SELECT 1;" (7,270 statements) took 76 ms to classify on the loop (round 63)."""
    many = b"SELECT 1;" * 1_000
    assert 4_096 <= len(many) < 64 * 1024
    assert should_offload(many)
    assert not should_offload(b"SELECT 1;" * 999)
    assert not should_offload(b"SELECT 1;" * 400)  # under 4 KB: inline


def _rows(count: int) -> str:
    return "INSERT INTO t (a, b) VALUES " + ",".join(f"({i}, now())" for i in range(count))


def test_a_short_text_is_not_queued_behind_longer_ones() -> None:
    """Round 63: sessions keeping the one worker busy with 16 MB statements made another
    session's 100 KB statement wait for all of them (23-37 s behind three). Waiting texts now
    go shortest due first (due: arrival plus ~1 s per MB)."""
    first, longer = _rows(150_000), _rows(300_000)
    pool = ClassifierPool()
    answered: list[str] = []

    async def one(name: str, text: str) -> None:
        await pool.classify(text)
        answered.append(name)

    async def run() -> None:
        await pool.classify("SELECT 1")  # the worker is up
        await asyncio.gather(one("first", first), one("longer", longer), one("short", BIG))

    try:
        asyncio.run(run())
    finally:
        pool.close()
    assert answered == ["first", "short", "longer"]


def test_time_spent_waiting_for_the_worker_is_not_counted_toward_the_timeout() -> None:
    """A statement queued behind one that times out is classified by the next worker, not
    timed out with it."""
    slow = _rows(600_000)  # ~7 s to parse
    pool = ClassifierPool()

    async def run() -> tuple[tuple[Statement, ...], tuple[Statement, ...]]:
        await pool.classify("SELECT 1")  # the worker is up
        pool._timeout_s = 3.0
        timed_out, after = await asyncio.gather(pool.classify(slow), pool.classify(BIG))
        return timed_out, after

    try:
        (timed_out,), after = asyncio.run(run())
    finally:
        pool.close()
    assert timed_out.error == "classifier failure: timed out"
    assert after == PostgresClassifier(cache_size=0).classify(BIG)


def test_a_waiter_that_leaves_passes_its_turn_on() -> None:
    pool = ClassifierPool()

    async def run() -> tuple[Statement, ...]:
        await pool.classify("SELECT 1")
        running = asyncio.create_task(pool.classify(_rows(50_000)))
        await asyncio.sleep(0)
        leaving = asyncio.create_task(pool.classify(BIG))
        await asyncio.sleep(0)
        leaving.cancel()
        await running
        return await asyncio.wait_for(pool.classify(BIG), 30)

    try:
        after = asyncio.run(run())
    finally:
        pool.close()
    assert after == PostgresClassifier(cache_size=0).classify(BIG)
    assert pool._busy == 0 and not pool._waiting
