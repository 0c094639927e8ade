"""dbward forgets portals and cursors exactly when PostgreSQL drops them (review round 50).

A name PostgreSQL dropped and dbward still held was decided and recorded as the old statement
when something dbward did not see re-used it: a DO block reopening cursor `c` as a refcursor on
another table, then an Execute of `c` (or `FETCH c`), ran that table's rows recorded as the old
`DECLARE c CURSOR FOR SELECT 1`. What PostgreSQL drops, as verified on PostgreSQL 15: ROLLBACK TO
SAVEPOINT drops the portals created since the savepoint (WITH HOLD or not, in savepoints released
inside it too) and keeps those created before; RELEASE keeps them; COMMIT drops all but WITH HOLD
cursors; ROLLBACK, a COMMIT answered ROLLBACK, an error ending an implicit transaction drop all
created in the transaction, WITH HOLD ones too; a WITH HOLD cursor that survived a commit stays
until closed; AND CHAIN ends the transaction the same way.

Each test checks both sides: a dropped name re-opened behind dbward's back is refused (never run
as the old statement), and a name PostgreSQL still holds runs as what it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from dbward.audit.records import AuditRecord
from dbward.wire.postgres import messages as m
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.drivers import aconnect
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession

SECRET = "portal_secret"
OLD_TABLE = "portal_old"
OLD = f"SELECT v FROM {OLD_TABLE}"  # what every name below first means


def _reopen(name: str) -> str:
    """Code that opens a cursor of that name on the secret table: dbward sees the DO (and its
    table), never which cursor it opens."""
    return f"DO $$ DECLARE r refcursor := '{name}'; BEGIN OPEN r FOR SELECT v FROM {SECRET}; END $$"


def _bind(portal: str, sql: str = OLD) -> bytes:
    return m.parse_message("", sql) + m.bind_message(portal, "", [])


def _run(sql: str) -> bytes:
    return m.parse_message("", sql) + m.bind_message("", "", []) + m.execute_message("")


@pytest.fixture
def session(proxy: Proxy) -> Iterator[RawSession]:
    raw = RawSession(proxy, app_name("portal-lifetime"))
    raw.query(
        f"CREATE TEMP TABLE {SECRET} (v text); INSERT INTO {SECRET} VALUES ('s3cret');"
        f" CREATE TEMP TABLE {OLD_TABLE} (v text); INSERT INTO {OLD_TABLE} VALUES ('old'), ('old')"
    )
    try:
        yield raw
    finally:
        raw.close()


def _kinds(replies: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [kind for kind, _ in replies]


def _leaked(replies: list[tuple[bytes, bytes]]) -> bool:
    return any(kind == b"D" and b"s3cret" in payload for kind, payload in replies)


def _error(replies: list[tuple[bytes, bytes]]) -> str:
    errors = [m.parse_error_fields(payload)["C"] for kind, payload in replies if kind == b"E"]
    return errors[0] if errors else ""


def _records(proxy: Proxy, session: RawSession) -> list[AuditRecord]:
    session.close()
    return proxy.session_records(session.app, until=has_disconnect)


def _assert_dropped_and_refused(session: RawSession, name: str) -> None:
    """`name` is gone in PostgreSQL: re-opened by code on the secret table, an Execute of it is
    refused, not run as the old statement. (Leaves the session in a failed block.)"""
    assert _kinds(session.query(_reopen(name))) == [b"C", b"Z"]  # the name was free
    replies = session.send(m.execute_message(name) + m.sync())
    assert not _leaked(replies)
    assert _error(replies) == "42501", replies


def _assert_alive(session: RawSession, name: str) -> None:
    """`name` is still PostgreSQL's: an Execute of it runs (as the old statement)."""
    replies = session.send(m.execute_message(name, 1) + m.sync())
    assert _error(replies) == "", replies
    assert b"D" in _kinds(replies)


