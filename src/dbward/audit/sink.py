"""The audit sink interface and the group-commit writer thread shared by storage backends."""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from dbward.audit.records import AuditRecord
from dbward.core.errors import AuditUnavailable

__all__ = ["AuditSink", "GroupCommitSink", "MemorySink"]

log = logging.getLogger("dbward.audit")

DEFAULT_MAX_DELAY_MS = 50
DEFAULT_MAX_PENDING = 1_000_000
RETRY_INTERVAL_S = 1.0
# Rows per transaction: bounds one executemany's memory and the latency of a backlog drain.
MAX_BATCH = 20_000


@runtime_checkable
class AuditSink(Protocol):
    """Where audit records go. All methods are called on the event loop thread."""

    @property
    def healthy(self) -> bool:
        """False while the log cannot be written: the relay refuses statements (fail closed)."""
        ...

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open the store and start writing; raises AuditUnavailable if it cannot be opened."""
        ...

    def append(self, record: AuditRecord) -> None:
        """Queue a record (hot path, non-blocking); committed within the batch delay."""
        ...

    def append_durable(self, record: AuditRecord) -> asyncio.Future[int]:
        """Queue a record; the future resolves with its seq once it is durably committed."""
        ...

    async def flush(self) -> None:
        """Return once everything appended so far is durably committed."""
        ...

    async def close(self) -> None:
        """Flush, then stop writing. Appends after close raise AuditUnavailable."""
        ...


class _Waiter:
    """A durable append (record) or a flush marker (record None) with the future to resolve."""

    __slots__ = ("future", "record")

    def __init__(self, record: AuditRecord | None, future: asyncio.Future[int]) -> None:
        self.record = record
        self.future = future


def _resolve_all(results: list[tuple[asyncio.Future[int], int]]) -> None:
    for fut, seq in results:
        if not fut.done():  # the waiter may have been cancelled
            fut.set_result(seq)


def _fail_all(futures: list[asyncio.Future[int]], message: str) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(AuditUnavailable(message))


class GroupCommitSink(abc.ABC):
    """Queues records on the loop thread; one writer thread commits them in batches.

    The loop thread only appends to a deque (atomic under the GIL), so `append` costs about a
    microsecond and never wakes the writer; the writer wakes every `max_delay_ms`, or at once
    for a durable append. Seqs are assigned by the writer in queue order, so they are gap-free
    and the log order is the append order. A failed batch keeps its seqs and is retried first.
    """

    def __init__(
        self,
        *,
        max_delay_ms: int = DEFAULT_MAX_DELAY_MS,
        max_pending: int = DEFAULT_MAX_PENDING,
        retry_interval_s: float = RETRY_INTERVAL_S,
    ) -> None:
        if not 1 <= max_delay_ms <= 100:
            raise ValueError(f"max_delay_ms must be between 1 and 100, got {max_delay_ms}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be positive, got {max_pending}")
        self._max_delay_s = max_delay_ms / 1000.0
        self._max_pending = max_pending
        self._retry_interval_s = retry_interval_s
        self._queue: deque[AuditRecord | _Waiter] = deque()
        self._wake = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        self._healthy = True
        self._last_error = ""
        # Writer-thread state (read, never written, by the loop thread).
        self._retry: list[AuditRecord] = []  # failed batch, seqs assigned, retried first
        self._backlog = 0  # len(self._retry), readable without touching the list
        self._next_seq = 1
        self._committed_seq = 0
        self._retry_at = 0.0
        self._store_open = False

    # -- storage backend -------------------------------------------------------------------

    @abc.abstractmethod
    def _open_store(self) -> int:
        """Open (creating if needed) the store on the writer thread; return its max seq."""

    @abc.abstractmethod
    def _write_batch(self, batch: list[AuditRecord]) -> None:
        """Durably commit `batch` (seqs already assigned) in one transaction, or raise."""

    @abc.abstractmethod
    def _batch_is_stored(self, batch: list[AuditRecord]) -> bool:
        """True if the store already holds `batch` (a COMMIT that reported failure but landed)."""

    @abc.abstractmethod
    def _close_store(self) -> None:
        """Release the store; must not raise."""

    # -- loop-thread API -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False after a failed write (until a retry succeeds) or when the backlog is full."""
        return self._healthy and len(self._queue) + self._backlog < self._max_pending

    @property
    def last_error(self) -> str:
        """Why the last write failed ("" if none has)."""
        return self._last_error

    @property
    def last_seq(self) -> int:
        """The highest seq known to be committed."""
        return self._committed_seq

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open the store on the writer thread and start it. Blocks until the store is open."""
        if self._thread is not None:
            raise RuntimeError("audit sink already started")
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        thread = threading.Thread(
            target=self._run, args=(ready, failure), name="dbward-audit-writer", daemon=True
        )
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            self._closed = True
            exc = failure[0]
            if isinstance(exc, AuditUnavailable):
                raise exc
            raise AuditUnavailable(f"cannot open the audit log: {_describe(exc)}") from exc
        self._thread = thread

    def append(self, record: AuditRecord) -> None:
        """Queue `record`. Raises AuditUnavailable when closed or the backlog is full."""
        queue = self._queue
        if len(queue) + self._backlog >= self._max_pending or self._closed:
            raise self._refusal()
        queue.append(record)

    def append_durable(self, record: AuditRecord) -> asyncio.Future[int]:
        """Queue `record` and wake the writer; the future resolves with the record's seq."""
        return self._enqueue_waiter(record)

    async def flush(self) -> None:
        """Wait until everything appended so far is durably committed (or raise)."""
        if self._thread is None or not self._thread.is_alive():
            if self._queue or self._backlog:
                raise AuditUnavailable("audit writer is not running; records are pending")
            return
        await self._enqueue_waiter(None, force=True)

    async def close(self) -> None:
        """Flush and stop the writer. Raises AuditUnavailable if records could not be written."""
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            self._stopping = True
            self._wake.set()
            thread = self._thread
            if thread is not None:
                await asyncio.get_running_loop().run_in_executor(None, thread.join)
        lost = len(self._queue) + self._backlog
        if lost:
            msg = f"audit log closed with {lost} records not written: {self._last_error}"
            log.error(msg)
            raise AuditUnavailable(msg)

    def _enqueue_waiter(
        self, record: AuditRecord | None, *, force: bool = False
    ) -> asyncio.Future[int]:
        loop = self._loop
        if loop is None:
            raise RuntimeError("audit sink not started")
        fut: asyncio.Future[int] = loop.create_future()
        over = len(self._queue) + self._backlog >= self._max_pending
        if self._closed or (over and not force):
            fut.set_exception(self._refusal())
            return fut
        self._queue.append(_Waiter(record, fut))
        self._wake.set()
        return fut

    def _refusal(self) -> AuditUnavailable:
        if self._closed:
            return AuditUnavailable("audit log is closed")
        return AuditUnavailable(
            f"audit log backlog is full ({self._max_pending} records pending): "
            f"{self._last_error or 'writer too slow'}"
        )

    # -- writer thread ---------------------------------------------------------------------

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            self._next_seq = self._committed_seq = self._open_store()
            self._next_seq += 1
            self._store_open = True
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            self._writer_loop()
        except BaseException as exc:  # a dead writer must not look healthy
            self._healthy = False
            self._last_error = f"audit writer crashed: {_describe(exc)}"
            log.exception("audit writer crashed")
            self._fail_queued(self._last_error)
            raise
        finally:
            self._close_store()
            self._store_open = False

    def _writer_loop(self) -> None:
        next_due = time.monotonic() + self._max_delay_s
        while True:
            due = next_due if self._healthy else self._retry_at
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            stopping = self._stopping
            next_due = time.monotonic() + self._max_delay_s
            self._commit_pending()
            if stopping:
                if self._queue or self._retry:
                    self._fail_queued(f"audit log closed before commit: {self._last_error}")
                return

    def _commit_pending(self) -> None:
        """Commit the retry batch and everything queued, MAX_BATCH rows per transaction."""
        queue = self._queue
        while True:
            batch = self._retry
            n_retry = len(batch)
            waiters: list[tuple[asyncio.Future[int], int]] = []
            seq = self._next_seq
            for k in range(min(len(queue), MAX_BATCH - len(batch))):
                if k & 1023 == 1023:
                    time.sleep(0)  # let the event loop take the GIL during a long drain
                item = queue.popleft()
                if isinstance(item, _Waiter):
                    rec = item.record
                    if rec is not None:
                        rec.seq = seq
                        seq += 1
                        batch.append(rec)
                    waiters.append((item.future, seq - 1))
                else:
                    item.seq = seq
                    seq += 1
                    batch.append(item)
            self._next_seq = seq
            self._backlog = len(batch)
            if not batch and not waiters and self._store_open:
                return
            try:
                if not self._store_open:
                    self._reopen(batch, n_retry)
                if batch:
                    self._write_batch(batch)
            except Exception as exc:
                self._on_failure(exc, batch, [fut for fut, _ in waiters])
                return
            full = len(batch) >= MAX_BATCH
            if batch:
                self._committed_seq = batch[-1].seq
            self._retry = []
            self._backlog = 0
            if not self._healthy:
                log.warning("audit log writable again; committed through seq %d", seq - 1)
                self._healthy = True
            if waiters:
                self._call_loop(_resolve_all, waiters)
            if not full:
                return

    def _reopen(self, batch: list[AuditRecord], n_retry: int) -> None:
        """Open the store again after a failure; `batch[:n_retry]` is the failed batch."""
        store_max = self._open_store()
        self._store_open = True
        self._committed_seq = max(self._committed_seq, store_max)
        if n_retry and store_max >= batch[0].seq:
            if not self._batch_is_stored(batch[:n_retry]):
                raise AuditUnavailable(
                    f"audit log already holds seq {batch[0].seq}: is another process writing it?"
                )
            del batch[:n_retry]  # the failed COMMIT did reach the disk: do not write it twice
        if store_max >= self._next_seq:
            raise AuditUnavailable(
                f"audit log holds seq {store_max}, ahead of this writer: "
                "is another process writing it?"
            )

    def _on_failure(
        self, exc: Exception, batch: list[AuditRecord], futures: list[asyncio.Future[int]]
    ) -> None:
        first = self._healthy
        self._healthy = False
        self._last_error = _describe(exc)
        self._retry = batch
        self._backlog = len(batch)
        self._retry_at = time.monotonic() + self._retry_interval_s
        if self._store_open:
            self._close_store()
            self._store_open = False
        if first:
            log.error("audit log write failed, refusing statements: %s", self._last_error)
        if futures:
            self._call_loop(_fail_all, futures, f"audit log unavailable: {self._last_error}")

    def _fail_queued(self, message: str) -> None:
        items: list[AuditRecord | _Waiter] = []
        for _ in range(10):
            try:  # the loop thread may append concurrently (after a crash)
                items = list(self._queue)
                break
            except RuntimeError:
                continue
        futures = [item.future for item in items if isinstance(item, _Waiter)]
        if futures:
            self._call_loop(_fail_all, futures, message)

    def _call_loop(self, func: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(func, *args)
        except RuntimeError:  # loop already closed: nobody is waiting any more
            pass


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    text = str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else text


class MemorySink:
    """An in-memory AuditSink for tests of other layers; `fail = True` simulates a dead disk."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.fail = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def healthy(self) -> bool:
        """False while `fail` is set."""
        return not self.fail

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Remember the loop that futures belong to."""
        self._loop = loop if loop is not None else asyncio.get_running_loop()

    def append(self, record: AuditRecord) -> None:
        """Store the record at once (seq assigned), or raise AuditUnavailable when failing."""
        if self.fail:
            raise AuditUnavailable("audit log unavailable (simulated)")
        record.seq = len(self.records) + 1
        self.records.append(record)

    def append_durable(self, record: AuditRecord) -> asyncio.Future[int]:
        """Store the record; the returned future is already resolved (or failed)."""
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        try:
            self.append(record)
        except AuditUnavailable as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(record.seq)
        return fut

    async def flush(self) -> None:
        """Nothing is buffered."""
        if self.fail:
            raise AuditUnavailable("audit log unavailable (simulated)")

    async def close(self) -> None:
        """Nothing to release."""
