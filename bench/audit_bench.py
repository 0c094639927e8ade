"""Audit sink benchmark: append cost, committed throughput, durable-commit latency."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sqlite import SqliteAuditSink


def make(i: int) -> AuditRecord:
    # pgbench-like: a short statement, a table list, an allow decision.
    return AuditRecord(
        event=AuditEvent.STATEMENT,
        ts_ms=1_700_000_000_000 + i,
        session_id="5f1c2a9e-5c1d-4c1e-9a1e-0d6c7b8a9f00",
        identity="bench",
        client_addr="127.0.0.1:54321",
        application_name="pgbench",
        target="main",
        database="bench",
        path="extended",
        statement_id=i,
        sql_text="UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        sql_sha256="9f" * 32,
        kind="write",
        command="UPDATE",
        tables=("pgbench_accounts",),
        decision="allow",
        rule="policy.default",
    )


async def throughput(path: Path, n: int, rate: int | None) -> None:
    sink = SqliteAuditSink(path)
    sink.start()
    records = [make(i) for i in range(n)]
    t0 = time.perf_counter()
    if rate is None:
        for r in records:
            sink.append(r)
        append_s = time.perf_counter() - t0
        await sink.flush()
        total_s = time.perf_counter() - t0
        print(
            f"append: {n} records, {append_s / n * 1e6:.2f} us/record on the loop thread "
            f"({n / append_s:,.0f}/s)"
        )
        print(f"committed: {n / total_s:,.0f} records/s (append + group commit + fsync)")
    else:
        # Paced like a live proxy: `rate` records/s on a wall-clock schedule, measuring the
        # loop-thread cost and how late the loop wakes while the writer thread runs.
        spent = 0.0
        i = 0
        lags: list[float] = []
        while i < n:
            now = time.perf_counter()
            due = min(n, int((now - t0) * rate))
            a = time.perf_counter()
            for r in records[i:due]:
                sink.append(r)
            spent += time.perf_counter() - a
            i = max(i, due)
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)
        await sink.flush()
        total_s = time.perf_counter() - t0
        lags.sort()
        print(
            f"paced {rate:,}/s: {spent / n * 1e6:.2f} us/record on the loop thread, "
            f"{n / total_s:,.0f} records/s committed, loop wake-up lag p99 "
            f"{lags[int(len(lags) * 0.99)] * 1000:.2f} ms"
        )
    await sink.close()


async def durable_latency(path: Path, waiters: int, per_waiter: int) -> None:
    sink = SqliteAuditSink(path)
    sink.start()
    latencies: list[float] = []

    async def worker(w: int) -> None:
        for i in range(per_waiter):
            t = time.perf_counter()
            await sink.append_durable(make(w * per_waiter + i))
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(waiters)))
    total = time.perf_counter() - t0
    await sink.close()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(
        f"durable, {waiters:2d} concurrent waiters: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"{len(latencies) / total:,.0f} durable commits/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--durable", type=int, default=2000, help="durable appends per run")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the DB files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        asyncio.run(throughput(d / "t.db", args.records, None))
        asyncio.run(throughput(d / "p.db", args.records // 2, 50_000))
        for w in (1, 8, 32):
            asyncio.run(durable_latency(d / f"d{w}.db", w, max(1, args.durable // w)))


if __name__ == "__main__":
    main()
