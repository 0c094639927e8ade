"""Audit sink benchmark: record cost, append cost, committed throughput, writer CPU per record,
event-loop lag while the writer commits, durable-commit latency."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
import timeit
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


def construction() -> None:
    """Loop-thread cost of building one record by keyword, as the relay does (17 fields)."""
    n = 200_000
    # CPU time of this thread, so preemption on a busy machine does not count.
    best = min(timeit.repeat(lambda: make(1), number=n, repeat=5, timer=time.thread_time)) / n
    print(f"construct: AuditRecord by keyword, {best * 1e6:.2f} us (CPU)")


class _WriterCpu:
    """Measures the writer thread's CPU time (time.thread_time inside the writer loop)."""

    def __init__(self, sink: SqliteAuditSink) -> None:
        self.seconds = 0.0
        self.done = threading.Event()
        inner = sink._writer_loop

        def timed() -> None:
            t0 = time.thread_time()
            try:
                inner()
            finally:
                self.seconds = time.thread_time() - t0
                self.done.set()

        sink._writer_loop = timed  # type: ignore[method-assign]

    def per_record_us(self, n: int) -> float:
        self.done.wait()
        return self.seconds / n * 1e6


async def throughput(path: Path, n: int) -> None:
    """Append `n` records as fast as possible, then flush."""
    sink = SqliteAuditSink(path)
    cpu = _WriterCpu(sink)
    sink.start()
    records = [make(i) for i in range(n)]
    t0 = time.perf_counter()
    for r in records:
        sink.append(r)
    append_s = time.perf_counter() - t0
    await sink.flush()
    total_s = time.perf_counter() - t0
    await sink.close()
    print(
        f"append: {n} records, {append_s / n * 1e6:.2f} us/record on the loop thread "
        f"({n / append_s:,.0f}/s)"
    )
    print(
        f"committed: {n / total_s:,.0f} records/s (append + group commit + fsync), "
        f"writer thread CPU {cpu.per_record_us(n):.2f} us/record"
    )


async def paced(path: Path | None, n: int, rate: int) -> None:
    """Paced like a live proxy: `rate` records/s on a wall-clock schedule.

    Measures the loop-thread cost and how late the loop wakes from 1 ms sleeps while the
    writer thread commits. With `path` None the records go to a plain list (no writer): the
    lag of that run is the machine's noise floor.
    """
    sink: SqliteAuditSink | None = None
    cpu: _WriterCpu | None = None
    sink_list: list[AuditRecord] = []
    append = sink_list.append
    if path is not None:
        sink = SqliteAuditSink(path)
        cpu = _WriterCpu(sink)
        sink.start()
        append = sink.append
    records = [make(i) for i in range(n)]
    spent = 0.0
    i = 0
    lags: list[float] = []
    t0 = time.perf_counter()
    while i < n:
        now = time.perf_counter()
        due = min(n, int((now - t0) * rate))
        a = time.perf_counter()
        for r in records[i:due]:
            append(r)
        spent += time.perf_counter() - a
        i = max(i, due)
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - before - 0.001)
    if sink is not None:
        await sink.flush()
    total_s = time.perf_counter() - t0
    if sink is not None:
        await sink.close()
    lags.sort()
    what = (
        "no writer (noise floor)"
        if cpu is None
        else f"writer CPU {cpu.per_record_us(n):.2f} us/record"
    )
    print(
        f"paced {rate:,}/s, {what}: {spent / n * 1e6:.2f} us/record on the loop thread, "
        f"{n / total_s:,.0f} records/s committed; loop wake-up lag (1 ms sleeps) "
        f"p50 {lags[len(lags) // 2] * 1000:.2f} ms, p99 "
        f"{lags[int(len(lags) * 0.99)] * 1000:.2f} ms, max {lags[-1] * 1000:.2f} ms"
    )


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
        construction()
        asyncio.run(throughput(d / "t.db", args.records))
        asyncio.run(paced(None, args.records // 2, 50_000))
        asyncio.run(paced(d / "p.db", args.records // 2, 50_000))
        for w in (1, 8, 32):
            asyncio.run(durable_latency(d / f"d{w}.db", w, max(1, args.durable // w)))


if __name__ == "__main__":
    main()
