"""The relay's portal lifetimes: what it keeps between the answers (no network: bytes in, bytes
out). What PostgreSQL drops is tested against PostgreSQL in tests/e2e/test_portal_lifetimes.py."""

from __future__ import annotations

from dbward.audit.sink import MemorySink
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import RecordingTransport, detached_session, frames

PARSED = m._frame(b"1", b"")
BOUND = m._frame(b"2", b"")
SUSPENDED = m.data_row([b"1"]) + m._frame(b"s", b"")


def _session() -> tuple[PgSession, RecordingTransport, RecordingTransport, MemorySink]:
    sink = MemorySink()
    session, client, upstream = detached_session(sink)
    return session, client, upstream, sink


def _in_block(session: PgSession) -> None:
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))


def test_many_transactions_leave_nothing_behind() -> None:
    """Named portals abandoned in each transaction (asyncpg) and in pipelines: gone from every
    map and scope when PostgreSQL drops them."""
    session, _, _, _ = _session()
    session.data_received(m.parse_message("s", "SELECT 1") + m.sync())
    session._on_upstream_data(PARSED + m.ready_for_query(b"I"))
    for i in range(200):
        bind = m.bind_message(f"p{i}", "s", []) + m.execute_message(f"p{i}", 1) + m.sync()
        session.data_received(bind * 2 if i % 2 else bind)  # pipelined: two in flight
        replies = BOUND + SUSPENDED + m.ready_for_query(b"I")
        session._on_upstream_data(replies * 2 if i % 2 else replies)
    assert session._portals == {} and session._earlier == {}
    assert len(session._scopes) == 1 and session._scopes[0].portals == {}
    assert not session._scoped and not session._portal_events


def test_a_portal_used_after_an_unanswered_sync_waits_for_its_answer() -> None:
    """In a block the Sync drops nothing, outside one it ends the transaction: which, only
    PostgreSQL's answer tells. The Execute is held (reading paused) until it has arrived."""
    session, _, upstream, _ = _session()
    _in_block(session)
    session.data_received(m.parse_message("", "SELECT 1") + m.bind_message("p", "", []) + m.sync())
    session._on_upstream_data(PARSED + BOUND)  # the Bind succeeded; the Sync is unanswered
    upstream.written.clear()
    session.data_received(m.execute_message("p", 1) + m.sync())
    assert upstream.written == b""  # waits
    session._on_upstream_data(m.ready_for_query(b"T"))
    assert upstream.written == m.execute_message("p", 1) + m.sync()  # still PostgreSQL's


def test_a_portal_pipelined_behind_a_rollback_in_its_group_is_refused() -> None:
    """Nothing will bring the ROLLBACK's answer before the Execute must be decided (no Sync in
    between): refused, the poison in its place; nothing of the old statement is recorded."""
    session, client, upstream, sink = _session()
    _in_block(session)
    session.data_received(m.query("DECLARE c CURSOR FOR SELECT secret FROM notes"))
    session._on_upstream_data(m.command_complete("DECLARE CURSOR") + m.ready_for_query(b"T"))
    upstream.written.clear()
    rollback = m.parse_message("", "ROLLBACK") + m.bind_message("", "", []) + m.execute_message("")
    session.data_received(rollback + m.execute_message("c") + m.sync())
    assert m.execute_message("c") not in upstream.written
    poison = m.parse_message("__dbward_denied__", "DBWARD_POLICY_DENIED")
    assert upstream.written == rollback + poison + m.sync()
    refused = [r for r in sink.records if r.event == "statement"][-1]
    assert (refused.command, refused.rule, refused.tables) == ("EXECUTE", "guard.unparseable", ())
    session._on_upstream_data(
        PARSED
        + BOUND
        + m.command_complete("ROLLBACK")
        + m.error_response("ERROR", "42601", "syntax error")
        + m.ready_for_query(b"I")
    )
    kinds = [kind for kind, _ in frames(client.written)]
    assert kinds[-2:] == [b"E", b"Z"]
    assert session._portals == {} and session._earlier == {}


def test_a_savepoint_rolled_back_to_forgets_only_what_came_after_it() -> None:
    session, _, _, _ = _session()
    _in_block(session)
    for sql, tag in (
        ("DECLARE before_sp CURSOR FOR SELECT 1", "DECLARE CURSOR"),
        ("SAVEPOINT a", "SAVEPOINT"),
        ("DECLARE after_sp CURSOR WITH HOLD FOR SELECT 1", "DECLARE CURSOR"),
        ("SAVEPOINT b", "SAVEPOINT"),
        ("RELEASE b", "RELEASE"),
    ):
        session.data_received(m.query(sql))
        session._on_upstream_data(m.command_complete(tag) + m.ready_for_query(b"T"))
    assert set(session._portals) == {"before_sp", "after_sp"}
    session.data_received(m.query("ROLLBACK TO a"))
    session._on_upstream_data(m.command_complete("ROLLBACK") + m.ready_for_query(b"T"))
    assert set(session._portals) == {"before_sp"}
    assert [scope.name for scope in session._scopes] == [None, "a"]
    session.data_received(m.query("COMMIT"))
    session._on_upstream_data(m.command_complete("COMMIT") + m.ready_for_query(b"I"))
    assert session._portals == {}


def test_code_forgets_the_portals_open_before_it_not_those_defined_after() -> None:
    """A DO block's code may have replaced any portal PostgreSQL held when it started, the
    WITH HOLD cursor held from an earlier transaction too: all forgotten as doubtful. A portal
    whose Bind PostgreSQL answered after the DO's CommandComplete came after it: kept."""
    session, _, _, _ = _session()
    session.data_received(m.query("DECLARE h CURSOR WITH HOLD FOR SELECT 1"))
    session._on_upstream_data(m.command_complete("DECLARE CURSOR") + m.ready_for_query(b"I"))
    _in_block(session)
    session.data_received(m.parse_message("", "SELECT 1") + m.bind_message("p", "", []) + m.sync())
    session._on_upstream_data(PARSED + BOUND + m.ready_for_query(b"T"))
    session.data_received(
        m.parse_message("", "DO $$ BEGIN NULL; END $$")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.parse_message("", "SELECT 2")
        + m.bind_message("q", "", [])
        + m.sync()
    )
    session._on_upstream_data(
        PARSED + BOUND + m.command_complete("DO") + PARSED + BOUND + m.ready_for_query(b"T")
    )
    assert set(session._portals) == {"q"} and session._earlier == {}
    assert {"h", "p"} <= set(session._forgotten_portals)
    why = session._forgotten_portals["h"].why
    assert why == "may have been replaced by the code of a DO"