def _no_stale_records(records: list[AuditRecord]) -> None:
    """Nothing after the first DO block or CALL is recorded as the old statement (an Execute
    with its text, a FETCH with its table): what ran was the cursor its code opened."""
    intents = statements(records)
    first_do = next(i for i, s in enumerate(intents) if s.command in ("DO", "CALL"))
    for intent in intents[first_do:]:
        if OLD in intent.sql_text or OLD_TABLE in intent.tables:
            raise AssertionError(f"recorded as the old statement: {intent}")
        if intent.command == "EXECUTE":
            assert (intent.decision, intent.rule) == ("deny", "guard.unparseable")


def test_rollback_to_savepoint_drops_what_was_created_after_it(
    proxy: Proxy, session: RawSession
) -> None:
    """The finding: after ROLLBACK TO, cursor c1 and portal p1 were still dbward's; reopened by
    a DO block, their Execute ran the secret table's rows recorded as `SELECT 'old'`. c0,
    declared before the savepoint, survives, fetched in it or not."""
    session.query("BEGIN")
    session.query(f"DECLARE c0 CURSOR FOR {OLD}")
    session.query("SAVEPOINT a")
    session.query("FETCH 1 FROM c0")
    session.query(f"DECLARE c1 CURSOR FOR {OLD}")
    assert _kinds(session.send(_bind("p1") + m.sync())) == [b"1", b"2", b"Z"]
    assert _kinds(session.query("ROLLBACK TO a")) == [b"C", b"Z"]
    _assert_alive(session, "c0")
    session.query("SAVEPOINT b")
    _assert_dropped_and_refused(session, "c1")
    session.query("ROLLBACK TO b")
    _assert_dropped_and_refused(session, "p1")
    session.query("ROLLBACK")
    records = _records(proxy, session)
    executes = [s for s in statements(records) if s.path == "extended"]
    # c0's Execute is its DECLARE (fetched, not refused), the others were refused.
    assert [s.command for s in executes] == ["DECLARE CURSOR", "EXECUTE", "EXECUTE"]
    assert executes[0].sql_text.startswith("DECLARE c0 CURSOR")
    assert outcome_of(records, executes[0]).status == "suspended"
    _no_stale_records(records)


@pytest.mark.parametrize(
    "steps",
    [
        # A savepoint released inside the one rolled back to: its portals went to that one.
        ["SAVEPOINT a", "SAVEPOINT b", f"DECLARE c CURSOR FOR {OLD}", "RELEASE b", "ROLLBACK TO a"],
        # Two savepoints of one name: ROLLBACK TO is to the innermost, RELEASE releases it.
        [
            "SAVEPOINT a",
            f"DECLARE k CURSOR FOR {OLD}",
            "SAVEPOINT a",
            f"DECLARE c CURSOR FOR {OLD}",
            "RELEASE a",
            "ROLLBACK TO a",
        ],
        # All in one Query string.
        [f"SAVEPOINT a; DECLARE c CURSOR FOR {OLD}; SAVEPOINT b; RELEASE b; ROLLBACK TO a"],
        # WITH HOLD changes nothing before the transaction commits.
        ["SAVEPOINT a", f"DECLARE c CURSOR WITH HOLD FOR {OLD}", "ROLLBACK TO a"],
        # An error in the savepoint, then ROLLBACK TO.
        ["SAVEPOINT a", f"DECLARE c CURSOR FOR {OLD}", "SELECT 1/0", "ROLLBACK TO a"],
    ],
    ids=["released-inside", "same-name", "one-string", "with-hold", "after-error"],
)
def test_rollback_to_savepoint_drops_portals_of_savepoints_inside_it(
    proxy: Proxy, session: RawSession, steps: list[str]
) -> None:
    session.query("BEGIN")
    for step in steps:
        session.query(step)
    _assert_dropped_and_refused(session, "c")
    session.query("ROLLBACK")
    _no_stale_records(_records(proxy, session))


def test_release_keeps_cursors_until_the_savepoint_around_is_rolled_back(
    proxy: Proxy, session: RawSession
) -> None:
    session.query("BEGIN")
    session.query("SAVEPOINT outer_sp")
    session.query("SAVEPOINT a")
    session.query(f"DECLARE c CURSOR FOR {OLD}")
    session.query("RELEASE a")
    _assert_alive(session, "c")  # released: still there
    session.query("ROLLBACK TO outer_sp")
    _assert_dropped_and_refused(session, "c")
    session.query("ROLLBACK")
    _no_stale_records(_records(proxy, session))


