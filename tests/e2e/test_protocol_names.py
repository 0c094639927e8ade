"""Statement and portal names PostgreSQL reads as one name, and the unnamed ones a simple Query
drops: through dbward, against a real PostgreSQL.

PostgreSQL keys prepared statements and portals by their first 63 bytes (NAMEDATALEN - 1):
"A"*63+"x" and "A"*63+"y" are one name to it. dbward's maps kept them apart, so a DELETE
prepared under one ran while dbward decided, and recorded, the SELECT prepared under the other.
Such names are refused now (guard.name_limit, 42622), and nothing of the sequence runs.
"""

from __future__ import annotations

import socket

from dbward.wire.postgres import messages as m
from fixtures.clients import app_name, has_disconnect, statements
from fixtures.drivers import outcomes_of
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession, direct_session, read_message, scratch_table

A63, B63 = "A" * 63, "B" * 63
Replies = list[tuple[bytes, bytes]]


def _direct(pg_server: PgServer, groups: list[bytes]) -> list[Replies]:
    """Each group's replies from PostgreSQL itself, up to its ReadyForQuery."""
    sock = direct_session(pg_server)
    try:
        return [_send(sock, group) for group in groups]
    finally:
        sock.close()


def _send(sock: socket.socket, data: bytes) -> Replies:
    sock.sendall(data)
    out = []
    while True:
        kind, payload = read_message(sock)
        out.append((kind, payload))
        if kind == b"Z":
            return out


def _shape(replies: Replies) -> list[str]:
    """Message types, with the SQLSTATE of errors (their routine and line fields aside)."""
    return [
        f"E {m.parse_error_fields(payload)['C']}" if kind == b"E" else kind.decode()
        for kind, payload in replies
        if kind != b"N"  # BEGIN inside a block warns only directly, and so on
    ]


def _records(proxy: Proxy, app: str) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    records = proxy.session_records(app, until=has_disconnect)
    return [(s.sql_text, s.decision, s.rule, outcomes_of(records, s)) for s in statements(records)]


REFUSED = ("deny", "guard.name_limit", [("denied", "42622")])


