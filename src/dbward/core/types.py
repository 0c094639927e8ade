"""Immutable value types passed between the relay, the policy decision point and the audit log."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, NamedTuple

# Statements accepted in one query string (config: max_statements_per_query). Each one costs the
# relay's shared event loop an intent and an outcome record (~10 us): a million-statement string
# stalled every session for seconds and filled the audit backlog, which refuses everyone's
# statements (measured: 1.2M statements, a 6.5 s stall, then all sessions refused for a while).
DEFAULT_MAX_STATEMENTS: Final = 10_000


class StatementKind(enum.StrEnum):
    """What a statement does, coarse enough for policy and audit."""

    READ = "read"  # SELECT, SHOW, EXPLAIN (without ANALYZE of a write), VALUES, TABLE
    WRITE = "write"  # INSERT/UPDATE/DELETE/MERGE, COPY FROM, SELECT INTO, data-modifying CTE
    DDL = "ddl"  # CREATE/ALTER/DROP/TRUNCATE/COMMENT ...
    DCL = "dcl"  # GRANT/REVOKE/CREATE ROLE/ALTER ROLE ...
    ADMIN = "admin"  # VACUUM/ANALYZE/CHECKPOINT/LOAD/CLUSTER/REINDEX/ALTER SYSTEM ...
    TRANSACTION = "transaction"  # BEGIN/COMMIT/ROLLBACK/SAVEPOINT/PREPARE TRANSACTION ...
    SESSION = "session"  # SET/RESET/SHOW-less session state, LISTEN/NOTIFY, PREPARE, DISCARD ...
    UNKNOWN = "unknown"  # could not be parsed or not recognised: denied by the built-in guards


class ProtocolPath(enum.StrEnum):
    """Which part of the wire protocol carried a statement."""

    SIMPLE = "simple"
    EXTENDED = "extended"
    COPY = "copy"
    FUNCTION_CALL = "function_call"


class Verdict(enum.StrEnum):
    """The closed vocabulary of decisions (hold and mask arrive with later policy work)."""

    ALLOW = "allow"
    DENY = "deny"


# Read per statement (Decision.allowed): a global load is specialized by CPython 3.11, a class
# attribute load is not.
_ALLOW: Final = Verdict.ALLOW


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is connected: a person or an agent, as established by an authenticator."""

    name: str
    kind: str = "user"  # "user" (a person) or "agent"
    groups: frozenset[str] = frozenset()
    authenticator: str = "local"  # which authenticator vouched for it


@dataclass(frozen=True, slots=True)
class Statement:
    """One classified SQL statement (one part of a multi-statement string).

    Produced by the SQL layer from the real PostgreSQL grammar; read by the policy and audit.
    """

    text: str  # the statement's own source text (this part only)
    kind: StatementKind
    command: str  # command tag-like name: "SELECT", "UPDATE", "SET", "COPY", "CREATE TABLE" ...
    tables: tuple[str, ...] = ()  # "schema.name" when qualified in the SQL, else "name"
    functions: tuple[str, ...] = ()  # lower-cased, "schema.name" when qualified
    # Flags such as "update_without_where", "delete_without_where", "data_modifying_cte",
    # "explain_analyze_write", "select_into", "role_switch", "copy_program", "copy_file",
    # "copy_from_stdin", "copy_to_stdout", "set_config_role", "parse_error", "function_call",
    # "sets_password" (role/user mapping/server password options), "carries_credential" (a
    # connection string with a password: dblink, subscriptions, primary_conninfo),
    # "chains_transaction" (COMMIT/ROLLBACK AND CHAIN: a new transaction block starts at once),
    # "outside_transaction" (VACUUM, CREATE DATABASE, CREATE INDEX CONCURRENTLY ...: runs only
    # outside a transaction block and commits at once).
    flags: frozenset[str] = frozenset()
    error: str | None = None  # parser message when kind is UNKNOWN because parsing failed
    # PREPARE / EXECUTE / DEALLOCATE name; EXECUTE (and EXPLAIN ANALYZE EXECUTE) carry the flag
    # "executes_prepared" and are resolved by the relay against what the session prepared.
    prepared_name: str | None = None
    prepared: Statement | None = None  # for PREPARE: the statement it prepares
    # DECLARE / CLOSE: the cursor (a portal, which the extended protocol can Execute by name);
    # CLOSE ALL carries the flag "closes_all_cursors" instead.
    cursor_name: str | None = None
    # SAVEPOINT / RELEASE / ROLLBACK TO: the savepoint (folded as PostgreSQL folds identifiers).
    savepoint: str | None = None
    # ALTER/DROP/RENAME ROLE, ALTER ROLE ... SET, GRANT/REVOKE of role membership, CREATE ROLE
    # ... ROLE: the roles it changes or gives memberships to (flag "changes_role"). The keywords
    # CURRENT_USER, SESSION_USER, CURRENT_ROLE, PUBLIC and ALL (every role) are bare upper
    # case; names are written as in `tables` (quoted unless plain), so a role named "PUBLIC"
    # reads "\"PUBLIC\"" and never passes for the keyword.
    roles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionContext:
    """Facts about the connection a statement arrived on, as the policy sees them."""

    session_id: str
    identity: Identity
    listener: str  # the listener's configured name (the "target")
    database: str
    client_addr: str
    application_name: str
    service_role: str = ""  # the role dbward logs in to the database as (upstream.user)


class PolicyRequest(NamedTuple):
    """Everything the decision point may look at: nothing else influences a decision.

    A NamedTuple because one is built per statement on the hot path (a third of the cost of
    a frozen dataclass).
    """

    session: SessionContext
    statement: Statement
    path: ProtocolPath
    now: float  # UTC epoch seconds from the injected clock


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one statement."""

    verdict: Verdict
    reason: str  # human-readable, shown to the client on denial and stored in the audit log
    rule: str  # identifier of the rule or guard that decided, e.g. "guard.role_switch"
    sqlstate: str = "42501"  # insufficient_privilege for denials
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def allowed(self) -> bool:
        """True when the statement may be forwarded."""
        return self.verdict is _ALLOW