@pytest.mark.parametrize(
    "steps",
    [
        ["BEGIN", f"DECLARE c CURSOR WITH HOLD FOR {OLD}", "ROLLBACK", "BEGIN"],
        ["BEGIN", f"DECLARE c CURSOR WITH HOLD FOR {OLD}", "ROLLBACK AND CHAIN"],
        # COMMIT of a failed block: PostgreSQL rolls back (and says so).
        ["BEGIN", f"DECLARE c CURSOR WITH HOLD FOR {OLD}", "SELECT 1/0", "COMMIT", "BEGIN"],
        # A COMMIT that fails (a deferred constraint): the block is rolled back.
        [
            "CREATE TEMP TABLE dparent (x int PRIMARY KEY);"
            " CREATE TEMP TABLE dchild (x int REFERENCES dparent DEFERRABLE INITIALLY DEFERRED)",
            "BEGIN",
            f"DECLARE c CURSOR WITH HOLD FOR {OLD}",
            "INSERT INTO dchild VALUES (1)",
            "COMMIT",
            "BEGIN",
        ],
        # An implicit transaction ended by an error (a Query of several statements).
        [f"DECLARE c CURSOR WITH HOLD FOR {OLD}; SELECT 1/0", "BEGIN"],
        # ... and one of the extended protocol: the error at Sync.
        [
            _run(f"DECLARE c CURSOR WITH HOLD FOR {OLD}") + _run("SELECT 1/0") + m.sync(),
            "BEGIN",
        ],
    ],
    ids=[
        "rollback",
        "rollback-and-chain",
        "failed-block-commit",
        "commit-fails",
        "query-error",
        "sync-error",
    ],
)
def test_a_with_hold_cursor_of_a_transaction_rolled_back_is_dropped(
    proxy: Proxy, session: RawSession, steps: list[str | bytes]
) -> None:
    """The finding's second case: dbward kept every WITH HOLD cursor past its transaction."""
    for step in steps:
        if isinstance(step, str):
            session.query(step)
        else:
            session.send(step)
    _assert_dropped_and_refused(session, "c")
    session.query("ROLLBACK")
    _no_stale_records(_records(proxy, session))


@pytest.mark.parametrize(
    "steps",
    [
        ["BEGIN", f"DECLARE h CURSOR WITH HOLD FOR {OLD}", "COMMIT", "BEGIN", "ROLLBACK"],
        ["BEGIN", f"DECLARE h CURSOR WITH HOLD FOR {OLD}", "COMMIT AND CHAIN", "ROLLBACK"],
        [f"DECLARE h CURSOR WITH HOLD FOR {OLD}", "BEGIN", "SELECT 1/0", "ROLLBACK"],
        [
            "BEGIN",
            "SAVEPOINT a",
            f"DECLARE h CURSOR WITH HOLD FOR {OLD}",
            "RELEASE a",
            "COMMIT",
            "BEGIN",
            "SAVEPOINT b",
            "FETCH 0 FROM h",
            "ROLLBACK TO b",
        ],
        # COMMIT in an implicit block commits (with a warning): the error after it undoes no more.
        [f"DECLARE h CURSOR WITH HOLD FOR {OLD}; COMMIT; SELECT 1/0"],
    ],
    ids=["rollback", "commit-and-chain", "autocommit", "rollback-to", "implicit-commit"],
)
def test_a_with_hold_cursor_committed_survives_later_rollbacks(
    proxy: Proxy, session: RawSession, steps: list[str]
) -> None:
    for step in steps:
        session.query(step)
    _assert_alive(session, "h")
    replies = session.query("FETCH ALL FROM h")
    assert _error(replies) == ""
    session.query("ROLLBACK")
    records = _records(proxy, session)
    fetch = next(s for s in statements(records) if s.sql_text == "FETCH ALL FROM h")
    assert (fetch.kind, fetch.tables, fetch.decision) == ("read", (OLD_TABLE,), "allow")
    # Decided and recorded as the cursor's query (the FETCH's own text is what is logged).
    executes = [s for s in statements(records) if s.path == "extended"]
    assert executes[-1].sql_text == f"DECLARE h CURSOR WITH HOLD FOR {OLD}"


