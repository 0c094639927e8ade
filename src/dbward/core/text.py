"""Client text as dbward keeps it: hashed, and cut to a bound where a client chooses its length."""

from __future__ import annotations

import hashlib
import re
from typing import Final

__all__ = [
    "CLAIMED_TEXT_MAX",
    "QUOTED_ERROR_MAX",
    "capped",
    "one_line",
    "text_sha256",
    "without_quoted_values",
]

# What an audit record (and a log line or refusal message) keeps of a name a client claims:
# its user name, database and application_name, a startup parameter's name or option. That is
# PostgreSQL's NAMEDATALEN - 1, which it counts in bytes; counted here in characters, as
# dbward's own user names are (at most 63 characters), so a configured name is always kept
# whole. Before logging in, a client may otherwise claim up to 10 KB per name, written into
# every record of its connection.
CLAIMED_TEXT_MAX: Final = 63
# What an audit record and the log keep of an error message that can quote client text at
# any length: the database's refusal of a login (a startup value), the parser's message (an
# unterminated string quotes the rest of the statement, up to max_statement_bytes).
QUOTED_ERROR_MAX: Final = 512


def text_sha256(text: str) -> str:
    """SHA-256 hex of client text as UTF-8 (lone surrogates encoded as they are, never an
    error): `sql_sha256` of a statement, and the hash a cut name carries."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def capped(text: str, limit: int = CLAIMED_TEXT_MAX) -> str:
    """`text` if it has at most `limit` characters, else its first `limit` characters and a
    marker with the full length in UTF-8 bytes and the SHA-256 of the full text:
    `name…[truncated: 10240 bytes, sha256 <64 hex digits>]`.

    The cut falls between characters, so the result is valid text wherever the input was. The
    marker alone is longer than CLAIMED_TEXT_MAX, so at that limit a stored value is a cut one
    exactly when it is longer than the limit: a client cannot forge the marker in a name it
    claims.
    """
    if len(text) <= limit:
        return text
    size = len(text.encode("utf-8", "surrogatepass"))
    return f"{text[:limit]}…[truncated: {size} bytes, sha256 {text_sha256(text)}]"


# Characters that end or rewrite a line on a terminal or in a log file (C0, DEL, C1, the
# Unicode line and paragraph separators).
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` for dbward's process log, whose lines are one event each: control characters
    escaped as Python writes them (a newline as \\n), so client text cannot begin a line."""
    return _LINE_BREAKING.sub(lambda m: repr(m.group())[1:-1], text)


# Quotation marks as PostgreSQL's messages use them: ASCII, and those of its translations
# (German »…«, French « … », Japanese 「…」, curly quotes ...), which lc_messages may select.
_QUOTES = "\"'\u00ab\u00bb\u2018-\u201f\u2039\u203a\u300c-\u300f\uff02\uff07"
# Names the message is about, kept: a parameter's or a database's as the client claimed it
# (the audit record keeps its database anyway), dbward's own service role, user and host
# (`no pg_hba.conf entry for host "…", user "…", database "…"`). Only English messages, only
# a name's characters (no quote can end one early), and only before any other quotation mark.
_NAMED = re.compile('\\b(?:parameter|database|role|user|host) "[A-Za-z0-9_.:$-]{1,63}"')
_QUOTE = re.compile(f"[{_QUOTES}]")
# From the first quotation mark to the last: a quoted value can hold quotes of its own, so no
# pairing of them tells where it ends.
_QUOTED_SPAN = re.compile(f"[{_QUOTES}].*[{_QUOTES}]|[{_QUOTES}].*", re.DOTALL)
# Messages that begin with the client's value unquoted: a number out of a setting's range,
# with its unit ("100 kB is outside the valid range for parameter ..."), and a -c or --
# option without a value ("-c hunter2 requires a value"), whose word is kept to its switch.
_LEADING_NUMBER = re.compile(r"\A[-+]?[0-9][^ ]*(?: (?:[kMGT]?B|us|ms|s|min|h|d)\b)?")
_LEADING_OPTION = re.compile(r"\A(-c |--)[^ ]*")


def without_quoted_values(message: str) -> str:
    """`message` (the database's refusal of a login) without the values it quotes from the
    client: `invalid value for parameter "password_encryption": "hunter2"` becomes
    `invalid value for parameter "password_encryption": <...>`.

    A user may type a secret into the wrong option, and PostgreSQL quotes it back: the client
    may see it (it is its own), dbward's log and audit records must not keep it.
    """
    text = _LEADING_NUMBER.sub("<...>", message, count=1)
    text = _LEADING_OPTION.sub(r"\1<...>", text, count=1)
    kept = 0  # the message up to here is kept as it is
    for named in _NAMED.finditer(text):
        if _QUOTE.search(text, kept, named.start()):
            break  # a quotation mark that opens no name: a value begins there
        kept = named.end()
    return text[:kept] + _QUOTED_SPAN.sub("<...>", text[kept:])
