"""Read-only queries over a SQLite audit log: tail, search and follow."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sqlite import check_schema
from dbward.core.errors import AuditUnavailable

__all__ = ["follow", "open_readonly", "search", "tail"]

# Columns in AuditRecord field order (seq last), so a row becomes a record by position.
_SELECT = f"SELECT {', '.join(AuditRecord._fields)} FROM audit_log"
_EVENT = AuditRecord._fields.index("event")
_TABLES = AuditRecord._fields.index("tables")


def _decode(raw: bytes) -> str:
    # A hand-edited file may hold invalid UTF-8: keep the bytes visible instead of failing.
    return raw.decode("utf-8", "surrogateescape")


def open_readonly(path: Path | str) -> sqlite3.Connection:
    """Open an audit log read-only. FileNotFoundError if missing; AuditUnavailable if not ours."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"audit log {p} does not exist")
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot open audit log {p}: {exc}") from exc
    try:
        conn.text_factory = _decode
        conn.execute("PRAGMA query_only=1")
        check_schema(conn, p, create=False)
    except BaseException:
        conn.close()
        raise
    return conn


def _record(row: tuple[object, ...]) -> AuditRecord:
    values = list(row)
    event = str(values[_EVENT])
    values[_EVENT] = AuditEvent(event) if event in AuditEvent._value2member_map_ else event
    values[_TABLES] = tuple(json.loads(str(values[_TABLES] or "[]")))
    return AuditRecord._make(values)


def _run(path: Path | str, sql: str, params: list[object]) -> list[AuditRecord]:
    conn = open_readonly(path)
    try:
        return [_record(row) for row in conn.execute(sql, params)]
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot read audit log {path}: {exc}") from exc
    finally:
        conn.close()


def tail(path: Path | str, n: int = 20) -> list[AuditRecord]:
    """The last `n` records by seq, in ascending seq order."""
    if n <= 0:
        return []
    sql = f"SELECT * FROM ({_SELECT} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
    return _run(path, sql, [n])


def search(
    path: Path | str,
    *,
    identity: str | None = None,
    session: str | None = None,
    kind: str | None = None,
    table: str | None = None,
    event: str | None = None,
    status: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    after_seq: int | None = None,
    limit: int = 1000,
) -> list[AuditRecord]:
    """The most recent `limit` records matching every given filter, in ascending seq order.

    `status` matches a statement's outcome wherever it was written: in an `outcome` record or
    in the `statement` record it was merged into. `table` matches one element of the record's
    tables exactly; `session` matches a session id exactly or by prefix (the short form the
    table view shows); `since_ms` is inclusive and `until_ms` exclusive.
    """
    where: list[str] = []
    params: list[object] = []
    if identity is not None:
        where.append("identity = ?")
        params.append(identity)
    if session is not None:
        # A prefix search via range, so no LIKE wildcards from user input and the index is used.
        where.append("(session_id >= ? AND session_id < ?)")
        params += [session, session + "\U0010ffff"]
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    if event is not None:
        where.append("event = ?")
        params.append(event)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if table is not None:
        where.append("EXISTS (SELECT 1 FROM json_each(audit_log.tables) WHERE value = ?)")
        params.append(table)
    if since_ms is not None:
        where.append("ts_ms >= ?")
        params.append(since_ms)
    if until_ms is not None:
        where.append("ts_ms < ?")
        params.append(until_ms)
    if after_seq is not None:
        where.append("seq > ?")
        params.append(after_seq)
    if limit <= 0:
        return []
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    sql = f"SELECT * FROM ({_SELECT}{cond} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
    return _run(path, sql, [*params, limit])


def follow(
    path: Path | str,
    *,
    after_seq: int = 0,
    poll_interval_s: float = 0.5,
    stop: Callable[[], bool] | None = None,
) -> Iterator[AuditRecord]:
    """Yield records with seq > `after_seq` as they are committed, until `stop()` is true."""
    conn = open_readonly(path)
    try:
        last = after_seq
        while stop is None or not stop():
            rows = conn.execute(
                f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT 1000", (last,)
            ).fetchall()
            for row in rows:
                rec = _record(row)
                last = rec.seq or last
                yield rec
            if not rows:
                time.sleep(poll_interval_s)
    finally:
        conn.close()
