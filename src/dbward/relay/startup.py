"""Validate a client's StartupMessage and choose what reaches the upstream."""

from __future__ import annotations

import re

from dbward.core.errors import DbwardError
from dbward.core.text import capped

# Parameters whose only purpose is to become someone else: never forwarded, refused outright.
_REFUSED = {"role", "session_authorization"}
# Settings that change how PostgreSQL reads string literals, with the only value dbward accepts
# (the one its parser assumes). dbward also pins them in the upstream `options`, so RESET,
# DISCARD ALL and a role's or database's own default can never bring another value back.
_STRING_SYNTAX = {"standard_conforming_strings": "on", "backslash_quote": "safe_encoding"}
_ACCEPTED = {
    "standard_conforming_strings": frozenset({"on", "true", "yes", "1"}),
    "backslash_quote": frozenset({"safe_encoding"}),
}
PINNED_OPTIONS = "-c standard_conforming_strings=on -c backslash_quote=safe_encoding"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_MAX_OPTIONS = 4096


class StartupRefusedError(DbwardError):
    """The StartupMessage asks for something dbward does not allow."""

    sqlstate = "28000"  # invalid_authorization_specification


def _guc_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _split_options(options: str) -> list[str]:
    """Split the `options` value the way the server does: whitespace, backslash escapes."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def _refused_word(word: str) -> StartupRefusedError:
    """The refusal of an `options` word that is not a -c or -- setting. It names the switch
    ('-d' of '-d5'), never the rest: that is the switch's value, or a word typed into the
    wrong field (a password, perhaps), and the refusal's reason is audited."""
    if len(word) >= 2 and word[0] == "-" and word[1].isascii() and word[1].isalpha():
        return StartupRefusedError(f"startup option {word[:2]!r} is not allowed through dbward")
    return StartupRefusedError(
        "startup options other than -c name=value settings are not allowed through dbward"
    )


def _check_options(options: str) -> None:
    """Refuse command-line style settings that change role or session authorization."""
    if len(options) > _MAX_OPTIONS:
        raise StartupRefusedError("the startup 'options' parameter is too long")
    words = _split_options(options)
    i = 0
    while i < len(words):
        word = words[i]
        setting: str | None = None
        if word == "-c":
            i += 1
            setting = words[i] if i < len(words) else ""
        elif word.startswith("-c") or word.startswith("--"):
            setting = word[2:]
        else:
            # Other postgres switches (-d, -e, -B ...) have no business in a client connection.
            raise _refused_word(word)
        name, _, value = setting.partition("=")
        name = _guc_name(name)
        if name in _REFUSED:
            raise StartupRefusedError(
                f"dbward: setting '{name}' in the startup options is not allowed "
                "(role switching is refused)"
            )
        _check_string_syntax(name, value)
        i += 1


def _check_string_syntax(name: str, value: str) -> None:
    """Refuse a login that asks for a string syntax dbward's parser does not read."""
    allowed = _STRING_SYNTAX.get(name)
    if allowed is not None and value.strip().lower() not in _ACCEPTED[name]:
        raise StartupRefusedError(
            f"dbward: '{name}' is fixed to '{allowed}' (SQL must read the same to dbward "
            "and to PostgreSQL)"
        )


def upstream_parameters(params: dict[str, str], default_database: str) -> dict[str, str]:
    """Parameters to send upstream: the client's harmless ones and its database, never its user."""
    if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
        raise StartupRefusedError("dbward: replication connections are not allowed")
    out: dict[str, str] = {}
    for name, value in params.items():
        lowered = _guc_name(name)
        if lowered in ("user", "replication", "database"):
            continue
        if lowered in _REFUSED:
            raise StartupRefusedError(
                f"dbward: startup parameter {capped(name)!r} is not allowed "
                "(role switching is refused)"
            )
        if name.startswith("_pq_."):
            continue  # protocol extensions dbward does not negotiate
        if not _NAME.match(name):
            raise StartupRefusedError(f"invalid startup parameter name {capped(name)!r}")
        if lowered == "options":
            _check_options(value)
        _check_string_syntax(lowered, value)
        out[name] = value
    options = out.pop("options", "").strip()
    out["options"] = f"{options} {PINNED_OPTIONS}" if options else PINNED_OPTIONS
    out["database"] = params.get("database") or default_database
    return out
