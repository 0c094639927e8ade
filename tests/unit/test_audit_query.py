"""Audit log queries: tail, search filters, time ranges, table matching, read-only access."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from dbward.audit import query
from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sqlite import SqliteAuditSink
from dbward.core.errors import AuditUnavailable

T0 = 1_700_000_000_000


def write(db: Path, records: list[AuditRecord]) -> None:
    async def main() -> None:
        sink = SqliteAuditSink(db)
        sink.start()
        for r in records:
            sink.append(r)
        await sink.close()

    asyncio.run(main())


def r(i: int, **kw: object) -> AuditRecord:
    fields: dict[str, object] = {
        "event": AuditEvent.STATEMENT,
        "ts_ms": T0 + i * 1000,
        "session_id": "sess-aaaa",
        "identity": "alice",
        "kind": "read",
        "sql_text": f"q{i}",
    }
    fields.update(kw)
    return AuditRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    write(
        path,
        [
            r(0, event=AuditEvent.CONNECT, kind=""),
            r(1, tables=("public.users",)),
            r(2, identity="bob", session_id="sess-bbbb", kind="write", tables=("orders",)),
            r(3, tables=("users", "public.orders")),
            r(4, identity="bob", session_id="sess-bbbb", tables=("a%b",)),
            r(5, tables=("axb", "a_b")),
            r(6, event=AuditEvent.OUTCOME, status="ok", rows=1),
            r(7, identity="o'brien; DROP TABLE audit_log --"),
        ],
    )
    return path


def sqls(records: list[AuditRecord]) -> list[str]:
    return [x.sql_text for x in records]


def test_tail_returns_last_n_ascending(db: Path) -> None:
    assert sqls(query.tail(db, 3)) == ["q5", "q6", "q7"]
    assert [x.seq for x in query.tail(db, 3)] == [6, 7, 8]
    assert len(query.tail(db, 100)) == 8
    assert query.tail(db, 0) == []


def test_search_by_identity_session_kind_event(db: Path) -> None:
    assert sqls(query.search(db, identity="bob")) == ["q2", "q4"]
    assert sqls(query.search(db, session="sess-bbbb")) == ["q2", "q4"]
    assert sqls(query.search(db, session="sess-b")) == ["q2", "q4"]  # short-id prefix
    assert sqls(query.search(db, kind="write")) == ["q2"]
    assert sqls(query.search(db, event="outcome")) == ["q6"]
    assert sqls(query.search(db, identity="alice", kind="read", event="statement")) == [
        "q1",
        "q3",
        "q5",
    ]
    assert sqls(query.search(db, identity="o'brien; DROP TABLE audit_log --")) == ["q7"]
    assert query.search(db, identity="nobody") == []


def test_search_by_status_finds_both_record_shapes(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write(
        path,
        [
            r(1),  # intent; its outcome follows as a record of its own
            r(2, status="error", sqlstate="42P01"),  # intent with its outcome merged in
            r(3, event=AuditEvent.OUTCOME, status="error", sqlstate="57014"),
            r(4, status="ok", rows=1),
        ],
    )
    assert sqls(query.search(path, status="error")) == ["q2", "q3"]
    assert sqls(query.search(path, status="error", event="statement")) == ["q2"]
    assert sqls(query.search(path, status="ok")) == ["q4"]


def test_search_table_matches_elements_exactly(db: Path) -> None:
    assert sqls(query.search(db, table="users")) == ["q3"]  # (a record listing * would match)
    assert sqls(query.search(db, table="public.users")) == ["q1"]
    assert sqls(query.search(db, table="orders")) == ["q2"]
    assert sqls(query.search(db, table="a%b")) == ["q4"]  # no LIKE wildcards
    assert sqls(query.search(db, table="a_b")) == ["q5"]
    assert query.search(db, table="a") == []
    assert query.search(db, table='users"') == []


def test_search_table_finds_statements_on_its_whole_schema_or_database(tmp_path: Path) -> None:
    """GRANT ... ON ALL TABLES IN SCHEMA public lists `public.*`, VACUUM lists `*`: a search for
    public.users finds them too (they acted on it); a quoted name's schema is cut correctly."""
    path = tmp_path / "audit.db"
    write(
        path,
        [
            r(0, tables=("public.users",)),
            r(1, tables=("public.*",)),
            r(2, tables=("*",)),
            r(3, tables=("other.*",)),
            r(4, tables=('"a.b".*',)),
            r(5, tables=('"a.b"."c.d"',)),
        ],
    )
    assert sqls(query.search(path, table="public.users")) == ["q0", "q1", "q2"]
    assert sqls(query.search(path, table="users")) == ["q2"]  # schema unknown: only `*`
    assert sqls(query.search(path, table="public.*")) == ["q1"]
    assert sqls(query.search(path, table="*")) == ["q2"]
    assert sqls(query.search(path, table='"a.b"."c.d"')) == ["q2", "q4", "q5"]
    assert query.tables_covering('"x"".y".t') == ['"x"".y".t', '"x"".y".*', "*"]


def test_search_time_range(db: Path) -> None:
    assert sqls(query.search(db, since_ms=T0 + 5000)) == ["q5", "q6", "q7"]
    assert sqls(query.search(db, until_ms=T0 + 2000)) == ["q0", "q1"]  # until is exclusive
    assert sqls(query.search(db, since_ms=T0 + 2000, until_ms=T0 + 4000)) == ["q2", "q3"]


def test_search_limit_keeps_most_recent(db: Path) -> None:
    assert sqls(query.search(db, limit=2)) == ["q6", "q7"]
    assert sqls(query.search(db, identity="alice", limit=1)) == ["q6"]
    assert sqls(query.search(db, after_seq=6)) == ["q6", "q7"]


def test_follow_yields_new_records(db: Path) -> None:
    seen: list[AuditRecord] = []
    for rec in query.follow(db, after_seq=5, poll_interval_s=0.01, stop=lambda: len(seen) >= 3):
        seen.append(rec)
    assert [x.seq for x in seen] == [6, 7, 8]


def test_reader_is_read_only(db: Path) -> None:
    conn = query.open_readonly(db)
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("CREATE TABLE x (y)")
    conn.close()


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        query.tail(tmp_path / "nope.db", 5)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(AuditUnavailable, match="not a dbward audit log"):
        query.tail(other, 5)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00\xff" * 4096)
    with pytest.raises(AuditUnavailable, match="not a dbward audit log"):
        query.search(junk)


def test_invalid_utf8_in_file_is_readable(db: Path) -> None:
    conn = sqlite3.connect(db)
    # A hand-written row with invalid UTF-8 (bypassing the sink's cleaning).
    conn.execute(
        "INSERT INTO audit_log (seq, ts_ms, event, session_id, statement_id, sql_text, tables)"
        " VALUES (9, 0, 'statement', 's', 0, CAST(X'41FF42' AS TEXT), '[]')"
    )
    conn.commit()
    conn.close()
    assert query.tail(db, 1)[0].sql_text == "A\udcffB"
