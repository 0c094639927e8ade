"""The audit record: one row of the append-only log, shared by every sink."""

from __future__ import annotations

import enum
from typing import NamedTuple


class AuditEvent(enum.StrEnum):
    """What happened. A statement's outcome is written into its intent record when it arrives
    before that record is sent to storage, else as an OUTCOME record of its own."""

    CONNECT = "connect"  # a client connection was accepted (before authentication)
    AUTH_OK = "auth_ok"
    AUTH_FAIL = "auth_fail"
    STATEMENT = "statement"  # intent: classified + decided, queued before forwarding
    OUTCOME = "outcome"  # what the database answered: status, SQLSTATE, rows, duration
    CANCEL = "cancel"  # a CancelRequest was forwarded (or refused)
    PROTOCOL_ERROR = "protocol_error"
    UPSTREAM_LOST = "upstream_lost"
    # The database session gained privileges no statement was allowed to give it (e.g. a role
    # switch inside a DO block made it a superuser); the session is terminated.
    PRIVILEGE_ESCALATION = "privilege_escalation"
    DISCONNECT = "disconnect"  # carries the session's statement count


class AuditRecord(NamedTuple):
    """One audit row, immutable. `seq` is None until the record is stored.

    A NamedTuple, not a dataclass: it is built twice per statement on the event loop thread
    (about three times cheaper to construct), and the SQLite writer binds it as a row as is,
    so the field order is the INSERT's column order. The sink assigns `seq` (gap-free) when
    it commits the record; records read back from a log, or returned by MemorySink, carry it
    (`_replace(seq=...)` makes such a copy).

    Text fields hold what the client sent; sinks store them as data, never as markup, and
    renderers escape control characters before showing them on a terminal.
    """

    event: AuditEvent
    ts_ms: int  # UTC epoch milliseconds
    session_id: str
    identity: str = ""  # identity name ("" before authentication)
    client_addr: str = ""
    application_name: str = ""
    target: str = ""  # listener name
    database: str = ""
    path: str = ""  # ProtocolPath value for statements
    statement_id: int = 0  # per-session counter; links a STATEMENT to its OUTCOME
    sql_text: str = ""  # capped at the configured length
    sql_sha256: str = ""  # SHA-256 hex of the full statement text
    kind: str = ""  # StatementKind value
    command: str = ""
    tables: tuple[str, ...] = ()
    decision: str = ""  # Verdict value
    reason: str = ""
    rule: str = ""
    status: str = ""  # outcome: "ok", "error", "rolled_back", "not_executed", "unknown", ...
    sqlstate: str = ""
    rows: int | None = None
    duration_ms: float | None = None
    detail: str = ""  # free-form extra facts (e.g. statement count at disconnect)
    seq: int | None = None  # keep last: stored rows bind it as NULL so SQLite assigns it
