"""ProcessAuditSink: records reach SQLite through a real child writer process."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dbward.audit import process, query
from dbward.audit.process import ProcessAuditSink, _Batch
from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sqlite import SqliteAuditSink
from dbward.audit.writer_process import MAX_FRAME, FrameReader, _Child
from dbward.core.errors import AuditUnavailable
from fixtures.tmpfs import mounted_tmpfs


def _record(i: int, event: AuditEvent = AuditEvent.STATEMENT) -> AuditRecord:
    return AuditRecord(
        event=event,
        ts_ms=1_700_000_000_000 + i,
        session_id="s1",
        identity="alice",
        statement_id=i,
        sql_text=f"SELECT {i}",
        tables=("public.t",),
        kind="read",
    )


def test_batched_and_durable_records_are_committed_in_order(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def run() -> int:
        sink = ProcessAuditSink(db, max_delay_ms=20)
        sink.start()
        for i in range(1, 101):
            sink.append(_record(i))
        seq = await sink.append_durable(_record(101, AuditEvent.OUTCOME))
        # durable means committed: another connection sees it now
        assert [r.seq for r in query.tail(db, 1)] == [seq]
        sink.append(_record(102))
        await sink.close()
        return seq

    seq = asyncio.run(run())
    assert seq == 101
    records = query.tail(db, 1000)
    assert [r.seq for r in records] == list(range(1, 103))
    assert [r.statement_id for r in records] == list(range(1, 103))
    assert records[0].tables == ("public.t",) and records[0].identity == "alice"
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_acknowledgements_follow_batch_order_even_for_an_empty_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A flush with nothing new to send must not be acknowledged before the batches in flight.

    The child used to acknowledge an empty batch at once, so its acknowledgement was paired
    with the oldest unacknowledged batch: durable waiters were told "committed" early.
    """
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db, max_delay_ms=20)
        sink.start()
        await sink.flush()  # the child is up: from now on every batch is sent at once
        for i in range(1, 30_000):  # a batch big enough that its commit takes a while
            sink.append(_record(i))
        durable = sink.append_durable(_record(30_000, AuditEvent.OUTCOME))
        await asyncio.sleep(0)  # that batch goes to the child
        seen_when_durable: list[int] = []
        durable.add_done_callback(
            lambda _: seen_when_durable.extend(r.seq or 0 for r in query.tail(db, 1))
        )
        await sink.flush()  # an empty batch: its acknowledgement must come after the first
        assert durable.result() == 30_000
        assert seen_when_durable == [30_000]  # committed when it was reported so
        await sink.close()

    with caplog.at_level("ERROR", logger="dbward.audit"):
        asyncio.run(run())
    assert [r.message for r in caplog.records if "acknowledged" in r.message] == []


def test_an_out_of_order_acknowledgement_fails_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer for the wrong batch proves nothing: waiters are refused, the writer restarts."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.flush()
        durable = sink.append_durable(_record(1))
        sink._flush()  # sent; its real answer cannot arrive before we yield
        sink._on_message(("ack", 10_000, 99))
        with pytest.raises(AuditUnavailable):
            await durable
        deadline = time.monotonic() + 5
        while not sink.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert await sink.append_durable(_record(2)) > 0  # back, with the batch resent
        await sink.close()

    with caplog.at_level("ERROR", logger="dbward.audit"):
        asyncio.run(run())
    assert any("acknowledged batch 10000" in r.getMessage() for r in caplog.records)
    assert [r.statement_id for r in query.tail(db, 10)][-1] == 2
    assert 1 in [r.statement_id for r in query.tail(db, 10)]


