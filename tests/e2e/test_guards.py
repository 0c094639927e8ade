"""Built-in guards through real clients: each denial, hidden or prepared, keeps the session."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from dbward.wire.postgres import messages
from fixtures.clients import app_name, has_disconnect, outcome_of, run_psql, statements
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy
from fixtures.raw import RawSession

DENIED = [
    ("SET ROLE postgres", "guard.role_switch"),
    ("SET SESSION AUTHORIZATION postgres", "guard.role_switch"),
    ("RESET ROLE", "guard.role_switch"),
    ("SELECT set_config('role', 'postgres', false)", "guard.role_switch"),
    ("COPY (SELECT 1) TO PROGRAM 'id'", "guard.copy_program"),
    ("COPY pg_class FROM '/etc/passwd'", "guard.copy_file"),
    ("COPY (SELECT 1) TO '/tmp/dbward-should-not-exist'", "guard.copy_file"),
    ("SELEKT 1 FROM", "guard.unparseable"),
    ("SELECT pg_read_file('/etc/passwd')", "guard.server_file"),
    (
        "SELECT lo_export(lo_import('/etc/passwd'), '/tmp/dbward-should-not-exist')",
        "guard.server_file",
    ),
    (
        "SELECT query_to_xml('SELECT set_config(''role'', ''postgres'', false)', true, false, '')",
        "guard.role_switch",
    ),
    ("SELECT ts_stat('SELECT to_tsvector(pg_read_file(''/etc/passwd''))')", "guard.server_file"),
    ("SELECT query_to_xml('SELECT ' || '1', true, false, '')", "guard.dynamic_sql"),
    (
        "CREATE AGGREGATE pg_temp.rsw(text, boolean)"
        " (sfunc = set_config, stype = text, initcond = 'role')",
        "guard.role_switch",
    ),
    (
        "CREATE FUNCTION pg_temp.sw() RETURNS text LANGUAGE sql"
        " AS $$ SELECT set_config('role', 'postgres', false) $$",
        "guard.role_switch",
    ),
    # Nineteenth review: the service role could change its own password through dbward,
    # locking every user out (its name comes from the fixture: dbward_svc).
    ("ALTER ROLE CURRENT_USER PASSWORD 'locked-out'", "guard.service_role"),
    ("ALTER USER dbward_svc CONNECTION LIMIT 0", "guard.service_role"),
    ("ALTER ROLE dbward_svc SET statement_timeout = 1", "guard.service_role"),
    ("DO $$ BEGIN ALTER ROLE SESSION_USER NOLOGIN; END $$", "guard.service_role"),
]


@pytest.mark.parametrize(("sql", "rule"), DENIED)
def test_guard_denies_simple_query_and_session_continues(proxy: Proxy, sql: str, rule: str) -> None:
    app = app_name("guard")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql.encode(), prepare=False)  # bytes: psycopg sends it as simple Query
        assert info.value.sqlstate == "42501"
        assert str(info.value).startswith("dbward:")
        assert conn.execute(b"SELECT current_user").fetchone() == (proxy.pg.service_user,)
    records = proxy.session_records(app, until=has_disconnect)
    denied = [s for s in statements(records) if s.decision == "deny"]
    assert len(denied) == 1 and denied[0].rule == rule
    assert outcome_of(records, denied[0]).status == "denied"


def test_guard_hidden_in_multi_statement_string(proxy: Proxy) -> None:
    app = app_name("guard-multi")
    result = run_psql(
        proxy.dsn(application_name=app),
        "CREATE TEMP TABLE smuggle (x int); SELECT 1; SET ROLE postgres;"
        " INSERT INTO smuggle VALUES (1)",
        "SELECT count(*) FROM pg_tables WHERE tablename = 'smuggle'",
        "SELECT current_user",
    )
    assert "guard" not in result.stderr  # the reason, not internals
    assert "changing role or session authorization is not allowed" in result.stderr
    # nothing of the denied string ran, and the session carried on
    assert result.stdout.split() == ["0", proxy.pg.service_user]
    records = proxy.session_records(app, until=has_disconnect)
    first = statements(records)[:4]
    assert [s.command for s in first] == ["CREATE TABLE", "SELECT", "SET", "INSERT"]
    assert {outcome_of(records, s).status for s in first} == {"denied"}


@pytest.mark.parametrize(
    "sql",
    [
        "/* ; */ SET ROLE postgres",
        "select 1;set role postgres;--",
        "SELECT pg_catalog.set_config('ROLE', 'postgres', true)",
        "WITH x AS (SELECT set_config('role', 'postgres', false)) SELECT * FROM x",
        "SeT SeSsIoN AuThOrIzAtIoN DEFAULT",
    ],
)
def test_comment_and_case_tricks_are_denied(proxy: Proxy, sql: str) -> None:
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.encode(), prepare=False)
        assert conn.execute(b"SELECT current_user").fetchone() == (proxy.pg.service_user,)


def test_string_literals_that_look_dangerous_are_allowed(proxy: Proxy) -> None:
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            b"SELECT $$;SET ROLE postgres$$, E'\\';SET ROLE x', current_setting('role')",
            prepare=False,
        ).fetchone()
        assert row == (";SET ROLE postgres", "';SET ROLE x", "none")


def test_guard_in_extended_protocol_with_parameters(proxy: Proxy) -> None:
    app = app_name("guard-ext")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT set_config(%s, %s, false)", ("role", "postgres"))
        # the named guard checks a constant GUC name; a computed one is also denied
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT set_config(lower(%s), 'postgres', false)", ("ROLE",))
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
    records = proxy.session_records(app, until=has_disconnect)
    denied = [s for s in statements(records) if s.decision == "deny"]
    assert [s.path for s in denied] == ["extended", "extended"]


def test_denied_prepared_statement_is_refused_at_every_attempt(proxy: Proxy) -> None:
    """A denied server-side prepared statement is refused at every attempt to prepare it."""
    app = app_name("guard-prep")
    with psycopg.connect(
        **proxy.conninfo(application_name=app), autocommit=True, prepare_threshold=0
    ) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT set_config('role', %s, false)", ("postgres",))
            assert conn.execute("SELECT 1").fetchone() == (1,)
    records = proxy.session_records(app, until=has_disconnect)
    denied = [s for s in statements(records) if s.decision == "deny"]
    assert len(denied) == 3


def test_denial_inside_transaction_aborts_it_like_postgres(proxy: Proxy) -> None:
    """The denied statement fails the transaction block exactly as a PostgreSQL error would."""
    with psycopg.connect(**proxy.conninfo()) as conn:
        conn.execute("CREATE TEMP TABLE tx (x int)")
        conn.execute("INSERT INTO tx VALUES (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(b"SET ROLE postgres", prepare=False)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_function_call_message_is_refused(proxy: Proxy) -> None:
    """The FunctionCall message calls a function by OID without SQL: refused, session kept."""
    app = app_name("guard-fcall")
    session = RawSession(proxy, app)
    try:
        # pg_terminate_backend's OID would do harm; any OID is refused before reaching PostgreSQL
        oid = 2096  # pg_terminate_backend(int4)
        replies = session.send(messages.function_call_message(oid, [b"1"]))
        kinds = [kind for kind, _ in replies]
        assert kinds == [b"E", b"Z"]
        fields = messages.parse_error_fields(replies[0][1])
        assert fields["C"] == "42501" and "FunctionCall" in fields["M"]
        assert replies[1][1] == b"I"  # idle: nothing ran, no transaction opened
        assert [k for k, _ in session.query("SELECT 1")] == [b"T", b"D", b"C", b"Z"]
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    (denied, allowed) = statements(records)
    assert (denied.path, denied.decision, denied.rule) == (
        "function_call",
        "deny",
        "guard.function_call",
    )
    assert outcome_of(records, denied).status == "denied"
    assert allowed.decision == "allow"


def test_sql_prepare_and_execute_are_decided_as_what_they_run(proxy: Proxy) -> None:
    """EXECUTE is resolved to the statement the session prepared: kind, tables and guards."""
    app = app_name("guard-sqlprep")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.execute(b"CREATE TEMP TABLE pt (id int)", prepare=False)
        conn.execute(b"PREPARE ins (int) AS INSERT INTO pt VALUES ($1)", prepare=False)
        conn.execute(b"EXECUTE ins(1); EXECUTE ins(2)", prepare=False)
        assert conn.execute(b"SELECT count(*) FROM pt", prepare=False).fetchone() == (2,)
        # the guard sees through PREPARE ...
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                b"PREPARE sw AS SELECT set_config('role', 'postgres', false)", prepare=False
            )
        # ... so there is nothing to EXECUTE, and an unknown name is not inspectable
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(b"EXECUTE sw", prepare=False)
        # after DEALLOCATE dbward forgets every name; a re-created one is seen afresh
        conn.execute(b"DEALLOCATE ALL", prepare=False)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(b"EXECUTE ins(3)", prepare=False)
        conn.execute(
            b"PREPARE ins (int) AS INSERT INTO pt VALUES ($1); EXECUTE ins(4)", prepare=False
        )
        assert conn.execute(b"SELECT count(*) FROM pt", prepare=False).fetchone() == (3,)
    records = proxy.session_records(app, until=has_disconnect)
    executes = [s for s in statements(records) if s.command == "EXECUTE"]
    assert [(s.kind, s.decision) for s in executes] == [
        ("write", "allow"),
        ("write", "allow"),
        ("unknown", "deny"),
        ("unknown", "deny"),
        ("write", "allow"),
    ]
    assert executes[0].tables == ("pt",)
    assert [outcome_of(records, s).rows for s in executes if s.decision == "allow"] == [1, 1, 1]


def test_create_table_as_execute_is_decided_as_what_it_runs(proxy: Proxy) -> None:
    """CREATE TABLE ... AS EXECUTE runs the prepared query: its tables are the statement's, and
    an unknown name is refused as for EXECUTE (review round 18)."""
    app = app_name("guard-ctas-exec")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.execute(b"CREATE TEMP TABLE ctas_src (id int); INSERT INTO ctas_src VALUES (7)")
        conn.execute(b"PREPARE src AS SELECT id FROM ctas_src", prepare=False)
        conn.execute(b"CREATE TEMP TABLE ctas_copy AS EXECUTE src", prepare=False)
        assert conn.execute(b"SELECT id FROM ctas_copy", prepare=False).fetchone() == (7,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(b"CREATE TEMP TABLE ctas_none AS EXECUTE nobody", prepare=False)
    records = proxy.session_records(app, until=has_disconnect)
    ctas = [s for s in statements(records) if s.command == "CREATE TABLE AS"]
    assert [(s.kind, s.decision, s.tables) for s in ctas] == [
        ("ddl", "allow", ("ctas_copy", "ctas_src")),
        ("unknown", "deny", ("ctas_none",)),
    ]


def test_undecodable_sql_is_denied_and_the_session_continues(proxy: Proxy) -> None:
    """Bytes that are not valid in the client encoding: denied, never guessed at, no FATAL."""
    import struct

    app = app_name("guard-bytes")
    session = RawSession(proxy, app)
    try:
        bad_query = b"SELECT '\xff\xfe'\x00"
        replies = session.send(b"Q" + struct.pack("!I", 4 + len(bad_query)) + bad_query)
        assert [k for k, _ in replies] == [b"E", b"Z"]
        assert messages.parse_error_fields(replies[0][1])["C"] == "42501"
        body = b"\x00" + bad_query + b"\x00\x00"  # Parse: unnamed, query, no parameter types
        frame = b"P" + struct.pack("!I", 4 + len(body)) + body
        replies = session.send(
            frame
            + messages.bind_message("", "", [])
            + messages.execute_message("")
            + messages.sync()
        )
        kinds = [k for k, _ in replies]
        assert kinds == [b"E", b"Z"]
        # Refused at Parse by dbward: the bytes never reach PostgreSQL.
        assert messages.parse_error_fields(replies[0][1])["C"] == "42501"
        assert [k for k, _ in session.query("SELECT 1")] == [b"T", b"D", b"C", b"Z"]
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    denied = [s for s in statements(records) if s.decision == "deny"]
    assert [s.rule for s in denied] == ["guard.unparseable", "guard.unparseable"]


def _proxy_as(
    proxy_factory: Callable[..., Proxy], tmp_path: Path, role: str, password: str
) -> Proxy:
    """A proxy logging in to PostgreSQL as `role` instead of the usual service role."""
    password_file = tmp_path / f"{role}-password"
    password_file.write_text(password)
    password_file.chmod(0o600)
    return proxy_factory(upstream={"user": role, "password_file": str(password_file)})


@pytest.fixture
def escalating_proxy(
    pg_server: PgServer, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> Proxy:
    """A proxy whose service role may SET ROLE to a superuser role and to a plain one, with a
    function the database's owner created (not through dbward) that switches role."""
    password = "esc-Svc-pw-1"
    pg_server.psql(
        "DO $$ BEGIN"
        " IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dbward_esc_svc') THEN"
        "  CREATE ROLE dbward_esc_admin SUPERUSER NOLOGIN;"
        "  CREATE ROLE dbward_esc_plain NOLOGIN;"
        f"  CREATE ROLE dbward_esc_svc LOGIN PASSWORD '{password}';"
        "  GRANT dbward_esc_admin, dbward_esc_plain TO dbward_esc_svc;"
        " END IF; END $$"
    )
    pg_server.psql(_SWITCHING_FUNCTION)
    return _proxy_as(proxy_factory, tmp_path, "dbward_esc_svc", password)