def test_statement_names_postgresql_cuts_to_one_are_refused(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """The review's sequence: Parse "A"*63+"x" as SELECT, Close "A"*63+"y", Parse "A"*63+"y" as
    a DELETE, Bind and Execute "A"*63+"x". PostgreSQL runs the DELETE; dbward recorded the
    SELECT (kind read, ok)."""

    def groups(table: str) -> list[bytes]:
        return [
            m.parse_message(A63 + "x", "SELECT 1") + m.sync(),
            m.close_message("S", A63 + "y") + m.sync(),
            m.parse_message(A63 + "y", f"DELETE FROM {table} WHERE x = 3 RETURNING x") + m.sync(),
            m.bind_message("p", A63 + "x", []) + m.execute_message("p") + m.sync(),
        ]

    table = scratch_table(pg_server, "r48_cut", "(1), (2), (3)")
    direct = _direct(pg_server, groups(table))
    assert _shape(direct[3]) == ["2", "D", "C", "Z"]  # PostgreSQL ran the DELETE
    assert pg_server.psql(f"SELECT count(*) FROM {table}").strip() == "2"

    table = scratch_table(pg_server, "r48_cut", "(1), (2), (3)")
    app = app_name("r48-cut-statement")
    session = RawSession(proxy, app)
    try:
        for group in groups(table):
            assert _shape(session.send(group)) == ["E 42622", "Z"]
        assert _shape(session.query("SELECT 1")) == ["T", "D", "C", "Z"]
    finally:
        session.close()
    assert pg_server.psql(f"SELECT count(*) FROM {table}").strip() == "3"
    assert _records(proxy, app) == [
        ("SELECT 1", *REFUSED),
        (f"DELETE FROM {table} WHERE x = 3 RETURNING x", *REFUSED),
        ("", *REFUSED),  # the Bind: its statement's name is never looked up
        ("SELECT 1", "allow", "default.allow", [("ok", "")]),
    ]


def test_portal_names_postgresql_cuts_to_one_are_refused_and_nothing_commits(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """The portal version, in a transaction block that COMMIT then committed: the DELETE
    bound to "B"*63+"y" ran at the Execute of "B"*63+"x" (bound to SELECT 1)."""

    def groups(table: str) -> list[bytes]:
        return [
            m.query("BEGIN"),
            m.parse_message("s_read", "SELECT 1")
            + m.parse_message("s_del", f"DELETE FROM {table} WHERE x = 2 RETURNING x")
            + m.sync(),
            m.bind_message(B63 + "x", "s_read", []) + m.sync(),
            m.close_message("P", B63 + "y") + m.sync(),
            m.bind_message(B63 + "y", "s_del", []) + m.sync(),
            m.execute_message(B63 + "x") + m.sync(),
            m.query("COMMIT"),
        ]

    table = scratch_table(pg_server, "r48_cut", "(1), (2), (3)")
    direct = _direct(pg_server, groups(table))
    assert _shape(direct[5]) == ["D", "C", "Z"] and direct[6][0][1] == b"COMMIT\x00"
    assert pg_server.psql(f"SELECT count(*) FROM {table}").strip() == "2"

    table = scratch_table(pg_server, "r48_cut", "(1), (2), (3)")
    app = app_name("r48-cut-portal")
    session = RawSession(proxy, app)
    try:
        replies = [session.send(group) for group in groups(table)]
    finally:
        session.close()
    assert [_shape(r) for r in replies] == [
        ["C", "Z"],
        ["1", "1", "Z"],
        *[["E 42622", "Z"]] * 4,  # the first refusal aborted the block
        ["C", "Z"],
    ]
    assert replies[6][0][1] == b"ROLLBACK\x00"  # COMMIT of a failed block
    assert pg_server.psql(f"SELECT count(*) FROM {table}").strip() == "3"
    assert _records(proxy, app) == [
        ("BEGIN", "allow", "default.allow", [("ok", "")]),
        ("SELECT 1", *REFUSED),  # each Bind as the statement it binds
        (f"DELETE FROM {table} WHERE x = 2 RETURNING x", *REFUSED),
        ("", *REFUSED),  # the Execute
        ("COMMIT", "allow", "default.allow", [("rolled_back", "")]),
    ]


def test_the_unnamed_portal_and_statement_after_a_query_are_postgresqls(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """A simple Query runs its statements in the unnamed portal (and drops it after each one
    that succeeds) and drops the unnamed statement as it starts: an Execute of the portal, or
    a Bind of the statement, bound and parsed before it gets 34000 or 26000 from PostgreSQL.
    dbward decided and recorded them as the SELECT bound before the Query."""
    portal = [
        m.query("BEGIN"),
        m.parse_message("", "SELECT 41 AS old") + m.bind_message("", "", []) + m.sync(),
        m.query("SELECT 2"),
        m.execute_message("") + m.sync(),
        m.query("ROLLBACK"),
    ]
    statement = [
        m.parse_message("", "SELECT 42 AS old") + m.sync(),
        m.query("SELECT 3"),
        m.bind_message("", "", []) + m.execute_message("") + m.sync(),
    ]
    direct = [_shape(r) for r in _direct(pg_server, portal + statement)]
    assert direct[3] == ["E 34000", "Z"] and direct[7] == ["E 26000", "Z"]
    app = app_name("r48-unnamed")
    session = RawSession(proxy, app)
    try:
        proxied = [_shape(session.send(group)) for group in portal + statement]
    finally:
        session.close()
    assert proxied == direct
    texts = [text for text, _, _, _ in _records(proxy, app)]
    assert not any("AS old" in text for text in texts), texts
    # Neither the Execute nor the Bind ran, and neither is recorded (round 51: the Bind's
    # Execute was recorded as refused while the client got PostgreSQL's 26000).
    assert texts == ["BEGIN", "SELECT 2", "ROLLBACK", "SELECT 3"], texts
