"""Statement text with its literals and comments taken out, for logging text that holds a secret."""

from __future__ import annotations

import re
from typing import Final

from pglast import parser

# Tokens that carry a value the client typed: string constants of every spelling (plain, E'',
# dollar-quoted, U&'', N''), bit and hex strings. Numbers stay: no credential is a bare number
# in valid SQL, and they make the record readable (LIMIT 10, VALID UNTIL is a string anyway).
_LITERAL_TOKENS: Final = frozenset({"SCONST", "USCONST", "BCONST", "XCONST"})
_COMMENT_TOKENS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})
_QUOTED_IDENTIFIER_TOKENS: Final = frozenset({"IDENT", "UIDENT"})
LITERAL_PLACEHOLDER: Final = "'…'"
IDENTIFIER_PLACEHOLDER: Final = '"…"'


def without_literals(
    text: str, credential: re.Pattern[str], *, code_bodies: bool = False
) -> str | None:
    """`text` with every string literal as '…' and no comments; None if it cannot be scanned.

    A quoted identifier is kept unless `credential` matches it (`"host=h password=x"` is valid
    syntax for a column name, and a connection string passed that way is still a secret).
    Everything else is the client's own spelling, so the record still says which role, server
    or function the statement named. Text the scanner rejects (an unterminated quote) gives
    None: the caller withholds all of it, since where the secret ends is then unknown.

    With `code_bodies` (for a DO block whose body PostgreSQL's PL/pgSQL parser accepted), the
    body is code, not a value: when it is dollar-quoted it is kept, with its own literals and
    comments taken out the same way (PL/pgSQL is read by the same scanner), so
    `DO $$ ... CREATE ROLE app PASSWORD '…' ... $$` still shows what the block does. Any other
    language's body is one literal: its strings may not be SQL's.
    """
    try:
        # Offsets are in characters of `text`; text that is not valid Unicode (a lone
        # surrogate from a SQL_ASCII client) is refused by the scanner's UTF-8 conversion.
        tokens = parser.scan(text)
    except (UnicodeError, parser.ParseError):
        return None
    # (index, token) of every token but comments: what the two readings below look at
    words = [(i, t) for i, t in enumerate(tokens) if t.name not in _COMMENT_TOKENS]
    body = _do_body(words, text) if code_bodies else None
    values = _setting_values(words)
    out: list[str] = []
    position = 0
    space = ""  # the whitespace since the last token kept
    dropped = False  # a comment was taken out of it
    for index, token in enumerate(tokens):
        gap = text[position : token.start]
        # Between tokens the scanner leaves only whitespace; anything else is replaced rather
        # than trusted (the cost of being wrong is a secret in the log).
        space += gap if gap.isspace() or not gap else " "
        position = token.end + 1
        name = token.name
        if name in _COMMENT_TOKENS:
            dropped = True
            continue
        if dropped:
            # A comment separates tokens as a space does (ALTER/**/ROLE is not ALTERROLE); one
            # that ended a line leaves the line break and the next line's indentation.
            newline = space.rfind("\n")
            space = space[newline:] if newline >= 0 else " "
            dropped = False
        if out:
            out.append(space)
        space = ""
        if index in values:
            out.append(LITERAL_PLACEHOLDER)
            continue
        if name in _LITERAL_TOKENS:
            if token is body:
                out.append(_redacted_body(text[token.start : position], credential))
            else:
                out.append(LITERAL_PLACEHOLDER)
            continue
        spelled = text[token.start : position]
        if (
            name in _QUOTED_IDENTIFIER_TOKENS
            and spelled[-1:] == '"'
            and credential.search(spelled) is not None
        ):
            out.append(IDENTIFIER_PLACEHOLDER)
        else:
            out.append(spelled)
    tail = text[position:]
    if tail and not tail.isspace():
        out.append(" …")
    return "".join(out).strip()


# Tokens a setting's value may be spelled with besides a literal: a name (`SET app.password =
# Hunter2` sets it to hunter2, `"Hunter2"` to Hunter2), a non-reserved keyword, a number.
_VALUE_TOKENS: Final = frozenset({"IDENT", "UIDENT", "ICONST", "FCONST"})
# What may follow a value of a list of them; anything else makes the token part of an
# expression (`UPDATE t SET password = crypt(…)`, `SET a = b + 1`), which names, not values.
_AFTER_VALUE: Final = frozenset({"ASCII_44", "ASCII_59", "ASCII_41"})  # , ; )


def _setting_values(words: list[tuple[int, parser.Token]]) -> set[int]:
    """Indices of the tokens spelling a value after `SET name =` or `SET name TO`, literals aside.

    `SET`, `ALTER ROLE/DATABASE … SET` and a function's `SET` clause take an unquoted name or a
    number as the value: `SET app.password = Hunter2` is valid SQL, and its value is as secret
    as a quoted one. A value is a single token followed by a comma, a ";", a ")", a keyword, a
    name or the end (an UPDATE's column name followed by "=" or an expression is kept).
    """
    found: set[int] = set()
    state = 0  # 0: outside, 1: after SET (reading the name), 2: a value expected, 3: after one
    for position, (index, token) in enumerate(words):
        name = token.name
        if name == "SET":
            state = 1
        elif state == 1:
            if name in ("ASCII_61", "TO"):
                state = 2
            elif name not in ("IDENT", "ASCII_46") and token.kind == "NO_KEYWORD":
                state = 0
        elif state == 3:
            state = 2 if name == "ASCII_44" else 0  # a list goes on after a comma
        elif state == 2:
            if name in ("ASCII_43", "ASCII_45"):  # a sign before a number
                continue
            following = words[position + 1][1] if position + 1 < len(words) else None
            ends = (
                following is None
                or following.name in _AFTER_VALUE
                or following.kind != "NO_KEYWORD"
                or following.name in ("IDENT", "UIDENT")
            )
            is_value = name in _VALUE_TOKENS or token.kind in (
                "UNRESERVED_KEYWORD",
                "COL_NAME_KEYWORD",
                "TYPE_FUNC_NAME_KEYWORD",
            )
            if ends and is_value:
                found.add(index)
            state = 3 if ends else 0
    return found


def _do_body(words: list[tuple[int, parser.Token]], text: str) -> parser.Token | None:
    """The dollar-quoted body of a DO block in PL/pgSQL (the default language), else None."""
    if not words or words[0][1].name != "DO":
        return None
    body = None
    for position in range(1, len(words)):
        token = words[position][1]
        if token.name == "LANGUAGE":
            if position + 1 >= len(words):
                return None
            language = words[position + 1][1]
            if text[language.start : language.end + 1].strip("'\"").lower() != "plpgsql":
                return None
        elif token.name == "SCONST" and body is None and text[token.start] == "$":
            body = token
    return body


def _redacted_body(literal: str, credential: re.Pattern[str]) -> str:
    """A dollar-quoted PL/pgSQL body with its own literals and comments taken out."""
    tag = literal[: literal.index("$", 1) + 1]
    inner = without_literals(literal[len(tag) : -len(tag)], credential)
    return LITERAL_PLACEHOLDER if inner is None else f"{tag} {inner} {tag}"