# Code already in the database runs what it contains: dbward reads the code created through
# it (see tests/e2e/test_procedural_code.py), not what the database's owners put there.
_SWITCHING_FUNCTION = (
    "CREATE OR REPLACE FUNCTION public.dbward_switch(what text, who text) RETURNS void"
    " LANGUAGE plpgsql AS $$ BEGIN EXECUTE what || ' ' || quote_ident(who); END $$;"
    " GRANT EXECUTE ON FUNCTION public.dbward_switch(text, text) TO PUBLIC"
)


def test_role_switch_to_a_superuser_inside_a_function_ends_the_session(
    escalating_proxy: Proxy,
) -> None:
    # The guards read statement text, and the function's code was never sent through dbward.
    # PostgreSQL reports is_superuser when it changes, and dbward ends such a session.
    app = app_name("escalate")
    with psycopg.connect(**escalating_proxy.conninfo(application_name=app)) as conn:
        conn.autocommit = True
        # Through dbward, the same switch in a DO block is read and refused.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="changing role"):
            conn.execute(b"DO $$ BEGIN EXECUTE 'SET ROLE dbward_esc_admin'; END $$")
        # A switch that gains no superuser power is not observable on the wire: it goes through.
        conn.execute(b"SELECT public.dbward_switch('SET ROLE', 'dbward_esc_plain')")
        assert conn.execute(b"SELECT current_user").fetchone() == ("dbward_esc_plain",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(b"SELECT public.dbward_switch('SET ROLE', 'dbward_esc_admin')")
        assert info.value.diag.severity_nonlocalized == "FATAL"
        assert "gained privileges no statement was allowed to give it" in str(info.value)
        with pytest.raises(psycopg.OperationalError):
            conn.execute(b"SELECT current_user")
    records = escalating_proxy.session_records(app, until=has_disconnect)
    (event,) = [r for r in records if r.event == "privilege_escalation"]
    assert event.reason == "the database session became a superuser"
    assert event.sqlstate == "42501" and event.identity == "alice"
    last = statements(records)[-1]
    assert last.command == "SELECT" and "dbward_switch" in last.sql_text
    # PostgreSQL reports the change after the CommandComplete: the statement itself did run.
    assert outcome_of(records, last).status == "ok"
    assert records.index(event) > records.index(outcome_of(records, last))
    # The escalated backend is gone with the session.
    deadline = time.monotonic() + 5
    while (
        escalating_proxy.pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'dbward_esc_svc'"
        )
        != "0"
    ):
        assert time.monotonic() < deadline, "the escalated backend is still connected"
        time.sleep(0.05)
    # Other sessions are unaffected.
    with psycopg.connect(**escalating_proxy.conninfo()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("dbward_esc_svc",)


def test_superuser_service_role_is_warned_about(
    pg_server: PgServer, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    password = "esc-Super-pw-1"
    pg_server.psql(
        "DO $$ BEGIN"
        " IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dbward_super_svc') THEN"
        f"  CREATE ROLE dbward_super_svc SUPERUSER LOGIN PASSWORD '{password}';"
        " END IF;"
        " IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dbward_super_target') THEN"
        "  CREATE ROLE dbward_super_target NOLOGIN;"
        " END IF; END $$"
    )
    pg_server.psql(_SWITCHING_FUNCTION)
    up = _proxy_as(proxy_factory, tmp_path, "dbward_super_svc", password)
    for _ in range(2):
        with psycopg.connect(**up.conninfo()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    warnings = [line for line in up.log().splitlines() if "is a superuser" in line]
    assert len(warnings) == 1  # once per listener, not per session
    assert "dbward_super_svc" in warnings[0] and password not in up.log()
    # A superuser has no is_superuser change to show, but a switch of session authorization
    # is still reported by PostgreSQL and still ends the session.
    app = app_name("escalate-auth")
    with (
        psycopg.connect(**up.conninfo(application_name=app), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(
            b"SELECT public.dbward_switch('SET SESSION AUTHORIZATION', 'dbward_super_target')"
        )
    records = up.session_records(app, until=has_disconnect)
    (event,) = [r for r in records if r.event == "privilege_escalation"]
    assert event.reason == "the database session's authorization changed to 'dbward_super_target'"


def test_query_strings_over_the_statement_limit_are_refused_whole(
    proxy_factory: Callable[..., Proxy],
) -> None:
    limited = proxy_factory(extra={"max_statements_per_query": 5})
    app = app_name("statement-limit")
    at_limit = "CREATE TEMP TABLE counted (x int);" + " INSERT INTO counted VALUES (1);" * 4
    result = run_psql(
        limited.dsn(application_name=app),
        at_limit,
        at_limit.replace("CREATE TEMP TABLE counted (x int);", "SELECT 1;") + " SET ROLE postgres",
        "SELECT count(*) FROM counted",
    )
    # Nothing of the refused string ran (its 4 INSERTs neither), and the session carried on.
    assert result.stdout.split() == ["4"]
    assert (
        "the query string holds 6 statements; the limit is 5 per message "
        "(max_statements_per_query)" in result.stderr
    )
    records = limited.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [s.command for s in intents] == ["CREATE TABLE", *["INSERT"] * 4, "MULTIPLE", "SELECT"]
    refused = intents[5]
    assert (refused.kind, refused.decision, refused.rule) == (
        "unknown",
        "deny",
        "guard.statement_limit",
    )
    assert refused.sql_text.endswith("SET ROLE postgres")
    assert outcome_of(records, refused).status == "denied"


def test_a_statement_flood_is_refused_at_once_and_other_sessions_keep_working(proxy: Proxy) -> None:
    # 1.2 million statements (10.8 MB) in one string: before the limit they stalled every
    # session for seconds and filled the audit backlog, refusing everyone's statements.
    app = app_name("statement-flood")
    flood = "SELECT 1;" * 1_200_000
    with (
        psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn,
        psycopg.connect(**proxy.conninfo(), autocommit=True) as other,
    ):
        started = time.monotonic()
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as info:
            conn.execute(flood.encode())
        assert "holds more than 10000 statements" in str(info.value)
        assert time.monotonic() - started < 10
        assert conn.execute(b"SELECT 2").fetchone() == (2,)
        assert other.execute(b"SELECT 3").fetchone() == (3,)
    records = proxy.session_records(app, until=has_disconnect)
    assert [s.command for s in statements(records)] == ["MULTIPLE", "SELECT"]
    assert len(records) < 10  # one intent for the flood, not a million


def test_statements_over_max_statement_bytes_are_refused_unparsed(
    proxy_factory: Callable[..., Proxy],
) -> None:
    limited = proxy_factory(listener={"max_statement_bytes": 65_536})
    app = app_name("statement-bytes")
    long_select = "SELECT length('" + "x" * 70_000 + "')"
    with psycopg.connect(**limited.conninfo(application_name=app), autocommit=True) as conn:
        for attempt in (
            lambda: conn.execute(long_select.encode()),  # simple Query
            lambda: conn.execute(long_select + " + %s", (1,)),  # Parse/Bind/Execute
        ):
            with pytest.raises(psycopg.errors.ProgramLimitExceeded) as info:
                attempt()
            assert "the limit is 65536 (max_statement_bytes)" in str(info.value)
            assert conn.execute(b"SELECT length('" + b"y" * 60_000 + b"')").fetchone() == (60_000,)
    records = limited.session_records(app, until=has_disconnect)
    refused = [s for s in statements(records) if s.decision == "deny"]
    assert [(s.rule, s.sql_text, s.path) for s in refused] == [
        ("guard.statement_limit", "", "simple"),
        ("guard.statement_limit", "", "extended"),
    ]
    assert refused[0].detail == (
        f"the statement text is {len(long_select)} bytes; the limit is 65536 (max_statement_bytes)"
    )


def test_default_statement_size_limit_refuses_a_memory_bomb_at_once(proxy: Proxy) -> None:
    # Parsing takes ~100x the text in memory: 17 MB of SQL would cost the classifier ~1.7 GB.
    app = app_name("statement-bomb")
    bomb = "SELECT length('" + "x" * (17 * 1024 * 1024) + "')"
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as info:
            conn.execute(bomb.encode())
        assert "the limit is 16777216 (max_statement_bytes)" in str(info.value)
        assert conn.execute(b"SELECT 1").fetchone() == (1,)
    records = proxy.session_records(app, until=has_disconnect)
    assert [(s.command, s.decision) for s in statements(records)] == [
        ("UNKNOWN", "deny"),
        ("SELECT", "allow"),
    ]


def test_denied_statement_is_refused_at_parse_before_postgres_sees_it(proxy: Proxy) -> None:
    """Parse + Describe of a denied statement get dbward's denial, never the table's shape."""
    app = app_name("guard-parse")
    session = RawSession(proxy, app)
    try:
        session.query("CREATE TEMP TABLE secret_paths (path text, owner text)")
        for table in ("secret_paths", "no_such_table"):  # existing or not: the same answer
            replies = session.send(
                messages.parse_message("s1", f"SELECT pg_read_file(path) FROM {table}")
                + messages.describe_message("S", "s1")
                + messages.sync()
            )
            assert [kind for kind, _ in replies] == [b"E", b"Z"]
            fields = messages.parse_error_fields(replies[0][1])
            assert fields["C"] == "42501" and "table" not in fields["M"], fields
        count = session.query("SELECT count(*) FROM pg_prepared_statements")
        assert [p for kind, p in count if kind == b"D"] == [messages.data_row([b"0"])[5:]]
        # As after PostgreSQL's own parse error, the unnamed statement is gone.
        session.send(messages.parse_message("", "SELECT 1") + messages.sync())
        session.send(messages.parse_message("", "SET ROLE postgres") + messages.sync())
        replies = session.send(
            messages.bind_message("", "", []) + messages.execute_message("") + messages.sync()
        )
        assert [kind for kind, _ in replies] == [b"E", b"Z"]
        assert messages.parse_error_fields(replies[0][1])["C"] == "26000"  # from PostgreSQL
        assert [kind for kind, _ in session.query("SELECT 1")] == [b"T", b"D", b"C", b"Z"]
    finally:
        session.close()
    records = proxy.session_records(app, until=has_disconnect)
    denied = [s for s in statements(records) if s.decision == "deny"]
    assert [(s.path, s.rule) for s in denied[:3]] == [
        ("extended", "guard.server_file"),
        ("extended", "guard.server_file"),
        ("extended", "guard.role_switch"),
    ]
    assert all(outcome_of(records, s).status == "denied" for s in denied)


def test_constant_sql_run_by_a_function_is_allowed_and_audited_with_its_tables(
    proxy: Proxy,
) -> None:
    app = app_name("guard-sqltext")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE notes (body text)")
        conn.execute("INSERT INTO notes VALUES ('hello world')")
        (xml,) = conn.execute(
            "SELECT query_to_xml('SELECT body FROM notes', true, false, '')"
        ).fetchone()
        assert "<body>hello world</body>" in xml
        assert conn.execute("SELECT current_user").fetchone() == (proxy.pg.service_user,)
    records = proxy.session_records(app, until=has_disconnect)
    (call,) = [s for s in statements(records) if "query_to_xml" in s.sql_text]
    assert (call.decision, call.kind, call.tables) == ("allow", "read", ("notes",))
    assert outcome_of(records, call).status == "ok"
