"""The single policy decision point: built-in guards first, then (later) configured rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from dbward.core.types import (
    Decision,
    PolicyRequest,
    ProtocolPath,
    StatementKind,
    Verdict,
)
from dbward.sql.postgres import SERVER_FILE_FUNCTIONS, recorded_name

__all__ = ["ALLOW", "GUARDS", "RULES", "Guard", "decide"]

# A guard (and, later, a configured rule) looks at one request and either decides or passes (None).
Guard = Callable[[PolicyRequest], Decision | None]

INSUFFICIENT_PRIVILEGE: Final = "42501"
PROGRAM_LIMIT_EXCEEDED: Final = "54000"
NAME_TOO_LONG: Final = "42622"
INVALID_NAME: Final = "42602"

# The allow path returns this one object: no allocation per statement.
ALLOW: Final = Decision(Verdict.ALLOW, reason="allowed", rule="default.allow")

_ROLE_FLAGS: Final = frozenset({"role_switch", "set_config_role"})


def _deny(rule: str, reason: str) -> Decision:
    return Decision(Verdict.DENY, reason=reason, rule=rule, sqlstate=INSUFFICIENT_PRIVILEGE)


_DENY_FUNCTION_CALL: Final = _deny(
    "guard.function_call",
    "dbward: the FunctionCall protocol message bypasses SQL inspection and is refused",
)
_DENY_COPY_PROGRAM: Final = _deny(
    "guard.copy_program", "dbward: COPY to or from a server-side program is not allowed"
)
_DENY_COPY_FILE: Final = _deny(
    "guard.copy_file", "dbward: COPY to or from a server-side file is not allowed"
)
_DENY_SET_CONFIG_ROLE: Final = _deny(
    "guard.role_switch",
    "dbward: changing role or session authorization is not allowed (set_config)",
)

# Parser messages quote the offending SQL ('syntax error at or near "..."'): drop the quotes'
# contents so no raw SQL reaches the client or the audit reason, then keep it short and printable.
# Everything from the first quote to the last goes: the quoted SQL holds quotes of its own
# (`PASSWORD "hunter2"` is reported as `at or near ""hunter2""`, and pairing the quotes left
# hunter2 out in the open), so no pairing of them can tell where it ends.
_QUOTED: Final = re.compile(r"[\"'].*[\"']|[\"'].*", re.DOTALL)
# One message names SQL without quotes: "improper qualified name (too many dotted names): a.b.c.d"
# prints the name's parts (quoted identifiers, a mistyped connection string among them) bare.
_DOTTED_NAMES: Final = re.compile(r"(too many dotted names\)): .*?(?=, at index \d+$|$)", re.DOTALL)
_UNPRINTABLE: Final = re.compile(r"[^\x20-\x7e]")
_MAX_SNIPPET: Final = 80


def parser_error_snippet(error: str | None) -> str:
    """A short, printable summary of a parser error without any quoted SQL from the statement."""
    if not error:
        return "unrecognised statement"
    text = _UNPRINTABLE.sub("?", _QUOTED.sub("<...>", _DOTTED_NAMES.sub(r"\1: <...>", error)))
    return text if len(text) <= _MAX_SNIPPET else text[: _MAX_SNIPPET - 3] + "..."


def guard_function_call(request: PolicyRequest) -> Decision | None:
    """FunctionCall ('F') messages run a function by OID with no SQL to inspect."""
    if request.path is ProtocolPath.FUNCTION_CALL or "function_call" in request.statement.flags:
        return _DENY_FUNCTION_CALL
    return None


def guard_statement_limit(request: PolicyRequest) -> Decision | None:
    """SQL over a size limit (statements per string, bytes per statement) is refused unread."""
    statement = request.statement
    if "statement_limit" not in statement.flags:
        return None
    # dbward wrote this message from numbers and a setting name: nothing from the client.
    return Decision(
        Verdict.DENY,
        reason=f"dbward: {statement.error}",
        rule="guard.statement_limit",
        sqlstate=PROGRAM_LIMIT_EXCEEDED,
    )


# Names of prepared statements, portals and cursors are keys of dbward's maps and of
# PostgreSQL's: where PostgreSQL would take two names for one (it cuts names to NAMEDATALEN - 1
# bytes of the server's encoding, after converting from the client's) dbward would not, and
# could decide and record one statement while PostgreSQL runs another. The relay and the
# classifier flag such names; these refusals say why (nothing quoted from the client).
_DENY_NAME_TOO_LONG: Final = Decision(
    Verdict.DENY,
    reason=(
        "dbward: names of prepared statements, portals and cursors are limited to 63 bytes "
        "(PostgreSQL cuts a longer one to 63 bytes, so two names could mean one statement)"
    ),
    rule="guard.name_limit",
    sqlstate=NAME_TOO_LONG,
)
_DENY_NAME_NOT_ASCII: Final = Decision(
    Verdict.DENY,
    reason=(
        "dbward: names of prepared statements and portals must be ASCII, as must SQL names of "
        "prepared statements and cursors unless the session and the server both use UTF8 "
        "(PostgreSQL compares them converted to the server's encoding)"
    ),
    rule="guard.name_limit",
    sqlstate=INVALID_NAME,
)


def guard_name_limit(request: PolicyRequest) -> Decision | None:
    """A statement, portal or cursor name PostgreSQL might read as another name: fail closed."""
    flags = request.statement.flags
    if "name_too_long" in flags:
        return _DENY_NAME_TOO_LONG
    if "name_not_ascii" in flags:
        return _DENY_NAME_NOT_ASCII
    return None


_UNINSPECTED: Final = frozenset({"uninspected_portal", "uninspected_statement"})


def guard_unparseable(request: PolicyRequest) -> Decision | None:
    """What the real grammar cannot read cannot be checked: fail closed."""
    statement = request.statement
    if statement.kind is not StatementKind.UNKNOWN:
        return None
    if statement.error is None and "parse_error" not in statement.flags:
        detail = f"unrecognised statement type {statement.command}"
    else:
        detail = parser_error_snippet(statement.error)
    if statement.flags & _UNINSPECTED:
        # A portal or prepared statement dbward never saw defined (Bind/Execute, or SQL
        # EXECUTE of one): what it runs was never there to parse.
        return _deny(
            "guard.unparseable",
            f"dbward: statement could not be inspected and is refused ({detail})",
        )
    return _deny(
        "guard.unparseable", f"dbward: statement could not be parsed and is refused ({detail})"
    )


def guard_role_switch(request: PolicyRequest) -> Decision | None:
    """SET ROLE / SESSION AUTHORIZATION / set_config('role') would escape the proxied identity."""
    flags = request.statement.flags
    if "role_switch" in flags:
        command = request.statement.command
        decision = _ROLE_DENIALS.get(command)
        if decision is None:
            decision = _deny(
                "guard.role_switch",
                "dbward: changing role or session authorization is not allowed "
                f"({_command_label(command)})",
            )
            if len(_ROLE_DENIALS) < 64:  # command names come from a closed set; bound anyway
                _ROLE_DENIALS[command] = decision
        return decision
    if "set_config_role" in flags:
        return _DENY_SET_CONFIG_ROLE
    return None


# Keywords that name the role dbward logs in as (or every role) in a role statement.
_SERVICE_ROLE_KEYWORDS: Final = frozenset(
    {"CURRENT_USER", "SESSION_USER", "CURRENT_ROLE", "ALL", "PUBLIC"}
)
_DENY_SERVICE_ROLE: Final = _deny(
    "guard.service_role",
    "dbward: changing the role dbward connects as (its password, attributes, settings, name or "
    "memberships) is not allowed: every session through dbward uses it",
)


# PostgreSQL's NAMEDATALEN - 1: it cuts longer names (the startup packet's user name too).
_MAX_NAME_BYTES: Final = 63


def _logged_in_as(user: str) -> str:
    """The role PostgreSQL logs `upstream.user` in as: cut to 63 bytes, as it cuts every name
    (the parser too, so a statement naming the role at any length reads the same)."""
    raw = user.encode("utf-8")
    if len(raw) <= _MAX_NAME_BYTES:
        return user
    return raw[:_MAX_NAME_BYTES].decode("utf-8", "ignore")


def guard_service_role(request: PolicyRequest) -> Decision | None:
    """ALTER/DROP/RENAME of the shared service role, or memberships given to it, would lock
    every user out (a new password) or change what every session may do."""
    statement = request.statement
    if "changes_role" not in statement.flags:
        return None
    service = request.session.service_role
    recorded_service = recorded_name(_logged_in_as(service)) if service else None
    for role in statement.roles:
        if role in _SERVICE_ROLE_KEYWORDS or role == recorded_service:
            return _DENY_SERVICE_ROLE
    return None


def guard_copy_program(request: PolicyRequest) -> Decision | None:
    """COPY ... PROGRAM runs a shell command on the database server."""
    return _DENY_COPY_PROGRAM if "copy_program" in request.statement.flags else None


def guard_copy_file(request: PolicyRequest) -> Decision | None:
    """COPY to/from a server-side file reads or writes the database host's filesystem."""
    return _DENY_COPY_FILE if "copy_file" in request.statement.flags else None


