"""Session state PostgreSQL reads statements with, followed by dbward, so nothing is smuggled.

The string syntax (standard_conforming_strings), the client encoding and the prepared statements
a session holds all change how PostgreSQL reads what comes next; dbward must read it the same way
or refuse it. Each test smuggles a role switch (or hides a write) the way a reviewer did.
"""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import pq

from dbward.audit.records import AuditRecord
from dbward.wire.postgres import messages as m
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession, expect_fatal, read_message


@pytest.fixture
def switch_role(pg_server: PgServer) -> Iterator[str]:
    """A role the service user may SET ROLE to: what the smuggled statements try."""
    role = "dbward_target_" + uuid.uuid4().hex[:8]
    pg_server.psql(f"CREATE ROLE {role}; GRANT {role} TO {pg_server.service_user}")
    yield role
    pg_server.psql(f"DROP OWNED BY {role}; DROP ROLE {role}")


def _current_user(session: RawSession) -> bytes:
    rows = [p for kind, p in session.query("SELECT current_user") if kind == b"D"]
    return rows[0]


SMUGGLE = "SELECT 'x\\'' ; SET ROLE {role}; SELECT current_user; -- '"


def test_standard_conforming_strings_cannot_be_turned_off(proxy: Proxy, switch_role: str) -> None:
    # With standard_conforming_strings off PostgreSQL reads \' as a quote inside '...': the
    # smuggled text is one string constant to a parser that assumes on, and three statements
    # to such a server. So the setting cannot be turned off, by any of the ways to set it.
    app = app_name("scs-set")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        for change in (
            b"SET standard_conforming_strings = off",
            b"SELECT set_config('standard_conforming_strings', 'off', false)",
            b"CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql"
            b" SET standard_conforming_strings = off AS 'SELECT 1'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot be changed"):
                conn.execute(change, prepare=False)
        # Read with the setting on, as PostgreSQL still reads it: one harmless string.
        smuggled = SMUGGLE.format(role=switch_role)
        (row,) = conn.execute(smuggled.encode(), prepare=False).fetchall()
        assert row == (smuggled[len("SELECT '") : -1].replace("''", "'"),)
        assert conn.execute(b"SELECT current_user", prepare=False).fetchone() == (
            proxy.pg.service_user,
        )
    rules = [s.rule for s in statements(proxy.session_records(app, until=has_disconnect))]
    assert rules.count("guard.string_syntax") == 3


