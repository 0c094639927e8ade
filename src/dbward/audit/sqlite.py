"""SQLite audit sink: one writer thread, WAL, synchronous=FULL, append-only table."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sink import DEFAULT_MAX_DELAY_MS, DEFAULT_MAX_PENDING, GroupCommitSink
from dbward.core.errors import AuditUnavailable

__all__ = [
    "APPLICATION_ID",
    "COLUMNS",
    "SCHEMA_VERSION",
    "SqliteAuditSink",
    "check_schema",
    "lock_for_writing",
]

APPLICATION_ID = 0x64627764  # "dbwd" in PRAGMA application_id marks the file as ours
SCHEMA_VERSION = 1  # PRAGMA user_version

# Column order of the table (seq first; not the record's field order, which the INSERT and
# the readers use by name). Checked against AuditRecord at import time below.
COLUMNS: tuple[str, ...] = (
    "seq",
    "ts_ms",
    "event",
    "session_id",
    "identity",
    "client_addr",
    "application_name",
    "target",
    "database",
    "path",
    "statement_id",
    "sql_text",
    "sql_sha256",
    "kind",
    "command",
    "tables",
    "decision",
    "reason",
    "rule",
    "status",
    "sqlstate",
    "rows",
    "duration_ms",
    "detail",
)
_FIELDS = set(AuditRecord._fields)
# A new AuditRecord field must get a column (and a schema bump); seq stays the last field.
if set(COLUMNS) != _FIELDS or AuditRecord._fields[-1] != "seq":
    raise RuntimeError(f"audit columns out of date: {sorted(_FIELDS ^ set(COLUMNS))}")

_TYPES = {
    "seq": "INTEGER PRIMARY KEY",
    "ts_ms": "INTEGER NOT NULL",
    "statement_id": "INTEGER NOT NULL",
    "rows": "INTEGER",
    "duration_ms": "REAL",
}

_SCHEMA = [
    "CREATE TABLE audit_log (\n    "
    + ",\n    ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in COLUMNS)
    + "\n)",
    *(
        f"CREATE INDEX audit_log_{c} ON audit_log ({c})"
        # Not kind or event: few distinct values, so they would cost insert time and rarely
        # help a search (filtered after the other predicates). Logs created with those two
        # indexes still work.
        for c in ("identity", "session_id", "ts_ms")
    ),
    # Tamper resistance, not tamper proofing: anyone who can write the file can drop the
    # triggers, and INSERT OR REPLACE deletes without firing them (a BEFORE INSERT guard
    # would cost 40% of insert throughput). The hash chain (a later issue) makes edits
    # detectable.
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
]

# Columns in AuditRecord field order, so a record binds as is (it is a tuple). Its seq is
# last and None: SQLite assigns max(seq) + 1, gap-free with one writer and no deletes.
_INSERT = (
    f"INSERT INTO audit_log ({', '.join(AuditRecord._fields)}) "
    f"VALUES ({', '.join('?' * len(AuditRecord._fields))})"
)


class _JsonCache(dict[tuple[str, ...], str]):
    """tuple -> JSON text, as the sqlite3 adapter for tuples (a record's `tables`).

    The adapter is this dict's `__getitem__`, so a hit (table lists repeat, one per statement
    shape) runs no Python code on the writer thread; `__missing__` encodes a new tuple.
    Registered process-wide: sqlite3 would otherwise refuse to bind any tuple.
    """

    def __missing__(self, key: tuple[str, ...]) -> str:
        if len(self) >= 4096:
            self.clear()
        value = self[key] = json.dumps(list(key), ensure_ascii=False)
        return value


# Adapters are looked up process-wide by exact type. These three are C callables (dict
# lookups), so binding a record runs no Python code. The ones for None and AuditEvent change
# nothing stored (NULL and the event's text) but skip sqlite3's slow fallback for values that
# are not exactly int/float/str/bytes: it builds and discards an AttributeError per value
# (about 0.3 us each on Python 3.11, with three None fields in most records).
sqlite3.register_adapter(tuple, _JsonCache().__getitem__)
_NULL: dict[object, None] = {}
sqlite3.register_adapter(type(None), _NULL.get)
sqlite3.register_adapter(AuditEvent, {e: e.value for e in AuditEvent}.__getitem__)


class EmptyAuditDatabase(AuditUnavailable):
    """An SQLite database with nothing in it yet: `serve` gives it the schema."""


def check_schema(conn: sqlite3.Connection, path: Path, *, create: bool) -> None:
    """Raise AuditUnavailable unless `conn` is a dbward audit log this version can use.

    With `create`, an empty database gets the schema.
    """
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id == 0 and version == 0:
            objects = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if objects:
                raise AuditUnavailable(f"{path} is not a dbward audit log (it holds other tables)")
            if not create:
                raise EmptyAuditDatabase(f"{path} is not a dbward audit log (empty database)")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return
    except sqlite3.OperationalError as exc:
        # Locked, read-only, cannot be opened: nothing is known yet about what the file holds.
        raise AuditUnavailable(f"cannot use the audit log {path}: {exc}{_hint(exc)}") from exc
    except sqlite3.DatabaseError as exc:
        raise AuditUnavailable(f"{path} is not a dbward audit log ({exc})") from exc
    if app_id != APPLICATION_ID:
        raise AuditUnavailable(
            f"{path} is not a dbward audit log (SQLite application_id {app_id:#x})"
        )
    if version > SCHEMA_VERSION:
        raise AuditUnavailable(
            f"{path} was written by a newer dbward (audit schema v{version}; "
            f"this version understands up to v{SCHEMA_VERSION})"
        )
    if version < 1:
        raise AuditUnavailable(f"{path} has an invalid audit schema version ({version})")


def _hint(exc: sqlite3.OperationalError) -> str:
    if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
        # Reading a WAL database takes a lock in its -shm file, which SQLite creates beside it.
        return (
            " (reading it needs write access to its folder, or to its -wal and -shm files: "
            "run this as the user dbward runs as)"
        )
    return ""


def location_problem(path: Path) -> str | None:
    """Why the audit log cannot be created or opened at `path` (None if nothing is known to
    stop it): checked without creating anything, for `check-config` and clear errors."""
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists() and not path.is_file():
        # /dev/null (an attempt to turn the log off), a FIFO (SQLite would block on it): dbward
        # would also have made it private to its own user, /dev/null for the whole host.
        return f"{path} is not a regular file"
    if path.exists():
        return None if os.access(path, os.R_OK | os.W_OK) else f"{path} is not writable"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create files in {ancestor}"
    return None


def _prepare_file(path: Path) -> None:
    """Create the parent directories and the file with mode 0600 (SQL text may hold PII)."""
    problem = location_problem(path)
    if problem is not None:
        raise AuditUnavailable(f"cannot create audit log {path}: {problem}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_dir():
            raise AuditUnavailable(f"audit log path {path} is a directory")
        try:
            # Created here, not by SQLite, so it never exists with the umask's mode. Only a new
            # file is opened: closing another descriptor of a file SQLite has open would drop
            # its POSIX locks.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                # The log itself may be a link to a regular file. Its -wal and -shm are SQLite's
                # own: a link or anything else there (planted by someone who can write the
                # folder) would have SQLite write into, and chmod change, what it points to.
                st = p.stat() if p == path else p.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise AuditUnavailable(
                    f"cannot create audit log {path}: {p} is not a regular file (remove it)"
                )
            if st.st_mode & 0o077:
                p.chmod(0o600)
    except OSError as exc:
        raise AuditUnavailable(f"cannot create audit log {path}: {exc.strerror or exc}") from exc


# How long a writer waits for the log's lock: the writer of a dbward that was just killed
# (kill -9, a crash) commits what it was sent and exits, within a second or two.
LOCK_WAIT_S = 5.0


def lock_for_writing(path: Path, *, wait_s: float = LOCK_WAIT_S) -> int:
    """Take the one-writer lock on the audit log (creating the file); return its descriptor.

    Keep the descriptor open while writing: the lock is released when it is closed, or when
    the process ends however it ends. Two writers on one log would take turns failing (each
    sees seqs the other wrote) and refuse statements for good; a second dbward given the same
    audit.path, or one restarted while its killed predecessor's writer still commits, must wait
    or stop at start instead. It is an flock(2) on the database file: SQLite locks with fcntl
    byte ranges, which on Linux are independent of it, and readers take no flock.
    """
    _prepare_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AuditUnavailable(f"cannot open audit log {path}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            os.close(fd)
            raise AuditUnavailable(
                f"audit log {path} is in use by another dbward process (its audit writer "
                "holds the log): give each dbward an audit.path of its own"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise AuditUnavailable(f"cannot lock audit log {path}: {exc.strerror or exc}") from exc
        return fd


def _clean(value: object) -> object:
    """Make text storable: lone surrogates (undecodable client bytes) become \\udcXX text."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, tuple):
        return tuple(_clean(v) for v in value)
    return value


