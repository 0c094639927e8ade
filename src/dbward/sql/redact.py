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


def without_literals(text: str, credential: re.Pattern[str]) -> str | None:
    """`text` with every string literal as '…' and no comments; None if it cannot be scanned.

    A quoted identifier is kept unless `credential` matches it (`"host=h password=x"` is valid
    syntax for a column name, and a connection string passed that way is still a secret).
    Everything else is the client's own spelling, so the record still says which role, server
    or function the statement named. Text the scanner rejects (an unterminated quote) gives
    None: the caller withholds all of it, since where the secret ends is then unknown.
    """
    try:
        # Offsets are in characters of `text`; text that is not valid Unicode (a lone
        # surrogate from a SQL_ASCII client) is refused by the scanner's UTF-8 conversion.
        tokens = parser.scan(text)
    except (UnicodeError, parser.ParseError):
        return None
    out: list[str] = []
    position = 0
    after_comment = False
    for token in tokens:
        gap = text[position : token.start]
        # Between tokens the scanner leaves only whitespace; anything else is replaced rather
        # than trusted (the cost of being wrong is a secret in the log).
        if not gap.isspace():
            gap = " " if gap else ""
        if not (after_comment and out and out[-1][-1:].isspace()):
            out.append(gap)
        position = token.end + 1
        name = token.name
        after_comment = name in _COMMENT_TOKENS
        if after_comment:
            # A comment separates tokens as a space does: ALTER/**/ROLE must not become ALTERROLE.
            if out and not out[-1][-1:].isspace():
                out.append(" ")
            continue
        if name in _LITERAL_TOKENS:
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