def test_strings_cannot_start_nonconforming_and_reset_cannot_bring_it_back(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """RESET, SET ... TO DEFAULT, RESET ALL and DISCARD ALL return to the login value: dbward
    pins it in the upstream options, over a role's or database's own default."""
    with pytest.raises(psycopg.OperationalError, match="is fixed to 'on'"):
        psycopg.connect(**proxy.conninfo(options="-c standard_conforming_strings=off"))
    user = pg_server.service_user
    pg_server.psql(f"ALTER ROLE {user} SET standard_conforming_strings = off", dbname="postgres")
    try:
        with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
            for reset in (
                b"RESET standard_conforming_strings",
                b"SET standard_conforming_strings TO DEFAULT",
                b"RESET ALL",
                b"DISCARD ALL",
            ):
                conn.execute(reset, prepare=False)
                show = conn.execute(b"SHOW standard_conforming_strings", prepare=False)
                assert show.fetchone() == ("on",), reset
    finally:
        pg_server.psql(f"ALTER ROLE {user} RESET standard_conforming_strings", dbname="postgres")


def test_updating_pg_settings_cannot_change_the_string_syntax(proxy: Proxy) -> None:
    """pg_settings' rule runs set_config for each row updated (any user may)."""
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot be changed"):
            conn.execute(
                b"UPDATE pg_settings SET setting = 'off'"
                b" WHERE name = 'standard_conforming_strings'",
                prepare=False,
            )
        # Refused whatever the WHERE says: which rows match cannot be read from the text.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot be changed"):
            conn.execute(
                b"UPDATE pg_settings SET setting = '8MB' WHERE name = 'work_mem'", prepare=False
            )
        show = conn.execute(b"SHOW standard_conforming_strings", prepare=False)
        assert show.fetchone() == ("on",)


def test_a_pipelined_encoding_switch_cannot_hide_statements(proxy: Proxy, switch_role: str) -> None:
    # In UTF-8 this is one E'' string ending in an escaped quote; in GBK the byte 0xAD takes
    # the backslash into a character, the quote ends the string and SET ROLE runs.
    smuggled = (
        b"SELECT E'\xe4\xb8\xad\\' ; SET ROLE "
        + switch_role.encode()
        + b"; SELECT current_user; --'\x00"
    )
    session = RawSession(proxy, app_name("enc-race"))
    try:
        session.sock.sendall(m.query("SET client_encoding = 'GBK'") + m._frame(b"Q", smuggled))
        session.read_until_ready()  # the SET
        replies = session.read_until_ready()  # read by dbward as GBK, as PostgreSQL reads it
        kinds = [kind for kind, _ in replies]
        assert kinds == [b"E", b"Z"]
        assert m.parse_error_fields(replies[0][1])["C"] == "42501"
        session.query("SET client_encoding = 'UTF8'")
        assert _current_user(session).endswith(proxy.pg.service_user.encode())
    finally:
        session.close()


def test_non_ascii_sql_in_a_pipeline_without_sync_is_refused_clearly(proxy: Proxy) -> None:
    session = RawSession(proxy, app_name("enc-unsynced"))
    try:
        replies = session.send(
            m.parse_message("", "SELECT 1")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.parse_message("", "SELECT 'é'")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()
        )
        assert [kind for kind, _ in replies] == [b"1", b"2", b"D", b"C", b"E", b"Z"]
        assert "send Sync first" in m.parse_error_fields(replies[4][1])["M"]
        # With a Sync in between the same text runs (it waits for the first group's answer).
        replies = session.send(
            m.parse_message("", "SELECT 1")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()
            + m.parse_message("", "SELECT 'é'")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()
        )
        assert [kind for kind, _ in replies] == [b"1", b"2", b"D", b"C", b"Z"]
        replies = session.read_until_ready()
        assert [kind for kind, _ in replies] == [b"1", b"2", b"D", b"C", b"Z"]
        assert replies[2][1].endswith("é".encode())
    finally:
        session.close()


def test_a_refused_parse_does_not_change_what_a_name_means(proxy: Proxy) -> None:
    app = app_name("stale-named")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE victim (x int); INSERT INTO victim VALUES (1), (2)")
        session.send(m.parse_message("s1", "DELETE FROM victim") + m.sync())
        replies = session.send(m.parse_message("s1", "SELECT 1") + m.sync())
        assert m.parse_error_fields(replies[0][1])["C"] == "42P05"  # PostgreSQL kept the DELETE
        session.send(m.bind_message("", "s1", []) + m.execute_message("") + m.sync())
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    executed = [s for s in statements(records) if s.path == "extended"][-1]
    assert (executed.sql_text, executed.kind) == ("DELETE FROM victim", "write")
    assert outcome_of(records, executed).rows == 2


def test_a_refused_sql_prepare_does_not_change_what_execute_runs(proxy: Proxy) -> None:
    app = app_name("stale-sql")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE victim3 (x int); INSERT INTO victim3 VALUES (1), (2)")
        session.query("PREPARE d AS DELETE FROM victim3")
        replies = session.query("PREPARE d AS SELECT 1")
        assert m.parse_error_fields(replies[0][1])["C"] == "42P05"
        session.query("EXECUTE d")
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    (execute,) = [s for s in statements(records) if s.sql_text == "EXECUTE d"]
    assert execute.kind == "write" and execute.tables == ("victim3",)
    assert outcome_of(records, execute).rows == 2


def test_execute_of_a_statement_prepared_behind_dbwards_back_is_refused(proxy: Proxy) -> None:
    """A prepared statement dbward never saw prepared (a DEALLOCATE ALL then one made by a
    function, say) cannot be inspected: its EXECUTE is refused, and the refusal says why — it
    said the statement "could not be parsed", which EXECUTE p is not."""
    session = RawSession(proxy, app_name("unseen-prepared"))
    try:
        replies = session.query("EXECUTE never_prepared_here")
        fields = m.parse_error_fields(next(p for k, p in replies if k == b"E"))
        assert fields["C"] == "42501"
        assert fields["M"] == (
            "dbward: statement could not be inspected and is refused (prepared statement "
            "<...> was not prepared through dbward)"
        )
        assert session.query("SELECT 1")[-1][0] == b"Z"  # the session goes on
    finally:
        session.close()


def test_sql_in_the_middle_of_copy_data_is_refused_plainly(proxy: Proxy) -> None:
    """PostgreSQL ends the session for SQL it reads while copying but runs it once a bad row
    ended the copy; dbward cannot tell which and would misattribute every later outcome, so it
    says so. A Sync there is forwarded: PostgreSQL ignores it while copying, as here (the
    differential tests in test_protocol_drift.py cover a failed copy)."""
    session = RawSession(proxy, app_name("copy-sync"))
    try:
        session.query("CREATE TEMP TABLE c2 (x int)")
        session.sock.sendall(m.query("COPY c2 FROM STDIN"))
        while read_message(session.sock)[0] != b"G":
            pass
        session.sock.sendall(m.copy_data(b"7\n") + m.sync() + m.copy_done())
        assert [kind for kind, _ in session.read_until_ready()] == [b"C", b"Z"]
        assert [kind for kind, _ in session.query("SELECT x FROM c2")] == [b"T", b"D", b"C", b"Z"]
        session.sock.sendall(m.query("COPY c2 FROM STDIN"))
        while read_message(session.sock)[0] != b"G":
            pass
        session.sock.sendall(m.copy_data(b"7\n") + m.query("SELECT 1") + m.copy_done())
        fields = expect_fatal(session.sock)
        assert "during COPY FROM STDIN" in fields["M"]
    finally:
        session.close()
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as other:  # others unaffected
        assert other.execute("SELECT 1").fetchone() == (1,)


def test_an_eager_extended_copy_keeps_the_sync_after_copy_done(proxy: Proxy) -> None:
    """Execute(COPY), Sync, data, CopyDone, Sync, then more, all sent before any answer."""
    app = app_name("copy-eager")
    session = RawSession(proxy, app)
    try:
        session.query(
            "CREATE TEMP TABLE c1 (x int); CREATE TEMP TABLE v1 (x int);"
            " INSERT INTO v1 VALUES (1), (2), (3)"
        )
        session.sock.sendall(
            m.parse_message("", "COPY c1 FROM STDIN")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()  # ignored by PostgreSQL: it is copying by then
            + m.copy_data(b"7\n")
            + m.copy_done()
            + m.sync()
            + m.parse_message("", "DELETE FROM v1")
            + m.bind_message("", "", [])
            + m.execute_message("")
            + m.sync()
        )
        session.read_until_ready()
        assert [kind for kind, _ in session.read_until_ready()] == [b"1", b"2", b"C", b"Z"]
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    (delete,) = [s for s in statements(records) if s.sql_text == "DELETE FROM v1"]
    assert (outcome_of(records, delete).status, outcome_of(records, delete).rows) == ("ok", 3)


def _libpq_pipeline(dsn: str, timeout: float = 10.0) -> list[str]:
    """Real libpq in pipeline mode: prepare, sync, then reuse it after another query."""
    conn = pq.PGconn.connect(dsn.encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    try:
        conn.enter_pipeline_mode()
        conn.send_prepare(b"s1", b"SELECT 1")
        conn.pipeline_sync()
        conn.send_query_params(b"SELECT 2", None)
        conn.send_query_prepared(b"s1", None)
        conn.pipeline_sync()
        while conn.flush():
            pass
        results: list[str] = []
        deadline = time.monotonic() + timeout
        while results.count("PIPELINE_SYNC") < 2:
            assert time.monotonic() < deadline, f"pipeline stalled after {results}"
            select.select([conn.socket], [], [], 0.2)
            conn.consume_input()
            while not conn.is_busy():
                result = conn.get_result()
                if result is None:
                    if results.count("PIPELINE_SYNC") == 2:
                        break
                    continue
                results.append(pq.ExecStatus(result.status).name)
                if results.count("PIPELINE_SYNC") == 2:
                    break
        return results
    finally:
        conn.finish()


def test_libpq_pipeline_reusing_a_statement_prepared_in_an_earlier_group(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """The Bind waits for its Parse's answer, not for replies only its own Sync releases."""
    direct = _libpq_pipeline(pg_server.dsn())
    through = _libpq_pipeline(proxy.dsn(application_name=app_name("libpq-pipeline")))
    assert (
        through
        == direct
        == [
            "COMMAND_OK",
            "PIPELINE_SYNC",
            "TUPLES_OK",
            "TUPLES_OK",
            "PIPELINE_SYNC",
        ]
    )


def test_execute_of_a_sql_cursor_is_decided_as_its_query(proxy: Proxy) -> None:
    """DECLARE creates a portal the extended protocol can Execute: it is the cursor's query."""
    app = app_name("cursor")
    session = RawSession(proxy, app)
    try:
        session.query(
            "CREATE TEMP TABLE secret_notes (v text); INSERT INTO secret_notes VALUES ('x')"
        )
        session.query("BEGIN")
        session.send(m.parse_message("s", "SELECT 1") + m.bind_message("p", "s", []) + m.sync())
        session.query("CLOSE p; DECLARE p CURSOR FOR SELECT v FROM secret_notes")
        replies = session.send(m.execute_message("p") + m.sync())
        assert [kind for kind, _ in replies] == [b"D", b"C", b"Z"]
        session.query("COMMIT")
    finally:
        session.close()
    extended = [s for s in statements(proxy.session_records(app, until=has_disconnect))]
    executed = [s for s in extended if s.path == "extended"][-1]
    assert executed.tables == ("secret_notes",)
    assert executed.sql_text == "DECLARE p CURSOR FOR SELECT v FROM secret_notes"


def _libpq_copy(dsn: str, sql: bytes, data: bytes) -> list[str]:
    """Real libpq: COPY sent with PQsendQueryParams (Parse/Bind/Execute + Sync), then data."""
    conn = pq.PGconn.connect(dsn.encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    try:
        conn.send_query_params(sql, None)
        statuses = []
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, f"stalled after {statuses}"
            conn.consume_input()
            if conn.is_busy():
                select.select([conn.socket], [], [], 0.2)
                continue
            result = conn.get_result()
            if result is None:
                return statuses
            statuses.append(pq.ExecStatus(result.status).name)
            if result.status == pq.ExecStatus.COPY_IN:
                conn.put_copy_data(data)
                conn.put_copy_end()
                while conn.flush():
                    pass
    finally:
        conn.finish()


def test_libpq_extended_protocol_copy_works_and_a_failing_one_does_not_hang(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """libpq sends its Sync with the COPY's Execute; PostgreSQL ignores it while copying but
    answers it if the COPY fails first. dbward holds it back until it knows which."""
    table = f"copy_{uuid.uuid4().hex[:8]}"
    pg_server.psql(
        f"CREATE TABLE {table} (x int); GRANT ALL ON {table} TO {pg_server.service_user}",
        dbname="app",
    )
    dsn = proxy.dsn(application_name=app_name("libpq-copy"))
    ok = _libpq_copy(dsn, f"COPY {table} FROM STDIN".encode(), b"1\n2\n")
    assert ok == _libpq_copy(pg_server.dsn(), f"COPY {table} FROM STDIN".encode(), b"3\n")
    assert ok == ["COPY_IN", "COMMAND_OK"]
    assert pg_server.psql(f"SELECT count(*) FROM {table}", dbname="app") == "3"
    missing = _libpq_copy(dsn, b"COPY no_such_table FROM STDIN", b"1\n")
    assert missing == ["FATAL_ERROR"]  # answered, not hung waiting for the held Sync
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _executed(proxy: Proxy, app: str) -> AuditRecord:
    """The session's last statement recorded as run through an Execute or a SQL EXECUTE."""
    records = proxy.session_records(app, until=has_disconnect)
    return [s for s in statements(records) if s.path == "extended" or s.command == "EXECUTE"][-1]


def test_a_non_ascii_name_in_a_protocol_message_is_refused(proxy: Proxy) -> None:
    """PostgreSQL converts a Close's or Parse's name from the client encoding as it converts SQL
    text: `"é"` in `PREPARE "é"` and the UTF-8 bytes of é in a Close are the same name. dbward
    read protocol names byte for byte (as Latin-1: 'Ã©'), so closing and re-parsing the name
    as a DELETE left it holding `SELECT 1` for `EXECUTE "é"`: the DELETE ran, recorded as a
    read of no table. Protocol names that are not ASCII are refused (42602, guard.name_limit)."""
    app = app_name("name-sql-protocol")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE victim_n1 (x int); INSERT INTO victim_n1 VALUES (1), (2)")
        session.query('PREPARE "é" AS SELECT 1')
        replies = session.send(
            m.close_message("S", "é") + m.parse_message("é", "DELETE FROM victim_n1") + m.sync()
        )
        assert [kind for kind, _ in replies] == [b"E", b"Z"]
        assert m.parse_error_fields(replies[0][1])["C"] == "42602"
        replies = session.query('EXECUTE "é"')
        assert (b"C", b"SELECT 1\x00") in replies
        assert session.query("SELECT count(*) FROM victim_n1")[1] == (
            b"D",
            b"\x00\x01\x00\x00\x00\x012",
        )
    finally:
        session.close()
    executed = _executed(proxy, app)
    assert (executed.kind, executed.tables) == ("read", ())  # the SELECT 1 it is


def test_a_name_sent_under_two_client_encodings_is_refused(proxy: Proxy) -> None:
    """é named under LATIN1 (byte e9) is the é named under UTF8 (c3 a9): PostgreSQL converts
    both. A Close and a Parse under UTF8 redefined it while dbward held two names, and a Bind
    under LATIN1 ran the DELETE recorded as `SELECT 1`. Each of those is refused now."""
    app = app_name("name-encodings")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE victim_n2 (x int); INSERT INTO victim_n2 VALUES (1), (2)")
        session.query("SET client_encoding = 'LATIN1'")
        for message in (
            m.parse_message("é", "SELECT 1", encoding="latin-1"),
            m.bind_message("", "é", encoding="latin-1") + m.execute_message(""),
        ):
            replies = session.send(message + m.sync())
            assert [kind for kind, _ in replies] == [b"E", b"Z"]
            assert m.parse_error_fields(replies[0][1])["C"] == "42602"
        session.query("SET client_encoding = 'UTF8'")
        replies = session.send(
            m.close_message("S", "é") + m.parse_message("é", "DELETE FROM victim_n2") + m.sync()
        )
        assert m.parse_error_fields(replies[0][1])["C"] == "42602"
        assert session.query("SELECT count(*) FROM victim_n2")[1] == (
            b"D",
            b"\x00\x01\x00\x00\x00\x012",
        )
    finally:
        session.close()
    records = statements(proxy.session_records(app, until=has_disconnect))
    assert not any("DELETE" in r.sql_text and r.decision == "allow" for r in records)


def test_sql_under_sql_ascii_is_read_as_the_database_reads_it(proxy: Proxy) -> None:
    """Under client_encoding SQL_ASCII PostgreSQL does not convert: it checks the bytes as the
    database's UTF-8 and reads them so. dbward read them as Latin-1, so each é (c3 a9) was two
    characters (four bytes once handed to the parser), and names were cut at 63 bytes in other
    places: two statements PostgreSQL held apart were one name to dbward, the second
    (`SELECT 1`) standing for the first (a DELETE) at its EXECUTE."""
    app = app_name("name-sql-ascii")
    first, second = '"' + "é" * 31 + 'x"', '"' + "é" * 31 + 'y"'
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE victim_n3 (x int); INSERT INTO victim_n3 VALUES (1), (2)")
        session.query("SET client_encoding = 'SQL_ASCII'")
        session.query(f"PREPARE {first} AS DELETE FROM victim_n3")
        session.query(f"PREPARE {second} AS SELECT 1")
        replies = session.query(f"EXECUTE {first}")
        assert (b"C", b"DELETE 2\x00") in replies
    finally:
        session.close()
    executed = _executed(proxy, app)
    assert (executed.kind, executed.tables) == ("write", ("victim_n3",))


def test_a_name_not_valid_in_the_client_encoding_is_refused(proxy: Proxy) -> None:
    """A name that is not ASCII (here not even valid UTF-8) is refused in every message that
    carries one, pipelined or not; the session goes on."""
    session = RawSession(proxy, app_name("name-invalid"))
    try:
        bad = "ÿ"  # byte ff under Latin-1: no UTF-8 sequence
        for message in (
            m.parse_message(bad, "SELECT 1", encoding="latin-1"),
            m.bind_message("", bad, encoding="latin-1"),
            m.execute_message(bad, encoding="latin-1"),
            m.close_message("P", bad, encoding="latin-1"),
        ):
            replies = session.send(message + m.sync())
            assert [kind for kind, _ in replies] == [b"E", b"Z"]
            assert m.parse_error_fields(replies[0][1])["C"] == "42602"
        replies = session.send(
            m.parse_message("", "SELECT 1")
            + m.bind_message("", "")
            + m.execute_message("")
            + m.close_message("S", "é")
            + m.sync()
        )
        assert [kind for kind, _ in replies] == [b"1", b"2", b"D", b"C", b"E", b"Z"]
        assert m.parse_error_fields(replies[4][1])["C"] == "42602"
        assert session.query("SELECT 1")[-1][0] == b"Z"
    finally:
        session.close()


def _bind_delete_returning(session: RawSession, table: str) -> None:
    """A transaction block holding portal p, bound from `DELETE FROM table RETURNING x`."""
    session.query(f"CREATE TEMP TABLE {table} (x int); INSERT INTO {table} VALUES (1), (2)")
    session.query("BEGIN")
    session.send(
        m.parse_message("s", f"DELETE FROM {table} RETURNING x")
        + m.bind_message("p", "s", [])
        + m.sync()
    )


@pytest.mark.parametrize("deallocate", ["DEALLOCATE s", "DEALLOCATE ALL", "DISCARD PLANS"])
def test_fetch_of_a_portal_kept_through_deallocate_runs_its_statement(
    proxy: Proxy, deallocate: str
) -> None:
    """A SQL FETCH (or MOVE) runs any portal, one bound through the protocol too. DEALLOCATE
    leaves portals as they are in PostgreSQL, but dbward forgot them there, and a FETCH of a
    portal it does not hold is what its text shows (a cursor a function opened): the DELETE
    the portal was bound from ran, recorded as a read of no table."""
    app = app_name("fetch-kept")
    session = RawSession(proxy, app)
    try:
        _bind_delete_returning(session, "victim_f1")
        session.query(deallocate)
        replies = session.query("FETCH ALL FROM p")
        assert (b"C", b"FETCH 2\x00") in replies
        session.query("COMMIT")
    finally:
        session.close()
    (fetch,) = [
        s
        for s in statements(proxy.session_records(app, until=has_disconnect))
        if s.command == "FETCH"
    ]
    assert (fetch.kind, fetch.tables) == ("write", ("victim_f1",))


@pytest.mark.parametrize("closer", ["CLOSE ALL", "DISCARD ALL"])
def test_fetch_of_a_portal_a_refused_close_all_left_is_refused(proxy: Proxy, closer: str) -> None:
    """CLOSE ALL in a failed block, and DISCARD ALL in any block, are refused by PostgreSQL and
    close nothing: after ROLLBACK TO SAVEPOINT the portal is there to FETCH. dbward forgot every
    portal when it forwarded them and read the FETCH as its text (the DELETE ran as a read);
    a portal forgotten so is now refused until PostgreSQL says it is gone."""
    app = app_name("fetch-closed")
    session = RawSession(proxy, app)
    try:
        _bind_delete_returning(session, "victim_f2")
        session.query("SAVEPOINT sp")
        if closer == "CLOSE ALL":
            session.query("SELECT 1/0")
        assert session.query(closer)[0][0] == b"E"
        session.query("ROLLBACK TO sp")
        replies = session.query("FETCH ALL FROM p")
        assert [kind for kind, _ in replies] == [b"E", b"Z"]
        assert m.parse_error_fields(replies[0][1])["C"] == "42501"
        # Still there, and still what it was: Execute is refused the same way (not forwarded).
        session.query("ROLLBACK TO sp")
        replies = session.send(m.execute_message("p") + m.sync())
        assert m.parse_error_fields(replies[0][1])["C"] == "42501"
        session.query("ROLLBACK")
        # Once it succeeds, what it closed is gone as in PostgreSQL: 34000, not a refusal.
        session.query("BEGIN; DECLARE c CURSOR FOR SELECT 1")
        session.query("CLOSE ALL")
        replies = session.query("FETCH c")
        assert m.parse_error_fields(replies[0][1])["C"] == "34000"
        session.query("ROLLBACK")
        assert session.query("SELECT count(*) FROM victim_f2")[1] == (
            b"D",
            b"\x00\x01\x00\x00\x00\x012",
        )
    finally:
        session.close()


@pytest.mark.parametrize(
    "code",
    [
        "DO $$ BEGIN DEALLOCATE x; PREPARE x AS DELETE FROM victim_c1; END $$",
        "DO $$ BEGIN EXECUTE 'DEALLOCATE x'; EXECUTE 'PREPARE x AS DELETE FROM victim_c1'; END $$",
        "CREATE FUNCTION pg_temp.swap() RETURNS void LANGUAGE sql"
        " AS $$ DEALLOCATE x; PREPARE x AS DELETE FROM victim_c1 $$",
    ],
)
def test_code_cannot_prepare_statements_behind_dbwards_back(proxy: Proxy, code: str) -> None:
    """dbward follows the PREPAREs and DEALLOCATEs the client sends; one run inside a DO block
    or a function replaced the session's `x` while dbward still held `SELECT 1` for it, and
    `EXECUTE x` ran the DELETE recorded as a read of no table. Refused like `EXECUTE x` there."""
    app = app_name("code-prepare")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE victim_c1 (x int); INSERT INTO victim_c1 VALUES (1)")
        session.query("PREPARE x AS SELECT 1")
        replies = session.query(code)
        assert replies[0][0] == b"E", replies
        assert m.parse_error_fields(replies[0][1])["C"] == "42501"
        session.query("SELECT pg_temp.swap()")  # if it was created (it is not)
        replies = session.query("EXECUTE x")
        assert (b"C", b"SELECT 1\x00") in replies
        assert session.query("SELECT count(*) FROM victim_c1")[1] == (
            b"D",
            b"\x00\x01\x00\x00\x00\x011",
        )
    finally:
        session.close()
    records = statements(proxy.session_records(app, until=has_disconnect))
    assert [r.rule for r in records if r.sql_text == code] == ["guard.dynamic_sql"]


def test_non_ascii_names_are_refused_on_a_database_not_in_utf8(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """A SQL_ASCII database converts nothing and cuts identifiers at 63 bytes even within a
    character: `"aaa…a(62)é"` is 'a' * 62 + byte c3 to it, and 'a' * 62 to dbward's (UTF-8)
    parser, the same name as `"aaa…a(62)"`. PREPAREd in that order as a DELETE and as SELECT 1,
    EXECUTE of the first ran the DELETE recorded as SELECT 1. Names that are not ASCII (or were
    cut from such) are refused on such a database; plain ones work as ever."""
    database = f"sqlascii_{uuid.uuid4().hex[:6]}"
    pg_server.psql(
        f"CREATE DATABASE {database} ENCODING 'SQL_ASCII' TEMPLATE template0"
        f" LC_COLLATE 'C' LC_CTYPE 'C'; GRANT ALL ON DATABASE {database} TO PUBLIC",
        dbname="postgres",
    )
    app = app_name("name-sql-ascii-db")
    long = "a" * 62
    try:
        with psycopg.connect(
            **proxy.conninfo(dbname=database, application_name=app), autocommit=True
        ) as conn:
            conn.execute(b"CREATE TEMP TABLE victim_n4 (x int); INSERT INTO victim_n4 VALUES (1)")
            # Cut by the parser (64 bytes), and not ASCII on a database not in UTF8.
            with pytest.raises(psycopg.errors.NameTooLong):
                conn.execute(f'PREPARE "{long}é" AS DELETE FROM victim_n4'.encode(), prepare=False)
            with pytest.raises(psycopg.errors.InvalidName):
                conn.execute('PREPARE "é" AS DELETE FROM victim_n4'.encode(), prepare=False)
            conn.execute(f'PREPARE "{long}" AS SELECT 1'.encode(), prepare=False)
            assert conn.execute(f'EXECUTE "{long}"'.encode(), prepare=False).fetchall() == [(1,)]
            (count,) = conn.execute(b"SELECT count(*) FROM victim_n4").fetchall()
            assert count == (1,)
    finally:
        pg_server.psql(f"DROP DATABASE {database}", dbname="postgres")
    records = statements(proxy.session_records(app, until=has_disconnect))
    prepares = [(r.rule, r.sql_text.isascii()) for r in records if r.command == "PREPARE"]
    assert prepares == [
        ("guard.name_limit", False),
        ("guard.name_limit", False),
        ("default.allow", True),
    ]


def test_execute_is_what_its_parameters_do_as_well(proxy: Proxy) -> None:
    """EXECUTE evaluates its parameters, and so does a plain EXPLAIN EXECUTE (the sequence
    advances twice here): `EXECUTE x(nextval('s'))` of a SELECT was recorded as the SELECT, a
    read (so not made durable first in strict mode), and the EXPLAIN as a read too."""
    app = app_name("execute-params")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP SEQUENCE seq_p1; PREPARE x(bigint) AS SELECT $1")
        session.query("EXECUTE x(nextval('seq_p1'))")
        session.query("EXPLAIN EXECUTE x(nextval('seq_p1'))")
        replies = session.query("SELECT currval('seq_p1')")
        assert replies[1] == (b"D", b"\x00\x01\x00\x00\x00\x012")
    finally:
        session.close()
    records = statements(proxy.session_records(app, until=has_disconnect))
    kinds = [(r.command, r.kind) for r in records if "x(nextval" in r.sql_text]
    assert kinds == [("EXECUTE", "write"), ("EXPLAIN", "write")]
