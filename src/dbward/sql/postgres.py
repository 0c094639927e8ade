"""PostgreSQL statement classifier: libpg_query's JSON parse tree walked into Statement values."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final

from pglast import parser as _pg_parser

from dbward.core.types import DEFAULT_MAX_STATEMENTS, Statement, StatementKind
from dbward.sql.plpgsql import name_was_cut, read_plpgsql

__all__ = [
    "PostgresClassifier",
    "function_call_statement",
    "oversized_statement",
    "unparseable_statement",
]

_READ: Final = StatementKind.READ
_WRITE: Final = StatementKind.WRITE
_DDL: Final = StatementKind.DDL
_DCL: Final = StatementKind.DCL
_ADMIN: Final = StatementKind.ADMIN
_TXN: Final = StatementKind.TRANSACTION
_SESSION: Final = StatementKind.SESSION
_UNKNOWN: Final = StatementKind.UNKNOWN

_EMPTY: Final[frozenset[str]] = frozenset()

# Texts longer than this are classified but never cached: a few huge strings must not pin memory.
_MAX_CACHED_TEXT: Final = 16_384
# What each of the two caches may hold, in (estimated) bytes, besides its count of entries: 10,000
# distinct 16 KB texts of 1,800 statements each pinned 3.7 GB (~370 KB an entry), 10,000
# single 16 KB statements ~700 MB. An entry is estimated at four times its text (the key, the
# statements' text, the normalized text) plus 200 bytes per statement.
_CACHE_BYTES: Final = 64 * 1024 * 1024
_BYTES_PER_CHAR: Final = 4
_BYTES_PER_STATEMENT: Final = 200

# Texts at least this long are parsed with the cyclic garbage collector paused (see _classify).
_GC_PAUSE_MIN_TEXT: Final = 4_096

# PostgreSQL's scanner matches a whole run of operator characters, then gives back all but the
# token it keeps (a "+" of "++++", the "/*" opening a comment, also a nested one) and reads the
# rest again: a run of n such tokens costs n times the run. 64 KB of "/*" kept the event loop
# busy for 8.7 s (parse and normalize), and a 16 MB one would keep a classifier worker busy
# for days. `lexer_cost` estimates those re-reads (about 2-3 ns each per scan): text above
# LEXER_COST_INLINE_MAX is classified in the worker pool, text above _LEXER_COST_MAX is refused
# unscanned (a run of ~16,000 "+" characters).
_OPERATOR_RUN: Final = re.compile(r"[~!@#^&|`?+\-*/%<>=]{64,}")
_LONE_DASH: Final = re.compile(r"(?<!-)-(?!-)")  # "--" starts a comment, read once
LEXER_COST_INLINE_MAX: Final = 1 << 21
_LEXER_COST_MAX: Final = 1 << 28


def lexer_cost(text: str) -> int:
    """Estimated characters PostgreSQL's scanner reads again in `text`'s operator-character runs.

    Runs shorter than 64 characters are not counted (at most 64 re-reads each: linear). A run
    counts its length once per token the scanner may cut from it: each "/*", "+" and lone "-".
    Runs inside literals count too (the scanner reads those once, so this over-estimates them).
    """
    if len(text) < 64:
        return 0  # no run to count (most statements: this is on every classification)
    total = 0
    for match in _OPERATOR_RUN.finditer(text):
        run = match.group()
        cuts = run.count("/*") + run.count("+")
        if "-" in run:
            cuts += len(_LONE_DASH.findall(run))
        total += len(run) * cuts
    return total


# --- the only place pglast (untyped at this boundary) is touched ------------------------------


class _ParseError(Exception):
    """The parser rejected the text; ``message`` is the parser's own message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _parse_tree(text: str) -> tuple[list[dict[str, Any]], bool]:
    """Parse ``text`` into libpg_query's raw statement list (JSON form, plain dicts).

    Also returns whether any WITH clause may occur (a cheap over-approximation on the JSON text:
    a string constant mentioning "withClause" only costs the slower, still correct, walk).
    """
    if "\x00" in text:
        # libpg_query reads a C string: everything after a NUL would be invisible to it.
        raise _ParseError("NUL character in statement text")
    try:
        raw: str = _pg_parser.parse_sql_json(text)
    except _pg_parser.ParseError as exc:
        message = exc.args[0] if exc.args else "syntax error"
        location = exc.args[1] if len(exc.args) > 1 else None
        suffix = f", at index {location}" if isinstance(location, int) else ""
        raise _ParseError(f"{message}{suffix}") from None
    except UnicodeError:
        raise _ParseError("statement text is not valid UTF-8") from None
    except Exception as exc:  # the C extension may raise anything on hostile input
        raise _ParseError(f"parser failure: {type(exc).__name__}") from None
    stmts: list[dict[str, Any]] = _loads_tree(raw)["stmts"]
    return stmts, '"withClause"' in raw


# Python's json decoder recurses once per level of nesting and stops at the interpreter's
# recursion limit (1,000), but PostgreSQL's grammar nests far deeper: a UNION ALL of 981
# SELECTs (a reporting tool's generated query) was refused as a classifier failure. The C
# decoder takes ~140 bytes of C stack per level (measured: 1 MB held ~7,500), so this limit
# needs ~1.4 MB of the 8 MB a Linux main thread has, where classification runs (the event
# loop's thread, or a classifier worker's).
_DEEP_TREE_RECURSION_LIMIT: Final = 10_000


def _loads_tree(raw: str) -> Any:
    """libpg_query's JSON as Python objects, however deep its tree (to a limit)."""
    try:
        return json.loads(raw)
    except RecursionError:
        pass
    # Only for the rare tree deeper than the interpreter allows: the normal path is untouched.
    limit = sys.getrecursionlimit()
    if limit >= _DEEP_TREE_RECURSION_LIMIT:
        raise RecursionError("parse tree nested too deeply")
    sys.setrecursionlimit(_DEEP_TREE_RECURSION_LIMIT)
    try:
        return json.loads(raw)
    finally:
        sys.setrecursionlimit(limit)


def _normalize(text: str) -> str | None:
    """Return libpg_query's constants-replaced form of ``text``, or None when it cannot."""
    try:
        result: str = _pg_parser.normalize(text)
    except Exception:  # not parseable, bad UTF-8 ...: the full path reports the error
        return None
    return result


# --- statement kinds and command names --------------------------------------------------------

# Node types whose kind and command never depend on their fields.
_SIMPLE: Final[dict[str, tuple[StatementKind, str]]] = {
    "InsertStmt": (_WRITE, "INSERT"),
    "UpdateStmt": (_WRITE, "UPDATE"),
    "DeleteStmt": (_WRITE, "DELETE"),
    "MergeStmt": (_WRITE, "MERGE"),
    "CallStmt": (_WRITE, "CALL"),  # a procedure may do anything: never treat it as a read
    "LockStmt": (_WRITE, "LOCK TABLE"),  # strong locks block other sessions: not a read
    "RefreshMatViewStmt": (_WRITE, "REFRESH MATERIALIZED VIEW"),
    "VariableShowStmt": (_READ, "SHOW"),
    # TRUNCATE removes data but, like DROP, is not row-level DML (no triggers per row, no WHERE):
    # grouped with DDL so that a read/write grant does not cover it.
    "TruncateStmt": (_DDL, "TRUNCATE"),
    "CreateStmt": (_DDL, "CREATE TABLE"),
    "CreateForeignTableStmt": (_DDL, "CREATE FOREIGN TABLE"),
    "IndexStmt": (_DDL, "CREATE INDEX"),
    "ViewStmt": (_DDL, "CREATE VIEW"),
    "RuleStmt": (_DDL, "CREATE RULE"),
    "CreateSchemaStmt": (_DDL, "CREATE SCHEMA"),
    "CreateSeqStmt": (_DDL, "CREATE SEQUENCE"),
    "AlterSeqStmt": (_DDL, "ALTER SEQUENCE"),
    "CreateDomainStmt": (_DDL, "CREATE DOMAIN"),
    "AlterDomainStmt": (_DDL, "ALTER DOMAIN"),
    "CompositeTypeStmt": (_DDL, "CREATE TYPE"),
    "CreateEnumStmt": (_DDL, "CREATE TYPE"),
    "CreateRangeStmt": (_DDL, "CREATE TYPE"),
    "AlterEnumStmt": (_DDL, "ALTER TYPE"),
    "AlterTypeStmt": (_DDL, "ALTER TYPE"),
    "CreateExtensionStmt": (_DDL, "CREATE EXTENSION"),
    "AlterExtensionStmt": (_DDL, "ALTER EXTENSION"),
    "AlterExtensionContentsStmt": (_DDL, "ALTER EXTENSION"),
    "CreatedbStmt": (_DDL, "CREATE DATABASE"),
    "AlterDatabaseStmt": (_DDL, "ALTER DATABASE"),
    "AlterDatabaseSetStmt": (_DDL, "ALTER DATABASE"),
    "AlterDatabaseRefreshCollStmt": (_DDL, "ALTER DATABASE"),
    "DropdbStmt": (_DDL, "DROP DATABASE"),
    "CreateTableSpaceStmt": (_DDL, "CREATE TABLESPACE"),
    "DropTableSpaceStmt": (_DDL, "DROP TABLESPACE"),
    "AlterTableSpaceOptionsStmt": (_DDL, "ALTER TABLESPACE"),
    "AlterTableMoveAllStmt": (_DDL, "ALTER TABLE"),
    "CreateTrigStmt": (_DDL, "CREATE TRIGGER"),
    "CreateEventTrigStmt": (_DDL, "CREATE EVENT TRIGGER"),
    "AlterEventTrigStmt": (_DDL, "ALTER EVENT TRIGGER"),
    "CreatePLangStmt": (_DDL, "CREATE LANGUAGE"),
    "CreateCastStmt": (_DDL, "CREATE CAST"),
    "CreateConversionStmt": (_DDL, "CREATE CONVERSION"),
    "CreateTransformStmt": (_DDL, "CREATE TRANSFORM"),
    "CreateAmStmt": (_DDL, "CREATE ACCESS METHOD"),
    "CreateOpClassStmt": (_DDL, "CREATE OPERATOR CLASS"),
    "CreateOpFamilyStmt": (_DDL, "CREATE OPERATOR FAMILY"),
    "AlterOpFamilyStmt": (_DDL, "ALTER OPERATOR FAMILY"),
    "AlterOperatorStmt": (_DDL, "ALTER OPERATOR"),
    "CreateFdwStmt": (_DDL, "CREATE FOREIGN DATA WRAPPER"),
    "AlterFdwStmt": (_DDL, "ALTER FOREIGN DATA WRAPPER"),
    "CreateForeignServerStmt": (_DDL, "CREATE SERVER"),
    "AlterForeignServerStmt": (_DDL, "ALTER SERVER"),
    "CreateUserMappingStmt": (_DDL, "CREATE USER MAPPING"),
    "AlterUserMappingStmt": (_DDL, "ALTER USER MAPPING"),
    "DropUserMappingStmt": (_DDL, "DROP USER MAPPING"),
    "ImportForeignSchemaStmt": (_DDL, "IMPORT FOREIGN SCHEMA"),
    "CreatePolicyStmt": (_DDL, "CREATE POLICY"),
    "AlterPolicyStmt": (_DDL, "ALTER POLICY"),
    "CreatePublicationStmt": (_DDL, "CREATE PUBLICATION"),
    "AlterPublicationStmt": (_DDL, "ALTER PUBLICATION"),
    "CreateSubscriptionStmt": (_DDL, "CREATE SUBSCRIPTION"),
    "AlterSubscriptionStmt": (_DDL, "ALTER SUBSCRIPTION"),
    "DropSubscriptionStmt": (_DDL, "DROP SUBSCRIPTION"),
    "CreateStatsStmt": (_DDL, "CREATE STATISTICS"),
    "AlterStatsStmt": (_DDL, "ALTER STATISTICS"),
    "AlterCollationStmt": (_DDL, "ALTER COLLATION"),
    "AlterTSConfigurationStmt": (_DDL, "ALTER TEXT SEARCH CONFIGURATION"),
    "AlterTSDictionaryStmt": (_DDL, "ALTER TEXT SEARCH DICTIONARY"),
    "ReplicaIdentityStmt": (_DDL, "ALTER TABLE"),
    "CommentStmt": (_DDL, "COMMENT"),
    "AlterRoleStmt": (_DCL, "ALTER ROLE"),
    "AlterRoleSetStmt": (_DCL, "ALTER ROLE"),
    "DropRoleStmt": (_DCL, "DROP ROLE"),
    "AlterDefaultPrivilegesStmt": (_DCL, "ALTER DEFAULT PRIVILEGES"),
    "ReassignOwnedStmt": (_DCL, "REASSIGN OWNED"),
    "DropOwnedStmt": (_DCL, "DROP OWNED"),
    "SecLabelStmt": (_DCL, "SECURITY LABEL"),
    "ClusterStmt": (_ADMIN, "CLUSTER"),
    "ReindexStmt": (_ADMIN, "REINDEX"),
    "CheckPointStmt": (_ADMIN, "CHECKPOINT"),
    "LoadStmt": (_ADMIN, "LOAD"),
    "AlterSystemStmt": (_ADMIN, "ALTER SYSTEM"),
    "DoStmt": (_ADMIN, "DO"),
    "ConstraintsSetStmt": (_TXN, "SET CONSTRAINTS"),
    "ListenStmt": (_SESSION, "LISTEN"),
    "UnlistenStmt": (_SESSION, "UNLISTEN"),
    "NotifyStmt": (_SESSION, "NOTIFY"),
    "PrepareStmt": (_SESSION, "PREPARE"),
    "ExecuteStmt": (_SESSION, "EXECUTE"),
    "DeallocateStmt": (_SESSION, "DEALLOCATE"),
    "ClosePortalStmt": (_SESSION, "CLOSE"),
    "DiscardStmt": (_SESSION, "DISCARD"),
}

