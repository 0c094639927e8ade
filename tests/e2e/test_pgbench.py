"""pgbench through dbward in all three protocol modes, with the audit counting every statement."""

from __future__ import annotations

import os
import subprocess

import pytest

from fixtures.clients import app_name, outcomes, statements
from fixtures.proxy import Proxy

TRANSACTIONS = 40  # per client; correctness, not speed (speed lives in bench/)


@pytest.fixture(scope="module")
def pgbench_db(proxy: Proxy) -> None:
    env = {**os.environ, "PGPASSWORD": proxy.pg.service_password}
    subprocess.run(
        [
            "pgbench",
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            proxy.pg.host,
            "-p",
            str(proxy.pg.port),
            "-U",
            proxy.pg.service_user,
            proxy.pg.database,
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
def test_pgbench_modes(proxy: Proxy, pgbench_db: None, mode: str, script: str) -> None:
    app = app_name(f"pgbench-{mode}")
    password, _ = proxy.users["bob"]
    env = {**os.environ, "PGPASSWORD": password, "PGAPPNAME": app}
    result = subprocess.run(
        [
            "pgbench",
            "-h",
            "127.0.0.1",
            "-p",
            str(proxy.port),
            "-U",
            "bob",
            "-M",
            mode,
            "-b",
            script,
            "-c",
            "2",
            "-j",
            "2",
            "-t",
            str(TRANSACTIONS),
            "-n",
            proxy.pg.database,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"number of transactions actually processed: {2 * TRANSACTIONS}/" in result.stdout
    # pgbench opens a third connection first, to check the scale and partitioning
    records = proxy.session_records(
        app, until=lambda rs: [r.event for r in rs].count("disconnect") == 3, timeout=10
    )
    setup_sessions = {
        r.session_id
        for r in statements(records)
        if "pgbench_branches" in r.sql_text and r.sql_text.lower().startswith("select count(*)")
    }
    assert len(setup_sessions) == 1
    intents = [s for s in statements(records) if s.session_id not in setup_sessions]
    per_txn = 1 if script == "select-only" else 7  # BEGIN, 3 UPDATE, SELECT, INSERT, END
    assert len(intents) == 2 * TRANSACTIONS * per_txn
    assert {s.identity for s in intents} == {"bob"}
    expected_path = "simple" if mode == "simple" else "extended"
    assert {s.path for s in intents} == {expected_path}
    done = outcomes(records)
    assert all(done[(s.session_id, s.statement_id)].status == "ok" for s in intents)
    if script == "tpcb-like":
        one_session = [s for s in intents if s.session_id == intents[0].session_id]
        kinds = [s.kind for s in one_session[:7]]
        assert kinds == ["transaction", "write", "read", "write", "write", "write", "transaction"]