def test_commit_and_chain_drops_portals_though_the_session_never_goes_idle(
    proxy: Proxy, session: RawSession
) -> None:
    """dbward forgot portals only at a ReadyForQuery that reported no transaction; AND CHAIN
    ends the transaction and starts the next one at once."""
    session.query("BEGIN")
    session.query(f"DECLARE c CURSOR FOR {OLD}")
    session.send(_bind("p") + m.sync())
    assert session.query("COMMIT AND CHAIN")[-1] == (b"Z", b"T")
    _assert_dropped_and_refused(session, "c")
    session.query("ROLLBACK AND CHAIN")
    _assert_dropped_and_refused(session, "p")
    session.query("ROLLBACK")
    _no_stale_records(_records(proxy, session))


@pytest.mark.parametrize(
    "pipeline",
    [
        # The implicit transaction of a sync group ends at its Sync; the next one reopens the
        # name in a block. All sent at once: the session is never idle in between.
        _bind("p1") + m.execute_message("p1", 1) + m.sync() + m.query("BEGIN"),
        # COMMIT (or ROLLBACK) inside an implicit transaction ends it there (with a warning).
        _bind("p1") + _run("COMMIT") + m.sync() + m.query("BEGIN"),
        _bind("p1") + _run("ROLLBACK") + m.sync() + m.query("BEGIN"),
        # A block ended by COMMIT, in the same pipeline as the block it reopens the name in.
        m.query("BEGIN") + _bind("p1") + m.sync() + m.query("COMMIT") + m.query("BEGIN"),
    ],
    ids=["sync", "commit", "rollback", "block"],
)
def test_portals_dropped_at_a_transaction_end_inside_a_pipeline(
    proxy: Proxy, session: RawSession, pipeline: bytes
) -> None:
    attack = m.query(_reopen("p1")) + m.execute_message("p1") + m.sync()
    session.sock.sendall(pipeline + attack)
    replies: list[tuple[bytes, bytes]] = []
    for _ in range(pipeline.count(b"S\x00\x00\x00\x04") + pipeline.count(b"Q\x00") + 2):
        replies += session.read_until_ready()
    assert not _leaked(replies)
    assert _error(replies[-2:]) == "42501", replies
    session.query("ROLLBACK")
    _no_stale_records(_records(proxy, session))


SAVEPOINT_SET = ["BEGIN", "SAVEPOINT a", f"DECLARE c CURSOR FOR {OLD}"]


@pytest.mark.parametrize(
    ("pipeline", "answers"),
    [
        # Each its own Query: the Execute of c waits until the ROLLBACK TO is answered.
        (m.query("ROLLBACK TO a") + m.query(_reopen("c")) + m.execute_message("c") + m.sync(), 3),
        (m.query("ROLLBACK TO a") + m.query(_reopen("c")) + m.query("FETCH c"), 3),
        # One sync group: nothing brings the answer before the Execute must go: refused.
        (_run("ROLLBACK TO a") + _run(_reopen("c")) + m.execute_message("c") + m.sync(), 1),
        (
            _run("COMMIT") + _run("BEGIN") + _run(_reopen("c")) + m.execute_message("c") + m.sync(),
            1,
        ),
        # One Query string: the FETCH after the ROLLBACK TO is refused.
        (m.query(f"ROLLBACK TO a; {_reopen('c')}; FETCH c"), 1),
        (m.query(f"COMMIT AND CHAIN; {_reopen('c')}; FETCH c"), 1),
        # Declared in the string itself, before the ROLLBACK.
        (m.query(f"DECLARE d CURSOR FOR {OLD}; ROLLBACK; BEGIN; {_reopen('d')}; FETCH d"), 1),
    ],
    ids=[
        "queries-execute",
        "queries-fetch",
        "group-rollback-to",
        "group-commit",
        "string-rollback-to",
        "string-commit-and-chain",
        "string-declared-before",
    ],
)
def test_a_use_pipelined_behind_what_drops_the_cursor_is_not_the_old_statement(
    proxy: Proxy, session: RawSession, pipeline: bytes, answers: int
) -> None:
    for step in SAVEPOINT_SET:
        session.query(step)
    session.sock.sendall(pipeline)
    replies: list[tuple[bytes, bytes]] = []
    for _ in range(answers):
        replies += session.read_until_ready()
    session.query("ROLLBACK")
    records = _records(proxy, session)
    fetches = [s for s in statements(records) if s.sql_text in ("FETCH c", "FETCH d")]
    if fetches and not _error(replies):
        # Waited for the answer: c was gone, so the FETCH is what its text shows (the DO
        # that opened the cursor it reads was decided and recorded with the table).
        (fetch,) = fetches
        assert fetch.tables == () and fetch.decision == "allow"
    else:
        assert not _leaked(replies)
        assert _error(replies) == "42501", replies
    _no_stale_records(records)


