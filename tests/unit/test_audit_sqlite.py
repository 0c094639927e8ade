"""SQLite audit sink: group commit, durability, seq continuity, append-only, fail closed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from dbward.audit import query
from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sink import AuditSink, MemorySink
from dbward.audit.sqlite import SqliteAuditSink
from dbward.core.errors import AuditUnavailable

T = TypeVar("T")


def rec(i: int = 0, **kw: object) -> AuditRecord:
    fields: dict[str, object] = {
        "event": AuditEvent.STATEMENT,
        "ts_ms": 1_700_000_000_000 + i,
        "session_id": "s1",
        "identity": "alice",
        "sql_text": f"SELECT {i}",
    }
    fields.update(kw)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def run(func: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await func()

    return asyncio.run(main())


def rows(path: Path, sql: str = "SELECT seq, sql_text FROM audit_log ORDER BY seq") -> list:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_sinks_satisfy_protocol(tmp_path: Path) -> None:
    assert isinstance(SqliteAuditSink(tmp_path / "a.db"), AuditSink)
    assert isinstance(MemorySink(), AuditSink)


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_delay_ms"):
        SqliteAuditSink(tmp_path / "a.db", max_delay_ms=0)
    with pytest.raises(ValueError, match="max_delay_ms"):
        SqliteAuditSink(tmp_path / "a.db", max_delay_ms=101)


def test_durable_resolves_after_commit_and_order_is_append_order(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    seen_at_resolution: list[list] = []

    async def main() -> list[int]:
        sink = SqliteAuditSink(db)
        sink.start()
        sink.append(rec(1))
        sink.append(rec(2))
        fut = sink.append_durable(rec(3))
        # Checked in the callback, i.e. at the moment of resolution on the loop thread.
        fut.add_done_callback(lambda f: seen_at_resolution.append(rows(db)))
        sink.append(rec(4))
        futs = [sink.append_durable(rec(i)) for i in range(5, 9)]
        seqs = [await fut, *[await f for f in futs]]
        await sink.close()
        return seqs

    seqs = run(main)
    assert seqs == [3, 5, 6, 7, 8]
    assert seen_at_resolution[0][:3] == [(1, "SELECT 1"), (2, "SELECT 2"), (3, "SELECT 3")]
    assert rows(db) == [(i, f"SELECT {i}") for i in range(1, 9)]


def test_durable_wakes_writer_without_waiting_for_timer(tmp_path: Path) -> None:
    async def main() -> float:
        sink = SqliteAuditSink(tmp_path / "a.db", max_delay_ms=100)
        sink.start()
        await sink.append_durable(rec(0))  # warm up
        t0 = time.monotonic()
        for i in range(5):
            await sink.append_durable(rec(i))
        elapsed = time.monotonic() - t0
        await sink.close()
        return elapsed

    # Five sequential waits on a 100 ms timer would take >= 0.5 s.
    assert run(main) < 0.45


def test_batched_records_committed_within_max_delay(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> float:
        sink = SqliteAuditSink(db, max_delay_ms=20)
        sink.start()
        t0 = time.monotonic()
        for i in range(100):
            sink.append(rec(i))
        # No flush, no durable request: the timer alone must commit them.
        await wait_for(lambda: len(rows(db)) == 100)
        elapsed = time.monotonic() - t0
        await sink.close()
        return elapsed

    assert run(main) < 1.0  # 20 ms + one fsync'd commit; generous for slow CI disks


def test_seq_gap_free_across_restart(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def session(n: int) -> int:
        sink = SqliteAuditSink(db)
        sink.start()
        for i in range(n):
            sink.append(rec(i))
        last = await sink.append_durable(rec(99))
        await sink.close()
        return last

    assert run(lambda: session(5)) == 6
    assert run(lambda: session(3)) == 10
    assert [r[0] for r in rows(db)] == list(range(1, 11))
    assert [r.seq for r in query.tail(db, 100)] == list(range(1, 11))


def test_flush_commits_everything_and_close_refuses_more(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> SqliteAuditSink:
        sink = SqliteAuditSink(db, max_delay_ms=100)
        sink.start()
        for i in range(1000):
            sink.append(rec(i))
        await sink.flush()
        assert len(rows(db)) == 1000
        assert sink.last_seq == 1000
        await sink.close()
        with pytest.raises(AuditUnavailable, match="closed"):
            sink.append(rec(1))
        with pytest.raises(AuditUnavailable, match="closed"):
            await sink.append_durable(rec(1))
        await sink.close()  # idempotent
        return sink

    run(main)


def test_large_backlog_spans_several_transactions(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        for i in range(45_000):  # more than MAX_BATCH rows
            sink.append(rec(i, sql_text=""))
        assert await sink.append_durable(rec(0)) == 45_001
        await sink.close()

    run(main)
    assert rows(db, "SELECT count(*), min(seq), max(seq) FROM audit_log") == [(45_001, 1, 45_001)]


def test_update_and_delete_refused_by_triggers(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        sink.append(rec(1))
        await sink.close()

    run(main)
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit_log SET identity = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit_log")
    conn.close()
    assert rows(db) == [(1, "SELECT 1")]


def test_schema_pragmas_and_permissions(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "er" / "audit.db"

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        sink.append(rec(1))
        await sink.flush()
        wal = Path(f"{db}-wal")
        assert wal.exists()
        assert wal.stat().st_mode & 0o777 == 0o600
        await sink.close()

    run(main)
    assert db.stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='index'")}
    assert {f"audit_log_{c}" for c in ("identity", "session_id", "ts_ms")} <= indexes
    assert not {"audit_log_kind", "audit_log_event"} & indexes  # low cardinality: not indexed
    conn.close()


def test_log_with_kind_and_event_indexes_still_works(tmp_path: Path) -> None:
    """Logs created before those two indexes were dropped open, append and search as before."""
    db = tmp_path / "a.db"

    async def session(i: int) -> int:
        sink = SqliteAuditSink(db)
        sink.start()
        seq = await sink.append_durable(rec(i, kind="write"))
        await sink.close()
        return seq

    assert run(lambda: session(1)) == 1
    conn = sqlite3.connect(db)
    conn.execute("CREATE INDEX audit_log_kind ON audit_log (kind)")
    conn.execute("CREATE INDEX audit_log_event ON audit_log (event)")
    conn.close()
    assert run(lambda: session(2)) == 2
    assert [r.seq for r in query.search(db, kind="write", event="statement")] == [1, 2]


def test_existing_file_with_loose_mode_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        await sink.close()

    run(main)
    db.chmod(0o644)
    run(main)
    assert db.stat().st_mode & 0o777 == 0o600


def test_all_fields_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    original = AuditRecord(
        event=AuditEvent.OUTCOME,
        ts_ms=1_700_000_000_123,
        session_id="sess-1",
        identity="bob",
        client_addr="10.0.0.1:5555",
        application_name="psql",
        target="main",
        database="app",
        path="extended",
        statement_id=7,
        sql_text="UPDATE t SET x = 1",
        sql_sha256="ab" * 32,
        kind="write",
        command="UPDATE",
        tables=("public.t", "u"),
        decision="allow",
        reason="ok",
        rule="rule.1",
        status="error",
        sqlstate="23505",
        rows=3,
        duration_ms=1.25,
        detail="x",
    )

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        await sink.append_durable(original)
        await sink.close()

    run(main)
    [back] = query.tail(db, 1)
    assert back == original._replace(seq=1)  # the original is immutable: seq stays None
    assert original.seq is None


def test_hostile_text_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    texts = [
        "SELECT 1;\nDROP TABLE x; -- \r\n",
        "SELECT '\x1b[2J\x1b[31mowned\x1b[0m'",
        "SELECT '\udcff\udc80' /* undecodable bytes */",
        "SELECT '[red]x[/red]' -- [bold]",
        "SELECT '\x00nul'",
    ]

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        sink.append(rec(0, sql_text=texts[0]))
        sink.append(rec(1, sql_text=texts[2], tables=("t\udcff",)))
        for i, t in enumerate(texts):
            await sink.append_durable(rec(i, sql_text=t))
        assert sink.healthy
        await sink.close()

    run(main)
    got = [r.sql_text for r in query.tail(db, 100)]
    assert got[0] == texts[0]
    assert got[1] == "SELECT '\\udcff\\udc80' /* undecodable bytes */"
    assert got[2:] == [*texts[:2], got[1], *texts[3:]]


def test_not_a_dbward_db_or_newer_schema_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    text = tmp_path / "text.db"
    text.write_text("hello, this is not SQLite at all, just some text in a file\n" * 50)

    async def start(path: Path) -> None:
        sink = SqliteAuditSink(path)
        try:
            sink.start()
        finally:
            await sink.close()

    with pytest.raises(AuditUnavailable, match="not a dbward audit log"):
        run(lambda: start(other))
    with pytest.raises(AuditUnavailable, match="not a dbward audit log"):
        run(lambda: start(text))
    # The foreign database was not converted to WAL or otherwise touched.
    conn = sqlite3.connect(other)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()

    newer = tmp_path / "newer.db"
    run(lambda: start(newer))
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(AuditUnavailable, match="newer dbward"):
        run(lambda: start(newer))


def test_directory_in_place_of_file_refused(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    db.mkdir()

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()

    with pytest.raises(AuditUnavailable, match="directory"):
        run(main)


# -- fail closed ----------------------------------------------------------------------------


def test_disk_full_fails_closed_then_recovers(tmp_path: Path) -> None:
    """A real SQLITE_FULL (PRAGMA max_page_count) on the writer's own connection."""
    db = tmp_path / "a.db"
    disk = {"full": False}

    def on_connect(conn: sqlite3.Connection) -> None:
        if disk["full"]:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")

    big = "x" * 20_000  # overflow pages: every record needs new pages

    async def main() -> None:
        sink = SqliteAuditSink(db, on_connect=on_connect, retry_interval_s=0.05)
        sink.start()
        assert await sink.append_durable(rec(1)) == 1
        await sink.close()

        disk["full"] = True
        sink = SqliteAuditSink(db, on_connect=on_connect, retry_interval_s=0.05)
        sink.start()
        assert sink.healthy
        sink.append(rec(2, sql_text=big))
        with pytest.raises(AuditUnavailable, match="full"):
            await sink.append_durable(rec(3, sql_text=big))
        assert not sink.healthy
        assert "SQLITE_FULL" in sink.last_error
        sink.append(rec(4))  # kept in memory, in order
        with pytest.raises(AuditUnavailable):
            await sink.flush()
        assert not sink.healthy

        disk["full"] = False  # the operator frees space; the next retry reconnects
        await wait_for(lambda: sink.healthy)
        assert await sink.append_durable(rec(5)) == 5
        await sink.close()

    run(main)
    assert [r[0] for r in rows(db)] == [1, 2, 3, 4, 5]
    assert [r.ts_ms % 100 for r in query.tail(db, 10)] == [1, 2, 3, 4, 5]


