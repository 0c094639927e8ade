"""The audit sink interface and the group-commit writer thread shared by storage backends."""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from dbward.audit.records import AuditRecord
from dbward.core.errors import AuditUnavailable

__all__ = ["AuditSink", "GroupCommitSink", "HeldRecord", "MemorySink"]

log = logging.getLogger("dbward.audit")

DEFAULT_MAX_DELAY_MS = 50
DEFAULT_MAX_PENDING = 1_000_000
RETRY_INTERVAL_S = 1.0
# Rows per transaction: bounds one executemany's memory and the latency of a backlog drain.
MAX_BATCH = 20_000


class HeldRecord:
    """A record queued by `AuditSink.hold`: `record` is None once the sink has sent it on.

    While it is still held, its writer may take it back (to write one record that says more,
    e.g. a statement's intent together with its outcome) instead of writing it as is.
    """

    __slots__ = ("record",)

    def __init__(self, record: AuditRecord | None) -> None:
        self.record = record

    def take_back(self) -> AuditRecord | None:
        """Withdraw the record if the sink has not sent it yet; None if it has."""
        record = self.record
        self.record = None
        return record


SENT: HeldRecord = HeldRecord(None)  # what sinks that never hold return from `hold`


class NeverHolds:
    """`hold` and `release` for a sink that sends every record on at once.

    The threaded SQLite writer takes its queue without a hook for held records, and the
    memory sink's readers (tests) want to see records at once; neither saves anything by
    holding.
    """

    def append(self, record: AuditRecord) -> None:
        """Provided by the sink."""
        raise NotImplementedError

    def hold(self, record: AuditRecord) -> HeldRecord:
        """Queue `record` as `append` does; nothing is held."""
        self.append(record)
        return SENT

    def release(self, held: HeldRecord) -> None:
        """Queue a record held elsewhere (this sink itself never holds one)."""
        record = held.take_back()
        if record is not None:
            self.append(record)


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

    def hold(self, record: AuditRecord) -> HeldRecord:
        """Queue a record that can be taken back until the sink sends it on.

        The sink sends held records with its next batch, so they are committed within the
        batch delay like `append`ed ones; a sink may also send them at once.
        """
        ...

    def release(self, held: HeldRecord) -> None:
        """Send a held record on now (after everything queued so far), if it is still held."""
        ...

    async def flush(self) -> None:
        """Return once everything appended so far is durably committed."""
        ...

    async def close(self) -> None:
        """Flush, then stop writing. Appends after close raise AuditUnavailable."""
        ...


class _Pending:
    """What the loop thread has appended since the writer last took it.

    `waiters` holds (future, index): the future resolves once `records[index]` is committed
    (with that record's seq). A flush marker's index is that of the last record appended
    before it, -1 for "everything taken earlier". The writer swaps the whole object, so the
    two lists always change hands together.
    """

    __slots__ = ("records", "waiters")

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.waiters: list[tuple[asyncio.Future[int], int]] = []


def _resolve_all(results: list[tuple[asyncio.Future[int], int]]) -> None:
    for fut, seq in results:
        if not fut.done():  # the waiter may have been cancelled
            fut.set_result(seq)


def _fail_all(futures: list[asyncio.Future[int]], message: str) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(AuditUnavailable(message))