class SqliteAuditSink(GroupCommitSink):
    """The embedded audit log. Construct, `start(loop)`, append, and `await close()`."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_delay_ms: int = DEFAULT_MAX_DELAY_MS,
        max_pending: int = DEFAULT_MAX_PENDING,
        busy_timeout_ms: int = 5000,
        retry_interval_s: float = 1.0,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        super().__init__(
            max_delay_ms=max_delay_ms, max_pending=max_pending, retry_interval_s=retry_interval_s
        )
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._on_connect = on_connect
        self._conn: sqlite3.Connection | None = None
        self._file_id = (0, 0)
        self._store_max = 0  # max(seq) in the open store, as of the last commit

    def _open_store(self) -> int:
        path = self.path
        _prepare_file(path)
        try:
            conn = sqlite3.connect(
                path, timeout=self._busy_timeout_ms / 1000.0, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"cannot open audit log {path}: {exc}") from exc
        try:
            check_schema(conn, path, create=True)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise AuditUnavailable(f"cannot put audit log {path} in WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            if self._on_connect is not None:
                self._on_connect(conn)
            st = os.stat(path)
            self._file_id = (st.st_dev, st.st_ino)
            max_seq: int = conn.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._store_max = max_seq
        return max_seq

    def _batch_is_stored(self, batch: list[AuditRecord], first_seq: int) -> bool:
        assert self._conn is not None
        last = batch[-1]
        row = self._conn.execute(
            "SELECT ts_ms, session_id, event FROM audit_log WHERE seq = ?",
            (first_seq + len(batch) - 1,),
        ).fetchone()
        return row is not None and tuple(row) == (last.ts_ms, last.session_id, str(last.event))

    def _write_batch(self, batch: list[AuditRecord], first_seq: int) -> None:
        conn = self._conn
        assert conn is not None
        # An unlinked or replaced file would keep accepting writes through the open descriptor
        # while the records vanish: check it is still the file we opened (one stat per batch).
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise AuditUnavailable(f"audit log {self.path} was removed") from None
        if (st.st_dev, st.st_ino) != self._file_id:
            raise AuditUnavailable(f"audit log {self.path} was replaced by another file")
        rows = batch
        if self._store_max < first_seq - 1:
            # A new file replaced a lost one: continue the seq, so the gap shows the loss.
            rows = [batch[0]._replace(seq=first_seq), *batch[1:]]
        last_seq = first_seq + len(batch) - 1
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                # The records are the parameters. map(tuple, ...) copies each into an exact
                # tuple, in C: sqlite3 binds a tuple subclass item by item through the
                # sequence protocol, 1.4 us slower per row. Iterating, binding and stepping are
                # all C, so this thread runs no Python code per row, and sqlite3 releases the
                # GIL around each step.
                conn.executemany(_INSERT, map(tuple, rows))
            except UnicodeEncodeError:
                # Rare: undecodable client bytes. Re-encode the whole batch on this slow path.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, [tuple(_clean(v) for v in row) for row in rows])
            stored: int = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            if stored != last_seq:
                raise AuditUnavailable(
                    f"another process wrote the audit log {self.path} "
                    f"(this batch got seqs through {stored}, expected {last_seq})"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        self._store_max = last_seq

    def _close_store(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