_OBJECT_NAMES: Final[dict[str, str]] = {
    "OBJECT_MATVIEW": "MATERIALIZED VIEW",
    "OBJECT_FOREIGN_TABLE": "FOREIGN TABLE",
    "OBJECT_FDW": "FOREIGN DATA WRAPPER",
    "OBJECT_FOREIGN_SERVER": "SERVER",
    "OBJECT_TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "OBJECT_TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "OBJECT_TSPARSER": "TEXT SEARCH PARSER",
    "OBJECT_TSTEMPLATE": "TEXT SEARCH TEMPLATE",
    "OBJECT_OPCLASS": "OPERATOR CLASS",
    "OBJECT_OPFAMILY": "OPERATOR FAMILY",
    "OBJECT_ACCESS_METHOD": "ACCESS METHOD",
    "OBJECT_EVENT_TRIGGER": "EVENT TRIGGER",
    "OBJECT_STATISTIC_EXT": "STATISTICS",
    "OBJECT_TABCONSTRAINT": "CONSTRAINT",
    "OBJECT_DOMCONSTRAINT": "CONSTRAINT",
    "OBJECT_ATTRIBUTE": "ATTRIBUTE",
    "OBJECT_LARGEOBJECT": "LARGE OBJECT",
}

# DROP/COMMENT targets of these object types are relations: they belong in Statement.tables.
_RELATION_OBJECTS: Final = frozenset(
    {
        "OBJECT_TABLE",
        "OBJECT_VIEW",
        "OBJECT_MATVIEW",
        "OBJECT_SEQUENCE",
        "OBJECT_FOREIGN_TABLE",
        "OBJECT_INDEX",
    }
)

_TRANSACTION_COMMANDS: Final[dict[str, str]] = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO SAVEPOINT",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

_ROLE_GUCS: Final = frozenset({"role", "session_authorization"})
_FALSE_WORDS: Final = frozenset({"false", "off"})
_DML: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# Only these top-level node types may share a classification through the constants-blind cache.
_SHAREABLE: Final = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


def _object_name(objtype: str | None) -> str:
    """'OBJECT_FOREIGN_TABLE' -> 'FOREIGN TABLE'."""
    if not objtype:
        return "OBJECT"
    return _OBJECT_NAMES.get(objtype) or objtype.removeprefix("OBJECT_").replace("_", " ")


def _node_type(node: dict[str, Any]) -> str:
    """The type name of a wrapped node ({"SelectStmt": {...}} -> "SelectStmt")."""
    for key in node:
        return key
    return ""


def _explain_analyzes(body: dict[str, Any]) -> bool:
    """True unless every ANALYZE option of an EXPLAIN is explicitly false."""
    analyze = False
    for option in body.get("options", ()):
        elem = option.get("DefElem", {})
        if elem.get("defname") != "analyze":
            continue
        arg = elem.get("arg")
        if arg is None:
            analyze = True
            continue
        kind = _node_type(arg)
        value = arg[kind]
        if kind == "String":
            analyze = str(value.get("sval", "")).lower() not in _FALSE_WORDS
        elif kind == "Integer":
            analyze = value.get("ival", 0) != 0
        elif kind == "Boolean":
            analyze = bool(value.get("boolval", False))
        else:  # anything else the server would reject or interpret: assume it executes
            analyze = True
    return analyze


def _head(
    node_type: str, body: dict[str, Any], dm_cte: bool
) -> tuple[StatementKind, str, set[str]]:
    """Kind, command and statement-level flags of one top-level parse node."""
    simple = _SIMPLE.get(node_type)
    if simple is not None:
        kind, command = simple
        flags: set[str] = set()
        if node_type == "DoStmt":
            flags.add("anonymous_code")
        elif node_type == "DiscardStmt":
            target = body.get("target", "")
            command = "DISCARD " + str(target).removeprefix("DISCARD_")
            # DISCARD ALL also resets the session authorization, but only back to the
            # service user dbward logged in as (role switching is refused, so it never left
            # it); connection pools (Npgsql, pgpool) send it on every return: allowed.
        return kind, command, flags
    if node_type == "SelectStmt":
        if "intoClause" in body:
            # SELECT INTO creates a table exactly like CREATE TABLE AS: same kind, same flag.
            return _DDL, "SELECT INTO", {"select_into"}
        if dm_cte:
            return _WRITE, "SELECT", set()
        return _READ, ("VALUES" if "valuesLists" in body else "SELECT"), set()
    if node_type == "ExplainStmt":
        inner = body.get("query", {})
        inner_type = _node_type(inner)
        inner_kind, _, inner_flags = _head(inner_type, inner.get(inner_type, {}), dm_cte)
        if not _explain_analyzes(body):
            return _READ, "EXPLAIN", set()  # plain EXPLAIN plans but never executes
        if inner_kind is _READ:
            return _READ, "EXPLAIN", set()
        inner_flags.add("explain_analyze_write")
        return inner_kind, "EXPLAIN", inner_flags
    if node_type == "DeclareCursorStmt":
        inner = body.get("query", {})
        inner_type = _node_type(inner)
        inner_kind, _, inner_flags = _head(inner_type, inner.get(inner_type, {}), dm_cte)
        return inner_kind, "DECLARE CURSOR", inner_flags
    if node_type == "FetchStmt":
        return _READ, ("MOVE" if body.get("ismove") else "FETCH"), set()
    if node_type == "CopyStmt":
        return _copy_head(body, dm_cte)
    if node_type == "VariableSetStmt":
        return _set_head(body)
    if node_type == "TransactionStmt":
        return _TXN, _TRANSACTION_COMMANDS.get(body.get("kind", ""), "TRANSACTION"), set()
    if node_type == "CreateTableAsStmt":
        if body.get("is_select_into"):
            return _DDL, "SELECT INTO", {"select_into"}
        objtype = body.get("objtype", "OBJECT_TABLE")
        if objtype == "OBJECT_TABLE":
            return _DDL, "CREATE TABLE AS", {"select_into"}
        return _DDL, "CREATE " + _object_name(objtype), set()
    if node_type == "DropStmt":
        return _DDL, "DROP " + _object_name(body.get("removeType")), set()
    if node_type == "AlterTableStmt":
        return _DDL, "ALTER " + _object_name(body.get("objtype")), set()
    if node_type == "RenameStmt":
        return _DDL, "ALTER " + _object_name(body.get("renameType")), set()
    if node_type == "AlterObjectSchemaStmt":
        return _DDL, "ALTER " + _object_name(body.get("objectType")), set()
    if node_type == "AlterObjectDependsStmt":
        return _DDL, "ALTER " + _object_name(body.get("objectType")), set()
    if node_type == "AlterOwnerStmt":
        return _DCL, "ALTER " + _object_name(body.get("objectType")), set()
    if node_type == "DefineStmt":
        return _DDL, "CREATE " + _object_name(body.get("kind")), set()
    if node_type == "CreateFunctionStmt":
        return _DDL, ("CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"), set()
    if node_type == "AlterFunctionStmt":
        return _DDL, "ALTER " + _object_name(body.get("objtype")), set()
    if node_type == "GrantStmt":
        return _DCL, ("GRANT" if body.get("is_grant") else "REVOKE"), set()
    if node_type == "GrantRoleStmt":
        return _DCL, ("GRANT" if body.get("is_grant") else "REVOKE"), set()
    if node_type == "CreateRoleStmt":
        stmt_type = str(body.get("stmt_type", "ROLESTMT_ROLE"))
        return _DCL, "CREATE " + stmt_type.removeprefix("ROLESTMT_"), set()
    if node_type == "VacuumStmt":
        return _ADMIN, ("VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"), set()
    return _UNKNOWN, node_type.removesuffix("Stmt").upper() or "UNKNOWN", set()


def _copy_head(body: dict[str, Any], dm_cte: bool) -> tuple[StatementKind, str, set[str]]:
    """COPY: direction decides read/write; PROGRAM and server-side files are flagged."""
    is_from = bool(body.get("is_from"))
    # COPY (DELETE ... RETURNING ...) TO STDOUT modifies data although it copies "out".
    modifies = is_from or dm_cte or _node_type(body.get("query", {})) in _DML
    flags: set[str] = set()
    if body.get("is_program"):
        flags.add("copy_program")
    elif body.get("filename") is not None:
        flags.add("copy_file")
    else:
        flags.add("copy_from_stdin" if is_from else "copy_to_stdout")
    return (_WRITE if modifies else _READ), "COPY", flags


def _set_head(body: dict[str, Any]) -> tuple[StatementKind, str, set[str]]:
    """SET / RESET / SET TRANSACTION; role switching flagged by _Walker, not here."""
    kind = body.get("kind", "")
    if kind == "VAR_SET_MULTI":
        name = body.get("name", "")
        if name.startswith("TRANSACTION") or name == "SESSION CHARACTERISTICS":
            return _TXN, "SET TRANSACTION", set()
        return _SESSION, "SET", set()
    if kind in ("VAR_RESET", "VAR_RESET_ALL"):
        return _SESSION, "RESET", set()
    return _SESSION, "SET", set()


# --- the tree walk ----------------------------------------------------------------------------


# A name PostgreSQL's quote_ident leaves bare; any other is recorded double-quoted, so a table
# `"s.t"` (one name with a dot) is not schema s's table t, and `*` can mean every table.
_PLAIN_NAME: Final = re.compile(r"[a-z_][a-z0-9_]*\Z")


def recorded_name(name: str) -> str:
    """One name part as recorded: bare when plain, else double-quoted ("" for a quote)."""
    if _PLAIN_NAME.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _dotted(parts: Iterable[str]) -> str:
    """catalog.schema.name (as many parts as there are), each part as recorded_name writes it."""
    return ".".join(recorded_name(part) for part in parts)