def guard_server_file_function(request: PolicyRequest) -> Decision | None:
    """pg_read_file, lo_import/lo_export ... reach the database host's filesystem like COPY."""
    statement = request.statement
    if "server_file_function" not in statement.flags:
        return None
    names = sorted(
        {f.rsplit(".", 1)[-1] for f in statement.functions} & SERVER_FILE_FUNCTIONS
    )  # from a closed set: safe to show
    return _deny(
        "guard.server_file",
        "dbward: functions that read or write files on the database server are not allowed"
        f" ({', '.join(names) or 'server file function'})",
    )


_DENY_DYNAMIC_SQL: Final = _deny(
    "guard.dynamic_sql",
    "dbward: SQL run from text (a function body, PL/pgSQL EXECUTE, query_to_xml, ts_stat, "
    "crosstab, ...) and the table table_to_xml exports must be constants that parse, so they "
    "can be checked; this one is computed at run time (schema_to_xml and database_to_xml "
    "always are) or does not parse",
)


def guard_dynamic_sql(request: PolicyRequest) -> Decision | None:
    """SQL run by a function from text that is not a constant cannot be checked: fail closed."""
    return _DENY_DYNAMIC_SQL if "dynamic_sql" in request.statement.flags else None


_DENY_UNINSPECTABLE_CODE: Final = _deny(
    "guard.uninspectable_code",
    "dbward: functions and DO blocks are allowed in SQL and PL/pgSQL only, with a body dbward "
    "can read (this one is in another language, such as C, internal or PL/Python, or its "
    "PL/pgSQL does not compile)",
)