def test_locked_db_fails_closed_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db, busy_timeout_ms=20, retry_interval_s=0.05)
        sink.start()
        await sink.append_durable(rec(1))
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(AuditUnavailable, match="locked"):
            await sink.append_durable(rec(2))
        assert not sink.healthy
        await asyncio.sleep(0.2)  # periodic retries keep failing while the lock is held
        assert not sink.healthy
        blocker.execute("ROLLBACK")
        blocker.close()
        await wait_for(lambda: sink.healthy)
        assert await sink.append_durable(rec(3)) == 3
        await sink.close()

    run(main)
    assert [r[0] for r in rows(db)] == [1, 2, 3]


def test_removed_file_fails_closed_then_recreated(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db, retry_interval_s=0.05)
        sink.start()
        await sink.append_durable(rec(1))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        with pytest.raises(AuditUnavailable, match="removed"):
            await sink.append_durable(rec(2))
        assert not sink.healthy
        await wait_for(lambda: sink.healthy)
        await sink.close()

    run(main)
    # The new file continues the seq: the gap shows that records 1.. were lost with the file.
    assert [r[0] for r in rows(db)] == [2]
    assert db.stat().st_mode & 0o777 == 0o600


def test_backlog_limit_refuses_appends(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db, busy_timeout_ms=10, retry_interval_s=0.05, max_pending=50)
        sink.start()
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(AuditUnavailable):
            await sink.append_durable(rec(0))
        with pytest.raises(AuditUnavailable, match="backlog is full"):
            for i in range(100):
                sink.append(rec(i))
        assert not sink.healthy
        with pytest.raises(AuditUnavailable, match="backlog"):
            await sink.append_durable(rec(0))
        blocker.execute("ROLLBACK")
        blocker.close()
        await wait_for(lambda: sink.healthy)
        await sink.close()

    run(main)
    seqs = [r[0] for r in rows(db)]
    assert seqs == list(range(1, 51))  # nothing accepted was dropped, nothing refused was kept


