"""Map PostgreSQL client_encoding names to Python codecs for faithful SQL decoding."""

from __future__ import annotations

# Decoding must match what the server does, or quoting inside multi-byte characters could be
# read differently by dbward and by PostgreSQL. Encodings not listed are refused.
_CODECS = {
    "UTF8": "utf-8",
    "UNICODE": "utf-8",
    "SQL_ASCII": "latin-1",  # bytes taken as-is; only ASCII matters to the grammar
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "ISO_8859_5": "iso8859-5",
    "ISO_8859_6": "iso8859-6",
    "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8",
    "EUC_JP": "euc_jp",
    "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312",
    "SJIS": "shift_jis",
    # Not SHIFT_JIS_2004: Python's codec reads 0x5C as "¥" and 0x7E as "‾" where PostgreSQL
    # reads "\\" and "~", so E'rol\\x65' would be 'role' to the server and something else to
    # dbward. Unlisted, it gets the ASCII-only treatment. Every codec here must decode
    # 0x00-0x7F as ASCII (tests/unit/test_pg_messages.py checks).
    "BIG5": "big5",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "UHC": "cp949",
    "JOHAB": "johab",
}


def _clean(name: str) -> str:
    # PostgreSQL compares encoding names ignoring case and non-alphanumerics ("utf-8" == "UTF8").
    return "".join(ch for ch in name.lower() if ch.isalnum())


_BY_CLEAN_NAME = {_clean(name): codec for name, codec in _CODECS.items()}


def python_codec(pg_encoding: str) -> str | None:
    """The Python codec for a PostgreSQL encoding name, or None if dbward cannot decode it."""
    return _BY_CLEAN_NAME.get(_clean(pg_encoding))
