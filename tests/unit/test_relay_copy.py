"""COPY FROM STDIN around refusals and failed copies: replies stay in step (ninth review)."""

from __future__ import annotations

import asyncio
from typing import Any

from dbward.audit.sink import MemorySink
from dbward.config.model import AuditSettings
from dbward.core.errors import AuditUnavailable
from dbward.relay import postgres as relay
from dbward.wire.postgres import messages as m
from fixtures.detached import detached_session, frames


class _FailingDurable(MemorySink):
    """The writer cannot commit a durable intent: each strict write is refused."""

    def append_durable(self, record: Any) -> Any:
        self.append(record)
        future = asyncio.get_running_loop().create_future()
        future.set_exception(AuditUnavailable("writer down"))
        return future


def _run(data: bytes, replies: list[bytes]) -> tuple[list[bytes], bytes]:
    async def run() -> tuple[list[bytes], bytes]:
        session, client, upstream = detached_session(_FailingDurable())
        session.services.audit_settings = AuditSettings(durability="strict")
        session.data_received(data)
        for _ in range(5):
            await asyncio.sleep(0)  # the durable future's callback
        for reply in replies:
            session._on_upstream_data(reply)
            for _ in range(3):
                await asyncio.sleep(0)
        return [k.decode() for k, _ in frames(client.written)], bytes(upstream.written)

    return asyncio.run(run())


POISON_ERROR = m.error_response("ERROR", "42601", 'syntax error at or near "DBWARD_POLICY_DENIED"')
Z = m.ready_for_query(b"I")


def test_a_copy_refused_for_the_audit_log_still_answers_the_sync_after_it() -> None:
    """Query(COPY t FROM STDIN) + Sync + Query(SELECT 1), the COPY's intent cannot be made
    durable: dbward refuses the COPY (a poison Query upstream). PostgreSQL would answer the
    refused Query (E, Z), the Sync (Z) and SELECT 1 (T, D, C, Z)."""
    kinds, upstream = _run(
        m.query("COPY t FROM STDIN") + m.sync() + m.query("SELECT 1"),
        [
            POISON_ERROR + Z,  # the poison Query
            Z,  # the Sync, if it was sent
            m._frame(b"T", b"\x00\x00") + m.command_complete("SELECT 1") + Z,
        ],
    )
    assert upstream.count(m.sync()) == 1, upstream  # the client's Sync reached PostgreSQL
    assert kinds == ["E", "Z", "Z", "T", "C", "Z"]


