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
        # Comments go (a secret in one is a secret), leaving a space where they separated words
        # and the line break where one ended a line.
        (
            f"ALTER/* {SECRET} */ROLE bob -- {SECRET}\nPASSWORD NULL",
            "ALTER ROLE bob\nPASSWORD NULL",
        ),
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
    ("text", "expected"),
    [
        ("SET app.password = Hunter2x", "SET app.password = '…'"),
        ('SET LOCAL app.password TO "Hunter2x"', "SET LOCAL app.password TO '…'"),
        ("SET app.password = admin -- a keyword", "SET app.password = '…'"),
        (
            "ALTER ROLE r IN DATABASE d SET app.password TO hunter2x, -5, 1.5e3",
            "ALTER ROLE r IN DATABASE d SET app.password TO '…', -'…', '…'",
        ),
        (
            "CREATE FUNCTION f() RETURNS int SET app.password = hunter2x LANGUAGE sql AS 'x'",
            "CREATE FUNCTION f() RETURNS int SET app.password = '…' LANGUAGE sql AS '…'",
        ),
        ("SET app.password TO DEFAULT", "SET app.password TO DEFAULT"),  # a reserved word
        # An UPDATE's SET: names followed by "=" or in an expression stay.
        (
            "UPDATE users SET password = crypt('x', gen_salt('bf')), name = n WHERE id = 1",
            "UPDATE users SET password = crypt('…', gen_salt('…')), name = n WHERE id = 1",
        ),
        ("ALTER TABLE users SET (fillfactor = 70)", "ALTER TABLE users SET (fillfactor = 70)"),
    ],
)
def test_a_setting_value_spelled_as_a_name_or_number_is_taken_out(text: str, expected: str) -> None:
    """Round 56: `SET app.password = Hunter2` is valid SQL, and the value, being no literal,
    was kept ("Keywords, names and numbers stay as the client spelled them")."""
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


MIGRATION_IDIOM = (
    "DO $$ BEGIN\n"
    "  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN\n"
    f"    CREATE ROLE app LOGIN PASSWORD '{SECRET}'; -- {SECRET}\n"
    "  END IF;\n"
    "  DELETE FROM sessions;\n"
    "END $$"
)


def test_a_plpgsql_do_body_is_kept_as_code_with_its_own_literals_out() -> None:
    assert without_literals(MIGRATION_IDIOM, CREDENTIAL_TEXT, code_bodies=True) == (
        "DO $$ BEGIN\n"
        "  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '…') THEN\n"
        "    CREATE ROLE app LOGIN PASSWORD '…';\n"
        "  END IF;\n"
        "  DELETE FROM sessions;\n"
        "END $$"
    )
    # Without the caller's word that PL/pgSQL accepted the body, it is one literal.
    assert without_literals(MIGRATION_IDIOM, CREDENTIAL_TEXT) == "DO '…'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Nested dollar quotes inside the body are literals of the body.
        (
            "DO LANGUAGE plpgsql $b$ BEGIN"
            f" EXECUTE $q$ALTER ROLE a PASSWORD '{SECRET}'$q$; END $b$",
            "DO LANGUAGE plpgsql $b$ BEGIN EXECUTE '…'; END $b$",
        ),
        # Another language's strings need not be SQL's ("..." is a Python string).
        (f'DO $b$ pw = "{SECRET}" $b$ LANGUAGE plpython3u', "DO '…' LANGUAGE plpython3u"),
        (f"DO LANGUAGE 'plperl' $b$ my $pw = q{{{SECRET}}}; $b$", "DO LANGUAGE '…' '…'"),
        # A body in plain quotes is not split: its quotes are doubled, its tokens not SQL's.
        (f"DO 'BEGIN pw := ''{SECRET}''; END'", "DO '…'"),
        (f"DO $$ {SECRET} '$$", "DO '…'"),  # a body the scanner rejects
    ],
)
def test_do_bodies_are_split_only_when_they_are_dollar_quoted_plpgsql(
    text: str, expected: str
) -> None:
    assert without_literals(text, CREDENTIAL_TEXT, code_bodies=True) == expected