def guard_uninspectable_code(request: PolicyRequest) -> Decision | None:
    """Code dbward cannot read could do anything the guards refuse: fail closed."""
    return _DENY_UNINSPECTABLE_CODE if "uninspectable_code" in request.statement.flags else None


_DENY_STRING_SYNTAX: Final = _deny(
    "guard.string_syntax",
    "dbward: standard_conforming_strings and backslash_quote cannot be changed from their "
    "defaults: statements would then read differently from how dbward checks them",
)


def guard_string_syntax(request: PolicyRequest) -> Decision | None:
    """Turning standard_conforming_strings off would make SQL read past the parser."""
    return _DENY_STRING_SYNTAX if "string_syntax" in request.statement.flags else None


_ROLE_DENIALS: dict[str, Decision] = {}


def _command_label(command: str) -> str:
    """A fixed label for the role-switching command, never the statement's own text."""
    if command in ("SET", "RESET"):
        return f"{command} ROLE / SESSION AUTHORIZATION"
    return command


# Built-in guards: always on, evaluated in order, first denial wins. They cannot be configured off.
GUARDS: Final[tuple[Guard, ...]] = (
    guard_function_call,
    guard_statement_limit,
    guard_name_limit,  # before guard_unparseable: a refused name stands for what it runs
    guard_unparseable,
    guard_role_switch,
    guard_service_role,
    guard_copy_program,
    guard_copy_file,
    guard_server_file_function,
    guard_dynamic_sql,
    guard_uninspectable_code,
    guard_string_syntax,
)

# Extension point: configured rules (the future rule language compiles to Guard callables here),
# evaluated after the guards in order, first decision wins. Empty in this release: allow-all.
RULES: tuple[Guard, ...] = ()

# Flags that can make some guard fire; a statement with none of them skips the guard loop.
_GUARD_FLAGS: Final = frozenset(
    {
        "function_call",
        "statement_limit",
        "parse_error",
        "copy_program",
        "copy_file",
        "server_file_function",
        "dynamic_sql",
        "uninspectable_code",
        "string_syntax",
        "changes_role",
        "name_too_long",
        "name_not_ascii",
        *_ROLE_FLAGS,
    }
)
_UNKNOWN: Final = StatementKind.UNKNOWN
_FUNCTION_CALL: Final = ProtocolPath.FUNCTION_CALL


def decide(request: PolicyRequest) -> Decision:
    """Decide one statement. Pure: depends only on ``request``; never performs I/O."""
    statement = request.statement
    if (
        statement.kind is _UNKNOWN
        or request.path is _FUNCTION_CALL
        or not _GUARD_FLAGS.isdisjoint(statement.flags)
    ):
        for guard in GUARDS:
            decision = guard(request)
            if decision is not None:
                return decision
    for rule in RULES:
        decision = rule(request)
        if decision is not None:
            return decision
    return ALLOW