def test_legit_pipelined_fetches_of_a_cursor_in_a_block_still_run(
    proxy: Proxy, session: RawSession
) -> None:
    session.query("BEGIN")
    session.query(f"DECLARE c CURSOR FOR SELECT v FROM {SECRET}, generate_series(1, 5)")
    session.sock.sendall(
        m.query("FETCH 1 FROM c")
        + m.query("SAVEPOINT a")
        + m.query("FETCH 1 FROM c")
        + m.query("ROLLBACK TO a")
        + m.execute_message("c", 1)
        + m.sync()
        + m.query("BEGIN; FETCH 1 FROM c; RELEASE a; FETCH 1 FROM c")
        # A WITH HOLD cursor the COMMIT of the same string keeps, and one held from before.
        + m.query(
            f"DECLARE h CURSOR WITH HOLD FOR SELECT v FROM {SECRET}, generate_series(1, 2);"
            " COMMIT; FETCH 1 FROM h;"
            f" BEGIN; DECLARE g CURSOR WITH HOLD FOR SELECT v FROM {SECRET}; COMMIT AND CHAIN;"
            " ROLLBACK; FETCH 1 FROM g; FETCH 1 FROM h"
        )
    )
    replies: list[tuple[bytes, bytes]] = []
    for _ in range(7):
        replies += session.read_until_ready()
    assert _error(replies) == ""
    assert sum(1 for kind, _ in replies if kind == b"D") == 8
    records = _records(proxy, session)
    runs = [s for s in statements(records) if s.command in ("FETCH", "DECLARE CURSOR")]
    assert all(s.tables == (SECRET,) and s.decision == "allow" for s in runs), runs


@pytest.mark.parametrize("control", ["ROLLBACK", "COMMIT"])
def test_a_do_block_that_may_end_the_transaction_leaves_its_portals_doubtful(
    proxy: Proxy, session: RawSession, control: str
) -> None:
    """A DO block or procedure run outside a block may COMMIT or ROLLBACK (or neither), and
    nothing tells dbward which: the portals of the transaction it ran in are forgotten as
    doubtful and refused (fail closed). After a ROLLBACK in it the WITH HOLD cursor is gone
    and re-opened by code; after a COMMIT PostgreSQL kept it, and dbward refuses it all the
    same (documented)."""
    replies = session.send(
        _run(f"DECLARE h CURSOR WITH HOLD FOR {OLD}")
        + _run(f"DO $$ BEGIN {control}; END $$")
        + m.sync()
    )
    assert _error(replies) == ""
    session.query("BEGIN")
    if control == "ROLLBACK":
        assert _error(session.query(_reopen("h"))) == ""
    for use in (m.execute_message("h") + m.sync(), m.query("FETCH h")):
        replies = session.send(use)
        assert _error(replies) == "42501" and not _leaked(replies)
        session.query("ROLLBACK; BEGIN")
        if control == "ROLLBACK":
            session.query(_reopen("h"))
    session.query("ROLLBACK")
    # A cursor declared after it is followed again.
    session.query(f"DECLARE k CURSOR WITH HOLD FOR {OLD}")
    _assert_alive(session, "k")
    records = _records(proxy, session)
    refused = [s for s in statements(records) if s.decision == "deny"]
    assert [s.command for s in refused] == ["EXECUTE", "FETCH"]
    assert all(s.rule == "guard.unparseable" and s.tables == () for s in refused)


