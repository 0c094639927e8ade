"""The SQL a PL/pgSQL body runs, read with PostgreSQL's own PL/pgSQL parser (libpg_query)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
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


def read_plpgsql(statement: str, body: str) -> PlpgsqlSql:
    """Every piece of SQL in the PL/pgSQL `body` of a DO or CREATE FUNCTION `statement`.

    libpg_query compiles the body as PostgreSQL's PL/pgSQL does (declarations, statements,
    expressions); each expression and statement comes back with the parse mode PostgreSQL uses
    for it, which says how to read it as a statement of its own. Its JSON leaves out the
    default of a record (composite) variable, so declarations' defaults are also read from the
    body's tokens.
    """
    found = PlpgsqlSql()
    tokens = _tokens(body)
    if tokens is None:
        found.error = "a body the SQL scanner cannot read"
        return found
    if _has_dump_option(body, tokens):
        # `#option dump` makes libpg_query print the compiled body to this process's stdout.
        found.error = "the #option dump directive"
        return found
    try:
        functions = json.loads(_pg_parser.parse_plpgsql_json(statement))
    except _pg_parser.ParseError as exc:
        found.error = str(exc.args[0]) if exc.args else "syntax error"
        return found
    except Exception as exc:  # the C extension may raise anything on hostile input
        found.error = f"parser failure: {type(exc).__name__}"
        return found
    if not any(
        isinstance(item, dict) and "action" in item.get("PLpgSQL_function", {})
        for item in functions
    ):
        # Nothing compiled (libpg_query only compiles a language named exactly plpgsql).
        found.error = "no PL/pgSQL function body"
        return found
    declarations = _declarations(body, tokens)
    if declarations is None or not _records_read(functions, declarations):
        found.error = "declarations that could not be read"
        return found
    found.texts.extend(
        "SELECT " + declaration.default
        for declaration in declarations
        if declaration.default is not None
    )
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


def _records_read(functions: list[Any], declarations: list[_Declaration]) -> bool:
    """Whether every record variable the body declares was read as a variable declaration
    (as many of each name as the compiler made): its default, which only the tokens show,
    cannot have been missed (fail closed)."""
    # By name and line: a same-named variable read elsewhere cannot vouch for a record missed.
    # Where a record is declared, every datum of that name and line must have been read (a
    # scalar on the same line cannot stand in for it either).
    found = Counter((d.name, d.line) for d in declarations if d.kind == "variable")
    records: Counter[tuple[str, int]] = Counter()
    others: Counter[tuple[str, int]] = Counter()
    for function in functions:
        if not isinstance(function, dict):
            return False
        for datum in function.get("PLpgSQL_function", {}).get("datums", ()):
            if not isinstance(datum, dict):
                return False
            for kind, fields in datum.items():
                # Declared in the body (a line number); parameters, NEW and OLD have none.
                if not isinstance(fields, dict) or "lineno" not in fields:
                    continue
                key = (str(fields.get("refname")), int(fields["lineno"]))
                (records if kind == "PLpgSQL_rec" else others)[key] += 1
    return all(found[key] >= count + others[key] for key, count in records.items())


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


_COMMENTS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})
_OPENING: Final = frozenset({"ASCII_40", "ASCII_91"})  # ( [
_CLOSING: Final = frozenset({"ASCII_41", "ASCII_93"})  # ) ]
_ASSIGNING: Final = frozenset({"COLON_EQUALS", "ASCII_61"})  # := =
_DEFAULT_MARKERS: Final = _ASSIGNING | {"DEFAULT"}


def _tokens(text: str) -> list[Any] | None:
    """The SQL scanner's tokens (offsets in characters), or None if it cannot scan `text`."""
    try:
        tokens: list[Any] = _pg_parser.scan(text)
    except Exception:
        return None
    for token in tokens:  # offsets are used to slice: refuse any that do not fit the text
        if not 0 <= token.start <= token.end < len(text):
            return None
    # The scanner reports comments as tokens; PostgreSQL's grammar never sees them.
    return [token for token in tokens if token.name not in _COMMENTS]


def _assignment_parts(text: str) -> tuple[str, str] | None:
    """`target := value` (or `=`) split at the assignment, found with the SQL scanner."""
    tokens = _tokens(text)
    if tokens is None:
        return None
    depth = 0
    for token in tokens:
        name = token.name
        if name in _OPENING:
            depth += 1
        elif name in _CLOSING:
            depth -= 1
        elif depth == 0 and name in _ASSIGNING:
            return text[: token.start], text[token.end + 1 :]
    return None


