"""Text PostgreSQL's scanner reads in quadratic time never stalls the relay's event loop.

Round 63: the scanner matches a whole run of operator characters, keeps one short token ("+",
the "/*" of a nested comment) and reads the rest again. 64 KB of "/*" took 8.7 s to classify on
the loop that serves every session (16 KB of "+": ~2 s), and 16 MB of it would have kept a
classifier worker busy for days (a timeout only abandons the worker, which goes on).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dbward.audit.sink import MemorySink
from dbward.core.types import Statement, StatementKind
from dbward.relay.postgres import _credential_text
from dbward.sql import postgres as sql_postgres
from dbward.sql.offload import should_offload
from dbward.sql.postgres import LEXER_COST_INLINE_MAX, PostgresClassifier, lexer_cost
from dbward.wire.postgres import messages as m
from fixtures.detached import detached_session

NESTED_COMMENTS = "SELECT 1 " + "/*" * 32_000  # 64 KB: 8.7 s inline, unterminated
PLUSES = "SELECT 1 " + "+" * 20_000


class _NoScanner:
    """Stands in for pglast's parser module: any scan of the text is a failure."""

    ParseError = Exception

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the text was given to the scanner ({name})")


@pytest.mark.parametrize("text", [NESTED_COMMENTS, PLUSES, "SELECT 1; " + "+-" * 10_000])
def test_costly_text_is_refused_unscanned(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sql_postgres, "_pg_parser", _NoScanner())
    (statement,) = PostgresClassifier().classify(text)
    assert statement.kind is StatementKind.UNKNOWN
    assert "statement_limit" in statement.flags  # denied with 54000, like the other limits
    assert statement.error is not None
    assert "operator characters" in statement.error


def test_a_refused_text_naming_a_password_is_still_withheld(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_postgres, "_pg_parser", _NoScanner())
    (statement,) = PostgresClassifier().classify("ALTER ROLE app PASSWORD 'pw' " + "/*" * 20_000)
    assert "carries_credential" in statement.flags


@pytest.mark.parametrize(
    "text",
    [
        # Long runs the scanner reads once: a literal of "=" or "-", a comment banner, and
        # "--" comments (read to the end of the line).
        "SELECT '" + "=" * 50_000 + "'",
        "SELECT '" + "-" * 50_000 + "'",
        "SELECT 1 /" + "*" * 50_000 + "/",
        "SELECT 1 " + "--" * 25_000,
        # Short runs: at most 64 re-reads each, however many there are.
        "SELECT " + ",".join(["+" * 60 + "1"] * 1_000),
    ],
)
def test_runs_read_once_are_not_refused(text: str) -> None:
    assert lexer_cost(text) <= LEXER_COST_INLINE_MAX
    (statement,) = PostgresClassifier().classify(text)
    assert "statement_limit" not in statement.flags


def test_a_costly_text_of_any_size_goes_to_the_pool() -> None:
    """Below the 4 KB (code) and 64 KB thresholds, a quadratic run still costs the loop: 4 KB
    of "+" took ~0.1 s to classify inline."""
    costly = ("SELECT 1 " + "+" * 2_000).encode()
    assert len(costly) < 4_096
    assert lexer_cost(costly.decode()) > LEXER_COST_INLINE_MAX
    assert should_offload(costly)
    assert not should_offload(("SELECT '" + "=" * 3_000 + "'").encode())
    assert not should_offload(("SELECT 1 " + "+" * 1_000).encode())  # under 1 KB: cheap


def test_the_relay_hands_a_small_costly_query_to_the_pool() -> None:
    """The relay asked the pool only from 4 KB on: a 2 KB run of "+" was scanned on the loop."""

    class _Pool:
        texts: list[str] = []

        async def classify(self, text: str) -> tuple[Statement, ...]:
            self.texts.append(text)
            return PostgresClassifier(cache_size=0).classify(text)

    async def run() -> tuple[list[str], bool]:
        session, client, _ = detached_session(MemorySink())
        pool = _Pool()
        session.services.offload = pool  # type: ignore[assignment]
        sql = "SELECT 1 " + "+" * 2_000
        session.data_received(m.query(sql))
        parked = not client.reading  # waiting for the pool, reading paused
        await asyncio.sleep(0)
        return pool.texts, parked

    texts, parked = asyncio.run(run())
    assert texts == ["SELECT 1 " + "+" * 2_000]
    assert parked


def test_credential_text_too_costly_to_scan_on_the_loop_is_withheld() -> None:
    """Redacting a statement that holds a password scans it on the loop: one classified in the
    pool for its operator runs is withheld whole instead of scanned there."""
    text = "CREATE ROLE app PASSWORD 'secret' /* " + "/*" * 1_500 + "*/" * 1_501
    (statement,) = PostgresClassifier(cache_size=0).classify(text)
    assert statement.error is None and "carries_credential" in statement.flags
    assert lexer_cost(text) > LEXER_COST_INLINE_MAX
    logged = _credential_text(statement, "a password", 4096)
    assert logged == "CREATE ROLE (text withheld: a password)"
