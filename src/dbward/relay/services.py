"""What a listener's sessions share: settings, policy inputs, audit, cancel keys, live sessions."""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dbward.audit.sink import AuditSink
from dbward.config.model import AuditSettings, ListenerSettings
from dbward.identity.base import Authenticator
from dbward.sql.offload import ClassifierPool
from dbward.sql.postgres import PostgresClassifier

if TYPE_CHECKING:
    from dbward.relay.postgres import PgSession


# Client hosts whose cancel rate is tracked; the least recently seen is forgotten first.
_MAX_CANCEL_BUCKETS = 10_000


class CancelRegistry:
    """Maps the cancel keys dbward hands out to live sessions; rate-limits attempts per client."""

    def __init__(self, rate_per_s: float, burst: float = 10.0) -> None:
        self._sessions: dict[tuple[int, bytes], PgSession] = {}
        self._rate = rate_per_s
        self._burst = max(burst, rate_per_s)
        self._buckets: dict[str, tuple[float, float]] = {}  # client host -> (tokens, last time)

    def issue(self, pid: int, session: PgSession) -> bytes:
        """A fresh random secret for this backend pid, unique among live sessions."""
        while True:
            key = secrets.token_bytes(4)
            if (pid, key) not in self._sessions:
                self._sessions[(pid, key)] = session
                return key

    def revoke(self, pid: int, key: bytes) -> None:
        """Forget a key when its session ends."""
        self._sessions.pop((pid, key), None)

    def lookup(self, pid: int, key: bytes) -> PgSession | None:
        """The session for a (pid, key) pair; constant-time enough: the dict hides nothing."""
        return self._sessions.get((pid, key))

    def allow_attempt(self, client_host: str, now: float | None = None) -> bool:
        """Token bucket per client host, so cancel keys cannot be guessed at line rate."""
        now = time.monotonic() if now is None else now
        buckets = self._buckets
        tokens, last = buckets.pop(client_host, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        # Re-inserted last: the dict's order is least recently used first, and the bound on
        # its size evicts one entry per request (O(1)) under a spray of source addresses.
        buckets[client_host] = (tokens - 1.0 if allowed else tokens, now)
        if len(buckets) > _MAX_CANCEL_BUCKETS:
            del buckets[next(iter(buckets))]
        return allowed


@dataclass
class ListenerServices:
    """Everything a PgSession needs, built once per listener by the runtime."""

    settings: ListenerSettings
    audit_settings: AuditSettings
    audit: AuditSink
    classifier: PostgresClassifier
    authenticator: Authenticator
    client_tls: ssl.SSLContext | None
    upstream_tls: ssl.SSLContext | None
    cancels: CancelRegistry
    clock: Callable[[], float] = time.time
    sessions: set[PgSession] = field(default_factory=set)
    # Connections not authenticated yet, per client host (hosts at zero are removed).
    unauthenticated: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    warned_superuser: bool = False  # the service role is a superuser: warned once per listener
    # Classifies very large statements off the event loop (None: everything inline).
    offload: ClassifierPool | None = None
