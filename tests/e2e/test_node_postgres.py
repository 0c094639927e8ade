"""node-postgres (pg@8, with pg-cursor and pg-query-stream) through dbward, with the audit.

One node process runs every scenario of tests/clients/node/checks.js (module fixture `node`),
each on its own connection(s) named "<prefix>-<scenario>"; the scenarios check their results
in JavaScript, the tests here check what they report and the audit records.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from dbward.audit.records import AuditRecord
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.drivers import outcomes_of
from fixtures.foreign_clients import ScenarioRun, run_node
from fixtures.proxy import Proxy
from fixtures.tls import TestCA

SCENARIOS = ["simple", "params", "named", "transaction", "deny", "pool", "notify", "cursor"]


def _env(proxy: Proxy, **extra: str) -> dict[str, str]:
    return {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(proxy.port),
        "PGUSER": "alice",
        "PGPASSWORD": proxy.users["alice"][0],
        "PGDATABASE": "app",
        **extra,
    }


@pytest.fixture(scope="module")
def node(proxy: Proxy, node_modules: Path) -> ScenarioRun:
    """Every scenario, run once through the module's dbward (plaintext, SCRAM)."""
    with psycopg.connect(**proxy.conninfo(application_name="node-setup"), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS node_items")
        conn.execute(
            "CREATE TABLE node_items (id int PRIMARY KEY, name text, price numeric(10,2),"
            " at timestamptz, data bytea, flag boolean, doc jsonb)"
        )
    return run_node(_env(proxy, PGSSLMODE="disable"), app_name("node"), SCENARIOS)


def _session(
    proxy: Proxy, node: ScenarioRun, scenario: str, sessions: int = 1
) -> list[AuditRecord]:
    return proxy.session_records(
        node.app(scenario),
        until=lambda rs: [r.event for r in rs].count("disconnect") == sessions,
    )


def _statuses(records: list[AuditRecord], intents: list[AuditRecord]) -> list[str]:
    return [outcome_of(records, s).status for s in intents]


def _common(records: list[AuditRecord], app: str) -> list[AuditRecord]:
    """node-postgres sends application_name at login: every record carries it."""
    assert {r.identity for r in records} == {"alice"}
    assert {r.application_name for r in records if r.event != "outcome"} == {app}
    return statements(records)


def test_simple_queries_and_an_unparseable_one(proxy: Proxy, node: ScenarioRun) -> None:
    facts = node.facts("simple")
    # dbward refuses what it cannot parse (guard.unparseable): 42501, not PostgreSQL's 42601
    assert facts["syntax_error_code"] == "42501"
    assert facts["syntax_error_message"].startswith("dbward: statement could not be parsed")
    records = _session(proxy, node, "simple")
    intents = _common(records, node.app("simple"))
    assert [(s.path, s.sql_text) for s in intents] == [
        ("simple", "SELECT 1 AS one, 'x'::text AS t"),
        ("simple", "SELECT 1 AS a"),  # a multi-statement string: one record per statement
        ("simple", "SELECT 2 AS b, 3 AS c"),
        ("simple", "SELEC 1"),
        ("simple", "SELECT 'still here' AS s"),
    ]
    assert _statuses(records, intents) == ["ok", "ok", "ok", "denied", "ok"]
    assert (intents[3].rule, outcome_of(records, intents[3]).sqlstate) == (
        "guard.unparseable",
        "42501",
    )
    # the empty query and the comment-only one (extended) are no statements
    assert len(intents) == 5


def test_parameterized_queries_unnamed_statements(proxy: Proxy, node: ScenarioRun) -> None:
    node.facts("params")
    records = _session(proxy, node, "params")
    intents = _common(records, node.app("params"))
    assert [(s.command, s.path) for s in intents] == [
        ("DELETE", "simple"),  # no values: the simple protocol
        ("INSERT", "extended"),
        ("INSERT", "extended"),
        ("SELECT", "extended"),
        ("SELECT", "extended"),
        ("SELECT", "extended"),
    ]
    assert _statuses(records, intents) == ["ok"] * 6
    inserts = [s for s in intents if s.command == "INSERT"]
    assert {(s.kind, s.tables) for s in inserts} == {("write", ("node_items",))}
    assert [outcome_of(records, s).rows for s in inserts] == [1, 1]
    assert inserts[0].sql_text.endswith("VALUES ($1, $2, $3, $4, $5, $6, $7)")


def test_named_prepared_statements_reused(proxy: Proxy, node: ScenarioRun) -> None:
    # both statements are still prepared on the server at the end: parsed once, bound 6 times
    assert node.facts("named")["prepared"] == "double-it,item-name"
    records = _session(proxy, node, "named")
    intents = _common(records, node.app("named"))
    assert [s.sql_text for s in intents[:12]] == [
        "SELECT $1::int * 2 AS v",
        "SELECT name FROM node_items WHERE id = $1",
    ] * 6
    assert {s.path for s in intents[:12]} == {"extended"}
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in intents] == [
        ("ok", 1)
    ] * 12 + [("ok", 2)]


def test_transaction(proxy: Proxy, node: ScenarioRun) -> None:
    node.facts("transaction")
    records = _session(proxy, node, "transaction")
    intents = _common(records, node.app("transaction"))
    assert [s.command for s in intents] == [
        "BEGIN",
        "INSERT",
        "COMMIT",
        "BEGIN",
        "INSERT",
        "ROLLBACK",
        "SELECT",
    ]
    committed, rolled_back = (s for s in intents if s.command == "INSERT")
    assert outcomes_of(records, committed) == [("ok", "")]
    assert outcomes_of(records, rolled_back) == [("ok", ""), ("rolled_back", "")]


