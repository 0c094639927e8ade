"""The SQL a PL/pgSQL body runs, read with PostgreSQL's own PL/pgSQL parser (libpg_query)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Final

import pglast
from pglast import ast
from pglast import parser as _pg_parser
from pglast.stream import RawStream

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
        functions = _compile(statement, body, tokens)
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


def _compile(statement: str, body: str, tokens: list[Any]) -> Any:
    """libpg_query's compile of the code, as JSON; raises its ParseError.

    libpg_query compiles without a catalog, so it refuses code PostgreSQL compiles when a type
    needs one: a VARIADIC parameter of a concrete array type, `%TYPE` in the signature, a type
    in a schema other than pg_catalog and public, an array of a type it does not know. Such
    code is compiled again with stand-ins for those types (`_stand_in`): the body's statements
    and expressions, and its variables' names and lines, stay exactly as written, so what is
    read from it is what PostgreSQL runs. Only the first error is ever reported.
    """
    try:
        return json.loads(_pg_parser.parse_plpgsql_json(statement))
    except _pg_parser.ParseError:
        stand_in = _stand_in(statement, body, tokens)
        if stand_in is None:
            raise
    try:
        return json.loads(_pg_parser.parse_plpgsql_json(stand_in))
    except _pg_parser.ParseError:
        pass
    # The stand-in fails too: report what PostgreSQL's own grammar says about the original.
    return json.loads(_pg_parser.parse_plpgsql_json(statement))


# Types libpg_query resolves without a catalog: pg_catalog's and public's by name.
_RESOLVED_SCHEMAS: Final = frozenset({"pg_catalog", "public"})
# Tokens a plain type name may consist of in a declaration (names and keywords, dots, array
# brackets, typmods): anything else leaves the declaration as written.
_TYPE_PUNCTUATION: Final = frozenset(
    {"ASCII_46", "ASCII_91", "ASCII_93", "ASCII_40", "ASCII_41", "ASCII_44", "ICONST"}
)
# Where a declaration's type ends, as PL/pgSQL's read_datatype stops (at bracket depth 0).
_TYPE_ENDS: Final = frozenset({"COLON_EQUALS", "ASCII_61", "DEFAULT", "NOT", "COLLATE"})


def _stand_in(statement: str, body: str, tokens: list[Any]) -> str | None:
    """`statement` with types libpg_query cannot resolve replaced, or None if it has none.

    In the signature: VARIADIC becomes a plain parameter (the array it is), `%TYPE` and arrays
    become text, a type in another schema its bare name (an unknown name libpg_query takes for
    a composite type, as it does unqualified ones). In the body's declarations (same offsets
    and lines): an array becomes text (PL/pgSQL holds arrays as scalars), a schema-qualified
    name its bare name. Nothing else changes.
    """
    try:
        (raw,) = pglast.parse_sql(statement)
    except Exception:
        return None
    node = raw.stmt
    changed = False
    if isinstance(node, ast.CreateFunctionStmt):
        for param in node.parameters or ():
            if param.mode == "v":  # FUNC_PARAM_VARIADIC
                param.mode = "i"  # FUNC_PARAM_IN
                changed = True
            stand = _type_stand_in(param.argType)
            if stand is not None:
                param.argType, changed = stand, True
        stand = _type_stand_in(node.returnType)
        if stand is not None:
            node.returnType, changed = stand, True
        options = node.options or ()
    elif isinstance(node, ast.DoStmt):
        options = node.args or ()
    else:
        return None
    new_body = _declarations_stand_in(body, tokens)
    if new_body is not None:
        for option in options:
            if option.defname != "as":
                continue
            # CREATE FUNCTION's AS is a list (`AS 'file', 'symbol'` for C), DO's a string.
            arg = option.arg
            listed = isinstance(arg, tuple | list)
            if listed and len(arg) == 1:
                arg = arg[0]
            if not isinstance(arg, ast.String) or arg.sval != body:
                return None
            replaced = ast.String(sval=new_body)
            option.arg = (replaced,) if listed else replaced
            changed = True
    if not changed:
        return None
    try:
        return str(RawStream()(node))
    except Exception:
        return None


def _type_stand_in(type_name: Any) -> Any:
    """A TypeName libpg_query can resolve in place of `type_name`, or None if it can already."""
    if type_name is None:
        return None
    names = [getattr(n, "sval", None) for n in type_name.names or ()]
    if type_name.pct_type or type_name.arrayBounds:
        return ast.TypeName(
            names=(ast.String(sval="pg_catalog"), ast.String(sval="text")),
            setof=type_name.setof,
            typemod=-1,
        )
    if len(names) == 2 and names[0] not in _RESOLVED_SCHEMAS and isinstance(names[1], str):
        return ast.TypeName(
            names=(ast.String(sval=names[1]),),
            setof=type_name.setof,
            typmods=type_name.typmods,
            typemod=-1,
        )
    return None


def _declarations_stand_in(body: str, tokens: list[Any]) -> str | None:
    """`body` with declared types libpg_query cannot resolve replaced, or None if none are.

    The replacement keeps every other character, and every newline, where it was.
    """
    spans = _declared_types(body, tokens)
    if not spans:
        return None
    text = list(body)
    changed = False
    for span in spans:
        words = [body[t.start : t.end + 1] for t in span]
        start, end = span[0].start, span[-1].end + 1
        if any(t.name in ("ASCII_91", "ARRAY") for t in span):
            replacement = "text" if end - start >= 4 else "int"
        elif (
            len(span) >= 3
            and span[1].name == "ASCII_46"
            and (len(span) == 3 or span[3].name == "ASCII_40")
        ):
            schema = _folded_name(words[0])
            if schema is None or schema in _RESOLVED_SCHEMAS:
                continue
            end = span[2].start  # drop `schema.`, keep the name and any typmods
            replacement = ""
        else:
            continue
        if "\n" in body[start : start + len(replacement)] or len(replacement) > end - start:
            continue
        for i in range(start, end):
            if text[i] != "\n":
                text[i] = " "
        text[start : start + len(replacement)] = replacement
        changed = True
    return "".join(text) if changed else None


def _declared_types(body: str, tokens: list[Any]) -> list[list[Any]]:
    """The type tokens of each variable declaration (plain type names only)."""
    spans: list[list[Any]] = []
    for declaration in _declaration_tokens(body, tokens) or ():
        read = _declaration(body, declaration, _LineCounter(body))
        if read is None or read.kind != "variable":
            continue
        rest = declaration[1:]
        if rest and body[rest[0].start : rest[0].end + 1].lower() == "constant":
            rest = rest[1:]
        span: list[Any] = []
        depth = 0
        for token in rest:
            depth += (token.name in _OPENING) - (token.name in _CLOSING)
            if depth == 0 and token.name in _TYPE_ENDS:
                break
            span.append(token)
        if span and all(
            t.name == "IDENT" or t.kind != "NO_KEYWORD" or t.name in _TYPE_PUNCTUATION for t in span
        ):
            spans.append(span)
    return spans


def _records_read(functions: list[Any], declarations: list[_Declaration]) -> bool:
    """Whether the declarations read from the tokens are exactly those the compiler made, so
    that every record variable's default, which only the tokens show, has been read (fail
    closed).

    Each declaration read must be a variable the compiler declared with that name on that line:
    a scalar with the very default the JSON gives it, a cursor with the very query, or a record
    (whose default the JSON leaves out); and every record declared in the body must have been
    read so. Text misread as a declaration (SQL after a `THEN`, an `ALIAS`, a useless extra
    `DECLARE`) matches no variable and is refused, so it cannot stand in for a record whose
    declaration the reader took for something else and whose default it did not see.
    """
    made: dict[tuple[str, int], list[tuple[str, str | None]]] = {}
    for function in functions:
        if not isinstance(function, dict):
            return False
        compiled = function.get("PLpgSQL_function", {})
        implicit = _cursor_loop_records(compiled.get("action"))
        for datum in compiled.get("datums", ()):
            if not isinstance(datum, dict):
                return False
            for kind, fields in datum.items():
                # Declared in the body (a line number); parameters, NEW and OLD have none.
                if not isinstance(fields, dict) or "lineno" not in fields:
                    continue
                key = (str(fields.get("refname")), int(fields["lineno"]))
                if kind == "PLpgSQL_rec":
                    if fields.get("dno") in implicit:
                        continue  # a cursor loop's own record: declared by no DECLARE
                    made.setdefault(key, []).append(("record", None))
                elif kind == "PLpgSQL_var":
                    cursor = fields.get("cursor_explicit_expr")
                    if cursor is not None:
                        made.setdefault(key, []).append(("cursor", _query(cursor)))
                    else:
                        default = fields.get("default_val")
                        text = None if default is None else _query(default)
                        made.setdefault(key, []).append(("variable", text))
                # Rows (cursor arguments) are never given a default.
    for declaration in declarations:
        if declaration.kind == "alias":
            continue  # no variable of its own; its shape was checked when it was read
        candidates = made.get((declaration.name, declaration.line), [])
        wanted = (
            declaration.kind,
            declaration.query if declaration.kind == "cursor" else declaration.default,
        )
        if wanted in candidates:
            candidates.remove(wanted)
        elif declaration.kind == "variable" and ("record", None) in candidates:
            candidates.remove(("record", None))
        else:
            return False
    return not any(("record", None) in left for left in made.values())


def _cursor_loop_records(action: object) -> set[int]:
    """Datum numbers of the records `FOR r IN cursor LOOP` declares itself (no default)."""
    found: set[int] = set()
    stack = [action]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            loop = node.get("PLpgSQL_stmt_forc")
            if isinstance(loop, dict):
                var = loop.get("var")
                record = var.get("PLpgSQL_rec") if isinstance(var, dict) else None
                if isinstance(record, dict) and isinstance(record.get("dno"), int):
                    found.add(record["dno"])
            stack.extend(child for child in node.values() if isinstance(child, dict | list))
    return found


def _query(expr: object) -> str | None:
    """The SQL text of a wrapped PLpgSQL_expr (None if there is none)."""
    if not isinstance(expr, dict):
        return None
    query = expr.get("PLpgSQL_expr", {}).get("query")
    return query if isinstance(query, str) else None


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

    name: str  # as PostgreSQL folds it: unquoted ASCII lower-cased, quoted verbatim; truncated
    line: int  # of the name, counted from 1 at the body's start, as PL/pgSQL does
    kind: str  # "variable", "cursor" or "alias"
    default: str | None  # the default expression's text, if any
    query: str | None = None  # a cursor's query


# Tokens after which a statement (so a block, so a DECLARE) may start, at bracket depth 0.
_STATEMENT_ENDS: Final = frozenset({"ASCII_59", "BEGIN_P", "THEN", "ELSE", "LOOP"})


def _declarations(body: str, tokens: list[Any]) -> list[_Declaration] | None:
    """Every declaration in the DECLARE sections of `body` (None: unreadable)."""
    sections = _declaration_tokens(body, tokens)
    if sections is None:
        return None
    found: list[_Declaration] = []
    lines = _LineCounter(body)
    for current in sections:
        declaration = _declaration(body, current, lines)
        if declaration is None:
            return None
        found.append(declaration)
    return found


def _declaration_tokens(body: str, tokens: list[Any]) -> list[list[Any]] | None:
    """The tokens of every declaration in the DECLARE sections of `body` (None: unreadable).

    A DECLARE section starts at DECLARE where a statement may start (bracket depth 0, after
    `;`, BEGIN, THEN, ELSE, LOOP or a `>>` closing a label, or at the very start) and ends at
    its BEGIN; a declaration ends at a `;` at depth 0, and a DECLARE where a declaration may
    start is skipped (PL/pgSQL allows useless extra DECLAREs). Compile options
    (`#variable_conflict use_column`, `#print_strict_params on`) may come first. A DECLARE
    anywhere else at depth 0 means the body is not read as PostgreSQL reads it: refused (None).
    """
    found: list[list[Any]] = []
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
        if depth == 0 and not current and name in ("BEGIN_P", "DECLARE"):
            if name == "BEGIN_P":
                declaring, statement_may_start = False, True
        elif depth == 0 and name == "ASCII_59":  # ;
            found.append(current)
            current = []
        else:
            current.append(token)
    if declaring or depth != 0:
        return None  # a DECLARE section or a bracket never ended
    return found


def _declaration(body: str, tokens: list[Any], lines: _LineCounter) -> _Declaration | None:
    """`name [CONSTANT] type ... [:= | = | DEFAULT expr]`, `name [[NO] SCROLL] CURSOR [(args)]
    FOR|IS query` or `name ALIAS FOR item` (the tokens before its `;`); None if it has
    none of these shapes."""
    if not tokens:
        return None
    name = _folded_name(body[tokens[0].start : tokens[0].end + 1])
    if name is None:
        return None
    line = lines.at(tokens[0].start)
    rest = tokens[1:]
    kinds = [token.name for token in rest[:3]]
    scroll = 2 if kinds[:2] == ["NO", "SCROLL"] else 1 if kinds[:1] == ["SCROLL"] else 0
    if scroll < len(rest) and rest[scroll].name == "CURSOR":
        query = _cursor_query(body, rest[scroll + 1 :])
        return None if query is None else _Declaration(name, line, "cursor", None, query)
    if (
        rest
        and rest[0].name == "IDENT"
        and body[rest[0].start : rest[0].end + 1].lower() == "alias"
    ):
        # ALIAS is no SQL keyword: `name ALIAS FOR word[.word ...]` or `$n`, nothing else.
        item = rest[2:]
        if (
            kinds[1:2] != ["FOR"]
            or len(item) % 2 == 0
            or any((token.name == "ASCII_46") != (i % 2 == 1) for i, token in enumerate(item))
        ):
            return None
        return _Declaration(name, line, "alias", None)
    depth = 0
    for index, token in enumerate(rest):
        if token.name in _OPENING:
            depth += 1
        elif token.name in _CLOSING:
            depth -= 1
        elif depth == 0 and token.name in _DEFAULT_MARKERS:
            value = rest[index + 1 :]
            if not value:
                return None
            # As PL/pgSQL takes it: from the first token to the end of the last one.
            default = body[value[0].start : value[-1].end + 1]
            return _Declaration(name, line, "variable", default)
    return _Declaration(name, line, "variable", None)


def _cursor_query(body: str, tokens: list[Any]) -> str | None:
    """The query of a cursor declaration: the tokens after CURSOR are `[(args)] FOR|IS query`."""
    index = _closing(tokens) + 1 if tokens and tokens[0].name == "ASCII_40" else 0  # (args)
    if index + 1 >= len(tokens) or tokens[index].name not in ("FOR", "IS"):
        return None
    return body[tokens[index + 1].start : tokens[-1].end + 1]


def _closing(tokens: list[Any]) -> int:
    """The index of the bracket closing the one `tokens` opens with (len(tokens) if none)."""
    depth = 0
    for index, token in enumerate(tokens):
        depth += (token.name in _OPENING) - (token.name in _CLOSING)
        if depth == 0:
            return index
    return len(tokens)


_NAMEDATALEN: Final = 64


def _uncut_name(text: str) -> str | None:
    """An identifier as PostgreSQL's scanner reads it, before it is cut to NAMEDATALEN - 1
    bytes: quotes removed, or ASCII letters lower-cased; None for U&"..." names."""
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    if text[:2].lower() == "u&":
        return None  # a Unicode-escaped name: not worth folding by hand
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in text)


def _cut(name: str) -> str:
    """`name` cut to NAMEDATALEN - 1 bytes of UTF-8 at a character boundary, as PostgreSQL's
    scanner (and so pglast) cuts an identifier in a UTF8 database."""
    encoded = name.encode("utf-8")
    if len(encoded) < _NAMEDATALEN:
        return name
    return encoded[: _NAMEDATALEN - 1].decode("utf-8", errors="ignore")


def _folded_name(text: str) -> str | None:
    """An identifier as PostgreSQL's scanner returns it (UTF-8): quotes removed, or ASCII
    letters lower-cased, then truncated to NAMEDATALEN - 1 bytes; None for U&"..." names."""
    name = _uncut_name(text)
    return None if name is None else _cut(name)


def name_was_cut(sql: str, name: str) -> bool:
    """Whether `name`, as the parser returned it from `sql`, may be a longer identifier the
    scanner cut to NAMEDATALEN - 1 bytes (a server built with a larger NAMEDATALEN keeps the
    whole name). True when unsure: `sql` does not scan, or holds a U&"..." identifier."""
    if len(name.encode("utf-8")) < _NAMEDATALEN - 4:
        return False  # a cut name is 60-63 bytes (a UTF-8 character is at most 4)
    tokens = _tokens(sql)
    if tokens is None:
        return True
    for token in tokens:
        if token.name == "UIDENT":
            return True
        if token.name == "IDENT":
            whole = _uncut_name(sql[token.start : token.end + 1])
            if whole is None or (whole != name and _cut(whole) == name):
                return True
    return False


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
