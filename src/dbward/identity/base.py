"""The authenticator seam: how a client's credentials become an Identity.

The relay only knows this interface. Local SCRAM users arrive first; OIDC tokens and
just-in-time credentials (sent by clients as a cleartext password over TLS) slot in later as
further implementations without touching the relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dbward.core.types import Identity


@dataclass(frozen=True, slots=True)
class AuthStep:
    """One step of an exchange: bytes to send the client, and the identity once proven."""

    reply: bytes | None  # a complete backend message (Authentication*), or None
    identity: Identity | None = None  # set when the exchange has succeeded


class AuthExchange(Protocol):
    """A running authentication conversation for one connection (sans-IO)."""

    def start(self) -> bytes:
        """The first Authentication request message to send to the client."""
        ...

    async def step(self, payload: bytes) -> AuthStep:
        """Consume one client 'p' message body; raise AuthenticationFailed to reject."""
        ...


class Authenticator(Protocol):
    """Creates exchanges for login attempts on a listener."""

    def begin(self, user: str, *, tls: bool, channel_binding: bytes | None = None) -> AuthExchange:
        """Start authenticating the StartupMessage's user name.

        `channel_binding` is the connection's tls-server-end-point data (RFC 5929) when the
        client connected over TLS and the certificate allows it; None otherwise.
        """
        ...