def test_denials_then_the_client_goes_on(proxy: Proxy, node: ScenarioRun) -> None:
    facts = node.facts("deny")
    assert facts["simple_code"] == facts["extended_code"] == facts["named_code"] == "42501"
    assert facts["in_tx_code"] == "42501" and facts["aborted_code"] == "25P02"
    assert facts["simple_message"].startswith("dbward: changing role")
    records = _session(proxy, node, "deny")
    intents = _common(records, node.app("deny"))
    assert [(s.path, s.sql_text, s.decision) for s in intents] == [
        ("simple", "SET ROLE postgres", "deny"),
        ("simple", "SELECT 7 AS v", "allow"),
        ("extended", "SELECT set_config('role', $1, false)", "deny"),
        ("extended", "SELECT $1::int AS v", "allow"),
        ("extended", "SELECT set_config('role', $1, false)", "deny"),
        ("simple", "SELECT 9 AS v", "allow"),
        ("simple", "BEGIN", "allow"),
        ("simple", "SET ROLE postgres", "deny"),
        ("simple", "SELECT 1", "allow"),
        ("simple", "ROLLBACK", "allow"),
        ("simple", "SELECT current_user AS u", "allow"),
    ]
    assert {s.rule for s in intents if s.decision == "deny"} == {"guard.role_switch"}
    assert [outcomes_of(records, s) for s in intents if s.decision == "deny"] == [
        [("denied", "42501")]
    ] * 4
    assert _statuses(records, intents) == [
        "ok" if s.decision == "allow" else "denied" for s in intents[:8]
    ] + ["error", "ok", "ok"]
    assert outcomes_of(records, intents[8]) == [("error", "25P02")]  # the aborted transaction


def test_pool_concurrent_queries(proxy: Proxy, node: ScenarioRun) -> None:
    facts = node.facts("pool")
    assert facts["total_count"] == 4
    # 12 queries of 0.2 s over 4 connections: about 3 rounds (0.6 s), not 12 in a row (2.4 s)
    assert facts["elapsed_ms"] < 2400
    records = _session(proxy, node, "pool", sessions=4)
    assert [r.event for r in records].count("auth_ok") == 4
    intents = _common(records, node.app("pool"))
    sleeps = [s for s in intents if "pg_sleep" in s.sql_text]
    assert len(sleeps) == 12 and len({s.session_id for s in sleeps}) == 4
    assert _statuses(records, sleeps) == ["ok"] * 12
    checkout = [s.sql_text for s in intents if "pg_sleep" not in s.sql_text]
    assert checkout == ["BEGIN", "SELECT 1", "COMMIT"]


def test_listen_notify(proxy: Proxy, node: ScenarioRun) -> None:
    node.facts("notify")
    records = _session(proxy, node, "notify", sessions=2)
    intents = _common(records, node.app("notify"))
    assert sorted(s.sql_text for s in intents) == [
        "LISTEN dbward_node_events",
        "NOTIFY dbward_node_events, 'hello'",
        "SELECT pg_notify($1, $2)",
    ]
    assert _statuses(records, intents) == ["ok"] * 3


def test_pg_cursor_and_query_stream(proxy: Proxy, node: ScenarioRun) -> None:
    assert node.facts("cursor")["reads"] == 11
    records = _session(proxy, node, "cursor")
    intents = _common(records, node.app("cursor"))
    # pg-cursor: Execute with a row limit and Flush, no Sync, between reads
    cursor = [s for s in intents if s.sql_text == "SELECT g FROM generate_series(1, $1) g"]
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in cursor] == [
        ("suspended", 100)
    ] * 10 + [("ok", 0)]
    early = [s for s in intents if s.sql_text == "SELECT g FROM generate_series(1, 1000) g"]
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in early] == [
        ("suspended", 5)
    ]
    stream = [s for s in intents if "md5(g::text)" in s.sql_text]
    assert [(outcome_of(records, s).status, outcome_of(records, s).rows) for s in stream] == [
        ("suspended", 1000)
    ] * 10 + [("ok", 0)]
    after = [s.sql_text for s in intents if s.path == "simple"]
    assert after == ["SELECT 11 AS v", "SELECT 12 AS v"]
    assert [r for r in records if r.decision == "deny"] == []


@pytest.mark.parametrize("binding", [False, True], ids=["scram", "scram-plus"])
def test_tls_verify_and_channel_binding(
    tls_proxy: Proxy, test_ca: TestCA, node_modules: Path, binding: bool
) -> None:
    env = _env(
        tls_proxy,
        DBWARD_TEST_CA=str(test_ca.ca_cert),
        DBWARD_TEST_CHANNEL_BINDING="1" if binding else "0",
    )
    run = run_node(env, app_name("node-tls"), ["tls"])
    facts = run.facts("tls")
    assert facts["encrypted"] is True
    assert facts["mechanism"] == ("SCRAM-SHA-256-PLUS" if binding else "SCRAM-SHA-256")
    records = tls_proxy.session_records(run.app("tls"), until=has_disconnect)
    intents = _common(records, run.app("tls"))
    assert [(s.sql_text, outcome_of(records, s).status) for s in intents] == [
        ("SELECT $1::text AS v", "ok")
    ]