def test_close_while_unwritable_reports_lost_records(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db, busy_timeout_ms=10, retry_interval_s=10)
        sink.start()
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        sink.append(rec(1))
        try:
            with pytest.raises(AuditUnavailable):
                await sink.close()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

    run(main)


def test_memory_sink() -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.start()
        sink.append(rec(1))
        assert await sink.append_durable(rec(2)) == 2
        sink.fail = True
        assert not sink.healthy
        with pytest.raises(AuditUnavailable):
            sink.append(rec(3))
        with pytest.raises(AuditUnavailable):
            await sink.append_durable(rec(3))
        assert [r.seq for r in sink.records] == [1, 2]
        assert sink.records[0] == rec(1)._replace(seq=1)

    run(main)


def test_append_is_cheap(tmp_path: Path) -> None:
    """The hot path stays a list append: well under 5 us even on a slow CI machine."""

    async def main() -> float:
        sink = SqliteAuditSink(tmp_path / "a.db")
        sink.start()
        records = [rec(i) for i in range(50_000)]
        t0 = time.perf_counter()
        for r in records:
            sink.append(r)
        per = (time.perf_counter() - t0) / len(records)
        await sink.close()
        return per

    assert run(main) < 5e-6


def test_writer_thread_stopped_after_close(tmp_path: Path) -> None:
    async def main() -> None:
        sink = SqliteAuditSink(tmp_path / "a.db")
        sink.start()
        await sink.close()

    run(main)
    assert not any(t.name == "dbward-audit-writer" for t in threading.enumerate())


