"""Read-only queries over a SQLite audit log: tail, search and follow."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sqlite import EmptyAuditDatabase, check_schema
from dbward.core.errors import AuditUnavailable
from dbward.core.text import capped

__all__ = ["MAX_TS_MS", "MIN_TS_MS", "MalformedRecord", "follow", "open_readonly", "search", "tail"]

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
    uri = f"{p.resolve().as_uri()}?mode=ro"
    if _on_read_only_file_system(p):
        uri += "&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
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


def _on_read_only_file_system(path: Path) -> bool:
    """True for a log on a read-only mount (a snapshot, a backup, evidence): read it as is.

    SQLite reads a WAL database only by taking a lock in its -shm file, which it cannot create
    there ("unable to open database file"). Nothing can write such a file, so it may be opened
    immutable (no locks); unless it has a -wal file with records not yet copied into it, which
    an immutable open would silently leave out.
    """
    try:
        if not os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
        wal = Path(f"{path}-wal")
        pending = wal.is_file() and wal.stat().st_size > 0
    except OSError:
        return False  # the open that follows says what is wrong
    if pending:
        raise AuditUnavailable(
            f"audit log {path} is on a read-only file system and its last records are still "
            f"in {wal}, which SQLite cannot read there: copy both files (and any -shm) to a "
            "writable folder and read the copy"
        )
    return True


def existing_log_problem(path: Path) -> str | None:
    """Why the file already at `path` cannot serve as the audit log (None: it can, or there
    is none, or it is empty and `serve` will create the schema). Read-only."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        open_readonly(path).close()
    except EmptyAuditDatabase:
        return None
    except AuditUnavailable as exc:
        return exc.message
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


# SQLite's integer range: larger counts mean "all", and no stored ts_ms lies beyond it.
_SQLITE_MAX = 2**63 - 1
# The times a record can carry and be shown: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999Z.
MIN_TS_MS = -62_135_596_800_000
MAX_TS_MS = 253_402_300_799_999

_INTEGER = ("ts_ms", "statement_id")
_SEQ = AuditRecord._fields.index("seq")
_TS = AuditRecord._fields.index("ts_ms")
_ROWS = AuditRecord._fields.index("rows")
_DURATION = AuditRecord._fields.index("duration_ms")
_TEXT_INDEXES = tuple(
    i
    for i, name in enumerate(AuditRecord._fields)
    if name not in (*_INTEGER, "tables", "rows", "duration_ms", "seq")
)