def _qualified(rv: dict[str, Any]) -> str:
    """[catalog.][schema.]name as written (the parser already folded unquoted identifiers)."""
    name: str = rv.get("relname", "")
    schema = rv.get("schemaname")
    if schema:
        catalog = rv.get("catalogname")
        return _dotted((catalog, schema, name) if catalog else (schema, name))
    return recorded_name(name)


def _strings(items: list[dict[str, Any]]) -> str:
    """Join a list of String nodes with dots ([a, b] -> "a.b")."""
    return ".".join(str(item.get("String", {}).get("sval", "")) for item in items)


# Casts a constant may carry and still be read as written: only the built-in string types,
# named with their schema (a bare `text` may resolve to another type through search_path, and
# a cast to a user-defined type runs a user-defined function that can return anything).
_PLAIN_STRING_TYPES: Final = frozenset({"text", "varchar", "bpchar", "name"})


def _constant_text(node: dict[str, Any]) -> str | None:
    """The string value of a string constant (cast at most to pg_catalog's string types)."""
    while True:
        cast = node.get("TypeCast")
        if cast is None:
            break
        names = [
            str(n.get("String", {}).get("sval", ""))
            for n in cast.get("typeName", {}).get("names", ())
        ]
        if len(names) != 2 or names[0] != "pg_catalog" or names[1] not in _PLAIN_STRING_TYPES:
            return None
        node = cast.get("arg", {})
    const = node.get("A_Const")
    if const is None or "sval" not in const:
        return None
    return str(const["sval"].get("sval", ""))


_NO_SCOPE: Final[frozenset[str]] = frozenset()

# Dispatch codes for the keys the walk reacts to; every other key is just descended into.
(
    _RANGE_VAR,
    _RELATION_FIELD,
    _FUNC_CALL,
    _VAR_SET,
    _UPDATE,
    _DELETE,
    _SKIP,
    _DEF_ELEM,
    _FUNC_REF,
    _OPCLASS_ITEM,
    _FIELD_SELECTION,
) = range(11)
_KEY_CODES: Final[dict[str, int]] = {
    "RangeVar": _RANGE_VAR,
    # Fields typed RangeVar* are emitted bare (not wrapped) by libpg_query.
    **dict.fromkeys(
        (
            "relation",
            "rel",
            "table",
            "sequence",
            "identitySequence",
            "typevar",
            "pktable",
            "constrrel",
            "view",
            "name",
        ),
        _RELATION_FIELD,
    ),
    "FuncCall": _FUNC_CALL,
    "funccall": _FUNC_CALL,  # CallStmt's bare FuncCall
    "VariableSetStmt": _VAR_SET,
    "setstmt": _VAR_SET,  # ALTER ROLE / DATABASE / SYSTEM ... SET
    "UpdateStmt": _UPDATE,
    "DeleteStmt": _DELETE,
    "withClause": _SKIP,  # entered before the node's fields, with its scoping rules
    # libpg_query's normalize() locates DefElem arguments by scanning the text for a quote or
    # "$", not from the tree: never share a classification through it when one is present.
    "DefElem": _DEF_ELEM,
    # DDL that names a function without calling it, making it callable under another name:
    # CREATE CAST ... WITH FUNCTION, CREATE TRANSFORM, operator class support functions.
    **dict.fromkeys(("func", "fromsql", "tosql"), _FUNC_REF),
    "CreateOpClassItem": _OPCLASS_ITEM,
    # `t.f` and `(x).f` call f(t) / f(x) when f is not a column: a call with no FuncCall node.
    **dict.fromkeys(("ColumnRef", "A_Indirection"), _FIELD_SELECTION),
    # Leaves that can hold no relation, function or statement: not worth visiting.
    **dict.fromkeys(
        ("A_Const", "String", "Integer", "Float", "Boolean", "BitString", "A_Star"),
        _SKIP,
    ),
    "ParamRef": _SKIP,
}


# DefElem options (CREATE AGGREGATE / OPERATOR / TYPE / ...) whose value names a function that
# a later, innocent-looking call runs: `CREATE AGGREGATE a(...) (sfunc = set_config, ...)`.
_FUNCTION_OPTIONS: Final = frozenset(
    {
        "sfunc",
        "finalfunc",
        "combinefunc",
        "serialfunc",
        "deserialfunc",
        "msfunc",
        "minvfunc",
        "mfinalfunc",
        "function",
        "procedure",
        "restrict",
        "join",
        "subtype_diff",
        "canonical",
        "input",
        "output",
        "receive",
        "send",
        "typmod_in",
        "typmod_out",
        "analyze",
        "subscript",
        "handler",
        "validator",
        "inline",
    }
)
# Foreign-table options of file_fdw that read a server file or run a server program.
_FILE_FDW_OPTIONS: Final = {"program": "copy_program", "filename": "copy_file"}

# Option names whose value is a credential: such statements are never logged verbatim.
_SECRET_OPTIONS = frozenset({"password", "passfile", "sslpassword", "sslkey"})

# Functions whose arguments may be a libpq connection string (dblink's), or SQL that runs on
# another server (an ALTER ROLE ... PASSWORD sent there is a password in the log here too):
# listed as calls, and never shared through the template cache (whether the text holds a
# credential depends on its constants).
_CONNINFO_FUNCTIONS: Final = frozenset(
    {
        "dblink_connect",
        "dblink_connect_u",
        "dblink",
        "dblink_exec",
        "dblink_send_query",
        "dblink_open",
    }
)
# pgcrypto functions that take a password or a secret key as an argument (crypt's first, the
# pgp_sym_* passwords, pgp_pub_decrypt's private key and its password, the raw ciphers' and
# hmac's keys): a call's literals are withheld from the log like a connection string's.
_SECRET_ARGUMENT_FUNCTIONS: Final = frozenset(
    {
        "crypt",
        "pgp_sym_encrypt",
        "pgp_sym_encrypt_bytea",
        "pgp_sym_decrypt",
        "pgp_sym_decrypt_bytea",
        "pgp_pub_decrypt",
        "pgp_pub_decrypt_bytea",
        "encrypt",
        "encrypt_iv",
        "decrypt",
        "decrypt_iv",
        "hmac",
    }
)
# Built-in functions whose call changes something: a SELECT calling one is not a read. Calls to
# user-defined functions cannot be judged without the catalog (see docs/policy.md).
_ADMIN_FUNCTIONS: Final = frozenset(
    {
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_logfile_rotate",  # adminpack 1.0
        "pg_promote",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_log_backend_memory_contexts",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_wal_replay_pause",
        "pg_wal_replay_resume",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_replication_slot_advance",
        "pg_replication_origin_create",
        "pg_replication_origin_drop",
        "pg_stat_reset",
        "pg_stat_reset_shared",
        "pg_stat_reset_single_table_counters",
        "pg_stat_reset_single_function_counters",
        "pg_stat_reset_slru",
        "pg_stat_reset_replication_slot",
        "pg_stat_reset_subscription_stats",
        "pg_import_system_collations",
        # Consume a logical replication slot for good, or move replication origins.
        "pg_logical_slot_get_changes",
        "pg_logical_slot_get_binary_changes",
        "pg_logical_emit_message",
        "pg_replication_origin_advance",
        "pg_replication_origin_session_setup",
        # Index maintenance, like VACUUM.
        "brin_summarize_new_values",
        "brin_summarize_range",
        "brin_desummarize_range",
        "gin_clean_pending_list",
        # Eighteenth review. Replication origin state of the session or of the transaction
        # (xact_setup moved the origin's remote_lsn at commit on PostgreSQL 15), WAL records,
        # standby slot synchronisation, statistics resets (PostgreSQL 17-18, pg_stat_statements).
        "pg_replication_origin_session_reset",
        "pg_replication_origin_xact_setup",
        "pg_replication_origin_xact_reset",
        "pg_log_standby_snapshot",
        "pg_sync_replication_slots",
        "pg_stat_reset_backend_stats",
        "pg_stat_statements_reset",
        # Contrib modules that change tables or the server directly: pg_surgery kills or
        # freezes tuples (heap_force_kill deleted a row through a SELECT on PostgreSQL 15),
        # pg_visibility truncates a visibility map, pg_buffercache evicts buffers, pg_prewarm
        # writes its dump file and starts its worker.
        "heap_force_kill",
        "heap_force_freeze",
        "pg_truncate_visibility_map",
        "pg_buffercache_evict",
        "pg_buffercache_evict_relation",
        "pg_buffercache_evict_all",
        "autoprewarm_dump_now",
        "autoprewarm_start_worker",
        # Server files written, renamed or removed (also refused as guard.server_file).
        "lo_export",
        "pg_file_write",
        "pg_file_rename",
        "pg_file_unlink",
        "pg_file_sync",
    }
)
_WRITE_FUNCTIONS: Final = frozenset(
    {
        "nextval",
        "setval",
        "lo_create",
        "lo_creat",
        "lo_from_bytea",
        "lo_put",
        "lo_unlink",
        "lo_truncate",
        "lo_truncate64",
        "lowrite",
        "lo_import",  # a new large object from a server file (also guard.server_file)
        # dblink runs arbitrary SQL on another connection, out of dbward's sight.
        "dblink",
        "dblink_exec",
        "dblink_send_query",
        "dblink_open",
    }
)

