"""Memory cost of one large client message through the relay, without sockets.

Feeds a ready PgSession one large message in 256 KiB chunks (what a socket read delivers) with a
transport that discards what it is given, and reports the tracemalloc peak as a multiple of the
message size: what framing and forwarding the message costs beyond the bytes themselves.
Run: .venv/bin/python bench/large_message_memory.py [--mib 200]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import tracemalloc
from pathlib import Path

from dbward.audit.sink import MemorySink
from dbward.wire.postgres import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures.detached import detached_session

CHUNK = 256 * 1024


def message(kind: str, size: int) -> bytes:
    """A client message of about `size` bytes, followed by what a client sends with it."""
    if kind == "copydata":
        return m.copy_data(b"x" * size) + m.copy_done()
    if kind == "bind":
        return m.bind_message("", "", [b"x" * size]) + m.execute_message("") + m.sync()
    # A Query longer than max_statement_bytes: refused by its size, never decoded or parsed.
    body = b"SELECT '" + b"x" * size + b"'\x00"
    return b"Q" + struct.pack("!I", 4 + len(body)) + body


def peak_ratio(kind: str, size: int) -> float:
    async def run() -> float:
        session, _, _ = detached_session(MemorySink(), keep=False)
        session._framer.max_message_bytes = 1024 * 1024 * 1024
        data = message(kind, size)
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        del data
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        while chunks:
            session.data_received(chunks.pop(0))
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return peak / size

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=200)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    for kind in ("copydata", "bind", "query"):
        print(f"{kind:9s} {args.mib} MiB: peak {peak_ratio(kind, size):.2f}x the message")


if __name__ == "__main__":
    main()
