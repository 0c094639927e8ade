"""Statement text without literals and comments: what the log keeps of text holding a secret."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbward.sql.postgres import CREDENTIAL_TEXT
from dbward.sql.redact import without_literals

SECRET = "hunter2-Secret"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"ALTER ROLE bob PASSWORD '{SECRET}' VALID UNTIL '2027-01-01'",
            "ALTER ROLE bob PASSWORD '…' VALID UNTIL '…'",
        ),
        (
            f'CREATE ROLE "Bob" LOGIN PASSWORD $q${SECRET}$q$',
            "CREATE ROLE \"Bob\" LOGIN PASSWORD '…'",
        ),
        (f"ALTER ROLE bob PASSWORD E'{SECRET}\\''", "ALTER ROLE bob PASSWORD '…'"),
        (f"ALTER ROLE bob PASSWORD U&'{SECRET}'", "ALTER ROLE bob PASSWORD '…'"),
        (f"ALTER ROLE bob PASSWORD '{SECRET}'\n  'continued'", "ALTER ROLE bob PASSWORD '…'"),
        (f"SELECT B'0101', X'{SECRET.encode().hex()}'", "SELECT '…', '…'"),
        # Comments go (a secret in one is a secret), leaving a space where they separated words.
        (f"ALTER/* {SECRET} */ROLE bob -- {SECRET}\nPASSWORD NULL", "ALTER ROLE bob PASSWORD NULL"),
        (f"/* {SECRET} */ SELECT 1", "SELECT 1"),
        # A connection string spelled as a quoted identifier is still a connection string.
        (f'SELECT dblink_connect("host=h password={SECRET}")', 'SELECT dblink_connect("…")'),
        (f'SELECT dblink_connect(U&"postgres://u:{SECRET}@h")', 'SELECT dblink_connect("…")'),
        (
            'SELECT "Quoted Name", $1::text, 42 FROM "s"."t"',
            'SELECT "Quoted Name", $1::text, 42 FROM "s"."t"',
        ),
        ("SELECT 'é' || ünïcode FROM t", "SELECT '…' || ünïcode FROM t"),
        (f"DO $$BEGIN EXECUTE 'ALTER ROLE a PASSWORD ''{SECRET}'''; END$$", "DO '…'"),
    ],
)
def test_literals_and_comments_are_taken_out(text: str, expected: str) -> None:
    assert without_literals(text, CREDENTIAL_TEXT) == expected


@pytest.mark.parametrize(
    "text",
    [
        f"ALTER ROLE bob PASSWORD '{SECRET}",  # unterminated: where the secret ends is unknown
        f"ALTER ROLE bob PASSWORD $${SECRET}",
        f"ALTER ROLE bob PASSWORD '{SECRET}\udcff'",  # not valid Unicode (SQL_ASCII client)
    ],
)
def test_text_the_scanner_rejects_is_not_redacted_but_refused(text: str) -> None:
    assert without_literals(text, CREDENTIAL_TEXT) is None


# No NUL: the scanner stops at one, and the relay never gets one (PostgreSQL's strings end there).
@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=40,
    )
)
def test_no_literal_survives(secret: str) -> None:
    # Whatever a literal holds, none of it is in the result (quotes doubled as SQL needs).
    quoted = secret.replace("'", "''")
    text = f"ALTER ROLE bob PASSWORD 'X{quoted}Y'"
    assert without_literals(text, CREDENTIAL_TEXT) == "ALTER ROLE bob PASSWORD '…'"
