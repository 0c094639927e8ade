"""A denied statement is refused at Parse: its text never reaches PostgreSQL (bytes in/out)."""

from __future__ import annotations

from dbward.audit.sink import MemorySink
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import RecordingTransport, detached_session, frames

DENIED_SQL = "SELECT pg_read_file(path) FROM secret_paths"
SYNTAX_ERROR = m.error_response("ERROR", "42601", 'syntax error at or near "DBWARD_POLICY_DENIED"')


def _session() -> tuple[PgSession, RecordingTransport, RecordingTransport, MemorySink]:
    sink = MemorySink()
    session, client, upstream = detached_session(sink)
    return session, client, upstream, sink


def _pipeline(name: str, sql: str) -> bytes:
    return (
        m.parse_message(name, sql)
        + m.describe_message("S", name)
        + m.bind_message("", name, [])
        + m.execute_message("")
        + m.sync()
    )


def test_denied_parse_is_never_forwarded_and_the_pipeline_skips_to_sync() -> None:
    session, client, upstream, sink = _session()
    session.data_received(_pipeline("s1", DENIED_SQL))
    sent = bytes(upstream.written)
    assert b"secret_paths" not in sent  # no Parse, no Describe: no schema answer to leak
    assert [kind for kind, _ in frames(sent)] == [b"P", b"S"]
    assert "s1" not in session._prepared
    # PostgreSQL fails the substitute; the client sees dbward's denial in its place.
    session._on_upstream_data(SYNTAX_ERROR + m.ready_for_query(b"I"))
    replies = frames(bytes(client.written))
    assert [kind for kind, _ in replies] == [b"E", b"Z"]
    fields = m.parse_error_fields(replies[0][1])
    assert fields["C"] == "42501" and fields["M"].startswith("dbward:")
    assert session._ops == type(session._ops)()
    (intent,) = [r for r in sink.records if r.event == "statement"]
    assert (intent.decision, intent.rule, intent.path) == ("deny", "guard.server_file", "extended")
    assert intent.status == "denied" or any(
        r.event == "outcome" and r.status == "denied" for r in sink.records
    )


def test_the_session_runs_the_next_statement_after_a_denied_parse() -> None:
    session, client, upstream, _ = _session()
    session.data_received(_pipeline("s1", DENIED_SQL))
    session._on_upstream_data(SYNTAX_ERROR + m.ready_for_query(b"I"))
    upstream.written.clear()
    client.written.clear()
    session.data_received(_pipeline("s2", "SELECT 1"))
    assert upstream.written == _pipeline("s2", "SELECT 1")  # forwarded as sent
    assert "s2" in session._prepared


def test_denied_unnamed_parse_drops_the_unnamed_statement_like_postgres() -> None:
    """PostgreSQL drops the unnamed statement at any Parse of it, even one that fails."""
    session, _, upstream, _ = _session()
    session.data_received(m.parse_message("", "SELECT 1") + m.sync())
    session._on_upstream_data(m._frame(b"1", b"") + m.ready_for_query(b"I"))
    assert "" in session._prepared
    upstream.written.clear()
    session.data_received(m.parse_message("", "SET ROLE postgres") + m.sync())
    ((kind, body), _) = frames(bytes(upstream.written))
    assert kind == b"P" and body.startswith(b"\x00DBWARD_POLICY_DENIED\x00")  # unnamed poison
    assert "" not in session._prepared


def test_denied_named_parse_keeps_the_unnamed_statement() -> None:
    session, _, upstream, _ = _session()
    session.data_received(m.parse_message("", "SELECT 1") + m.sync())
    session._on_upstream_data(m._frame(b"1", b"") + m.ready_for_query(b"I"))
    upstream.written.clear()
    session.data_received(m.parse_message("s9", "SET ROLE postgres") + m.sync())
    ((kind, body), _) = frames(bytes(upstream.written))
    assert kind == b"P" and body.startswith(b"__dbward_denied__\x00")
    assert "" in session._prepared


def test_a_statement_allowed_at_parse_is_decided_again_at_execute() -> None:
    """The audit log failing between Parse and Execute refuses the Execute (fail closed)."""
    session, client, upstream, sink = _session()
    session.data_received(m.parse_message("s1", "SELECT 1") + m.sync())
    session._on_upstream_data(m._frame(b"1", b"") + m.ready_for_query(b"I"))
    upstream.written.clear()
    sink.fail = True
    session.data_received(m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    kinds = [kind for kind, _ in frames(bytes(upstream.written))]
    assert kinds == [b"B", b"P", b"S"]  # Bind, then the poison in place of the Execute
    session._on_upstream_data(m._frame(b"2", b"") + SYNTAX_ERROR + m.ready_for_query(b"I"))
    replies = frames(bytes(client.written))
    assert [kind for kind, _ in replies][-2:] == [b"E", b"Z"]
    assert m.parse_error_fields(replies[-2][1])["C"] == "58030"
