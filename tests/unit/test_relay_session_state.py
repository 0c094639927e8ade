"""dbward's maps of prepared statements and portals follow what PostgreSQL really holds.

Bytes in, bytes out, no network: the upstream replies are written by hand, as PostgreSQL sends
them (checked end to end in tests/e2e/test_session_state.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dbward.audit.sink import HeldRecord, MemorySink
from dbward.config.model import AuditSettings
from dbward.core.errors import AuditUnavailable
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import detached_session, feed, frames, prepare, sinked_session

PARSED, BOUND = m._frame(b"1", b""), m._frame(b"2", b"")
ABORTED = m.error_response("ERROR", "25P02", "current transaction is aborted")
DUPLICATE = m.error_response("ERROR", "42P05", 'prepared statement "s1" already exists')
# What PostgreSQL gets for a refused Query it could parse (one it cannot: DBWARD_POLICY_DENIED).
REFUSED_AT_RUN = m.query('SET "dbward: policy denied" = on')


def _in_failed_transaction(session: PgSession) -> None:
    session.data_received(m.query("BEGIN"))
    session._on_upstream_data(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
    session.data_received(m.query("SELECT 1/0"))
    session._on_upstream_data(m.error_response("ERROR", "22012", "x") + m.ready_for_query(b"E"))


def test_parse_and_bind_refused_by_postgres_leave_nothing_behind() -> None:
    session, _, _, _ = sinked_session()
    _in_failed_transaction(session)
    for i in range(200):
        session.data_received(m.parse_message(f"s{i}", "SELECT 1") + m.sync())
        session._on_upstream_data(ABORTED + m.ready_for_query(b"E"))
        session.data_received(m.bind_message(f"p{i}", "", []) + m.sync())
        session._on_upstream_data(ABORTED + m.ready_for_query(b"E"))
    assert session._prepared == {} and session._portals == {}
    assert session._pending_statements == {} and session._pending_portals == {}


def test_a_refused_redefinition_keeps_what_postgres_kept() -> None:
    session, _, _, sink = sinked_session()
    prepare(session, "s1", "DELETE FROM victim WHERE x > 0")
    session.data_received(m.parse_message("s1", "SELECT 1") + m.sync())
    session._on_upstream_data(DUPLICATE + m.ready_for_query(b"I"))
    session.data_received(m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    # the refused Parse is recorded with its error (no Execute of it followed), then the
    # Execute of s1 runs what PostgreSQL kept
    refused, executed = [r for r in sink.records if r.event == "statement"]
    assert refused.sql_text == "SELECT 1"
    outcome = next(r for r in sink.records if r.event == "outcome")
    assert (outcome.statement_id, outcome.status, outcome.sqlstate) == (
        refused.statement_id,
        "error",
        "42P05",
    )
    assert (executed.kind, executed.sql_text) == ("write", "DELETE FROM victim WHERE x > 0")


def test_a_skipped_unnamed_parse_keeps_the_old_unnamed_statement() -> None:
    session, _, _, sink = sinked_session()
    prepare(session, "", "DELETE FROM victim WHERE x > 0")
    # An Execute fails; PostgreSQL skips the unnamed Parse after it, up to the Sync.
    session.data_received(
        m.bind_message("e", "", [])
        + m.execute_message("e")
        + m.parse_message("", "SELECT 1")
        + m.sync()
    )
    session._on_upstream_data(
        BOUND + m.error_response("ERROR", "22012", "x") + m.ready_for_query(b"I")
    )
    session.data_received(m.bind_message("", "", []) + m.execute_message("") + m.sync())
    kinds = [r.kind for r in sink.records if r.event == "statement"]
    assert kinds == ["write", "write"]  # the failed Execute, then the DELETE it really is


def test_a_failed_unnamed_parse_drops_the_old_unnamed_statement() -> None:
    session, _, _, _ = sinked_session()
    prepare(session, "", "SELECT 1")
    session.data_received(m.parse_message("", "SELECT * FROM missing") + m.sync())
    session._on_upstream_data(m.error_response("ERROR", "42P01", "x") + m.ready_for_query(b"I"))
    assert "" not in session._prepared


def test_a_redefinition_in_a_later_group_survives_the_earlier_failure() -> None:
    session, _, _, _ = sinked_session()
    session.data_received(
        m.parse_message("", "SELECT * FROM missing")
        + m.sync()
        + m.parse_message("", "SELECT 2")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
    )
    session._on_upstream_data(m.error_response("ERROR", "42P01", "x") + m.ready_for_query(b"I"))
    assert session._prepared[""][0].text == "SELECT 2"
    session._on_upstream_data(
        PARSED + BOUND + m.command_complete("SELECT 1") + m.ready_for_query(b"I")
    )
    assert session._prepared[""][0].text == "SELECT 2"


def test_pipelined_groups_that_parse_their_own_statement_never_wait() -> None:
    session, _, upstream, _ = sinked_session()
    unit = (
        m.parse_message("", "SELECT 1")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
    )
    session.data_received(unit * 50)
    assert upstream.written == unit * 50  # all forwarded at once


def test_a_bind_of_a_statement_still_being_prepared_in_an_earlier_group_waits() -> None:
    """If that Parse fails, PostgreSQL binds whatever the name meant before: wait and see."""
    session, client, upstream, sink = sinked_session()
    session.data_received(m.parse_message("s1", "SELECT 1") + m.sync())
    session.data_received(m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    assert upstream.written == m.parse_message("s1", "SELECT 1") + m.sync()
    assert not client.reading
    session._on_upstream_data(PARSED + m.ready_for_query(b"I"))
    assert upstream.written.endswith(
        m.bind_message("", "s1", []) + m.execute_message("") + m.sync()
    )
    assert client.reading
    assert [r.sql_text for r in sink.records if r.event == "statement"] == ["SELECT 1"]


def test_sql_prepare_refused_by_postgres_is_undone() -> None:
    session, _, _, sink = sinked_session()
    session.data_received(m.query("PREPARE d AS DELETE FROM victim WHERE x > 0"))
    session._on_upstream_data(m.command_complete("PREPARE") + m.ready_for_query(b"I"))
    session.data_received(m.query("PREPARE d AS SELECT 1"))
    session._on_upstream_data(DUPLICATE + m.ready_for_query(b"I"))
    session.data_received(m.query("EXECUTE d"))
    execute = [r for r in sink.records if r.event == "statement"][-1]
    assert (execute.command, execute.kind) == ("EXECUTE", "write")


def test_sql_execute_pipelined_behind_its_prepare_waits_for_it() -> None:
    session, _, upstream, sink = sinked_session()
    session.data_received(m.query("PREPARE d AS SELECT 1") + m.query("EXECUTE d"))
    assert upstream.written == m.query("PREPARE d AS SELECT 1")
    session._on_upstream_data(DUPLICATE + m.ready_for_query(b"I"))  # refused: d unknown
    assert upstream.written.endswith(REFUSED_AT_RUN)
    execute = [r for r in sink.records if r.event == "statement"][-1]
    assert (execute.command, execute.decision) == ("EXECUTE", "deny")


def test_non_ascii_sql_behind_a_pending_sync_waits_for_the_encoding() -> None:
    session, _, upstream, _ = sinked_session()
    session.data_received(
        m.query("SET client_encoding = 'LATIN1'") + m.query("SELECT 'é'", "latin-1")
    )
    assert upstream.written == m.query("SET client_encoding = 'LATIN1'")
    session._on_upstream_data(
        m.command_complete("SET")
        + m.parameter_status("client_encoding", "LATIN1")
        + m.ready_for_query(b"I")
    )
    assert upstream.written.endswith(m.query("SELECT 'é'", "latin-1"))  # forwarded as is


def test_non_ascii_sql_in_an_unsynced_pipeline_is_refused() -> None:
    session, _, upstream, sink = sinked_session()
    session.data_received(
        m.parse_message("", "SELECT 1")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.parse_message("", "SELECT 'é'")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
    )
    assert [kind for kind, _ in frames(upstream.written)] == [
        b"P",
        b"B",
        b"E",
        b"P",
        b"S",
    ]  # poison, then Sync
    denied = [r for r in sink.records if r.decision == "deny"]
    assert [r.rule for r in denied] == ["guard.unparseable"]
    assert "send Sync first" in denied[0].reason


def test_everything_but_turning_it_on_is_refused_while_strings_are_not_conforming() -> None:
    """A function body or SQL text is read with the setting in force when it runs: so nothing
    can be checked while standard_conforming_strings is off, backslash or not."""
    session, _, upstream, sink = sinked_session()
    session._on_upstream_data(m.parameter_status("standard_conforming_strings", "off"))
    for sql in ("SELECT 'x\\'' ; SET ROLE r; -- '", "SELECT my_function()"):
        upstream.written.clear()
        session.data_received(m.query(sql))
        assert upstream.written == m.query("DBWARD_POLICY_DENIED")
        session._on_upstream_data(m.error_response("ERROR", "42601", "x") + m.ready_for_query(b"I"))
    upstream.written.clear()
    session.data_received(m.query("SET standard_conforming_strings = on"))
    assert upstream.written == m.query("SET standard_conforming_strings = on")
    session._on_upstream_data(
        m.command_complete("SET")
        + m.parameter_status("standard_conforming_strings", "on")
        + m.ready_for_query(b"I")
    )
    upstream.written.clear()
    session.data_received(m.query("SELECT 'a\\b'"))
    assert upstream.written == m.query("SELECT 'a\\b'")
    denied = [r for r in sink.records if r.decision == "deny"]
    assert len(denied) == 2
    assert all("standard_conforming_strings is off" in r.reason for r in denied)


# Found in review: identity of cached classification tuples, Close, SQL PREPARE and protocol
# Parse sharing one namespace, COPY state, and the reply limit after an error.
CLOSED = m._frame(b"3", b"")
DIV0 = m.error_response("ERROR", "22012", "division by zero")
DELETE = "DELETE FROM victim WHERE x > 0"


def _executed(sink: MemorySink) -> list[tuple[str, str]]:
    return [(r.kind, r.sql_text) for r in sink.records if r.event == "statement"]


def test_a_skipped_parse_then_the_same_text_parsed_again_keeps_the_second() -> None:
    """The same text gives the same cached tuple: settling must not compare meanings."""
    session, _, _, sink = sinked_session()
    prepare(session, "", "SELECT 1")
    session.data_received(
        m.parse_message("z", "SELECT 1/0")
        + m.bind_message("e", "z", [])
        + m.execute_message("e")
        + m.parse_message("", DELETE)  # skipped by PostgreSQL after the error
        + m.sync()
        + m.parse_message("", DELETE)  # accepted
        + m.sync()
    )
    session._on_upstream_data(
        PARSED + BOUND + DIV0 + m.ready_for_query(b"I") + PARSED + m.ready_for_query(b"I")
    )
    session.data_received(m.bind_message("", "", []) + m.execute_message("") + m.sync())
    assert _executed(sink)[-1] == ("write", DELETE)


def test_a_refused_parse_then_close_and_parse_again_keeps_the_new_one() -> None:
    session, _, _, sink = sinked_session()
    prepare(session, "s1", "SELECT 1")
    session.data_received(
        m.parse_message("s1", DELETE)  # refused: s1 exists
        + m.sync()
        + m.close_message("S", "s1")
        + m.parse_message("s1", DELETE)
        + m.sync()
    )
    session._on_upstream_data(
        DUPLICATE + m.ready_for_query(b"I") + CLOSED + PARSED + m.ready_for_query(b"I")
    )
    session.data_received(m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    assert _executed(sink)[-1] == ("write", DELETE)


def test_a_refused_sql_prepare_does_not_undo_a_later_protocol_definition() -> None:
    session, _, _, sink = sinked_session()
    prepare(session, "s1", "SELECT 1")
    session.data_received(
        m.query("PREPARE s1 AS SELECT 2")  # refused: s1 exists
        + m.close_message("S", "s1")
        + m.parse_message("s1", DELETE)
        + m.sync()
    )
    session._on_upstream_data(
        DUPLICATE + m.ready_for_query(b"I") + CLOSED + PARSED + m.ready_for_query(b"I")
    )
    session.data_received(m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    assert _executed(sink)[-1] == ("write", DELETE)


def test_an_unrelated_error_before_a_copy_starts_keeps_the_copy_syncs_in_step() -> None:
    session, _, _, _ = sinked_session()
    session.data_received(m.query("SELECT 1/0"))
    session.data_received(
        m.parse_message("", "COPY t FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
    )
    session._on_upstream_data(DIV0 + m.ready_for_query(b"I"))  # the Query's error
    session.data_received(m.sync())  # PostgreSQL ignores it: it is copying by then
    session._on_upstream_data(PARSED + BOUND + m._frame(b"G", b"\x00\x00\x00"))
    session.data_received(m.copy_data(b"1\n") + m.copy_done() + m.sync())
    # A Sync was dropped in the copy: the one after CopyDone waits for the copy's answer
    session._on_upstream_data(m.command_complete("COPY 1"))
    session._on_upstream_data(m.ready_for_query(b"I"))
    assert len(session._ops) == 0


def test_the_reply_limit_keeps_reading_while_postgres_discards_until_sync() -> None:
    """After an error PostgreSQL answers nothing until the client's Sync: it must be read."""
    session, client, _ = detached_session(MemorySink(), keep=False)
    feed(
        session,
        m.parse_message("", "SELECT 1/0")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.flush(),
    )
    session._on_upstream_data(PARSED + BOUND + DIV0)
    chunk = (m.bind_message("", "", []) + m.execute_message("")) * 1000
    for _ in range(60):  # 120,000 messages PostgreSQL discards
        feed(session, chunk)
    assert client.reading
    feed(session, m.sync())
    session._on_upstream_data(m.ready_for_query(b"I"))
    assert len(session._ops) == 0