def test_batched_records_arrive_within_max_delay(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db, max_delay_ms=50)
        sink.start()
        sink.append(_record(1))
        deadline = time.monotonic() + 2
        while not (db.exists() and query.tail(db, 1)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [r.statement_id for r in query.tail(db, 1)] == [1]
        await sink.close()

    asyncio.run(run())


def test_held_record_taken_back_is_never_written(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db, max_delay_ms=50)
        sink.start()
        held = sink.hold(_record(1))
        intent = held.take_back()
        assert intent is not None and intent.statement_id == 1
        assert held.take_back() is None  # only once
        sink.append(intent._replace(status="ok", rows=1))
        await sink.close()

    asyncio.run(run())
    assert [(r.statement_id, r.event, r.status, r.rows) for r in query.tail(db, 10)] == [
        (1, "statement", "ok", 1)
    ]


def test_held_record_is_written_within_max_delay(tmp_path: Path) -> None:
    # Holding never delays a record past the batch delay: an outcome that comes later finds
    # it sent and must be written as a record of its own.
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db, max_delay_ms=30)
        sink.start()
        held = sink.hold(_record(1))
        deadline = time.monotonic() + 2
        while not (db.exists() and query.tail(db, 1)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [r.statement_id for r in query.tail(db, 1)] == [1]
        assert held.take_back() is None
        await sink.close()

    asyncio.run(run())


def test_released_record_keeps_its_place_before_later_records(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db, max_delay_ms=100)
        sink.start()
        first, second = sink.hold(_record(1)), sink.hold(_record(2))
        sink.release(first)
        sink.release(first)  # a second release is a no-op
        seq = await sink.append_durable(_record(3))
        assert seq == 2
        # Every batch sends what is held, after the records queued before it.
        assert first.take_back() is None and second.take_back() is None
        await sink.close()

    asyncio.run(run())
    assert [r.statement_id for r in query.tail(db, 10)] == [1, 3, 2]


def test_held_records_are_flushed_on_close(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db, max_delay_ms=100)
        sink.start()
        sink.hold(_record(1))
        sink.append(_record(2))
        await sink.close()

    asyncio.run(run())
    assert [r.statement_id for r in query.tail(db, 10)] == [2, 1]


def test_seq_continues_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def write(n: int) -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        for i in range(n):
            sink.append(_record(i))
        await sink.close()

    asyncio.run(write(3))
    asyncio.run(write(2))
    assert [r.seq for r in query.tail(db, 10)] == [1, 2, 3, 4, 5]


def test_not_an_audit_log_is_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "other.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)

    async def run() -> None:
        ProcessAuditSink(bad).start()

    with pytest.raises(AuditUnavailable, match="not a dbward audit log"):
        asyncio.run(run())


def test_killed_writer_fails_closed_then_recovers_without_losing_records(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.append_durable(_record(1))
        assert sink._process is not None
        os.kill(sink._process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while sink.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not sink.healthy  # statements are refused while the writer is down
        sink.append(_record(2))  # kept, and sent to the restarted writer
        while not sink.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sink.healthy
        await sink.append_durable(_record(3))
        await sink.close()

    asyncio.run(run())
    assert [r.statement_id for r in query.tail(db, 10)] == [1, 2, 3]


def test_disk_full_refuses_then_recovers(tmp_path: Path) -> None:
    """A real ENOSPC/SQLITE_FULL: a 320 KiB tmpfs filled with a ballast file."""
    with mounted_tmpfs(tmp_path / "small", "320k") as mount:
        db = mount / "audit.db"

        async def run() -> None:
            sink = ProcessAuditSink(db)
            sink.start()
            await sink.append_durable(_record(0))
            ballast = mount / "ballast"
            with ballast.open("wb") as f, pytest.raises(OSError):
                f.write(b"x" * 1024 * 1024)  # fill the file system
            failed = None
            for i in range(1, 2000):
                try:
                    await sink.append_durable(
                        _record(i, AuditEvent.STATEMENT)._replace(sql_text="y" * 2000)
                    )
                except AuditUnavailable as exc:
                    failed = exc
                    break
            assert failed is not None and not sink.healthy
            ballast.unlink()
            deadline = time.monotonic() + 10
            while not sink.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert sink.healthy
            await sink.close()

        asyncio.run(run())


def test_records_appended_while_close_flushes_are_written(tmp_path: Path) -> None:
    """close() used to send only what was queued when it began, dropping later records."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db, max_delay_ms=50)
        sink.start()
        await sink.flush()
        sink.append(_record(1))
        closing = asyncio.create_task(sink.close())
        await asyncio.sleep(0)  # close() is now waiting for its flush
        sink.append(_record(2))  # e.g. a session's disconnect record
        sink.hold(_record(3))
        await closing
        with pytest.raises(AuditUnavailable, match="closed"):
            sink.append(_record(4))

    asyncio.run(run())
    assert [r.statement_id for r in query.tail(db, 10)] == [1, 2, 3]


async def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` on the loop until it holds (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _make_unwritable(db: Path) -> None:
    """Replace the log by a directory: writes and reopening fail until it is removed."""
    for p in db.parent.iterdir():
        p.unlink()
    db.mkdir()


def test_a_failed_batch_is_resent_to_a_restarted_writer(tmp_path: Path) -> None:
    """The child keeps a batch it answered "fail"; the proxy must too, in case the child dies."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.append_durable(_record(1))
        _make_unwritable(db)
        sink.append(_record(2))
        with pytest.raises(AuditUnavailable):
            await sink.append_durable(_record(3))
        assert sink._unacked_records == 2  # still the proxy's to resend
        assert sink._process is not None
        old = sink._process
        os.kill(old.pid, signal.SIGKILL)  # the writer dies before the log is writable again
        db.rmdir()
        await _wait_for(lambda: sink._process is not old and sink.healthy)
        await sink.append_durable(_record(4))
        await sink.close()

    asyncio.run(run())
    # Record 1 went with the removed file; 2 and 3 were resent to the new writer.
    assert [r.statement_id for r in query.tail(db, 10)] == [2, 3, 4]


def test_failed_batches_count_toward_max_pending(tmp_path: Path) -> None:
    """Failed batches stay in the child's backlog: the proxy must not accept more than it has
    room for, or the child's backlog (2 x max_pending) overflows and drops whole batches."""
    db = tmp_path / "audit.db"
    accepted: list[int] = []

    async def run() -> None:
        sink = ProcessAuditSink(db, max_pending=2)  # the child's limit: 4
        sink.start()
        _make_unwritable(db)
        for cycle in range(3):
            for i in (2 * cycle + 1, 2 * cycle + 2):
                try:
                    sink.append(_record(i))
                except AuditUnavailable:
                    continue
                accepted.append(i)
            with pytest.raises(AuditUnavailable):
                await sink.flush()  # the batch fails; the child keeps it
        db.rmdir()  # the child's retry (every second) creates the log again
        await _wait_for(lambda: sink.healthy)
        await sink.close()

    asyncio.run(run())
    assert [r.statement_id for r in query.tail(db, 10)] == accepted
    assert accepted == [1, 2]  # then the backlog was full


def test_writer_stops_on_a_batch_it_cannot_keep_whole(tmp_path: Path) -> None:
    """Answering "fail" would claim the records are kept; part of a batch must not be."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = SqliteAuditSink(db, max_pending=2)
        sink.start()
        out = _Answers()
        child = _Child(sink, out)  # type: ignore[arg-type]
        child.submit(1, [tuple(_record(1)), tuple(_record(2)), tuple(_record(3))])
        child.submit(2, [tuple(_record(4))])  # nothing after it is taken or answered
        await asyncio.sleep(0.1)
        assert out.messages == []
        assert child.stdin_closed.is_set()  # it stops, and exits non-zero: the parent resends
        await sink.close()

    asyncio.run(run())
    assert query.tail(db, 10) == []


class _Answers:
    """Stands in for the child's stdout: decodes what it writes."""

    def __init__(self) -> None:
        self.reader = FrameReader()
        self.messages: list[tuple[Any, ...]] = []

    def write(self, data: bytes) -> None:
        self.messages += self.reader.feed(data)


def _block_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait without running the event loop (it is busy, say unpickling a big batch)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_proxy_hears_recovery_after_a_transient_write_failure(tmp_path: Path) -> None:
    """A "fail" makes the proxy refuse statements; the child must then report its recovery,
    even if its writer recovered before the child's loop got to answer the failed batch."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = SqliteAuditSink(db, max_delay_ms=20)
        sink.start()
        out = _Answers()
        child = _Child(sink, out)  # type: ignore[arg-type]
        child.submit(1, [tuple(_record(1))])
        await _wait_for(lambda: len(out.messages) == 1)
        for p in tmp_path.iterdir():
            p.unlink()  # the next write fails; a retry creates the log again
        child.submit(2, [tuple(_record(2))])
        _block_until(lambda: not sink.healthy)  # the writer failed batch 2
        child.submit(3, [tuple(_record(3))])  # wakes the writer: its retry succeeds
        _block_until(lambda: sink.healthy and sink.last_seq == 3)
        await asyncio.sleep(0.1)  # now the loop answers
        assert [m[:2] for m in out.messages if m[0] != "health"] == [
            ("ack", 1),
            ("fail", 2),
            ("ack", 3),
        ]

        parent = ProcessAuditSink(db)
        parent._child_alive = True
        for n in (1, 2, 3):
            parent._unacked.append((n, _Batch(b"", 1, [])))
        for message in out.messages:
            parent._on_message(message)
        assert parent.healthy  # not refusing statements forever
        await sink.close()

    asyncio.run(run())


def test_a_backlog_from_an_outage_goes_out_in_bounded_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records queued while the writer was down used to go out as one frame; past the child's
    MAX_FRAME (512 MiB) the restarted child could read nothing more. Scaled down: 64 KiB."""
    db = tmp_path / "audit.db"
    limit = 64 * 1024
    frames: list[int] = []
    monkeypatch.setattr(process, "BATCH_BYTES", limit, raising=False)

    class Sent(_Batch):
        def __init__(self, payload: bytes, *args: Any) -> None:
            frames.append(len(payload))
            super().__init__(payload, *args)

    monkeypatch.setattr(process, "_Batch", Sent)
    text = "x" * 4000  # numbered below: pickle would share one string object

    async def run() -> int:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.flush()
        assert sink._process is not None
        old = sink._process
        os.kill(old.pid, signal.SIGKILL)
        await _wait_for(lambda: not sink.healthy)
        for i in range(1, 101):  # queued while the writer is down
            sink.append(_record(i)._replace(sql_text=f"{i} {text}"))
        await _wait_for(lambda: sink._process is not old and sink.healthy)
        for i in range(101, 200):
            sink.append(_record(i)._replace(sql_text=f"{i} {text}"))
        seq = await sink.append_durable(_record(200))  # in the last of several batches
        await sink.close()
        return seq

    assert asyncio.run(run()) == 200
    assert [r.statement_id for r in query.tail(db, 1000)] == list(range(1, 201))
    assert max(frames) <= limit and len(frames) > 10


def test_writer_exits_on_an_unreadable_frame(tmp_path: Path) -> None:
    """A frame the child cannot read wedged it while both sides reported healthy."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.flush()
        assert sink._process is not None and sink._stdin is not None
        old = sink._process
        sink._stdin.write(struct.pack("!I", MAX_FRAME + 1))  # a header past the limit
        await _wait_for(lambda: sink._process is not old and sink.healthy)
        assert old.poll() == 1  # the child stopped, and said so
        assert sink._process is not old
        await sink.append_durable(_record(1))
        await sink.close()

    asyncio.run(run())
    assert [r.statement_id for r in query.tail(db, 10)] == [1]


@pytest.mark.parametrize("call", ["flush", "append_durable", "close"])
def test_a_writer_that_cannot_be_restarted_fails_callers_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    db = tmp_path / "audit.db"
    monkeypatch.setattr(process, "CLOSE_TIMEOUT_S", 1.0, raising=False)

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.append_durable(_record(1))
        assert sink._process is not None
        _make_unwritable(db)  # no new writer can open it
        os.kill(sink._process.pid, signal.SIGKILL)
        await _wait_for(lambda: not sink.healthy)
        sink.append(_record(2))  # kept for a writer that never comes
        if call == "flush":
            with pytest.raises(AuditUnavailable, match="audit writer process exited"):
                await sink.flush()
        elif call == "append_durable":
            with pytest.raises(AuditUnavailable, match="audit writer process exited"):
                await sink.append_durable(_record(3))
        with pytest.raises(AuditUnavailable, match=r"with \d records not written") as info:
            await sink.close()  # gives up after CLOSE_TIMEOUT_S
        # Record 1 was committed (to the file since removed); 2 (and 3) never were.
        assert f"{1 + (call == 'append_durable')} records" in info.value.message

    async def bounded() -> None:
        await asyncio.wait_for(run(), 5)

    asyncio.run(bounded())


def test_restarting_the_writer_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """The restart waited for the new child's "ready" on the event loop: with the log locked
    (an admin's sqlite3 shell) the whole proxy stalled for the child's busy timeout (5 s)."""
    db = tmp_path / "audit.db"

    async def run() -> float:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.append_durable(_record(1))
        assert sink._process is not None
        old = sink._process
        os.kill(old.pid, signal.SIGKILL)
        old.wait()
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("PRAGMA locking_mode=EXCLUSIVE")
        lock.execute("BEGIN EXCLUSIVE")
        ticks = [time.monotonic()]
        while time.monotonic() - ticks[0] < 2.5:  # the restart begins after 1 s
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())
        assert not sink.healthy  # still starting: it cannot open the log yet
        lock.execute("ROLLBACK")
        lock.close()
        await _wait_for(lambda: sink._process is not old and sink.healthy)
        assert await sink.append_durable(_record(2)) == 2
        await sink.close()
        return max(b - a for a, b in itertools.pairwise(ticks))

    assert asyncio.run(run()) < 0.5
    assert [r.statement_id for r in query.tail(db, 10)] == [1, 2]


def test_close_ends_a_writer_still_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() gives up on a restart that cannot open the log, and leaves no writer behind."""
    db = tmp_path / "audit.db"
    monkeypatch.setattr(process, "CLOSE_TIMEOUT_S", 0.5, raising=False)

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.flush()
        assert sink._process is not None
        os.kill(sink._process.pid, signal.SIGKILL)
        sink._process.wait()
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("PRAGMA locking_mode=EXCLUSIVE")
        lock.execute("BEGIN EXCLUSIVE")
        sink.append(_record(1))
        await asyncio.sleep(1.5)  # a new writer is starting, waiting for the lock
        t0 = time.monotonic()
        with pytest.raises(AuditUnavailable, match="1 records not written"):
            await sink.close()
        assert time.monotonic() - t0 < 1.5
        lock.close()

    asyncio.run(asyncio.wait_for(run(), 6))
    writers = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "dbward.audit.writer_process"], check=False
    )
    assert writers.returncode == 1  # none left


def test_close_with_nothing_pending_does_not_wait_for_a_dead_writer(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.append_durable(_record(1))
        assert sink._process is not None
        _make_unwritable(db)
        os.kill(sink._process.pid, signal.SIGKILL)
        await _wait_for(lambda: not sink.healthy)
        t0 = time.monotonic()
        await sink.close()  # nothing lost, nothing to wait for
        assert time.monotonic() - t0 < 1

    asyncio.run(asyncio.wait_for(run(), 5))


def _commit_directly(db: Path, records: list[AuditRecord]) -> None:
    """Commit records as the writer would (the next seqs), from another connection."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        fields = AuditRecord._fields
        conn.executemany(
            f"INSERT INTO audit_log ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
            [(*r[:-1], None) for r in records],
        )
    finally:
        conn.close()


@pytest.mark.parametrize("landed", [1, 2, 3])
def test_a_batch_committed_by_a_writer_killed_before_its_ack_is_not_written_twice(
    tmp_path: Path, landed: int
) -> None:
    """kill -9 between the child's COMMIT and its ack: the proxy resent the whole batch to the
    restarted writer, so its records were in the log twice (seen with a stream of records and
    random kills: 9 duplicates in 20 kills). The stopped child stands in for that moment: the
    batch waits in its stdin while its first `landed` records are committed for it."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.append_durable(_record(1))
        assert sink._process is not None
        old = sink._process
        os.kill(old.pid, signal.SIGSTOP)
        batch = [_record(2), _record(3), _record(4)]
        sink.append(batch[0])
        sink.append(batch[1])
        waiting = sink.append_durable(batch[2])
        await asyncio.sleep(0.05)  # sent: the stopped child holds it unread
        assert sink._unacked_records == 3
        _commit_directly(db, batch[:landed])
        os.kill(old.pid, signal.SIGKILL)
        with pytest.raises(AuditUnavailable):
            await waiting  # its ack never came: refused, as before
        await _wait_for(lambda: sink._process is not old and sink.healthy)
        await sink.append_durable(_record(5))
        await sink.close()

    asyncio.run(run())
    records = query.tail(db, 10)
    assert [r.statement_id for r in records] == [1, 2, 3, 4, 5]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]


def test_records_in_the_log_that_are_not_the_resent_ones_are_not_skipped(tmp_path: Path) -> None:
    """Only records that are the unacknowledged ones are taken as committed: another writer's
    rows at those seqs do not make the proxy drop its own."""
    db = tmp_path / "audit.db"

    async def run() -> None:
        sink = ProcessAuditSink(db)
        sink.start()
        await sink.append_durable(_record(1))
        assert sink._process is not None
        old = sink._process
        os.kill(old.pid, signal.SIGSTOP)
        waiting = sink.append_durable(_record(2))
        await asyncio.sleep(0.05)
        _commit_directly(db, [_record(99)])
        os.kill(old.pid, signal.SIGKILL)
        with pytest.raises(AuditUnavailable):
            await waiting
        await _wait_for(lambda: sink._process is not old and sink.healthy)
        await sink.close()

    asyncio.run(run())
    assert [r.statement_id for r in query.tail(db, 10)] == [1, 99, 2]