def test_an_extended_copy_refused_for_the_audit_log_does_not_hold_a_later_sync() -> None:
    """P/B/E(COPY) + Sync, then P/B/E(SELECT 1) + Sync: the COPY is refused (audit down), yet
    dbward still counts it as an open COPY and holds the second Sync back for good."""
    kinds, upstream = _run(
        m.parse_message("", "COPY t FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
        + m.parse_message("", "SELECT 1")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync(),
        [
            m._frame(b"1", b"") + m._frame(b"2", b"") + POISON_ERROR + Z,
            m._frame(b"1", b"") + m._frame(b"2", b"") + m.command_complete("SELECT 1"),
            Z,
        ],
    )
    assert upstream.count(m.sync()) == 2, upstream
    assert kinds == ["1", "2", "E", "Z", "1", "2", "C", "Z"]


def test_a_copy_failing_mid_data_leaves_no_copy_open() -> None:
    """Extended COPY fails on a bad row, answered at once: PostgreSQL skips to the Sync (the
    CopyDone too). The next Sync was taken for one sent during the copy and ended the session."""
    session, client, upstream = _extended_copy_started()
    session.data_received(m.copy_data(b"bad\n") + m.flush())
    session._on_upstream_data(m.error_response("ERROR", "22P02", "invalid input syntax"))
    upstream.written.clear()
    session.data_received(
        m.copy_done()
        + m.sync()
        + m.parse_message("", "SELECT 1")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
    )
    assert b"FATAL" not in bytes(client.written)
    assert upstream.written.startswith(m.sync())  # the CopyDone was skipped, as upstream
    session._on_upstream_data(
        Z + m._frame(b"1", b"") + m._frame(b"2", b"") + m.command_complete("SELECT 1") + Z
    )
    assert len(session._ops) == 0


PROBE = m.sync() + m.close_message("P", relay._PROBE_PORTAL) + m.sync()
CLOSE_COMPLETE = m._frame(b"3", b"")


def _copy_failed_after_its_copy_in_response(sqlstate: str) -> tuple[bytes, Any, Any]:
    """libpq's PQsendQueryParams: Execute(COPY) + Sync; PostgreSQL starts the copy (the Sync
    goes into it), then the copy fails, before or after PostgreSQL read that Sync."""
    session, client, upstream = detached_session(MemorySink())
    session.data_received(
        m.parse_message("", "COPY v FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.sync()
    )
    session._on_upstream_data(
        m._frame(b"1", b"") + m._frame(b"2", b"") + m._frame(b"G", b"\x00\x00\x00")
    )
    assert bytes(upstream.written).endswith(m.sync())  # forwarded into the copy, no reply owed
    upstream.written.clear()
    session._on_upstream_data(m.error_response("ERROR", sqlstate, "the copy failed"))
    return bytes(upstream.written), session, client


def test_a_sync_sent_into_a_copy_refused_before_reading_it_is_answered() -> None:
    """A view, FREEZE, a statement trigger, a cancel during one: PostgreSQL answers the Sync
    after the error, then the probe's Sync, CloseComplete and Sync. The first goes on."""
    written, session, client = _copy_failed_after_its_copy_in_response("42809")
    assert written == PROBE  # how many of the copy's Syncs does PostgreSQL answer?
    session.data_received(m.query("SELECT 3"))  # waits for the probe
    assert bytes(session._upstream.transport.written) == written + m.flush()
    session._on_upstream_data(Z + Z + CLOSE_COMPLETE + Z)
    assert bytes(session._upstream.transport.written).endswith(m.query("SELECT 3"))
    session._on_upstream_data(m.command_complete("SELECT 1") + Z)
    assert [k.decode() for k, _ in frames(client.written)][-4:] == ["E", "Z", "C", "Z"]
    assert len(session._ops) == 0


def test_a_sync_postgres_read_before_the_copy_failed_stays_unanswered() -> None:
    """A cancel while PostgreSQL waited for data, a bad row, CopyFail: PostgreSQL had read and
    ignored the Sync and now skips to the client's next one, as dbward does."""
    written, session, client = _copy_failed_after_its_copy_in_response("57014")
    assert written == PROBE
    session._on_upstream_data(Z + CLOSE_COMPLETE + Z)
    assert session._discard_until_sync
    session._upstream.transport.written.clear()
    session.data_received(m.copy_done() + m.query("SELECT 2") + m.sync() + m.query("SELECT 3"))
    assert bytes(session._upstream.transport.written) == m.sync() + m.query("SELECT 3")
    session._on_upstream_data(Z + m.command_complete("SELECT 1") + Z)
    assert [k.decode() for k, _ in frames(client.written)][-4:] == ["E", "Z", "C", "Z"]
    assert len(session._ops) == 0


def test_a_simple_query_copy_refused_before_reading_its_sync() -> None:
    """Query(COPY) + Sync + data: the Query's ReadyForQuery comes first, then the Sync's."""
    session, client, upstream = detached_session(MemorySink())
    session.data_received(m.query("COPY v FROM STDIN") + m.sync() + m.copy_data(b"1\n"))
    session._on_upstream_data(m._frame(b"G", b"\x00\x00\x00"))
    upstream.written.clear()
    session.data_received(m.copy_done() + m.query("SELECT 3"))
    session._on_upstream_data(m.error_response("ERROR", "P0001", "no copies") + Z)
    assert bytes(upstream.written) == m.copy_done() + m.flush() + PROBE
    session._on_upstream_data(Z + Z + CLOSE_COMPLETE + Z)
    assert bytes(upstream.written).endswith(PROBE + m.query("SELECT 3"))
    session._on_upstream_data(m.command_complete("SELECT 1") + Z)
    assert [k.decode() for k, _ in frames(client.written)] == ["G", "E", "Z", "Z", "C", "Z"]
    assert len(session._ops) == 0


def test_an_error_answering_the_probe_ends_the_session() -> None:
    """Neither a Sync nor the Close of a portal can fail: replies would be out of step."""
    _, session, client = _copy_failed_after_its_copy_in_response("42809")
    session._on_upstream_data(Z + m.error_response("ERROR", "XX000", "impossible"))
    assert b"FATAL" in bytes(client.written)


def _extended_copy_started() -> tuple[Any, Any, Any]:
    """Execute(COPY t FROM STDIN) and a Flush; PostgreSQL has started the copy."""
    session, client, upstream = detached_session(MemorySink())
    session.data_received(
        m.parse_message("", "COPY t FROM STDIN")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + m.flush()
    )
    session._on_upstream_data(
        m._frame(b"1", b"") + m._frame(b"2", b"") + m._frame(b"G", b"\x00\x00\x00")
    )
    upstream.written.clear()
    return session, client, upstream


def test_syncs_among_and_after_copy_data_go_into_the_copy() -> None:
    """PostgreSQL ignores a Sync it reads while copying, wherever it is among the data, and
    answers one it reads after the copy failed: dbward ended the session for any Sync sent
    after the first CopyData. Here the copy fails after PostgreSQL read the first Sync, before
    it read the other two: they are answered, the probe's replies are not."""
    session, client, upstream = _extended_copy_started()
    data = m.copy_data(b"1\n") + m.sync() + m.copy_data(b"x\n") + m.sync() + m.sync()
    session.data_received(data)
    assert bytes(upstream.written) == data  # all of it into the copy, no reply owed
    assert session._copy_syncs == 3 and b"FATAL" not in bytes(client.written)
    upstream.written.clear()
    session._on_upstream_data(m.error_response("ERROR", "22P02", "invalid input syntax"))
    assert bytes(upstream.written) == PROBE
    session.data_received(m.copy_done() + m.sync() + m.query("SELECT 1"))  # waits for the probe
    assert bytes(upstream.written) == PROBE + m.copy_done() + m.flush()
    session._on_upstream_data(Z + Z + Z + CLOSE_COMPLETE + Z)
    assert bytes(upstream.written).endswith(m.sync() + m.query("SELECT 1"))
    session._on_upstream_data(Z + m.command_complete("SELECT 1") + Z)
    assert [k.decode() for k, _ in frames(client.written)][3:] == ["E", "Z", "Z", "Z", "C", "Z"]
    assert len(session._ops) == 0 and not session._discard_until_sync


def test_a_copy_that_succeeds_ignores_the_syncs_among_its_data() -> None:
    session, client, upstream = _extended_copy_started()
    session.data_received(
        m.copy_data(b"1\n") + m.sync() + m.copy_data(b"2\n") + m.copy_done() + m.sync()
    )
    assert bytes(upstream.written).endswith(m.copy_done() + m.flush())  # the Sync waits
    session._on_upstream_data(m.command_complete("COPY 2"))
    assert bytes(upstream.written).endswith(m.flush() + m.sync())
    session._on_upstream_data(Z)
    assert [k.decode() for k, _ in frames(client.written)][3:] == ["C", "Z"]
    assert len(session._ops) == 0


def test_the_probe_passes_on_many_answered_syncs_without_keeping_them() -> None:
    """Each ReadyForQuery answering a client's Sync goes on as the next one arrives: none is
    kept until the CloseComplete (a client may send any number of Syncs into a copy). Here
    before any data, and the copy refused before PostgreSQL read them (a statement trigger)."""
    session, client, _ = _extended_copy_started()
    session.data_received(m.sync() * 1000)
    session._on_upstream_data(m.error_response("ERROR", "P0001", "no copies"))
    client.written.clear()
    session._on_upstream_data(Z * 1000)
    assert len(frames(client.written)) == 999  # the last may be the probe's own
    probe = session._ops[0]
    assert isinstance(probe, relay._CopyProbe) and probe.answered == 999
    session._on_upstream_data(Z + CLOSE_COMPLETE + Z)
    assert [k for k, _ in frames(client.written)] == [b"Z"] * 1000
    assert len(session._ops) == 0


def test_more_answers_than_syncs_sent_into_the_copy_end_the_session() -> None:
    """Replies would be out of step: PostgreSQL cannot answer a Sync dbward did not send."""
    session, client, _ = _extended_copy_started()
    session.data_received(m.copy_data(b"x\n") + m.sync())
    session._on_upstream_data(m.error_response("ERROR", "22P02", "invalid input syntax"))
    session._on_upstream_data(Z + Z + Z)
    assert b"FATAL" in bytes(client.written)
