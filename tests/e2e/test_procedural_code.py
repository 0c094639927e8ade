"""DO blocks and functions through dbward: their code is read, and guarded code is refused.

The service role here may read and write server files and run server programs (the powers the
guards fence off), so a guarded statement that slipped through would show on the server. Found
by the eighth review: PL/pgSQL bodies were never read.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.postgres import PgServer
from fixtures.proxy import Proxy

SECRET = "procedural-code-secret-42"
PASSWORD = "Files-Svc-pw-1"


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A directory the PostgreSQL OS user can read and write, holding a secret file."""
    path = Path(tempfile.mkdtemp(prefix="dbward-proc-"))
    path.chmod(0o777)
    secret = path / "secret.txt"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def files_proxy(pg_server: PgServer, proxy_factory: Callable[..., Proxy], tmp_path: Path) -> Proxy:
    """A proxy whose service role holds pg_read/write_server_files and pg_execute_server_program."""
    pg_server.psql(
        "DO $$ BEGIN"
        " IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dbward_files_svc') THEN"
        f"  CREATE ROLE dbward_files_svc LOGIN PASSWORD '{PASSWORD}'"
        "   IN ROLE pg_read_server_files, pg_write_server_files, pg_execute_server_program;"
        "  GRANT EXECUTE ON FUNCTION pg_read_file(text) TO dbward_files_svc;"
        "  GRANT CREATE ON SCHEMA public TO dbward_files_svc;"
        " END IF; END $$"
    )
    password_file = tmp_path / "files-svc-password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    return proxy_factory(upstream={"user": "dbward_files_svc", "password_file": str(password_file)})


