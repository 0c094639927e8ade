"""Micro-benchmark of classify() and decide(); run: python bench/classify_bench.py."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

from pglast import parser as pg_parser

from dbward.core.types import Identity, PolicyRequest, ProtocolPath, SessionContext
from dbward.policy.engine import decide
from dbward.sql.postgres import PostgresClassifier

SIMPLE = "SELECT abalance FROM pgbench_accounts WHERE aid = {n};"
UPDATE = "UPDATE pgbench_accounts SET abalance = abalance + {d} WHERE aid = {n};"
MULTI = (
    "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + {d} WHERE aid = {n}; "
    "SELECT abalance FROM pgbench_accounts WHERE aid = {n}; "
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
    "VALUES (1, 2, {n}, {d}, CURRENT_TIMESTAMP); END;"
)
N = 20_000


def per_call_us(fn: Callable[[int], object], n: int = N) -> float:
    """Best of three runs of ``n`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def report(label: str, us: float) -> None:
    print(f"  {label:<28}{us:7.2f} us")


def bench_text(name: str, items: list[str]) -> None:
    sample = items[0]
    raw = pg_parser.parse_sql_json(sample)
    print(f"{name}  ({len(sample)} chars)")
    report("pglast parse_sql_json", per_call_us(lambda i: pg_parser.parse_sql_json(sample)))
    report("json.loads", per_call_us(lambda i: json.loads(raw)))
    report("pglast normalize", per_call_us(lambda i: pg_parser.normalize(sample)))
    cached = PostgresClassifier()
    cached.classify(sample)
    report("classify, cached text", per_call_us(lambda i: cached.classify(sample)))
    cold = PostgresClassifier(cache_size=0)
    report("classify, caches off", per_call_us(lambda i: cold.classify(items[i])))
    # Every text new (fresh literals), as in pgbench: only the template cache can help.
    best = float("inf")
    for _ in range(3):
        warm = PostgresClassifier(cache_size=2 * N)
        warm.classify(sample)
        start = time.perf_counter()
        for text in items:
            warm.classify(text)
        best = min(best, time.perf_counter() - start)
    report("classify, new literals", best / len(items) * 1e6)


def main() -> None:
    rng = random.Random(1)
    for name, tpl in (("simple SELECT", SIMPLE), ("TPC-B UPDATE", UPDATE), ("5-stmt", MULTI)):
        items = [tpl.format(n=rng.randrange(10**7), d=rng.randrange(-5000, 5000)) for _ in range(N)]
        bench_text(name, items)
    session = SessionContext("s", Identity("alice"), "main", "db", "127.0.0.1", "bench")
    clf = PostgresClassifier()
    for sql in ("SELECT 1", "SET ROLE admin"):
        req = PolicyRequest(session, clf.classify(sql)[0], ProtocolPath.SIMPLE, 0.0)
        ns = per_call_us(lambda i, r=req: decide(r), 200_000) * 1000
        print(f"decide({sql!r}) {ns:6.0f} ns")


if __name__ == "__main__":
    main()