# -- records are immutable tuples; the store assigns seq -----------------------------------


def test_record_is_an_immutable_tuple_in_insert_order() -> None:
    r = rec(1, tables=("a", "b"))
    assert r.seq is None
    assert AuditRecord._fields[:3] == ("event", "ts_ms", "session_id")
    assert AuditRecord._fields[-1] == "seq"
    assert r == tuple(getattr(r, f) for f in AuditRecord._fields)
    with pytest.raises(AttributeError):
        r.seq = 3  # type: ignore[misc]
    assert r._replace(seq=3).seq == 3


def test_appended_records_are_not_modified(tmp_path: Path) -> None:
    """The same (immutable) record may be appended twice; each copy gets its own seq."""
    db = tmp_path / "a.db"
    r = rec(1)

    async def main() -> list[int]:
        sink = SqliteAuditSink(db)
        sink.start()
        sink.append(r)
        seqs = [await sink.append_durable(r), await sink.append_durable(r)]
        await sink.close()
        return seqs

    assert run(main) == [2, 3]
    assert r.seq is None
    assert [b.seq for b in query.tail(db, 10)] == [1, 2, 3]
    assert {b._replace(seq=None) for b in query.tail(db, 10)} == {r}


def test_durable_seqs_exact_across_several_transactions(tmp_path: Path) -> None:
    """Waiters spread over a backlog larger than MAX_BATCH each get their own record's seq."""
    db = tmp_path / "a.db"

    async def main() -> tuple[list[int], list[int]]:
        sink = SqliteAuditSink(db, max_delay_ms=100)
        sink.start()
        want: list[int] = []
        futs = []
        for i in range(1, 50_001):
            if i % 7_919 == 0:
                futs.append(sink.append_durable(rec(i, sql_text="")))
                want.append(i)
            else:
                sink.append(rec(i, sql_text=""))
        await sink.flush()
        got = [await f for f in futs]
        await sink.close()
        return want, got

    want, got = run(main)
    assert got == want
    assert rows(db, "SELECT count(*), min(seq), max(seq) FROM audit_log") == [(50_000, 1, 50_000)]
    # Each durable record is stored at the seq it was told.
    for seq in want:
        assert rows(db, f"SELECT ts_ms FROM audit_log WHERE seq = {seq}") == [
            (1_700_000_000_000 + seq,)
        ]


def test_flush_with_nothing_pending_returns(tmp_path: Path) -> None:
    async def main() -> None:
        sink = SqliteAuditSink(tmp_path / "a.db")
        sink.start()
        await sink.flush()
        await sink.flush()
        assert sink.last_seq == 0
        await sink.close()

    run(main)


