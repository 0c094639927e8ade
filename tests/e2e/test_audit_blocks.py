"""`rolled_back` inside explicit transaction blocks: ROLLBACK, ROLLBACK TO SAVEPOINT, a failed
COMMIT and a session that ends inside a block undo what finished `ok` in it; checked against
the table contents with real drivers."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from dbward.audit.records import AuditRecord
from fixtures.clients import app_name, has_disconnect, run_psql, statements
from fixtures.drivers import aconnect as _aconnect
from fixtures.drivers import connect as _connect
from fixtures.drivers import count_rows as _count
from fixtures.drivers import outcomes_of as _outcomes
from fixtures.proxy import Proxy

_TABLE = "blk"


@pytest.fixture(scope="module", autouse=True)
def _table(proxy: Proxy) -> None:
    with _connect(proxy, "setup-blk", autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {_TABLE}")
        conn.execute(f"CREATE TABLE {_TABLE} (id int primary key)")
        conn.execute("DROP TABLE IF EXISTS blk_deferred")
        conn.execute(
            "CREATE TABLE blk_deferred (id int, v int,"
            " CONSTRAINT blk_once UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)"
        )


def _insert(n: int) -> str:
    return f"INSERT INTO {_TABLE} VALUES ({n})"


def _present(proxy: Proxy, n: int) -> bool:
    return _count(proxy, f"SELECT count(*) FROM {_TABLE} WHERE id = {n}") == 1


def _fate(records: list[AuditRecord], n: int) -> list[str]:
    """Every outcome status the log gives the INSERT of row n, in log order."""
    (intent,) = [s for s in statements(records) if s.sql_text == _insert(n)]
    return [status for status, _ in _outcomes(records, intent)]


def _check(proxy: Proxy, app: str, kept: list[int], undone: list[int]) -> list[AuditRecord]:
    """The table holds exactly `kept`; the log says so of every row, and `undone` rolled back."""
    records = proxy.session_records(app, until=has_disconnect)
    for n in kept:
        assert _present(proxy, n), n
        assert _fate(records, n) == ["ok"], n
    for n in undone:
        assert not _present(proxy, n), n
        assert _fate(records, n) == ["ok", "rolled_back"], n
    return records


def test_rollback_undoes_the_block(proxy: Proxy) -> None:
    app = app_name("blk-rb")
    with _connect(proxy, app) as conn:  # psycopg opens the block itself (BEGIN)
        conn.execute(_insert(1))
        conn.execute(_insert(2))
        conn.rollback()
        conn.execute(_insert(3))
        conn.commit()
    records = _check(proxy, app, kept=[3], undone=[1, 2])
    # The claim follows the ROLLBACK's own record.
    seqs = [r.seq for r in records]
    rollback = next(s for s in statements(records) if s.command == "ROLLBACK")
    undone_at = next(r.seq for r in records if r.status == "rolled_back" and r.command == "INSERT")
    assert seqs.index(undone_at) > seqs.index(rollback.seq)


def test_rollback_to_savepoint_undoes_only_what_followed_it(proxy: Proxy) -> None:
    app = app_name("blk-sp")
    with _connect(proxy, app, autocommit=True) as conn:
        for sql in (
            "BEGIN",
            _insert(10),
            "SAVEPOINT a",
            _insert(11),
            "SAVEPOINT b",
            _insert(12),
            "ROLLBACK TO SAVEPOINT a",  # b goes too
            _insert(13),
            "SAVEPOINT a",  # a second savepoint of the same name: the innermost is meant
            _insert(14),
            "RELEASE a",  # 14 now belongs to the outer a
            "ROLLBACK TO a",
            _insert(15),
            "COMMIT",
        ):
            conn.execute(sql)
    _check(proxy, app, kept=[10, 15], undone=[11, 12, 13, 14])


def test_released_savepoint_is_undone_with_the_block(proxy: Proxy) -> None:
    app = app_name("blk-rel")
    with _connect(proxy, app, autocommit=True) as conn:
        for sql in ("BEGIN", "SAVEPOINT s", _insert(20), "RELEASE SAVEPOINT s", "ROLLBACK"):
            conn.execute(sql)
    _check(proxy, app, kept=[], undone=[20])


def test_commit_of_a_failed_block(proxy: Proxy) -> None:
    """An error aborts the block; the COMMIT that follows is answered ROLLBACK."""
    app = app_name("blk-failed")
    with _connect(proxy, app, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(_insert(30))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("COMMIT")
    records = _check(proxy, app, kept=[], undone=[30])
    (commit,) = [s for s in statements(records) if s.command == "COMMIT"]
    assert [status for status, _ in _outcomes(records, commit)] == ["rolled_back"]


def test_commit_that_fails(proxy: Proxy) -> None:
    """A deferred constraint fails at COMMIT: the whole block is rolled back."""
    app = app_name("blk-deferred")
    with _connect(proxy, app, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(_insert(35))
        conn.execute("INSERT INTO blk_deferred VALUES (1, 7)")
        conn.execute("INSERT INTO blk_deferred VALUES (2, 7)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("COMMIT")
    assert _count(proxy, "SELECT count(*) FROM blk_deferred") == 0
    records = _check(proxy, app, kept=[], undone=[35])
    (intent,) = [s for s in statements(records) if s.sql_text == _insert(35)]
    assert _outcomes(records, intent)[-1] == ("rolled_back", "23505")


def test_fatal_inside_a_block(proxy: Proxy) -> None:
    app = app_name("blk-fatal")
    result = run_psql(
        proxy.dsn(application_name=app),
        f"BEGIN; {_insert(36)}; SELECT pg_terminate_backend(pg_backend_pid())",
    )
    assert "terminating connection" in result.stderr, result.stderr
    records = proxy.session_records(app, until=has_disconnect)
    (intent,) = [s for s in statements(records) if s.sql_text.strip() == _insert(36)]
    assert not _present(proxy, 36)
    assert _outcomes(records, intent) == [("ok", ""), ("rolled_back", "57P01")]


def test_commit_keeps_the_block(proxy: Proxy) -> None:
    app = app_name("blk-commit")
    with _connect(proxy, app) as conn:
        conn.execute(_insert(40))
        conn.execute("SAVEPOINT x")
        conn.execute(_insert(41))
        conn.commit()
    _check(proxy, app, kept=[40, 41], undone=[])


def test_begin_inside_a_query_string_takes_what_ran_before_it(proxy: Proxy) -> None:
    """Simple protocol: BEGIN turns the string's implicit transaction into the block, so the
    ROLLBACK undoes the INSERT sent before the BEGIN as well."""
    app = app_name("blk-multi")
    result = run_psql(
        proxy.dsn(application_name=app), f"{_insert(50)}; BEGIN; {_insert(51)}; ROLLBACK"
    )
    assert result.returncode == 0, result.stderr
    records = proxy.session_records(app, until=has_disconnect)
    for n in (50, 51):
        assert not _present(proxy, n), n
        (intent,) = [s for s in statements(records) if s.sql_text.strip() == _insert(n)]
        assert [status for status, _ in _outcomes(records, intent)] == ["ok", "rolled_back"]


def test_rollback_and_chain(proxy: Proxy) -> None:
    app = app_name("blk-chain")
    with _connect(proxy, app, autocommit=True) as conn:
        for sql in ("BEGIN", _insert(60), "ROLLBACK AND CHAIN", _insert(61), "COMMIT"):
            conn.execute(sql)
    _check(proxy, app, kept=[61], undone=[60])


def test_session_ending_inside_a_block(proxy: Proxy) -> None:
    """The client closes the connection inside a block: PostgreSQL aborts it."""
    app = app_name("blk-close")
    conn = _connect(proxy, app)
    conn.execute(_insert(70))
    conn.close()  # no COMMIT: psycopg sends Terminate
    _check(proxy, app, kept=[], undone=[70])


def test_asyncpg_nested_transaction(proxy: Proxy) -> None:
    """asyncpg's transaction() nests with savepoints of its own naming."""
    app = app_name("blk-asyncpg")

    class Boom(Exception):
        pass

    async def run() -> None:
        conn = await _aconnect(proxy, app)
        try:
            async with conn.transaction():
                await conn.execute(_insert(80))
                try:
                    async with conn.transaction():
                        await conn.execute(_insert(81))
                        raise Boom
                except Boom:
                    pass
                await conn.execute(_insert(82))
        finally:
            await conn.close()

    asyncio.run(run())
    _check(proxy, app, kept=[80, 82], undone=[81])


