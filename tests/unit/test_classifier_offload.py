"""The offload pool classifies exactly like the inline classifier and fails closed."""

from __future__ import annotations

import asyncio

from dbward.core.types import StatementKind
from dbward.sql.offload import ClassifierPool
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
