"""The PostgreSQL session engine: one client connection, its upstream, policy and audit.

Client bytes are framed, every statement is classified and decided before it is forwarded,
and upstream bytes are scanned (not decoded) on their way back so outcomes can be audited.
Denied statements are never forwarded: in their place the upstream receives a statement that
fails (to parse, or when it runs), so PostgreSQL itself produces the error and ReadyForQuery
with the correct transaction state, and dbward swaps in its own ErrorResponse (SQLSTATE 42501).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Final, cast

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sink import HeldRecord
from dbward.core.errors import AuditUnavailable, ProtocolError
from dbward.core.text import QUOTED_ERROR_MAX, capped, without_quoted_values
from dbward.core.types import (
    Decision,
    Identity,
    PolicyRequest,
    ProtocolPath,
    SessionContext,
    Statement,
    StatementKind,
    Verdict,
)
from dbward.policy.engine import decide, parser_error_snippet
from dbward.relay.cancel import track_cancel
from dbward.relay.login import Login
from dbward.relay.services import SITE_SHARE, client_key, site_of_key
from dbward.server.upstream import UpstreamConnection, send_cancel
from dbward.sql.offload import OFFLOAD_SCAN_MIN_BYTES, should_offload
from dbward.sql.postgres import (
    CREDENTIAL_TEXT,
    LEXER_COST_INLINE_MAX,
    function_call_statement,
    lexer_cost,
    oversized_statement,
)
from dbward.sql.redact import without_literals
from dbward.wire.postgres import messages
from dbward.wire.postgres.encodings import python_codec
from dbward.wire.postgres.framing import (
    CANCEL_REQUEST_CODE,
    BackendScanner,
    Frame,
    FrontendFramer,
)

if TYPE_CHECKING:
    from dbward.relay.services import ListenerServices

log = logging.getLogger("dbward.session")

# A statement PostgreSQL rejects at parse time, sent in place of a denied one.
_POISON_SQL = "DBWARD_POLICY_DENIED"
_POISON_STATEMENT = "__dbward_denied__"  # named, so the client's unnamed statement survives
_POISON_QUERY = messages.query(_POISON_SQL)
_POISON_PARSE = messages.parse_message(_POISON_STATEMENT, _POISON_SQL)
_POISON_PARSE_UNNAMED = messages.parse_message("", _POISON_SQL)
# In place of a denied Query PostgreSQL could parse: a statement it parses but refuses when it
# runs (no setting has that name; nothing changes), as it refuses a statement it may not run.
# PostgreSQL runs each statement of a Query in the unnamed portal, which replaces the client's;
# in a transaction block the failed one stays until the block ends (a Describe of it: NoData).
# The unparseable poison left the client's there instead.
_POISON_RUN_QUERY = messages.query('SET "dbward: policy denied" = on')

# Enum members as plain str for audit records (a dict lookup beats .value's descriptor).
_TEXT: dict[object, str] = {
    member: member.value for enum in (StatementKind, ProtocolPath, Verdict) for member in enum
}

# Kinds whose intent must be durable before forwarding when durability is "strict".
_DURABLE_KINDS = frozenset(
    {StatementKind.WRITE, StatementKind.DDL, StatementKind.DCL, StatementKind.ADMIN}
)

# Flags of statements whose text holds a password: it is withheld from the audit log.
_CREDENTIAL_FLAGS = frozenset({"sets_password", "carries_credential"})
# Credential-holding text longer than this is withheld whole rather than scanned for its literals.
_REDACT_MAX_CHARS: Final = 65_536
# status, sqlstate, rows and duration_ms follow this many intent fields in an AuditRecord.
_OUTCOME_FIELDS = AuditRecord._fields.index("status")

# Op codes for the queue of responses expected from the upstream, in send order.
_OP_QUERY = 0  # simple Query or FunctionCall: ends with ReadyForQuery
_OP_PARSE = 1
_OP_BIND = 2
_OP_DESCRIBE = 3
_OP_EXECUTE = 4
_OP_CLOSE = 5
_OP_SYNC = 6
_OP_POISON = 7  # a substituted Parse that will fail; its ErrorResponse is replaced
_OP_PROBE = 8  # dbward's own Sync, Close, Sync after a failed copy: see _CopyProbe
# The data an op's reply may carry (_Op.data_type): the backend's 'D' (the frontend's is
# Describe), and CopyData ('d', _COPY_DATA).
_DATA_ROW: Final = 0x44

# Statement and portal names are split from their messages byte for byte (a name that is not
# ASCII is refused: see _NAME_MAX).
_NAME_CODEC = "latin-1"
# PostgreSQL keys prepared statements and portals by their first NAMEDATALEN - 1 bytes (63 on
# every normal build) in the server's encoding, converted from the client's. dbward's maps key
# them by the bytes the client sent: a protocol-level name they agree on is ASCII (the same
# bytes in every encoding) and at most 63 bytes (never cut, whatever NAMEDATALEN the server
# has). Any other is refused (guard.name_limit): "A"*63+"x" and "A"*63+"y" were one statement
# to PostgreSQL and two to dbward, which recorded a SELECT while PostgreSQL ran a DELETE.
_NAME_MAX: Final = 63
_NAME_TOO_LONG: Final = frozenset({"name_too_long"})
_NAME_NOT_ASCII: Final = frozenset({"name_not_ascii"})
# Bodies libpq sends in every PQexecParams (pgbench -M extended), read without a parser call:
# an Execute of the unnamed portal with no row limit, a Describe of the unnamed portal; a Bind
# of the unnamed statement into the unnamed portal starts with two NULs.
_EXECUTE_UNNAMED: Final = b"\x00\x00\x00\x00\x00"
_DESCRIBE_UNNAMED_PORTAL: Final = b"P\x00"
_BIND_UNNAMED: Final = b"\x00\x00"

_PRE_AUTH_MAX_MESSAGE = 65536

# Replies a session may owe before dbward stops reading its client (each costs dbward ~100-250
# bytes until answered, kernel socket buffers let a client that never reads queue ~1 million);
# reading resumes below the low mark. Clients that pipeline read as they go and never get near.
MAX_REPLIES_IN_FLIGHT = 100_000
_REPLIES_LOW_MARK = MAX_REPLIES_IN_FLIGHT // 2
# Client messages (but COPY data) handled in one turn of the event loop; the rest of a read
# waits for the next turn, so one pipelining client cannot hold the loop (~20-60 ms at most).
_MESSAGES_PER_TURN: Final = 1_000
_PRE_AUTH_MAX_QUEUED = 16  # messages a client may send ahead before it is authenticated
_CANCEL_REQUEST_CODE: Final = CANCEL_REQUEST_CODE.to_bytes(4, "big")

_PHASE_STARTUP = 0
_PHASE_READY = 1
_PHASE_CLOSED = 2

_Q, _P, _B, _D, _E, _C, _H, _S, _X, _F = (ord(c) for c in "QPBDECHSXF")

# The only statements accepted while standard_conforming_strings is off: those that turn it on.
_TURNS_ON_CONFORMING: Final = re.compile(
    rb"\s*(?:SET\s+(?:SESSION\s+)?standard_conforming_strings\s*(?:=|TO)\s*'?(?:on|true)'?"
    rb"|RESET\s+(?:standard_conforming_strings|ALL))\s*;?\s*\x00?\Z",
    re.IGNORECASE,
)
_COPY_DATA, _COPY_DONE, _COPY_FAIL = (ord(c) for c in "dcf")
_COPY_MESSAGES: Final = frozenset((_COPY_DATA, _COPY_DONE, _COPY_FAIL))
_COPY_OR_FLUSH: Final = frozenset((_COPY_DATA, _COPY_DONE, _COPY_FAIL, _H))


class _PreparedChanges:
    """What one batch prepares or deallocates at the SQL level (applied if it is forwarded)."""

    __slots__ = ("added", "cleared")

    def __init__(self) -> None:
        self.added: dict[str, tuple[Statement, ...]] = {}
        self.cleared = False  # DEALLOCATE or DISCARD: every prepared name is forgotten


class _Tracked:
    """A statement sent upstream whose outcome is still to be recorded."""

    __slots__ = (
        "definition",
        "forgets",
        "held",
        "path",
        "resumed",
        "sid",
        "started",
        "statement",
    )

    def __init__(
        self,
        sid: int,
        statement: Statement,
        path: ProtocolPath,
        started: float,
        held: HeldRecord | None,
    ) -> None:
        self.sid = sid
        self.statement = statement
        self.path = path
        self.started = started
        # The intent record while the sink still holds it: an outcome that arrives before
        # the sink's next batch is written into the same record instead of a second one.
        self.held = held
        # A SQL PREPARE / DECLARE / CLOSE: the name it (re)defines, settled by its outcome.
        self.definition: _Definition | None = None
        # A CLOSE ALL / DISCARD ALL: the portals it closes if it succeeds (see _forget_portals).
        self.forgets: tuple[str, ...] | None = None
        # An Execute of a portal executed before (suspended): it only fetches rows of what ran
        # then (INSERT ... RETURNING runs whole at the first Execute), it changes nothing.
        self.resumed = False


# _Portal.state: in PostgreSQL as far as dbward knows; a WITH HOLD cursor that survived a
# commit (no transaction's end drops it any more); dropped by PostgreSQL; forgotten by dbward
# where it could not tell whether PostgreSQL dropped it or code replaced it (a FETCH of it is
# then refused, an Execute of it too if PostgreSQL holds a portal of that name).
_LIVE, _HELD, _DROPPED, _DOUBTFUL = range(4)


class _Portal:
    """A portal (Bind) or SQL cursor (DECLARE) as dbward holds it: what executing it runs, and
    its fate in PostgreSQL (see _Scope: PostgreSQL drops it with the (sub)transaction that
    created it, a WITH HOLD cursor once it survived a commit only when closed)."""

    __slots__ = ("holdable", "name", "run", "state", "statements", "why")

    why: str  # once forgotten (see _forget_portals, _drop_portal): why, for the refusal

    def __init__(
        self, name: str, statements: tuple[Statement, ...], holdable: bool, plain: bool
    ) -> None:
        self.name = name
        self.statements = statements
        # What an Execute of it runs, read once per Execute; None for what needs a closer look
        # (transaction control, DO/CALL, commands that commit, FETCH/MOVE: see _needs_look).
        self.run: tuple[Statement, ...] | None = statements if plain else None
        self.holdable = holdable  # DECLARE ... WITH HOLD
        self.state = _LIVE


class _Scope:
    """A (sub)transaction as PostgreSQL holds portals: the transaction itself, or a SAVEPOINT
    of its block. The portals created in it, by name (the latest of each: an earlier one of the
    same name was closed or replaced), noted when PostgreSQL answered their definition."""

    __slots__ = ("name", "portals")

    def __init__(self, name: str | None) -> None:
        self.name = name  # None for the transaction itself
        self.portals: dict[str, _Portal] = {}


class _Savepoint:
    """One level of an explicit transaction block: what changed since it began (the block's
    start, or a SAVEPOINT), which a ROLLBACK (TO it) undoes."""

    __slots__ = ("changes", "name")

    def __init__(self, name: str | None, changes: list[_Tracked] | None = None) -> None:
        self.name = name  # None for the block itself
        self.changes: list[_Tracked] = changes if changes is not None else []


class _Op:
    """One response the upstream owes us, with what to do when it arrives."""

    __slots__ = (
        "code",
        "copies",
        "data_type",
        "decided",
        "definition",
        "drops",
        "index",
        "limit",
        "max_rows",
        "replacement",
        "sources",
        "tracked",
    )

    def __init__(
        self,
        code: int,
        tracked: list[_Tracked] | None = None,
        replacement: bytes | None = None,
        max_rows: int = 0,
        sources: tuple[_Definition, ...] = (),
    ) -> None:
        self.code = code
        self.tracked = tracked
        self.index = 0  # next statement of a multi-statement Query
        # A Query's statements PostgreSQL may still complete: all of them, none after an error.
        self.limit = 0
        self.replacement = replacement  # our ErrorResponse for a poison statement
        self.max_rows = max_rows  # Execute's row limit: PortalSuspended means exactly this many
        # Parse/Bind/Close (and an unnamed poison Parse): the name it (re)defines.
        self.definition: _Definition | None = None
        # A Query: the unnamed statement and portal it makes PostgreSQL drop (_forget_unnamed).
        self.drops: tuple[_Definition, ...] = ()
        self.copies = 0  # COPY FROM STDIN statements of a Query/Execute not started yet
        # The data frames its reply may carry now: _DATA_ROW (an Execute from the start, set
        # by _handle_execute; a Query's statement after its RowDescription), _COPY_DATA (after
        # a CopyOutResponse, until CopyDone), or none (-1). The scanner reports only the first
        # DataRow/CopyData of a run, so checking against this costs nothing per row.
        self.data_type = -1
        # Execute: the Bind of its portal and the Parse of that portal's statement when they
        # are in flight in its sync group. If PostgreSQL refuses one (an unknown table at
        # Parse, a bad parameter at Bind), that error is this Execute's outcome.
        self.sources = sources
        # Parse: its statements as decided, recorded only if PostgreSQL refuses the Parse and
        # no Execute of it follows in the sync group to carry the error. Describe: dbward's own,
        # for an Execute of a portal or a Bind of a statement it never saw (decided and refused
        # if PostgreSQL holds it: see _probe_unseen).
        self.decided: list[tuple[Statement, Decision, ProtocolPath]] | None = None


class _CopyProbe(_Op):
    """What dbward sends after a COPY FROM STDIN failed while Syncs it forwarded into the copy
    (`syncs` of them, before, among or after its data) may be unanswered: a Sync, a Close of a
    portal no client names, and a Sync.

    PostgreSQL ignored each of those Syncs that it read while copying, and answers each one it
    reads after the copy failed — which depends on when the error struck (a statement trigger,
    a view, FREEZE or a cancel before it read anything; a bad row, CopyFail or a cancel while
    reading, before or after a Sync among the data), and nothing in the error says which. The
    probe asks PostgreSQL itself: its answers come after those of the copy's Syncs, and the
    CloseComplete marks where they end, so the ReadyForQuery messages before the probe's first
    one answer the client's Syncs. Each is passed on once the next one arrives (the last before
    the CloseComplete is the probe's own), so none is kept however many Syncs there were.
    """

    __slots__ = ("answered", "closed", "extended", "held", "syncs")

    def __init__(self, syncs: int, *, extended: bool) -> None:
        super().__init__(_OP_PROBE)
        self.syncs = syncs
        self.extended = extended  # an Execute's copy: its error makes PostgreSQL skip to a Sync
        self.held: bytes | None = None  # the latest ReadyForQuery's status, not passed on yet
        self.answered = 0  # ReadyForQuery messages passed on: the client's Syncs answered
        self.closed = False  # the CloseComplete has arrived


class _Definition:
    """A statement or portal name (re)defined by a message PostgreSQL has not answered yet.

    dbward's maps say what PostgreSQL will hold once every message in flight succeeds. When
    PostgreSQL refuses or skips the message, the name means again what it meant before (or
    nothing: a failing unnamed Parse/Bind drops the old one first) — unless a later message in
    flight redefines it, which then replaces that instead.
    """

    __slots__ = (
        "drops_on_failure",
        "meaning",
        "name",
        "portal",
        "previous",
        "settled",
        "source",
        "successor",
        "sync_mark",
    )

    def __init__(  # noqa: PLR0917 (positional: called per Parse, Bind and Close)
        self,
        name: str,
        meaning: tuple[Statement, ...] | _Portal | None,
        previous: tuple[Statement, ...] | _Portal | None,
        portal: bool,
        sync_mark: int,
        drops_on_failure: bool,
    ) -> None:
        self.name = name
        self.meaning = meaning  # None: the message removes the name (Close, CLOSE, poison)
        self.previous = previous
        self.portal = portal
        self.sync_mark = sync_mark  # the sync group it was sent in
        self.drops_on_failure = drops_on_failure
        self.successor: _Definition | None = None  # the next definition of the name in flight
        self.settled = False
        # A portal's: the Parse in flight in the same sync group that defined its statement.
        self.source: _Definition | None = None


class _Await:
    """Returned by a message handler: park this message, unhandled, until it may be read.

    `quiet`: until nothing is in flight (a setting that changes how SQL reads may be changing);
    `definitions`: until PostgreSQL has answered these (the message depends on them);
    `copy`: until PostgreSQL has started the COPY FROM STDIN sent before it, or refused it.
    """

    __slots__ = ("copy", "definitions", "quiet")

    def __init__(
        self, *, quiet: bool = False, definitions: tuple[_Definition, ...] = (), copy: bool = False
    ) -> None:
        self.quiet = quiet
        self.definitions = definitions
        self.copy = copy

    def ready(self, quiet: bool, copy_decided: bool) -> bool:
        """Whether the parked message may be handled now (`quiet`: nothing in flight)."""
        return (
            (quiet or not self.quiet)
            and (copy_decided or not self.copy)
            and all(d.settled for d in self.definitions)
        )


_AWAIT_QUIET: Final = _Await(quiet=True)
_OUT_OF_MEMORY: Final = "53200"
_PROTOCOL_VIOLATION: Final = "08P01"
# An unfinished message this small is never refused for the listener's total (a session can
# always send ordinary messages, whatever others hold).
_PARTIAL_ALWAYS_FITS: Final = 1024 * 1024
# Authentication, BackendKeyData, NegotiateProtocolVersion: PostgreSQL sends them only at login;
# CopyBothResponse and FunctionCallResponse answer what dbward never lets through.
_NEVER_AFTER_LOGIN: Final = frozenset(b"RKvWV")
# Names of the replies refused when nothing asked for them, and of what they answer, for the
# log.
_REPLY_NAMES: Final = {
    0x31: "ParseComplete",
    0x32: "BindComplete",
    0x33: "CloseComplete",
    0x49: "EmptyQueryResponse",
    0x73: "PortalSuspended",
    0x48: "CopyOutResponse",
    0x63: "CopyDone",
}
# The op each of ParseComplete, BindComplete, CloseComplete answers.
_COMPLETES: Final = {0x31: _OP_PARSE, 0x32: _OP_BIND, 0x33: _OP_CLOSE}
_REQUESTS: Final = {
    0x31: "Parse",
    0x32: "Bind",
    0x33: "Close",
    0x49: "Query or Execute",
    0x73: "Execute",
}
_LINGER_S: Final = 2.0  # how long a refused client that is still sending is read and ignored
# How long a client has to take the drain's 57P01 before its connection is dropped.
SHUTDOWN_ABORT_S: Final = 1.0
# Enum members read per statement, as module constants: a class attribute load (Enum or not)
# is never specialized in CPython 3.11, a global one is.
_READ_KIND: Final = StatementKind.READ
_TRANSACTION_KIND: Final = StatementKind.TRANSACTION
_EXTENDED: Final = ProtocolPath.EXTENDED
_COPY_PATH: Final = ProtocolPath.COPY
_STATEMENT_EVENT: Final = AuditEvent.STATEMENT
_OUTCOME_EVENT: Final = AuditEvent.OUTCOME
# Statements that may commit the implicit transaction they run in (a procedure's COMMIT), and
# ones no transaction undoes: neither lets dbward claim a later rollback undid what came before.
_MAY_COMMIT: Final = frozenset({"DO", "CALL"})
_NOT_TRANSACTIONAL: Final = frozenset(
    {"PREPARE", "DEALLOCATE", "CLOSE", "CHECKPOINT", "LOAD", "DISCARD PLANS", "DISCARD SEQUENCES"}
)
_BEGINS_BLOCK: Final = frozenset({"BEGIN", "START TRANSACTION"})
# Statements after which PostgreSQL may have dropped portals created before them: the end of
# the transaction or of savepoints, and what may end the transaction its own way (a DO block
# or procedure that commits or rolls back, PREPARE TRANSACTION, statements PostgreSQL commits at
# once, which the classifier flags `outside_transaction`). An Execute of a portal running one
# of these, or a FETCH/MOVE, is looked at closer (_Portal.run).
_ENDS_PORTALS: Final = frozenset(
    {
        "COMMIT",
        "ROLLBACK",
        "ROLLBACK TO SAVEPOINT",
        "PREPARE TRANSACTION",
        "COMMIT PREPARED",
        "ROLLBACK PREPARED",
        "DO",
        "CALL",
    }
)
_SAVEPOINT_COMMANDS: Final = frozenset({"SAVEPOINT", "RELEASE", "ROLLBACK TO SAVEPOINT"})
# What the answers of these change in dbward's view of the transaction's portals (_Scope).
_PORTAL_SCOPE_COMMANDS: Final = _ENDS_PORTALS | _BEGINS_BLOCK | _SAVEPOINT_COMMANDS
# Statements that run procedural code the client's text gives or names: that code may CLOSE
# any portal or cursor PostgreSQL holds and OPEN another under its name (a refcursor variable),
# so what a portal open before one of these runs is unknown after it (see _doubt_portals).
_RUNS_CODE: Final = frozenset({"DO", "CALL"})
# Those that end portals earlier in the same Query string (DO, CALL, PREPARE TRANSACTION's
# COMMIT PREPARED and outside-transaction statements cannot end the implicit block of a string
# of several statements: PostgreSQL refuses their transaction control there).
_ENDS_PORTALS_IN_STRING: Final = frozenset(
    {"COMMIT", "ROLLBACK", "ROLLBACK TO SAVEPOINT", "PREPARE TRANSACTION"}
)
# Commands that, with no flags and no statement or cursor name, need none of _decide_all's
# checks of names, cursors and transaction ends (none of them is in the sets above).
_PLAIN_COMMANDS: Final = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})


def _ends_portals(statements: tuple[Statement, ...]) -> bool:
    """Whether running these may make PostgreSQL drop portals created before them."""
    return any(
        statement.command in _ENDS_PORTALS or "outside_transaction" in statement.flags
        for statement in statements
    )


_LOOK_FLAGS: Final = frozenset({"outside_transaction", "fetches_cursor"})


def _end_cursors_in_string(
    cursors: dict[str, tuple[Statement, ...] | str | None], ended: str, held: set[str] | None
) -> set[str] | None:
    """A statement of a Query string that may drop cursors (`ended`: COMMIT, ROLLBACK, ROLLBACK
    TO SAVEPOINT, PREPARE TRANSACTION) follows these cursors' DECLAREs in it: each is marked
    with it, a FETCH of it refused (see _resolve_cursor), unless it is certain to be there — a
    WITH HOLD cursor a COMMIT keeps (the string stops at the first error, so that COMMIT
    committed), then `held` (returned) for the rest of the string."""
    commit = ended == "COMMIT"
    for name, found in cursors.items():
        if not isinstance(found, tuple) or (held is not None and name in held):
            continue
        if commit and any("holdable_cursor" in statement.flags for statement in found):
            if held is None:
                held = set()
            held.add(name)
        else:
            cursors[name] = ended
    return held


def _replaced_by(command: str) -> str:
    """Why a portal open before a DO block or CALL is refused (see _RUNS_CODE)."""
    return f"may have been replaced by the code of a {command}"


def _refused_use(what: str, name: str, why: str) -> str:
    """The error of a refused use of a forgotten portal (`what`: cursor, for a FETCH/MOVE, or
    portal, for an Execute): what happened, and what to do."""
    again = "declare" if what == "cursor" else "bind"
    return f"{what} {name!r} {why}: {again} it again"


def _needs_look(statements: tuple[Statement, ...]) -> bool:
    """Whether an Execute of a portal of these statements is not a plain run (see _Portal)."""
    for statement in statements:
        if statement.command in _ENDS_PORTALS or (
            statement.flags and not _LOOK_FLAGS.isdisjoint(statement.flags)
        ):
            return True
    return False


def _savepoint_level(block: Sequence[_Savepoint | _Scope], name: str | None) -> int | None:
    """Index of the innermost savepoint of that name (PostgreSQL's rule), None if unseen."""
    for level in range(len(block) - 1, 0, -1):
        if block[level].name == name:
            return level
    return None


_AWAIT_COPY: Final = _Await(copy=True)
# The portal the copy probe closes (closing a portal that does not exist is no error).
# Random per process, so no client can name (and see closed) a portal of its own like it.
_PROBE_PORTAL: Final = f"dbward: copy sync probe {secrets.token_hex(8)}"
_PROBE: Final = messages.sync() + messages.close_message("P", _PROBE_PORTAL) + messages.sync()
_READY_STATUSES: Final = frozenset((b"I", b"T", b"E"))


_new_tuple: Final = tuple.__new__  # builds a NamedTuple from a tuple of all its fields

# Replies that carry no statement: one shared, never-mutated op each (no allocation per message).
_DESCRIBE_OP = _Op(_OP_DESCRIBE)
_CLOSE_OP = _Op(_OP_CLOSE)
_SYNC_OP = _Op(_OP_SYNC)


def _as_running(
    statement: Statement, inner: Statement, drop_flags: frozenset[str] = frozenset()
) -> Statement:
    """An EXECUTE/FETCH decided and audited as the statement it runs (kind, tables, flags).

    CREATE TABLE ... AS EXECUTE keeps its own kind (ddl) and tables (the new one) and adds those
    of the query it runs; EXECUTE and FETCH have none of their own.
    """
    kind = inner.kind
    if kind is not StatementKind.UNKNOWN and (
        statement.kind is StatementKind.DDL
        # A write or admin call in its own expressions (EXECUTE's parameters, a function
        # EXPLAIN ANALYZE evaluates around it): `EXECUTE x(nextval('s'))` of a SELECT is a
        # write, recorded (and made durable first) as one.
        or (kind is _READ_KIND and statement.kind in _DURABLE_KINDS)
    ):
        kind = statement.kind
    return replace(
        statement,
        kind=kind,
        tables=_joined(statement.tables, inner.tables),
        functions=_joined(statement.functions, inner.functions),
        flags=statement.flags | (inner.flags - drop_flags),
    )


def _joined(own: tuple[str, ...], more: tuple[str, ...]) -> tuple[str, ...]:
    """``own`` then the names of ``more`` not in it."""
    if not own:
        return more
    return own + tuple(name for name in more if name not in own)


def _name_flags(name: str) -> frozenset[str]:
    """Why a protocol-level statement or portal name is refused (see _NAME_MAX), as the flags
    guard.name_limit reads; empty if it is not. `name` is latin-1: one character per byte."""
    if len(name) > _NAME_MAX:
        return _NAME_TOO_LONG
    if not name.isascii():
        return _NAME_NOT_ASCII
    return frozenset()


def _with_flags(statements: tuple[Statement, ...], flags: frozenset[str]) -> tuple[Statement, ...]:
    return tuple(replace(statement, flags=statement.flags | flags) for statement in statements)


def _misnamed(what: str, name: str, flags: frozenset[str]) -> Statement:
    """What a message naming a statement or portal by a refused name stands for: the name is
    never looked up (PostgreSQL might read it as another)."""
    return Statement(
        text="",
        kind=StatementKind.UNKNOWN,
        command="EXECUTE",
        flags=flags,
        error=f"{what} name {name!r} ({len(name)} bytes)",
    )


def _uninspected(command: str, flag: str, error: str) -> Statement:
    """A statement dbward could not inspect (no text to show): kind UNKNOWN, so it is denied."""
    return Statement(
        text="", kind=StatementKind.UNKNOWN, command=command, flags=frozenset({flag}), error=error
    )


def _write_all(transport: asyncio.WriteTransport, out: list[bytes | bytearray]) -> None:
    """Write `out` in one call without joining it: it may hold a large message kept in place
    (see FrontendFramer), which a join would copy. (The relay's per-message path joins small
    pieces itself: one write of the joined bytes is cheaper than writelines.)"""
    if len(out) == 1:
        transport.write(out[0])
    else:
        transport.writelines(out)


def _denial_frame(decision: Decision) -> bytes:
    return messages.error_response("ERROR", decision.sqlstate, decision.reason)


_AUDIT_UNAVAILABLE_RULE: Final = "guard.audit_unavailable"


def _query_poison(statements: tuple[Statement, ...], path: ProtocolPath) -> bytes:
    """What PostgreSQL gets in place of a refused Query or FunctionCall: a statement that fails
    where the real one would stop short of the unnamed portal — at parse, for text PostgreSQL's
    grammar rejects (and a FunctionCall, which runs in no portal) — else one that fails as it
    runs, in the unnamed portal as the real statement would have (see _POISON_RUN_QUERY)."""
    if path is ProtocolPath.FUNCTION_CALL or any("parse_error" in s.flags for s in statements):
        return _POISON_QUERY
    return _POISON_RUN_QUERY


def _audit_unavailable_decision() -> Decision:
    return Decision(
        verdict=Verdict.DENY,
        # Also a full backlog (writes too slow to keep up): the client cannot tell the two
        # apart and need not; the proxy's log says which.
        reason=(
            "dbward: the audit log cannot record statements (write failure or backlog full); "
            "statements are refused until it recovers"
        ),
        rule=_AUDIT_UNAVAILABLE_RULE,
        sqlstate=AuditUnavailable.sqlstate,
    )


def _fatal_reason(payload: bytes | None) -> str:
    """The message of PostgreSQL's FATAL, for the audit: capped, and without the values it may
    quote (a FATAL can quote what a client sent)."""
    if payload is None:
        return "FATAL"
    try:
        message = messages.parse_error_fields(payload).get("M", "")
    except ProtocolError:
        return "FATAL"
    return capped(without_quoted_values(message), QUOTED_ERROR_MAX) or "FATAL"


class PgSession(asyncio.Protocol):
    """asyncio protocol for one client connection and the relay state of its session."""

    # Slots, not an instance dict: with more than 30 attributes a dict cannot share its keys
    # with the class, and CPython 3.11 then never specializes `self.attr` loads and
    # `self.method(...)` calls on it (each stays a generic lookup, ~25 method loads and many
    # more attribute loads per transaction). Every attribute set in __init__ is listed here.
    __slots__ = (
        "_allowed_counts",
        "_application_name",
        "_audit_refused_counts",
        "_authorization_at_login",
        "_awaiting",
        "_barrier_op",
        "_block",
        "_blocked",
        "_cancel_key",
        "_claimed_user",
        "_client_host",
        "_client_mid_frame",
        "_client_paused_for_replies",
        "_client_paused_for_upstream",
        "_closing",
        "_codec",
        "_commit_failed",
        "_committable",
        "_conforming_strings",
        "_connect_audited",
        "_context",
        "_copies_admitted",
        "_copy_ops",
        "_copy_syncs",
        "_copy_verdict_pending",
        "_copying",
        "_database",
        "_denied_counts",
        "_discard_until_sync",
        "_earlier",
        "_escalation",
        "_executed_portals",
        "_forgotten_portals",
        "_framer",
        "_hashed_cut",
        "_hashed_sha256",
        "_hashed_text",
        "_held_intents",
        "_host_key",
        "_implicit",
        "_in_block",
        "_inbox",
        "_max_statement_bytes",
        "_next_sid",
        "_offload_task",
        "_ops",
        "_over_limit",
        "_partial_counted",
        "_partial_since",
        "_partial_timer",
        "_pending_portals",
        "_pending_statements",
        "_phase",
        "_portal_events",
        "_portals",
        "_preclassified",
        "_prepared",
        "_ran_since_ready",
        "_scanner",
        "_scoped",
        "_scopes",
        "_server_encoding",
        "_shutdown_requested",
        "_site_key",
        "_startup_frames",
        "_startup_task",
        "_startup_wake",
        "_statement_count",
        "_superuser_at_login",
        "_syncs",
        "_terminated",
        "_unauthenticated",
        "_upstream",
        "_upstream_ending",
        "_upstream_farewell",
        "_upstream_held",
        "_upstream_held_since",
        "_upstream_lost_reported",
        "_upstream_paused_for_client",
        "_yielding",
        "client_addr",
        "identity",
        "services",
        "session_id",
        "transport",
    )

    def __init__(self, services: ListenerServices) -> None:
        self.services = services
        self.session_id = secrets.token_hex(8)
        self.transport: asyncio.Transport | None = None
        self.client_addr = ""
        self._client_host = ""
        self._phase = _PHASE_STARTUP
        # Before authentication only small messages are accepted (PostgreSQL caps auth tokens
        # at 64 KiB too): an anonymous client must not make dbward buffer a large message.
        self._framer = FrontendFramer(_PRE_AUTH_MAX_MESSAGE)
        self._startup_frames: deque[Frame] = deque()
        self._startup_wake: asyncio.Event | None = None
        self._startup_task: asyncio.Task[None] | None = None
        self._unauthenticated = False  # counted in services.unauthenticated, under _host_key
        self._host_key = ""
        self._site_key: str | None = None  # its /48, if it is a native IPv6 client
        self._partial_counted = 0  # bytes counted in services.partial_message_bytes
        self._upstream_held = 0  # the same, for an unfinished message from the database
        # When the unfinished large client message began (loop time; restarted when dbward
        # reads the client again after a pause), or None: partial_message_timeout_s.
        self._partial_since: float | None = None
        self._upstream_held_since: float | None = None  # the same, from the database
        # One timer checks both, armed when a large message is left unfinished and none is.
        self._partial_timer: asyncio.TimerHandle | None = None
        self._upstream_paused_for_client = False  # the client reads slower than the database
        self.identity: Identity | None = None
        self._context: SessionContext | None = None
        self._database = ""
        self._application_name = ""
        self._codec = "utf-8"
        # As PostgreSQL reports it at login (it never changes). SQL names that are not ASCII
        # mean for PostgreSQL what they mean for dbward's parser only if it and the session's
        # client_encoding are UTF8 (see _name_checked).
        self._server_encoding = "UTF8"
        self._upstream: UpstreamConnection | None = None
        self._scanner: BackendScanner | None = None
        self._cancel_key: tuple[int, bytes] | None = None
        # relay state
        self._ops: deque[_Op] = deque()
        self._inbox: deque[Frame] = deque()
        self._blocked = False  # waiting for a durable audit write before forwarding
        self._yielding = False  # parked until the loop's next turn (see _yield_turn)
        self._discard_until_sync = False
        self._prepared: dict[str, tuple[Statement, ...]] = {}
        # Portals and cursors by name. Those defined before a message that may make PostgreSQL
        # drop them (a Sync or Query: the end of an implicit transaction; COMMIT, ROLLBACK (TO
        # SAVEPOINT), DO, CALL ...) are moved to _earlier when it is forwarded, and back when
        # nothing is in flight: whether they survived is known once PostgreSQL answered it
        # (see _Scope), so until then using one waits (see _portal_in_doubt).
        self._portals: dict[str, _Portal] = {}
        self._earlier: dict[str, _Portal] = {}
        self._portal_events = False  # such a message was forwarded since nothing was in flight
        # The transaction PostgreSQL runs, as its answers tell: its savepoints (the first scope
        # is the transaction itself) with the portals created in each, and whether it is an
        # explicit block (BEGIN answered, not ended yet).
        self._scopes: list[_Scope] = [_Scope(None)]
        self._in_block = False
        self._scoped = False  # a portal was noted in _scopes since the transaction began
        # dbward's maps say what PostgreSQL will hold once every message in flight succeeds;
        # a name (re)defined by a Parse, Bind or SQL PREPARE PostgreSQL has not answered yet
        # is pending, with the sync group it was sent in. Within its group a later message may
        # rely on it (if it fails, PostgreSQL skips the rest of the group); a message of a
        # later group waits until it is settled, since PostgreSQL would then run the old one.
        self._pending_statements: dict[str, _Definition] = {}
        self._pending_portals: dict[str, _Definition] = {}
        self._syncs = 0  # Sync and Query messages forwarded: the current sync group
        # A Bind, Execute, Query or FunctionCall was forwarded since the last ReadyForQuery that
        # ended with nothing in flight: settings may have changed without being reported yet.
        self._ran_since_ready = False
        self._awaiting: _Await | None = None  # why the parked message waits
        self._copying = False  # the server is in a COPY FROM STDIN (CopyInResponse seen)
        # Ops holding a COPY FROM STDIN not started yet (an upper bound: see _copy_pending).
        self._copy_ops = 0
        self._copies_admitted = 0  # COPY FROM STDIN statements of the batch being admitted
        # Syncs forwarded into the copy since the CopyInResponse (before, among or after its
        # data): PostgreSQL ignores those it reads while copying and answers those it reads
        # after the copy failed.
        self._copy_syncs = 0
        # The client ended a copy with such Syncs (CopyDone/CopyFail sent) and PostgreSQL has
        # not answered it yet, or the copy failed and the probe asking how many of them
        # PostgreSQL answers is in flight: what comes next (but copy data) waits.
        self._copy_verdict_pending = False
        # Statements whose intent record the sink still holds, by statement id, oldest first.
        # An OrderedDict: outcomes remove the oldest entry and then look at the new oldest,
        # which a dict finds by skipping every entry deleted before it (quadratic: a session
        # that left with 550,000 statements in flight stalled the event loop for 24 s).
        self._held_intents: OrderedDict[int, _Tracked] = OrderedDict()
        self._terminated = False  # the client sent Terminate (it did not just vanish)
        self._barrier_op: _Op | None = None  # queued, but held until its intent is durable
        # Portals forgotten at a CLOSE ALL or DISCARD ALL not answered yet, or refused (then
        # PostgreSQL still holds them: see _forget_portals), or where PostgreSQL may have
        # dropped them or code replaced them (see _drop_portal); each says why (_Portal.why).
        self._forgotten_portals: dict[str, _Portal] = {}
        # standard_conforming_strings as PostgreSQL reports it: when off, backslashes in
        # string literals mean what dbward's parser (which assumes on) would not see.
        self._conforming_strings = True
        self._statement_count = 0
        self._next_sid = 0
        # The last statement text hashed, and its SHA-256: a prepared statement executed again
        # is the same str object, so it is hashed once, not per Execute.
        self._hashed_text = ""
        self._hashed_sha256 = hashlib.sha256(b"").hexdigest()
        # ... and that text as logged (cut to audit.sql_text_max): one string shared by every
        # record of it. A fresh cut per record made a pipeline of 350,000 executions of a 32 KB
        # statement hold 4 KB per queued record (+740 MB for one session).
        self._hashed_cut = ""
        self._closing = False
        self._shutdown_requested = False
        self._upstream_lost_reported = False
        self._client_mid_frame = False  # a row was cut off by an invalid upstream message
        self._upstream_ending = False  # PostgreSQL sent FATAL: nothing more goes to it
        # That FATAL's SQLSTATE and message, for the upstream_lost record: why the session ended.
        self._upstream_farewell: tuple[str, str] | None = None
        # Statements that changed something and finished ok in the current implicit transaction
        # (a Query or sync group begun with no transaction open): an error undoes them.
        self._implicit = True
        self._committable: list[_Tracked] | None = None
        # The explicit transaction block in progress (BEGIN ... COMMIT), by savepoint level:
        # statements that changed something and finished ok in it. None outside a block, and
        # whenever dbward cannot follow the block exactly (it then claims nothing).
        self._block: list[_Savepoint] | None = None
        # Portals Executed since they were bound, as the client sent the messages: a second
        # Execute of one only fetches (forgotten whenever nothing is in flight outside a block).
        self._executed_portals: set[str] = set()
        # The SQLSTATE of a COMMIT or PREPARE TRANSACTION of the block that failed: whether the
        # block went with it, ReadyForQuery tells (see _note_in_block).
        self._commit_failed: str | None = None
        self._client_paused_for_upstream = False
        self._client_paused_for_replies = False  # MAX_REPLIES_IN_FLIGHT reached
        self._connect_audited = False
        self._claimed_user = ""
        self._over_limit = False
        # What the upstream reported at login; a later change is a privilege escalation.
        self._superuser_at_login = False
        self._authorization_at_login = ""
        self._escalation: str | None = None
        # A large statement classified by the offload pool, consumed when its frame is handled.
        self._preclassified: tuple[str, tuple[Statement, ...]] | None = None
        self._max_statement_bytes = services.settings.max_statement_bytes
        # The listener's statement counts (metrics), kept at hand: touched for every batch.
        self._allowed_counts = services.counts.allowed
        self._denied_counts = services.counts.denied
        self._audit_refused_counts = services.counts.audit_refused
        self._offload_task: asyncio.Task[tuple[Statement, ...]] | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        counts = self.services.counts
        counts.connections += 1
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._client_host = str(peer[0])
            self.client_addr = f"{peer[0]}:{peer[1]}"
        else:
            self._client_host = self.client_addr = "local"
        if self.services.draining:
            counts.refused["draining"] += 1
            transport.write(
                messages.error_response(
                    "FATAL", "57P03", "dbward is shutting down and accepts no new connections"
                )
            )
            transport.close()
            self._phase = _PHASE_CLOSED
            return
        if not self._enter_unauthenticated():
            return
        # Over the limit: refused once the StartupMessage is read (as PostgreSQL does), so
        # the client gets a readable error instead of a broken SSL exchange.
        self._over_limit = len(self.services.sessions) >= self.services.settings.max_connections
        if self._over_limit:
            self.services.over_limit.add(self)
        else:
            self.services.sessions.add(self)
        self._startup_wake = asyncio.Event()
        task = self._startup_task = asyncio.get_running_loop().create_task(Login(self).run())
        startups = self.services.startup_tasks
        startups.add(task)
        task.add_done_callback(startups.discard)

    def _enter_unauthenticated(self) -> bool:
        """Count this connection against its host's cap until it authenticates; refuse it at
        once when the host is at the cap (no credentials are needed to hold a connection
        before login, so one host must not hold them all)."""
        services = self.services
        host = self._host_key = client_key(self._client_host)  # an IPv6 /64 is one host
        count = services.unauthenticated.get(host, 0)
        # ... and a /48 holds 65,536 of them: its /64s share SITE_SHARE times a host's cap.
        site = self._site_key = site_of_key(host)
        site_count = 0 if site is None else services.unauthenticated_sites.get(site, 0)
        transport = self.transport
        assert transport is not None
        cap = services.settings.max_unauthenticated_per_host
        if count >= cap or site_count >= cap * SITE_SHARE:
            services.counts.refused["max_unauthenticated_per_host"] += 1
            log.info(
                "listener %s: refusing %s, max_unauthenticated_per_host (%d) reached%s",
                services.settings.name,
                self.client_addr,
                cap,
                "" if count >= cap else f" by its /48 {site} (x{SITE_SHARE})",
            )
            # Before anything is read, so no TLS handshake either. libpq shows it in answer
            # to a StartupMessage; in answer to an SSLRequest it shows only "server sent an
            # error response during SSL exchange" (it cannot trust it before TLS).
            transport.write(
                messages.error_response(
                    "FATAL", "53300", "too many connections from this host waiting to log in"
                )
            )
            transport.close()
            self._phase = _PHASE_CLOSED
            return False
        services.unauthenticated[host] = count + 1
        if site is not None:
            services.unauthenticated_sites[site] = site_count + 1
        self._unauthenticated = True
        return True

    def _leave_unauthenticated(self) -> None:
        """Authenticated or gone: no longer counted against the host's cap."""
        if not self._unauthenticated:
            return
        self._unauthenticated = False
        services = self.services
        for counts, key in (
            (services.unauthenticated, self._host_key),
            (services.unauthenticated_sites, self._site_key),
        ):
            if key is None:
                continue
            left = counts.get(key, 1) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # the session is being closed: nothing more the client sends matters
        try:
            frames = self._framer.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        pending = self._framer.pending_bytes
        if (pending or self._partial_counted) and not self._count_partial(pending, bool(frames)):
            return
        if self._phase == _PHASE_READY:
            if self._inbox or self._blocked:
                self._inbox.extend(frames)
                self._drain_inbox()
            else:
                self._process_frames(frames)
            # With or without a Sync in flight: PostgreSQL answers what it has read (holding
            # back at most its 8 KB output buffer until a Flush or Sync), and an error empties
            # the queue up to the Sync (dbward itself drops what follows until the client's
            # Sync), so reading resumes either way. Exempting pipelines without a Sync let a
            # client that never reads make one session hold 400 MB.
            self._check_replies_owed()
        elif self._phase == _PHASE_STARTUP:
            self._startup_frames.extend(frames)
            if len(self._startup_frames) > _PRE_AUTH_MAX_QUEUED:
                self._protocol_error(ProtocolError("too many messages before authentication"))
                return
            if self._startup_wake is not None:
                self._startup_wake.set()

    def _check_replies_owed(self) -> None:
        """Stop reading the client while it is owed more than MAX_REPLIES_IN_FLIGHT replies."""
        if len(self._ops) > MAX_REPLIES_IN_FLIGHT and self.transport is not None:
            self._client_paused_for_replies = True
            self.transport.pause_reading()

    def _count_partial(self, pending: int, completed: bool) -> bool:
        """Keep the listener's total of unfinished client messages within its budget.

        Each message up to max_message_bytes is buffered whole, so sessions sending huge
        messages at once could hold many GB between them (four 250 MB CopyData messages:
        +1.5 GB). Past the budget, the session adding a large unfinished message is ended
        (53200); small ones always fit. A large one also starts the clock of
        partial_message_timeout_s (`completed`: messages were completed by this feed, so what
        is left unfinished is a new message). False if the session was ended.
        """
        services = self.services
        if completed or not pending:
            self._partial_since = None
        if (
            pending
            and self._partial_since is None
            and self._framer.expected_bytes >= _PARTIAL_ALWAYS_FITS
        ):
            self._partial_since = self._start_partial_clock()
        exceeded = self._partial_budget_exceeded(pending, self._partial_counted)
        self._partial_counted = pending
        if not exceeded:
            return True
        log.warning(
            "session %s: refusing a %d-byte unfinished message: max_partial_message_bytes "
            "(%d) reached",
            self.session_id,
            pending,
            services.settings.max_partial_message_bytes,
        )
        self._audit(
            AuditEvent.PROTOCOL_ERROR,
            reason="max_partial_message_bytes reached",
            sqlstate=_OUT_OF_MEMORY,
        )
        self._fatal_lingering(
            _OUT_OF_MEMORY,
            "dbward: out of memory for large messages; send smaller messages or retry later",
        )
        self._framer.discard()
        self._release_partial()
        return False

    def _partial_budget_exceeded(self, now: int, before: int) -> bool:
        """Count one side's unfinished message going from `before` to `now` bytes; True if it
        is a large one and the listener's total is past max_partial_message_bytes."""
        services = self.services
        services.partial_message_bytes += now - before
        return (
            now >= _PARTIAL_ALWAYS_FITS
            and services.partial_message_bytes > services.settings.max_partial_message_bytes
        )

    def _release_partial(self) -> None:
        self.services.partial_message_bytes -= self._partial_counted + self._upstream_held
        self._partial_counted = 0
        self._upstream_held = 0
        self._partial_since = self._upstream_held_since = None

    def _start_partial_clock(self) -> float:
        """Now, in loop time; makes sure the timer checking unfinished messages is armed."""
        loop = asyncio.get_running_loop()
        if self._partial_timer is None:
            self._partial_timer = loop.call_later(
                self.services.settings.partial_message_timeout_s, self._check_partial
            )
        return loop.time()

    def _check_partial(self) -> None:
        """The timer: end the session if a large message has stayed unfinished for
        partial_message_timeout_s while dbward was reading its sender; else check again when
        the oldest could be due. One timer per session, armed only while a large message is
        unfinished: nothing is armed per message."""
        self._partial_timer = None
        if self._closing or self._phase == _PHASE_CLOSED:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.services.settings.partial_message_timeout_s
        due = now + timeout
        since = self._partial_since
        # While dbward does not read the sender, the message cannot progress: its clock is
        # not checked, and starts over when reading resumes.
        if since is not None and not (
            self._blocked or self._client_paused_for_upstream or self._client_paused_for_replies
        ):
            if now - since >= timeout:
                self._partial_timed_out(timeout)
                return
            due = min(due, since + timeout)
        since = self._upstream_held_since
        if since is not None and not self._upstream_paused_for_client:
            if now - since >= timeout:
                self._upstream_timed_out(timeout)
                return
            due = min(due, since + timeout)
        if self._partial_since is not None or self._upstream_held_since is not None:
            self._partial_timer = loop.call_at(due, self._check_partial)

    def _partial_timed_out(self, timeout: float) -> None:
        """A client left a large message unfinished too long (sending a byte now and then
        held its share of max_partial_message_bytes for good): 08P01, the budget back."""
        expected, arrived = self._framer.expected_bytes, self._framer.pending_bytes
        log.warning(
            "session %s: ending the session: a %d-byte message was not complete after %g s "
            "(%d bytes arrived; partial_message_timeout_s)",
            self.session_id,
            expected,
            timeout,
            arrived,
        )
        self._audit(
            AuditEvent.PROTOCOL_ERROR,
            reason=f"message not complete within partial_message_timeout_s ({timeout:g} s)",
            sqlstate=_PROTOCOL_VIOLATION,
        )
        self._fatal_lingering(
            _PROTOCOL_VIOLATION,
            f"dbward: a message of {expected} bytes was not complete after {timeout:g} s "
            f"({arrived} bytes arrived)",
        )
        self._framer.discard()
        self._release_partial()

    def _upstream_timed_out(self, timeout: float) -> None:
        """The database left a large message unfinished too long while dbward was reading it
        (PostgreSQL writes one without pausing): treated as a lost connection (08006)."""
        log.warning(
            "session %s: ending the session: the database did not finish a %d-byte message "
            "in %g s (partial_message_timeout_s)",
            self.session_id,
            self._scanner.expected_bytes if self._scanner is not None else 0,
            timeout,
        )
        self._release_partial()
        self._upstream_gone(f"dbward: the database did not finish a message in {timeout:g} s")

    def _reading_resumed(self) -> None:
        """dbward reads the client again: an unfinished large message could not progress
        while it did not, so its time starts over."""
        if self._partial_since is not None:
            self._partial_since = asyncio.get_running_loop().time()

    def _count_upstream_held(self, held: int, started: bool) -> bool:
        """The same budget for what the database sends: a message other than a row is held
        whole until its last byte (an error can echo a value of up to 1 GB: `select
        repeat('x', 500000000)::int` from any client made one session hold ~2 GB). Past the
        budget, the session whose database is sending a large message is ended (53200). A
        large one also starts the clock of partial_message_timeout_s (`started`: what is held
        now began in this feed). False if the session was ended."""
        services = self.services
        if started or not held:
            self._upstream_held_since = None
        if (
            held
            and self._upstream_held_since is None
            and self._scanner is not None
            and self._scanner.expected_bytes >= _PARTIAL_ALWAYS_FITS
        ):
            self._upstream_held_since = self._start_partial_clock()
        exceeded = self._partial_budget_exceeded(held, self._upstream_held)
        self._upstream_held = held
        if not exceeded:
            return True
        log.warning(
            "session %s: ending the session: the database is sending a message of over %d "
            "bytes and max_partial_message_bytes (%d) is reached",
            self.session_id,
            held,
            services.settings.max_partial_message_bytes,
        )
        self._release_partial()
        self._finish_pending("unknown", _OUT_OF_MEMORY)
        self._audit(
            AuditEvent.UPSTREAM_LOST,
            reason="max_partial_message_bytes reached by a message from the database",
            sqlstate=_OUT_OF_MEMORY,
        )
        self._fatal(
            _OUT_OF_MEMORY,
            "dbward: out of memory for a large message from the database (an error or notice "
            "quoting a large value?); retry later",
        )
        return False

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        opened = self._phase != _PHASE_CLOSED or self in self.services.sessions
        self._release()
        if not opened:
            return  # refused while draining or over a cap; nothing else was opened
        was_ready = self._phase == _PHASE_READY
        self._phase = _PHASE_CLOSED
        if (
            self._startup_task is not None
            and not self._startup_task.done()
            and not self._cancel_request_queued()
        ):
            self._startup_task.cancel()
        if self._startup_wake is not None:
            self._startup_wake.set()
        upstream = self._upstream
        if upstream is not None:
            held_back = self._barrier_op
            if held_back is not None and self._ops and self._ops[-1] is held_back:
                # Waiting for its durable intent: it never reached PostgreSQL.
                self._ops.pop()
                self._finish_op(held_back, "not_executed", "")
            if self._ops and was_ready:
                if not self._terminated:
                    # The client left mid-query: cancel upstream so it does not run on alone.
                    self._cancel_upstream()
                # Whether each statement finished, was cancelled or never started, nobody
                # will hear now: say so rather than guess.
                self._finish_pending("unknown", "", all_of_them=True)
            elif was_ready and self._block is not None:
                # Nothing in flight (no COMMIT): closing the connection aborts the block.
                self._roll_back_block("")
            self._close_upstream()
        if self._connect_audited:  # a bare TCP probe (health check, port scan) leaves no trace
            self._audit(AuditEvent.DISCONNECT, detail=f"statements={self._statement_count}")

    def _cancel_request_queued(self) -> bool:
        """A CancelRequest has arrived and is not handled yet: it still goes (and is audited)
        after its client hung up, as tokio-postgres does as soon as it has sent one."""
        frames = self._startup_frames
        # A startup packet (type 0, not a typed message of the same bytes) with its code.
        return bool(frames) and frames[0][0] == 0 and frames[0][1][:4] == _CANCEL_REQUEST_CODE

    def pause_writing(self) -> None:
        # The client reads slower than the database sends: stop reading the upstream.
        self._upstream_paused_for_client = True
        if self._upstream is not None:
            self._upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self._upstream_paused_for_client = False
        if self._upstream_held_since is not None:
            # What the database was sending could not progress meanwhile: its time starts over.
            self._upstream_held_since = asyncio.get_running_loop().time()
        if self._upstream is not None and not self._upstream.transport.is_closing():
            self._upstream.transport.resume_reading()

    # ------------------------------------------------------------------ login
    # Driven by relay/login.py's Login, through these (login.LoginSession).

    async def _next_startup_frame(self) -> tuple[int, bytes, bytes]:
        assert self._startup_wake is not None
        while not self._startup_frames:
            if self._phase == _PHASE_CLOSED:
                raise ConnectionResetError("client went away during startup")
            self._startup_wake.clear()
            await self._startup_wake.wait()
        msg_type, payload, raw = self._startup_frames.popleft()
        # Before login messages are too small to be kept in place: bytes() returns them as is.
        return msg_type, bytes(payload), bytes(raw)

    def _has_unread_input(self) -> bool:
        """Client bytes are buffered unread: messages, or part of one."""
        return bool(self._startup_frames or self._framer.pending_bytes)

    def _client_gone(self) -> bool:
        """The connection is closed: its client left, or it was ended."""
        return self._phase == _PHASE_CLOSED

    def _lost_in_handshake(self) -> None:
        """The TLS handshake failed or was abandoned (the client reset the connection, an auth
        timeout): the TLS layer never made the connection, so connection_lost is never called
        on this session. Release here what connection_made took, or each such connection kept
        a max_connections slot and a max_unauthenticated_per_host one for good."""
        self._phase = _PHASE_CLOSED
        self._release()
        if self.transport is not None:
            self.transport.close()

    def _startup_received(self, user: str, application_name: str, database: str) -> None:
        """The StartupMessage is read: typed messages follow, and every record of this
        connection says who claimed it (as the records keep them: each is the client's choice,
        up to 10 KB long)."""
        self._framer.startup = False
        self._claimed_user = capped(user)
        self._application_name = capped(application_name)
        self._database = capped(database)

    def _logged_in(self, identity: Identity, context: SessionContext) -> None:
        """Authenticated: no longer counted against the host's cap; decided and recorded as
        `identity` from now on."""
        self._leave_unauthenticated()
        self.identity = identity
        self._context = context

    def _attach_upstream(self, upstream: UpstreamConnection) -> None:
        transport = self.transport
        assert transport is not None
        self._upstream = upstream
        self._scanner = BackendScanner()
        protocol = upstream.protocol
        protocol.on_data = self._on_upstream_data
        protocol.on_lost = self._on_upstream_lost
        protocol.on_pause = self._pause_client
        protocol.on_resume = self._resume_client
        self._server_encoding = upstream.server_params.get("server_encoding", "UTF8")
        server_encoding = upstream.server_params.get("client_encoding")
        if server_encoding is not None:
            self._set_encoding(server_encoding)
        self._note_login_privileges(upstream.server_params)
        key = self.services.cancels.issue(upstream.backend_pid, self)
        self._cancel_key = (upstream.backend_pid, key)
        transport.write(
            b"".join(
                [
                    messages.authentication_ok(),
                    *upstream.startup_frames,
                    messages.backend_key_data(upstream.backend_pid, key),
                    upstream.ready_frame,
                ]
            )
        )
        self._phase = _PHASE_READY
        self._framer.max_message_bytes = self.services.settings.max_message_bytes
        leftover = protocol.take_buffered()
        if leftover:
            self._on_upstream_data(leftover)
        if self._startup_frames:
            self._inbox.extend(self._startup_frames)
            self._startup_frames.clear()
            self._drain_inbox()

    def _note_login_privileges(self, params: dict[str, str]) -> None:
        """Remember the service role's privileges at login (reported by the server)."""
        self._superuser_at_login = params.get("is_superuser") == "on"
        self._conforming_strings = params.get("standard_conforming_strings", "on") == "on"
        services = self.services
        # PostgreSQL reports it at login; a server that does not is logged in as the service role.
        self._authorization_at_login = params.get(
            "session_authorization", services.settings.upstream.user
        )
        if self._superuser_at_login and not services.warned_superuser:
            services.warned_superuser = True
            log.warning(
                "listener %s: the upstream service role %s is a superuser; code in DO blocks "
                "and functions can switch roles unseen by the guards, and nothing is left to "
                "escalate to, so such switches cannot be detected (see docs/operations.md)",
                services.settings.name,
                services.settings.upstream.user,
            )

    def _set_encoding(self, name: str) -> None:
        codec = python_codec(name)
        if name.upper() == "SQL_ASCII":  # as PostgreSQL reports it
            # Client bytes PostgreSQL neither converts nor reads as Latin-1: it checks them as
            # the database encoding and reads them so (UTF-8 bytes sent under SQL_ASCII are
            # the same text, and the same statement or portal name, as under UTF8). Only a
            # SQL_ASCII database reads them as raw bytes.
            codec = python_codec(self._server_encoding)
        # An encoding dbward cannot decode faithfully makes every statement unparseable, so
        # they are denied rather than misread.
        self._codec = codec if codec is not None else ""

    # ------------------------------------------------------------------ client -> upstream

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while inbox and not self._blocked and self._phase == _PHASE_READY:
            if self._upstream_ending:
                inbox.clear()
                return
            frames = list(inbox)
            inbox.clear()
            self._process_frames(frames)

    def _process_frames(self, frames: list[Frame]) -> None:
        """Handle client frames in order; forward what may go in one write."""
        upstream = self._upstream
        assert upstream is not None
        if self._upstream_ending:
            return  # the connection to PostgreSQL is closing: nothing more is read or run
        out: list[bytes | bytearray] = []
        in_place = False  # `out` holds a large message as the framer gathered it
        i = 0  # the index of the frame after this one (the list is not changed meanwhile)
        turn_ends = _MESSAGES_PER_TURN  # `i` at which this turn of the loop is used up
        for msg_type, payload, raw in frames:
            i += 1
            if i > turn_ends and msg_type not in _COPY_MESSAGES:
                self._yield_turn(frames[i - 1 :], out)
                return
            if self._discard_until_sync:
                if msg_type == _S:
                    self._discard_until_sync = False
                    self._ops.append(_SYNC_OP)
                    self._syncs += 1
                    self._portal_event()
                    out.append(raw)
                elif msg_type == _X:
                    self._terminate(out)
                    return
                continue
            if self._copy_ops and not self._copying and msg_type != _H and self._copy_pending():
                # A COPY FROM STDIN is in flight and PostgreSQL has neither started nor refused
                # it: what this message means (copy data, a Sync PostgreSQL ignores or answers,
                # SQL) depends on which. It waits, in order, until PostgreSQL says; that needs
                # nothing more from the client.
                self._park(frames[i - 1 :], out)
                self._awaiting = _AWAIT_COPY
                return
            if self._copy_verdict_pending and msg_type not in _COPY_OR_FLUSH:
                # Syncs were forwarded into the copy just ended: whether PostgreSQL answers them
                # (and skips this message, after an Execute's copy) depends on when the copy
                # failed, if it did. A Flush (no reply) makes PostgreSQL send the answer of an
                # Execute without the Sync; a failure starts the probe (see _on_error).
                out.append(messages.flush())
                self._park(frames[i - 1 :], out)
                self._awaiting = _AWAIT_COPY
                return
            if msg_type in _COPY_MESSAGES:
                # COPY data flows through (the COPY statement was decided); outside a copy
                # PostgreSQL ignores it, as after a COPY that failed.
                out.append(raw)
                if type(raw) is not bytes:
                    in_place = True
                if not self._copying:
                    continue
                if msg_type != _COPY_DATA:
                    self._copying = False  # the server's copy mode ends here
                    self._copy_verdict_pending = self._copy_syncs > 0
                continue
            if self._copying and msg_type != _H:
                # Only copy messages, a Flush (which owes no reply) and a Sync belong in a copy.
                if msg_type == _S:
                    # PostgreSQL reads copy messages one at a time as it needs data: a Sync it
                    # reads while copying it ignores (libpq sends one with a COPY's Execute,
                    # before any data, and its own after CopyDone), one it reads after the copy
                    # failed (a statement trigger, or a bad row or CopyFail sent before it) it
                    # answers. Forwarded and counted wherever it is among the data, owing no
                    # reply until the copy's answer says (see _on_error and _CopyProbe).
                    self._copy_syncs += 1
                    out.append(raw)
                    continue
                # Anything else while PostgreSQL copies ends its session (a protocol violation
                # it answers with ERROR and FATAL); once the copy failed it would run instead,
                # and nothing here can tell which: such a client is told plainly.
                if out:
                    _write_all(upstream.transport, out)
                self._protocol_error(
                    ProtocolError(
                        f"unexpected message type {chr(msg_type)!r} during COPY FROM STDIN"
                    )
                )
                return
            try:
                if type(payload) is memoryview:
                    # A large message kept where the framer gathered it: copy only what is read.
                    in_place = True
                    payload = self._large_body(msg_type, payload, raw)  # noqa: PLW2901
                if (
                    len(payload) >= OFFLOAD_SCAN_MIN_BYTES
                    and msg_type in (_Q, _P)
                    and should_offload(payload)
                ):
                    text = self._offload_text(msg_type, payload)
                    if text is not None:
                        self._hold_for_classification(text, frames, i - 1, out)
                        return
                barrier = self._handle_message(msg_type, payload, raw, out)
            except ProtocolError as exc:
                if out:
                    _write_all(upstream.transport, out)
                self._protocol_error(exc)
                return
            if msg_type == _X:
                self._terminate(out)
                return
            if barrier is None:
                continue
            if isinstance(barrier, _Await):
                self._park(frames[i - 1 :], out)  # this message too: it is handled again
                self._awaiting = barrier
                return
            future, held = barrier
            self._barrier_op = self._ops[-1] if self._ops else None
            self._park(frames[i:], out)
            future.add_done_callback(functools.partial(self._barrier_done, held=held))
            return
        if out:
            if len(out) == 1:
                upstream.transport.write(out[0])
            elif in_place:
                upstream.transport.writelines(out)  # joining them would copy the large one
            else:
                upstream.transport.write(b"".join(out))  # small pieces: one write is cheaper

    def _yield_turn(self, pending: list[Frame], out: list[bytes | bytearray]) -> None:
        """Let the event loop serve the other sessions before handling `pending`.

        One read brings up to 256 KB: 6,500 pipelined Parse/Bind/Execute triples took 0.4 s to
        handle, during which no other session was served (a client pipelining without end
        made every other client's SELECT 1 take up to 3.5 s). The rest waits, parked in order
        with reading paused, for the loop's next turn.
        """
        self._park(pending, out)
        self._yielding = True
        asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """The loop has served the others: handle what was left of the last read."""
        if not self._yielding:
            return
        self._yielding = False
        if self._phase != _PHASE_READY or self._closing:
            return
        self._blocked = False
        self._unpark()
        self._check_replies_owed()
        if self._shutdown_requested and not self._ops and not self._blocked:
            self._send_shutdown()

    def _large_body(self, msg_type: int, body: memoryview, raw: bytes | bytearray) -> bytes:
        """What the relay reads of a large message kept in place, as bytes.

        A Query too long to parse is refused by its size (read from `raw`): nothing of it is
        copied. Of a Bind only the portal and statement names are read (PostgreSQL checks the
        parameters), so only they are copied. Anything else is copied whole.
        """
        if msg_type == _Q and len(body) > self._max_statement_bytes:
            return b""
        if msg_type == _B:
            first = raw.find(b"\x00", 5)
            second = raw.find(b"\x00", first + 1) if first >= 0 else -1
            if second >= 0:
                return body[: second - 4].tobytes()
        return body.tobytes()

    def _park(self, pending: list[Frame], out: list[bytes | bytearray]) -> None:
        """Stop handling client frames: forward what is decided, keep `pending` in order."""
        if out:
            assert self._upstream is not None
            _write_all(self._upstream.transport, out)
        self._blocked = True
        for rest in reversed(pending):
            self._inbox.appendleft(rest)
        if self.transport is not None:
            self.transport.pause_reading()

    def _unpark(self) -> None:
        """Handle the parked frames (the caller has cleared `_blocked`) and read again."""
        if (
            self.transport is not None
            and not self._client_paused_for_upstream
            and not self._client_paused_for_replies
        ):
            self.transport.resume_reading()
            self._reading_resumed()
        self._drain_inbox()

    def _offload_text(self, msg_type: int, payload: bytes) -> str | None:
        """The SQL of a large Query/Parse to classify off the loop (None: classify inline)."""
        offload = self.services.offload
        if offload is None or len(payload) > self._max_statement_bytes:
            return None  # too large: refused unread, at once
        text = self._statement_text(msg_type, payload)
        if text is None:
            return None  # undecodable: denied at once, nothing to parse
        pre = self._preclassified
        if pre is not None and pre[0] == text:
            return None  # classified already; handle the frame now
        return text

    def _hold_for_classification(
        self, text: str, frames: list[Frame], index: int, out: list[bytes | bytearray]
    ) -> None:
        """Park this frame and the ones after it until the pool has classified `text`."""
        offload = self.services.offload
        assert offload is not None
        self._park(frames[index:], out)
        task = asyncio.get_running_loop().create_task(offload.classify(text))
        task.add_done_callback(functools.partial(self._classified, text=text))
        self._offload_task = task  # the loop only holds tasks weakly

    def _classified(self, task: asyncio.Task[tuple[Statement, ...]], *, text: str) -> None:
        """The pool answered: handle the parked frames with the result."""
        self._offload_task = None
        self._blocked = False
        if task.cancelled() or self._phase != _PHASE_READY or self._upstream is None:
            return
        self._preclassified = (text, task.result())
        self._unpark()

    def _classify(self, text: str) -> tuple[Statement, ...]:
        pre = self._preclassified
        if pre is not None:
            self._preclassified = None
            if pre[0] == text:
                return pre[1]
        return self.services.classifier.classify(text)

    def _statement_text(self, msg_type: int, payload: bytes) -> str | None:
        """The SQL text of a Query or Parse as the server will read it (None: undecodable)."""
        if msg_type == _Q:
            return self._decode_sql(payload)
        return self._decode_text(messages.parse_parts(payload)[1])

    def _barrier_done(
        self, future: asyncio.Future[int], *, held: tuple[bytes | bytearray, bytes]
    ) -> None:
        """The intent record is durable (or failed): forward the held message or refuse it."""
        self._blocked = False
        self._barrier_op = None
        if self._phase != _PHASE_READY or self._upstream is None:
            return
        forward, refusal = held
        if future.cancelled() or future.exception() is not None:
            # Fail closed: the statement goes no further. The refusal poison was prepared with
            # the statement, so the op queue already expects its error.
            self._upstream.transport.write(refusal)
            self._replace_last_ops_with_refusal()
            if self._ops and self._ops[-1].code == _OP_EXECUTE:
                self._discard_until_sync = True
        else:
            self._upstream.transport.write(forward)
        self._unpark()

    def _replace_last_ops_with_refusal(self) -> None:
        op = self._ops[-1] if self._ops else None
        # Only the Query/Execute op the durable barrier was raised for (never a shared op).
        if op is not None and op.code in (_OP_QUERY, _OP_EXECUTE):
            op.copies = 0  # refused: no COPY of it will start
            op.data_type = -1  # nor any row: the poison sent instead only fails
            op.replacement = messages.error_response(
                "ERROR", AuditUnavailable.sqlstate, _audit_unavailable_decision().reason
            )
            if op.tracked:
                for tracked in op.tracked:
                    self._record_outcome(tracked, "not_executed", AuditUnavailable.sqlstate)
                op.tracked = []
                op.limit = 0  # the poison is sent instead: it only fails

    def _handle_message(
        self, msg_type: int, payload: bytes, raw: bytes | bytearray, out: list[bytes | bytearray]
    ) -> tuple[asyncio.Future[int], tuple[bytes | bytearray, bytes]] | _Await | None:
        """Decide one client message; append what to forward to `out`.

        `payload` is the message's body, or for a large message kept in place what is read of
        it (`_large_body`). Returns a barrier (future, (bytes to forward, bytes if refused))
        when forwarding must wait for a durable audit write, or an _Await when the message must
        wait, unhandled, for answers it depends on (see `_Definition`).
        """
        if msg_type == _Q:
            size = len(raw) - 5  # of the body (`payload` of a large one is not copied)
            if size > self._max_statement_bytes:
                too_large = oversized_statement(size - 1, self._max_statement_bytes)
                return self._handle_query((too_large,), raw, out)
            # Nothing in flight and conforming strings (almost always): the text reads as is.
            unsettled = self._unsettled_text(payload) if self._may_be_unsettled() else None
            if isinstance(unsettled, _Await):
                return unsettled
            if unsettled is not None:
                statements: tuple[Statement, ...] = (unsettled,)
            else:
                text = self._decode_sql(payload)
                statements = self._classify(text) if text is not None else (self._undecodable(),)
                waits = (
                    self._unsettled_names(statements)
                    if self._pending_statements or self._pending_portals
                    else None
                )
                if waits is None and self._earlier:
                    waits = self._cursor_waits(statements)
                if waits is not None:
                    if text is not None:
                        self._preclassified = (text, statements)  # handled again when ready
                    return waits
            return self._handle_query(statements, raw, out)
        if msg_type == _P:
            # Split with a byte-preserving codec, then decode the SQL as the server will: bad
            # bytes make the statement unparseable (denied), not the session unusable.
            name, query = messages.parse_parts(payload)
            unsettled = self._unsettled_text(query) if self._may_be_unsettled() else None
            if isinstance(unsettled, _Await):
                return unsettled
            if unsettled is not None:
                statements = (unsettled,)
            elif len(query) > self._max_statement_bytes:
                statements = (oversized_statement(len(query), self._max_statement_bytes),)
            else:
                text = self._decode_text(query)
                statements = self._classify(text) if text is not None else (self._undecodable(),)
                waits = self._cursor_waits(statements) if self._earlier else None
                if waits is not None:
                    if text is not None:
                        self._preclassified = (text, statements)  # handled again when ready
                    return waits
            if name and (len(name) > _NAME_MAX or not name.isascii()):  # "": the unnamed one
                flags = _name_flags(name)
                statements = (  # refused, as named (an empty query string too)
                    _with_flags(statements, flags)
                    if statements
                    else (_misnamed("prepared statement", name, flags),)
                )
            # Decided here as well as at every Execute: a statement that would be denied never
            # reaches PostgreSQL, so a Parse/Describe of it cannot tell the client whether its
            # tables exist or what their columns are.
            decided, denial = self._decide_all(statements, _EXTENDED)
            if denial is not None:
                self._refuse_parse(name, decided, denial, out)
                return None
            op = _Op(_OP_PARSE)
            op.definition = self._define(name, statements, portal=False, drops_on_failure=not name)
            op.decided = decided
            self._ops.append(op)
            out.append(raw)
            return None
        if msg_type == _B:
            if payload.startswith(_BIND_UNNAMED):  # both unnamed: nothing to split or check
                portal_name = statement_name = ""
            else:
                portal_name, statement_name = messages.bind_names(payload, _NAME_CODEC)
                if (portal_name or statement_name) and (
                    len(portal_name) > _NAME_MAX
                    or len(statement_name) > _NAME_MAX
                    or not portal_name.isascii()
                    or not statement_name.isascii()
                ):
                    self._refuse_bind_names(portal_name, statement_name, out)
                    return None
            pending = self._pending_statements.get(statement_name)
            if pending is not None and pending.sync_mark != self._syncs:
                # Prepared in an earlier sync group that PostgreSQL has not answered: if that
                # Parse fails, this Bind would use whatever the name meant before it.
                return _Await(definitions=(pending,))
            found = self._prepared.get(statement_name)
            if found is None:
                # Mostly PostgreSQL holds none either (26000); else it cannot be inspected.
                self._probe_unseen(statement_name, out, portal=False)
                return None
            self._ran_since_ready = True  # planning may run (immutable) functions
            self._executed_portals.discard(portal_name)  # a new portal of that name
            op = _Op(_OP_BIND)
            op.definition = self._define(
                portal_name,
                found,
                portal=True,
                drops_on_failure=not portal_name,
                plain=not _needs_look(found),
            )
            op.definition.source = pending  # in this sync group (an earlier one was awaited)
            self._ops.append(op)
            out.append(raw)
            return None
        if msg_type == _E:
            if payload == _EXECUTE_UNNAMED:
                portal_name, max_rows = "", 0
            else:
                portal_name, max_rows = messages.execute_parts(payload)
                if portal_name and (len(portal_name) > _NAME_MAX or not portal_name.isascii()):
                    self._refuse_name(
                        (_misnamed("portal", portal_name, _name_flags(portal_name)),), out
                    )
                    return None
            bound = self._pending_portals.get(portal_name)
            if bound is not None and bound.sync_mark != self._syncs:
                return _Await(definitions=(bound,))  # bound in an earlier, unanswered group
            portal = self._portals.get(portal_name)
            if portal is None:
                if portal_name in self._earlier:
                    # Defined before something PostgreSQL may have dropped it with, which it
                    # has not answered yet.
                    return self._portal_in_doubt(portal_name, out)
                self._probe_unseen(portal_name, out, portal=True)
                return None
            running = portal.run  # the one read a plain run of a known portal costs
            looked = running is None
            if running is None:
                # Transaction control, DO/CALL, a FETCH/MOVE: it may end portals defined before
                # it, or run a cursor that may be gone.
                running = portal.statements
                waits = self._cursor_waits(running) if self._earlier else None
                if waits is not None:
                    return waits
            waits = (
                self._unsettled_names(running)
                if self._pending_statements or self._pending_portals
                else None
            )
            if waits is not None:
                return waits  # a SQL EXECUTE of a name a PREPARE in flight redefines
            resumed = portal_name in self._executed_portals
            self._executed_portals.add(portal_name)
            sources: tuple[_Definition, ...] = ()
            if bound is not None:  # bound in this sync group (an earlier one was awaited)
                sources = (bound,) if bound.source is None else (bound, bound.source)
            barrier = self._handle_execute(
                running, max_rows, raw, out, resumed=resumed, sources=sources
            )
            if looked and _ends_portals(running):
                self._portal_event()
            return barrier
        if msg_type == _S:
            self._ops.append(_SYNC_OP)
            self._syncs += 1
            self._portal_event()  # the end of an implicit transaction
            out.append(raw)
            return None
        if msg_type == _D:
            if payload != _DESCRIBE_UNNAMED_PORTAL:
                messages.check_describe(payload)
            # Kind, name, NUL: an unnamed one (two bytes) has nothing to check.
            if len(payload) > 2 and (len(payload) > _NAME_MAX + 2 or not payload.isascii()):
                name = payload[1:-1].decode(_NAME_CODEC)
                what = "portal" if payload[0] == 0x50 else "prepared statement"
                # Describe runs nothing: refused, and in no audit record (as it is in none).
                self._refuse_name((_misnamed(what, name, _name_flags(name)),), out, record=False)
                return None
            self._ops.append(_DESCRIBE_OP)
            out.append(raw)
            return None
        if msg_type == _C:
            close = messages.parse_close(payload, _NAME_CODEC)
            if len(close.name) > _NAME_MAX or not close.name.isascii():
                what = "prepared statement" if close.kind == "S" else "portal"
                flags = _name_flags(close.name)
                self._refuse_name((_misnamed(what, close.name, flags),), out, record=False)
                return None
            if close.kind != "S":
                self._executed_portals.discard(close.name)
            op = _Op(_OP_CLOSE)
            # Undone if PostgreSQL skips it (an error earlier in its sync group).
            op.definition = self._define(
                close.name, None, portal=close.kind != "S", drops_on_failure=False
            )
            self._ops.append(op)
            out.append(raw)
            return None
        if msg_type == _H:
            out.append(raw)
            return None
        if msg_type == _X:
            return None
        if msg_type == _F:
            oid = messages.parse_function_call(payload)
            return self._handle_query(
                (function_call_statement(oid),), raw, out, ProtocolPath.FUNCTION_CALL
            )
        raise ProtocolError(f"unexpected message type {chr(msg_type)!r} after startup")

    def _define(
        self,
        name: str,
        meaning: tuple[Statement, ...] | None,
        *,
        portal: bool,
        drops_on_failure: bool,
        holdable: bool = False,
        plain: bool = True,
    ) -> _Definition:
        """Record what a forwarded message makes `name` mean (None: removes it), undoably.

        A portal's meaning is a new `_Portal` (`holdable`: WITH HOLD; `plain`: an Execute of it
        runs its statements, no more: see _Portal.run)."""
        if portal:
            portals = self._portals
            previous: tuple[Statement, ...] | _Portal | None = portals.get(name)
            if previous is None and self._earlier:
                previous = self._earlier.pop(name, None)
            made = None if meaning is None else _Portal(name, meaning, holdable, plain)
            if made is None:
                portals.pop(name, None)
            else:
                portals[name] = made
            # Positional: a class called with keywords builds a dict of them per call.
            definition = _Definition(name, made, previous, True, self._syncs, drops_on_failure)
            pending = self._pending_portals
        else:
            table = self._prepared
            definition = _Definition(
                name, meaning, table.get(name), False, self._syncs, drops_on_failure
            )
            if meaning is None:
                table.pop(name, None)
            else:
                table[name] = meaning
            pending = self._pending_statements
        earlier = pending.get(name)
        if earlier is not None:
            earlier.successor = definition
        pending[name] = definition
        return definition

    def _unsettled_names(self, statements: tuple[Statement, ...]) -> _Await | None:
        """What SQL EXECUTE/PREPARE/DEALLOCATE/DISCARD here must wait for, if anything.

        A name (re)defined in an earlier sync group that PostgreSQL has not answered yet may end
        up meaning either definition; DEALLOCATE/DISCARD wait for every such name.
        """
        pending = self._pending_statements
        waits: list[_Definition] | None = None  # built only when something waits (rarely)
        for statement in statements:
            name = statement.prepared_name
            if name is not None:
                entry = pending.get(name)
                if entry is not None and entry.sync_mark != self._syncs:
                    waits = [entry] if waits is None else [*waits, entry]
            elif statement.command.startswith(("DEALLOCATE", "DISCARD")):
                found = [d for d in pending.values() if d.sync_mark != self._syncs]
                waits = found if waits is None else [*waits, *found]
            if statement.cursor_name is not None:
                cursor = self._pending_portals.get(statement.cursor_name)
                if cursor is not None and cursor.sync_mark != self._syncs:
                    waits = [cursor] if waits is None else [*waits, cursor]
        return _Await(definitions=tuple(waits)) if waits else None

    def _may_be_unsettled(self) -> bool:
        """Cheap test before `_unsettled_text`: false when the settings are surely reported."""
        return bool(self._ops) or self._ran_since_ready or not self._conforming_strings

    def _unsettled_text(self, sql: bytes) -> Statement | _Await | None:
        """Whether SQL bytes can be read now; None: yes.

        Their meaning depends on client_encoding when they are not ASCII, and on
        standard_conforming_strings when they hold a backslash. Statements still in flight may
        change either (SET, set_config, any function), and PostgreSQL reports the change only
        at its next ReadyForQuery — not when an Execute is answered after a Flush: such text waits
        until everything is answered and reported, or is refused when no Sync is in flight to
        bring that report (a pipeline that has not synced yet).
        """
        # find, not `in`: bytes.__contains__ first tries its argument as an integer, and
        # formats (then drops) a TypeError for a bytes one: ~40 ns more per Query or Parse.
        if (not self._ops and not self._ran_since_ready) or (sql.isascii() and sql.find(b"\\") < 0):
            if not self._conforming_strings and not _TURNS_ON_CONFORMING.match(sql):
                # Every statement, not only those with a backslash: a function body or a SQL
                # text run later is read by PostgreSQL with the setting in force then.
                return _uninspected(
                    "UNKNOWN",
                    "parse_error",
                    "standard_conforming_strings is off: nothing can be checked until it is on",
                )
            return None
        if self._ops and self._ops[-1].code in (_OP_QUERY, _OP_SYNC):
            return _AWAIT_QUIET
        return _uninspected(
            "UNKNOWN",
            "parse_error",
            "non-ASCII or backslash SQL pipelined before a Sync: send Sync first",
        )

    def _decode_sql(self, payload: bytes) -> str | None:
        if not payload or payload[-1] != 0:
            raise ProtocolError("query string is not NUL-terminated")
        return self._decode_text(payload[:-1])

    def _decode_text(self, raw: bytes) -> str | None:
        """SQL bytes as the server will read them, or None if dbward cannot be sure how."""
        codec = self._codec
        if not codec:
            # An encoding dbward cannot decode: pure ASCII still means the same in every
            # client encoding PostgreSQL supports (multibyte lead bytes are >= 0x80), so e.g.
            # `SET client_encoding = 'UTF8'` can still get the session back.
            return raw.decode("ascii") if raw.isascii() else None
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            return None

    def _undecodable(self) -> Statement:
        return _uninspected(
            "UNKNOWN", "parse_error", "the statement is not valid in the session's client_encoding"
        )

    def _decide_all(
        self,
        statements: tuple[Statement, ...],
        path: ProtocolPath,
        changes: _PreparedChanges | None = None,
    ) -> tuple[list[tuple[Statement, Decision, ProtocolPath]], Decision | None]:
        """Ask the one decision point about each statement; the first denial denies the batch.

        SQL-level EXECUTE is resolved to what the session prepared under that name, so it is
        decided (and made durable) as the statement it runs; `changes` collects what this
        batch prepares or deallocates, applied only if the batch is forwarded.
        """
        context = self._context
        assert context is not None
        now = self.services.clock()
        decided = []
        denial: Decision | None = None
        if not self.services.audit.healthy:
            denial = _audit_unavailable_decision()
        # Cursors this batch declares or closes, for a FETCH later in the same string (a str:
        # declared before a statement of the string that may have dropped it, that one).
        cursors: dict[str, tuple[Statement, ...] | str | None] | None = None
        ended: str | None = None  # a statement of the string that may drop cursors before it
        code: str | None = None  # a DO or CALL of the string: it may replace any cursor
        held: set[str] | None = None  # cursors of the string a COMMIT in it kept (WITH HOLD)
        for classified in statements:
            if (
                not classified.flags
                and classified.command in _PLAIN_COMMANDS
                and classified.prepared_name is None
                and classified.cursor_name is None
            ):
                # Most statements: decided as they are, on `path` (what follows, inline).
                decision = decide(_new_tuple(PolicyRequest, (context, classified, path, now)))
                if denial is None and not decision.allowed:
                    denial = decision
                decided.append((classified, decision, path))
                continue
            statement = classified
            if classified.prepared_name is not None or classified.command.startswith(
                ("DEALLOCATE", "DISCARD")
            ):
                statement = self._name_checked(classified, classified.prepared_name)
                statement = self._resolve_prepared(statement, changes)
            elif classified.cursor_name is not None and "fetches_cursor" in classified.flags:
                statement = self._name_checked(classified, classified.cursor_name)
                statement = self._resolve_cursor(statement, cursors, ended, code)
            elif classified.cursor_name is not None or "closes_all_cursors" in classified.flags:
                statement = self._name_checked(classified, classified.cursor_name)
                if cursors is None:
                    cursors = {}
                if classified.cursor_name is None:
                    cursors = {name: None for name in (*self._portals, *self._earlier, *cursors)}
                elif classified.command == "DECLARE CURSOR":
                    cursors[classified.cursor_name] = (classified,)
                    if held:
                        held.discard(classified.cursor_name)
                else:
                    cursors[classified.cursor_name] = None
            if classified.command in _ENDS_PORTALS_IN_STRING:
                ended = classified.command
                if cursors:
                    held = _end_cursors_in_string(cursors, ended, held)
            elif classified.command in _RUNS_CODE:
                code = classified.command
                if cursors:  # every cursor declared before it, WITH HOLD or kept, is doubtful
                    held = _end_cursors_in_string(cursors, code, None)
            stmt_path = path
            if "copy_from_stdin" in statement.flags or "copy_to_stdout" in statement.flags:
                stmt_path = _COPY_PATH
            # tuple.__new__: what the NamedTuple's own __new__ does, less its Python frame.
            request = _new_tuple(PolicyRequest, (context, statement, stmt_path, now))
            decision = decide(request)
            if denial is None and not decision.allowed:
                denial = decision
            decided.append((statement, decision, stmt_path))
        return decided, denial

    def _name_checked(self, statement: Statement, name: str | None) -> Statement:
        """`statement`, flagged for guard.name_limit if it names a prepared statement or cursor
        in SQL by a name that is not ASCII and PostgreSQL may not read as dbward's parser did:
        the parser reads it from UTF-8 (cut at 63 bytes of UTF-8, ASCII letters folded), the
        server in its own encoding (cut there; a single-byte one folds other letters too), once
        converted from the client's (by tables dbward does not share)."""
        utf8 = self._server_encoding == "UTF8" and self._codec == "utf-8"
        if name is None or name.isascii() or utf8:
            return statement
        return replace(statement, flags=statement.flags | _NAME_NOT_ASCII)

    def _record_intents(
        self,
        decided: list[tuple[Statement, Decision, ProtocolPath]],
        denial: Decision | None,
    ) -> tuple[list[_Tracked], asyncio.Future[int] | None]:
        """Write one intent record per statement; returns the trackers and a durability wait."""
        audit = self.services.audit
        strict = self.services.audit_settings.durability == "strict"
        tracked: list[_Tracked] = []
        durable: asyncio.Future[int] | None = None
        started = time.perf_counter()
        try:
            for statement, decision, path in decided:
                self._next_sid += 1
                sid = self._next_sid
                self._statement_count += 1
                # A refused batch is refused whole: an allowed part records the batch's denial.
                effective = decision if denial is None or not decision.allowed else denial
                record = self._statement_record(sid, statement, effective, path)
                if denial is None and strict and statement.kind in _DURABLE_KINDS:
                    self._release_held()
                    durable = audit.append_durable(record)
                    tracked.append(_Tracked(sid, statement, path, started, None))
                else:
                    item = _Tracked(sid, statement, path, started, audit.hold(record))
                    self._held_intents[sid] = item
                    tracked.append(item)
        except AuditUnavailable:
            # The batch is refused: its first statements must not be logged as allowed.
            for item in tracked:
                if item.held is not None:
                    item.held.take_back()
                    self._held_intents.pop(item.sid, None)
            raise
        return tracked, durable

    def _release_held(self) -> None:
        """Send this session's held intent records on now, so the log keeps statement order.

        Called before a record that must not overtake them (a durable intent, a session
        event). Only statements still holding one are visited (not every reply in flight).
        """
        if not self._held_intents:
            return
        release = self.services.audit.release
        for item in self._held_intents.values():
            if item.held is not None:
                release(item.held)
        self._held_intents.clear()

    def _admit(
        self, statements: tuple[Statement, ...], path: ProtocolPath
    ) -> tuple[list[_Tracked], asyncio.Future[int] | None, Decision | None]:
        """Decide a batch and write its intent records; a denied batch gets denied outcomes.

        Returns the trackers, a durability wait (strict mode) and the denial, if any.
        """
        changes = _PreparedChanges()
        decided, denial = self._decide_all(statements, path, changes)
        if denial is not None:
            self._record_denied(decided, denial)
            return [], None, denial
        try:
            tracked, durable = self._record_intents(decided, None)
        except AuditUnavailable:
            self._count_statements(decided, self._audit_refused_counts)
            return [], None, _audit_unavailable_decision()
        if changes.cleared or changes.added:
            self._apply_prepared_changes(changes, tracked)
        # One tracker per statement decided: count them here, unless the batch waits for its
        # durable intent, whose failure refuses it (counted when the write is settled).
        allowed = self._allowed_counts if durable is None else None
        for item in tracked:
            statement = item.statement
            if allowed is not None:
                allowed[statement.kind] += 1
            if statement.cursor_name is not None or statement.flags:
                self._note_session_effects(item)
        if durable is not None:
            kinds = [item.statement.kind for item in tracked]
            durable.add_done_callback(functools.partial(self._count_durable, kinds))
        return tracked, durable, None

    def _count_durable(self, kinds: list[StatementKind], future: asyncio.Future[int]) -> None:
        """A batch's durable intent is settled: the batch was forwarded, or refused (as
        _barrier_done decides) because the audit log could not make it durable."""
        refused = future.cancelled() or future.exception() is not None
        counts = self._audit_refused_counts if refused else self._allowed_counts
        for kind in kinds:
            counts[kind] += 1

    def _note_session_effects(self, item: _Tracked) -> None:
        """A forwarded statement that starts COPY FROM STDIN or declares or closes cursors."""
        statement = item.statement
        if "copy_from_stdin" in statement.flags:
            self._copies_admitted += 1  # counted on the op the caller queues for the batch
        if "closes_all_cursors" in statement.flags:
            item.forgets = self._forget_portals()
        elif statement.cursor_name is not None and "fetches_cursor" not in statement.flags:
            # DECLARE defines the name, CLOSE removes it; FETCH/MOVE leave it as it is.
            # A cursor is a portal: Execute by that name runs the DECLARE's query (and, after
            # CLOSE, nothing dbward has seen). Undone if the statement fails.
            item.definition = self._define(
                statement.cursor_name,
                (statement,) if statement.command == "DECLARE CURSOR" else None,
                portal=True,
                drops_on_failure=False,
                holdable="holdable_cursor" in statement.flags,
            )

    @staticmethod
    def _count_statements(
        decided: list[tuple[Statement, Decision, ProtocolPath]], counts: dict[StatementKind, int]
    ) -> None:
        """Count a batch for the metrics, by kind, in `counts` (what became of it)."""
        for statement, _, _ in decided:
            counts[statement.kind] += 1

    def _record_denied(
        self, decided: list[tuple[Statement, Decision, ProtocolPath]], denial: Decision
    ) -> None:
        """Audit a refused batch: an intent carrying the denial, then a `denied` outcome."""
        if denial.rule == _AUDIT_UNAVAILABLE_RULE:
            self._count_statements(decided, self._audit_refused_counts)
        else:
            self._count_statements(decided, self._denied_counts)
        try:
            tracked, _ = self._record_intents(decided, denial)
        except AuditUnavailable:
            return  # refused all the same; the log says why it lost the record
        for item in tracked:
            self._record_outcome(item, "denied", denial.sqlstate)

    def _refuse_parse(
        self,
        name: str,
        decided: list[tuple[Statement, Decision, ProtocolPath]],
        denial: Decision,
        out: list[bytes | bytearray],
    ) -> None:
        """Send PostgreSQL an unparseable Parse in place of a denied one; skip to Sync."""
        self._record_denied(decided, denial)
        out.append(_POISON_PARSE if name else _POISON_PARSE_UNNAMED)
        poison = _Op(_OP_POISON, None, _denial_frame(denial))
        if not name:
            # PostgreSQL drops the unnamed statement at every Parse of that name, even one that
            # fails: an unnamed poison does the same upstream (unless it is skipped), and
            # dbward forgets it too.
            poison.definition = self._define("", None, portal=False, drops_on_failure=True)
        self._ops.append(poison)
        self._discard_until_sync = True

    def _refuse_name(
        self,
        statements: tuple[Statement, ...],
        out: list[bytes | bytearray],
        *,
        record: bool = True,
    ) -> None:
        """Refuse a Bind, Execute, Describe or Close naming a statement or portal by a name
        PostgreSQL might read as another (guard.name_limit, see _NAME_MAX): the poison Parse in
        its place, then skip to Sync, as for a denied Execute. Nothing is (re)defined."""
        decided, denial = self._decide_all(statements, _EXTENDED)
        assert denial is not None  # guard.name_limit refuses every statement flagged so
        if record:
            self._record_denied(decided, denial)
        else:  # a Describe or Close: in no record, as it is in none, but a refusal all the same
            self._count_statements(decided, self._denied_counts)
        self._ops.append(_Op(_OP_POISON, None, _denial_frame(denial)))
        out.append(_POISON_PARSE)
        self._discard_until_sync = True

    def _refuse_bind_names(
        self, portal_name: str, statement_name: str, out: list[bytes | bytearray]
    ) -> None:
        """A Bind with a refused name: recorded as the statement it binds when that one's
        name is fine and dbward holds it, else as what the name stands for."""
        flags = _name_flags(statement_name)
        statements: tuple[Statement, ...]
        if flags:
            statements = (_misnamed("prepared statement", statement_name, flags),)
        else:
            flags = _name_flags(portal_name)
            found = self._prepared.get(statement_name)
            statements = (
                _with_flags(found, flags) if found else (_misnamed("portal", portal_name, flags),)
            )
        self._refuse_name(statements, out)

    def _handle_query(
        self,
        statements: tuple[Statement, ...],
        raw: bytes | bytearray,
        out: list[bytes | bytearray],
        path: ProtocolPath = ProtocolPath.SIMPLE,
    ) -> tuple[asyncio.Future[int], tuple[bytes | bytearray, bytes]] | None:
        """A message answered up to ReadyForQuery: Query, or FunctionCall (path says which)."""
        self._ran_since_ready = True
        try:
            return self._forward_query(statements, raw, out, path)
        finally:
            self._syncs += 1  # like a Sync, it ends a sync group (after its own PREPAREs)
            self._portal_event()  # and an implicit transaction (after its own DECLAREs)

    def _forward_query(
        self,
        statements: tuple[Statement, ...],
        raw: bytes | bytearray,
        out: list[bytes | bytearray],
        path: ProtocolPath,
    ) -> tuple[asyncio.Future[int], tuple[bytes | bytearray, bytes]] | None:
        if not statements:  # empty query string: PostgreSQL answers EmptyQueryResponse
            op = _Op(_OP_QUERY, [])
            self._forget_unnamed(op, portal=False)  # no statement runs in the portal
            self._ops.append(op)
            out.append(raw)
            return None
        tracked, durable, denial = self._admit(statements, path)
        if denial is not None:
            op = _Op(_OP_QUERY, [], _denial_frame(denial))
            self._forget_unnamed(op, portal=True)  # the poison is a Query too
            self._ops.append(op)
            out.append(_query_poison(statements, path))
            return None
        op = _Op(_OP_QUERY, tracked)
        op.limit = len(tracked)
        self._forget_unnamed(op, portal=True)
        self._ops.append(op)
        if self._copies_admitted:
            self._count_copies(op)
        if durable is not None:
            return durable, (raw, _query_poison(statements, path))
        out.append(raw)
        return None

    def _forget_unnamed(self, op: _Op, *, portal: bool) -> None:
        """A Query goes to PostgreSQL (`op`: its op; `portal`: it holds a statement).

        PostgreSQL drops the unnamed statement as it starts any Query, and runs each statement
        of one in the unnamed portal, replacing the client's: dropped once the statement
        succeeds, and when it fails the failed portal (which runs nothing again) stays until its
        transaction block ends. Only a first statement failing before it runs (to parse, its
        table unknown, in a block already failed) leaves the client's — in a failed block, where
        an Execute of it fails too, unless it was bound there from COMMIT or ROLLBACK. dbward
        forgets both names: an Execute of the unnamed portal, or a Bind of the unnamed
        statement, is then asked about as one it never saw (_probe_unseen). Before, it ran as
        the old statement in dbward's decision and records while PostgreSQL answered 34000 or
        25P02. Undone if PostgreSQL skips the Query (an error earlier in an extended-protocol
        group with no Sync after it yet)."""
        # Mostly neither is held (a client of the simple protocol only): no list is built.
        portal = portal and ("" in self._portals or "" in self._pending_portals)
        if "" in self._prepared or "" in self._pending_statements:
            statement = self._define("", None, portal=False, drops_on_failure=False)
            if portal:
                op.drops = (statement, self._define("", None, portal=True, drops_on_failure=False))
            else:
                op.drops = (statement,)
        elif portal:
            op.drops = (self._define("", None, portal=True, drops_on_failure=False),)

    def _handle_execute(
        self,
        statements: tuple[Statement, ...],
        max_rows: int,
        raw: bytes | bytearray,
        out: list[bytes | bytearray],
        *,
        resumed: bool = False,
        sources: tuple[_Definition, ...] = (),
    ) -> tuple[asyncio.Future[int], tuple[bytes | bytearray, bytes]] | None:
        self._ran_since_ready = True
        tracked, durable, denial = self._admit(statements, _EXTENDED)
        if denial is not None:
            self._ops.append(_Op(_OP_POISON, None, _denial_frame(denial)))
            out.append(_POISON_PARSE)
            # PostgreSQL skips to Sync after an error; so do we, forwarding nothing more.
            self._discard_until_sync = True
            return None
        op = _Op(_OP_EXECUTE, tracked, None, max_rows, sources)
        op.data_type = _DATA_ROW  # its rows come with no RowDescription (its Describe's did)
        if resumed:
            for item in tracked:
                item.resumed = True
        self._ops.append(op)
        if self._copies_admitted:
            self._count_copies(op)
        if durable is not None:
            return durable, (raw, _POISON_PARSE)
        out.append(raw)
        return None

    def _probe_unseen(self, name: str, out: list[bytes | bytearray], *, portal: bool) -> None:
        """An Execute of a portal, or a Bind of a prepared statement, dbward never saw defined:
        refused if PostgreSQL holds one, else PostgreSQL's own answer.

        What such a portal or statement runs cannot be inspected (a cursor a function opened, a
        statement a function prepared, one dbward forgot at DEALLOCATE/DISCARD). But mostly
        there is none — its Bind or Parse failed, its transaction ended, a simple Query dropped
        the unnamed one, it never was — and PostgreSQL answers 34000 "portal does not exist" or
        26000 "prepared statement does not exist", not dbward's 42501 for running something. So
        PostgreSQL gets a Describe of it (which changes nothing) then the poison Parse, in place
        of the Execute or Bind. If the Describe fails, its error is the client's answer (the
        same code and message; the routine and line fields may name the Describe) and
        PostgreSQL skips the poison. If it describes one, that answer (a statement's
        ParameterDescription, then RowDescription or NoData) is dropped and the refusal
        recorded (see _on_backend_message), and the poison's error becomes the refusal. Either
        way PostgreSQL skips to the Sync, as after a refused message; so does dbward. Nothing
        ran when there is none, and nothing is recorded (as for a Describe or Close).
        """
        if portal:
            forgotten = self._forgotten_portals.get(name)
            statement = _uninspected(
                "EXECUTE",
                "uninspected_portal",
                f"portal {name!r} was not seen by dbward"
                if forgotten is None
                else _refused_use("portal", name, forgotten.why),
            )
        else:
            # A Bind plans the statement, which may run functions: it is refused at the Bind
            # (as a denied Parse is at the Parse), not at the Execute after it.
            statement = _uninspected(
                "EXECUTE",
                "uninspected_statement",
                f"prepared statement {name!r} was not seen by dbward",
            )
        decided, denial = self._decide_all((statement,), _EXTENDED)
        assert denial is not None  # guard.unparseable refuses every uninspected statement
        probe = _Op(_OP_DESCRIBE)
        probe.decided = decided  # refused and recorded if it exists
        self._ops.append(probe)
        self._ops.append(_Op(_OP_POISON, None, _denial_frame(denial)))
        out.append(messages.describe_message("P" if portal else "S", name, _NAME_CODEC))
        out.append(_POISON_PARSE)
        self._discard_until_sync = True

    def _count_copies(self, op: _Op) -> None:
        """The op just queued holds the COPY FROM STDIN statements just admitted."""
        op.copies, self._copies_admitted = self._copies_admitted, 0
        self._copy_ops += 1

    def _resolve_prepared(
        self, statement: Statement, changes: _PreparedChanges | None
    ) -> Statement:
        """Record PREPARE/DEALLOCATE/DISCARD in `changes`; resolve EXECUTE to what it runs."""
        if changes is None:
            changes = _PreparedChanges()
        name = statement.prepared_name
        if statement.command == "PREPARE" and name is not None and statement.prepared:
            changes.added[name] = (statement.prepared,)
            return statement
        if "executes_prepared" not in statement.flags:
            # DEALLOCATE (one or ALL) or DISCARD: forget everything, conservatively, so a name
            # re-created behind dbward's back cannot borrow an old classification.
            changes.cleared = True
            changes.added.clear()
            return statement
        found = changes.added.get(name or "")
        if found is None and not changes.cleared:
            found = self._prepared.get(name or "")
        if found is None or len(found) != 1:
            return replace(
                statement,
                kind=StatementKind.UNKNOWN,
                flags=statement.flags | {"uninspected_statement"},
                error=f"prepared statement {name!r} was not prepared through dbward",
            )
        return _as_running(statement, found[0])

    def _forget_portals(self) -> tuple[str, ...]:
        """A CLOSE ALL or DISCARD ALL is forwarded: every portal is forgotten (what is defined
        after it in flight starts from nothing), and returned.

        PostgreSQL drops them only if it succeeds: refused (in a failed block, DISCARD ALL in
        a block), they stay, and ROLLBACK TO SAVEPOINT makes them usable again. So until its
        answer says they are gone, and after a refusal, a SQL FETCH or MOVE of one is refused
        (as an Execute of one is: see _probe_unseen). It was read as a cursor dbward
        never saw, as the FETCH its text shows: `FETCH ALL p` of a portal bound from `DELETE
        ... RETURNING` ran the DELETE recorded as a read of no table.
        """
        forgotten = self._forgotten_portals
        names: list[str] = []
        for portals in (self._portals, self._earlier):
            for name, portal in portals.items():
                portal.why = "was forgotten at a CLOSE ALL or DISCARD ALL"
                forgotten[name] = portal
                names.append(name)
            portals.clear()
        return tuple(names)

    def _resolve_cursor(
        self,
        statement: Statement,
        batch: dict[str, tuple[Statement, ...] | str | None] | None,
        ended: str | None = None,
        code: str | None = None,
    ) -> Statement:
        """FETCH/MOVE runs the cursor's query: decide it as the DECLARE dbward saw.

        `batch`: cursors declared or closed earlier in the same string; `ended`: a statement
        earlier in it that may have dropped the cursors declared before it (COMMIT, ROLLBACK
        (TO SAVEPOINT), PREPARE TRANSACTION, DO, CALL); `code`: a DO or CALL earlier in it,
        whose code may have replaced any cursor open before it, WITH HOLD ones too. A cursor
        dbward did not see declared (opened inside a function and returned as a refcursor)
        stays what the FETCH text shows: the function is where that query lives.
        """
        name = statement.cursor_name or ""
        in_batch = batch is not None and name in batch
        found: tuple[Statement, ...] | None
        doubt: str | None = None
        if batch is not None and in_batch:
            declared = batch[name]
            found = None
            if declared in _RUNS_CODE:
                doubt = _refused_use("cursor", name, _replaced_by(declared))
            elif isinstance(declared, str):
                doubt = (
                    f"cursor {name!r} may have been dropped by the {declared} after its DECLARE"
                    " in the same query string"
                )
            else:
                found = declared
        else:
            portal = self._portals.get(name)
            found = None if portal is None else portal.statements
            if portal is None and name in self._earlier:
                doubt = (
                    f"cursor {name!r} may have been dropped by a statement PostgreSQL has not"
                    " answered yet (send it in a sync group of its own, after that answer)"
                )
            elif portal is not None and code is not None:
                doubt = _refused_use("cursor", name, _replaced_by(code))
            elif portal is not None and ended is not None and portal.state != _HELD:
                doubt = (
                    f"cursor {name!r} may have been dropped by the {ended} before it in the"
                    " same query string"
                )
            elif portal is None:
                forgotten = self._forgotten_portals.get(name)
                if forgotten is not None:
                    doubt = _refused_use("cursor", name, forgotten.why)
        if doubt is not None:
            return replace(
                statement,
                kind=StatementKind.UNKNOWN,
                flags=statement.flags | {"uninspected_portal"},
                error=doubt,
            )
        if found is None or len(found) != 1:
            return statement
        return _as_running(statement, found[0], drop_flags=frozenset({"holdable_cursor"}))

    # ------------------------------------------------------------------ portal lifetimes

    def _portal_event(self) -> None:
        """A message that may make PostgreSQL drop portals defined before it is forwarded (a
        Sync or Query, the end of an implicit transaction; an Execute of COMMIT, ROLLBACK (TO
        SAVEPOINT), DO, CALL ...): those portals move to _earlier until nothing is in flight,
        when PostgreSQL's answers have said which survived (see _Scope). Swapped, not walked,
        when nothing is there yet (WITH HOLD cursors kept from earlier transactions too)."""
        self._portal_events = True
        portals = self._portals
        if portals:
            earlier = self._earlier
            if earlier:
                earlier.update(portals)
                portals.clear()
            else:
                self._portals, self._earlier = earlier, portals

    def _portals_settled(self) -> None:
        """Nothing is in flight: every portal dbward still holds, PostgreSQL holds too."""
        earlier = self._earlier
        if earlier:
            portals = self._portals
            if portals:
                for name, portal in earlier.items():
                    portals.setdefault(name, portal)
                earlier.clear()
            else:
                self._portals, self._earlier = earlier, portals

    def _cursor_waits(self, statements: tuple[Statement, ...]) -> _Await | None:
        """A FETCH/MOVE of a cursor that may have been dropped by a message PostgreSQL has not
        answered yet waits until nothing is in flight, if a Sync or Query will bring that
        answer; otherwise it is refused when decided (see _resolve_cursor)."""
        for statement in statements:
            name = statement.cursor_name
            if (
                name is not None
                and "fetches_cursor" in statement.flags
                and name not in self._portals
                and name in self._earlier
                and self._ops
                and self._ops[-1].code in (_OP_QUERY, _OP_SYNC)
            ):
                return _AWAIT_QUIET
        return None

    def _portal_in_doubt(self, name: str, out: list[bytes | bytearray]) -> _Await | None:
        """An Execute of a portal defined before a message PostgreSQL has not answered yet that
        may have dropped it: it waits until nothing is in flight, if a Sync or Query last in
        flight will bring that answer; otherwise (pipelined behind the COMMIT, ROLLBACK TO ...
        in its sync group, or after a Parse or Bind of a new sync group sent before the last
        Sync was answered: waiting would stall, as PostgreSQL sends those answers only at the
        client's next Sync) it is refused as uninspected (the poison Parse in its place)."""
        ops = self._ops
        if ops and ops[-1].code in (_OP_QUERY, _OP_SYNC):
            return _AWAIT_QUIET
        statement = _uninspected(
            "EXECUTE",
            "uninspected_portal",
            f"portal {name!r} may have been dropped by a statement PostgreSQL has not answered"
            " yet (send it in a sync group of its own, after that answer)",
        )
        decided, denial = self._decide_all((statement,), _EXTENDED)
        assert denial is not None  # guard.unparseable refuses every uninspected statement
        self._record_denied(decided, denial)
        self._ops.append(_Op(_OP_POISON, None, _denial_frame(denial)))
        out.append(_POISON_PARSE)
        self._discard_until_sync = True
        return None

    def _note_portal(self, portal: _Portal) -> None:
        """PostgreSQL answered the message that created this portal: it belongs to the
        (sub)transaction running now."""
        self._scopes[-1].portals[portal.name] = portal
        self._scoped = True

    def _drop_portal(self, portal: _Portal, *, why: str | None = None) -> None:
        """PostgreSQL dropped this portal (`why` given: it may have, or code may have replaced
        it: why): forget it. A doubtful one is remembered as forgotten, so a FETCH of it is
        refused (see _resolve_cursor), as an Execute of a portal PostgreSQL holds but dbward
        does not is."""
        if portal.state >= _DROPPED:
            return
        doubtful = why is not None
        if why is not None:
            portal.state = _DOUBTFUL
            portal.why = why
        else:
            portal.state = _DROPPED
        name = portal.name
        if self._portals.get(name) is portal:
            del self._portals[name]
        elif self._earlier.get(name) is portal:
            del self._earlier[name]
        else:
            return  # closed or replaced since (or the previous meaning of one in flight)
        self._executed_portals.discard(name)
        if doubtful:
            self._forgotten_portals[name] = portal

    def _end_portal_transaction(
        self, *, committed: bool | None, chained: bool, why: str = ""
    ) -> None:
        """The transaction ended: committed (its WITH HOLD cursors survive, its other portals
        are dropped), rolled back (all its portals dropped, WITH HOLD ones too), or None: it
        may have done either, or neither (a DO block or procedure may commit or roll back, or
        not): its portals are forgotten as doubtful (`why`). Cursors held from earlier
        transactions are in no scope: nothing here touches them."""
        scopes = self._scopes
        if committed is None:
            for scope in scopes:
                for portal in scope.portals.values():
                    self._drop_portal(portal, why=why)
        else:
            portals, earlier = self._portals, self._earlier
            for scope in scopes:
                for name, portal in scope.portals.items():
                    if portal.state >= _DROPPED:
                        continue
                    if committed and portal.holdable:
                        portal.state = _HELD  # from _LIVE (or _HELD already)
                        continue
                    portal.state = _DROPPED  # _drop_portal, inline: once per transaction
                    # Set aside at the Sync or Query that ended the transaction, mostly.
                    if earlier.get(name) is portal:
                        del earlier[name]
                    elif portals.get(name) is portal:
                        del portals[name]
                    else:
                        continue
                    self._executed_portals.discard(name)
        if len(scopes) > 1:
            del scopes[1:]
        scopes[0].portals.clear()  # the transaction's own scope (named None: never replaced)
        self._scoped = False
        self._in_block = chained

    def _note_portal_scope(self, statement: Statement, status: str) -> None:
        """A transaction statement (or DO, CALL, one PostgreSQL commits at once) finished:
        follow the (sub)transactions portals belong to, and forget the portals PostgreSQL
        dropped (verified on PostgreSQL 15: ROLLBACK TO SAVEPOINT drops those created since
        the savepoint, WITH HOLD or not, in released savepoints inside it too, and keeps those
        created before it; RELEASE keeps them, in the savepoint around; COMMIT drops all but
        WITH HOLD cursors, which survive until closed; ROLLBACK, and a COMMIT answered
        ROLLBACK, drop all that were created in the transaction; AND CHAIN does the same)."""
        command = statement.command
        if status in ("not_executed", "denied", "unknown"):
            return  # PostgreSQL did not run it (or the session is gone)
        if command in _BEGINS_BLOCK:
            if status == "ok":
                self._in_block = True  # what ran before it in the implicit transaction joins
            return
        chained = "chains_transaction" in statement.flags
        if command in ("COMMIT", "ROLLBACK"):
            if status in ("ok", "rolled_back"):
                committed = command == "COMMIT" and status == "ok"
                self._end_portal_transaction(committed=committed, chained=chained)
            return
        if command in _SAVEPOINT_COMMANDS:
            if status == "ok":
                self._note_savepoint(command, statement.savepoint)
            return
        if command in _RUNS_CODE:
            # Its code may have closed any portal and opened another under its name, in a
            # block or not, failing after or not: none open before it is known any more.
            self._doubt_portals(_replaced_by(command))
            if not self._in_block:  # and it may have committed or rolled back
                self._end_portal_transaction(
                    committed=None, chained=False, why=_replaced_by(command)
                )
            return
        # PREPARE TRANSACTION (in a block or not: PostgreSQL commits or rolls back what ran
        # outside one), COMMIT/ROLLBACK PREPARED, a statement PostgreSQL commits at once:
        # outside a block each may commit or roll back, so the transaction's portals are
        # forgotten, doubtful. Inside a block none can end it but PREPARE TRANSACTION
        # (PostgreSQL refuses the others' transaction control).
        if command == "PREPARE TRANSACTION" or not self._in_block:
            self._end_portal_transaction(
                committed=None, chained=False, why=f"may have been dropped by a {command}"
            )

    def _doubt_portals(self, why: str) -> None:
        """A DO block or procedure ran (see _RUNS_CODE): every portal PostgreSQL held when it
        started — those noted in the transaction's scopes, and WITH HOLD cursors held from
        earlier transactions — is forgotten as doubtful (`why`): a FETCH or MOVE of one is
        refused, and an Execute of one if PostgreSQL holds a portal of that name. Portals
        defined after it (answered later, so in no scope yet) are untouched. Walks every
        portal dbward holds: run once per DO or CALL, never per Execute."""
        for scope in self._scopes:
            for portal in scope.portals.values():
                self._drop_portal(portal, why=why)
        for portals in (self._portals, self._earlier):
            held = [portal for portal in portals.values() if portal.state == _HELD]
            for portal in held:
                self._drop_portal(portal, why=why)

    def _note_savepoint(self, command: str, name: str | None) -> None:
        """SAVEPOINT, RELEASE or ROLLBACK TO SAVEPOINT succeeded (see _note_portal_scope)."""
        scopes = self._scopes
        if command == "SAVEPOINT":
            scopes.append(_Scope(name))
            return
        level = _savepoint_level(scopes, name)
        if level is None:
            # A savepoint dbward did not see set: which portals came after it is unknown.
            if command == "ROLLBACK TO SAVEPOINT":
                self._end_portal_transaction(
                    committed=None,
                    chained=self._in_block,
                    why="may have been dropped by a ROLLBACK TO SAVEPOINT",
                )
            return
        if command == "RELEASE":
            # Its portals now belong to the level around it: dropped only with that one.
            outer = scopes[level - 1].portals
            for scope in scopes[level:]:
                outer.update(scope.portals)
            del scopes[level:]
            return
        for scope in scopes[level:]:
            for portal in scope.portals.values():
                self._drop_portal(portal)
        del scopes[level + 1 :]
        scopes[level] = _Scope(name)  # ROLLBACK TO keeps the savepoint itself

    def _apply_prepared_changes(self, changes: _PreparedChanges, tracked: list[_Tracked]) -> None:
        """The batch was forwarded: its PREPARE/DEALLOCATE now hold for the session.

        A PREPARE stays pending until its outcome: if PostgreSQL refuses it (the name is
        taken, an error earlier in the string), what the name meant before is restored.
        """
        if changes.cleared:
            # PostgreSQL's DEALLOCATE (and DISCARD PLANS, TEMP, SEQUENCES) leaves every portal
            # as it is: a portal keeps the statement it was bound from. DISCARD ALL closes them.
            self._prepared.clear()
        for item in tracked:
            statement = item.statement
            if statement.command == "DISCARD ALL":
                item.forgets = self._forget_portals()
            name = statement.prepared_name
            if statement.command == "PREPARE" and name is not None and name in changes.added:
                item.definition = self._define(
                    name, changes.added[name], portal=False, drops_on_failure=False
                )

    def _terminate(self, out: list[bytes | bytearray]) -> None:
        """Terminate: forwarded after what came before it, as PostgreSQL would read it — the
        statements already sent run to their end (not cancelled, as on a lost connection)."""
        upstream = self._upstream
        self._terminated = True
        if upstream is not None:
            out.append(messages.terminate())
            _write_all(upstream.transport, out)
        self._close_client()

    # ------------------------------------------------------------------ upstream -> client

    def _on_upstream_data(self, data: bytes) -> None:
        scanner = self._scanner
        transport = self.transport
        if scanner is None or transport is None or self._phase != _PHASE_READY:
            return
        mid_frame = scanner.mid_frame
        try:
            forward, events = scanner.feed(data)
        except ProtocolError as exc:
            # Nothing of this feed is forwarded: the rest of a row begun before is lost too.
            self._upstream_invalid(exc, mid_frame)
            return
        held = scanner.pending_bytes  # counted once what came before it is forwarded
        if not events:
            if forward:
                transport.write(forward)
            if held or self._upstream_held:
                self._count_upstream_held(held, bool(forward))
            return
        pieces: list[bytes] | None = None
        position = 0
        ops = self._ops
        for msg_type, start, end, payload in events:
            # Other replies pay one test (a constant set); these come once per result set.
            if msg_type in {0x44, 0x54, 0x64}:
                if msg_type != 0x54:
                    # The first DataRow/CopyData of a run (the scanner reports no other): due
                    # if the reply first in line carries that kind of data now (_Op.data_type).
                    if ops and ops[0].data_type == msg_type:
                        continue
                elif ops:  # RowDescription: a Describe's is handled below
                    op = ops[0]
                    if op.code == _OP_QUERY and op.index < op.limit and op.data_type != 0x64:
                        op.data_type = 0x44  # a statement of the Query returns rows: they follow
                        continue
            try:
                replacement = self._on_backend_message(msg_type, payload)
            except ProtocolError as exc:
                # A malformed body (ErrorResponse, ParameterStatus, ...): neither it nor the
                # rest of this feed reaches the client; whatever came before it does.
                if pieces:
                    transport.write(b"".join(pieces))
                transport.write(forward[position:start])
                self._upstream_invalid(exc, False)
                return
            if self._escalation is not None:
                # Nothing from the escalated session reaches the client, this report included.
                if pieces:
                    transport.write(b"".join(pieces))
                transport.write(forward[position:start])
                self._terminate_escalated(self._escalation)
                return
            if replacement is not None:
                if pieces is None:
                    pieces = []
                pieces.append(forward[position:start])
                pieces.append(replacement)
                position = end
        if pieces is None:
            transport.write(forward)
        else:
            pieces.append(forward[position:])
            transport.write(b"".join(pieces))
        if (held or self._upstream_held) and not self._count_upstream_held(held, True):
            return
        if self._client_paused_for_replies and len(self._ops) <= _REPLIES_LOW_MARK:
            self._replies_drained()
        awaiting = self._awaiting
        if awaiting is not None and (
            # PostgreSQL now skips to the client's Sync (an error answered on a Flush): the
            # parked messages are dropped up to it, whatever they waited for.
            self._discard_until_sync
            or awaiting.ready(
                not self._ops and not self._ran_since_ready,
                not self._copy_verdict_pending
                and (self._copying or not self._copy_ops or not self._copy_pending()),
            )
        ):
            self._awaiting = None
            self._blocked = False
            self._unpark()
        if self._shutdown_requested and not self._ops and not self._blocked:
            self._send_shutdown()

    def _on_backend_message(self, msg_type: int, payload: bytes | None) -> bytes | None:
        """Track one upstream message; returns replacement bytes for it, if any."""
        ops = self._ops
        # The copy probe's replies (ReadyForQuery, CloseComplete, ErrorResponse) are checked
        # for in those branches only: the rows and CommandCompletes of every query skip it.
        if msg_type == 0x43:  # 'C' CommandComplete
            if self._copy_verdict_pending:
                # The copy succeeded: PostgreSQL read and ignored the Syncs sent into it.
                self._copy_verdict_pending = False
                self._copy_syncs = 0
            if ops:
                op = ops[0]
                rows = messages.command_complete_rows(payload) if payload is not None else None
                status = "ok"
                if payload is not None and payload.startswith(b"ROLLBACK"):
                    status = self._rollback_status(op)
                if op.code == _OP_QUERY:
                    index = op.index
                    tracked = op.tracked
                    if tracked is None or index >= op.limit:
                        # One CommandComplete per statement, none after the error that ended
                        # the Query: it would be taken for the client's next command's answer
                        # (and recorded for a statement that never ran).
                        raise ProtocolError("CommandComplete for no statement of the Query")
                    self._record_outcome(tracked[index], status, "", rows)
                    op.index = index + 1
                    op.data_type = -1  # the next statement's rows follow its RowDescription
                elif op.code == _OP_EXECUTE:
                    ops.popleft()
                    if op.tracked:
                        for item in op.tracked:
                            self._record_outcome(item, status, "", rows)
                else:
                    # A Parse, Bind, Describe, ... is owed its reply first: this completes
                    # nothing the client sent (it would take it for that reply).
                    raise ProtocolError("CommandComplete with no Query or Execute first in line")
                return None
            # Nothing in flight: PostgreSQL completes only what it was sent. Forwarded, it
            # would report to the client a command it never sent (libpq drops it as arriving
            # while idle, other drivers take it for the next command's answer).
            raise ProtocolError("CommandComplete with nothing in flight")
        if msg_type == 0x5A:  # 'Z' ReadyForQuery
            if ops and ops[0].code == _OP_PROBE:
                return self._on_probe_reply(msg_type, payload)
            if payload not in _READY_STATUSES:
                # A status PostgreSQL never sends: the client (libpq) would stop knowing
                # whether a transaction is open, and dbward whether statements commit.
                raise ProtocolError("invalid ReadyForQuery")
            for op in ops:
                if op.code == _OP_QUERY or op.code == _OP_SYNC:  # noqa: PLR1714
                    break  # what it answers (usually first in line: Parse ... were answered)
            else:
                # PostgreSQL sends one only in answer to a Query or a Sync. Forwarded, it would
                # answer the client's next Query before PostgreSQL has (its replies then
                # taken for the one after), and end dbward's view of a transaction block that
                # PostgreSQL still holds.
                raise ProtocolError("ReadyForQuery with no Query or Sync in flight")
            self._note_ready(payload)
            unanswered: list[_Op] | None = None
            while ops:
                op = ops.popleft()
                if op.code == _OP_QUERY:
                    if op.tracked and op.index < len(op.tracked):  # statements left unanswered
                        self._finish_op(op, "not_executed", "")
                    for dropped in op.drops:  # whether the Query succeeded or failed
                        self._settle(dropped, None)
                    break
                if op.code == _OP_SYNC:
                    break
                self._finish_op(op, "not_executed", "")
                if op.definition is not None:
                    if unanswered is None:
                        unanswered = []
                    unanswered.append(op)
            for op in unanswered or ():
                assert op.definition is not None
                self._settle(op.definition, "skipped")
            if not ops:
                self._ready_and_idle()
            return None
        if msg_type == 0x45:  # 'E' ErrorResponse
            if ops and ops[0].code == _OP_PROBE:
                return self._on_probe_reply(msg_type, payload)
            return self._on_error(payload)
        if msg_type in (0x31, 0x32, 0x33):  # ParseComplete, BindComplete, CloseComplete
            if not ops:
                # Forwarded, it would answer the client's next Parse, Bind or Close before
                # PostgreSQL had (and a Query's replies would be taken for the one after).
                raise ProtocolError(f"{_REPLY_NAMES[msg_type]} with nothing in flight")
            code = ops[0].code
            if code == _COMPLETES[msg_type]:
                definition = ops.popleft().definition
                if definition is not None:  # it succeeded: its definition holds
                    definition.settled = True
                    pending = (
                        self._pending_portals if definition.portal else self._pending_statements
                    )
                    if pending.get(definition.name) is definition:
                        del pending[definition.name]
                    made = definition.meaning
                    if isinstance(made, _Portal):  # a Bind: the portal is PostgreSQL's now
                        self._scopes[-1].portals[made.name] = made  # see _note_portal
                        self._scoped = True
                return None
            if msg_type == 0x33 and code == _OP_PROBE:
                return self._on_probe_reply(msg_type, payload)
            # Something else is owed its reply first (a BindComplete taken for a Parse's would
            # have dbward hold as prepared a statement PostgreSQL may have refused).
            raise ProtocolError(f"{_REPLY_NAMES[msg_type]} answering no {_REQUESTS[msg_type]}")
        if msg_type in (0x54, 0x6E):  # RowDescription, NoData
            if ops and ops[0].code == _OP_DESCRIBE:
                decided = ops.popleft().decided
                if decided is not None:
                    # dbward's Describe in place of an Execute of a portal (a Bind of a
                    # statement) it never saw: it exists, so the Execute (Bind) is refused (the
                    # poison's error, next, is the refusal). The client asked for no
                    # description: it is dropped.
                    self._record_denied(decided, decided[0][1])
                    return b""
                return None
            # NoData answers only a Describe. A RowDescription also answers a statement of the
            # Query first in line (see _on_upstream_data), never an Execute (its Describe's
            # did): one for another request, or after the Query's statements or its error,
            # would start a result the client takes for that request's answer.
            if msg_type == 0x54:
                raise ProtocolError("RowDescription answering no Describe or Query")
            raise ProtocolError("NoData with no Describe in flight")
        if msg_type in (0x49, 0x73):  # EmptyQueryResponse, PortalSuspended
            if not ops:
                raise ProtocolError(f"{_REPLY_NAMES[msg_type]} with nothing in flight")
            op = ops[0]
            if op.code != _OP_EXECUTE:
                # An empty query string's answer, to a Query or an Execute; PortalSuspended
                # answers an Execute only. A Query with statements (or denied: the poison
                # fails) never gets one, nor does an empty one after its own or an error.
                if (
                    msg_type == 0x49
                    and op.code == _OP_QUERY
                    and not op.tracked
                    and op.index == 0
                    and op.replacement is None
                ):
                    op.index = 1  # answered: only its ReadyForQuery follows
                    return None
                raise ProtocolError(f"{_REPLY_NAMES[msg_type]} answering no {_REQUESTS[msg_type]}")
            ops.popleft()
            suspended = msg_type == 0x73
            returned = op.max_rows if suspended else 0
            for item in op.tracked or ():
                # INSERT/UPDATE/DELETE ... RETURNING ran whole at the first Execute: the
                # limit counts the rows returned so far, not the rows changed (unknown).
                changed = suspended and item.statement.kind is not _READ_KIND
                self._record_outcome(
                    item,
                    "suspended" if suspended else "empty",
                    "",
                    None if changed else returned,
                )
            return None
        if msg_type == 0x47:  # CopyInResponse
            # The next COPY FROM STDIN of the op being answered starts (a Query may hold
            # several); what the client sent after it, parked until now, is read as copy data.
            if ops and ops[0].copies > 0:
                ops[0].copies -= 1
                ops[0].data_type = -1  # the copy's data comes from the client, not in rows
                self._copying = True
                self._copy_syncs = 0
                return None
            # No COPY FROM STDIN is being answered: the client would send copy data (psql the
            # rest of its input) that dbward, not knowing of a copy, passes on as ignored, and
            # read its Syncs and SQL as outside one.
            raise ProtocolError("CopyInResponse with no COPY FROM STDIN in flight")
        if msg_type == 0x53 and payload is not None:  # ParameterStatus
            name, value = messages.parse_parameter_status(payload)
            if name == "client_encoding":
                self._set_encoding(value)
            elif name == "is_superuser" and value == "on" and not self._superuser_at_login:
                self._escalation = "the database session became a superuser"
            elif name == "session_authorization" and value != self._authorization_at_login:
                self._escalation = f"the database session's authorization changed to {value!r}"
            elif name == "standard_conforming_strings":
                self._conforming_strings = value == "on"
            elif name == "application_name":
                # SET application_name mid-session: later records and decisions carry it
                # (the records capped, as at login: PostgreSQL cuts it to 63 bytes itself).
                context = self._context
                if context is None or value != context.application_name:
                    self._application_name = capped(value)
                    if context is not None:
                        self._context = replace(context, application_name=value)
            return None
        if msg_type == 0x41 and payload is not None:  # NotificationResponse
            # Process id, channel, payload: two strings ending the body. libpq reads a string
            # without its terminator on into the next message (then drops the connection).
            channel_end = payload.find(b"\x00", 4)
            if channel_end < 0 or payload.find(b"\x00", channel_end + 1) != len(payload) - 1:
                raise ProtocolError("invalid NotificationResponse message")
            return None
        if msg_type == 0x4E and payload is not None:  # NoticeResponse
            # The fields of an ErrorResponse: one with a field or the list unterminated, which
            # libpq takes for lost synchronization, is not forwarded as if it were whole.
            messages.error_essentials(payload, "NoticeResponse")
            return None
        if msg_type == 0x48:  # CopyOutResponse
            # PostgreSQL sends one only for a COPY ... TO STDOUT, as the answer to that statement
            # of the Query or Execute first in line. Another statement answered with one would
            # have the client take the copy for that statement's result; one nobody asked for,
            # for the answer to the client's next command.
            if ops:
                op = ops[0]
                tracked = op.tracked
                if tracked and (
                    (
                        op.code == _OP_QUERY
                        and op.index < op.limit
                        and "copy_to_stdout" in tracked[op.index].statement.flags
                    )
                    or (
                        op.code == _OP_EXECUTE
                        and any("copy_to_stdout" in item.statement.flags for item in tracked)
                    )
                ):
                    op.data_type = 0x64  # CopyData until its CopyDone, no rows
                    return None
            raise ProtocolError("CopyOutResponse answering no COPY TO STDOUT")
        if msg_type == 0x63:  # CopyDone
            # It ends the COPY TO STDOUT going on (its CommandComplete follows), nothing else:
            # one nobody asked for would be taken for the answer to the client's next command
            # (or a client copying in for the end of its copy).
            if ops and ops[0].data_type == 0x64:
                ops[0].data_type = -1
                return None
            raise ProtocolError("CopyDone with no COPY TO STDOUT going on")
        if msg_type == 0x74:  # ParameterDescription: answers a Describe of a statement only
            if ops and ops[0].code == _OP_DESCRIBE:
                # Its RowDescription or NoData follows. dbward's own Describe's (the statement
                # exists: _probe_unseen) is dropped, as that is.
                return None if ops[0].decided is None else b""
            raise ProtocolError("ParameterDescription with no Describe in flight")
        if msg_type == 0x44:  # DataRow, first of a run (_on_upstream_data let the due ones by)
            # No row is due: nothing in flight, a Parse, Bind, Describe, Close or Sync first in
            # line, a Query's statement before its RowDescription or after its CommandComplete
            # or error, a COPY. The client would take the rows for the answer to that request
            # (or to its next command: libpq reports "unexpected message" then).
            raise ProtocolError("DataRow with no rows due")
        if msg_type == 0x64:  # CopyData, first of a run
            # CopyData comes from PostgreSQL only between a CopyOutResponse and its CopyDone.
            raise ProtocolError("CopyData with no COPY TO STDOUT going on")
        if msg_type in _NEVER_AFTER_LOGIN:
            # PostgreSQL sends R, K and v only while logging in: a server asking the client for
            # a password (or handing it its own cancel key) now is not to be obeyed. W starts
            # a replication stream and V answers a FunctionCall: neither can reach PostgreSQL
            # from dbward (replication connections and FunctionCall are refused).
            raise ProtocolError(f"unexpected message {chr(msg_type)!r} after the session started")
        return None

    def _note_ready(self, payload: bytes | None) -> None:
        """ReadyForQuery: the transaction status it reports."""
        # What comes next runs in an implicit transaction of its own unless one is open.
        if self._commit_failed is not None:
            self._settle_failed_commit(payload)
        self._implicit = payload == b"I"
        self._committable = None
        if self._implicit:
            self._block = None  # no transaction block is open
            if self._in_block or self._scoped:
                # The implicit transaction committed (an error would have ended it already:
                # see _on_error); a block that ended with no COMMIT or ROLLBACK answered was
                # rolled back (its COMMIT failed).
                self._end_portal_transaction(committed=not self._in_block, chained=False)
        else:
            self._in_block = True

    def _ready_and_idle(self) -> None:
        """ReadyForQuery with nothing left in flight."""
        self._ran_since_ready = False  # every change so far has been reported
        self._copy_ops = 0  # nothing in flight: no COPY will start
        if self._portal_events:
            self._portal_events = False
            if self._earlier:
                self._portals_settled()
        if self._implicit:  # no transaction open: PostgreSQL dropped its portals
            if self._executed_portals:
                self._executed_portals.clear()
            forgotten = self._forgotten_portals
            if forgotten:  # PostgreSQL dropped those not WITH HOLD, refused CLOSE ALL or not
                for name in [name for name, portal in forgotten.items() if not portal.holdable]:
                    del forgotten[name]

    def _copy_pending(self) -> bool:
        """Whether a COPY FROM STDIN in flight has been neither started nor refused yet.

        Walks the queue (only while some op held a COPY): ops answered, skipped or refused
        since are gone from it, or hold no copies any more.
        """
        if any(op.copies for op in self._ops):
            return True
        self._copy_ops = 0
        return False

    def _on_error(self, payload: bytes | None) -> bytes | None:
        ops = self._ops
        if ops and ops[0].code == _OP_QUERY:
            # An error ends a simple Query: none of its COPY statements will start.
            ops[0].copies = 0
        severity, sqlstate = messages.error_essentials(payload) if payload is not None else ("", "")
        fatal = severity in ("FATAL", "PANIC")
        probe = 0
        if self._copying or self._copy_verdict_pending:
            # The copy failed (bad data, CopyFail, a trigger, a cancel): PostgreSQL left copy
            # mode. Syncs forwarded into it that PostgreSQL had not read yet, it answers now;
            # how many is asked of PostgreSQL itself once this error is handled (_CopyProbe).
            # Until then what the client sends (but copy data, which PostgreSQL ignores either
            # way) waits (see _process_frames).
            self._copying = False
            probe, self._copy_syncs = (0 if fatal else self._copy_syncs), 0
            self._copy_verdict_pending = probe > 0
        if fatal:
            # The backend is gone: what the client sent after, parked or not, never ran, and
            # its implicit transaction never committed.
            self._upstream_ending = True
            self._upstream_farewell = (sqlstate or "08006", _fatal_reason(payload))
            if self._committable:
                self._roll_back_implicit(sqlstate)
            self._roll_back_block(sqlstate)
            self._finish_pending("error", sqlstate)
            return None
        if self._committable:
            replacement = ops[0].replacement if ops else None
            # A denial's stand-in error is dbward's: the rollback carries the denial's SQLSTATE.
            why = (
                messages.error_essentials(replacement[5:])[1] or sqlstate
                if replacement is not None
                else sqlstate
            )
            self._roll_back_implicit(why)
        # A simple Query's copy: its ReadyForQuery comes first (PostgreSQL skips to no Sync).
        extended = not ops or ops[0].code != _OP_QUERY
        replacement = self._fail_op(sqlstate, probing=probe > 0)
        if self._scoped and not self._in_block:
            # The error ended the implicit transaction: PostgreSQL dropped its portals, WITH
            # HOLD cursors declared in it too. (In a block it only failed: ROLLBACK (TO
            # SAVEPOINT), or a COMMIT answered ROLLBACK, drops them.)
            self._end_portal_transaction(committed=False, chained=False)
        if probe:
            self._start_copy_probe(probe, extended=extended)
        return replacement

    def _fail_op(self, sqlstate: str, *, probing: bool) -> bytes | None:
        """The op first in line failed (`probing`: a copy, whose probe follows): record it and
        what PostgreSQL now skips; returns the replacement for the error, if any."""
        ops = self._ops
        if not ops:
            return None
        op = ops[0]
        replacement = op.replacement
        if op.code == _OP_QUERY:
            tracked = op.tracked
            index = op.index
            if tracked and index < len(tracked):
                self._record_outcome(tracked[index], "error", sqlstate)
            # PostgreSQL runs nothing more of the Query (its other statements are recorded
            # not_executed at its ReadyForQuery): no CommandComplete or EmptyQueryResponse is due.
            op.index = index + 1
            op.limit = 0
            op.data_type = -1  # the error ended its rows or its copy
            return replacement
        if op.code == _OP_SYNC:
            return None  # e.g. a deferred constraint failing at the implicit commit
        if op.code == _OP_PROBE:
            raise ProtocolError("unexpected error in reply to a Sync or Close")
        # Extended protocol: this op failed and PostgreSQL skips everything up to Sync.
        ops.popleft()
        self._finish_op(op, "error", sqlstate)
        # A failed Parse or Bind: the first Execute skipped that needed it failed with it (the
        # statement names an unknown table, a parameter is not a number ...); the others were
        # not executed.
        failed = op.definition if op.code in (_OP_PARSE, _OP_BIND) else None
        skipped: list[_Op] = []
        while ops and ops[0].code != _OP_SYNC:
            item = ops.popleft()
            skipped.append(item)
            if failed is not None and any(source is failed for source in item.sources):
                self._finish_op(item, "error", sqlstate)
                failed = None
            else:
                self._finish_op(item, "not_executed", "")
        if failed is not None and op.decided:
            # No Execute of the refused Parse in its group (asyncpg prepares before it executes,
            # pgjdbc's getParameterMetaData only describes): what the client tried is recorded
            # with the error, or it would be in no record at all.
            self._record_refused_parse(op.decided, sqlstate)
        if not ops and not probing:
            # No Sync sent yet (the error was answered on a Flush): PostgreSQL skips whatever
            # comes until the client's next Sync, answering none of it; so does dbward. (After
            # a copy, one of the Syncs sent into it may end that: the probe says.)
            self._discard_until_sync = True
        # Undo what the failed and skipped messages defined, in the order they were sent.
        if op.definition is not None:
            self._settle(op.definition, "failed")
        for item in skipped:
            if item.definition is not None:
                self._settle(item.definition, "skipped")
            for dropped in item.drops:  # a Query PostgreSQL skipped: the names are back
                self._settle(dropped, "skipped")
        return replacement

    def _record_refused_parse(
        self, decided: list[tuple[Statement, Decision, ProtocolPath]], sqlstate: str
    ) -> None:
        """An intent and its outcome for each statement of a Parse PostgreSQL refused: the
        first has the error, any other (PostgreSQL refuses more than one at Parse) was not
        executed. Never made durable first: the statement did not run."""
        self._count_statements(decided, self._allowed_counts)  # allowed: PostgreSQL refused it
        audit = self.services.audit
        started = time.perf_counter()
        status = "error"
        try:
            for statement, decision, path in decided:
                self._next_sid += 1
                self._statement_count += 1
                record = self._statement_record(self._next_sid, statement, decision, path)
                item = _Tracked(self._next_sid, statement, path, started, audit.hold(record))
                self._held_intents[item.sid] = item
                self._write_outcome(item, status, sqlstate, None)
                status, sqlstate = "not_executed", ""
        except AuditUnavailable:
            return  # the log says why it lost the record

    def _rollback_status(self, op: _Op) -> str:
        """CommandComplete says ROLLBACK: for a COMMIT (or END) of a failed transaction, or a
        PREPARE TRANSACTION of a failed block, PostgreSQL rolled back instead. (ROLLBACK TO
        SAVEPOINT, and PREPARE TRANSACTION outside a block, answer ROLLBACK too, and undo
        nothing or commit: they stay `ok`.)"""
        tracked = op.tracked
        index = op.index if op.code == _OP_QUERY else 0
        if not tracked or index >= len(tracked):
            return "ok"
        command = tracked[index].statement.command
        if command == "COMMIT" or (
            # In a block, PREPARE TRANSACTION of a failed one rolls it back and says so; outside
            # one it commits (with a warning) and says ROLLBACK all the same.
            command == "PREPARE TRANSACTION" and self._block is not None and not self._implicit
        ):
            return "rolled_back"
        return "ok"

    def _note_committable(self, tracked: _Tracked, status: str) -> list[_Tracked] | None:
        """A statement that changes something finished in an implicit transaction, which may
        still fail (a later statement of the same Query or sync group, the commit at Sync).

        A COMMIT (or END) there commits what ran so far, and a ROLLBACK (or ABORT) undoes it,
        which is returned; what follows runs in a new implicit transaction and is tracked
        afresh. BEGIN turns the implicit transaction into a block. Only what is certain is
        claimed later: after any other transaction command (SAVEPOINT, PREPARE TRANSACTION,
        AND CHAIN ...) or a DO/CALL (which may commit) nothing more is tracked until the next
        ReadyForQuery; PREPARE/DEALLOCATE are not transactional.
        """
        statement = tracked.statement
        command = statement.command
        if "outside_transaction" in statement.flags:
            # PostgreSQL ran it outside any transaction and committed it at once, with what
            # ran before it (a later error undoes neither: CREATE DATABASE first in a pipeline
            # whose next statement failed was claimed rolled back, the database was there).
            self._committable = None
            if status != "ok":
                self._implicit = False
            return None
        if statement.kind is _TRANSACTION_KIND or command in _MAY_COMMIT:
            committable, self._committable = self._committable, None
            if status == "ok" and "chains_transaction" not in statement.flags:
                if command == "COMMIT":
                    return None  # committed (PostgreSQL warns there was no block)
                if command == "ROLLBACK":
                    return committable  # rolled back (the same warning)
                if command in _BEGINS_BLOCK:
                    # What ran before it in the group commits or rolls back with the block.
                    self._implicit = False
                    self._block = [_Savepoint(None, committable)]
                    return None
            self._implicit = False
            return None
        if status != "ok" or command in _NOT_TRANSACTIONAL:
            return None
        if self._committable is None:
            self._committable = []
        self._committable.append(tracked)
        return None

    def _note_in_block(
        self, tracked: _Tracked, status: str, sqlstate: str
    ) -> list[_Tracked] | None:
        """A statement that is not a plain read finished inside the explicit transaction block.

        Follows the block's savepoints; returns what a ROLLBACK (TO SAVEPOINT), or a COMMIT
        answered ROLLBACK, has just undone. Where the block cannot be followed exactly (a
        savepoint dbward did not see), it stops claiming anything until the block ends.
        """
        block = self._block
        assert block is not None
        statement = tracked.statement
        if statement.kind is not _TRANSACTION_KIND:
            if status == "ok" and statement.command not in _NOT_TRANSACTIONAL:
                block[-1].changes.append(tracked)
            return None
        command = statement.command
        if status == "rolled_back":
            # COMMIT (or PREPARE TRANSACTION) of a failed block: PostgreSQL rolled it back.
            return self._end_block(statement, undone=True)
        if status == "error" and command in ("COMMIT", "PREPARE TRANSACTION"):
            # A commit that failed (a deferred constraint, a serialization failure) rolled the
            # block back; an error before the commit began (a cancel, statement_timeout while
            # the text was parsed) left the block open, failed, and ROLLBACK TO SAVEPOINT then
            # COMMIT still commits what came before the savepoint. ReadyForQuery says which.
            self._commit_failed = sqlstate
            return None
        if status != "ok":
            return None  # e.g. SAVEPOINT in an aborted block: nothing changed
        if command == "SAVEPOINT":
            block.append(_Savepoint(statement.savepoint))
            return None
        if command in ("RELEASE", "ROLLBACK TO SAVEPOINT"):
            level = _savepoint_level(block, statement.savepoint)
            if level is None:
                self._block = None
                return None
            undone = [item for savepoint in block[level:] for item in savepoint.changes]
            if command == "RELEASE":
                # Its changes now belong to the level below: undone only with that one.
                block[level - 1].changes.extend(undone)
                del block[level:]
                return None
            del block[level + 1 :]
            block[level].changes = []  # ROLLBACK TO keeps the savepoint itself
            return undone
        if command == "ROLLBACK":
            return self._end_block(statement, undone=True)
        if command in ("COMMIT", "PREPARE TRANSACTION"):
            # Committed, or prepared: its fate is decided by COMMIT/ROLLBACK PREPARED.
            self._end_block(statement, undone=False)
        return None  # BEGIN inside a block: a warning, nothing changes

    def _end_block(self, statement: Statement, *, undone: bool) -> list[_Tracked] | None:
        """The block ended (AND CHAIN opens the next at once); returns what it undid."""
        block = self._block
        chained = "chains_transaction" in statement.flags
        self._block = [_Savepoint(None)] if chained else None
        if not undone or block is None:
            return None
        return [item for savepoint in block for item in savepoint.changes]

    def _settle_failed_commit(self, payload: bytes | None) -> None:
        """ReadyForQuery after a COMMIT (or PREPARE TRANSACTION) of the block failed: 'E', the
        block is still open (failed); otherwise it was rolled back ('T' after AND CHAIN: a new
        block dbward does not follow)."""
        sqlstate, self._commit_failed = self._commit_failed or "", None
        if payload != b"E":
            self._roll_back_block(sqlstate)

    def _roll_back_block(self, sqlstate: str) -> None:
        """The session ended inside a transaction block (FATAL, connection lost or closed
        with nothing in flight): PostgreSQL aborted it, undoing what had finished ok in it."""
        block, self._block = self._block, None
        for savepoint in block or ():
            for item in savepoint.changes:
                self._write_outcome(item, "rolled_back", sqlstate, None)

    def _roll_back_implicit(self, sqlstate: str) -> None:
        """An error ended the implicit transaction: what finished `ok` in it was undone. Each
        such statement gets a `rolled_back` outcome (its `ok` said what its own reply said)."""
        undone, self._committable = self._committable or [], None
        self._implicit = False
        for tracked in undone:
            self._write_outcome(tracked, "rolled_back", sqlstate, None)

    def _start_copy_probe(self, syncs: int, *, extended: bool) -> None:
        """Ask PostgreSQL how many of the `syncs` Syncs forwarded into the copy that just
        failed it answers (see _CopyProbe); what the client sends meanwhile waits."""
        upstream = self._upstream
        if upstream is None:
            self._copy_verdict_pending = False
            return
        upstream.transport.write(_PROBE)
        self._ops.append(_CopyProbe(syncs, extended=extended))
        self._syncs += 2  # the probe's two Syncs end sync groups, as the client's do
        self._portal_event()

    def _on_probe_reply(self, msg_type: int, payload: bytes | None) -> bytes | None:
        """A ReadyForQuery, CloseComplete or ErrorResponse while the copy probe is first in
        line: the ReadyForQuery messages before its CloseComplete but the last (the probe's
        own first Sync) answer Syncs of the client's; they go to the client, the rest not."""
        probe = self._ops[0]
        assert isinstance(probe, _CopyProbe)
        if msg_type == 0x45:  # ErrorResponse: a FATAL (a Sync or a Close of nothing can't fail)
            return self._on_error(payload)
        if msg_type == 0x33:  # CloseComplete
            if probe.closed or probe.held is None:
                raise ProtocolError("unexpected CloseComplete")
            probe.closed = True
            probe.held = None  # the probe's own first Sync's: not the client's
            return b""
        if payload not in _READY_STATUSES:
            # Each one is sent on rebuilt: a status PostgreSQL never sends ends the session as
            # any invalid message does.
            raise ProtocolError("unexpected ReadyForQuery")
        self._note_ready(payload)
        if not probe.closed:
            # The one held before this answered a Sync of the client's: it goes on in its place.
            held, probe.held = probe.held, payload
            if held is None:
                return b""
            probe.answered += 1
            if probe.answered > probe.syncs:
                raise ProtocolError("unexpected ReadyForQuery")
            return messages.ready_for_query(held)
        # The probe's last ReadyForQuery: PostgreSQL is past the copy and every Sync sent.
        self._ops.popleft()
        self._copy_verdict_pending = False
        if probe.extended and not probe.answered:
            # PostgreSQL had read every Sync sent into the copy before it failed: without the
            # probe it would still skip whatever the client sends until its next Sync.
            self._discard_until_sync = True
        if not self._ops:
            self._ready_and_idle()
        return b""

    def _finish_op(self, op: _Op, status: str, sqlstate: str) -> None:
        tracked = op.tracked
        if tracked:
            first = op.index
            for item in tracked[first:]:
                self._record_outcome(item, status, sqlstate)
                status, sqlstate = "not_executed", ""
            op.tracked = []

    def _settle(self, definition: _Definition, failure: str | None) -> None:
        """PostgreSQL answered the defining message (failure None), refused or skipped it."""
        definition.settled = True
        name = definition.name
        pending = self._pending_portals if definition.portal else self._pending_statements
        if pending.get(name) is definition:
            del pending[name]
        if failure is None:
            made = definition.meaning
            if isinstance(made, _Portal):
                self._note_portal(made)
            return
        # What the name means in PostgreSQL without this message.
        meaning = (
            None if failure == "failed" and definition.drops_on_failure else definition.previous
        )
        successor = definition.successor
        while successor is not None and successor.settled:
            successor = successor.successor  # removed before this one: skip it
        if successor is not None:
            successor.previous = meaning  # a later message in flight replaces that instead
            return
        if definition.portal:
            assert not isinstance(meaning, tuple)
            self._restore_portal(name, meaning)
        elif meaning is None:
            self._prepared.pop(name, None)
        else:
            assert isinstance(meaning, tuple)
            self._prepared[name] = meaning

    def _restore_portal(self, name: str, meaning: _Portal | None) -> None:
        """A portal definition PostgreSQL refused or skipped: the name means again what it
        meant before it — unless PostgreSQL dropped that meanwhile (or may have: then a FETCH
        of it is refused, see _drop_portal)."""
        portals, earlier = self._portals, self._earlier
        portals.pop(name, None)
        earlier.pop(name, None)
        if meaning is None:
            return
        if meaning.state >= _DROPPED:
            if meaning.state == _DOUBTFUL:
                self._forgotten_portals[name] = meaning
            return
        # Defined before a message still in flight that may drop it: in doubt until answered.
        (earlier if self._portal_events else portals)[name] = meaning

    def _finish_pending(self, status: str, sqlstate: str, *, all_of_them: bool = False) -> None:
        """No more replies will come: the first statement in flight gets `status`, the ones
        after it were never reached (`not_executed`) — unless `all_of_them` (any may have run:
        a client that left, whose statements were cancelled or not)."""
        while self._ops:
            op = self._ops.popleft()
            had_statements = op.tracked is not None and len(op.tracked) > op.index
            self._finish_op(op, status, sqlstate)
            if had_statements and not all_of_them:
                status, sqlstate = "not_executed", ""

    def _on_upstream_lost(self, exc: Exception | None) -> None:
        if self._phase == _PHASE_READY and not self._closing:
            self._upstream_gone("dbward: lost the connection to the database")

    def _upstream_invalid(self, exc: ProtocolError, mid_frame: bool) -> None:
        log.error("session %s: upstream protocol error: %s", self.session_id, exc.message)
        self._client_mid_frame = mid_frame
        self._upstream_gone("the database sent an invalid message")

    def _upstream_gone(self, message: str) -> None:
        if self._upstream_lost_reported:
            return
        self._upstream_lost_reported = True
        if not self._ops:
            self._roll_back_block("08006")  # no COMMIT in flight: the block died with it
        self._finish_pending("unknown", "08006")
        sqlstate = "08006"
        if self._upstream_farewell is not None:
            # PostgreSQL said why (pg_terminate_backend, a shutdown, idle_session_timeout):
            # that, not dbward's view of a closed socket, is what the record keeps.
            sqlstate, why = self._upstream_farewell
            message = f"the database ended the session: {why}"
        self._audit(AuditEvent.UPSTREAM_LOST, reason=message, sqlstate=sqlstate)
        if self._upstream_ending:
            # PostgreSQL said why in its own FATAL, already relayed: a client reports the last
            # error it read (asyncpg does), so a FATAL of ours after it would replace the
            # reason. Close as PostgreSQL does.
            self._close_client()
            return
        self._fatal("08006", message)

    def _terminate_escalated(self, what: str) -> None:
        """Fail closed: a statement gave the session privileges no guard let through (a role
        switch inside a DO block or function). Audit it and end both connections, which also
        ends the escalated database session."""
        log.error("session %s: %s; terminating the session", self.session_id, what)
        self._finish_pending("unknown", "42501")
        self._audit(AuditEvent.PRIVILEGE_ESCALATION, reason=what, sqlstate="42501")
        self._fatal(
            "42501",
            "dbward: the database session gained privileges no statement was allowed to give "
            "it (a role switch inside code dbward cannot inspect); the session is terminated",
        )

    def _pause_client(self) -> None:
        self._client_paused_for_upstream = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume_client(self) -> None:
        self._client_paused_for_upstream = False
        if self.transport is not None and not self._blocked and not self._client_paused_for_replies:
            self.transport.resume_reading()
            self._reading_resumed()

    def _replies_drained(self) -> None:
        """Enough owed replies have arrived: read the client again (unless paused otherwise)."""
        self._client_paused_for_replies = False
        if (
            self.transport is not None
            and not self._blocked
            and not self._client_paused_for_upstream
        ):
            self.transport.resume_reading()
            self._reading_resumed()

    # ------------------------------------------------------------------ shutdown and errors

    def request_shutdown(self) -> None:
        """Drain: end the session once its in-flight work is answered."""
        self._shutdown_requested = True
        if self._phase != _PHASE_READY:
            self._fatal("57P01", "dbward is shutting down")
            self._abort_later()
        elif not self._ops and not self._blocked:
            self._send_shutdown()

    def force_close(self) -> None:
        """Grace period over: cancel in-flight work upstream and close now. The cancel runs
        on a task of services.cancel_tasks, which the listener waits for before exiting."""
        if self._ops:
            self._cancel_upstream()
        self._finish_pending("unknown", "57P01")
        self._fatal("57P01", "dbward is shutting down")

    def abort(self) -> None:
        """Drain, after force_close: drop a connection still open (its client does not read
        what was left to send). connection_lost follows on the next turn of the loop."""
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        self._close_upstream()

    def _cancel_upstream(self) -> None:
        """Cancel what runs upstream, on a task the listener keeps (see track_cancel)."""
        upstream = self._upstream
        if upstream is not None:
            track_cancel(self.services, send_cancel(self.services.settings.upstream, upstream))

    def _send_shutdown(self) -> None:
        self._fatal("57P01", "terminating connection because dbward is shutting down")
        self._abort_later()

    def _abort_later(self) -> None:
        """Drop the connection if it is still open SHUTDOWN_ABORT_S after the drain's 57P01."""
        # Closing waits until what is left to send has gone, which never happens once the
        # client stopped reading: the connection would hold the drain for shutdown_grace_s.
        asyncio.get_running_loop().call_later(SHUTDOWN_ABORT_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        services = self.services
        if self in services.sessions or self in services.over_limit:
            self.abort()  # connection_lost then writes its disconnect record

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.info("session %s: protocol error from client: %s", self.session_id, exc.message)
        self._audit(AuditEvent.PROTOCOL_ERROR, reason=exc.message, sqlstate=exc.sqlstate)
        self._fatal(exc.sqlstate, f"dbward: invalid message from client: {exc.message}")

    def _fatal(self, sqlstate: str, message: str) -> None:
        transport = self.transport
        scanner = self._scanner
        # Written in the middle of a row that the database never finished, the error would be
        # read as the rest of that row ("lost synchronization with server"): close only.
        torn = self._client_mid_frame or (scanner is not None and scanner.mid_frame)
        if transport is not None and not transport.is_closing() and not torn:
            transport.write(messages.error_response("FATAL", sqlstate, message))
        self._close_client()

    def _fatal_lingering(self, sqlstate: str, message: str) -> None:
        """FATAL to a client that is still sending: close our side for writing and read (and
        drop) what it sends for a moment before closing. Closing with its bytes unread would
        send a reset that can destroy the error before the client reads it."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._fatal(sqlstate, message)
            return
        transport.write(messages.error_response("FATAL", sqlstate, message))
        self._closing = True  # data_received drops everything from now on
        self._close_upstream()
        transport.write_eof()
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def _close_client(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()
        self._close_upstream()

    def _close_upstream(self) -> None:
        upstream = self._upstream
        if upstream is not None and not upstream.transport.is_closing():
            upstream.transport.write(messages.terminate())
            upstream.transport.close()

    def _release(self) -> None:
        """Give back what the session holds of its listener (idempotent)."""
        self._leave_unauthenticated()
        self._release_partial()
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None
        self.services.sessions.discard(self)
        self.services.over_limit.discard(self)
        if self._cancel_key is not None:
            self.services.cancels.revoke(*self._cancel_key)
            self._cancel_key = None

    # ------------------------------------------------------------------ audit helpers

    def _base_fields(self) -> dict[str, str]:
        return {
            "session_id": self.session_id,
            # Before authentication this is the claimed user name (connect, auth_fail, refusals).
            "identity": self.identity.name if self.identity is not None else self._claimed_user,
            "client_addr": self.client_addr,
            "application_name": self._application_name,
            "target": self.services.settings.name,
            "database": self._database,
        }

    def _audit(self, event: AuditEvent, **fields: object) -> None:
        self.services.counts.events[event] += 1
        self._release_held()
        base: dict[str, object] = dict(self._base_fields())
        base.update(fields)
        record = AuditRecord(event=event, ts_ms=int(self.services.clock() * 1000), **base)  # type: ignore[arg-type]
        try:
            self.services.audit.append(record)
        except AuditUnavailable:
            log.error("session %s: audit unavailable, %s record lost", self.session_id, event)

    def _statement_record(
        self, sid: int, statement: Statement, decision: Decision, path: ProtocolPath
    ) -> AuditRecord:
        # Positional, in AuditRecord field order: this runs for every statement.
        text = statement.text
        cap = self.services.audit_settings.sql_text_max
        identity = self.identity
        flags = statement.flags
        if flags and not _CREDENTIAL_FLAGS.isdisjoint(flags):
            # Neither the text nor an unsalted hash of it (a weak password could be guessed
            # offline from the hash) may reach the log.
            why = "it sets a password" if "sets_password" in flags else "it contains a credential"
            sql_text, sql_sha256 = _credential_text(statement, why, cap), ""
            # A parser message quotes the text near the error: keep it without the quotes.
            detail = parser_error_snippet(statement.error) if statement.error else ""
        else:
            if text is self._hashed_text:
                sql_text, sql_sha256 = self._hashed_cut, self._hashed_sha256
            else:
                sql_text = text if len(text) <= cap else text[:cap]
                # As dbward.core.text.text_sha256, inline: this runs for every new text.
                sql_sha256 = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
                self._hashed_text, self._hashed_sha256 = text, sql_sha256
                self._hashed_cut = sql_text
            # The parser's message can quote the rest of the text (an unterminated string),
            # dbward's the name of a portal it never saw: kept to their start, as sql_text is.
            error = statement.error
            detail = capped(error, QUOTED_ERROR_MAX) if error else ""
        # Every field, seq too: tuple.__new__ skips the NamedTuple's __new__ (and its defaults).
        return _new_tuple(
            AuditRecord,
            (
                _STATEMENT_EVENT,
                int(self.services.clock() * 1000),
                self.session_id,
                identity.name if identity is not None else self._claimed_user,
                self.client_addr,
                self._application_name,
                self.services.settings.name,
                self._database,
                _TEXT[path],
                sid,
                sql_text,
                sql_sha256,
                _TEXT[statement.kind],
                statement.command,
                statement.tables,
                _TEXT[decision.verdict],
                decision.reason,
                decision.rule,
                "",  # status
                "",  # sqlstate
                None,  # rows
                None,  # duration_ms
                detail,
                None,  # seq: the audit store's
            ),
        )

    def _record_outcome(
        self, tracked: _Tracked, status: str, sqlstate: str, rows: int | None = None
    ) -> None:
        if tracked.definition is not None:
            definition, tracked.definition = tracked.definition, None
            self._settle(definition, None if status == "ok" else "skipped")
        if tracked.forgets is not None:
            forgets, tracked.forgets = tracked.forgets, None
            if status == "ok":  # PostgreSQL dropped them: gone, not merely forgotten
                for name in forgets:
                    self._forgotten_portals.pop(name, None)
        if tracked.statement.kind is _READ_KIND or tracked.resumed:
            self._write_outcome(tracked, status, sqlstate, rows)
            return
        # A write suspended at its row limit ran whole (RETURNING rows are fetched later).
        done = "ok" if status == "suspended" else status
        statement = tracked.statement
        if statement.command in _PORTAL_SCOPE_COMMANDS or "outside_transaction" in statement.flags:
            self._note_portal_scope(statement, done)
        undone: list[_Tracked] | None = None
        if self._implicit:
            undone = self._note_committable(tracked, done)
        elif self._block is not None:
            undone = self._note_in_block(tracked, done, sqlstate)
        self._write_outcome(tracked, status, sqlstate, rows)
        for item in undone or ():  # after the ROLLBACK's own record: the log reads in order
            self._write_outcome(item, "rolled_back", sqlstate, None)

    def _write_outcome(
        self, tracked: _Tracked, status: str, sqlstate: str, rows: int | None
    ) -> None:
        duration_ms = round((time.perf_counter() - tracked.started) * 1000, 3)
        held = tracked.held
        if held is not None:
            tracked.held = None
            held_intents = self._held_intents
            held_intents.pop(tracked.sid, None)
            if held_intents and next(iter(held_intents)) < tracked.sid:
                # Earlier statements still wait for their answer (a denial is answered at
                # once): their intents go first, so the log keeps statement order.
                self._release_held()
            intent = held.record
            if intent is not None:
                # The intent was not sent yet: one record says both (same commit deadline).
                # It goes out as the held record it replaces, which the sink accepted already:
                # a backlog that filled up meanwhile cannot lose it (nor the statement's trace).
                fields = (status, sqlstate, rows, duration_ms)
                after = intent[_OUTCOME_FIELDS + len(fields) :]
                # All of the intent's fields, four replaced: tuple.__new__ as _make, less its frame.
                held.record = _new_tuple(AuditRecord, (*intent[:_OUTCOME_FIELDS], *fields, *after))
                self.services.audit.release(held)
                return
        identity = self.identity
        statement = tracked.statement
        record = _new_tuple(  # every field (see _statement_record)
            AuditRecord,
            (
                _OUTCOME_EVENT,
                int(self.services.clock() * 1000),
                self.session_id,
                identity.name if identity is not None else self._claimed_user,
                "",  # client_addr: on the intent record
                "",  # application_name: on the intent record
                self.services.settings.name,
                self._database,
                _TEXT[tracked.path],
                tracked.sid,
                "",  # sql_text: on the intent record
                "",  # sql_sha256
                _TEXT[statement.kind],
                statement.command,
                (),  # tables: on the intent record
                "",  # decision: on the intent record
                "",  # reason
                "",  # rule
                status,
                sqlstate,
                rows,
                duration_ms,
                "",  # detail: on the intent record
                None,  # seq: the audit store's
            ),
        )
        self._append(record)

    def _append(self, record: AuditRecord) -> None:
        try:
            self.services.audit.append(record)
        except AuditUnavailable:
            log.error("session %s: audit unavailable, outcome record lost", self.session_id)


def _credential_text(statement: Statement, why: str, cap: int) -> str:
    """What the log says of a statement holding a secret: its text without literals or comments.

    Text the parser rejected, text too long or too costly to scan here (classified in the
    worker pool for its operator-character runs: see lexer_cost), or text the scanner rejects
    is withheld whole: where the secret ends in it is then not known.
    """
    text = statement.text
    redacted = None
    if (
        not statement.error
        and len(text) <= _REDACT_MAX_CHARS
        and lexer_cost(text) <= LEXER_COST_INLINE_MAX
    ):
        code_bodies = "uninspectable_code" not in statement.flags
        redacted = without_literals(text, CREDENTIAL_TEXT, code_bodies=code_bodies)
    if redacted is None:
        return f"{statement.command} (text withheld: {why})"
    note = f" (literals withheld: {why})"
    if len(redacted) + len(note) > cap:
        redacted = redacted[: max(cap - len(note), 0)]
    return redacted + note