def test_psycopg_server_side_cursors_across_savepoints_and_commits(proxy: Proxy) -> None:
    """Legit use: psycopg named cursors (DECLARE/FETCH), in nested transactions (savepoints)
    and WITH HOLD across commits."""
    app = app_name("portal-psycopg")
    with psycopg.connect(**proxy.conninfo(application_name=app)) as conn:
        conn.execute(f"CREATE TEMP TABLE {SECRET} AS SELECT g AS v FROM generate_series(1, 50) g")
        conn.commit()
        with conn.transaction():
            outer = conn.cursor("outer_cur")
            outer.execute(f"SELECT v FROM {SECRET} ORDER BY v")
            assert outer.fetchone() == (1,)
            with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                inner = conn.cursor("inner_cur")
                inner.execute("SELECT 1")
                assert outer.fetchmany(2) == [(2,), (3,)]
                conn.execute("SELECT 1/0")
            assert outer.fetchone() == (4,)  # declared before the savepoint: still there
            with conn.transaction():
                kept = conn.cursor("kept_cur")
                kept.execute("SELECT 42")
            assert kept.fetchone() == (42,)  # released: still there
        held = conn.cursor("held_cur", withhold=True)
        held.execute(f"SELECT v FROM {SECRET} ORDER BY v")
        conn.commit()
        assert held.fetchmany(3) == [(1,), (2,), (3,)]
        conn.rollback()
        assert held.fetchone() == (4,)
        held.close()
        conn.commit()
    records = proxy.session_records(app, until=has_disconnect)
    fetches = [s for s in statements(records) if s.command == "FETCH"]
    assert fetches and all(s.decision == "allow" for s in fetches)
    assert all(s.tables == (SECRET,) for s in fetches if "held_cur" in s.sql_text)


def test_asyncpg_cursors_in_nested_transactions(proxy: Proxy) -> None:
    app = app_name("portal-asyncpg")
    query = "SELECT g FROM generate_series(1, 100) g"

    async def run() -> None:
        conn = await aconnect(proxy, app)
        try:
            async with conn.transaction():
                outer = await conn.cursor(query)
                assert [r[0] for r in await outer.fetch(2)] == [1, 2]
                try:
                    async with conn.transaction():  # a savepoint
                        inner = await conn.cursor(query)
                        assert [r[0] for r in await inner.fetch(1)] == [1]
                        assert [r[0] for r in await outer.fetch(1)] == [3]
                        await conn.execute("SELECT 1/0")
                except asyncpg.DivisionByZeroError:
                    pass
                assert [r[0] for r in await outer.fetch(2)] == [4, 5]
                async with conn.transaction():
                    kept = await conn.cursor(query)
                assert [r[0] for r in await kept.fetch(1)] == [1]
                assert [r[0] async for r in conn.cursor(query, prefetch=30)][-1] == 100
        finally:
            await conn.close()

    asyncio.run(run())
    records = proxy.session_records(app, until=has_disconnect)
    assert not [s for s in statements(records) if s.decision == "deny"]


# Review round 53: code the client's text runs (a DO block, a CALL) may CLOSE a cursor or portal
# the client holds and OPEN another under its name, in a transaction block, on a WITH HOLD
# cursor held from an earlier transaction too. Verified on PostgreSQL 15: pg_cursors then shows
# the new query (and a new creation_time) under the old name, and FETCH/Execute of the name
# returns its rows. Every portal open before such a statement is forgotten as doubtful.


