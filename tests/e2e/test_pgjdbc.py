"""pgjdbc (the JDBC driver of DBeaver, DataGrip, Metabase) through dbward, with the audit.

One JVM runs every scenario of tests/clients/java/JdbcChecks.java (module fixture `jdbc`), each
on its own connection named "<prefix>-<scenario>"; the scenarios check their results in Java,
the tests here check what they report and the audit records their statements produced.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from dbward.audit.records import AuditRecord
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.drivers import outcomes_of
from fixtures.foreign_clients import ScenarioRun, run_jdbc
from fixtures.proxy import Proxy
from fixtures.tls import TestCA

SCENARIOS = [
    "types",
    "server_prepare",
    "statement_cache",
    "batch",
    "batch_rewrite",
    "transaction",
    "metadata",
    "errors",
    "deny",
    "autosave",
    "simple_mode",
    "large_object",
    "copy",
    "cancel",
    "fetch_size",
]


def _jdbc_url(port: int, host: str = "127.0.0.1", **params: str) -> str:
    query = "&".join(f"{k}={quote(v)}" for k, v in params.items())
    return f"jdbc:postgresql://{host}:{port}/app?{query}"


@pytest.fixture(scope="module")
def jdbc(proxy: Proxy, pgjdbc_jar: Path) -> ScenarioRun:
    """Every scenario, run once through the module's dbward (plaintext, SCRAM)."""
    with psycopg.connect(**proxy.conninfo(application_name="jdbc-setup"), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS jdbc_items, jdbc_serial")
        conn.execute(
            "CREATE TABLE jdbc_items (id int PRIMARY KEY, name text, price numeric(10,2),"
            " at timestamp, data bytea, flag boolean)"
        )
        conn.execute("CREATE TABLE jdbc_serial (id bigserial PRIMARY KEY, label text)")
    password = proxy.users["alice"][0]
    url = _jdbc_url(proxy.port, sslmode="disable")
    return run_jdbc(pgjdbc_jar, url, "alice", password, app_name("jdbc"), SCENARIOS)


def _session(proxy: Proxy, jdbc: ScenarioRun, scenario: str) -> list[AuditRecord]:
    return proxy.session_records(jdbc.app(scenario), until=has_disconnect)


def _statuses(records: list[AuditRecord], intents: list[AuditRecord]) -> list[str]:
    return [outcome_of(records, s).status for s in intents]


def _common(records: list[AuditRecord]) -> list[AuditRecord]:
    """Checks every pgjdbc session shares; returns its statements after the two login SETs."""
    assert {r.identity for r in records} == {"alice"}
    assert [r.event for r in records][:2] == ["connect", "auth_ok"]
    intents = statements(records)
    assert [s.sql_text for s in intents[:2]] == [
        "SET extra_float_digits = 3",
        f"SET application_name = '{records[-1].application_name}'",
    ]
    assert _statuses(records, intents[:2]) == ["ok", "ok"]
    return intents[2:]


def test_statement_and_prepared_statement_types(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("types")
    assert int(facts["generated_key"]) >= 1
    records = _session(proxy, jdbc, "types")
    intents = _common(records)
    assert [s.command for s in intents] == [
        "DELETE",
        "SELECT",
        "INSERT",
        "INSERT",
        "SELECT",
        "SELECT",
        "INSERT",
        "SELECT",
    ]
    assert {s.path for s in intents} == {"extended"}
    assert {s.decision for s in intents} == {"allow"}
    assert _statuses(records, intents) == ["ok"] * 8
    inserts = [s for s in intents if s.command == "INSERT"]
    assert [s.tables for s in inserts] == [("jdbc_items",), ("jdbc_items",), ("jdbc_serial",)]
    assert [s.kind for s in inserts] == ["write"] * 3
    assert [outcome_of(records, s).rows for s in inserts] == [1, 1, 1]
    # the text PostgreSQL ran: pgjdbc's $n placeholders, and the RETURNING it appends for
    # getGeneratedKeys
    assert inserts[0].sql_text.endswith("VALUES ($1, $2, $3, $4, $5, $6)")
    assert inserts[2].sql_text == 'INSERT INTO jdbc_serial (label) VALUES ($1)\nRETURNING "id"'


def test_prepare_threshold_named_statement_and_binary_transfer(
    proxy: Proxy, jdbc: ScenarioRun
) -> None:
    facts = jdbc.facts("server_prepare")
    # pgjdbc's PGStatement.isUseServerPrepare() turns true once it uses a named statement
    assert facts["server_side"].startswith("[false") and facts["server_side"].endswith("true]")
    records = _session(proxy, jdbc, "server_prepare")
    intents = _common(records)
    assert len(intents) == 8
    assert {(s.command, s.path, s.kind, s.tables) for s in intents} == {
        ("SELECT", "extended", "read", ("jdbc_items",))
    }
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in intents] == [
        ("ok", 1)
    ] * 8
    # a statement cache of 2 for 3 queries: each is closed (Close) and prepared again
    jdbc.facts("statement_cache")
    records = _session(proxy, jdbc, "statement_cache")
    intents = _common(records)
    assert [s.sql_text for s in intents] == [f"SELECT $1::int + {q}" for q in (1, 2, 3)] * 6
    assert _statuses(records, intents) == ["ok"] * 18
    assert [r for r in records if r.decision == "deny"] == []


def test_execute_batch(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("batch")
    assert facts["counts"] == "[" + ", ".join(["1"] * 20) + "]"
    assert facts["batch_error_sqlstate"] == "23505"
    records = _session(proxy, jdbc, "batch")
    intents = _common(records)
    inserts = [s for s in intents if s.command == "INSERT"]
    assert len(inserts) == 22
    assert {s.sql_text for s in inserts} == {
        "INSERT INTO jdbc_items (id, name, flag) VALUES ($1, $2, $3)"
    }
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in inserts[:20]] == [
        ("ok", 1)
    ] * 20
    # the failing batch: the duplicate key fails, the rest of the batch (same Sync) never runs
    assert [outcomes_of(records, s) for s in inserts[20:]] == [
        [("error", "23505")],
        [("not_executed", "")],
    ]
    assert outcome_of(records, intents[-1]).status == "ok"


def test_execute_batch_rewritten_inserts(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("batch_rewrite")
    # reWriteBatchedInserts: the driver reports SUCCESS_NO_INFO (-2) for every row
    assert facts["counts"] == "[" + ", ".join(["-2"] * 20) + "]"
    records = _session(proxy, jdbc, "batch_rewrite")
    inserts = [s for s in _common(records) if s.command == "INSERT"]
    # 20 rows as multi-row VALUES statements of 16 and 4 rows: one audit record each, with
    # the true row counts
    assert [outcome_of(records, s).rows for s in inserts] == [16, 4]
    assert inserts[0].sql_text.startswith(
        "INSERT INTO jdbc_items (id, name, flag) VALUES ($1, $2, $3),($4, $5, $6),"
    )
    assert inserts[0].sql_text.endswith("($46, $47, $48)")
    assert {(s.kind, s.tables, outcome_of(records, s).status) for s in inserts} == {
        ("write", ("jdbc_items",), "ok")
    }


def test_transaction_commit_rollback_and_a_denial_inside(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("transaction")
    assert facts["denied_in_tx_sqlstate"] == "42501"
    assert facts["aborted_sqlstate"] == "25P02"  # the denial aborted the transaction
    records = _session(proxy, jdbc, "transaction")
    intents = _common(records)
    assert [s.command for s in intents] == [
        "BEGIN",
        "INSERT",
        "COMMIT",
        "BEGIN",
        "INSERT",
        "ROLLBACK",
        "BEGIN",
        "SELECT",
        "COMMIT",
        "BEGIN",
        "INSERT",
        "SET",
        "SELECT",
        "ROLLBACK",
        "BEGIN",
        "SELECT",
        "COMMIT",
    ]
    committed, rolled_back, lost = (s for s in intents if s.command == "INSERT")
    assert outcomes_of(records, committed) == [("ok", "")]
    # an INSERT that succeeded and was then rolled back says both
    assert outcomes_of(records, rolled_back) == [("ok", ""), ("rolled_back", "")]
    assert outcomes_of(records, lost) == [("ok", ""), ("rolled_back", "")]
    denied = next(s for s in intents if s.command == "SET")
    assert (denied.decision, denied.rule, denied.sql_text) == (
        "deny",
        "guard.role_switch",
        "SET ROLE postgres",
    )
    assert outcomes_of(records, denied) == [("denied", "42501")]
    # the next statement's Parse fails in the aborted transaction: that is its outcome
    aborted = intents[intents.index(denied) + 1]
    assert outcomes_of(records, aborted) == [("error", "25P02")]
    assert [r for r in records if r.decision == "deny"] == [denied]


def test_database_metadata_is_not_denied(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("metadata")
    assert facts["driver"] == "42.5.5" or facts["driver"].startswith("42.")
    assert facts["user"] == "alice"  # the identity, not the upstream service role
    assert "jdbc_items" in facts["tables"].split(",")
    records = _session(proxy, jdbc, "metadata")
    intents = _common(records)
    assert [r for r in records if r.decision == "deny"] == []
    assert len(intents) >= 25
    assert set(_statuses(records, intents)) == {"ok"}
    catalog_reads = [s for s in intents if any(t.startswith("pg_catalog.") for t in s.tables)]
    assert len(catalog_reads) >= 15
    assert {s.kind for s in catalog_reads} == {"read"}
    # setTransactionIsolation / setSchema and the tool's own SETs are session settings
    assert {
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET SESSION search_path TO 'public'",
        'SET search_path = "$user", public',
    } <= {s.sql_text for s in intents}


def test_errors_at_parse_bind_and_execute_are_audited_with_their_sqlstate(
    proxy: Proxy, jdbc: ScenarioRun
) -> None:
    # pgjdbc sends Parse/Bind/Describe/Execute/Sync for every statement: an error at Parse or
    # Bind makes PostgreSQL skip the Execute, and the statement's outcome is that error (it
    # was `not_executed` with no SQLSTATE before: an unknown table left no error in the audit)
    facts = jdbc.facts("errors")
    assert facts["sqlstates"] == "42P01,22P02,22012,23505,22P02,42P01"
    records = _session(proxy, jdbc, "errors")
    intents = _common(records)
    assert [(s.sql_text, outcomes_of(records, s)) for s in intents] == [
        ("SELECT * FROM jdbc_no_such_table", [("error", "42P01")]),  # at Parse
        ("SELECT 'x'::int", [("error", "22P02")]),  # at Parse
        ("SELECT 1/0", [("error", "22012")]),  # at Bind (planning)
        ("INSERT INTO jdbc_items (id) VALUES (500), (500)", [("error", "23505")]),  # Execute
        ("SELECT $1::int", [("error", "22P02")]),  # at Bind (the parameter)
        # getParameterMetaData: Parse, Describe, Sync; the refused Parse is the record
        ("SELECT * FROM jdbc_missing WHERE id = $1", [("error", "42P01")]),
        ("SELECT 1", [("ok", "")]),
    ]


def test_denied_statement_then_the_connection_goes_on(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("deny")
    assert facts["statement_sqlstate"] == "42501"
    assert facts["prepared_sqlstate"] == "42501"
    assert facts["statement_message"].startswith("ERROR: dbward: changing role")
    records = _session(proxy, jdbc, "deny")
    intents = _common(records)
    assert [(s.sql_text, s.decision, s.rule) for s in intents] == [
        ("SET ROLE postgres", "deny", "guard.role_switch"),
        ("SELECT current_user, 7", "allow", "default.allow"),
        ("SELECT set_config('role', $1, false)", "deny", "guard.role_switch"),
        ("SELECT 8", "allow", "default.allow"),
    ]
    assert [outcomes_of(records, s) for s in intents] == [
        [("denied", "42501")],
        [("ok", "")],
        [("denied", "42501")],
        [("ok", "")],
    ]


def test_autosave_rolls_back_to_the_savepoint_after_a_denial(
    proxy: Proxy, jdbc: ScenarioRun
) -> None:
    assert jdbc.facts("autosave")["denied_sqlstate"] == "42501"
    records = _session(proxy, jdbc, "autosave")
    intents = _common(records)
    assert [s.sql_text for s in intents] == [
        "BEGIN",
        "SAVEPOINT PGJDBC_AUTOSAVE",
        "INSERT INTO jdbc_items (id, name) VALUES (400, 'kept')",
        "SAVEPOINT PGJDBC_AUTOSAVE",
        "SET ROLE postgres",
        "ROLLBACK TO SAVEPOINT PGJDBC_AUTOSAVE",
        "SAVEPOINT PGJDBC_AUTOSAVE",
        "INSERT INTO jdbc_items (id, name) VALUES (401, 'kept too')",
        "COMMIT",
        "SELECT count(*) FROM jdbc_items WHERE id IN (400, 401)",
    ]
    assert _statuses(records, intents) == ["ok"] * 4 + ["denied"] + ["ok"] * 5
    # both INSERTs were committed: neither has a rolled_back outcome
    for insert in (s for s in intents if s.command == "INSERT"):
        assert outcomes_of(records, insert) == [("ok", "")]


def test_prefer_query_mode_simple(proxy: Proxy, jdbc: ScenarioRun) -> None:
    assert jdbc.facts("simple_mode")["denied_sqlstate"] == "42501"
    records = _session(proxy, jdbc, "simple_mode")
    intents = _common(records)
    assert {s.path for s in statements(records)} == {"simple"}
    # the parameters were interpolated by pgjdbc: the audit has the literal text
    assert [s.sql_text for s in intents] == [
        "SELECT ('it''s')::text || '!', ('21'::int4)::int * 2",
        "SET ROLE postgres",
        "SELECT 1",
    ]
    assert _statuses(records, intents) == ["ok", "denied", "ok"]


def test_large_object_api_is_refused_sql_functions_work(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("large_object")
    assert facts["fastpath_sqlstate"] == "42501"
    assert "FunctionCall" in facts["fastpath_message"]
    records = _session(proxy, jdbc, "large_object")
    intents = _common(records)
    call = next(s for s in intents if s.path == "function_call")
    assert (call.decision, call.rule, call.command) == (
        "deny",
        "guard.function_call",
        "FUNCTION CALL",
    )
    assert outcomes_of(records, call) == [("denied", "42501")]
    assert [r for r in records if r.decision == "deny"] == [call]
    sql_calls = [s for s in intents if "lo_from_bytea" in s.sql_text or "lo_get" in s.sql_text]
    assert _statuses(records, sql_calls) == ["ok", "ok"]


def test_copy_manager_in_and_out(proxy: Proxy, jdbc: ScenarioRun) -> None:
    assert jdbc.facts("copy")["bad_copy_sqlstate"] == "22P02"
    records = _session(proxy, jdbc, "copy")
    copies = [s for s in _common(records) if s.command == "COPY"]
    assert [(s.path, s.kind) for s in copies] == [
        ("copy", "write"),
        ("copy", "write"),
        ("copy", "read"),
        ("copy", "write"),
    ]
    assert [
        (
            outcome_of(records, s).status,
            outcome_of(records, s).rows,
            outcome_of(records, s).sqlstate,
        )
        for s in copies
    ] == [("ok", 5000, ""), ("ok", 2, ""), ("ok", 5002, ""), ("error", None, "22P02")]
    assert {s.tables for s in copies} == {("jdbc_copy",)}


def test_statement_cancel(proxy: Proxy, jdbc: ScenarioRun) -> None:
    facts = jdbc.facts("cancel")
    assert facts["sqlstate"] == "57014"
    assert int(facts["elapsed_ms"]) < 5000
    records = _session(proxy, jdbc, "cancel")
    intents = _common(records)
    assert [s.sql_text for s in intents] == ["SELECT pg_sleep(20)", "SELECT 9"]
    assert [outcomes_of(records, s) for s in intents] == [[("error", "57014")], [("ok", "")]]
    # pgjdbc's CancelRequest arrives on a new connection and is matched to the session
    session = intents[0].session_id
    cancels = proxy.audit(
        event="cancel", until=lambda rs: any(r.detail == f"session={session}" for r in rs)
    )
    assert [r.status for r in cancels if r.detail == f"session={session}"] == ["forwarded"]


def test_fetch_size_portal_suspension(proxy: Proxy, jdbc: ScenarioRun) -> None:
    jdbc.facts("fetch_size")
    records = _session(proxy, jdbc, "fetch_size")
    intents = _common(records)
    big = [s for s in intents if "generate_series(1, $1)" in s.sql_text]
    # one record per Execute: 20 of 500 rows each (PortalSuspended), then the end (0 rows)
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in big] == [
        ("suspended", 500)
    ] * 20 + [("ok", 0)]
    assert sum(outcome_of(records, s).rows or 0 for s in big) == 10_000
    # the second result (fetch size 100) stayed open while another query ran in between
    small = [s for s in intents if s.sql_text == "SELECT g FROM generate_series(1, 1000) g"]
    assert [outcome_of(records, s).rows for s in small] == [100] * 10 + [0]
    between = next(s for s in intents if s.sql_text == "SELECT 10")
    assert small[0].statement_id < between.statement_id < small[1].statement_id
    assert (intents[0].command, intents[-1].command) == ("BEGIN", "COMMIT")


def test_tls_verify_full(tls_proxy: Proxy, test_ca: TestCA, pgjdbc_jar: Path) -> None:
    password = tls_proxy.users["alice"][0]
    prefix = app_name("jdbc-tls")
    url = _jdbc_url(
        tls_proxy.port, "localhost", sslmode="verify-full", sslrootcert=str(test_ca.ca_cert)
    )
    run = run_jdbc(pgjdbc_jar, url, "alice", password, prefix, ["tls", "cancel"])
    run.facts("tls")
    # pgjdbc 42.5 sends its CancelRequest in plaintext even for a TLS session; dbward takes it
    assert run.facts("cancel")["sqlstate"] == "57014"
    records = tls_proxy.session_records(run.app("tls"), until=has_disconnect)
    intents = _common(records)
    assert [s.sql_text for s in intents] == ["SELECT 'over tls', current_user"] + [
        "SELECT $1::int * 3"
    ] * 6
    assert _statuses(records, intents) == ["ok"] * 7
    # a plaintext pgjdbc is refused by a listener that requires TLS
    url = _jdbc_url(tls_proxy.port, sslmode="disable")
    run = run_jdbc(pgjdbc_jar, url, "alice", password, f"{prefix}-plain", ["tls"])
    assert not run.results["tls"].ok
    assert "this listener requires TLS" in run.results["tls"].error
