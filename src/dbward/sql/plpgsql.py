"""The SQL a PL/pgSQL body runs, read with PostgreSQL's own PL/pgSQL parser (libpg_query)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from pglast import parser as _pg_parser

# PostgreSQL's RawParseMode (parser/parser.h): how PL/pgSQL hands each piece to the SQL parser.
_RAW_PARSE_DEFAULT: Final = 0  # a whole SQL statement
_RAW_PARSE_PLPGSQL_EXPR: Final = 2  # an expression: read as SELECT <expr>
_RAW_PARSE_PLPGSQL_ASSIGN: Final = frozenset({3, 4, 5})  # `target := expr`, 1 to 3 name parts

# Where an expression's *value* is SQL that EXECUTE runs: (node type or "", key).
_DYNAMIC_SQL_KEYS: Final = frozenset(
    {
        ("PLpgSQL_stmt_dynexecute", "query"),  # EXECUTE <expr>
        ("PLpgSQL_stmt_dynfors", "query"),  # FOR r IN EXECUTE <expr>
        ("", "dynquery"),  # OPEN c FOR EXECUTE <expr>, RETURN QUERY EXECUTE <expr>
    }
)
# A body with more pieces of SQL than this is refused rather than read (each one is parsed).
MAX_PIECES: Final = 10_000


@dataclass
class PlpgsqlSql:
    """What a PL/pgSQL body runs, as SQL statements the classifier can read."""

    texts: list[str] = field(default_factory=list)  # statements; expressions as SELECT <expr>
    executed: list[str] = field(default_factory=list)  # SELECT <expr> whose value EXECUTE runs
    error: str | None = None  # the body could not be read: nothing in it can be checked


def read_plpgsql(statement: str) -> PlpgsqlSql:
    """Every piece of SQL in the PL/pgSQL body of a DO or CREATE FUNCTION `statement`.

    libpg_query compiles the body as PostgreSQL's PL/pgSQL does (declarations, statements,
    expressions); each expression and statement comes back with the parse mode PostgreSQL uses
    for it, which says how to read it as a statement of its own.
    """
    found = PlpgsqlSql()
    try:
        functions = json.loads(_pg_parser.parse_plpgsql_json(statement))
    except _pg_parser.ParseError as exc:
        found.error = str(exc.args[0]) if exc.args else "syntax error"
        return found
    except Exception as exc:  # the C extension may raise anything on hostile input
        found.error = f"parser failure: {type(exc).__name__}"
        return found
    stack: list[tuple[Any, str, str]] = [(functions, "", "")]
    while stack:
        node, parent, key = stack.pop()
        if isinstance(node, list):
            stack.extend((item, parent, key) for item in reversed(node))  # in source order
            continue
        if not isinstance(node, dict):
            continue
        expr = node.get("PLpgSQL_expr")
        if expr is not None:
            if not _add_expression(found, expr, (parent, key)):
                return found
            continue
        for child_key, child in reversed(node.items()):
            if isinstance(child, dict | list):
                # A wrapped node ({"PLpgSQL_stmt_x": {...}}) names the type of its fields' owner.
                owner = child_key if child_key.startswith("PLpgSQL_") else parent
                stack.append((child, owner, child_key))
    return found


def _add_expression(found: PlpgsqlSql, expr: dict[str, Any], where: tuple[str, str]) -> bool:
    """Add one PLpgSQL_expr's SQL to `found`; False when the body must be refused."""
    query = expr.get("query")
    mode = expr.get("parseMode", _RAW_PARSE_DEFAULT)
    if not isinstance(query, str):
        found.error = "an expression without text"
        return False
    if len(found.texts) >= MAX_PIECES:
        found.error = f"more than {MAX_PIECES} statements and expressions"
        return False
    if mode == _RAW_PARSE_DEFAULT:
        found.texts.append(query)
    elif mode == _RAW_PARSE_PLPGSQL_EXPR:
        found.texts.append("SELECT " + query)
        if where in _DYNAMIC_SQL_KEYS or ("", where[1]) in _DYNAMIC_SQL_KEYS:
            found.executed.append("SELECT " + query)
    elif mode in _RAW_PARSE_PLPGSQL_ASSIGN:
        parts = _assignment_parts(query)
        if parts is None:
            found.error = "an assignment that could not be read"
            return False
        target, value = parts
        found.texts.append("SELECT " + value)
        if "[" in target:  # subscripts are expressions too
            found.texts.append("SELECT " + target)
    else:
        found.error = f"an expression in an unknown parse mode ({mode})"
        return False
    return True


def _assignment_parts(text: str) -> tuple[str, str] | None:
    """`target := value` (or `=`) split at the assignment, found with the SQL scanner."""
    try:
        tokens = _pg_parser.scan(text)
    except Exception:
        return None
    data = text.encode("utf-8")  # token offsets are byte offsets
    depth = 0
    for token in tokens:
        name = token.name
        if name in ("ASCII_40", "ASCII_91"):  # ( [
            depth += 1
        elif name in ("ASCII_41", "ASCII_93"):  # ) ]
            depth -= 1
        elif depth == 0 and name in ("COLON_EQUALS", "ASCII_61"):  # := =
            target = data[: token.start].decode("utf-8", "replace")
            value = data[token.end + 1 :].decode("utf-8", "replace")
            return target, value
    return None