# Third review: chains settled out of order, changes reported only at ReadyForQuery, Syncs in a
# failed COPY, Queries skipped in a failed group, WITH HOLD cursors and FETCH.


def test_a_refused_parse_and_a_skipped_close_do_not_undo_a_later_group() -> None:
    session, _, _, sink = sinked_session()
    prepare(session, "s", "SELECT 1")
    session.data_received(
        m.parse_message("s", "SELECT 2")  # refused: s exists
        + m.close_message("S", "s")  # skipped
        + m.sync()
        + m.close_message("S", "s")
        + m.parse_message("s", DELETE)
        + m.sync()
    )
    session._on_upstream_data(
        DUPLICATE + m.ready_for_query(b"I") + CLOSED + PARSED + m.ready_for_query(b"I")
    )
    session.data_received(m.bind_message("", "s", []) + m.execute_message("") + m.sync())
    assert _executed(sink)[-1] == ("write", DELETE)


def test_text_after_an_execute_answered_on_flush_waits_for_the_settings_report() -> None:
    """PostgreSQL reports a changed client_encoding only at ReadyForQuery, not on Flush."""
    session, _, upstream, sink = sinked_session()
    session.data_received(
        m.parse_message("", "SET client_encoding = 'GBK'")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.flush()
    )
    session._on_upstream_data(PARSED + BOUND + m.command_complete("SET"))
    assert not session._ops  # everything answered, nothing reported yet
    upstream.written.clear()
    session.data_received(m._frame(b"Q", b"SELECT E'\xe4\xb8\xad\\' ; SET ROLE r; --'\x00"))
    assert upstream.written == m.query("DBWARD_POLICY_DENIED")  # no Sync owed: refused
    denied = [r for r in sink.records if r.decision == "deny"]
    assert "send Sync first" in denied[-1].reason


