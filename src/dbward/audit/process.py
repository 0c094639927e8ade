"""An AuditSink that commits through a child writer process, off the proxy's GIL.

The proxy's event loop only collects records and, once per batch, pickles them down a pipe
(about 1.3 us a record in all). SQLite and its writer thread live in the child
(dbward.audit.writer_process), so they never compete with the relay for the GIL; measured on
pgbench, a writer thread in the proxy process cost the relay more than the inserts themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from dbward.audit.query import open_readonly
from dbward.audit.records import AuditRecord
from dbward.audit.sink import HeldRecord
from dbward.audit.writer_process import FrameReader, encode_frame
from dbward.core.errors import AuditUnavailable

log = logging.getLogger("dbward.audit")

START_TIMEOUT_S = 30.0
# Bound of one batch frame, far below the child's MAX_FRAME: a backlog queued while the writer
# was down (up to max_pending records of up to sql_text_max each) goes out in several batches.
BATCH_BYTES = 64 * 1024 * 1024
# How long close() waits for the writer to commit everything (it may be restarting, or the
# disk recovering) and then to exit, before it gives up and reports what was not written.
CLOSE_TIMEOUT_S = 5.0
CLOSE_RETRY_S = 0.25


class _Batch:
    """A batch sent to the child and not yet acknowledged."""

    __slots__ = ("count", "payload", "waiters")

    def __init__(
        self, payload: bytes, count: int, waiters: list[tuple[asyncio.Future[int], int]]
    ) -> None:
        self.payload = payload  # kept until acked, to resend to a restarted child
        self.count = count
        self.waiters = waiters  # (future, index of its record in the batch; -1 = flush marker)


class _AckProtocol(asyncio.Protocol):
    """Reads the child's acknowledgements."""

    def __init__(self, sink: ProcessAuditSink) -> None:
        self._sink = sink
        self._reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            self._sink._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink._on_child_gone()