@pytest.fixture(scope="module")
def reopening_procedures(pg_server: PgServer) -> None:
    """Procedures that close the portal of a name and open another on the secret table: one
    whose cursor dies with the transaction, one that declares a WITH HOLD cursor (dynamic SQL:
    created by the superuser, as code created before dbward is)."""
    pg_server.psql(
        "CREATE OR REPLACE PROCEDURE portal_reopen(n text) LANGUAGE plpgsql AS $$"
        f" DECLARE r refcursor := n; BEGIN CLOSE r; OPEN r FOR SELECT v FROM {SECRET}; END $$;"
        "CREATE OR REPLACE PROCEDURE portal_reopen_held(n text) LANGUAGE plpgsql AS $$"
        " DECLARE r refcursor := n; BEGIN CLOSE r; EXECUTE format("
        f"'DECLARE %I CURSOR WITH HOLD FOR SELECT v FROM {SECRET}', n); END $$"
    )


def _replace(name: str, how: str) -> str:
    """Code that closes `name` and opens another portal of that name on the secret table."""
    if how == "call":
        return f"CALL portal_reopen('{name}')"
    return (
        f"DO $$ DECLARE r refcursor := '{name}'; BEGIN CLOSE r;"
        f" OPEN r FOR SELECT v FROM {SECRET}; END $$"
    )


def _refusal(replies: list[tuple[bytes, bytes]]) -> str:
    (error,) = [m.parse_error_fields(p) for kind, p in replies if kind == b"E"]
    assert error["C"] == "42501", error
    return error["M"]


def _replaced_refused(records: list[AuditRecord], command: str, how: str) -> AuditRecord:
    """The one refusal: the use of the replaced name, recorded as refused and why."""
    (refused,) = [s for s in statements(records) if s.decision == "deny"]
    assert (refused.command, refused.rule, refused.tables) == (command, "guard.unparseable", ())
    assert f"may have been replaced by the code of a {how.upper()}" in refused.detail
    return refused


@pytest.mark.parametrize("how", ["do", "call"])
@pytest.mark.parametrize("use", ["fetch", "execute"])
@pytest.mark.parametrize("what", ["cursor", "portal", "held"])
def test_a_portal_open_before_code_that_may_replace_it_is_refused(
    proxy: Proxy,
    session: RawSession,
    reopening_procedures: None,
    what: str,
    use: str,
    how: str,
) -> None:
    """The hole: `DECLARE c CURSOR FOR SELECT v FROM portal_old` (or a Bind of portal c, or a
    WITH HOLD cursor committed before), then code closing c and opening it on the secret table
    in the same block: a FETCH or Execute of c returned the secret rows, decided and recorded
    as the old statement (a read of portal_old)."""
    if what == "held":
        session.query(f"DECLARE c CURSOR WITH HOLD FOR {OLD}")
    session.query("BEGIN")
    if what == "cursor":
        session.query(f"DECLARE c CURSOR FOR {OLD}")
    elif what == "portal":
        assert _kinds(session.send(_bind("c") + m.sync())) == [b"1", b"2", b"Z"]
    assert _error(session.query(_replace("c", how))) == ""
    sent = m.query("FETCH ALL c") if use == "fetch" else m.execute_message("c") + m.sync()
    replies = session.send(sent)
    assert not _leaked(replies)
    message = _refusal(replies)
    again = "declare it again" if use == "fetch" else "bind it again"
    assert f"may have been replaced by the code of a {how.upper()}: {again}" in message
    session.query("ROLLBACK")
    records = _records(proxy, session)
    refused = _replaced_refused(records, "FETCH" if use == "fetch" else "EXECUTE", how)
    assert "'c'" in refused.detail
    _no_stale_records(records)