def test_pipeline_error_then_rollback(proxy: Proxy) -> None:
    """Extended protocol pipeline inside a block: the error aborts the block, the client's
    ROLLBACK undoes what had finished ok."""
    app = app_name("blk-pipe")
    with _connect(proxy, app) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute(_insert(90))
            conn.execute(_insert(90))
        conn.rollback()
    records = proxy.session_records(app, until=has_disconnect)
    first, second = [s for s in statements(records) if s.sql_text == _insert(90)]
    assert not _present(proxy, 90)
    assert [status for status, _ in _outcomes(records, first)] == ["ok", "rolled_back"]
    assert [status for status, _ in _outcomes(records, second)] == ["error"]


def test_asyncpg_executemany_in_a_rolled_back_transaction(proxy: Proxy) -> None:
    app = app_name("blk-many")

    async def run() -> None:
        conn = await _aconnect(proxy, app)
        try:
            tr = conn.transaction()
            await tr.start()
            await conn.executemany(f"INSERT INTO {_TABLE} VALUES ($1)", [(100,), (101,)])
            await tr.rollback()
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    inserts = [s for s in statements(records) if s.command == "INSERT"]
    assert inserts
    assert not _present(proxy, 100) and not _present(proxy, 101)
    for intent in inserts:
        assert [status for status, _ in _outcomes(records, intent)][-1] == "rolled_back"


