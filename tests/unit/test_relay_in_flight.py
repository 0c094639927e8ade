"""A client that pipelines without reading is paused, so one session's memory stays bounded."""

from __future__ import annotations

import time

from dbward.audit.sink import MemorySink
from dbward.relay import postgres as relay
from dbward.wire.postgres import messages as m
from fixtures.detached import detached_session, feed

UNIT = m.parse_message("", "SELECT 1") + m.bind_message("", "", []) + m.execute_message("")
UNIT += m.sync()  # four replies owed per unit
REPLIES = m._frame(b"1", b"") + m._frame(b"2", b"") + m.command_complete("SELECT 1")
REPLIES += m.ready_for_query(b"I")


def test_reading_stops_at_the_in_flight_limit_and_resumes_below_the_low_mark() -> None:
    session, client, _ = detached_session(MemorySink(), keep=False)
    units_to_limit = relay.MAX_REPLIES_IN_FLIGHT // 4
    sent = 0
    while client.reading:
        feed(session, UNIT * 1000)  # one read's worth of pipelined statements
        sent += 1000
        assert sent <= units_to_limit + 1000, "never paused"
    assert relay.MAX_REPLIES_IN_FLIGHT < len(session._ops) <= relay.MAX_REPLIES_IN_FLIGHT + 4000
    # Answers arrive; reading resumes only once half of what is owed has been answered.
    answered = 0
    while not client.reading:
        session._on_upstream_data(REPLIES * 1000)
        answered += 1000
        assert answered <= sent
    assert len(session._ops) <= relay.MAX_REPLIES_IN_FLIGHT // 2
    assert len(session._ops) > relay.MAX_REPLIES_IN_FLIGHT // 2 - 4000
    session._on_upstream_data(REPLIES * (sent - answered))
    assert len(session._ops) == 0 and client.reading


def test_an_audit_wait_does_not_resume_reading_while_replies_are_owed() -> None:
    session, client, _ = detached_session(MemorySink(), keep=False)
    while client.reading:
        feed(session, UNIT * 1000)
    session._resume_client()  # the upstream drained its write buffer: still too much owed
    assert not client.reading
    session._client_paused_for_upstream = True
    session._replies_drained()  # and the reverse: the upstream is still backed up
    assert not client.reading


# Found in review: a pipeline without any Sync was exempt from the limit (a client that never
# read made one session hold 400 MB), and answering many statements in order was quadratic.
BIND_EXECUTE = m.bind_message("", "", []) + m.execute_message("")
EXECUTED = m._frame(b"2", b"") + m.command_complete("SELECT 1")


def test_a_pipeline_without_sync_is_paused_at_the_limit_too() -> None:
    session, client, _ = detached_session(MemorySink(), keep=False)
    feed(session, m.parse_message("", "SELECT 1"))
    sent = 0
    while client.reading:
        feed(session, BIND_EXECUTE * 1000)
        sent += 1000
        assert sent <= relay.MAX_REPLIES_IN_FLIGHT, "never paused"
    # PostgreSQL answers as it goes (its output buffer fills, no Flush needed): reading
    # resumes below the low mark although no ReadyForQuery is owed.
    session._on_upstream_data(m._frame(b"1", b""))
    answered = 0
    while not client.reading:
        session._on_upstream_data(EXECUTED * 1000)
        answered += 1000
        assert answered <= sent
    assert len(session._ops) <= relay.MAX_REPLIES_IN_FLIGHT // 2


def test_an_error_in_a_pipeline_without_sync_resumes_reading() -> None:
    """PostgreSQL skips everything after the error until the client's Sync: read it."""
    session, client, _ = detached_session(MemorySink(), keep=False)
    feed(session, m.parse_message("", "SELECT 1"))
    for _ in range(relay.MAX_REPLIES_IN_FLIGHT // 2000 + 1):
        feed(session, BIND_EXECUTE * 1000)
    assert not client.reading
    session._on_upstream_data(m.error_response("ERROR", "42P01", "no such table"))
    assert len(session._ops) == 0 and client.reading
    feed(session, BIND_EXECUTE * 1000 + m.sync())  # dropped, as PostgreSQL drops them
    session._on_upstream_data(m.ready_for_query(b"I"))
    assert len(session._ops) == 0 and client.reading


def _answer_in_order_cpu_s(count: int) -> float:
    """CPU seconds the session takes to match `count` answers to the statements in flight."""
    session, _, _ = detached_session(MemorySink(), keep=False)
    feed(session, m.parse_message("", "SELECT 1"))
    for _ in range(count // 1000):
        feed(session, BIND_EXECUTE * 1000)  # the detached client ignores pausing
    replies = m._frame(b"1", b"") + EXECUTED * count
    started = time.process_time()
    session._on_upstream_data(replies)
    elapsed = time.process_time() - started
    assert len(session._ops) == 0
    return elapsed


def test_answering_many_statements_in_order_takes_linear_time() -> None:
    """Each outcome removed the oldest held intent and looked for the next oldest by iterating
    a dict past every entry deleted before it: 200,000 answers took ~7.5 s (and a session that
    left with 550,000 in flight stalled the event loop for 24 s); now well under a second.

    Judged by growth, not by a time limit (a loaded machine made a 3 s limit fail): 5 times the
    answers take about 5 times the CPU when linear, 25 times when quadratic."""
    small = min(_answer_in_order_cpu_s(20_000) for _ in range(2))
    large = _answer_in_order_cpu_s(100_000)
    assert large < 12 * small, f"20,000 answers: {small:.2f} s, 100,000: {large:.2f} s of CPU"


def test_records_of_a_long_statement_executed_again_share_one_cut_text() -> None:
    """Text longer than audit.sql_text_max is cut for the log. It was cut again for every
    record: a pipeline of 350,000 executions of a 32 KB statement (within the reply limit, the
    rest queued for the audit writer) grew dbward by 740 MB, 4 KB per record."""
    sink = MemorySink()
    session, _, _ = detached_session(sink, keep=False)
    text = "SELECT 1 /*" + "x" * 32_000 + "*/"
    feed(session, m.parse_message("s1", text))
    feed(session, (m.bind_message("", "s1", []) + m.execute_message("")) * 3)
    logged = [r.sql_text for r in sink.records if r.sql_text]
    assert len(logged) == 3  # one per Execute
    assert len(logged[0]) == session.services.audit_settings.sql_text_max
    assert all(cut is logged[0] for cut in logged)