@pytest.mark.parametrize("message", [m.parse_message("", "SELECT 1"), m.query("SELECT 1")])
def test_other_messages_during_an_active_copy_end_the_session(message: bytes) -> None:
    """PostgreSQL ends the session for SQL it reads while copying, but runs it once a bad row
    ended the copy: nothing tells which, so no guess is made (no driver sends one). A Sync is
    forwarded (see test_relay_copy.py)."""
    session, client, _, _ = sinked_session()
    session.data_received(m.query("COPY t FROM STDIN"))
    session._on_upstream_data(m._frame(b"G", b"\x00\x00\x00"))
    session.data_received(m.copy_data(b"1\n") + m.sync() + message)
    kind, payload = frames(client.written)[-1]  # the last message: dbward's FATAL
    assert kind == b"E"
    fields = m.parse_error_fields(payload)
    assert fields["S"] == "FATAL" and "during COPY FROM STDIN" in fields["M"]


def test_a_query_skipped_in_a_failed_group_owes_no_ready_for_query() -> None:
    session, _, _, _ = sinked_session()
    session.data_received(
        m.parse_message("", "SELECT 1/0")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.query("SELECT 1")  # PostgreSQL ignores it while it skips to Sync
        + m.sync()
    )
    session._on_upstream_data(PARSED + BOUND + DIV0 + m.ready_for_query(b"I"))
    assert len(session._ops) == 0


