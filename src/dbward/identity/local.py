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
    ScramServer,
    ScramVerifier,
    mock_secret_for,
    parse_verifier,
)

_MECHANISM = "SCRAM-SHA-256"


class _ScramExchange:
    """SCRAM-SHA-256 over the PostgreSQL SASL messages for one login attempt."""

    def __init__(
        self,
        user: str,
        identity: Identity | None,
        verifier: ScramVerifier | None,
        mock: tuple[bytes, int],
    ) -> None:
        self._identity = identity
        # An unknown user still gets a full exchange against a fake verifier (with a salt
        # stable per name, across restarts too), so a client cannot tell "no such user" from
        # "wrong password".
        self._server = ScramServer(
            verifier, username=user, mock_secret=mock[0], mock_iterations=mock[1]
        )
        self._step = 0

    def start(self) -> bytes:
        return messages.authentication_sasl([_MECHANISM])

    async def step(self, payload: bytes) -> AuthStep:
        if self._step == 0:
            self._step = 1
            mechanism, data = messages.parse_sasl_initial_response(payload)
            if mechanism != _MECHANISM or data is None:
                raise AuthenticationFailed(f"unsupported SASL mechanism {mechanism!r}")
            server_first = self._server.handle_client_first(data)
            return AuthStep(messages.authentication_sasl_continue(server_first))
        if self._step == 1:
            self._step = 2
            server_final = self._server.handle_client_final(payload)
            if self._identity is None:
                raise AuthenticationFailed("unknown user")
            return AuthStep(messages.authentication_sasl_final(server_final), self._identity)
        raise AuthenticationFailed("unexpected authentication message")


class LocalAuthenticator:
    """Authenticates the users declared under `users:` in the configuration."""

    def __init__(self, users: Iterable[UserSettings]) -> None:
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
        self._mock = (mock_secret_for(verifiers), iterations)

    def begin(self, user: str, *, tls: bool) -> AuthExchange:
        found = self._users.get(user)
        if found is None:
            return _ScramExchange(user, None, None, self._mock)
        return _ScramExchange(user, found[0], found[1], self._mock)
