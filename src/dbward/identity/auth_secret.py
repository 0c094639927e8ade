"""dbward's own random secret for unknown users' fake SCRAM salts, kept in a file."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from dbward.core.errors import ConfigError

SECRET_BYTES = 32
_KEY = "auth_secret_file"


def load_auth_secret(path: Path) -> bytes:
    """Read the secret from `path`, creating it (random, mode 0600) on first use.

    It must never change: PostgreSQL's mock nonce is fixed at initdb for the same reason. A
    secret derived from the configured users (as before) changed whenever a user was added or
    a password rotated, and every unknown name's salt with it while real users' salts stayed:
    salts recorded before and after such a change told exactly which names exist.
    """
    if path.exists():
        return _read(path)
    # Written whole to a private temporary file, then linked into place: a crash cannot leave a
    # short file, and a replica starting at the same moment either wins or reads the winner's.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secrets.token_hex(SECRET_BYTES) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    except OSError as exc:
        raise ConfigError(f"{_KEY}: cannot create {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return _read(path)


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > 1024:  # checked before reading: it must be a small file
            raise ConfigError(f"{_KEY}: {path} is not a dbward auth secret (too large)")
        text = path.read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "expected 64 hexadecimal digits"
        raise ConfigError(f"{_KEY}: cannot read {path}: {why}") from None
    if len(secret) != SECRET_BYTES:
        raise ConfigError(
            f"{_KEY}: {path} holds {len(secret)} bytes, expected {SECRET_BYTES} "
            f"(64 hexadecimal digits)"
        )
    return secret