# Functions that read, write or list files on the database server by path: the function-call
# counterparts of server-side file COPY (core, large objects, adminpack).
SERVER_FILE_FUNCTIONS: Final = frozenset(
    {
        "pg_read_file",
        "pg_read_file_old",  # adminpack 1.0's name for the same C function
        "pg_read_binary_file",
        "pg_stat_file",
        "pg_ls_dir",
        "lo_import",
        "lo_export",
        "pg_file_read",  # adminpack 1.0
        "pg_file_length",  # adminpack 1.0
        "pg_file_write",
        "pg_file_sync",
        "pg_file_rename",
        "pg_file_unlink",
        "pg_logdir_ls",
    }
)
# Functions that run SQL given to them as text, in this session and with its privileges:
# the positions of their arguments that hold SQL. That SQL is classified like the statement
# itself (its tables, functions, flags and guards count); SQL that is not a constant cannot
# be checked, so the call is flagged `dynamic_sql` and denied. Core: the XML export functions
# and full-text search's ts_stat / two-argument ts_rewrite; tablefunc: crosstab.
_SQL_TEXT_FUNCTIONS: Final[dict[str, tuple[int, ...]]] = {
    "query_to_xml": (0,),
    "query_to_xmlschema": (0,),
    "query_to_xml_and_xmlschema": (0,),
    "ts_stat": (0,),
    "crosstab": (0, 1),
    "crosstab2": (0,),
    "crosstab3": (0,),
    "crosstab4": (0,),
}
# tablefunc's connectby() and xml2's xpath_table() splice their name and criteria arguments
# into the SQL they run, unquoted: what runs cannot be known from the call (`dynamic_sql`).
# So do refint's trigger functions with the trigger's arguments (`CREATE TRIGGER ... EXECUTE
# FUNCTION check_primary_key('id', 'pk WHERE false; COPY ... TO PROGRAM ...', 'id')`).
_SQL_FRAGMENT_FUNCTIONS: Final = frozenset(
    {"connectby", "xpath_table", "check_primary_key", "check_foreign_key"}
)
# Functions given a relation as a regclass (usually a string constant, 'secret' or
# 's.t'::regclass) that read or change it: that relation is one of the statement's tables. True:
# the function reads the table's rows (the XML export of a whole table), so a relation that
# cannot be read from the call (a column, a parameter, an OID) is `dynamic_sql`, refused like
# query_to_xml of computed SQL; False: a sequence function, listed when it can be read.
_RELATION_ARGUMENT_FUNCTIONS: Final[dict[str, bool]] = {
    "table_to_xml": True,
    "table_to_xmlschema": True,
    "table_to_xml_and_xmlschema": True,
    # dblink's statement builders copy a local row's values (looked up by primary key) into
    # the SQL they return: dblink_build_sql_insert('s.secret', '1', 1, '{42}', '{0}') returned
    # the row's ssn on PostgreSQL 15.
    "dblink_build_sql_insert": True,
    "dblink_build_sql_update": True,
    "dblink_build_sql_delete": False,
    "nextval": False,
    "setval": False,
    "currval": False,
    # Contrib functions that change the relation they are given (see _ADMIN_FUNCTIONS).
    "heap_force_kill": False,
    "heap_force_freeze": False,
    "pg_truncate_visibility_map": False,
}
# The XML export of every table of a schema or of the database: no table list can say that.
_ALL_TABLES_FUNCTIONS: Final = frozenset(
    {
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
    }
)
_REGCLASS_TYPES: Final = (["regclass"], ["pg_catalog", "regclass"])
# SQL given as text inside SQL given as text ...: deeper than this is refused, not followed.
_MAX_SQL_TEXT_DEPTH: Final = 4
# A password keyword (password=, sslpassword=, PGPASSWORD ...) or a URI with user:password@.
# Checked on the statement's whole text: over-matching only withholds more of the text.
# The parts are what libpq reads as user and password: after "://", up to the first "@" or
# "/", split at the first ":"; a quote, a tab, a newline or a space is part of them ("u:it''s@h"
# in a literal, "u:it's@h" dollar-quoted: the password is it's; a recent libpq refuses a space, but
# the libpq of PostgreSQL 15, which its dblink and postgres_fdw use, reads "u:my pw@h").
# The user part excludes ":" and both parts are possessive, so the search stays linear on
# hostile text (a backtracking "[^/@]*:[^/@]*@" is quadratic on "://a:a:a:...").
# libpq percent-decodes a URI's query parameter names too, so "?pass%77ord=pw" (any letter of
# it encoded, in either case) sets the password as "?password=pw" does.
_ENCODED_PASSWORD_KEY: Final = (
    "[?&](?:"
    + "".join(f"(?:{c}|%{ord(c.upper()):x}|%{ord(c):x})" for c in "ssl")
    + ")?"
    + "".join(f"(?:{c}|%{ord(c.upper()):x}|%{ord(c):x})" for c in "password")
)
CREDENTIAL_TEXT: Final = re.compile(
    rf"password|://[^/@:]*+:[^/@]*+@|{_ENCODED_PASSWORD_KEY}", re.IGNORECASE
)
# A pgcrypto key function named anywhere in the text, also where no call of it is in the tree:
# in SQL run elsewhere (dblink_exec's, a PL/pgSQL EXECUTE's built text) or stored in a table.
_SECRET_FUNCTION_TEXT: Final = re.compile(
    r"(?<![\w$])(?:"
    + "|".join(sorted(_SECRET_ARGUMENT_FUNCTIONS, key=len, reverse=True))
    + r")(?![\w$])",
    re.IGNORECASE,
)


def names_credential(text: str) -> bool:
    """Whether `text` may hold a secret: its literals are then withheld from the log."""
    return CREDENTIAL_TEXT.search(text) is not None or (
        _SECRET_FUNCTION_TEXT.search(text) is not None
    )


def _literal_may_name_credential(text: str) -> bool:
    """names_credential(text), behind a cheap superset of it that almost every statement
    fails: "password", "crypt" or "hmac" in any case, "://" with "@", "%" with "?" or "&" (a
    percent-encoded "?pass%77ord="). Run per statement the template cache answers, so a
    column named encrypted_at costs a few substring tests, not a regex or a parse."""
    lowered = text.lower()
    return (
        ("@" in text and "://" in text)
        or "password" in lowered
        or ("%" in text and ("?" in text or "&" in text))
        or "crypt" in lowered
        or "hmac" in lowered
    ) and names_credential(text)


class _Walk:
    """Everything the walk collects from one statement's tree."""

    __slots__ = (
        "const_sensitive",
        "dm_cte",
        "flags",
        "functions",
        "inner_kind",
        "roles",
        "side_effect",
        "sql_texts",
        "tables",
    )

    def __init__(self) -> None:
        self.tables: list[tuple[int, str]] = []
        self.functions: list[tuple[int, str]] = []
        self.flags: set[str] = set()
        self.dm_cte = False
        self.const_sensitive = False
        self.side_effect: StatementKind | None = None  # ADMIN or WRITE: what its calls do
        self.sql_texts: list[str] = []  # constant SQL run by the functions it calls
        self.inner_kind: StatementKind | None = None  # of that SQL, when not a plain read
        self.roles: list[str] = []  # roles that SQL changes (see Statement.roles)


def _walk(root: dict[str, Any], has_ctes: bool = True) -> _Walk:
    """Iteratively visit every node of ``root``, collecting tables, functions and flags.

    Wrapped nodes ({"Type": {...}}) and bare typed fields ({"relation": {...relname...}}) both
    occur in libpg_query's JSON; both are handled. CTE names are tracked per scope so that a
    reference to a CTE is not reported as a table, while a real table of the same name still is;
    ``has_ctes`` False (no WITH anywhere in the parse) skips that bookkeeping.
    """
    out = _Walk()
    tables = out.tables
    codes = _KEY_CODES
    stack: list[Any] = [root]
    pop = stack.pop
    push = stack.append
    # Scope of CTE names visible at a node, by id(node); only nodes under a WITH get an entry.
    scopes: dict[int, frozenset[str]] = {}
    scope = _NO_SCOPE
    while stack:
        node = pop()
        if scopes:
            scope = scopes.get(id(node), _NO_SCOPE)
        if type(node) is list:
            for item in node:
                if type(item) is dict or type(item) is list:
                    push(item)
                    if scope:
                        scopes[id(item)] = scope
            continue
        if has_ctes and "withClause" in node:
            scope = _enter_with(node["withClause"], scope, stack, scopes, out)
        for key, value in node.items():
            kind = type(value)
            if kind is list:
                if key == "lockingClause":
                    # FOR UPDATE / SHARE: row locks that block writers; PostgreSQL refuses it in
                    # a read-only transaction and requires UPDATE privilege, so not a read.
                    out.flags.add("locking_read")
                push(value)
                if scope:
                    scopes[id(value)] = scope
                continue
            if kind is not dict:
                continue
            code = codes.get(key)
            if code is not None:
                if code == _SKIP:
                    continue
                if code == _RANGE_VAR:
                    # Only a FROM-clause RangeVar can name a CTE; unqualified and in scope: a CTE.
                    if value.get("schemaname") or value.get("relname") not in scope:
                        tables.append((value.get("location", -1), _qualified(value)))
                    continue
                if code == _RELATION_FIELD:
                    if "relname" in value:  # DML targets, COPY, INTO ...: always a real table
                        tables.append((value.get("location", -1), _qualified(value)))
                        continue
                elif code == _FUNC_CALL:
                    _func_call(value, out)
                elif code == _VAR_SET:
                    name = value.get("name")
                    if name is not None and name.lower() in _ROLE_GUCS:
                        out.flags.add("role_switch")
                    elif (
                        name is not None
                        and name.lower() in _STRING_SYNTAX_GUCS
                        and _sets_nonconforming(name.lower(), value)
                    ):
                        out.flags.add("string_syntax")
                    out.const_sensitive = True
                elif code == _DEF_ELEM:
                    out.const_sensitive = True
                    defname = value.get("defname")
                    # CREATE/ALTER ROLE ... PASSWORD, USER MAPPING / SERVER OPTIONS (password ...)
                    if defname in _SECRET_OPTIONS:
                        out.flags.add("sets_password")
                    elif defname in _FILE_FDW_OPTIONS:
                        if value.get("defaction") != "DEFELEM_DROP":
                            out.flags.add(_FILE_FDW_OPTIONS[defname])
                    else:
                        # Any option may name a function (`sfunc`, the old `sfunc1`, ...): a
                        # guarded one is refused whatever the option is called.
                        arg = value.get("arg")
                        _function_reference(
                            _named_function(arg),
                            out,
                            # A bare word (EXPLAIN's `analyze false`) is not a function's name.
                            record=defname in _FUNCTION_OPTIONS
                            and isinstance(arg, dict)
                            and "String" not in arg,
                        )
                elif code == _FUNC_REF:
                    _function_reference(_named_function(value), out)
                elif code == _OPCLASS_ITEM:
                    if value.get("itemtype") == 2:  # OPCLASS_ITEM_FUNCTION
                        _function_reference(_named_function(value.get("name")), out)
                elif code == _FIELD_SELECTION:
                    _field_selection(value, key, out)
                elif code == _UPDATE:
                    if "whereClause" not in value:
                        out.flags.add("update_without_where")
                    if _updates_settings(value):
                        # pg_settings' rule calls set_config(name, setting, false) per row.
                        out.flags.add("string_syntax")
                elif "whereClause" not in value:  # _DELETE
                    out.flags.add("delete_without_where")
            push(value)
            if scope:
                scopes[id(value)] = scope
    return out


_EXACT_CTE_SCOPES: Final = 64


def _enter_with(
    with_clause: dict[str, Any],
    scope: frozenset[str],
    stack: list[Any],
    scopes: dict[int, frozenset[str]],
    out: _Walk,
) -> frozenset[str]:
    """Push CTE bodies with the scope each one sees; return the scope of the main query."""
    ctes = [c.get("CommonTableExpr", {}) for c in with_clause.get("ctes", ())]
    names = [str(c.get("ctename", "")) for c in ctes]
    full = scope | frozenset(names)
    recursive = bool(with_clause.get("recursive"))
    # Each non-recursive CTE sees only the CTEs declared before it: one set per CTE is
    # quadratic (4,368 CTEs in 64 KB: 0.6 s and 433 MB). Past a few dozen CTEs they all get
    # the enclosing scope instead, so a sibling named in one is listed as a table: more
    # tables than referenced, never fewer.
    exact = recursive or len(ctes) <= _EXACT_CTE_SCOPES
    for index, cte in enumerate(ctes):
        query = cte.get("ctequery", {})
        if _node_type(query) in _DML:
            out.dm_cte = True
            out.flags.add("data_modifying_cte")
        stack.append(cte)
        if recursive:
            scopes[id(cte)] = full
        elif exact:
            scopes[id(cte)] = scope | frozenset(names[:index])
        else:
            scopes[id(cte)] = scope
    return full


def _func_call(call: dict[str, Any], out: _Walk) -> None:
    """Record a function call; flag set_config calls that may change role."""
    names = call.get("funcname", ())
    name = _strings(names).lower()
    out.functions.append((call.get("location", -1), name))
    base = name.rsplit(".", 1)[-1]
    _note_side_effects(base, out)
    if base in _SECRET_ARGUMENT_FUNCTIONS:
        out.flags.add("carries_credential")
    if base in SERVER_FILE_FUNCTIONS:
        out.flags.add("server_file_function")
    reads = _RELATION_ARGUMENT_FUNCTIONS.get(base)
    if reads is not None:
        _relation_argument(call.get("args") or (), reads, call.get("location", -1), out)
    elif base in _ALL_TABLES_FUNCTIONS:
        out.flags.add("dynamic_sql")  # every table of a schema or database, by SQL it builds
    sql_args = _SQL_TEXT_FUNCTIONS.get(base)
    if base == "ts_rewrite" and len(call.get("args") or ()) == 2:
        sql_args = (1,)  # ts_rewrite(query tsquery, select text): runs the SELECT
    if sql_args is not None or base in _SQL_FRAGMENT_FUNCTIONS:
        _sql_text_arguments(base, call.get("args") or (), sql_args or (), out)
    if base == "set_config":
        out.const_sensitive = True
        args: list[dict[str, Any]] = call.get("args") or []
        first = _constant_text(args[0]) if args else None
        if first is None and args:
            # 'app.' OPERATOR(pg_catalog.||) k: a name that starts with a constant holding a dot
            # is a custom setting (role, session_authorization, the string syntax GUCs have none).
            prefix = _leading_constant(args[0])
            if prefix is not None and "." in prefix:
                first = prefix
        # A computed GUC name cannot be checked: treat it as role switching.
        if first is None or first.lower() in _ROLE_GUCS:
            out.flags.add("set_config_role")
        elif first.lower() in _STRING_SYNTAX_GUCS:
            value = _constant_text(args[1]) if len(args) > 1 else None
            if value is None or _nonconforming(first.lower(), value):
                out.flags.add("string_syntax")