class GroupCommitSink(NeverHolds, abc.ABC):
    """Queues records on the loop thread; one writer thread commits them in batches.

    `append` only appends to a plain list, so it costs a fraction of a microsecond and never
    wakes the writer; the writer wakes every `max_delay_ms`, or at once for a durable append
    or a flush, takes the list by swapping in an empty one and hands it to the store whole
    (no Python work per record on the writer thread, which would hold the GIL and stall the
    event loop). The store assigns seqs in list order: the record at position i of the
    uncommitted backlog gets seq `last_seq + 1 + i`, so seqs are gap-free and the log order
    is the append order. A failed batch stays at the head of the backlog and is retried
    first.

    Swapping without a lock relies on the GIL: `append` loads `self._pending` and calls
    list.append with no call (hence no thread switch) in between, so the writer can never
    take a list the loop thread is about to append to. `append_durable` and flush markers
    need the list's length as well, which is a call, so they and the swap hold `_swap_lock`.
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
        self._pending = _Pending()
        self._swap_lock = threading.Lock()
        self._wake = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        self._healthy = True
        self._last_error = ""
        # Writer-thread state (read, never written, by the loop thread).
        self._retry: list[AuditRecord] = []  # taken, not yet committed; seqs follow last_seq
        self._waiting: list[tuple[asyncio.Future[int], int]] = []  # (future, seq awaited)
        self._failed_n = 0  # rows of the transaction that last failed (head of _retry)
        self._backlog = 0  # len(self._retry), readable without touching the list
        self._committed_seq = 0
        self._retry_at = 0.0
        self._store_open = False

    # -- storage backend -------------------------------------------------------------------

    @abc.abstractmethod
    def _open_store(self) -> int:
        """Open (creating if needed) the store on the writer thread; return its max seq."""

    @abc.abstractmethod
    def _write_batch(self, batch: list[AuditRecord], first_seq: int) -> None:
        """Durably commit `batch` as seqs `first_seq`.. in one transaction, or raise."""

    @abc.abstractmethod
    def _batch_is_stored(self, batch: list[AuditRecord], first_seq: int) -> bool:
        """True if the store already holds `batch` at `first_seq`.. (a COMMIT that reported
        failure but landed)."""

    @abc.abstractmethod
    def _close_store(self) -> None:
        """Release the store; must not raise."""

    # -- loop-thread API -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False after a failed write (until a retry succeeds) or when the backlog is full."""
        return self._healthy and len(self._pending.records) + self._backlog < self._max_pending

    @property
    def room(self) -> int:
        """How many more records `append` accepts now (the writer can only make it grow)."""
        return self._max_pending - len(self._pending.records) - self._backlog

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
        if self._closed or len(self._pending.records) + self._backlog >= self._max_pending:
            raise self._refusal()
        # One statement, no call before list.append: see the class docstring.
        self._pending.records.append(record)

    def append_durable(self, record: AuditRecord) -> asyncio.Future[int]:
        """Queue `record` and wake the writer; the future resolves with the record's seq."""
        return self._enqueue_waiter(record)

    async def flush(self) -> None:
        """Wait until everything appended so far is durably committed (or raise)."""
        if self._thread is None or not self._thread.is_alive():
            if self._pending.records or self._backlog:
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
        lost = len(self._pending.records) + self._backlog
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
        with self._swap_lock:
            pending = self._pending
            records = pending.records
            over = len(records) + self._backlog >= self._max_pending
            if self._closed or (over and not force):
                fut.set_exception(self._refusal())
                return fut
            if record is not None:
                records.append(record)
            pending.waiters.append((fut, len(records) - 1))
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
            self._committed_seq = self._open_store()
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
                if self._pending.records or self._retry or self._waiting:
                    self._fail_queued(f"audit log closed before commit: {self._last_error}")
                return

    def _take(self) -> None:
        """Move everything appended so far behind the backlog (C-level list operations only)."""
        with self._swap_lock:
            taken = self._pending
            if not taken.records and not taken.waiters:
                return
            # Counted in the backlog before the swap, so `healthy` never undercounts.
            self._backlog = len(self._retry) + len(taken.records)
            self._pending = _Pending()
        base = self._committed_seq + 1 + len(self._retry)  # seq of taken.records[0]
        if self._retry:
            self._retry.extend(taken.records)
        else:
            self._retry = taken.records
        self._backlog = len(self._retry)
        if taken.waiters:
            self._waiting.extend([(fut, base + index) for fut, index in taken.waiters])

    def _commit_pending(self) -> None:
        """Commit the backlog and everything appended, MAX_BATCH rows per transaction."""
        while True:
            self._take()
            if not self._retry and not self._waiting and self._store_open:
                return
            attempted = self._failed_n  # until a new write is tried, the old one may have landed
            try:
                if not self._store_open:
                    self._reopen()
                backlog = self._retry
                chunk = backlog if len(backlog) <= MAX_BATCH else backlog[:MAX_BATCH]
                if chunk:
                    attempted = len(chunk)
                    self._write_batch(chunk, self._committed_seq + 1)
            except Exception as exc:
                self._on_failure(exc, attempted)
                return
            n = len(chunk)
            self._committed_seq += n
            if n == len(backlog):
                self._retry = []
            else:
                del backlog[:n]
            self._backlog = len(self._retry)
            self._failed_n = 0
            if not self._healthy:
                log.warning(
                    "audit log writable again; committed through seq %d", self._committed_seq
                )
                self._healthy = True
            if self._waiting:
                committed = self._committed_seq
                waiting = self._waiting
                if waiting[-1][1] <= committed:
                    done, self._waiting = waiting, []
                else:
                    done = [w for w in waiting if w[1] <= committed]
                    self._waiting = [w for w in waiting if w[1] > committed]
                if done:
                    self._call_loop(_resolve_all, done)
            if n < MAX_BATCH:
                return

    def _reopen(self) -> None:
        """Open the store again after a failure; the head `_failed_n` rows may have landed."""
        store_max = self._open_store()
        self._store_open = True
        committed = self._committed_seq
        if store_max <= committed:
            return  # as expected, or a new file replaced a lost one (the store continues seq)
        n_failed = self._failed_n
        if (
            n_failed
            and store_max == committed + n_failed
            and self._batch_is_stored(self._retry[:n_failed], committed + 1)
        ):
            # The failed COMMIT did reach the disk: do not write it twice.
            del self._retry[:n_failed]
            self._backlog = len(self._retry)
            self._committed_seq = store_max
            self._failed_n = 0
            return
        raise AuditUnavailable(
            f"audit log holds seq {store_max}, ahead of this writer ({committed}): "
            "is another process writing it?"
        )

    def _on_failure(self, exc: Exception, n_failed: int) -> None:
        first = self._healthy
        self._healthy = False
        self._last_error = _describe(exc)
        self._failed_n = n_failed
        self._retry_at = time.monotonic() + self._retry_interval_s
        if self._store_open:
            self._close_store()
            self._store_open = False
        if first:
            log.error("audit log write failed, refusing statements: %s", self._last_error)
        # Every waiter taken so far fails (fail closed); its record stays queued for retry.
        waiting, self._waiting = self._waiting, []
        if waiting:
            futures = [fut for fut, _ in waiting]
            self._call_loop(_fail_all, futures, f"audit log unavailable: {self._last_error}")

    def _fail_queued(self, message: str) -> None:
        with self._swap_lock:
            futures = [fut for fut, _ in self._waiting]
            futures += [fut for fut, _ in self._pending.waiters]
            self._waiting = []
            self._pending.waiters = []
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


class MemorySink(NeverHolds):
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
        """Store a copy of the record with its seq, or raise AuditUnavailable when failing."""
        if self.fail:
            raise AuditUnavailable("audit log unavailable (simulated)")
        self.records.append(record._replace(seq=len(self.records) + 1))

    def append_durable(self, record: AuditRecord) -> asyncio.Future[int]:
        """Store the record; the returned future is already resolved (or failed)."""
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        try:
            self.append(record)
        except AuditUnavailable as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(len(self.records))
        return fut

    async def flush(self) -> None:
        """Nothing is buffered."""
        if self.fail:
            raise AuditUnavailable("audit log unavailable (simulated)")

    async def close(self) -> None:
        """Nothing to release."""