@dataclass
class _Declaration:
    """One variable declaration as read from a DECLARE section's tokens."""

    name: str  # as PostgreSQL folds it: unquoted lower-cased, quoted verbatim
    line: int  # of the name, counted from 1 at the body's start, as PL/pgSQL does
    kind: str  # "variable", "cursor" or "alias"
    default: str | None  # the default expression's text, if any


# Tokens after which a statement (so a block, so a DECLARE) may start, at bracket depth 0.
_STATEMENT_ENDS: Final = frozenset({"ASCII_59", "BEGIN_P", "THEN", "ELSE", "LOOP"})


def _declarations(body: str, tokens: list[Any]) -> list[_Declaration] | None:
    """Every declaration in the DECLARE sections of `body` (None: unreadable).

    A DECLARE section starts at DECLARE where a statement may start (bracket depth 0, after
    `;`, BEGIN, THEN, ELSE, LOOP or a `>>` closing a label, or at the very start) and ends at
    its BEGIN; a declaration ends at a `;` at depth 0. Compile options (`#variable_conflict
    use_column`, `#print_strict_params on`) may come first. A DECLARE anywhere else at depth 0
    means the body is not read as PostgreSQL reads it: refused (None).
    """
    found: list[_Declaration] = []
    lines = _LineCounter(body)
    start = 0
    while (
        start + 2 < len(tokens)
        and tokens[start].name == "Op"
        and body[tokens[start].start : tokens[start].end + 1] == "#"
    ):
        start += 3  # `#` name value
    depth = 0
    declaring = False
    statement_may_start = True
    current: list[Any] = []
    for token in tokens[start:]:
        name = token.name
        if name in _OPENING:
            depth += 1
        elif name in _CLOSING:
            depth -= 1
            if depth < 0:
                return None
        if not declaring:
            if depth == 0 and name == "DECLARE":
                if not statement_may_start:
                    return None
                declaring, current = True, []
            elif depth == 0:
                text = body[token.start : token.end + 1]
                statement_may_start = (
                    name in _STATEMENT_ENDS
                    or (name == "Op" and text == ">>")  # <<label>>
                    or (name == "IDENT" and text.lower() == "loop")  # no SQL keyword
                )
            else:
                statement_may_start = False
            continue
        if depth == 0 and not current and name == "BEGIN_P":
            declaring, statement_may_start = False, True
        elif depth == 0 and name == "ASCII_59":  # ;
            declaration = _declaration(body, current, token.start, lines)
            if declaration is None:
                return None
            found.append(declaration)
            current = []
        else:
            current.append(token)
    if declaring or depth != 0:
        return None  # a DECLARE section or a bracket never ended
    return found


def _declaration(
    body: str, tokens: list[Any], end: int, lines: _LineCounter
) -> _Declaration | None:
    """`name [CONSTANT] type ... [:= | = | DEFAULT expr]`, `name [[NO] SCROLL] CURSOR ...` or
    `name ALIAS FOR ...` (the tokens before its `;`, which is at `end`)."""
    if not tokens:
        return None
    first = body[tokens[0].start : tokens[0].end + 1]
    if first.startswith('"'):
        name = first[1:-1].replace('""', '"')
    elif first[:2].lower() == "u&":
        return None  # a Unicode-escaped name: not worth folding by hand
    else:
        name = first.lower()
    line = lines.at(tokens[0].start)
    following = [token.name for token in tokens[1:4]]
    if following[:1] == ["CURSOR"] or following[:2] == ["SCROLL", "CURSOR"]:
        return _Declaration(name, line, "cursor", None)
    if following[:3] == ["NO", "SCROLL", "CURSOR"]:
        return _Declaration(name, line, "cursor", None)
    if following[:1] == ["ALIAS"]:
        return _Declaration(name, line, "alias", None)
    depth = 0
    for token in tokens[1:]:
        if token.name in _OPENING:
            depth += 1
        elif token.name in _CLOSING:
            depth -= 1
        elif depth == 0 and token.name in _DEFAULT_MARKERS:
            return _Declaration(name, line, "variable", body[token.end + 1 : end])
    return _Declaration(name, line, "variable", None)


class _LineCounter:
    """Line numbers of increasing offsets in a text, counting newlines only once."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._offset = 0
        self._line = 1

    def at(self, offset: int) -> int:
        if offset < self._offset:  # not expected (offsets only grow): count afresh
            self._offset, self._line = 0, 1
        self._line += self._text.count("\n", self._offset, offset)
        self._offset = offset
        return self._line


def _has_dump_option(body: str, tokens: list[Any]) -> bool:
    """Whether the body holds the `#option dump` compile option."""
    return any(
        token.name == "Op"
        and body[token.start : token.end + 1] == "#"
        and body[following.start : following.end + 1].lower() == "option"  # a keyword token
        for token, following in itertools.pairwise(tokens)
    )