def _named_function(node: object) -> str:
    """The function a DDL option or reference names: TypeName, String list or ObjectWithArgs."""
    if not isinstance(node, dict):
        return ""
    found: dict[str, Any] = node
    for key in ("TypeName", "ObjectWithArgs", "List"):
        if key in found:
            found = found[key]
            break
    items = found.get("names") or found.get("objname") or found.get("items")
    if isinstance(items, list):
        return _strings(items).lower()
    if "String" in found:
        return str(found["String"].get("sval", "")).lower()
    return ""


def _function_reference(name: str, out: _Walk, *, record: bool = True) -> None:
    """A function DDL makes callable under another name: what calling it would flag, now.

    The later call (an aggregate, an operator, a cast) does not show the function at all, so a
    guarded function must be refused where it is named. `record`: list it among the
    statement's functions even when it is not guarded (the option is known to name one).
    """
    if not name:
        return
    base = name.rsplit(".", 1)[-1]
    guarded = _flag_uncheckable_call(base, out)
    if record or guarded:
        out.functions.append((-1, name))


def _flag_uncheckable_call(base: str, out: _Walk) -> bool:
    """Flag a guarded function called where its arguments cannot be read; True if guarded."""
    if base == "set_config":
        out.flags.add("set_config_role")  # its arguments are unknown here: it may set a role
    elif base in SERVER_FILE_FUNCTIONS:
        out.flags.add("server_file_function")
    elif (
        base in _SQL_TEXT_FUNCTIONS
        or base in _SQL_FRAGMENT_FUNCTIONS
        or base == "ts_rewrite"
        or base in _ALL_TABLES_FUNCTIONS
        or _RELATION_ARGUMENT_FUNCTIONS.get(base) is True
    ):
        out.flags.add("dynamic_sql")
    else:
        return False
    return True


def _note_side_effects(base: str, out: _Walk) -> bool:
    """What calling `base` changes (admin, write) or carries (a connection string); True if
    it is one of those functions."""
    if base in _ADMIN_FUNCTIONS:
        out.side_effect = _ADMIN
    elif base in _WRITE_FUNCTIONS:
        if out.side_effect is None:
            out.side_effect = _WRITE
    elif base not in _CONNINFO_FUNCTIONS:
        return False
    if base in _CONNINFO_FUNCTIONS:
        out.const_sensitive = True  # whether the text holds a credential depends on constants
    return True


def _field_selection(node: dict[str, Any], key: str, out: _Walk) -> None:
    """`t.f` / `(x).f`: PostgreSQL calls f(t) when f is not a column; check f like a call."""
    if key == "ColumnRef":
        fields = node.get("fields") or ()
        names = fields[1:] if len(fields) > 1 else ()  # a bare name is a column
    else:
        names = node.get("indirection") or ()
    for item in names:
        if "String" not in item:
            continue
        name = str(item["String"].get("sval", "")).lower()
        guarded = _flag_uncheckable_call(name, out)
        side_effect = _note_side_effects(name, out)
        if guarded or side_effect:  # a plain column name is not listed as a function
            out.functions.append((-1, name))


def _code_options(
    options: list[dict[str, Any]] | tuple[()], default: str
) -> tuple[str, str | None]:
    """The language (lower case; `default` if not given) and single-string body of a CREATE
    FUNCTION or DO. A C function's two-part `AS 'file', 'symbol'` has no body here."""
    language = default
    body: str | None = None
    for option in options:
        elem = option.get("DefElem", {})
        name = elem.get("defname")
        arg = elem.get("arg", {})
        if name == "language":
            language = str(arg.get("String", {}).get("sval", "")).lower()
        elif name == "as":
            if "String" in arg:  # DO's body
                body = str(arg["String"].get("sval", ""))
            else:
                items = arg.get("List", {}).get("items", [])
                if len(items) == 1:
                    body = str(items[0].get("String", {}).get("sval", ""))
    return language, body


_ROUTINE_OBJECTS: Final = frozenset(
    {"OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE", "OBJECT_AGGREGATE"}
)


def _moves_routine(node_type: str, body: dict[str, Any]) -> bool:
    """ALTER FUNCTION / PROCEDURE / ROUTINE / AGGREGATE ... RENAME TO / SET SCHEMA."""
    if node_type == "RenameStmt":
        return body.get("renameType") in _ROUTINE_OBJECTS
    if node_type == "AlterObjectSchemaStmt":
        return body.get("objectType") in _ROUTINE_OBJECTS
    return False


def _procedural_code(part: str, node_type: str, body: dict[str, Any], out: _Walk) -> None:
    """DO blocks and functions: the SQL their code runs.

    That code runs later (or, for DO, at once) where no guard sees its statements. A LANGUAGE
    sql body given as a string is classified as part of this statement (BEGIN ATOMIC bodies are
    in the tree already); PL/pgSQL is read with PostgreSQL's own PL/pgSQL parser and every
    statement and expression in it is classified likewise; EXECUTE of a computed string is
    `dynamic_sql`. Code in any other language (C, internal, PL/Perl, PL/Python ...) cannot be
    read: `uninspectable_code`.
    """
    if node_type == "DoStmt":
        language, code = _code_options(body.get("args") or (), "plpgsql")
    elif "sql_body" in body:
        return  # BEGIN ATOMIC / RETURN: SQL in the tree, walked already
    else:
        language, code = _code_options(body.get("options") or (), "")
        if language == "sql":
            if code is not None:
                out.sql_texts.append(code)
            return
        if not language:
            return  # no language and no BEGIN ATOMIC body: PostgreSQL refuses it
    out.const_sensitive = True
    if language != "plpgsql" or code is None:
        out.flags.add("uninspectable_code")
        return
    if "\\'" in code:
        # The body is compiled when first called, in whatever session calls it: with
        # standard_conforming_strings off there, \' ends no literal and the code reads
        # differently from how it was checked (as for SQL bodies, see _merge_sql_texts).
        out.flags.add("string_syntax")
    found = read_plpgsql(part, code)
    if found.error is not None:
        out.flags.add("uninspectable_code")
        if names_credential(code):
            # As for SQL the parser rejects: a mistyped `PASSWORD hunter2` in the body.
            out.flags.add("carries_credential")
        return
    out.sql_texts.extend(found.texts)
    for expression in found.executed:
        sql = _constant_select(expression)
        if sql is None:
            out.flags.add("dynamic_sql")
        else:
            out.sql_texts.append(sql)


_BARE_SELECT_KEYS: Final = frozenset({"targetList", "limitOption", "op"})


def _constant_select(select: str) -> str | None:
    """The string constant that `SELECT <expr>` selects, if that is all it is."""
    try:
        raw_stmts, _ = _parse_tree(select)
    except _ParseError:
        return None
    if len(raw_stmts) != 1:
        return None
    query: dict[str, Any] = raw_stmts[0].get("stmt", {}).get("SelectStmt", {})
    targets: list[dict[str, Any]] = query.get("targetList") or []
    if len(targets) != 1 or not _BARE_SELECT_KEYS.issuperset(query):  # no FROM, WHERE ...
        return None
    value = targets[0].get("ResTarget", {}).get("val", {})
    return _constant_text(value)


def _sql_text_arguments(
    base: str, args: list[dict[str, Any]] | tuple[()], positions: tuple[int, ...], out: _Walk
) -> None:
    """Collect the constant SQL a SQL-running function is given; flag what cannot be read."""
    out.const_sensitive = True  # the classification depends on the constants
    if base in _SQL_FRAGMENT_FUNCTIONS:
        out.flags.add("dynamic_sql")
        return
    for position in positions:
        if position >= len(args):
            continue
        arg = args[position]
        text = _constant_text(arg)
        if text is not None:
            out.sql_texts.append(text)
        elif not (base == "crosstab" and position == 1 and _is_integer_constant(arg)):
            # crosstab(text, integer) is the old two-argument form; anything else computed
            # (a parameter, a concatenation, a column) is SQL nobody can check beforehand.
            out.flags.add("dynamic_sql")


def _is_integer_constant(node: dict[str, Any]) -> bool:
    """Whether ``node`` is a bare integer constant (a cast could turn it into anything)."""
    const = node.get("A_Const")
    return const is not None and "ival" in const


def _relation_argument(
    args: list[dict[str, Any]] | tuple[()], reads_rows: bool, location: int, out: _Walk
) -> None:
    """The relation a regclass argument names, as a table; `dynamic_sql` if it must be known."""
    out.const_sensitive = True  # which table it is depends on the constant
    name: str | None = None
    if args:
        arg = args[0]
        cast = arg.get("TypeCast")
        if cast is not None:
            names = [
                str(n.get("String", {}).get("sval", ""))
                for n in cast.get("typeName", {}).get("names", ())
            ]
            if names in _REGCLASS_TYPES:
                arg = cast.get("arg", {})
        text = _constant_text(arg)
        if text is not None:
            name = _regclass_name(text)
    if name is not None:
        out.tables.append((location, name))
    elif reads_rows:
        out.flags.add("dynamic_sql")


_NAME_BYTES: Final = 63  # NAMEDATALEN - 1
_NAME_SPACE: Final = " \t\n\r\f\v"  # scanner_isspace


def _regclass_name(text: str) -> str | None:
    """The relation name regclass input reads from ``text`` ('s."T"' -> 's.T'), as a table name
    is recorded; None for an OID ('16384'), '-' or what PostgreSQL would reject.

    PostgreSQL's stringToQualifiedNameList: dot-separated names, each double-quoted ("" is a
    quote) or bare (ASCII lower-cased, ending at a dot or a space), truncated to 63 bytes.
    """
    if not text or text.isdigit() or text == "-":
        return None
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _NAME_SPACE:
            i += 1
        if i < n and text[i] == '"':
            chars: list[str] = []
            i += 1
            while True:
                end = text.find('"', i)
                if end < 0:
                    return None  # unterminated quote
                chars.append(text[i:end])
                i = end + 1
                if i < n and text[i] == '"':
                    chars.append('"')
                    i += 1
                    continue
                break
            part = "".join(chars)
        else:
            start = i
            while i < n and text[i] != "." and text[i] not in _NAME_SPACE:
                i += 1
            part = text[start:i].translate(_ASCII_LOWER)
        if not part:
            return None
        encoded = part.encode("utf-8")
        if len(encoded) > _NAME_BYTES:
            part = encoded[:_NAME_BYTES].decode("utf-8", errors="ignore")
        parts.append(part)
        while i < n and text[i] in _NAME_SPACE:
            i += 1
        if i == n:
            break
        if text[i] != ".":
            return None
        i += 1
    return _dotted(parts) if len(parts) <= 3 else None


_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_SETTINGS_VIEWS: Final = frozenset({"pg_settings", "pg_catalog.pg_settings"})
# OWNER TO these is no change of role.
_SELF_ROLESPECS: Final = frozenset(
    {"ROLESPEC_CURRENT_USER", "ROLESPEC_SESSION_USER", "ROLESPEC_CURRENT_ROLE"}
)


