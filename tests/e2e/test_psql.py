"""psql through dbward: queries, multi-statement strings, \\copy both ways, audit records."""

from __future__ import annotations

import psycopg

from dbward.audit.query import search
from fixtures.clients import (
    app_name,
    assert_not_in_audit_files,
    has_disconnect,
    outcome_of,
    outcomes,
    run_psql,
    statements,
)
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy


def test_psql_queries_are_relayed_and_audited(proxy: Proxy) -> None:
    app = app_name("psql")
    result = run_psql(
        proxy.dsn(application_name=app),
        "CREATE TABLE IF NOT EXISTS psql_t (id int primary key, name text)",
        "TRUNCATE psql_t",
        "INSERT INTO psql_t VALUES (1, 'a'), (2, 'b')",
        "SELECT id, name FROM psql_t ORDER BY id",
        "SELECT 1; SELECT 2",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1|a", "2|b", "1", "2"]
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [s.command for s in intents] == [
        "CREATE TABLE",
        "TRUNCATE",
        "INSERT",
        "SELECT",
        "SELECT",
        "SELECT",
    ]
    assert {s.identity for s in records} == {"alice"}
    assert all(s.decision == "allow" and s.path == "simple" for s in intents)
    assert [s.kind for s in intents[:4]] == ["ddl", "ddl", "write", "read"]
    insert = intents[2]
    assert insert.tables == ("psql_t",)
    assert outcome_of(records, insert).rows == 2
    assert outcome_of(records, insert).status == "ok"
    assert outcome_of(records, intents[3]).rows == 2
    # one psql run is one connection: connect, auth_ok, statements and outcomes, disconnect
    events = [r.event for r in records]
    assert events[:2] == ["connect", "auth_ok"] and events[-1] == "disconnect"
    assert events.count("statement") == 6 and len(outcomes(records)) == 6
    # Strict durability: the DDL and the INSERT were forwarded only once their intent was
    # fsync'd, so their outcomes are separate records; the quick reads' outcomes arrived
    # before their intents were written and share their record.
    separate = {r.statement_id for r in records if r.event == "outcome"}
    assert separate == {s.statement_id for s in intents[:3]}
    assert all(s.status == "ok" and s.duration_ms is not None for s in intents[3:])
    assert all(s.status == "" and s.rows is None for s in intents[:3])
    assert [r.statement_id for r in records if r.statement_id] == [1, 1, 2, 2, 3, 3, 4, 5, 6]
    assert records[-1].detail == "statements=6"


def test_psql_copy_both_ways(proxy: Proxy, tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = app_name("psql-copy")
    data = tmp_path / "in.csv"
    data.write_text("".join(f"{i},name {i}\n" for i in range(1, 1001)))
    out = tmp_path / "out.csv"
    result = run_psql(
        proxy.dsn(application_name=app),
        "CREATE TABLE IF NOT EXISTS copy_t (id int, name text)",
        "TRUNCATE copy_t",
        f"\\copy copy_t FROM '{data}' WITH (FORMAT csv)",
        f"\\copy (SELECT * FROM copy_t ORDER BY id) TO '{out}' WITH (FORMAT csv)",
        "SELECT count(*), sum(id) FROM copy_t",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "1000|500500"
    assert out.read_text() == data.read_text()
    records = proxy.session_records(app, until=has_disconnect)
    copies = [s for s in statements(records) if s.command == "COPY"]
    assert [c.path for c in copies] == ["copy", "copy"]
    assert [c.kind for c in copies] == ["write", "read"]
    assert [outcome_of(records, c).rows for c in copies] == [1000, 1000]


def test_psql_copy_to_stdout_among_other_statements(proxy: Proxy) -> None:
    """A COPY TO STDOUT that is not the first statement of a multi-statement string: its
    CopyOutResponse answers the statement after the first one's rows (dbward refuses one
    answering any statement but a COPY TO STDOUT)."""
    app = app_name("psql-copy-out")
    result = run_psql(
        proxy.dsn(application_name=app),
        "SELECT 1; COPY (SELECT 2 UNION ALL SELECT 3) TO STDOUT; SELECT 4",
        "\\copy (SELECT 5) TO STDOUT",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "2", "3", "4", "5"]
    records = proxy.session_records(app, until=has_disconnect)
    assert [s.command for s in statements(records)] == ["SELECT", "COPY", "SELECT", "COPY"]
    copies = [s for s in statements(records) if s.command == "COPY"]
    assert [outcome_of(records, c).rows for c in copies] == [2, 1]
    assert "upstream_lost" not in [r.event for r in records]


def test_psql_error_is_relayed_unchanged(proxy: Proxy) -> None:
    app = app_name("psql-err")
    result = run_psql(proxy.dsn(application_name=app), "SELECT * FROM no_such_table")
    assert 'relation "no_such_table" does not exist' in result.stderr
    direct = run_psql(proxy.pg.dsn(), "SELECT * FROM no_such_table")
    assert result.stderr.replace(str(proxy.port), "") == direct.stderr.replace(
        str(proxy.pg.port), ""
    )
    records = proxy.session_records(app, until=has_disconnect)
    (intent,) = statements(records)
    assert outcome_of(records, intent).sqlstate == "42P01"
    assert outcome_of(records, intent).status == "error"


def test_password_in_sql_never_reaches_the_audit_log(proxy: Proxy) -> None:
    app = app_name("psql-secret")
    secret = "Sup3r-Secret-Literal"
    result = run_psql(
        proxy.dsn(application_name=app),
        f"CREATE ROLE should_not_exist /* was {secret} */ PASSWORD '{secret}' VALID UNTIL"
        " 'infinity'",
    )
    assert "permission denied" in result.stderr  # the service role may not create roles
    records = proxy.session_records(app, until=has_disconnect)
    (intent,) = statements(records)
    assert intent.command == "CREATE ROLE" and intent.kind == "dcl"
    # The record names the role; the literals and comments are out.
    assert intent.sql_text == (
        "CREATE ROLE should_not_exist PASSWORD '…' VALID UNTIL '…'"
        " (literals withheld: it sets a password)"
    )
    assert intent.sql_sha256 == ""
    assert_not_in_audit_files(proxy, secret)


def test_a_do_block_setting_a_password_is_logged_as_code_without_the_password(
    proxy: Proxy,
) -> None:
    """The migration idiom (create the role if missing) is logged with what it does; before,
    the whole text was withheld and the DELETE beside the CREATE ROLE was not in the log."""
    app = app_name("psql-do-secret")
    secret = "D0-Bl0ck-Secret"
    sql = (
        "DO $$ BEGIN\n"
        "  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'should_not_exist') THEN\n"
        f"    CREATE ROLE should_not_exist LOGIN PASSWORD '{secret}';  -- was {secret}\n"
        "  END IF;\n"
        "  DELETE FROM no_such_sessions;\n"
        "END $$"
    )
    result = run_psql(proxy.dsn(application_name=app), sql)
    assert "permission denied" in result.stderr  # the service role may not create roles
    records = proxy.session_records(app, until=has_disconnect)
    (intent,) = statements(records)
    assert intent.command == "DO" and intent.sql_sha256 == ""
    assert intent.sql_text == (
        "DO $$ BEGIN\n"
        "  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '…') THEN\n"
        "    CREATE ROLE should_not_exist LOGIN PASSWORD '…';\n"
        "  END IF;\n"
        "  DELETE FROM no_such_sessions;\n"
        "END $$ (literals withheld: it sets a password)"
    )
    assert_not_in_audit_files(proxy, secret)


def test_passwords_and_keys_in_ordinary_statements_never_reach_the_audit_log(
    proxy: Proxy,
) -> None:
    """Round 55: a plaintext password compared in a WHERE and a DSN stored in a table were
    logged verbatim (only dblink calls and the like were looked at; pgcrypto keys, not
    installed here: tests/unit/test_sql_postgres.py)."""
    app = app_name("psql-plain-secret")
    secret = "Pl4in-Secret"
    sql = [
        "CREATE TEMP TABLE users (email text, password text, dsn text)",
        f"SELECT email FROM users WHERE email = 'a@b' AND password = '{secret}'",
        f"INSERT INTO users (email, dsn) VALUES ('a@b', 'postgresql://app:{secret}@db/app')",
    ]
    result = run_psql(proxy.dsn(application_name=app), *sql)
    assert result.returncode == 0 and not result.stderr, result.stderr
    records = proxy.session_records(app, until=has_disconnect)
    assert [outcome_of(records, r).status for r in statements(records)] == ["ok"] * 3
    texts = [(r.sql_text, r.sql_sha256) for r in statements(records)]
    assert texts == [
        (sql[0] + " (literals withheld: it contains a credential)", ""),  # a password column
        (
            "SELECT email FROM users WHERE email = '…' AND password = '…'"
            " (literals withheld: it contains a credential)",
            "",
        ),
        (
            "INSERT INTO users (email, dsn) VALUES ('…', '…')"
            " (literals withheld: it contains a credential)",
            "",
        ),
    ]
    assert_not_in_audit_files(proxy, secret)


def test_connection_strings_with_passwords_never_reach_the_audit_log(proxy: Proxy) -> None:
    app = app_name("psql-conninfo")
    secret = "Conn1nfo-Secret"
    sql = [
        f"SELECT dblink_connect('c1', 'host=h user=u password={secret} dbname=d')",
        f"SELECT * FROM dblink('postgresql://u:{secret}@h/d', 'SELECT 1') AS t(a int)",
        f"CREATE SUBSCRIPTION s CONNECTION 'host=h password={secret}' PUBLICATION p",
        f"ALTER SYSTEM SET primary_conninfo = 'host=h password={secret}'",
        f"ALTER ROLE app PASSWORD '{secret}",  # mistyped: unparseable, denied, still withheld
        "SELECT dblink_connect('c2', 'host=h dbname=d')",  # no credential: logged as is
    ]
    result = run_psql(proxy.dsn(application_name=app), *sql)
    (denial,) = [line for line in result.stderr.splitlines() if "dbward:" in line]
    assert "statement could not be parsed" in denial and secret not in denial
    records = proxy.session_records(app, until=has_disconnect)
    assert [(r.command, r.sql_text, r.sql_sha256) for r in statements(records)[:5]] == [
        (
            "SELECT",
            "SELECT dblink_connect('…', '…') (literals withheld: it contains a credential)",
            "",
        ),
        (
            "SELECT",
            "SELECT * FROM dblink('…', '…') AS t(a int)"
            " (literals withheld: it contains a credential)",
            "",
        ),
        (
            "CREATE SUBSCRIPTION",
            "CREATE SUBSCRIPTION s CONNECTION '…' PUBLICATION p"
            " (literals withheld: it contains a credential)",
            "",
        ),
        (
            "ALTER SYSTEM",
            "ALTER SYSTEM SET primary_conninfo = '…' (literals withheld: it contains a credential)",
            "",
        ),
        # Unparseable: where the secret ends is unknown, so all of it is withheld.
        ("UNKNOWN", "UNKNOWN (text withheld: it contains a credential)", ""),
    ]
    denied = statements(records)[4]
    assert denied.decision == "deny" and denied.rule == "guard.unparseable"
    assert denied.detail.startswith("unterminated quoted string at or near <...>")
    assert statements(records)[5].sql_text == sql[5]
    assert_not_in_audit_files(proxy, secret)


def test_connection_strings_spelled_as_libpq_reads_them_never_reach_the_audit_log(
    proxy: Proxy,
) -> None:
    """Review round 54: a URI whose password holds a quote (libpq takes everything up to the
    "@" but a space), and the arguments of a plain EXPLAIN EXECUTE (which PostgreSQL accepts),
    were logged verbatim."""
    app = app_name("psql-conninfo-spelling")
    secret = "Quot3d-Secret"
    sql = [
        f"SELECT dblink_connect('postgresql://u:{secret}''x@h/d')",
        f"SELECT dblink_connect($$postgres://o'brien:{secret}@h/d$$)",
        "PREPARE conn_check(text) AS SELECT length($1)",
        f"EXPLAIN EXECUTE conn_check('host=h password={secret}')",
    ]
    result = run_psql(proxy.dsn(application_name=app), *sql)
    assert "Result" in result.stdout  # the EXPLAIN ran
    records = proxy.session_records(app, until=has_disconnect)
    assert [(r.sql_text, r.sql_sha256) for r in statements(records)] == [
        ("SELECT dblink_connect('…') (literals withheld: it contains a credential)", ""),
        ("SELECT dblink_connect('…') (literals withheld: it contains a credential)", ""),
        (sql[2], statements(records)[2].sql_sha256),
        ("EXPLAIN EXECUTE conn_check('…') (literals withheld: it contains a credential)", ""),
    ]
    assert outcome_of(records, statements(records)[3]).status == "ok"
    assert_not_in_audit_files(proxy, secret)


def test_a_password_mistyped_in_double_quotes_never_reaches_the_audit_log(proxy: Proxy) -> None:
    """Review round 54: PostgreSQL's grammar reports `PASSWORD "pw"` as `syntax error at or
    near ""pw""`; the quotes were paired to take the SQL out of the message, which left the
    password itself in the record's `reason` and `detail` (and in the client's error)."""
    app = app_name("psql-dquoted-secret")
    secret = "Dqu0ted-Secret"
    sql = [
        f'ALTER ROLE app PASSWORD "{secret}"',
        f"CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'app', password \"{secret}\")",
        f"ALTER ROLE app PASSWORD 'x' \"{secret}",  # an unterminated quoted identifier
    ]
    result = run_psql(proxy.dsn(application_name=app), *sql)
    denials = [line for line in result.stderr.splitlines() if "dbward:" in line]
    assert len(denials) == 3 and not any(secret in line for line in denials), denials
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [(r.rule, r.sql_text) for r in intents] == [
        ("guard.unparseable", "UNKNOWN (text withheld: it contains a credential)")
    ] * 3
    assert [r.detail for r in intents] == [
        "syntax error at or near <...>, at index 24",
        "syntax error at or near <...>, at index 67",
        "unterminated quoted identifier at or near <...>, at index 28",
    ]
    assert_not_in_audit_files(proxy, secret)


def test_application_name_changed_mid_session_is_recorded(proxy: Proxy) -> None:
    app = app_name("psql-appname")
    renamed = app + "-renamed"
    result = run_psql(
        proxy.dsn(application_name=app), f"SET application_name = '{renamed}'", "SELECT 1"
    )
    assert result.returncode == 0, result.stderr
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [(s.command, s.application_name) for s in intents] == [
        ("SET", app),
        ("SELECT", renamed),
    ]


def test_select_with_side_effects_is_audited_as_write_and_made_durable_first(
    proxy: Proxy,
) -> None:
    app = app_name("psql-nextval")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE IF NOT EXISTS dbward_side_effect_seq")
        value = conn.execute(b"SELECT nextval('dbward_side_effect_seq')").fetchone()
        assert value is not None and value[0] >= 1
        # strict durability: a write's intent is committed before the statement is forwarded,
        # so it is in the log now, without waiting for a batch.
        committed = [
            r
            for r in search(proxy.audit_path, limit=1_000_000)
            if r.application_name == app and r.sql_text.startswith("SELECT nextval")
        ]
        assert [(r.event, r.kind) for r in committed] == [("statement", "write")]
        assert conn.execute(b"SELECT pg_cancel_backend(0)").fetchone() == (False,)
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    assert [(s.command, s.kind) for s in intents] == [
        ("CREATE SEQUENCE", "ddl"),
        ("SELECT", "write"),
        ("SELECT", "admin"),
    ]
    assert [outcome_of(records, s).status for s in intents] == ["ok", "ok", "ok"]


def test_select_changing_a_table_through_a_contrib_function_is_made_durable_first(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """pg_surgery's heap_force_kill deletes a row from a SELECT (eighteenth review: it was a
    read, so in strict durability it ran before its intent record was durable)."""
    pg_server.psql(
        "CREATE EXTENSION IF NOT EXISTS pg_surgery; "
        f"GRANT EXECUTE ON FUNCTION heap_force_kill(regclass, tid[]) TO {pg_server.service_user}"
    )
    app = app_name("psql-surgery")
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE dbward_surgery (x int)")
        conn.execute("INSERT INTO dbward_surgery VALUES (1), (2)")
        conn.execute(b"SELECT heap_force_kill('dbward_surgery'::regclass, ARRAY['(0,1)']::tid[])")
        committed = [
            r
            for r in search(proxy.audit_path, limit=1_000_000)
            if r.application_name == app and r.sql_text.startswith("SELECT heap_force_kill")
        ]
        assert [(r.event, r.kind) for r in committed] == [("statement", "admin")]
        assert committed[0].tables == ("dbward_surgery",)
        count = conn.execute(b"SELECT count(*) FROM dbward_surgery").fetchone()
        assert count == (1,)  # the row is gone: the SELECT changed the table


def test_psql_query_strings_answered_with_fewer_completes_than_statements(proxy: Proxy) -> None:
    """Real PostgreSQL's answers a Query's count of statements is checked against (one
    CommandComplete each, none after an error, EmptyQueryResponse for an empty string): empty
    statements, a comments-only string, an error mid-Query, COPY in a Query and a refused
    statement mid-Query all keep the session."""
    app = app_name("psql-counts")
    result = run_psql(
        proxy.dsn(application_name=app),
        "SELECT 1;;",
        ";",
        "-- only a comment",
        "SELECT 2; SELECT 1/0; SELECT 3",
        "COPY (SELECT 4) TO STDOUT; SELECT 5",
        "SELECT 6; COPY (SELECT 1) TO PROGRAM 'true'; SELECT 7",
        "SELECT 8",
    )
    assert "invalid message" not in result.stderr, result.stderr
    assert "division by zero" in result.stderr, result.stderr
    out = result.stdout.split()
    assert out[0] == "1" and out[-1] == "8", result
    assert "3" not in out and "7" not in out, result
    assert "4" in out and "5" in out, result
    records = proxy.session_records(app, until=has_disconnect)
    assert not [r for r in records if r.event == "upstream_lost"], records
    done = outcomes(records)
    by_command = [(s.command, outcome_of(records, s).status) for s in statements(records)]
    assert ("SELECT", "not_executed") in by_command, by_command
    assert any(status == "denied" for _, status in by_command), by_command
    assert len(done) == len(statements(records))


def test_secrets_libpq_or_postgresql_read_beyond_literals_never_reach_the_audit_log(
    proxy: Proxy,
) -> None:
    """Round 56: libpq decodes a URI's parameter names ("?pass%77ord=" is "?password="), and
    PostgreSQL 15's libpq takes a space in a URI's password: both were logged verbatim. So was
    a parser message naming a quoted identifier without its quotes, and a setting's value
    given as a name (`SET app.password = Hunter2`)."""
    app = app_name("psql-encoded-conninfo")
    secret = "Perc3nt-Secret"
    sql = [
        "CREATE TEMP TABLE dsns (dsn text)",
        "INSERT INTO dsns VALUES ('warm the template cache')",
        f"INSERT INTO dsns VALUES ('postgresql://h/d?user=u&pass%77ord={secret}')",
        f"INSERT INTO dsns VALUES ('postgresql://u:{secret} x@h/d')",
        # A pgcrypto key in SQL text that is stored (or sent through dblink_exec): no call.
        f"INSERT INTO dsns VALUES ('SELECT hmac(''d'', ''{secret}'', ''md5'')')",
        # A setting's value needs no quotes.
        f"SET app.password = {secret.replace('-', '_')}",
        f'SET app.password = "{secret}"',
        # The parser names a too-long name's parts without quotes: it was in reason and detail.
        f'SELECT * FROM a.b.c."host=h password={secret}"',
    ]
    result = run_psql(proxy.dsn(application_name=app), *sql)
    (denial,) = result.stderr.splitlines()
    assert "too many dotted names): <...>" in denial and secret not in denial
    records = proxy.session_records(app, until=has_disconnect)
    assert [r.sql_text for r in statements(records)[2:]] == [
        "INSERT INTO dsns VALUES ('…') (literals withheld: it contains a credential)",
        "INSERT INTO dsns VALUES ('…') (literals withheld: it contains a credential)",
        "INSERT INTO dsns VALUES ('…') (literals withheld: it contains a credential)",
        "SET app.password = '…' (literals withheld: it contains a credential)",
        "SET app.password = '…' (literals withheld: it contains a credential)",
        "UNKNOWN (text withheld: it contains a credential)",
    ]
    audit = proxy.audit_path.read_bytes()
    assert secret.encode() not in audit and secret.replace("-", "_").lower().encode() not in audit
    wal = proxy.audit_path.with_name(proxy.audit_path.name + "-wal")
    assert not wal.exists() or secret.encode() not in wal.read_bytes()
