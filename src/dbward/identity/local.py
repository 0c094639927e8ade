"""Local users from the configuration, authenticated with SCRAM-SHA-256 verifiers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from dbward.config.model import UserSettings
from dbward.core.errors import AuthenticationFailed
from dbward.core.types import Identity
from dbward.identity.base import AuthExchange, AuthStep
from dbward.wire.postgres import messages
from dbward.wire.postgres.scram import (
    DEFAULT_ITERATIONS,
    MECHANISM,
    MECHANISM_PLUS,
    ScramServer,
    ScramVerifier,
    parse_verifier,
)

# SASL mechanism names are at most 20 characters (RFC 4422); a refused one is shown this long.
_MAX_SHOWN_MECHANISM = 64


class _ScramExchange:
    """SCRAM-SHA-256 over the PostgreSQL SASL messages for one login attempt."""

    def __init__(
        self,
        user: str,
        identity: Identity | None,
        verifier: ScramVerifier | None,
        mock: tuple[bytes, int],
        channel_binding: bytes | None,
    ) -> None:
        self._user = user
        self._identity = identity
        self._verifier = verifier
        self._mock = mock
        self._binding = channel_binding
        self._server: ScramServer | None = None
        self._step = 0

    def start(self) -> bytes:
        # Over TLS -PLUS is offered first, as PostgreSQL does: a client with
        # channel_binding=require can log in, and one that could bind but was told it cannot
        # (the offer stripped by a man in the middle) is refused.
        if self._binding is not None:
            return messages.authentication_sasl([MECHANISM_PLUS, MECHANISM])
        return messages.authentication_sasl([MECHANISM])

    async def step(self, payload: bytes) -> AuthStep:
        if self._step == 0:
            self._step = 1
            mechanism, data = messages.parse_sasl_initial_response(payload)
            offered = (MECHANISM, MECHANISM_PLUS) if self._binding is not None else (MECHANISM,)
            if mechanism not in offered or data is None:
                # The name is the client's and may be 64 KiB long: the log and the audit trail
                # (which keeps every record) get its start only, not 64 KiB per connection.
                shown = mechanism[:_MAX_SHOWN_MECHANISM]
                more = "..." if len(mechanism) > _MAX_SHOWN_MECHANISM else ""
                raise AuthenticationFailed(f"unsupported SASL mechanism {shown!r}{more}")
            # An unknown user still gets a full exchange against a fake verifier (with a salt
            # stable per name, across restarts too), so a client cannot tell "no such user"
            # from "wrong password".
            self._server = ScramServer(
                self._verifier,
                username=self._user,
                mock_secret=self._mock[0],
                mock_iterations=self._mock[1],
                channel_binding=self._binding,
                plus=mechanism == MECHANISM_PLUS,
            )
            server_first = self._server.handle_client_first(data)
            return AuthStep(messages.authentication_sasl_continue(server_first))
        if self._step == 1:
            self._step = 2
            assert self._server is not None
            server_final = self._server.handle_client_final(payload)
            if self._identity is None:
                raise AuthenticationFailed("unknown user")
            return AuthStep(messages.authentication_sasl_final(server_final), self._identity)
        raise AuthenticationFailed("unexpected authentication message")


class LocalAuthenticator:
    """Authenticates the users declared under `users:` in the configuration."""

    def __init__(self, users: Iterable[UserSettings], *, mock_secret: bytes) -> None:
        """`mock_secret` keys the fake salts of unknown names: it must never change (see
        dbward.identity.auth_secret)."""
        self._users: dict[str, tuple[Identity, ScramVerifier]] = {}
        for user in users:
            identity = Identity(
                name=user.name, kind=user.kind, groups=frozenset(user.groups), authenticator="local"
            )
            self._users[user.name] = (identity, parse_verifier(user.password_verifier))
        verifiers = [verifier for _, verifier in self._users.values()]
        # Unknown users get the iteration count most real users have: a different one would
        # give them away.
        counts = Counter(verifier.iterations for verifier in verifiers)
        iterations = counts.most_common(1)[0][0] if counts else DEFAULT_ITERATIONS
        self._mock = (mock_secret, iterations)

    def begin(self, user: str, *, tls: bool, channel_binding: bytes | None = None) -> AuthExchange:
        binding = channel_binding if tls else None
        found = self._users.get(user)
        if found is None:
            return _ScramExchange(user, None, None, self._mock, binding)
        return _ScramExchange(user, found[0], found[1], self._mock, binding)