def test_a_with_hold_cursor_outlives_its_transaction_and_fetch_is_its_query() -> None:
    session, _, _, sink = sinked_session()
    session.data_received(m.query("DECLARE c CURSOR WITH HOLD FOR SELECT x FROM secret_notes"))
    session._on_upstream_data(m.command_complete("DECLARE CURSOR") + m.ready_for_query(b"I"))
    assert "c" in session._portals
    session.data_received(m.query("FETCH 5 FROM c"))
    fetch = [r for r in sink.records if r.event == "statement"][-1]
    assert (fetch.command, fetch.tables) == ("FETCH", ("secret_notes",))
    session.data_received(m.execute_message("c") + m.sync())  # and Execute by name, too
    execute = [r for r in sink.records if r.event == "statement"][-1]
    assert execute.tables == ("secret_notes",)


def test_with_hold_cursors_are_not_walked_again_at_every_idle_ready_for_query() -> None:
    """Fourth review: 100,000 WITH HOLD cursors cost 42 ms of the shared loop per statement."""
    session, _, _ = detached_session(MemorySink(), keep=False)
    declares = "; ".join(f"DECLARE c{i} CURSOR WITH HOLD FOR SELECT {i}" for i in range(200))
    for batch in range(100):  # 20,000 holdable cursors
        session.data_received(m.query(declares.replace("DECLARE c", f"DECLARE b{batch}c")))
        session._on_upstream_data(
            m.command_complete("DECLARE CURSOR") * 200 + m.ready_for_query(b"I")
        )
    assert len(session._portals) == 20_000
    session._portals = _NotWalked(session._portals)
    for _ in range(100):
        session.data_received(_bind_execute_sync())
        session._on_upstream_data(PARSED + BOUND + m.command_complete("SELECT 1"))
        session._on_upstream_data(m.ready_for_query(b"I"))
    assert len(session._portals) == 20_000  # the bound portal is gone, the cursors are not