class MalformedRecord(ValueError):
    """A row no dbward writer produced (a damaged or hand-edited log)."""

    def __init__(self, seq: object, column: str, expected: str) -> None:
        super().__init__(f"record seq {seq} is malformed ({column} is not {expected})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record(row: tuple[object, ...]) -> AuditRecord:
    """A row as a record, checked: every field has the type the writer gives it, so the
    renderers can neither crash on a damaged row nor print what is not JSON (NaN, Infinity)."""
    values = list(row)
    seq = values[_SEQ]
    for name in _INTEGER:
        if not _is_int(values[AuditRecord._fields.index(name)]):
            raise MalformedRecord(seq, name, "an integer")
    if not MIN_TS_MS <= values[_TS] <= MAX_TS_MS:  # type: ignore[operator]
        raise MalformedRecord(seq, "ts_ms", "a time between the years 1 and 9999")
    for i in _TEXT_INDEXES:
        value = values[i]
        if value is None:
            values[i] = ""  # a row inserted by hand without this column
        elif not isinstance(value, str):
            raise MalformedRecord(seq, AuditRecord._fields[i], "text")
    rows = values[_ROWS]
    if rows is not None and not _is_int(rows):
        raise MalformedRecord(seq, "rows", "an integer")
    duration = values[_DURATION]
    if duration is not None and not (
        _is_int(duration) or (isinstance(duration, float) and math.isfinite(duration))
    ):
        raise MalformedRecord(seq, "duration_ms", "a finite number")
    raw_tables = values[_TABLES] or "[]"
    try:
        tables = json.loads(raw_tables) if isinstance(raw_tables, str) else None
    except ValueError:
        tables = None
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise MalformedRecord(seq, "tables", "a JSON list of names")
    values[_TABLES] = tuple(tables)
    event = str(values[_EVENT])
    values[_EVENT] = AuditEvent(event) if event in AuditEvent._value2member_map_ else event
    return AuditRecord._make(values)


def _run(path: Path | str, sql: str, params: list[object]) -> list[AuditRecord]:
    conn = open_readonly(path)
    try:
        return [_record(row) for row in conn.execute(sql, params)]
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot read audit log {path}: {exc}") from exc
    except MalformedRecord as exc:
        raise AuditUnavailable(f"audit log {path}: {exc}") from exc
    finally:
        conn.close()


def _as_stored(text: str) -> str:
    """Filter text as the writer stores it: undecodable bytes (lone surrogates, e.g. from a
    non-UTF-8 command line) become \\udcXX text, which SQLite can bind."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _clamp(value: int) -> int:
    return max(-_SQLITE_MAX, min(value, _SQLITE_MAX))


def tail(path: Path | str, n: int = 20) -> list[AuditRecord]:
    """The last `n` records by seq, in ascending seq order."""
    if n <= 0:
        return []
    sql = f"SELECT * FROM ({_SELECT} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
    return _run(path, sql, [_clamp(n)])


def tables_covering(table: str) -> list[str]:
    """What a record lists when it acted on `table`: the name itself, its schema's `s.*` (GRANT
    ON ALL TABLES IN SCHEMA s, DROP SCHEMA s ...) when the name is qualified, and `*` (VACUUM,
    DROP OWNED ...). `s.*` and `*` themselves match only records listing exactly that."""
    if table == "*" or table.endswith(".*"):
        return [table]
    covering = [table, "*"]
    quoted = False
    last_dot = -1
    for index, char in enumerate(table):
        if char == '"':
            quoted = not quoted  # a doubled quote toggles twice: still inside
        elif char == "." and not quoted:
            last_dot = index
    if last_dot > 0:
        covering.insert(1, table[:last_dot] + ".*")
    return covering


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
    in the `statement` record it was merged into. `table` matches a record that lists it, or
    lists its schema's `s.*` or `*` (see tables_covering); `session` matches a session id
    exactly or by prefix (the short form the table view shows); `since_ms` is inclusive and
    `until_ms` exclusive.
    """
    where: list[str] = []
    params: list[object] = []
    if identity is not None:
        shown = capped(identity)
        if shown == identity:
            where.append("identity = ?")
            params.append(_as_stored(identity))
        else:
            # A claimed name too long to be kept whole is stored cut (dbward.core.text): the
            # full name finds it, and so does the stored form as a record shows it.
            where.append("identity IN (?, ?)")
            params += [_as_stored(identity), _as_stored(shown)]
    if session is not None:
        # A prefix search via range, so no LIKE wildcards from user input and the index is used.
        where.append("(session_id >= ? AND session_id < ?)")
        session = _as_stored(session)
        params += [session, session + "\U0010ffff"]
    if kind is not None:
        where.append("kind = ?")
        params.append(_as_stored(kind))
    if event is not None:
        where.append("event = ?")
        params.append(_as_stored(event))
    if status is not None:
        where.append("status = ?")
        params.append(_as_stored(status))
    if table is not None:
        covering = tables_covering(_as_stored(table))
        marks = ", ".join("?" * len(covering))
        where.append(f"EXISTS (SELECT 1 FROM json_each(audit_log.tables) WHERE value IN ({marks}))")
        params.extend(covering)
    if since_ms is not None:
        where.append("ts_ms >= ?")
        params.append(_clamp(since_ms))
    if until_ms is not None:
        where.append("ts_ms < ?")
        params.append(_clamp(until_ms))
    if after_seq is not None:
        where.append("seq > ?")
        params.append(_clamp(after_seq))
    if limit <= 0:
        return []
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    sql = f"SELECT * FROM ({_SELECT}{cond} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
    return _run(path, sql, [*params, _clamp(limit)])


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
                try:
                    rec = _record(row)
                except MalformedRecord as exc:
                    raise AuditUnavailable(f"audit log {path}: {exc}") from exc
                last = rec.seq or last
                yield rec
            if not rows:
                time.sleep(poll_interval_s)
    finally:
        conn.close()