def _defines_view_or_rule(node_type: str, body: dict[str, Any]) -> bool:
    """A view or rule, also as an element of CREATE SCHEMA ... CREATE VIEW."""
    if node_type in ("ViewStmt", "RuleStmt"):
        return True
    if node_type == "CreateSchemaStmt":
        return any(
            _node_type(element) in ("ViewStmt", "RuleStmt")
            for element in body.get("schemaElts") or ()
        )
    return False


def _gives_away_ownership(node_type: str, body: dict[str, Any]) -> bool:
    """ALTER ... OWNER TO / REASSIGN OWNED BY ... TO a role named explicitly."""
    if node_type == "AlterOwnerStmt":
        owners = [body.get("newowner", {})]
    elif node_type == "ReassignOwnedStmt":
        owners = [body.get("newrole", {})]
    elif node_type == "AlterTableStmt":
        owners = [
            cmd.get("AlterTableCmd", {}).get("newowner", {})
            for cmd in body.get("cmds", ())
            if cmd.get("AlterTableCmd", {}).get("subtype") == "AT_ChangeOwner"
        ]
    else:
        return False
    return any(owner.get("roletype") not in _SELF_ROLESPECS for owner in owners)


def _updates_settings(update: dict[str, Any]) -> bool:
    """UPDATE pg_settings: anyone may, and its rule calls set_config for each matching row.

    Refused whatever its WHERE says: which rows match cannot be read from the text (a CASE, a
    FROM, an `=` shadowed through search_path all fooled such a reading). SET does the same.
    """
    relation = update.get("relation", {})
    return relation.get("relname") == "pg_settings" and relation.get("schemaname") in (
        None,
        "pg_catalog",
    )


def _leading_constant(node: dict[str, Any]) -> str | None:
    """The constant string at the far left of a `||` chain, if any."""
    while True:
        expr = node.get("A_Expr")
        if expr is None:
            return _constant_text(node)
        # Only OPERATOR(pg_catalog.||): a bare || is whatever search_path finds first, and a
        # user-defined one can return 'role' from anything.
        if _strings(expr.get("name", ())) != "pg_catalog.||":
            return None
        node = expr.get("lexpr", {})


# Settings that change how PostgreSQL reads string literals: dbward parses as PostgreSQL does
# with standard_conforming_strings on (and backslash_quote's default), so neither may change.
_STRING_SYNTAX_GUCS: Final = frozenset({"standard_conforming_strings", "backslash_quote"})
_CONFORMING_VALUES: Final = {
    "standard_conforming_strings": frozenset({"on", "true", "yes", "1"}),
    "backslash_quote": frozenset({"safe_encoding", "off", "false", "no", "0"}),
}


def _nonconforming(name: str, value: str) -> bool:
    """Whether setting `name` to `value` changes how string literals read."""
    return value.strip().lower() not in _CONFORMING_VALUES[name]


def _sets_nonconforming(name: str, node: dict[str, Any]) -> bool:
    """SET / ALTER ... SET / a function's SET clause of a string syntax setting: True unless
    it sets the conforming value (RESET and SET ... TO DEFAULT restore the server default)."""
    kind = node.get("kind", "")
    if kind in ("VAR_RESET", "VAR_SET_DEFAULT", "VAR_RESET_ALL"):
        return False
    args: list[dict[str, Any]] = node.get("args") or []
    if len(args) != 1:
        return True  # FROM CURRENT, or several values: cannot tell
    arg = args[0]
    const = arg.get("A_Const", {})
    if "boolval" in const:
        value = "on" if const["boolval"].get("boolval") else "off"
    elif "ival" in const:
        value = str(const["ival"].get("ival", 0))
    else:
        text = _constant_text(arg)
        if text is None:
            return True
        value = text
    return _nonconforming(name, value)


def _ordered(found: list[tuple[int, str]]) -> tuple[str, ...]:
    """Names in source order, first occurrence only."""
    if not found:
        return ()
    if len(found) == 1:
        return (found[0][1],)
    found.sort(key=lambda item: item[0])
    return tuple(dict.fromkeys(name for _, name in found))


ALL_TABLES: Final = "*"  # a statement on every table of the database, as Statement.tables says
# Statements with no relation to list when they name none: every table of the database.
_ALL_TABLES_WHEN_UNNAMED: Final = {"VacuumStmt": "rels", "ClusterStmt": "relation"}
_ALL_TABLES_STATEMENTS: Final = frozenset(
    {"DropOwnedStmt", "ReassignOwnedStmt", "AlterTableMoveAllStmt"}
)


def _schema_wide_targets(node_type: str, body: dict[str, Any], out: _Walk) -> None:
    """Statements on every table of a schema (`s.*`) or of the database (`*`), which name no
    table: GRANT/REVOKE ON ALL TABLES IN SCHEMA, DROP SCHEMA, REINDEX SCHEMA/DATABASE/SYSTEM,
    VACUUM/ANALYZE/CLUSTER without a table, DROP/REASSIGN OWNED, ALTER TABLE ALL IN
    TABLESPACE, publications FOR ALL TABLES / TABLES IN SCHEMA, IMPORT FOREIGN SCHEMA."""
    schemas: list[str] = []
    everything = node_type in _ALL_TABLES_STATEMENTS
    if node_type in _ALL_TABLES_WHEN_UNNAMED:
        everything = not body.get(_ALL_TABLES_WHEN_UNNAMED[node_type])
    elif node_type == "GrantStmt":
        if body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA" and body.get("objtype") in (
            "OBJECT_TABLE",
            "OBJECT_SEQUENCE",
        ):
            schemas.extend(_string_values(body.get("objects", ())))
    elif node_type == "DropStmt" and body.get("removeType") == "OBJECT_SCHEMA":
        schemas.extend(_string_values(body.get("objects", ())))
    elif node_type == "ReindexStmt":
        kind = body.get("kind")
        if kind == "REINDEX_OBJECT_SCHEMA":
            schemas.append(str(body.get("name", "")))
        everything = kind in ("REINDEX_OBJECT_DATABASE", "REINDEX_OBJECT_SYSTEM")
    elif node_type in ("CreatePublicationStmt", "AlterPublicationStmt"):
        everything = bool(body.get("for_all_tables"))
        for spec in body.get("pubobjects", ()):
            fields = spec.get("PublicationObjSpec", {}) if isinstance(spec, dict) else {}
            if fields.get("pubobjtype") == "PUBLICATIONOBJ_TABLES_IN_SCHEMA":
                schemas.append(str(fields.get("name", "")))
    elif node_type == "ImportForeignSchemaStmt":
        schemas.append(str(body.get("local_schema", "")))  # where its tables are created
    if everything:
        out.tables.append((-1, ALL_TABLES))
    out.tables.extend((-1, recorded_name(schema) + ".*") for schema in schemas if schema)


def _string_values(items: object) -> list[str]:
    """The values of a list of String nodes."""
    if not isinstance(items, list | tuple):
        return []
    return [str(item.get("String", {}).get("sval", "")) for item in items if isinstance(item, dict)]


def _drop_targets(node_type: str, body: dict[str, Any], out: _Walk) -> None:
    """DROP / COMMENT / SECURITY LABEL / ALTER EXTENSION ADD|DROP name relations as String
    lists, not RangeVars: add them to tables. A trigger, policy, rule, constraint or column is
    named after its table (`DROP POLICY p ON s.t` is [s, t, p]): the table is listed."""
    if node_type == "DropStmt":
        objtype = body.get("removeType")
        objects = body.get("objects", ())
    elif node_type in _NAMED_OBJECT_STATEMENTS:
        objtype = body.get("objtype")
        objects = (body.get("object", {}),)
    else:
        return
    if objtype in _RELATION_OBJECTS:
        cut = None
    elif objtype in _RELATION_MEMBER_OBJECTS:
        cut = -1
    else:
        return
    for obj in objects:
        items = obj.get("List", {}).get("items") if isinstance(obj, dict) else None
        if items and items[:cut]:
            out.tables.append(
                (-1, _dotted(str(item.get("String", {}).get("sval", "")) for item in items[:cut]))
            )


# Statements naming one object as `objtype` + `object` (a String list for relations).
_NAMED_OBJECT_STATEMENTS: Final = frozenset(
    {"CommentStmt", "SecLabelStmt", "AlterExtensionContentsStmt"}
)
# Objects that belong to a relation and are named after it: the last name is the member's.
_RELATION_MEMBER_OBJECTS: Final = frozenset(
    {"OBJECT_COLUMN", "OBJECT_TRIGGER", "OBJECT_POLICY", "OBJECT_RULE", "OBJECT_TABCONSTRAINT"}
)


# --- the classifier ---------------------------------------------------------------------------


# Statement's slots, set one by one: its frozen dataclass __init__ sets each field through
# object.__setattr__ (a class attribute load and a generic call per field: ~1 µs a Statement),
# and the template cache builds one per simple Query. Checked against the dataclass below.
_NEW_OBJECT: Final = object.__new__
(
    _SET_TEXT,
    _SET_KIND,
    _SET_COMMAND,
    _SET_TABLES,
    _SET_FUNCTIONS,
    _SET_FLAGS,
    _SET_ERROR,
    _SET_PREPARED_NAME,
    _SET_PREPARED,
    _SET_CURSOR_NAME,
    _SET_SAVEPOINT,
    _SET_ROLES,
) = (Statement.__dict__[name].__set__ for name in Statement.__slots__)
_NO_FLAGS: Final[frozenset[str]] = frozenset()
if Statement.__slots__ != tuple(f.name for f in dataclasses.fields(Statement)) or [
    f.default for f in dataclasses.fields(Statement)[5:]
] != [_NO_FLAGS, None, None, None, None, None, ()]:
    raise AssertionError("_Template.instantiate does not set Statement's fields as declared")


class _Template:
    """A constants-independent classification reusable for texts with the same normalized form."""

    __slots__ = ("command", "functions", "kind", "lead", "tables", "trail")

    def __init__(self, statement: Statement, lead: int, trail: int) -> None:
        self.kind = statement.kind
        self.command = statement.command
        self.tables = statement.tables
        self.functions = statement.functions
        self.lead = lead  # characters before the statement (whitespace, comments)
        self.trail = trail  # characters after it (";", whitespace, comments)

    def instantiate(self, text: str) -> Statement:
        """The classification of ``text``, which normalizes to the same string as the original."""
        # Statement(text=..., kind=..., command=..., tables=..., functions=...), at a third
        # less cost (see _SET_TEXT).
        statement: Statement = _NEW_OBJECT(Statement)
        _SET_TEXT(statement, text[self.lead : len(text) - self.trail])
        _SET_KIND(statement, self.kind)
        _SET_COMMAND(statement, self.command)
        _SET_TABLES(statement, self.tables)
        _SET_FUNCTIONS(statement, self.functions)
        _SET_FLAGS(statement, _NO_FLAGS)
        _SET_ERROR(statement, None)
        _SET_PREPARED_NAME(statement, None)
        _SET_PREPARED(statement, None)
        _SET_CURSOR_NAME(statement, None)
        _SET_SAVEPOINT(statement, None)
        _SET_ROLES(statement, ())
        return statement


def _entry_bytes(key: str, value: object) -> int:
    """The estimated memory a cache entry pins (see _CACHE_BYTES)."""
    statements = len(value) if isinstance(value, tuple) else 1
    return _BYTES_PER_CHAR * len(key) + _BYTES_PER_STATEMENT * statements