class _NotWalked(dict[str, Any]):
    """A portal map that fails the test if something walks all of it."""

    def items(self) -> Any:
        raise AssertionError("the whole portal map was walked")

    def __iter__(self) -> Any:
        raise AssertionError("the whole portal map was walked")


def _bind_execute_sync() -> bytes:
    return (
        m.parse_message("", "SELECT 1")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
    )


# Fifth review: a merged record lost to a full backlog, FETCH of a cursor declared in the same
# string, and the first intents of a batch refused half-way.


class _FullAfterHold(MemorySink):
    """Holds records like the process sink; `append` refuses (the backlog filled up)."""

    def __init__(self, refuse_holds_after: int | None = None) -> None:
        super().__init__()
        self.released: list[Any] = []
        self.holds = 0
        self.refuse_holds_after = refuse_holds_after

    def hold(self, record: Any) -> HeldRecord:
        self.holds += 1
        if self.refuse_holds_after is not None and self.holds > self.refuse_holds_after:
            raise AuditUnavailable("backlog full")
        return HeldRecord(record)

    def append(self, record: Any) -> None:
        raise AuditUnavailable("backlog full")

    def release(self, held: HeldRecord) -> None:
        record = held.take_back()
        if record is not None:
            self.released.append(record)


def test_a_statements_merged_record_is_not_lost_when_the_backlog_fills_up() -> None:
    sink = _FullAfterHold()
    session, _, _ = detached_session(sink)
    session.data_received(m.query("DELETE FROM victim WHERE x > 0"))
    session._on_upstream_data(m.command_complete("DELETE 3") + m.ready_for_query(b"I"))
    (record,) = sink.released
    assert (record.command, record.status, record.rows) == ("DELETE", "ok", 3)


