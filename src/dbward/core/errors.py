"""Error types that carry a SQLSTATE so every layer can fail with a client-visible code."""

from __future__ import annotations


class DbwardError(Exception):
    """Base class: an error that can be reported to a client with a SQLSTATE."""

    sqlstate = "XX000"

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate


class ProtocolError(DbwardError):
    """The peer sent bytes that break the wire protocol (bad length, unknown type, truncation)."""

    sqlstate = "08P01"  # protocol_violation


class AuthenticationFailed(DbwardError):
    """Client authentication failed; reported as FATAL 28P01 without saying why to the client."""

    sqlstate = "28P01"  # invalid_password


class ConfigError(DbwardError):
    """The configuration is invalid; the message names the key and what was expected."""

    sqlstate = "F0000"  # config_file_error


class AuditUnavailable(DbwardError):
    """The audit log cannot be written, so statements are refused (fail closed)."""

    sqlstate = "58030"  # io_error
