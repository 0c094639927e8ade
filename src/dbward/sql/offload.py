"""Classifies very large statements in a worker process, so parsing one never stalls the relay.

Parsing is proportional to the text (a 1.8 MB multi-row INSERT takes ~0.4 s), and the relay's
event loop serves every session of the process: above `OFFLOAD_MIN_BYTES` the session hands
the text to this pool and waits, while the others keep flowing. Failures and timeouts give the
same answer as unparseable text (denied by the guards): never an unchecked statement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import multiprocessing
import os
import re
from typing import Final

from dbward.core.types import DEFAULT_MAX_STATEMENTS, Statement
from dbward.sql.postgres import (
    LEXER_COST_INLINE_MAX,
    PostgresClassifier,
    lexer_cost,
    unparseable_statement,
)

__all__ = ["OFFLOAD_MIN_BYTES", "OFFLOAD_SCAN_MIN_BYTES", "ClassifierPool", "should_offload"]

log = logging.getLogger("dbward.classifier")

# Statements at least this long (in bytes on the wire) are classified off the event loop.
# Below it parsing takes a few milliseconds at most; above, the worker round trip is noise.
OFFLOAD_MIN_BYTES: Final = 64 * 1024
# Code costs far more per byte: every statement and expression of a PL/pgSQL body is parsed on
# its own (a 50 KB function: ~0.12 s, where 50 KB of INSERT takes ~10 ms). Text that may hold
# code (a DO block, LANGUAGE plpgsql) goes to the pool from this size on.
OFFLOAD_CODE_MIN_BYTES: Final = 4 * 1024
# Many statements cost more per byte than one: 64 KB of "SELECT 1;" (7,270 statements) took
# 76 ms to classify inline. Text with this many semicolons goes to the pool from 4 KB on (a
# semicolon inside a literal merely sends a text there that did not need it).
OFFLOAD_MIN_STATEMENTS: Final = 1_000
# Below this no text costs the scanner much (see lexer_cost): its runs are too short.
OFFLOAD_SCAN_MIN_BYTES: Final = 1024
# `U&"..."` can spell any name, plpgsql too (LANGUAGE U&"pl\0070gsql").
_MAY_HOLD_CODE: Final = re.compile(rb'plpgsql|\bdo\b|u&"', re.IGNORECASE)


def should_offload(sql: bytes) -> bool:
    """Whether SQL of this size and look is classified in the pool rather than on the loop."""
    size = len(sql)
    if size < OFFLOAD_SCAN_MIN_BYTES:
        return False
    if size >= OFFLOAD_MIN_BYTES:
        return True
    if size >= OFFLOAD_CODE_MIN_BYTES and (
        _MAY_HOLD_CODE.search(sql) is not None or sql.count(b";") >= OFFLOAD_MIN_STATEMENTS
    ):
        return True
    # Runs of operator characters cost PostgreSQL's scanner time quadratic in their length
    # (64 KB of "/*": 8.7 s on the loop): at any size, such text goes to the pool. Operator
    # characters are ASCII, so their runs are the same in any encoding the relay accepts.
    return lexer_cost(sql.decode("latin-1")) > LEXER_COST_INLINE_MAX


# One per worker process. No cache: texts this large are never cached by the relay either.
_worker_classifier = PostgresClassifier(cache_size=0)


def _classify_in_worker(text: str, max_statements: int) -> tuple[Statement, ...]:
    _worker_classifier.max_statements = max_statements
    return _worker_classifier.classify(text)


def _failure(text: str, why: str) -> tuple[Statement, ...]:
    # The same answer as text the parser rejects (a password in it is withheld from the log too).
    return (unparseable_statement(text, f"classifier failure: {why}"),)


def _release_stuck_feeder(executor: concurrent.futures.ProcessPoolExecutor) -> None:
    """Let a broken pool's threads end: close the parent's read end of its call queue.

    A statement queued behind the one the dead worker was reading (or the rest of that one)
    sits in the call queue's pipe; at 64 KB and more the pipe is full, nobody reads it any
    more (the parent holds the read end open too, so no EPIPE), and the queue's feeder thread
    blocks in write() for good — and with it the pool's manager thread, which waits for the
    feeder before closing anything: every worker death leaked two threads, six pipe fds and
    the statement text (CPython gh-94777, fixed from Python 3.12, whose queue then has
    `_terminate_broken`). Closing the read end makes the write fail with EPIPE; the feeder and
    the manager then finish as after a clean shutdown.
    """
    queue = getattr(executor, "_call_queue", None)
    if queue is None or hasattr(queue, "_terminate_broken"):
        return  # this Python closes it itself
    reader = getattr(queue, "_reader", None)
    handle = None if reader is None else getattr(reader, "_handle", None)
    if reader is None or not isinstance(handle, int):
        return
    # Forgotten before it is closed: the feeder thread, unblocked, closes the reader too, and
    # must not close the same number again once another file may have been given it.
    reader._handle = None
    os.close(handle)


# How long a queued text may be passed over, per character, by shorter ones that arrive after
# it (see ClassifierPool._take_turn): about what parsing costs (0.25-1 s per MB).
_WAIT_PER_CHAR_S: Final = 1e-6


class ClassifierPool:
    """A small process pool for classifying large statements; started on first use.

    Texts wait their turn here, not in the executor: the shortest due first (each is due at its
    arrival plus ~1 s per MB), so a 100 KB statement is not queued behind other sessions' 16 MB
    ones (three sessions sending those kept another session's 100 KB statement waiting 23-37 s,
    and a fourth would have had it time out), and the timeout counts from the worker taking the
    text, not from its arrival.
    """

    def __init__(
        self,
        *,
        workers: int = 1,
        timeout_s: float = 60.0,
        max_statements: int = DEFAULT_MAX_STATEMENTS,
    ) -> None:
        self._workers = workers
        self._max_statements = max_statements
        self._timeout_s = timeout_s
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._busy = 0  # texts given to the executor and not answered yet (at most _workers)
        # Texts waiting for a worker: (due, arrival number, the future that starts them).
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = 0

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            # forkserver: workers do not inherit the proxy's sockets, TLS keys or event loop.
            context = multiprocessing.get_context("forkserver")
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self._workers, mp_context=context
            )
        return self._executor

    async def classify(self, text: str) -> tuple[Statement, ...]:
        """Classify `text` in a worker; never raises (failures classify as unparseable)."""
        await self._take_turn(len(text))
        try:
            return await self._classify_now(text)
        finally:
            self._give_turn_back()

    async def _take_turn(self, size: int) -> None:
        """Wait until a worker is free for this text and it is the first due."""
        if self._busy < self._workers and not self._waiting:
            self._busy += 1
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._arrivals += 1
        heapq.heappush(self._waiting, (loop.time() + size * _WAIT_PER_CHAR_S, self._arrivals, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give_turn_back()  # handed the turn, then cancelled: pass it on
            raise

    def _give_turn_back(self) -> None:
        """A text is answered: start the next due one."""
        self._busy -= 1
        while self._waiting and self._busy < self._workers:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():  # a cancelled waiter has left
                self._busy += 1
                turn.set_result(None)

    async def _classify_now(self, text: str) -> tuple[Statement, ...]:
        loop = asyncio.get_running_loop()
        try:
            pending = loop.run_in_executor(
                self._pool(), _classify_in_worker, text, self._max_statements
            )
            return await asyncio.wait_for(pending, self._timeout_s)
        except TimeoutError:
            # The worker goes on computing (it cannot be stopped safely mid-task: killing it
            # can leave the executor's feeder thread blocked for good), and every large
            # statement after this one would time out behind it: the next one gets a fresh
            # pool, and the old worker exits when it is done.
            log.warning("classifying a %d-character statement timed out", len(text))
            self.close()
            return _failure(text, "timed out")
        except concurrent.futures.process.BrokenProcessPool:
            log.error("the classifier worker died; starting a new one")
            executor = self._executor
            if executor is not None:
                _release_stuck_feeder(executor)
            self.close()
            return _failure(text, "worker died")
        except Exception as exc:  # anything else from the worker: fail closed
            log.error("classifier worker failed: %s", type(exc).__name__)
            return _failure(text, type(exc).__name__)

    def close(self) -> None:
        """Stop the workers (one still classifying finishes first; its result is abandoned)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