def test_a_batch_refused_half_way_logs_none_of_its_statements_as_allowed() -> None:
    sink = _FullAfterHold(refuse_holds_after=1)
    session, _, upstream = detached_session(sink)
    session.data_received(m.query("SELECT 1; SELECT 2"))
    assert upstream.written == REFUSED_AT_RUN
    session._on_upstream_data(m.error_response("ERROR", "42601", "x") + m.ready_for_query(b"I"))
    session._release_held()
    assert sink.released == []  # the first statement's intent was taken back
    assert session._held_intents == {}


def test_fetch_of_a_cursor_declared_earlier_in_the_same_string_is_its_query() -> None:
    session, _, _, sink = sinked_session()
    session.data_received(m.query("DECLARE c CURSOR WITH HOLD FOR SELECT 1"))
    session._on_upstream_data(m.command_complete("DECLARE CURSOR") + m.ready_for_query(b"I"))
    session.data_received(
        m.query("CLOSE c; DECLARE c CURSOR WITH HOLD FOR SELECT * FROM secret_notes; FETCH ALL c")
    )
    fetch = [r for r in sink.records if r.event == "statement"][-1]
    assert (fetch.command, fetch.tables) == ("FETCH", ("secret_notes",))


# Sixth review: a second COPY in one Query, FATAL mid-pipeline, a client gone while its
# statement waits for a durable intent.


def test_a_second_copy_in_one_query_is_a_copy_too() -> None:
    session, client, _, _ = sinked_session()
    session.data_received(m.query("COPY a FROM STDIN; COPY b FROM STDIN"))
    session._on_upstream_data(m._frame(b"G", b"\x00\x00\x00"))
    session.data_received(m.copy_data(b"1\n") + m.copy_done())
    session._on_upstream_data(m.command_complete("COPY 1") + m._frame(b"G", b"\x00\x00\x00"))
    session.data_received(m.copy_data(b"2\n") + m.sync())  # copying again: into the copy
    assert session._copy_syncs == 1
    session.data_received(m.parse_message("", "SELECT 1"))  # SQL in a copy: refused plainly
    kind, payload = frames(client.written)[-1]
    assert kind == b"E"
    fields = m.parse_error_fields(payload)
    assert fields["S"] == "FATAL" and "during COPY FROM STDIN" in fields["M"]


def test_a_fatal_mid_pipeline_fails_the_running_statement_and_skips_the_rest() -> None:
    session, _, _, sink = sinked_session()
    unit = m.bind_message("", "s", []) + m.execute_message("")
    session.data_received(m.parse_message("s", DELETE) + unit + unit + unit + m.sync())
    session._on_upstream_data(PARSED + BOUND)
    session._on_upstream_data(m.error_response("FATAL", "57P01", "terminating connection"))
    statuses = {r.statement_id: (r.status, r.sqlstate) for r in sink.records if r.status}
    assert statuses == {1: ("error", "57P01"), 2: ("not_executed", ""), 3: ("not_executed", "")}


def test_a_statement_still_waiting_for_its_durable_intent_was_never_executed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class _SlowDurable(MemorySink):
        def append_durable(self, record: Any) -> Any:
            self.append(record)
            return asyncio.get_event_loop_policy().get_event_loop().create_future()

    async def run() -> tuple[list[Any], list[bytes]]:
        sink = _SlowDurable()
        session, _, upstream = detached_session(sink)
        session.services.audit_settings = AuditSettings(durability="strict")
        session.data_received(m.query(DELETE))
        assert upstream.written == b""  # held until the intent is durable
        cancels: list[bytes] = []
        # On the class: a PgSession has slots, no instance dict to shadow a method in.
        monkeypatch.setattr(PgSession, "_cancel_upstream", lambda _: cancels.append(b"cancel"))
        session.connection_lost(None)
        return sink.records, cancels

    records, cancels = asyncio.run(run())
    (outcome,) = [r for r in records if r.status]
    assert outcome.status == "not_executed" and cancels == []