def test_commit_and_rollback_in_a_query_string_without_a_block(proxy: Proxy) -> None:
    """No BEGIN: a COMMIT commits the string's implicit transaction so far and a ROLLBACK
    undoes it (PostgreSQL warns there was no transaction); what follows starts afresh."""
    app = app_name("blk-implicit")
    dsn = proxy.dsn(application_name=app)
    first = run_psql(dsn, f"{_insert(110)}; ROLLBACK; {_insert(111)}")
    second = run_psql(dsn, f"{_insert(112)}; COMMIT; {_insert(113)}; SELECT 1/0")
    assert first.returncode == 0, first.stderr
    assert "division by zero" in second.stderr
    records = proxy.session_records(app, until=lambda r: len(_disconnects(r)) == 2)
    expected = {110: False, 111: True, 112: True, 113: False}
    for n, kept in expected.items():
        assert _present(proxy, n) is kept, n
        (intent,) = [s for s in statements(records) if s.sql_text.strip() == _insert(n)]
        fate = [status for status, _ in _outcomes(records, intent)]
        assert fate == (["ok"] if kept else ["ok", "rolled_back"]), n


def test_commit_and_rollback_in_a_pipeline_without_a_block(proxy: Proxy) -> None:
    app = app_name("blk-implicit-pipe")
    with _connect(proxy, app, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute(_insert(120))
            conn.execute("COMMIT")
            conn.execute(_insert(121))
            conn.execute("SELECT 1/0")
        with conn.pipeline():
            conn.execute(_insert(122))
            conn.execute("ROLLBACK")
            conn.execute(_insert(123))
    _check(proxy, app, kept=[120, 123], undone=[121, 122])


def _disconnects(records: list[AuditRecord]) -> list[AuditRecord]:
    return [r for r in records if r.event == "disconnect"]


def test_a_statement_that_commits_at_once_is_not_claimed_rolled_back(proxy: Proxy) -> None:
    """CREATE INDEX CONCURRENTLY (like VACUUM, CREATE DATABASE) runs outside any transaction
    and commits when it ends: a later statement of the same pipeline failing, or a ROLLBACK
    there, does not undo it. It was claimed `rolled_back` with the index in place; what runs
    after it in a new transaction is still claimed."""
    app = app_name("blk-outside")
    with _connect(proxy, "setup-outside", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS blk_cic")
        conn.execute("CREATE TABLE blk_cic (a int)")
    create = "CREATE INDEX CONCURRENTLY blk_cic_{} ON blk_cic (a)"
    with _connect(proxy, app, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute(create.format(1))
            conn.execute(_insert(130))
            conn.execute("SELECT 1/0")
        with conn.pipeline():
            conn.execute(create.format(2))
            conn.execute(_insert(131))
            conn.execute("ROLLBACK")
        with conn.pipeline():
            conn.execute(create.format(3))
            conn.execute("BEGIN")
            conn.execute(_insert(132))
            conn.execute("ROLLBACK")
    records = _check(proxy, app, kept=[], undone=[130, 131, 132])
    for n in (1, 2, 3):
        name = f"blk_cic_{n}"
        assert _count(proxy, f"SELECT count(*) FROM pg_class WHERE relname = '{name}'") == 1
        (intent,) = [s for s in statements(records) if s.sql_text == create.format(n)]
        assert [status for status, _ in _outcomes(records, intent)] == ["ok"], name


def test_a_commit_refused_before_it_began_leaves_the_block_open(proxy: Proxy) -> None:
    """A COMMIT that fails before committing (here statement_timeout fires while PostgreSQL
    parses its long text) leaves the block open and failed, not rolled back: ROLLBACK TO
    SAVEPOINT then COMMIT commits what ran before the savepoint. Every statement of the block
    was claimed `rolled_back` at the failed COMMIT, with row 140 in the table."""
    app = app_name("blk-commit-cancelled")
    padding = "/*" + "x" * (12 * 1024 * 1024) + "*/"
    with _connect(proxy, app, autocommit=True) as conn:
        for sql in ("BEGIN", _insert(140), "SAVEPOINT s", _insert(141)):
            conn.execute(sql)
        conn.execute("SET LOCAL statement_timeout = 1")
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"COMMIT {padding}")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("COMMIT")
    _check(proxy, app, kept=[140], undone=[141])


def test_prepare_transaction_that_fails_or_of_a_failed_block(proxy: Proxy) -> None:
    """PREPARE TRANSACTION rolls the block back when it fails (here: prepared transactions
    are disabled) and when the block had failed (answered ROLLBACK); neither was claimed."""
    app = app_name("blk-prepare")
    with _connect(proxy, app, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(_insert(150))
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("PREPARE TRANSACTION 'blk-p1'")
        conn.execute("BEGIN")
        conn.execute(_insert(151))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("PREPARE TRANSACTION 'blk-p2'")  # answered ROLLBACK
    records = _check(proxy, app, kept=[], undone=[150, 151])
    prepares = [s for s in statements(records) if s.command == "PREPARE TRANSACTION"]
    assert [[status for status, _ in _outcomes(records, p)] for p in prepares] == [
        ["error"],
        ["rolled_back"],
    ]


def test_rows_fetched_after_a_savepoint_were_changed_before_it(proxy: Proxy) -> None:
    """INSERT ... RETURNING read through a cursor (asyncpg, Execute with a row limit) runs
    whole at the first Execute; a later Execute only fetches. Fetched after SAVEPOINT b, the
    fetch was taken for the change and ROLLBACK TO b claimed the INSERT undone, with its rows
    committed; and ROLLBACK of the block did not claim the INSERT whose first Execute was
    suspended."""
    app = app_name("blk-portal")
    sql = f"INSERT INTO {_TABLE} SELECT g FROM generate_series({{}}, {{}}) g RETURNING id"
    kept, undone = sql.format(160, 162), sql.format(165, 167)

    async def run() -> None:
        conn = await _aconnect(proxy, app)
        try:
            async with conn.transaction():
                cursor = await conn.cursor(kept)
                assert len(await cursor.fetch(1)) == 1  # Execute with a row limit: suspended
                await conn.execute("SAVEPOINT b")
                assert len(await cursor.fetch(5)) == 2  # the rest: only fetched
                await conn.execute("ROLLBACK TO SAVEPOINT b")
            tr = conn.transaction()
            await tr.start()
            cursor = await conn.cursor(undone)
            assert len(await cursor.fetch(1)) == 1
            await tr.rollback()
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    assert _count(proxy, f"SELECT count(*) FROM {_TABLE} WHERE id BETWEEN 160 AND 162") == 3
    assert _count(proxy, f"SELECT count(*) FROM {_TABLE} WHERE id BETWEEN 165 AND 167") == 0
    fates = {
        text: [
            [status for status, _ in _outcomes(records, s)]
            for s in statements(records)
            if s.sql_text == text
        ]
        for text in (kept, undone)
    }
    assert fates[kept] == [["suspended"], ["ok"]], fates
    assert fates[undone] == [["suspended", "rolled_back"]], fates


def test_what_no_transaction_undoes_is_not_claimed(proxy: Proxy) -> None:
    """Twentieth review: CLOSE and DISCARD PLANS inside a rolled-back block were claimed
    rolled_back, though a rollback undoes neither."""
    app = app_name("blk-nontx")
    with _connect(proxy, app, autocommit=True) as conn:
        for sql in (
            "BEGIN",
            "DECLARE c CURSOR FOR SELECT 1",
            "CLOSE c",
            "DISCARD PLANS",
            _insert(170),
            "ROLLBACK",
        ):
            conn.execute(sql)
    records = _check(proxy, app, kept=[], undone=[170])
    for command in ("CLOSE", "DISCARD PLANS"):
        (intent,) = [s for s in statements(records) if s.command == command]
        assert [status for status, _ in _outcomes(records, intent)] == ["ok"], command
