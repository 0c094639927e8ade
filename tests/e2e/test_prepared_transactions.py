"""PREPARE TRANSACTION and portals (review round 53), on a cluster of its own: the shared one
runs with max_prepared_transactions = 0, where every PREPARE TRANSACTION fails.

What PostgreSQL 15 does, verified here through dbward: PREPARE TRANSACTION drops every portal
and cursor created in the transaction (in its savepoints too) and leaves the session outside
any transaction; a WITH HOLD cursor held from an earlier transaction survives it, fetched in
it or not; a transaction that created a WITH HOLD cursor cannot be prepared (0A000, the
transaction is rolled back, the cursor dropped). dbward forgets the transaction's portals as
doubtful at the PREPARE TRANSACTION (as after a statement that may end the transaction its
own way) and keeps the held cursor: a name PostgreSQL dropped and code reopened is never run
as the old statement, and the held cursor runs as what it is.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dbward.audit.records import AuditRecord
from dbward.wire.postgres import messages as m
from fixtures.clients import app_name, has_disconnect, statements
from fixtures.postgres import PgServer, start_pg_server, stop_pg_server
from fixtures.proxy import Proxy, start_proxy, stop_proxy
from fixtures.raw import RawSession

SECRET = "prep_secret"
OLD = "SELECT 'old'::text AS v, g FROM generate_series(1, 3) g"  # no table: preparable


@pytest.fixture(scope="module")
def prep_server() -> Iterator[PgServer]:
    server, base = start_pg_server(None, settings=["max_prepared_transactions = 4"])
    try:
        server.psql(
            f"CREATE TABLE {SECRET} (v text); INSERT INTO {SECRET} VALUES ('s3cret');"
            f" ALTER TABLE {SECRET} OWNER TO {server.service_user}"
        )
        yield server
    finally:
        stop_pg_server(server, base)


@pytest.fixture(scope="module")
def prep_proxy(prep_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    running = start_proxy(tmp_path_factory.mktemp("dbward-prep"), prep_server)
    yield running
    stop_proxy(running)


@pytest.fixture
def session(prep_proxy: Proxy, prep_server: PgServer) -> Iterator[RawSession]:
    raw = RawSession(prep_proxy, app_name("prepared-xact"))
    try:
        yield raw
    finally:
        raw.close()
        # A prepared transaction outlives its session: end what the test left.
        for gid in prep_server.psql("SELECT gid FROM pg_prepared_xacts").split():
            prep_server.psql(f"ROLLBACK PREPARED '{gid}'")


def _reopen(name: str) -> str:
    return f"DO $$ DECLARE r refcursor := '{name}'; BEGIN OPEN r FOR SELECT v FROM {SECRET}; END $$"


def _kinds(replies: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [kind for kind, _ in replies]


def _errors(replies: list[tuple[bytes, bytes]]) -> list[str]:
    return [m.parse_error_fields(p)["C"] for kind, p in replies if kind == b"E"]


def _leaked(replies: list[tuple[bytes, bytes]]) -> bool:
    return any(kind == b"D" and b"s3cret" in payload for kind, payload in replies)


def _records(proxy: Proxy, session: RawSession) -> list[AuditRecord]:
    session.close()
    return proxy.session_records(session.app, until=has_disconnect)


def _no_stale_records(records: list[AuditRecord]) -> None:
    """Nothing after the first DO block is decided or recorded as the old statement."""
    intents = statements(records)
    first_do = next(i for i, s in enumerate(intents) if s.command == "DO")
    for intent in intents[first_do:]:
        assert OLD not in intent.sql_text, intent
        if intent.command == "EXECUTE":
            assert (intent.decision, intent.rule) == ("deny", "guard.unparseable"), intent


def test_prepare_transaction_drops_the_transactions_portals(
    prep_proxy: Proxy, session: RawSession
) -> None:
    session.query("BEGIN")
    session.query(f"DECLARE c CURSOR FOR {OLD}")
    session.query("SAVEPOINT a")
    session.query(f"DECLARE d CURSOR FOR {OLD}")
    session.send(m.parse_message("", OLD) + m.bind_message("p", "", []) + m.sync())
    replies = session.query("PREPARE TRANSACTION 'r53_a'")
    assert _kinds(replies) == [b"C", b"Z"] and replies[-1] == (b"Z", b"I")
    # Gone in PostgreSQL: fetching them fails there.
    for use in (m.query("FETCH c"), m.query("FETCH d"), m.execute_message("p") + m.sync()):
        assert _errors(session.send(use)) == ["34000"]
    # Reopened by code: never run as the old statement.
    session.query("BEGIN")
    assert _errors(session.query(_reopen("c") + "; " + _reopen("p"))) == []
    replies = session.send(m.execute_message("p") + m.sync())
    assert _errors(replies) == ["42501"] and not _leaked(replies)
    session.query("ROLLBACK; BEGIN")
    session.query(_reopen("c"))
    session.query("FETCH c")  # a cursor dbward never saw: what the FETCH text shows
    session.query("ROLLBACK")
    records = _records(prep_proxy, session)
    fetch = [s for s in statements(records) if s.sql_text == "FETCH c"][-1]
    assert (fetch.tables, fetch.decision) == ((), "allow")
    _no_stale_records(records)


def test_a_with_hold_cursor_survives_a_prepare_transaction_that_fetched_it(
    prep_proxy: Proxy, session: RawSession
) -> None:
    session.query(f"DECLARE h CURSOR WITH HOLD FOR {OLD}")
    session.query("BEGIN")
    assert _errors(session.query("FETCH 1 FROM h")) == []
    assert _errors(session.query("PREPARE TRANSACTION 'r53_b'")) == []
    replies = session.query("FETCH 1 FROM h")
    assert _errors(replies) == [] and b"D" in _kinds(replies)
    replies = session.send(m.execute_message("h", 1) + m.sync())
    assert _errors(replies) == [] and b"D" in _kinds(replies)
    records = _records(prep_proxy, session)
    fetches = [s for s in statements(records) if s.command == "FETCH"]
    assert [s.decision for s in fetches] == ["allow", "allow"]
    execute = [s for s in statements(records) if s.path == "extended"][-1]
    assert (execute.sql_text, execute.decision) == (
        f"DECLARE h CURSOR WITH HOLD FOR {OLD}",
        "allow",
    )


def test_a_transaction_that_declared_a_with_hold_cursor_cannot_be_prepared(
    prep_proxy: Proxy, session: RawSession
) -> None:
    """PostgreSQL refuses (0A000) and rolls the transaction back: the cursor is gone. dbward
    forgot it as doubtful at the PREPARE TRANSACTION, as WITH HOLD (a PREPARE TRANSACTION
    outside a block commits what ran before it): a FETCH of the name is refused (42501) where
    PostgreSQL answers 34000, and so is one after code reopened the name — until the client
    declares it again."""
    session.query("BEGIN")
    session.query(f"DECLARE w CURSOR WITH HOLD FOR {OLD}")
    replies = session.query("PREPARE TRANSACTION 'r53_c'")
    assert _errors(replies) == ["0A000"] and replies[-1] == (b"Z", b"I")
    assert _errors(session.query("FETCH w")) == ["42501"]
    session.query("BEGIN")
    session.query(_reopen("w"))
    for use in (m.query("FETCH w"), m.execute_message("w") + m.sync()):
        replies = session.send(use)
        assert _errors(replies) == ["42501"] and not _leaked(replies)
        session.query("ROLLBACK; BEGIN")
        session.query(_reopen("w"))
    session.query("ROLLBACK")
    session.query(f"DECLARE w CURSOR WITH HOLD FOR {OLD}")
    assert _errors(session.query("FETCH w")) == []
    records = _records(prep_proxy, session)
    refused = [s for s in statements(records) if s.decision == "deny"]
    assert [s.command for s in refused] == ["FETCH", "FETCH", "EXECUTE"]
    assert all("dropped by a PREPARE TRANSACTION" in s.detail for s in refused)
    _no_stale_records(records[: records.index(refused[-1]) + 1])


def test_prepare_transaction_in_a_pipeline_outside_a_block(
    prep_proxy: Proxy, session: RawSession
) -> None:
    """No block: PostgreSQL warns, answers ROLLBACK, and the sync group's transaction so far
    is over: the portal bound before it is gone; its Execute in the group is refused."""
    replies = session.send(
        m.parse_message("", OLD)
        + m.bind_message("q", "", [])
        + m.parse_message("", "PREPARE TRANSACTION 'r53_d'")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.execute_message("q")
        + m.sync()
    )
    assert _errors(replies) == ["42501"]
    assert _errors(session.send(m.execute_message("q") + m.sync())) == ["34000"]