def test_an_eager_copy_ended_before_its_copy_in_response_is_over() -> None:
    """Query(COPY) + data + CopyDone in one write: the late CopyInResponse starts nothing the
    client is still in, so its next Query is an ordinary one (seventh review)."""
    session, client, upstream, sink = sinked_session()
    session.data_received(m.query("COPY c FROM STDIN") + m.copy_data(b"1\n") + m.copy_done())
    session._on_upstream_data(
        m._frame(b"G", b"\x00\x00\x00") + m.command_complete("COPY 1") + m.ready_for_query(b"I")
    )
    upstream.written.clear()
    session.data_received(m.query(DELETE))
    assert upstream.written == m.query(DELETE)
    session._on_upstream_data(m.command_complete("DELETE 3") + m.ready_for_query(b"I"))
    delete = [r for r in sink.records if r.command == "DELETE"][-1]
    assert (delete.status, delete.rows) == ("ok", 3)
    assert b"FATAL" not in bytes(client.written)


def test_an_earlier_querys_error_does_not_release_the_sync_behind_a_copy() -> None:
    """Only the COPY's own answer decides what the Sync sent after it means."""
    session, _, upstream, _ = sinked_session()
    session.data_received(
        m.query("SELECT 1/0")
        + m.parse_message("", "COPY t FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()  # waits: PostgreSQL will be copying when it reads it
    )
    upstream.written.clear()
    session._on_upstream_data(DIV0 + m.ready_for_query(b"I"))  # the Query's own error
    assert upstream.written == b""  # nothing released
    session._on_upstream_data(PARSED + BOUND + m._frame(b"G", b"\x00\x00\x00"))
    upstream.written.clear()
    session.data_received(m.copy_data(b"1\n") + m.copy_done() + m.sync())
    # The Sync dropped in the copy may yet be owed (a copy refused before reading anything):
    # the client's Sync waits for the copy's answer, which a Flush asks for.
    assert upstream.written == m.copy_data(b"1\n") + m.copy_done() + m.flush()
    session._on_upstream_data(m.command_complete("COPY 1"))
    assert upstream.written.endswith(m.flush() + m.sync())
    session._on_upstream_data(m.ready_for_query(b"I"))
    assert len(session._ops) == 0


def test_a_copy_failing_before_it_starts_gets_the_sync_sent_after_it() -> None:
    session, _, upstream, _ = sinked_session()
    session.data_received(
        m.parse_message("", "COPY missing FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
    )
    assert not upstream.written.endswith(m.sync())  # waits for the copy to be decided
    upstream.written.clear()
    session._on_upstream_data(m.error_response("ERROR", "42P01", "no such table"))
    assert upstream.written == m.sync()  # PostgreSQL skips to it
    session._on_upstream_data(m.ready_for_query(b"I"))
    assert len(session._ops) == 0


def test_sql_sent_before_a_copys_data_waits_for_the_copy_and_is_then_refused() -> None:
    """What follows a COPY FROM STDIN waits until PostgreSQL starts or refuses the copy: once
    it has started, SQL there is no copy data (PostgreSQL would end the session too). It hung
    when the SQL itself had to wait for quiet (non-ASCII text)."""
    session, client, upstream, _ = sinked_session()
    session.data_received(
        m.query("COPY t FROM STDIN") + m.query("SELECT 'é'") + m.copy_data(b"1\n") + m.copy_done()
    )
    assert upstream.written == m.query("COPY t FROM STDIN")  # the rest waits
    session._on_upstream_data(m._frame(b"G", b"\x00\x00\x00"))
    kind, payload = frames(client.written)[-1]
    assert kind == b"E"
    fields = m.parse_error_fields(payload)
    assert fields["S"] == "FATAL" and "during COPY FROM STDIN" in fields["M"]
    assert m.query("SELECT 'é'") not in upstream.written


def _error_on_flush(session: PgSession) -> None:
    """An Execute that fails, answered on a Flush: PostgreSQL now skips to the next Sync."""
    session.data_received(
        m.parse_message("", "SELECT 1/(random()*0)::int")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.flush()
    )
    session._on_upstream_data(PARSED + BOUND + DIV0)


def _flush_error_then_ignored_query(session: PgSession) -> None:
    """An error answered on a Flush; then a Query PostgreSQL skips (it skips to Sync)."""
    _error_on_flush(session)
    session.data_received(m.query("SELECT 2") + m.sync())  # PostgreSQL ignores the Query
    session._on_upstream_data(m.ready_for_query(b"I"))  # and answers only the Sync


def test_a_query_postgres_skips_after_a_flush_answered_error_owes_nothing() -> None:
    session, _, upstream, sink = sinked_session()
    _flush_error_then_ignored_query(session)
    assert len(session._ops) == 0
    assert m.query("SELECT 2") not in upstream.written  # dropped, as PostgreSQL would
    assert not [r for r in sink.records if r.sql_text == "SELECT 2"]


def test_the_reply_limit_reads_on_while_postgres_skips_to_the_sync() -> None:
    session, client, _ = detached_session(MemorySink(), keep=False)
    _flush_error_then_ignored_query(session)
    _error_on_flush(session)
    chunk = (m.bind_message("", "", []) + m.execute_message("")) * 1000
    for _ in range(60):  # 120,000 messages PostgreSQL discards until the client's Sync
        feed(session, chunk)
    assert client.reading  # PostgreSQL owes nothing until the Sync, so it must be read


def test_messages_after_a_copy_wait_until_the_copy_is_decided() -> None:
    session, _, upstream, _ = sinked_session()
    session.data_received(
        m.parse_message("", "COPY missing FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
        + m.query("SELECT 1")
    )
    assert m.query("SELECT 1") not in upstream.written  # parked behind the COPY
    upstream.written.clear()
    session._on_upstream_data(PARSED + BOUND + m.error_response("ERROR", "42P01", "no table"))
    assert upstream.written == m.sync() + m.query("SELECT 1")  # in the client's order
    session._on_upstream_data(m.ready_for_query(b"I"))
    session._on_upstream_data(m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
    assert len(session._ops) == 0


def test_a_failing_simple_query_copy_gets_the_sync_after_it_answered() -> None:
    session, client, upstream, _ = sinked_session()
    session.data_received(m.query("COPY missing FROM STDIN") + m.sync())
    upstream.written.clear()
    session._on_upstream_data(m.error_response("ERROR", "42P01", "no table"))
    assert upstream.written == m.sync()
    session._on_upstream_data(m.ready_for_query(b"I") + m.ready_for_query(b"I"))
    assert [kind for kind, _ in frames(client.written)][-3:] == [b"E", b"Z", b"Z"]
    assert len(session._ops) == 0


def test_fetch_leaves_the_cursor_defined() -> None:
    session, _, _, sink = sinked_session()
    session.data_received(m.query("BEGIN; DECLARE c CURSOR FOR SELECT x FROM notes"))
    session._on_upstream_data(
        m.command_complete("BEGIN") + m.command_complete("DECLARE CURSOR") + m.ready_for_query(b"T")
    )
    for _ in range(2):
        session.data_received(m.query("FETCH 1 FROM c"))
        session._on_upstream_data(m.command_complete("FETCH 1") + m.ready_for_query(b"T"))
    fetches = [r for r in sink.records if r.command == "FETCH" and r.event == "statement"]
    assert [f.tables for f in fetches] == [("notes",), ("notes",)]
    assert "c" in session._portals


def test_create_table_as_execute_is_decided_with_what_it_runs() -> None:
    """CREATE TABLE ... AS EXECUTE runs the prepared query (verified on PostgreSQL 15: it
    copied the table the query reads, and a data-modifying CTE in it deleted rows); its tables
    count, and a name dbward did not see prepared is refused as for EXECUTE (review round 18)."""
    session, _, upstream, sink = sinked_session()
    prepare(session, "s1", "SELECT * FROM secret")
    session.data_received(m.query("CREATE TABLE copied AS EXECUTE s1"))
    ctas = [r for r in sink.records if r.event == "statement"][-1]
    assert (ctas.command, ctas.kind, ctas.decision) == ("CREATE TABLE AS", "ddl", "allow")
    assert ctas.tables == ("copied", "secret")
    assert upstream.written.endswith(m.query("CREATE TABLE copied AS EXECUTE s1"))
    session._on_upstream_data(m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
    session.data_received(m.query("EXPLAIN ANALYZE CREATE TABLE c2 AS EXECUTE nobody"))
    refused = [r for r in sink.records if r.event == "statement"][-1]
    assert (refused.kind, refused.decision) == ("unknown", "deny")
    assert upstream.written.endswith(REFUSED_AT_RUN)
