"""Micro-benchmark: Python cost of the relay per pgbench transaction, without sockets.

Feeds a PgSession the exact bytes of pgbench select-only transactions (simple, extended, prepared)
and of PostgreSQL's replies, with transports that discard writes, so what is measured is the
relay's own work (framing, classification, policy, audit records, op tracking, scanning).
Run: .venv/bin/python bench/relay_micro.py [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

from dbward.audit.records import AuditRecord
from dbward.audit.sink import HeldRecord
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures.detached import detached_session


class NullSink:
    healthy = True

    def __init__(self) -> None:
        self.count = 0

    def start(self, loop: Any = None) -> None: ...

    def append(self, record: AuditRecord) -> None:
        self.count += 1

    def append_durable(self, record: AuditRecord) -> Any:
        raise NotImplementedError

    def hold(self, record: AuditRecord) -> HeldRecord:
        # Never sent on: every outcome is merged into its intent, as when replies are quick.
        self.count += 1
        return HeldRecord(record)

    def release(self, held: HeldRecord) -> None:
        held.take_back()

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


def make_session() -> tuple[PgSession, NullSink]:
    sink = NullSink()
    session, _, _ = detached_session(sink, identity="bench", keep=False)  # type: ignore[arg-type]
    return session, sink


def select_reply(aid: int) -> bytes:
    row_desc = m._frame(
        b"T", b"\x00\x01abalance\x00" + b"\x00" * 6 + b"\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
    )
    return row_desc + m.data_row([b"0"]) + m.command_complete("SELECT 1") + m.ready_for_query(b"I")


def workload(n: int, mode: str) -> tuple[PgSession, NullSink, list[bytes], bytes]:
    """A ready session, n requests of `mode` and PostgreSQL's reply to each."""
    session, sink = make_session()
    rng = random.Random(1)
    reply = select_reply(1)
    if mode == "prepared":
        session.data_received(
            m.parse_message("P0_1", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;")
            + m.sync()
        )
        session._on_upstream_data(m._frame(b"1", b"") + m.ready_for_query(b"I"))
        reply_p = (
            m._frame(b"2", b"")
            + m.data_row([b"0"])
            + m.command_complete("SELECT 1")
            + m.ready_for_query(b"I")
        )
        requests = [
            m.bind_message("", "P0_1", [str(rng.randint(1, 10**6)).encode()])
            + m.execute_message("")
            + m.sync()
            for _ in range(n)
        ]
        reply = reply_p
    elif mode == "extended":
        # libpq's PQexecParams, as pgbench -M extended sends it: unnamed statement and portal.
        text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        requests = [
            m.parse_message("", text)
            + m.bind_message("", "", [str(rng.randint(1, 10**6)).encode()])
            + m.describe_message("P", "")
            + m.execute_message("")
            + m.sync()
            for _ in range(n)
        ]
        reply = m._frame(b"1", b"") + m._frame(b"2", b"") + select_reply(1)
    else:
        requests = [
            m.query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {rng.randint(1, 10**6)};")
            for _ in range(n)
        ]
    return session, sink, requests, reply


def feed(session: PgSession, requests: list[bytes], reply: bytes) -> None:
    """Each request to the session, then PostgreSQL's reply to it."""
    for request in requests:
        session.data_received(request)
        session._on_upstream_data(reply)


def run(n: int, mode: str) -> float:
    session, sink, requests, reply = workload(n, mode)
    start = time.perf_counter()
    feed(session, requests, reply)
    elapsed = time.perf_counter() - start
    assert sink.count >= n, sink.count  # at least one record per statement
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    async def go() -> None:
        for mode in ("simple", "extended", "prepared"):
            run(2000, mode)  # warm caches
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                run(args.n, mode)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            else:
                best = min(run(args.n, mode) for _ in range(3))
                print(f"{mode:9s} {best:6.2f} us of relay Python per transaction")

    asyncio.run(go())


if __name__ == "__main__":
    main()
