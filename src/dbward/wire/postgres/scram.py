"""SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, both sides, plus the legacy md5 hash."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass
from typing import Final

from dbward.core.errors import AuthenticationFailed

__all__ = [
    "CHANNEL_BINDING_TYPE",
    "DEFAULT_ITERATIONS",
    "MECHANISM",
    "MECHANISM_PLUS",
    "MIN_VERIFIER_ITERATIONS",
    "InvalidVerifier",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "make_verifier",
    "md5_password",
    "parse_verifier",
    "saslprep",
]

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
# RFC 5929: the only channel binding type PostgreSQL (and dbward) supports.
CHANNEL_BINDING_TYPE: Final = b"tls-server-end-point"
DEFAULT_ITERATIONS: Final = 4096
# The least a configured user's verifier may have (PostgreSQL's default scram_iterations).
MIN_VERIFIER_ITERATIONS: Final = 4096
DEFAULT_SALT_BYTES: Final = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
NONCE_BYTES: Final = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
MAX_CLIENT_ITERATIONS: Final = 10_000_000  # an upstream asking for more is a CPU DoS
MAX_PASSWORD_BYTES: Final = 1024  # PostgreSQL's MAX_PASSWORD_LENGTH for SASLprep
# Real clients send about 100 bytes; anything far larger is hostile.
MAX_MESSAGE_BYTES: Final = 2048
_KEY_BYTES: Final = 32

_GS2_NO_BINDING: Final = b"n,,"


class InvalidVerifier(ValueError):
    """A stored SCRAM verifier string is malformed (configuration error)."""


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """What the server stores instead of a password."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str | bytes) -> bytes:
    """Strict base64 (no stray characters); raises ValueError."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid base64") from exc


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _in_prohibited_output(ch: str) -> bool:
    # RFC 4013 section 2.3: the tables PostgreSQL's prohibited_output_ranges are made of.
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
    )


def saslprep(password: str) -> bytes:
    """The password bytes PostgreSQL hashes: SASLprep'd, or raw UTF-8 when SASLprep refuses it."""
    raw = password.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ValueError(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    if password.isascii():
        # PostgreSQL passes pure ASCII through untouched, control characters included.
        return raw
    try:
        prepared = _saslprep_strict(password)
    except ValueError:
        return raw
    return prepared.encode("utf-8")


def _saslprep_strict(password: str) -> str:
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    if not mapped:
        raise ValueError("empty after mapping")
    normalized = unicodedata.normalize("NFKC", mapped)
    # PostgreSQL checks the prohibited and bidi rules on the mapped (not normalized) string.
    for ch in mapped:
        if _in_prohibited_output(ch) or stringprep.in_table_a1(ch):
            raise ValueError("prohibited character")
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            raise ValueError("mixed bidi")
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            raise ValueError("bidi string must start and end with RandALCat")
    return normalized


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


# The proxy logs in upstream with one service password, and the server's salt for it is
# stable: PBKDF2 (~0.75 ms at 4,096 iterations, on the event loop every session shares) runs
# once per (password, salt, iterations), not at every client login. The password is in memory
# for these logins anyway.
_client_salted_password = functools.lru_cache(maxsize=16)(_salted_password)


def _keys(salted: bytes) -> tuple[bytes, bytes, bytes]:
    """ClientKey, StoredKey, ServerKey."""
    client_key = _hmac(salted, b"Client Key")
    return client_key, _h(client_key), _hmac(salted, b"Server Key")


# --------------------------------------------------------------------------------------------
# Verifiers
# --------------------------------------------------------------------------------------------


def make_verifier(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """Hash a password into PostgreSQL's `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` form."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    if salt is None:
        salt = secrets.token_bytes(DEFAULT_SALT_BYTES)
    if not salt:
        raise ValueError("salt must not be empty")
    _client_key, stored_key, server_key = _keys(_salted_password(password, salt, iterations))
    return str(ScramVerifier(iterations, salt, stored_key, server_key))


def parse_verifier(text: str) -> ScramVerifier:
    """Parse a stored verifier; raises InvalidVerifier naming what is wrong."""
    prefix, sep, rest = text.partition("$")
    if not sep or prefix != MECHANISM:
        raise InvalidVerifier(f"verifier must start with '{MECHANISM}$'")
    params, sep, keys = rest.partition("$")
    iter_text, sep1, salt_text = params.partition(":")
    stored_text, sep2, server_text = keys.partition(":")
    if not (sep and sep1 and sep2):
        raise InvalidVerifier(
            f"verifier must look like {MECHANISM}$<iterations>:<salt>$<StoredKey>:<ServerKey>"
        )
    if not iter_text.isascii() or not iter_text.isdigit():
        raise InvalidVerifier("iteration count must be a positive integer")
    iterations = int(iter_text)
    if not 1 <= iterations <= MAX_CLIENT_ITERATIONS:
        raise InvalidVerifier(f"iteration count must be between 1 and {MAX_CLIENT_ITERATIONS}")
    try:
        salt = _b64decode(salt_text)
        stored_key = _b64decode(stored_text)
        server_key = _b64decode(server_text)
    except ValueError:
        raise InvalidVerifier("salt and keys must be base64") from None
    if not salt:
        raise InvalidVerifier("salt must not be empty")
    if len(stored_key) != _KEY_BYTES or len(server_key) != _KEY_BYTES:
        raise InvalidVerifier(f"StoredKey and ServerKey must be {_KEY_BYTES} bytes")
    return ScramVerifier(iterations, salt, stored_key, server_key)


def md5_password(user: str, password: str, salt: bytes) -> str:
    """Answer to AuthenticationMD5Password: "md5" + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode("utf-8"), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode("ascii") + salt, usedforsecurity=False).hexdigest()
    return "md5" + outer


# --------------------------------------------------------------------------------------------
# Message attribute parsing
# --------------------------------------------------------------------------------------------


def _make_nonce(nonce: bytes | None) -> bytes:
    if nonce is None:
        return base64.b64encode(secrets.token_bytes(NONCE_BYTES))
    if not nonce or not _is_printable(nonce):
        raise ValueError("nonce must be non-empty printable ASCII without ','")
    return nonce


def _is_printable(value: bytes) -> bool:
    # RFC 5802 "printable": %x21-2B / %x2D-7E (visible ASCII except ',').
    return all(0x21 <= c <= 0x7E and c != 0x2C for c in value)


def _attrs(message: bytes, fail: type[Exception], what: str) -> list[tuple[int, bytes]]:
    """Split `a=value,b=value` into (attribute letter, value) pairs."""
    pairs: list[tuple[int, bytes]] = []
    for part in message.split(b","):
        if (
            len(part) < 2
            or part[1] != 0x3D
            or not (0x41 <= part[0] <= 0x5A or 0x61 <= part[0] <= 0x7A)
        ):
            raise fail(f"malformed SCRAM {what}: bad attribute")
        pairs.append((part[0], part[2:]))
    return pairs


def _escape_username(name: str) -> bytes:
    return name.replace("=", "=3D").replace(",", "=2C").encode("utf-8")


# Only for servers built without a mock secret (tests, tools): the salts it gives unknown users
# change at every start, which a prober can tell from real users' salts (the proxy passes the
# secret from dbward.identity.auth_secret).
_MOCK_SECRET: Final = secrets.token_bytes(32)


def _mock_verifier(username: str, secret: bytes, iterations: int) -> ScramVerifier:
    """A stable fake verifier per user name, so probing never shows a user is missing."""
    salt = _hmac(secret, b"salt:" + username.encode("utf-8", "surrogateescape"))[
        :DEFAULT_SALT_BYTES
    ]
    keys = _hmac(secret, b"keys:" + username.encode("utf-8", "surrogateescape"))
    return ScramVerifier(iterations, salt, _h(keys), _hmac(keys, b"Server Key"))


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class ScramServer:
    """One server-side SCRAM-SHA-256 or SCRAM-SHA-256-PLUS exchange.

    verifier None means the user does not exist: the exchange runs in full against a fake
    verifier and fails only at the proof check, so clients cannot enumerate users. Pass the
    user name from the startup packet as `username` so the fake salt is stable per user.

    `channel_binding` is the tls-server-end-point data of the TLS connection when -PLUS was
    offered (None: not offered, no TLS); `plus` says the client chose SCRAM-SHA-256-PLUS. As in
    PostgreSQL, a client that says it supports binding but believes the server does not ('y')
    while -PLUS was offered has had the offer stripped on its way: refused (RFC 5802 §6).
    """

    __slots__ = (
        "_auth_prefix",
        "_binding",
        "_client_first_bare",
        "_gs2_header",
        "_nonce",
        "_plus",
        "_real",
        "_server_first",
        "_state",
        "_verifier",
        "succeeded",
    )

    def __init__(
        self,
        verifier: ScramVerifier | None,
        *,
        nonce: bytes | None = None,
        username: str = "",
        mock_secret: bytes | None = None,
        mock_iterations: int = DEFAULT_ITERATIONS,
        channel_binding: bytes | None = None,
        plus: bool = False,
    ) -> None:
        if plus and not channel_binding:
            raise ValueError("SCRAM-SHA-256-PLUS needs the channel binding data")
        self._binding = channel_binding
        self._plus = plus
        self._real = verifier is not None
        # Derived for known users too, and thrown away: only unknown names paid for these
        # HMACs (~8 us), and over many logins that difference in the time to server-first
        # told which names exist (measured through the proxy on loopback: 40 vs 50 us).
        mock = _mock_verifier(
            username, _MOCK_SECRET if mock_secret is None else mock_secret, mock_iterations
        )
        self._verifier = verifier if verifier is not None else mock
        self._nonce = _make_nonce(nonce)
        self._state = 0
        self._gs2_header = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._auth_prefix = b""
        self.succeeded = False

    def handle_client_first(self, data: bytes) -> bytes:
        """Read client-first-message; return server-first-message."""
        if self._state != 0:
            raise AuthenticationFailed("SCRAM client-first-message out of order")
        self._state = 1  # any failure below ends the exchange
        if len(data) > MAX_MESSAGE_BYTES:
            raise AuthenticationFailed("SCRAM client-first-message too long")
        flag = data[:2]
        if flag == b"p=":
            if not self._plus:
                raise AuthenticationFailed(
                    "SCRAM channel binding requested without choosing SCRAM-SHA-256-PLUS"
                )
            flag_end = data.find(b",", 2)
            if flag_end < 0:
                raise AuthenticationFailed("malformed SCRAM client-first-message: bad gs2 flag")
            if data[2:flag_end] != CHANNEL_BINDING_TYPE:
                raise AuthenticationFailed("unsupported SCRAM channel binding type")
        elif flag == b"y,":
            if self._plus:
                raise AuthenticationFailed("SCRAM-SHA-256-PLUS chosen without channel binding data")
            if self._binding is not None:
                # The client can bind but was told the server cannot: a downgrade.
                raise AuthenticationFailed(
                    "SCRAM channel binding negotiation error: the client supports channel "
                    "binding but thinks the server does not, and this server offered it"
                )
            flag_end = 1
        elif flag == b"n,":
            if self._plus:
                raise AuthenticationFailed("SCRAM-SHA-256-PLUS chosen without channel binding data")
            flag_end = 1
        else:
            raise AuthenticationFailed("malformed SCRAM client-first-message: bad gs2 flag")
        # The authzid field ends at the next comma.
        comma = data.find(b",", flag_end + 1)
        if comma < 0:
            raise AuthenticationFailed("malformed SCRAM client-first-message: no gs2 header end")
        if comma != flag_end + 1:
            raise AuthenticationFailed("SCRAM authorization identity is not supported")
        gs2_header = data[: comma + 1]
        bare = data[comma + 1 :]
        attrs = _attrs(bare, AuthenticationFailed, "client-first-message")
        if attrs[0][0] == ord("m"):
            raise AuthenticationFailed("client requires an unsupported SCRAM extension")
        if len(attrs) < 2 or attrs[0][0] != ord("n") or attrs[1][0] != ord("r"):
            raise AuthenticationFailed("malformed SCRAM client-first-message: expected n= and r=")
        # The SCRAM user name is ignored, as PostgreSQL does: the startup packet names the user.
        client_nonce = attrs[1][1]
        if not client_nonce or not _is_printable(client_nonce):
            raise AuthenticationFailed("malformed SCRAM client-first-message: bad nonce")
        self._gs2_header = gs2_header
        self._client_first_bare = bare
        self._nonce = client_nonce + self._nonce
        verifier = self._verifier
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            _b64(verifier.salt).encode(),
            verifier.iterations,
        )
        self._state = 2
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes:
        """Check client-final-message; return server-final-message or raise AuthenticationFailed."""
        if self._state != 2:
            raise AuthenticationFailed("SCRAM client-final-message out of order")
        self._state = 3
        if len(data) > MAX_MESSAGE_BYTES:
            raise AuthenticationFailed("SCRAM client-final-message too long")
        proof_at = data.rfind(b",p=")
        if proof_at < 0:
            raise AuthenticationFailed("malformed SCRAM client-final-message: no proof")
        without_proof = data[:proof_at]
        attrs = _attrs(without_proof, AuthenticationFailed, "client-final-message")
        if len(attrs) < 2 or attrs[0][0] != ord("c") or attrs[1][0] != ord("r"):
            raise AuthenticationFailed("malformed SCRAM client-final-message: expected c= and r=")
        try:
            binding = _b64decode(attrs[0][1])
            proof = _b64decode(data[proof_at + 3 :])
        except ValueError:
            raise AuthenticationFailed("malformed SCRAM client-final-message: bad base64") from None
        expected = self._gs2_header
        if self._plus:
            assert self._binding is not None
            expected += self._binding
        if not hmac.compare_digest(binding, expected):
            raise AuthenticationFailed("SCRAM channel binding does not match")
        if not hmac.compare_digest(attrs[1][1], self._nonce):
            raise AuthenticationFailed("SCRAM nonce does not match")
        if len(proof) != _KEY_BYTES:
            raise AuthenticationFailed("malformed SCRAM client-final-message: bad proof length")
        verifier = self._verifier
        auth_message = b",".join((self._client_first_bare, self._server_first, without_proof))
        client_signature = _hmac(verifier.stored_key, auth_message)
        client_key = _xor(proof, client_signature)
        valid = hmac.compare_digest(_h(client_key), verifier.stored_key)
        if not (valid and self._real):
            raise AuthenticationFailed(
                "SCRAM proof is invalid" if self._real else "SCRAM exchange for an unknown user"
            )
        self.succeeded = True
        return b"v=" + _b64(_hmac(verifier.server_key, auth_message)).encode()


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class ScramClient:
    """One client-side SCRAM-SHA-256(-PLUS) exchange with the upstream.

    `channel_binding` (the server certificate's tls-server-end-point hash) makes it
    SCRAM-SHA-256-PLUS: the proof is then bound to the TLS connection, and a man in the middle
    who relays the exchange to the real server (over his own TLS connection) cannot use it.
    `binding_supported` without it sends the gs2 flag 'y' (over TLS, the server offered no
    PLUS): a server that does support binding then knows the offer was stripped, and refuses.
    """

    __slots__ = (
        "_binding",
        "_client_first_bare",
        "_gs2_header",
        "_iterations",
        "_nonce",
        "_password",
        "_salt",
        "_server_first",
        "_server_nonce",
        "_server_signature",
        "_state",
        "_verified",
    )

    def __init__(
        self,
        password: str,
        *,
        nonce: bytes | None = None,
        username: str = "",
        channel_binding: bytes | None = None,
        binding_supported: bool = False,
    ) -> None:
        self._password = password
        self._nonce = _make_nonce(nonce)
        self._binding = channel_binding or b""
        if channel_binding is not None:
            self._gs2_header = b"p=" + CHANNEL_BINDING_TYPE + b",,"
        elif binding_supported:
            self._gs2_header = b"y,,"
        else:
            self._gs2_header = _GS2_NO_BINDING
        # libpq sends an empty user name: PostgreSQL takes it from the startup packet.
        self._client_first_bare = b"n=" + _escape_username(username) + b",r=" + self._nonce
        self._server_first = b""
        self._server_nonce = b""
        self._salt = b""
        self._iterations = 0
        self._server_signature = b""
        self._state = 0
        self._verified = False

    @property
    def mechanism(self) -> str:
        """SCRAM-SHA-256-PLUS with channel binding, else SCRAM-SHA-256."""
        return MECHANISM_PLUS if self._binding else MECHANISM

    def client_first(self) -> bytes:
        """The client-first-message (gs2 header 'p=tls-server-end-point,,', 'y,,' or 'n,,')."""
        self._state = max(self._state, 1)
        return self._gs2_header + self._client_first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """Answer server-first-message with client-final-message (carrying the proof).

        Runs PBKDF2 here, up to MAX_CLIENT_ITERATIONS rounds (seconds): a caller on an event
        loop uses read_server_first / salted_password (in a thread) / client_final_with.
        """
        self.read_server_first(server_first)
        return self.client_final_with(self.salted_password())

    def read_server_first(self, server_first: bytes) -> None:
        """Check server-first-message and keep its nonce, salt and iteration count."""
        if self._state != 1:
            raise AuthenticationFailed("SCRAM server-first-message out of order")
        self._state = 2
        if len(server_first) > MAX_MESSAGE_BYTES:
            raise AuthenticationFailed("SCRAM server-first-message too long")
        attrs = _attrs(server_first, AuthenticationFailed, "server-first-message")
        if attrs[0][0] == ord("m"):
            raise AuthenticationFailed("server requires an unsupported SCRAM extension")
        if len(attrs) < 3 or [a for a, _ in attrs[:3]] != [ord("r"), ord("s"), ord("i")]:
            raise AuthenticationFailed("malformed SCRAM server-first-message: expected r=, s=, i=")
        nonce, salt_text, iter_text = attrs[0][1], attrs[1][1], attrs[2][1]
        if (
            len(nonce) <= len(self._nonce)
            or not nonce.startswith(self._nonce)
            or not _is_printable(nonce)
        ):
            raise AuthenticationFailed("SCRAM server nonce does not extend the client nonce")
        try:
            salt = _b64decode(salt_text)
        except ValueError:
            raise AuthenticationFailed("malformed SCRAM server-first-message: bad salt") from None
        if not salt:
            raise AuthenticationFailed("SCRAM server sent an empty salt")
        if not iter_text.isdigit() or len(iter_text) > 9:
            raise AuthenticationFailed("malformed SCRAM server-first-message: bad iteration count")
        iterations = int(iter_text)
        if not 1 <= iterations <= MAX_CLIENT_ITERATIONS:
            raise AuthenticationFailed(f"SCRAM iteration count {iterations} out of range")
        self._server_first = server_first
        self._server_nonce = nonce
        self._salt = salt
        self._iterations = iterations

    def salted_password(self) -> bytes:
        """PBKDF2 of the password with the server's salt and iteration count (the costly step:
        the server chooses the count). Touches no other state, so it may run in a thread."""
        if self._state != 2:
            raise AuthenticationFailed("SCRAM server-first-message not read yet")
        try:
            return _client_salted_password(self._password, self._salt, self._iterations)
        except ValueError as exc:
            raise AuthenticationFailed(f"SCRAM password unusable: {exc}") from None

    def client_final_with(self, salted: bytes) -> bytes:
        """The client-final-message, from salted_password()'s result."""
        if self._state != 2 or self._server_signature:
            raise AuthenticationFailed("SCRAM client-final-message out of order")
        client_key, stored_key, server_key = _keys(salted)
        binding = base64.b64encode(self._gs2_header + self._binding)
        without_proof = b"c=" + binding + b",r=" + self._server_nonce
        auth_message = b",".join((self._client_first_bare, self._server_first, without_proof))
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, data: bytes) -> None:
        """Check server-final-message: the server must prove it knows the verifier."""
        if self._state != 2 or not self._server_signature:  # client-final not sent yet
            raise AuthenticationFailed("SCRAM server-final-message out of order")
        self._state = 3
        if len(data) > MAX_MESSAGE_BYTES:
            raise AuthenticationFailed("SCRAM server-final-message too long")
        if data.startswith(b"e="):
            reason = data[2:].decode("utf-8", "replace")
            raise AuthenticationFailed(f"SCRAM server reported error: {reason}")
        attrs = _attrs(data, AuthenticationFailed, "server-final-message")
        if attrs[0][0] != ord("v"):
            raise AuthenticationFailed("malformed SCRAM server-final-message: expected v=")
        try:
            signature = _b64decode(attrs[0][1])
        except ValueError:
            raise AuthenticationFailed("malformed SCRAM server-final-message: bad base64") from None
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthenticationFailed("SCRAM server signature does not match")
        self._verified = True

    @property
    def verified(self) -> bool:
        """Whether the server has proved it knows the password (server-final checked)."""
        return self._verified
