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