class PostgresClassifier:
    """Classifies PostgreSQL statement strings with the server's own grammar (libpg_query).

    Results are cached by exact text (bounded LRU). A second, constants-blind cache keyed by
    libpg_query's normalized text (constants replaced by $n, everything else verbatim) lets
    pgbench-style traffic skip the parse and walk; it only ever holds single-statement DML and
    SELECTs whose classification does not depend on any constant (no flags, no set_config, no
    SET), and the key is the full normalized string, never a hash. Texts answered from it are
    not added to the exact-text cache.
    """

    def __init__(
        self, cache_size: int = 10_000, *, max_statements: int = DEFAULT_MAX_STATEMENTS
    ) -> None:
        self._cache_size = max(0, cache_size)
        self.max_statements = max(1, max_statements)
        self._cache: OrderedDict[str, tuple[Statement, ...]] = OrderedDict()
        self._templates: OrderedDict[str, _Template] = OrderedDict()
        # Estimated bytes held by each cache (see _CACHE_BYTES), by the cache's id.
        self._cached_bytes = {id(self._cache): 0, id(self._templates): 0}

    def classify(self, text: str) -> tuple[Statement, ...]:
        """Classify every statement in ``text``; never raises."""
        cache = self._cache
        hit = cache.get(text)
        if hit is not None:
            cache.move_to_end(text)
            return hit
        cacheable = self._cache_size > 0 and len(text) <= _MAX_CACHED_TEXT
        result: tuple[Statement, ...]
        cost = lexer_cost(text)
        if cost > _LEXER_COST_MAX:
            # Before any scan of it (normalize, split, parse): those are what it would stall.
            result = (_costly_to_scan(text, cost),)
            if cacheable:
                self._remember(cache, text, result)
            return result
        if "\x00" in text:
            # libpg_query reads C strings: it would silently ignore everything after a NUL.
            result = (unparseable_statement(text, "NUL character in statement text"),)
            if cacheable:
                self._remember(cache, text, result)
            return result
        # Only single statements are shared by the template cache: skip normalizing text that
        # looks like several (a ";" inside a literal merely costs the template cache a miss).
        normalized: str | None = None
        if cacheable and ";" not in text.rstrip(" \t\r\n;"):
            normalized = _normalize(text)
            if normalized is not None:
                shared = self._templates.get(normalized)
                # A template never holds a credential-bearing statement (it has flags), but a
                # literal of this text may name one: then it is classified in full, and flagged.
                if shared is not None and not _literal_may_name_credential(text):
                    self._templates.move_to_end(normalized)
                    # Not remembered by text: such texts rarely repeat (their constants
                    # change), and thousands of one-off entries cycling through the LRU cost
                    # the relay more (allocation, GC traversal) than normalizing again.
                    return (shared.instantiate(text),)
        template: _Template | None = None
        try:
            result, template = self._classify(text)
        except Exception as exc:  # last line of defence: classification must never raise
            result = (unparseable_statement(text, f"classifier failure: {type(exc).__name__}"),)
        if cacheable:
            self._remember(cache, text, result)
            if normalized is not None and template is not None:
                self._remember(self._templates, normalized, template)
        return result

    def _remember(self, cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        """Add an entry (a key not cached yet); evict the least recently used ones while the
        cache is over its count or its estimated bytes."""
        cache[key] = value
        held = self._cached_bytes[id(cache)] + _entry_bytes(key, value)
        while cache and (len(cache) > self._cache_size or held > _CACHE_BYTES):
            old_key, old_value = cache.popitem(last=False)
            held -= _entry_bytes(old_key, old_value)
        self._cached_bytes[id(cache)] = held

    def _classify(self, text: str) -> tuple[tuple[Statement, ...], _Template | None]:
        limit = self.max_statements
        if text.count(";") >= limit:  # fewer semicolons than the limit: within it, no scan
            count = _over_statement_limit(text, limit)
            if count is not None:
                return (_too_many_statements(text, count, limit),), None
        if len(text) < _GC_PAUSE_MIN_TEXT or not gc.isenabled():
            return self._classify_parsed(text)
        # A large statement's parse tree is millions of short-lived, acyclic dicts and lists;
        # the cyclic GC would rescan them again and again while they are built (a 1.8 MB
        # multi-row INSERT: ~1 s with it, ~0.4 s without). Refcounting frees them all.
        gc.disable()
        try:
            return self._classify_parsed(text)
        finally:
            gc.enable()

    def _classify_parsed(self, text: str) -> tuple[tuple[Statement, ...], _Template | None]:
        try:
            raw_stmts, has_ctes = _parse_tree(text)
        except _ParseError as exc:
            return (unparseable_statement(text, exc.message),), None
        if not raw_stmts:
            return (), None
        ascii_text = text.isascii()
        encoded = b"" if ascii_text else text.encode("utf-8")
        statements: list[Statement] = []
        template: _Template | None = None
        for raw in raw_stmts:
            start = raw.get("stmt_location", 0)
            length = raw.get("stmt_len", 0)
            # Locations are byte offsets into the UTF-8 text; stmt_len 0 means "to the end".
            if ascii_text:
                part = text[start : start + length] if length else text[start:]
            else:
                chunk = encoded[start : start + length] if length else encoded[start:]
                part = chunk.decode("utf-8", errors="replace")
            node = raw["stmt"]
            node_type = _node_type(node)
            statement, shareable = _classify_node(part, node_type, node, has_ctes)
            statements.append(statement)
            if shareable and len(raw_stmts) == 1 and ascii_text:
                end = start + length if length else len(text)
                template = _Template(statement, start, len(text) - end)
        return tuple(statements), template


def _classify_node(
    part: str, node_type: str, node: dict[str, Any], has_ctes: bool = True, depth: int = 0
) -> tuple[Statement, bool]:
    """Classify one parsed statement; also say whether it may go in the constants-blind cache."""
    body = node.get(node_type, {})
    walked = _walk(node, has_ctes)
    _drop_targets(node_type, body, walked)
    _schema_wide_targets(node_type, body, walked)
    if node_type in ("DoStmt", "CreateFunctionStmt"):
        _procedural_code(part, node_type, body, walked)
    elif node_type == "CreateTrigStmt":
        # The trigger runs its function with the trigger's arguments where no call shows them.
        _function_reference(_strings(body.get("funcname") or []).lower(), walked, record=False)
    elif _moves_routine(node_type, body):
        # A guarded function renamed or moved is the same function under a name no guard
        # knows: refused like a call to it.
        _function_reference(_named_function(body.get("object")), walked)
    if walked.sql_texts:
        _merge_sql_texts(walked, depth)
    kind, command, flags = _head(node_type, body, walked.dm_cte)
    flags |= walked.flags
    # Plain EXPLAIN runs nothing, but for an EXECUTE the parameters it is given.
    runs = node_type != "ExplainStmt" or _explain_analyzes(body) or _explains_execute(body)
    executes = kind is _SESSION and node_type in ("ExecuteStmt", "ExplainStmt")
    if executes:
        # EXECUTE (or EXPLAIN ANALYZE of it) evaluates its parameters (`EXECUTE x(nextval('s'))`):
        # what they do is its own kind, which the relay adds to the prepared query's.
        kind = _READ
    if walked.side_effect is not None and runs:
        flags.add("side_effect_function")
        if kind is _READ:
            kind = walked.side_effect
    if walked.inner_kind is not None and kind is _READ:
        kind = walked.inner_kind  # SQL run through a function is what makes this a write
    if "locking_read" in flags and kind is _READ and runs:
        kind = _WRITE
    if executes and kind is _READ:
        kind = _SESSION
    if names_credential(part):
        # Any text naming a password (a password column compared with a literal, a DSN stored
        # in a table) or holding a URI's user:password@: its literals are withheld from the
        # log. Also where the mention is in a literal only (see PostgresClassifier.classify).
        flags.add("carries_credential")
    prepared_name, prepared = _prepared_parts(node_type, body, part, has_ctes, depth)
    if prepared_name is not None and node_type not in ("PrepareStmt", "DeallocateStmt"):
        flags.add("executes_prepared")
    cursor_name: str | None = None
    if node_type in ("DeclareCursorStmt", "ClosePortalStmt", "FetchStmt"):
        cursor_name = body.get("portalname")
        if cursor_name is None:
            flags.add("closes_all_cursors")
        elif node_type == "FetchStmt":
            flags.add("fetches_cursor")  # runs the cursor's query: decided as its DECLARE
        elif node_type == "DeclareCursorStmt" and body.get("options", 0) & _CURSOR_OPT_HOLD:
            flags.add("holdable_cursor")
    if depth == 0 and (
        (prepared_name is not None and name_was_cut(part, prepared_name))
        or (cursor_name is not None and name_was_cut(part, cursor_name))
    ):
        # The scanner cut a longer name to 63 bytes, as PostgreSQL does with NAMEDATALEN 64;
        # a server built with a larger one keeps it whole. Refused, like a protocol-level name
        # over 63 bytes, so dbward's maps never depend on the server's NAMEDATALEN.
        flags.add("name_too_long")
    roles = _roles_changed(node_type, body) + tuple(walked.roles)
    if roles:
        flags.add("changes_role")
    savepoint: str | None = None
    if node_type == "TransactionStmt":
        savepoint = body.get("savepoint_name")
        if body.get("chain"):
            flags.add("chains_transaction")
    if _runs_outside_transaction(node_type, body):
        flags.add("outside_transaction")
    if _defines_view_or_rule(node_type, body) and not _SETTINGS_VIEWS.isdisjoint(
        name for _, name in walked.tables
    ):
        # UPDATE on such a view runs pg_settings' rule: set_config for every row.
        flags.add("string_syntax")
    if (
        node_type == "CreateSchemaStmt"
        and body.get("authrole")
        and body.get("schemaElts")
        and body["authrole"].get("roletype") not in _SELF_ROLESPECS
    ):
        # The schema's objects are created by its owner, as if after SET ROLE (by the role
        # already in use for AUTHORIZATION CURRENT_ROLE/CURRENT_USER/SESSION_USER: no switch,
        # as for OWNER TO CURRENT_USER).
        flags.add("role_switch")
    if _gives_away_ownership(node_type, body):
        # An object owned by another role acts as that role: a view reads with its owner's
        # privileges, a SECURITY DEFINER function runs as its owner.
        flags.add("role_switch")
    statement = Statement(
        text=part,
        kind=kind,
        command=command,
        tables=_ordered(walked.tables),
        functions=_ordered(walked.functions),
        flags=frozenset(flags) if flags else _EMPTY,
        prepared_name=prepared_name,
        prepared=prepared,
        cursor_name=cursor_name,
        savepoint=savepoint,
        roles=roles,
    )
    shareable = node_type in _SHAREABLE and not flags and not walked.const_sensitive
    return statement, shareable


# Flags the relay acts on for the statement a client sent: never taken from SQL it runs inside.
_SESSION_PROTOCOL_FLAGS: Final = frozenset(
    {
        "copy_from_stdin",
        "copy_to_stdout",
        "fetches_cursor",
        "closes_all_cursors",
        "holdable_cursor",
        "executes_prepared",
    }
)


# Statements that define or remove the session's prepared statements.
_CHANGES_PREPARED: Final = frozenset({"PREPARE", "DEALLOCATE"})


def _merge_sql_texts(walked: _Walk, depth: int) -> None:
    """Classify the SQL that called functions run, and count it as part of the statement."""
    for text in walked.sql_texts:
        if "\\'" in text:
            # PostgreSQL reads this SQL when it runs, with the settings in force then: a
            # statement earlier in the same string (UPDATE on a view over pg_settings) may
            # have turned standard_conforming_strings off, which makes \' end no literal.
            walked.flags.add("string_syntax")
        if depth >= _MAX_SQL_TEXT_DEPTH:
            walked.flags.add("dynamic_sql")
            return
        try:
            raw_stmts, has_ctes = _parse_tree(text)
        except _ParseError:
            walked.flags.add("dynamic_sql")  # the server would refuse it too; nothing to check
            continue
        encoded = text.encode("utf-8")
        for raw in raw_stmts:
            start = raw.get("stmt_location", 0)
            length = raw.get("stmt_len", 0)
            chunk = encoded[start : start + length] if length else encoded[start:]
            inner_node = raw["stmt"]
            inner, _ = _classify_node(
                chunk.decode("utf-8", errors="replace"),
                _node_type(inner_node),
                inner_node,
                has_ctes,
                depth + 1,
            )
            walked.tables.extend((-1, name) for name in inner.tables)
            walked.functions.extend((-1, name) for name in inner.functions)
            # Not what the relay acts on (a COPY starting, cursors, prepared statements): the
            # SQL runs inside the server, the client's session sees none of it.
            walked.flags.update(inner.flags - _SESSION_PROTOCOL_FLAGS)
            walked.roles.extend(inner.roles)
            if (
                inner.kind is _UNKNOWN
                or "executes_prepared" in inner.flags
                or inner.command in _CHANGES_PREPARED
            ):
                # EXECUTE name (also CREATE TABLE AS EXECUTE) runs whatever the session has
                # prepared under that name when this SQL runs: nothing here can tell what.
                # PREPARE and DEALLOCATE here change what the session's own EXECUTE of a name
                # runs, where the relay (which follows the client's PREPAREs) cannot see:
                # `DO $$ BEGIN DEALLOCATE x; PREPARE x AS DELETE ... END $$` then `EXECUTE x`
                # ran the DELETE, decided and recorded as the SELECT 1 prepared before.
                walked.flags.add("dynamic_sql")
            elif inner.kind is not _READ and walked.inner_kind is None:
                walked.inner_kind = inner.kind


_ROLE_KEYWORDS: Final = {
    "ROLESPEC_CURRENT_USER": "CURRENT_USER",
    "ROLESPEC_SESSION_USER": "SESSION_USER",
    "ROLESPEC_CURRENT_ROLE": "CURRENT_ROLE",
    "ROLESPEC_PUBLIC": "PUBLIC",
}
# Role options that make the listed roles members of the role being created or altered.
_MEMBER_OPTIONS: Final = frozenset({"rolemembers", "adminmembers"})


def _roles_changed(node_type: str, body: dict[str, Any]) -> tuple[str, ...]:
    """The roles a role statement alters, drops, renames, or gives a membership to."""
    found: list[str] = []
    if node_type in ("AlterRoleStmt", "AlterRoleSetStmt"):
        role = body.get("role")
        # ALTER ROLE ALL SET: a default for every role (no role in the tree).
        found.append(_role_name(role) if role is not None else "ALL")
    if node_type in ("AlterRoleStmt", "CreateRoleStmt"):
        for option in body.get("options", ()):
            definition = option.get("DefElem", {}) if isinstance(option, dict) else {}
            if definition.get("defname") in _MEMBER_OPTIONS:
                items = definition.get("arg", {}).get("List", {}).get("items", ())
                found.extend(_role_name(item) for item in items)
    elif node_type == "DropRoleStmt":
        found.extend(_role_name(item) for item in body.get("roles", ()))
    elif node_type == "RenameStmt" and body.get("renameType") == "OBJECT_ROLE":
        found.append(recorded_name(str(body.get("subname", ""))))
    elif node_type == "GrantRoleStmt":
        found.extend(_role_name(item) for item in body.get("grantee_roles", ()))
    return tuple(found)


def _runs_outside_transaction(node_type: str, body: dict[str, Any]) -> bool:
    """Whether PostgreSQL may run the statement only outside a transaction block, committing
    at once when it succeeds (PreventInTransactionBlock: VACUUM, CREATE DATABASE, CREATE INDEX
    CONCURRENTLY ...). Errs on the side of yes: the relay then only claims less."""
    if node_type in _OUTSIDE_TRANSACTION:
        return True
    if node_type == "VacuumStmt":
        return bool(body.get("is_vacuumcmd"))  # ANALYZE alone runs in a block
    if node_type in ("IndexStmt", "DropStmt"):
        return bool(body.get("concurrent"))
    if node_type == "DiscardStmt":
        return body.get("target") == "DISCARD_ALL"
    if node_type == "AlterDatabaseStmt":  # ALTER DATABASE ... SET TABLESPACE
        return any(
            isinstance(option, dict) and option.get("DefElem", {}).get("defname") == "tablespace"
            for option in body.get("options", ())
        )
    return False


# Statements of these types may run only outside a transaction block (some forms of them).
_OUTSIDE_TRANSACTION: Final = frozenset(
    {
        "ClusterStmt",
        "CreatedbStmt",
        "DropdbStmt",
        "CreateTableSpaceStmt",
        "DropTableSpaceStmt",
        "AlterSystemStmt",
        "ReindexStmt",
        "CreateSubscriptionStmt",
        "AlterSubscriptionStmt",
        "DropSubscriptionStmt",
    }
)


def _role_name(spec: object) -> str:
    """A RoleSpec as recorded_name writes a name, or its keyword in upper case (which no
    recorded name can be: a role named "PUBLIC" is recorded quoted)."""
    if isinstance(spec, dict):
        spec = spec.get("RoleSpec", spec)
    if not isinstance(spec, dict):
        return ""
    roletype = str(spec.get("roletype", ""))
    if roletype == "ROLESPEC_CSTRING":
        return recorded_name(str(spec.get("rolename", "")))
    return _ROLE_KEYWORDS.get(roletype, roletype)


def _prepared_parts(
    node_type: str, body: dict[str, Any], part: str, has_ctes: bool, depth: int = 0
) -> tuple[str | None, Statement | None]:
    """For PREPARE, EXECUTE, EXPLAIN [ANALYZE] EXECUTE and DEALLOCATE: the name (and for
    PREPARE the classified statement it prepares), so the relay can resolve EXECUTE."""
    if node_type == "PrepareStmt":
        if depth > 0:
            # SQL run from text: nobody EXECUTEs it through dbward, and classifying it again
            # from the top at every level doubled the work per level (17 levels of a 1 KB
            # PREPARE chain held the event loop for 5 s).
            return body.get("name"), None
        inner = body.get("query", {})
        inner_type = _node_type(inner)
        prepared, _ = _classify_node(part, inner_type, inner, has_ctes, depth)
        return body.get("name"), prepared
    if node_type in ("ExecuteStmt", "ExplainStmt", "CreateTableAsStmt"):
        executed = _executed_prepared(node_type, body)
        return (executed.get("name") if executed is not None else None), None
    if node_type == "DeallocateStmt":
        return body.get("name"), None
    return None, None


def _explains_execute(body: dict[str, Any]) -> bool:
    """Whether an EXPLAIN explains an EXECUTE (or CREATE TABLE ... AS EXECUTE): PostgreSQL
    evaluates its parameters even without ANALYZE (`EXPLAIN EXECUTE x(nextval('s'))` advances
    the sequence), so what they call runs."""
    inner = body.get("query", {})
    inner_type = _node_type(inner)
    if inner_type == "CreateTableAsStmt":
        inner = inner[inner_type].get("query", {})
        inner_type = _node_type(inner)
    return inner_type == "ExecuteStmt"


def _executed_prepared(node_type: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The EXECUTE a statement runs: itself, or the one inside EXPLAIN ANALYZE and CREATE TABLE
    / SELECT INTO ... AS EXECUTE (PostgreSQL runs the prepared query to fill the new table)."""
    while True:
        if node_type == "ExecuteStmt":
            return body
        if node_type == "ExplainStmt":
            if not _explain_analyzes(body):
                return None  # plain EXPLAIN only plans it
        elif node_type != "CreateTableAsStmt":
            return None
        inner = body.get("query", {})
        node_type = _node_type(inner)
        body = inner.get(node_type, {})


_CURSOR_OPT_HOLD: Final = 0x0020  # CURSOR_OPT_HOLD in PostgreSQL's parsenodes.h
_PARSE_ERROR_FLAGS: Final = frozenset({"parse_error"})
_PARSE_ERROR_CREDENTIAL_FLAGS: Final = frozenset({"parse_error", "carries_credential"})
_LIMIT_FLAGS: Final = frozenset({"statement_limit"})
_LIMIT_CREDENTIAL_FLAGS: Final = frozenset({"statement_limit", "carries_credential"})


def unparseable_statement(text: str, message: str) -> Statement:
    """The single UNKNOWN statement reported for text the parser rejects.

    Broken text that mentions a password (a mistyped ALTER ROLE ... PASSWORD) is flagged like a
    parsed one: what it holds cannot be told apart from a credential.
    """
    return Statement(
        text=text,
        kind=_UNKNOWN,
        command="UNKNOWN",
        flags=_PARSE_ERROR_CREDENTIAL_FLAGS if names_credential(text) else _PARSE_ERROR_FLAGS,
        error=message,
    )


def _over_statement_limit(text: str, limit: int) -> str | None:
    """How many statements ``text`` holds, in words, if the SQL scanner finds more than ``limit``.

    Only the prefix up to the (limit + 1)-th semicolon is scanned first, so a flood of millions
    of statements is refused after scanning ``limit`` of them. The scanner splits at every
    top-level semicolon, also inside SQL-standard function bodies (BEGIN ATOMIC ... END), so it
    can over-count those (the refusal names the setting to raise).
    """
    cut = -1
    for _ in range(limit + 1):
        cut = text.find(";", cut + 1)
        if cut < 0:
            break
    if 0 <= cut < len(text) - 1:
        try:
            # A cut inside a literal or comment makes the scanner fail: count the whole text.
            prefix = _pg_parser.split(text[: cut + 1], with_parser=False, only_slices=True)
        except Exception:
            prefix = ()
        if len(prefix) > limit:  # the prefix's statements are the text's first ones
            return f"more than {limit}"
    try:
        count = len(_pg_parser.split(text, with_parser=False, only_slices=True))
    except Exception:  # the parser will report what is wrong with the text
        return None
    return str(count) if count > limit else None


def _too_many_statements(text: str, count: str, limit: int) -> Statement:
    """The single statement reported for a query string over the statement limit (denied)."""
    return _refused_whole(
        text,
        "MULTIPLE",
        f"the query string holds {count} statements; the limit is {limit} per message "
        "(max_statements_per_query); send smaller batches",
    )


def _costly_to_scan(text: str, cost: int) -> Statement:
    """The single statement reported for text whose operator-character runs PostgreSQL's
    scanner would read again and again (see lexer_cost): refused unscanned (denied)."""
    return _refused_whole(
        text,
        "UNKNOWN",
        f"the statement text holds runs of operator characters (+, -, /*) that would take "
        f"about {cost:,} character reads to scan; the limit is {_LEXER_COST_MAX:,}",
    )


def _refused_whole(text: str, command: str, error: str) -> Statement:
    """One statement standing for all of `text`, refused for a limit before it was classified
    (its credential flag from the text alone, so the log still withholds a secret in it)."""
    return Statement(
        text=text,
        kind=_UNKNOWN,
        command=command,
        flags=_LIMIT_CREDENTIAL_FLAGS if names_credential(text) else _LIMIT_FLAGS,
        error=error,
    )


def oversized_statement(size: int, limit: int) -> Statement:
    """The statement reported for SQL text over `max_statement_bytes`: refused unread (denied)."""
    return Statement(
        text="",
        kind=_UNKNOWN,
        command="UNKNOWN",
        flags=_LIMIT_FLAGS,
        error=f"the statement text is {size} bytes; the limit is {limit} (max_statement_bytes)",
    )


def function_call_statement(oid: int) -> Statement:
    """The statement the relay passes to policy for a FunctionCall ('F') protocol message.

    It carries no SQL; the function's OID is recorded as ``oid:<n>`` in ``functions``.
    """
    return Statement(
        text="",
        kind=_UNKNOWN,
        command="FUNCTION CALL",
        functions=(f"oid:{oid}",),
        flags=frozenset({"function_call"}),
    )
