"""The audit writer child process: reads record batches on stdin, commits them, acks on stdout.

Run by ProcessAuditSink as `python -m dbward.audit.writer_process`. It owns the SQLite sink (and
its writer thread) so that no SQLite work, and no thread competing for the GIL, runs in the
proxy's event-loop process. Protocol, both directions: 4-byte big-endian length + pickle.

  parent -> child: (batch_no, [record tuples in AuditRecord field order])
  child -> parent: ("ready", last_seq) | ("error", message)            once, at start
                   ("ack", batch_no, last_seq) | ("fail", batch_no, message)  per batch, in order
                   ("health", healthy, message)     when health changes; after a "fail",
                                                        as soon as the log is writable

"ack" means this batch and every one before it are committed; "fail" means the commit failed
and the child keeps the records to retry them. A batch the child cannot keep whole (its backlog
is full) is never answered: the child stops reading and exits, the parent resends.

The child ignores SIGINT/SIGTERM: the parent decides when it ends, by closing stdin; the child
then commits what it has and exits (status 0, or 1 if records could not be written or it
stopped on a batch it could not take).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pickle
import signal
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Any

from dbward.audit.records import AuditRecord
from dbward.audit.sqlite import SqliteAuditSink, lock_for_writing
from dbward.core.errors import AuditUnavailable

_LEN = struct.Struct("!I")
MAX_FRAME = 512 * 1024 * 1024
HEALTH_POLL_S = 0.2

log = logging.getLogger("dbward.audit.writer")


def encode_frame(message: object) -> bytes:
    """Length-prefixed pickle frame."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into length-prefixed frames (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Decoded messages completed by `data`."""
        self._buffer += data
        out: list[Any] = []
        buffer = self._buffer
        pos = 0
        while len(buffer) - pos >= 4:
            (length,) = _LEN.unpack_from(buffer, pos)
            if length > MAX_FRAME:
                raise ValueError(f"audit frame of {length} bytes exceeds the limit")
            if len(buffer) - pos - 4 < length:
                break
            # Frames come only from our own parent/child over a private pipe.
            out.append(pickle.loads(bytes(buffer[pos + 4 : pos + 4 + length])))  # noqa: S301
            pos += 4 + length
        if pos:
            del buffer[:pos]
        return out


class _ChildProtocol(asyncio.Protocol):
    """Reads batches from stdin and hands them to the sink."""

    def __init__(self, child: _Child) -> None:
        self._child = child
        self._reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        child = self._child
        if child.broken is not None:
            return
        try:
            batches = self._reader.feed(data)
        except Exception as exc:
            # The stream cannot be framed past a bad frame: stop and exit non-zero, so the
            # parent sees the writer gone (and refuses, restarts, resends) instead of waiting.
            child.abort(f"unreadable batch frame: {exc}")
            return
        for batch_no, rows in batches:
            child.submit(batch_no, rows)

    def connection_lost(self, exc: Exception | None) -> None:
        self._child.stdin_closed.set()