def _refused(conn: psycopg.Connection, sql: str, rule_reason: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        conn.execute(sql.encode())
    assert str(info.value).startswith("dbward:") and rule_reason in str(info.value)


def test_guarded_code_inside_plpgsql_is_refused(files_proxy: Proxy, server_dir: Path) -> None:
    secret = server_dir / "secret.txt"
    ran = server_dir / "program-ran"
    written = server_dir / "written"
    app = app_name("plpgsql-guards")
    with psycopg.connect(**files_proxy.conninfo(application_name=app), autocommit=True) as conn:
        # The role really has the power: reading the file directly in PostgreSQL works.
        assert SECRET in files_proxy.pg.psql(
            f"SET ROLE dbward_files_svc; SELECT pg_read_file('{secret}')"
        )
        _refused(
            conn,
            f"DO $$ BEGIN RAISE NOTICE '%', pg_read_file('{secret}'); END $$",
            "files on the database server",
        )
        _refused(  # a record's default is missing from libpg_query's JSON: read from tokens
            conn,
            f"DO $$ DECLARE z record := ROW(pg_read_file('{secret}')); "
            "BEGIN RAISE NOTICE '%', z.f1; END $$",
            "files on the database server",
        )
        for declaration in (  # token-reader misreadings (tenth and thirteenth reviews)
            "DECLARE cursor record := ROW(pg_read_file('{0}')); BEGIN",
            "#variable_conflict use_column\nDECLARE z record := ROW(pg_read_file('{0}')); "
            "BEGIN DECLARE z int; BEGIN END;",
            "BEGIN PERFORM (SELECT 1 AS declare); DECLARE z record := ROW(pg_read_file('{0}')); "
            "BEGIN END;",
        ):
            _refused(
                conn,
                "DO $$ " + declaration.format(secret) + " END $$",
                "files on the database server",
            )
        _refused(
            conn,
            "CREATE FUNCTION public.leak(p text) RETURNS text LANGUAGE plpgsql"
            " AS $$ BEGIN RETURN pg_read_file(p); END $$",
            "files on the database server",
        )
        conn.execute(b"CREATE TEMP TABLE sink (line text)")
        _refused(
            conn,
            f"DO $$ BEGIN COPY sink FROM PROGRAM 'id > {ran}'; END $$",
            "server-side program",
        )
        _refused(
            conn,
            f"DO $$ BEGIN COPY (SELECT 'x') TO '{written}'; END $$",
            "server-side file",
        )
        _refused(
            conn,
            "DO $$ BEGIN EXECUTE format('COPY sink FROM PROGRAM %L', 'id'); END $$",
            "computed at run time",
        )
        # The session carries on; nothing of the refused code ran.
        assert conn.execute(b"SELECT count(*) FROM sink").fetchone() == (0,)
        exists = conn.execute(b"SELECT to_regprocedure('public.leak(text)') IS NOT NULL")
        assert exists.fetchone() == (False,)
    assert not ran.exists() and not written.exists()
    records = files_proxy.session_records(app, until=has_disconnect)
    refused = [r for r in statements(records) if r.command in ("DO", "CREATE FUNCTION")]
    assert len(refused) == 9 and all(r.decision == "deny" for r in refused)
    assert {r.rule for r in refused} == {
        "guard.server_file",
        "guard.copy_program",
        "guard.copy_file",
        "guard.dynamic_sql",
    }


# Found by the fifteenth review: declarations the token reader misread, so that a record's
# default (which libpg_query's JSON leaves out) ran unread. Each runs on PostgreSQL 15.
_MISREAD_RECORD_DEFAULTS = (
    # A useless extra DECLARE shifted the reader onto `cursor` (read as a cursor, no default);
    # the outer ALIAS (no SQL keyword) was counted as a variable named cursor on that line.
    "DO $$ DECLARE cursor ALIAS FOR found; BEGIN DECLARE DECLARE cursor record := {default};"
    " BEGIN RAISE NOTICE '%', cursor; END; END $$",
    # `THEN declare` in SQL started a DECLARE section for the reader: `z := 5` was read as a
    # declaration of z, and `IF cursor THEN DECLARE z record := ...` as a cursor named if.
    "DO $$ DECLARE cursor boolean := true; z int; BEGIN\n"
    "PERFORM CASE WHEN true THEN declare END FROM (SELECT 1 AS declare) s;\n"
    "z := 5; IF cursor THEN DECLARE z record := {default}; BEGIN RAISE NOTICE '%', z; END;"
    " END IF;\nEND $$",
)


def test_record_defaults_the_token_reader_misread_are_refused(
    files_proxy: Proxy, pg_server: PgServer, server_dir: Path
) -> None:
    secret = server_dir / "secret.txt"
    reads = [
        sql.format(default=f"ROW(pg_read_file('{secret}'))") for sql in _MISREAD_RECORD_DEFAULTS
    ]
    switch = _MISREAD_RECORD_DEFAULTS[0].format(
        default="ROW(set_config('role', 'pg_read_server_files', false))"
    )
    # Directly, as the service role: the file is read, the role is switched.
    with psycopg.connect(pg_server.dsn(user="dbward_files_svc", password=PASSWORD)) as direct:
        direct.autocommit = True
        notices: list[str] = []
        direct.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        for sql in reads:
            direct.execute(sql.encode())
        direct.execute(switch.encode())
        assert direct.execute(b"SELECT current_user").fetchone() == ("pg_read_server_files",)
    assert notices[2:] == ["(pg_read_server_files)"]
    assert len(notices) == 3 and all(SECRET in notice for notice in notices[:2])
    # Through dbward: refused, nothing ran.
    with psycopg.connect(**files_proxy.conninfo(), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        _refused(conn, reads[0], "files on the database server")
        _refused(conn, reads[1], "PL/pgSQL only")  # misread, and so not read at all
        _refused(conn, switch, "changing role")
        assert conn.execute(b"SELECT current_user").fetchone() == ("dbward_files_svc",)
    assert len(notices) == 3


def test_refint_triggers_splicing_their_arguments_into_sql_are_refused(
    files_proxy: Proxy, pg_server: PgServer, server_dir: Path
) -> None:
    """refint's check_primary_key builds `select 1 from <argument> where ...` and runs it with
    SPI, which runs every statement in it (fifteenth review): its trigger arguments are SQL
    dbward cannot check. Installed by the database's owners, any role that may create a
    trigger on its own table could run COPY ... TO PROGRAM through it."""
    pg_server.psql(
        "CREATE SCHEMA IF NOT EXISTS refint; GRANT USAGE ON SCHEMA refint TO PUBLIC;"
        " CREATE EXTENSION IF NOT EXISTS refint SCHEMA refint"
    )
    ran = server_dir / "program-ran"
    injected = f"r15pk WHERE false; COPY (SELECT 1) TO PROGRAM ''id > {ran}''; SELECT 1 FROM r15pk"
    trigger = (
        "CREATE TRIGGER r15 BEFORE INSERT ON r15fk FOR EACH ROW"
        f" EXECUTE FUNCTION refint.check_primary_key('id', '{injected}', 'id')"
    )
    try:
        # Directly, as the service role: the program runs when a row is inserted.
        with psycopg.connect(pg_server.dsn(user="dbward_files_svc", password=PASSWORD)) as direct:
            direct.autocommit = True
            direct.execute(b"CREATE TEMP TABLE r15pk (id int)")
            direct.execute(b"CREATE TEMP TABLE r15fk (id int)")
            direct.execute(trigger.encode())
            with pytest.raises(psycopg.errors.TriggeredActionException):
                direct.execute(b"INSERT INTO r15fk VALUES (1)")  # no such key: after the COPY
        assert ran.exists()
        ran.unlink()
        # Through dbward: the trigger is refused.
        with psycopg.connect(**files_proxy.conninfo(), autocommit=True) as conn:
            conn.execute(b"CREATE TEMP TABLE r15pk (id int)")
            conn.execute(b"CREATE TEMP TABLE r15fk (id int)")
            _refused(conn, trigger, "computed at run time")
            _refused(
                conn,
                "ALTER FUNCTION refint.check_primary_key() RENAME TO harmless",
                "computed at run time",
            )
            conn.execute(b"INSERT INTO r15fk VALUES (1)")
        assert not ran.exists()
    finally:
        pg_server.psql("DROP EXTENSION IF EXISTS refint; DROP SCHEMA IF EXISTS refint")


def test_code_in_other_languages_is_refused_and_plain_plpgsql_runs(files_proxy: Proxy) -> None:
    app = app_name("plpgsql-ok")
    notices: list[str] = []
    with psycopg.connect(**files_proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        _refused(
            conn,
            "CREATE FUNCTION pg_temp.rf(text) RETURNS text LANGUAGE internal STRICT"
            " AS 'pg_read_file_all'",
            "SQL and PL/pgSQL only",
        )
        # Everyday PL/pgSQL: a trigger function, a counter, a DO block with constant EXECUTE.
        conn.execute(b"CREATE TEMP TABLE items (id int, touched timestamptz)")
        conn.execute(
            b"CREATE FUNCTION pg_temp.touch() RETURNS trigger LANGUAGE plpgsql"
            b" AS $$ BEGIN NEW.touched := now(); RETURN NEW; END $$"
        )
        conn.execute(
            b"CREATE TRIGGER items_touch BEFORE INSERT ON items"
            b" FOR EACH ROW EXECUTE FUNCTION pg_temp.touch()"
        )
        conn.execute(
            b"DO $$ DECLARE n int; BEGIN EXECUTE 'INSERT INTO items (id) VALUES (1), (2)';"
            b" SELECT count(*) INTO n FROM items WHERE touched IS NOT NULL;"
            b" RAISE NOTICE 'touched %', n; END $$"
        )
    assert notices == ["touched 2"]
    records = files_proxy.session_records(app, until=has_disconnect)
    (do,) = [r for r in statements(records) if r.command == "DO"]
    assert (do.decision, do.tables) == ("allow", ("items",))
    assert outcome_of(records, do).status == "ok"
    (internal,) = [r for r in statements(records) if r.decision == "deny"]
    assert internal.rule == "guard.uninspectable_code"


def test_large_code_is_read_off_the_event_loop_with_the_same_answer(
    files_proxy: Proxy, server_dir: Path
) -> None:
    """From 4 KB on, text that may hold code is classified in the worker pool (reading it costs
    ~2.5 ms per KB): the same guards apply there."""
    filler = " ".join(f"n := n + length('{i}');" for i in range(400))
    allowed = f"DO $$ DECLARE n int := 0; BEGIN {filler} RAISE NOTICE 'n=%', n; END $$"
    leaking = allowed.replace(
        "RAISE NOTICE 'n=%', n;", f"n := length(pg_read_file('{server_dir}/secret.txt'));"
    )
    assert len(allowed) > 4096
    notices: list[str] = []
    with psycopg.connect(**files_proxy.conninfo(), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute(allowed.encode())
        _refused(conn, leaking, "files on the database server")
    assert notices == ["n=1090"]