class ProcessAuditSink:
    """AuditSink whose SQLite writer runs in a child process."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_delay_ms: int = 50,
        max_pending: int = 1_000_000,
    ) -> None:
        if not 1 <= max_delay_ms <= 100:
            raise ValueError(f"max_delay_ms must be between 1 and 100, got {max_delay_ms}")
        self.path = Path(path)
        self._max_delay_s = max_delay_ms / 1000.0
        self._max_delay_ms = max_delay_ms
        self._max_pending = max_pending
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._records: list[tuple[Any, ...]] = []
        # Held records go out with the next batch, after the records appended before it.
        self._held: list[HeldRecord] = []
        self._waiters: list[tuple[asyncio.Future[int], int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flush_soon: asyncio.Handle | None = None
        self._next_batch = 1
        self._unacked: deque[tuple[int, _Batch]] = deque()
        # Batches the child answered "fail": it keeps them and retries, so they stay counted
        # (and are resent to a restarted child) until an ack of a later batch covers them.
        self._failed: deque[tuple[int, _Batch]] = deque()
        self._unacked_records = 0  # records of _failed and _unacked
        self._healthy = True
        self._child_alive = False
        self._closing = False
        self._closed = False
        # A restart runs in a thread (it waits for the new child to open the log).
        self._relaunch: asyncio.Future[tuple[subprocess.Popen[bytes], int, int]] | None = None
        self._launching: subprocess.Popen[bytes] | None = None
        self.last_error = ""
        self.last_seq = 0
        # For the metrics endpoint: records the writer has committed since start (counted per
        # acknowledged batch, not per record), and writers restarted after one died.
        self.committed_records = 0
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the writer process and wait until it has opened the log (or raise)."""
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._attach(*self._launch())

    def _launch(self) -> tuple[subprocess.Popen[bytes], int]:
        """Start a writer process and wait until it has opened the log (blocks; or raise)."""
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dbward.audit.writer_process",
                "--path",
                str(self.path),
                "--max-delay-ms",
                str(self._max_delay_ms),
                "--max-pending",
                str(self._max_pending * 2),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._launching = process
        if self._closing:
            process.kill()  # close() began while this ran in a thread: do not wait for it
        try:
            first = self._read_first_message(process)
            if first[0] != "ready":
                raise AuditUnavailable(str(first[1]))
        except BaseException:
            process.kill()
            with process:  # closes its pipes and reaps it (a restart tries every second)
                pass
            raise
        finally:
            self._launching = None
        return process, int(first[1])

    def _attach(self, process: subprocess.Popen[bytes], last_seq: int) -> None:
        """Wire a started writer's pipes into the event loop; these complete without blocking."""
        assert process.stdout is not None and process.stdin is not None
        self.last_seq = last_seq
        self._process = process
        loop = self._loop
        assert loop is not None
        read_task = loop.create_task(
            loop.connect_read_pipe(lambda: _AckProtocol(self), process.stdout)
        )
        write_task = loop.create_task(loop.connect_write_pipe(asyncio.Protocol, process.stdin))
        write_task.add_done_callback(self._on_stdin_ready)
        read_task.add_done_callback(lambda _t: None)
        self._child_alive = True

    @staticmethod
    def _read_first_message(process: subprocess.Popen[bytes]) -> tuple[Any, ...]:
        assert process.stdout is not None
        reader = FrameReader()
        fd = process.stdout.fileno()
        deadline = START_TIMEOUT_S
        while True:
            ready, _, _ = select.select([fd], [], [], deadline)
            if not ready:
                process.kill()
                raise AuditUnavailable("the audit writer process did not start in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                code = process.wait(timeout=10)
                raise AuditUnavailable(f"the audit writer process exited with status {code}")
            messages = reader.feed(chunk)
            if messages:
                message: tuple[Any, ...] = messages[0]
                return message

    def _on_stdin_ready(self, task: asyncio.Task[tuple[asyncio.WriteTransport, Any]]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._on_child_gone()
            return
        self._stdin = task.result()[0]
        # Resend what a previous child did not acknowledge (after a restart), then go on.
        for _, batch in self._unacked:
            self._stdin.write(batch.payload)
        if self._records or self._held or self._waiters:
            self._flush()

    async def flush(self) -> None:
        """Wait until everything appended so far is durably committed (or raise)."""
        loop = self._loop
        if loop is None:
            return
        future: asyncio.Future[int] = loop.create_future()
        if self._closed:
            raise AuditUnavailable("audit log is closed")
        if not self._child_alive:
            if self._records or self._held or self._unacked_records:
                raise self._writer_down()  # fail closed now; it may never come back
            return
        self._waiters.append((future, -1))
        self._flush()
        await future

    async def close(self) -> None:
        """Flush, then let the child commit and exit.

        Raises AuditUnavailable, naming how many records were not written, if that has not
        succeeded within CLOSE_TIMEOUT_S (the writer down for good, or the disk failing).
        """
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        problem = await self._drain(loop.time() + CLOSE_TIMEOUT_S)
        self._closing = True
        self._closed = True
        await self._end_relaunch()
        lost = len(self._records) + sum(1 for held in self._held if held.record is not None)
        if self._stdin is not None:
            self._stdin.close()
        code = await self._wait_exit() if self._process is not None else 0
        if code != 0:
            # The child commits what it holds before it exits 0; otherwise nothing it was sent
            # and did not acknowledge is known to be written.
            lost += self._unacked_records
            problem = problem or f"the audit writer process exited with status {code}"
        if lost:
            message = f"audit log closed with {lost} records not written: {problem}"
            log.error("%s", message)
            raise AuditUnavailable(message)

    async def _drain(self, deadline: float) -> str | None:
        """Flush until nothing is queued: None once done, else why not by the deadline."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self.flush(), deadline - loop.time())
            except AuditUnavailable as exc:
                problem = exc.message
            except TimeoutError:
                return f"not committed within {CLOSE_TIMEOUT_S:g} s ({self.last_error})"
            else:
                # Sessions ending meanwhile append (disconnect records): send those too.
                # Nothing can be appended between this check and close() setting `_closed`.
                if not (self._records or self._held):
                    return None
                continue
            if loop.time() + CLOSE_RETRY_S >= deadline:
                return problem
            # The writer may be restarting, or its retry (every second) may yet succeed.
            await asyncio.sleep(CLOSE_RETRY_S)

    async def _end_relaunch(self) -> None:
        """Stop a writer still starting (close gave up on it) and wait for its thread."""
        relaunch = self._relaunch
        if relaunch is None:
            return
        launching = self._launching
        if launching is not None:
            launching.kill()
        with contextlib.suppress(Exception):
            await relaunch

    async def _wait_exit(self) -> int:
        """Wait for the child to exit (killing it after CLOSE_TIMEOUT_S); its status."""
        process = self._process
        assert process is not None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, process.wait, CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("the audit writer process did not exit; killing it")
            process.kill()
            return await loop.run_in_executor(None, process.wait)

    # -- hot path ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while records cannot be written, the child is down, or the backlog is full."""
        return (
            self._healthy
            and self._child_alive
            and self._unacked_records + len(self._records) < self._max_pending
        )

    @property
    def pending_records(self) -> int:
        """Records queued or sent and not yet committed (read at scrape time, not per record)."""
        held = sum(1 for item in self._held if item.record is not None)
        return len(self._records) + held + self._unacked_records

    def append(self, record: AuditRecord) -> None:
        """Queue a record; committed within max_delay_ms."""
        records = self._records
        if self._closed or self._unacked_records + len(records) >= self._max_pending:
            raise self._refusal()
        records.append(tuple(record))
        if self._timer is None and self._flush_soon is None:
            loop = self._loop
            assert loop is not None
            self._timer = loop.call_later(self._max_delay_s, self._flush)

    def hold(self, record: AuditRecord) -> HeldRecord:
        """Queue a record its writer may take back until the next batch is sent."""
        if self._closed or self._unacked_records + len(self._records) >= self._max_pending:
            raise self._refusal()
        held = HeldRecord(record)
        self._held.append(held)
        if self._timer is None and self._flush_soon is None:
            loop = self._loop
            assert loop is not None
            self._timer = loop.call_later(self._max_delay_s, self._flush)
        return held

    def release(self, held: HeldRecord) -> None:
        """Queue a held record now, so it keeps its place before what is appended next."""
        record = held.take_back()
        if record is not None:
            self._records.append(tuple(record))

    def append_durable(self, record: AuditRecord) -> asyncio.Future[int]:
        """Queue a record; the future resolves with its seq once it is fsync'd."""
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[int] = loop.create_future()
        if self._closed or self._unacked_records + len(self._records) >= self._max_pending:
            future.set_exception(self._refusal())
            return future
        self._records.append(tuple(record))
        if not self._child_alive:
            # Fail closed now: the record is sent when a writer is back, but nobody can say
            # when (or whether) that will be.
            future.set_exception(self._writer_down())
            return future
        self._waiters.append((future, len(self._records) - 1))
        if self._flush_soon is None:
            # Everything made durable in this loop iteration shares one batch and one fsync.
            self._flush_soon = loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush_soon = None
        stdin = self._stdin
        if stdin is None or not self._child_alive:
            return  # sent once the child is (back) up
        if self._held:
            held, self._held = self._held, []
            queue = self._records
            for item in held:
                record = item.take_back()
                if record is not None:
                    queue.append(tuple(record))
        records, self._records = self._records, []
        waiters, self._waiters = self._waiters, []
        self._send(stdin, records, waiters)

    def _send(
        self,
        stdin: asyncio.WriteTransport,
        records: list[tuple[Any, ...]],
        waiters: list[tuple[asyncio.Future[int], int]],
    ) -> None:
        """Send records as one batch, or as several if its frame would be too big."""
        batch_no = self._next_batch
        payload = encode_frame((batch_no, records))
        if len(payload) > BATCH_BYTES and len(records) > 1:
            half = len(records) // 2
            # A flush marker (index -1) waits for the last part.
            self._send(stdin, records[:half], [w for w in waiters if 0 <= w[1] < half])
            self._send(
                stdin,
                records[half:],
                [(f, i - half if i >= 0 else i) for f, i in waiters if i < 0 or i >= half],
            )
            return
        self._next_batch += 1
        batch = _Batch(payload, len(records), waiters)
        self._unacked.append((batch_no, batch))
        self._unacked_records += len(records)
        stdin.write(payload)

    # -- messages from the child -------------------------------------------------------------

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "health":
            healthy, error = bool(message[1]), str(message[2])
            if healthy and not self._healthy:
                log.warning("audit log writable again")
            elif not healthy and self._healthy:
                log.error("audit log write failed, refusing statements: %s", error)
            self._healthy = healthy
            self.last_error = error
            if healthy and self._failed:
                # The child is writing again: an ack of an empty batch says when the failed
                # batches are committed, so they stop counting toward max_pending.
                self._flush()
            return
        if kind not in ("ack", "fail") or not self._unacked:
            log.error("unexpected message from the audit writer: %r", kind)
            return
        batch_no, batch = self._unacked[0]
        if batch_no != message[1]:
            # An answer means "this batch and every one before it is committed": out of order
            # it proves nothing, so no waiter is told anything. Fail closed: end the writer;
            # its restart refuses the waiters and resends what was not acknowledged.
            log.error(
                "audit writer acknowledged batch %s, expected %s; restarting it",
                message[1],
                batch_no,
            )
            if self._process is not None:
                self._process.kill()
            return
        self._unacked.popleft()
        if kind == "ack":
            self._unacked_records -= batch.count
            self.committed_records += batch.count
            if self._failed:
                self._forget_failed()
            last = int(message[2])
            self.last_seq = max(self.last_seq, last)
            first = last - batch.count + 1
            for future, index in batch.waiters:
                if not future.done():
                    future.set_result(first + index if index >= 0 else last)
        else:
            # The records stay queued in the child and are written when the disk recovers;
            # the statements waiting for them are refused now (fail closed).
            self._healthy = False
            self.last_error = str(message[2])
            for future, _ in batch.waiters:
                if not future.done():
                    future.set_exception(
                        AuditUnavailable(f"audit log unavailable: {self.last_error}")
                    )
            batch.waiters = []
            self._failed.append((batch_no, batch))

    def _forget_failed(self) -> None:
        """Drop the failed batches: an ack means they were committed on a retry."""
        failed = self._failed
        while failed:
            count = failed.popleft()[1].count
            self._unacked_records -= count
            self.committed_records += count

    def _on_child_gone(self) -> None:
        if not self._child_alive:
            return
        self._child_alive = False
        self._stdin = None
        if self._closing:
            return
        self.last_error = "the audit writer process exited"
        log.error("%s; refusing statements and restarting it", self.last_error)
        # The next child answers every batch the dead one had not acknowledged, failed ones too.
        self._unacked.extendleft(reversed(self._failed))
        self._failed.clear()
        for _, batch in self._unacked:
            for future, _index in batch.waiters:
                if not future.done():
                    future.set_exception(AuditUnavailable(self.last_error))
            batch.waiters = []
        # Waiters whose records were not sent yet, too: their records stay queued.
        waiters, self._waiters = self._waiters, []
        for future, _index in waiters:
            if not future.done():
                future.set_exception(AuditUnavailable(self.last_error))
        loop = self._loop
        if loop is not None:
            loop.call_later(1.0, self._restart)

    def _restart(self) -> None:
        """Start a new writer in a thread: it may take seconds to open the log (locked)."""
        loop = self._loop
        if self._closing or loop is None:
            return
        # What the dead writer was sent and did not acknowledge (stable while it is down).
        payloads = [batch.payload for _, batch in self._unacked]
        self._relaunch = loop.run_in_executor(
            None, self._relaunch_blocking, self._process, payloads, self.last_seq
        )
        self._relaunch.add_done_callback(self._on_relaunched)

    def _relaunch_blocking(
        self, old: subprocess.Popen[bytes] | None, payloads: list[bytes], acked_seq: int
    ) -> tuple[subprocess.Popen[bytes], int, int]:
        """Reap the dead writer, then start a new one (runs in a thread).

        Also returns how many of the unacknowledged records the dead writer had committed.
        """
        if old is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.wait(timeout=1)
        process, last_seq = self._launch()
        try:
            landed = _count_landed(self.path, payloads, acked_seq, last_seq)
        except Exception as exc:  # resending is the safe side: never lose a record
            log.error("cannot compare the audit log with the unacknowledged records: %s", exc)
            landed = 0
        return process, last_seq, landed

    def _on_relaunched(
        self, future: asyncio.Future[tuple[subprocess.Popen[bytes], int, int]]
    ) -> None:
        """Attach the new writer (the sink stays unhealthy until now), or try again later."""
        self._relaunch = None
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            process, last_seq, landed = future.result()
            if self._closing:
                process.kill()
                process.communicate()  # reap it and close its pipes
                return
            if 0 < landed <= self._unacked_records:
                self._drop_landed(landed)
                self.committed_records += landed
            self._attach(process, last_seq)
            self.restarts += 1
            self._healthy = True  # a fresh child that opened the log
            log.warning(
                "audit writer restarted; %d unacknowledged records were committed before it "
                "died, resending %d",
                landed,
                self._unacked_records,
            )
            return
        self.last_error = f"cannot restart the audit writer: {exc}"
        log.error("%s", self.last_error)
        loop = self._loop
        if loop is not None and not self._closing:
            loop.call_later(1.0, self._restart)

    def _drop_landed(self, landed: int) -> None:
        """Forget the first `landed` unacknowledged records: the dead writer committed them
        (it died before its ack), so resending them would write them twice."""
        unacked = self._unacked
        while landed:
            batch_no, batch = unacked[0]
            if batch.count <= landed:
                unacked.popleft()
                self._unacked_records -= batch.count
                landed -= batch.count
                continue
            # Part of a batch (the writer may commit a batch in two transactions).
            ((_, rows),) = FrameReader().feed(batch.payload)
            batch.payload = encode_frame((batch_no, rows[landed:]))
            batch.count -= landed
            self._unacked_records -= landed
            landed = 0

    def _writer_down(self) -> AuditUnavailable:
        return AuditUnavailable(f"audit log unavailable: {self.last_error}")

    def _refusal(self) -> AuditUnavailable:
        if self._closed:
            return AuditUnavailable("audit log is closed")
        return AuditUnavailable(
            f"audit log backlog is full ({self._max_pending} records pending): "
            f"{self.last_error or 'writer too slow'}"
        )


# Fields that tell a record from another in `_count_landed` (text fields may have been made
# storable on the way in, see sqlite._clean; these never are).
_KEY_FIELDS = ("ts_ms", "session_id", "event", "statement_id", "sql_sha256", "status")
_KEY_INDEXES = tuple(AuditRecord._fields.index(name) for name in _KEY_FIELDS)


def _count_landed(path: Path, payloads: list[bytes], acked_seq: int, last_seq: int) -> int:
    """How many of the records in `payloads` (unacknowledged batches, in order) the log holds.

    The writer commits records in the order it got them, so the ones it committed before it
    died are the first `last_seq - acked_seq` (seqs acked_seq+1 ..last_seq), if the log holds
    nothing else there: they are counted only if every one of them is the record expected
    at its seq. 0 otherwise (everything is resent, as after any other loss).
    """
    landed = last_seq - acked_seq
    if landed <= 0 or not payloads:
        return 0
    expected: list[tuple[Any, ...]] = []
    for payload in payloads:
        ((_, rows),) = FrameReader().feed(payload)
        expected.extend(rows[: landed - len(expected)])
        if len(expected) == landed:
            break
    if len(expected) < landed:
        log.error(
            "the audit log holds %d records past the last acknowledged seq %d, more than were "
            "sent: is another process writing it?",
            landed,
            acked_seq,
        )
        return 0
    columns = ", ".join(_KEY_FIELDS)
    conn = open_readonly(path)
    try:
        stored = conn.execute(
            f"SELECT {columns} FROM audit_log WHERE seq > ? AND seq <= ? ORDER BY seq",
            (acked_seq, last_seq),
        ).fetchall()
    finally:
        conn.close()
    wanted = [tuple(row[i] for i in _KEY_INDEXES) for row in expected]
    if [tuple(row) for row in stored] != wanted:
        log.error(
            "the audit log holds records at seqs %d..%d that are not the unacknowledged ones: "
            "resending them all",
            acked_seq + 1,
            last_seq,
        )
        return 0
    return landed