class _Child:
    """State of the writer process."""

    def __init__(self, sink: SqliteAuditSink, out: asyncio.WriteTransport) -> None:
        self.sink = sink
        self.out = out
        self.stdin: asyncio.BaseTransport | None = None
        self.stdin_closed = asyncio.Event()
        self.broken: str | None = None  # why it stopped taking batches
        self._healthy = True
        # Batches not answered yet, oldest first: (batch_no, future of its commit). A flush's
        # future resolves to None, a batch's to the seq of its last record.
        self._answers: deque[tuple[int, asyncio.Future[Any]]] = deque()

    def send(self, message: object) -> None:
        self.out.write(encode_frame(message))

    def submit(self, batch_no: int, rows: list[tuple[Any, ...]]) -> None:
        """Queue a batch for commit; it is answered once it and every batch before it are."""
        if self.broken is not None:
            return  # nothing after a batch it could not take is answered: the parent resends
        # Whole or not at all: "fail" tells the parent the records are kept for a retry.
        if len(rows) > self.sink.room:
            self.abort(f"batch {batch_no} of {len(rows)} records does not fit in the backlog")
            return
        future: asyncio.Future[Any]
        if rows:
            try:
                for row in rows[:-1]:
                    self.sink.append(AuditRecord._make(row))
                future = self.sink.append_durable(AuditRecord._make(rows[-1]))
            except AuditUnavailable as exc:
                self.abort(f"batch {batch_no} refused: {exc.message}")
                return
        else:
            # A flush: answered once every record taken before it is committed, not at once
            # (its ack also covers failed batches the sink is still retrying).
            future = asyncio.ensure_future(self.sink.flush())
        self._answers.append((batch_no, future))
        future.add_done_callback(self._answer_ready)

    def abort(self, reason: str) -> None:
        """Stop taking batches and exit non-zero, so the parent restarts a writer and resends."""
        log.error("audit writer stopping: %s", reason)
        self.broken = reason
        if self.stdin is not None:
            self.stdin.close()
        self.stdin_closed.set()

    def _answer_ready(self, _future: asyncio.Future[Any]) -> None:
        self._send_answers()
        self.report_health()

    def _send_answers(self) -> None:
        """Answer every batch whose fate is known, strictly in the order they came.

        The parent pairs each answer with its oldest unanswered batch, and an answer means
        "this batch and all before it are committed": an empty batch (a flush) must wait for
        the commits of the batches ahead of it.
        """
        answers = self._answers
        while answers:
            batch_no, future = answers[0]
            if not future.done():
                return
            answers.popleft()
            if future.cancelled():
                self.fail(batch_no, "the commit was cancelled")
            elif (exc := future.exception()) is not None:
                self.fail(batch_no, str(exc))
            else:
                seq = future.result()
                self.send(("ack", batch_no, self.sink.last_seq if seq is None else seq))

    def fail(self, batch_no: int, message: str) -> None:
        """Answer "fail": the parent then refuses statements until it hears health again."""
        self.send(("fail", batch_no, message))
        # The sink may have recovered already (a retry woken by a later batch), so its health
        # did not change; report it anyway, or the parent would refuse statements for good.
        self._healthy = False

    def report_health(self) -> None:
        healthy = self.sink.healthy
        if healthy != self._healthy:
            self._healthy = healthy
            self.send(("health", healthy, self.sink.last_error))

    async def watch_health(self) -> None:
        # Recovery happens in the sink's retry loop, not on a batch: poll so the parent hears.
        while not self.stdin_closed.is_set():
            self.report_health()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stdin_closed.wait(), HEALTH_POLL_S)


async def _run(path: Path, max_delay_ms: int, max_pending: int) -> int:
    loop = asyncio.get_running_loop()
    out_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout.buffer)
    sink = SqliteAuditSink(path, max_delay_ms=max_delay_ms, max_pending=max_pending)
    try:
        # Held until the process exits (the descriptor is never closed): one writer per log.
        lock_for_writing(path)
        sink.start(loop)
    except AuditUnavailable as exc:
        out_transport.write(encode_frame(("error", exc.message)))
        await asyncio.sleep(0)
        return 2
    child = _Child(sink, out_transport)
    child.send(("ready", sink.last_seq))
    child.stdin, _ = await loop.connect_read_pipe(lambda: _ChildProtocol(child), sys.stdin.buffer)
    await child.watch_health()
    try:
        await sink.close()
    except AuditUnavailable as exc:
        log.error("audit writer: %s", exc.message)
        return 1
    finally:
        out_transport.close()
    return 0 if child.broken is None else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="dbward-audit-writer")
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--max-delay-ms", type=int, default=50)
    parser.add_argument("--max-pending", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run(args.path, args.max_delay_ms, args.max_pending))


if __name__ == "__main__":
    sys.exit(main())