@pytest.mark.parametrize("how", ["do", "call"])
def test_code_run_in_a_query_string_replaces_cursors_declared_before_it(
    proxy: Proxy, session: RawSession, reopening_procedures: None, how: str
) -> None:
    """In one Query string: a cursor declared before the code (in the string, or a WITH HOLD
    one a COMMIT of the string kept) is refused after it; one declared after it runs."""
    session.query(f"DECLARE h CURSOR WITH HOLD FOR {OLD}")
    for string in (
        f"BEGIN; DECLARE c CURSOR FOR {OLD}; {_replace('c', how)}; FETCH ALL c",
        f"BEGIN; {_replace('h', how)}; FETCH ALL h",
        f"DECLARE k CURSOR WITH HOLD FOR {OLD}; COMMIT; {_replace('k', how)}; FETCH ALL k",
    ):
        replies = session.query(string)
        assert not _leaked(replies)
        assert "declare it again" in _refusal(replies)
        session.query("ROLLBACK")
    replies = session.query(
        f"BEGIN; DECLARE d CURSOR FOR {OLD}; {_replace('d', how)};"
        f" DECLARE e CURSOR FOR {OLD}; FETCH e"
    )
    assert _error(replies) == "" and b"D" in _kinds(replies)
    session.query("ROLLBACK")
    records = _records(proxy, session)
    # The whole string is refused for the FETCH (each statement recorded so: none ran).
    refused = [s for s in statements(records) if s.command == "FETCH" and s.decision == "deny"]
    assert len(refused) == 3
    assert all(s.rule == "guard.unparseable" and s.tables == () for s in refused)
    assert all(f"replaced by the code of a {how.upper()}" in s.detail for s in refused)
    fetch_e = next(s for s in statements(records) if s.sql_text == "FETCH e")
    assert (fetch_e.decision, fetch_e.tables) == ("allow", (OLD_TABLE,))


def test_code_pipelined_before_a_use_of_a_portal_in_its_sync_group(
    proxy: Proxy, session: RawSession, reopening_procedures: None
) -> None:
    """The code and the Execute in one sync group: nothing brings the code's answer before the
    Execute must be decided: refused (as after any statement that may drop portals)."""
    session.query("BEGIN")
    session.send(_bind("p") + m.sync())
    replies = session.send(_run(_replace("p", "call")) + m.execute_message("p") + m.sync())
    assert not _leaked(replies)
    _refusal(replies)
    session.query("ROLLBACK")
    _no_stale_records(_records(proxy, session))


def test_a_with_hold_cursor_replaced_by_a_procedure_outside_a_block_is_refused(
    proxy: Proxy, session: RawSession, reopening_procedures: None
) -> None:
    """Outside a block too: the procedure closes the WITH HOLD cursor held from an earlier
    transaction and declares another WITH HOLD (dynamic SQL), which outlives the CALL."""
    session.query(f"DECLARE h CURSOR WITH HOLD FOR {OLD}")
    assert _error(session.query("CALL portal_reopen_held('h')")) == ""
    for use in (m.query("FETCH ALL h"), m.execute_message("h") + m.sync()):
        replies = session.send(use)
        assert not _leaked(replies)
        _refusal(replies)
    records = _records(proxy, session)
    refused = [s for s in statements(records) if s.decision == "deny"]
    assert [s.command for s in refused] == ["FETCH", "EXECUTE"]
    _no_stale_records(records)


def test_portals_defined_after_the_code_run_as_what_they_are(
    proxy: Proxy, session: RawSession, reopening_procedures: None
) -> None:
    """What the client defines after the code is followed again: a cursor or portal of a new
    name, and the replaced name closed and defined again."""
    session.query("BEGIN")
    session.query(f"DECLARE c CURSOR FOR {OLD}")
    session.send(_bind("p") + m.sync())
    session.query(_replace("c", "do"))
    session.query(_replace("p", "call"))
    session.query(f"DECLARE d CURSOR FOR {OLD}")
    session.query(f"CLOSE c; DECLARE c CURSOR FOR {OLD}")
    assert _kinds(session.send(m.close_message("P", "p") + _bind("p") + m.sync())) == [
        b"3",
        b"1",
        b"2",
        b"Z",
    ]
    for name in ("c", "d", "p"):
        _assert_alive(session, name)
    replies = session.query("FETCH ALL c")
    assert _error(replies) == "" and not _leaked(replies)
    session.query("COMMIT")
    records = _records(proxy, session)
    assert not [s for s in statements(records) if s.decision == "deny"]
    fetch = next(s for s in statements(records) if s.sql_text == "FETCH ALL c")
    assert fetch.tables == (OLD_TABLE,)
