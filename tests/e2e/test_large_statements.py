"""Statements of 64 KB and more are classified in a worker process, off the relay's loop."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from dbward.sql.offload import OFFLOAD_MIN_BYTES
from dbward.sql.postgres import PostgresClassifier
from fixtures.clients import app_name, has_disconnect, outcome_of, statements
from fixtures.proxy import Proxy, stop_proxy


def _bulk_insert(rows: int, table: str = "dbward_bulk") -> str:
    values = ",".join(f"({i}, 'name {i}', now())" for i in range(rows))
    return f"INSERT INTO {table} (id, name, at) VALUES {values}"


def test_large_statements_run_and_are_classified(proxy: Proxy) -> None:
    app = app_name("large")
    big = _bulk_insert(5_000)
    assert len(big) > OFFLOAD_MIN_BYTES
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS dbward_bulk (id int, name text, at timestamptz)")
        conn.execute("TRUNCATE dbward_bulk")
        conn.execute(big.encode())  # simple Query
        # Extended protocol, pipelined: the large Parse waits for its classification and the
        # statements after it keep their order.
        with conn.pipeline():
            cur = conn.cursor()
            cur.execute(big.replace("'name ", "'other ") + " RETURNING 1")
            first = conn.cursor().execute("SELECT count(*) FROM dbward_bulk")
            second = conn.cursor().execute("SELECT %s::int", (7,))
        assert len(cur.fetchall()) == 5_000
        assert first.fetchone() == (10_000,)
        assert second.fetchone() == (7,)
        # A large statement is still checked: a role switch hidden at its end is refused.
        refused = big + "; SET ROLE postgres"
        try:
            conn.execute(refused.encode())
            raise AssertionError("the hidden SET ROLE was not refused")
        except psycopg.errors.InsufficientPrivilege as exc:
            assert str(exc).startswith("dbward: changing role")
        assert conn.execute("SELECT count(*) FROM dbward_bulk").fetchone() == (10_000,)
    records = proxy.session_records(app, until=has_disconnect)
    intents = statements(records)
    inserts = [s for s in intents if s.command == "INSERT"]
    assert [(s.kind, s.tables, s.decision) for s in inserts] == [
        ("write", ("dbward_bulk",), "allow"),
        ("write", ("dbward_bulk",), "allow"),
        ("write", ("dbward_bulk",), "deny"),
    ]
    assert [outcome_of(records, s).status for s in inserts] == ["ok", "ok", "denied"]


@pytest.mark.parametrize("parts", [1_500, 4_000], ids=["inline", "worker"])
def test_a_union_of_thousands_of_selects_runs(proxy: Proxy, parts: int) -> None:
    """A UNION ALL of more than 981 SELECTs, which PostgreSQL runs, was refused (42501, a
    classifier failure: Python's json decoder stopped at the recursion limit); classified on
    the loop (1,500 parts, 28 KB) and in the worker (4,000 parts, 76 KB)."""
    app = app_name("union")
    text = " UNION ALL ".join(f"SELECT {i} AS n" for i in range(parts))
    assert (len(text) > OFFLOAD_MIN_BYTES) == (parts > 3_000)
    with psycopg.connect(**proxy.conninfo(application_name=app), autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*), sum(n) FROM ({text}) u").fetchone() == (
            parts,
            parts * (parts - 1) // 2,
        )
    records = proxy.session_records(app, until=has_disconnect)
    (intent,) = [s for s in statements(records) if "UNION ALL" in s.sql_text]
    assert (intent.kind, intent.decision) == ("read", "allow")
    assert outcome_of(records, intent).status == "ok"


def test_other_sessions_are_not_stalled_while_a_large_statement_is_parsed(proxy: Proxy) -> None:
    # SELECT with a huge VALUES list: slow to parse, quick for PostgreSQL to run.
    big = "SELECT count(*) FROM (VALUES " + ",".join(f"({i}, 'v{i}')" for i in range(150_000))
    big += ") AS v(a, b)"
    started = time.perf_counter()
    PostgresClassifier(cache_size=0).classify(big)
    inline_parse_s = time.perf_counter() - started
    done = threading.Event()
    result: list[object] = []

    def run_big() -> None:
        with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
            result.append(conn.execute(big.encode()).fetchone())
        done.set()

    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        worker = threading.Thread(target=run_big)
        worker.start()
        latencies = []
        while not done.is_set():
            began = time.perf_counter()
            assert conn.execute(b"SELECT 1").fetchone() == (1,)
            latencies.append(time.perf_counter() - began)
        worker.join()
    assert result == [(150_000,)]
    assert len(latencies) > 10
    # Parsing inline would have held every other session for the whole parse.
    assert max(latencies) < inline_parse_s / 2, (max(latencies), inline_parse_s)


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found |= {child, *_descendants(child)}
    return found


def test_the_classifier_workers_end_with_the_proxy(
    proxy_factory: Callable[..., Proxy],
) -> None:
    proxy = proxy_factory()
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS dbward_bulk (id int, name text, at timestamptz)")
        conn.execute(_bulk_insert(3_000).encode())
    helpers = _descendants(proxy.process.pid)
    assert len(helpers) >= 3  # audit writer, forkserver, classifier worker
    assert stop_proxy(proxy) == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in helpers):
        assert time.monotonic() < deadline, "helper processes outlived the proxy"
        time.sleep(0.05)


def _classifier_worker(proxy_pid: int) -> int:
    """The pid of the classifier worker (a child of the forkserver, a child of dbward)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in _descendants(proxy_pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"forkserver" in cmdline:
                workers = _descendants(pid)
                if workers:
                    return min(workers)
        time.sleep(0.02)
    raise AssertionError("no classifier worker")


def test_a_classifier_worker_death_leaves_no_threads_or_pipes_behind(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """The worker dies while a second large statement waits: on Python 3.11 the pool's
    feeder and manager threads blocked for good when it waited in the pool's pipe, keeping
    their pipes and the statement (six fds and two threads per worker death). Since round 63
    it waits in dbward until the worker is free, and runs on the next worker instead of being
    refused with the dead one's."""
    proxy = proxy_factory()
    pid = proxy.process.pid
    # Slow to parse (~0.5 s): the worker is busy while the second one is queued behind it.
    slow = "SELECT count(*) FROM (VALUES " + ",".join(f"({i}, 'v{i}')" for i in range(150_000))
    slow += ") AS v(a, b)"
    queued = "SELECT 1 /* " + "x" * 300_000 + " */"  # far more than a pipe's 64 KB
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        conn.execute(queued.encode())  # the pool is up: part of the baseline
    time.sleep(0.5)
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    errors: list[str] = []

    answered: list[str] = []

    def run(sql: str) -> None:
        with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
            try:
                conn.execute(sql.encode())
                answered.append(sql[:15])
            except psycopg.errors.InsufficientPrivilege as exc:
                errors.append(str(exc))  # the worker died: unparseable, denied

    for _ in range(3):
        threads = [threading.Thread(target=run, args=(sql,)) for sql in (slow, queued)]
        threads[0].start()
        worker = _classifier_worker(pid)  # after a death, started by the next statement
        threads[1].start()
        time.sleep(0.2)  # parsing `slow`; `queued` waits for the worker
        os.kill(worker, signal.SIGKILL)
        for thread in threads:
            thread.join(30)
    assert (
        errors
        == [
            "dbward: statement could not be parsed and is refused (classifier failure: worker died)"
        ]
        * 3
    ), errors
    assert answered == [queued[:15]] * 3
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        conn.execute(queued.encode())  # a fresh pool, as in the baseline
    deadline = time.monotonic() + 5
    while (now := len(list(Path(f"/proc/{pid}/fd").iterdir()))) > fds:
        assert time.monotonic() < deadline, f"open fds: {fds} before, {now} after"
        time.sleep(0.1)