def test_tables_stored_as_json(tmp_path: Path) -> None:
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        for tables in [(), ("t",), ("public.t", "u"), ("t",), ('q"uo\\te', "é")]:
            sink.append(rec(1, tables=tables))
        await sink.close()

    run(main)
    assert [r[0] for r in rows(db, "SELECT tables FROM audit_log ORDER BY seq")] == [
        "[]",
        '["t"]',
        '["public.t", "u"]',
        '["t"]',
        '["q\\"uo\\\\te", "é"]',
    ]
    assert [r.tables for r in query.tail(db, 10)][-1] == ('q"uo\\te', "é")
    assert [r.event for r in query.tail(db, 10)] == [AuditEvent.STATEMENT] * 5


def test_another_writer_fails_closed(tmp_path: Path) -> None:
    """Rows written by another process make the seqs disagree: refuse, never renumber."""
    db = tmp_path / "a.db"

    async def main() -> None:
        sink = SqliteAuditSink(db, retry_interval_s=0.05)
        sink.start()
        assert await sink.append_durable(rec(1)) == 1
        other = sqlite3.connect(db, isolation_level=None)
        other.execute(
            "INSERT INTO audit_log (ts_ms, event, session_id, statement_id) "
            "VALUES (1, 'connect', 'intruder', 0)"
        )
        other.close()
        with pytest.raises(AuditUnavailable, match="another process"):
            await sink.append_durable(rec(2))
        assert not sink.healthy
        await asyncio.sleep(0.2)  # retries reopen the log and still refuse
        assert not sink.healthy
        assert "another process" in sink.last_error
        with pytest.raises(AuditUnavailable):
            await sink.close()

    run(main)
    assert [r[0] for r in rows(db)] == [1, 2]  # our record 2 was never written


def test_failed_commit_that_landed_is_not_written_twice(tmp_path: Path) -> None:
    """A COMMIT reported as failed but durable: the retry sees it in the store and skips it."""
    db = tmp_path / "a.db"

    class LandedButFailed(SqliteAuditSink):
        fail_once = True

        def _write_batch(self, batch: list[AuditRecord], first_seq: int) -> None:
            super()._write_batch(batch, first_seq)
            if self.fail_once and len(batch) > 1:
                self.fail_once = False
                raise sqlite3.OperationalError("disk I/O error (simulated, after commit)")

    async def main() -> None:
        sink = LandedButFailed(db, retry_interval_s=0.05)
        sink.start()
        sink.append(rec(1))
        with pytest.raises(AuditUnavailable, match="I/O"):
            await sink.append_durable(rec(2))
        assert not sink.healthy
        sink.append(rec(3))
        await wait_for(lambda: sink.healthy)
        assert await sink.append_durable(rec(4)) == 4
        await sink.close()

    run(main)
    assert rows(db) == [(i, f"SELECT {i}") for i in range(1, 5)]


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_link_in_place_of_the_logs_own_files_is_refused_not_followed(
    tmp_path: Path, suffix: str
) -> None:
    """Review r61: a symbolic link planted as audit.db-wal or -shm (by anyone who can write the
    folder) was followed: the writer made its target private (chmod 0600; for a dbward run as
    root, any file on the host) and SQLite would write into it."""
    db = tmp_path / "a.db"
    target = tmp_path / "someone-elses-file"
    target.write_text("keep me\n")
    target.chmod(0o644)
    Path(f"{db}{suffix}").symlink_to(target)
    sink = SqliteAuditSink(db)
    with pytest.raises(AuditUnavailable, match=f"{db}{suffix} is not a regular file"):
        sink.start(asyncio.new_event_loop())
    assert target.stat().st_mode & 0o777 == 0o644
    assert target.read_text() == "keep me\n"


def test_docs_audit_md_names_every_event_and_column() -> None:
    """Review r64: docs/audit.md is the reference for reading the log (its SQL too): each
    event has a row of its own in its Records table and each column of the table is named."""
    import re

    from dbward.audit.sqlite import COLUMNS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "audit.md").read_text(encoding="utf-8")
    records = doc.split("## Records", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(\w+)`(?: / `(\w+)`)? \|", records, re.M)
    events = {name for row in rows for name in row if name}
    assert events == {str(event) for event in AuditEvent}
    named = set(re.findall(r"`(\w+)`", doc))
    assert not set(COLUMNS) - named, set(COLUMNS) - named
