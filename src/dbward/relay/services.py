"""What a listener's sessions share: settings, policy inputs, audit, cancel keys, live sessions."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dbward.audit.sink import AuditSink
from dbward.config.model import AuditSettings, ListenerSettings
from dbward.identity.base import Authenticator
from dbward.sql.offload import ClassifierPool
from dbward.sql.postgres import PostgresClassifier

if TYPE_CHECKING:
    from dbward.relay.postgres import PgSession


# Client hosts whose cancel rate is tracked; the least recently seen is forgotten first.
_MAX_CANCEL_BUCKETS = 10_000
_REPORT_INTERVAL_S = 10.0  # rate-limited cancel attempts: at most one log line this often


def client_key(client_host: str) -> str:
    """Whose budget (cancel attempts, connections before login) a client spends: an IPv4
    address, or an IPv6 /64.

    One host usually holds a whole IPv6 /64 (SLAAC, privacy addresses, a /64 per VM or
    container), so counting each IPv6 address on its own let one client take a fresh budget
    for every guess, and its spray evicted everyone else's from the table.
    """
    try:
        address = ipaddress.ip_address(client_host)
    except ValueError:
        return client_host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d on a dual-stack socket
            return str(address.ipv4_mapped)
        # From the integer: a scoped address (fe80::1%eth0) cannot be formatted back.
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return client_host


class CancelRegistry:
    """Maps the cancel keys dbward hands out to live sessions; rate-limits attempts per client."""

    def __init__(self, rate_per_s: float, burst: float = 10.0) -> None:
        self._sessions: dict[tuple[int, bytes], PgSession] = {}
        self._rate = rate_per_s
        self._burst = max(burst, rate_per_s)
        self._buckets: dict[str, tuple[float, float]] = {}  # client host -> (tokens, last time)
        # Refused attempts not yet reported in the log, and when it was last written to.
        self._refused_unreported = 0
        self._last_report = -_REPORT_INTERVAL_S
        self.latest_refused_host = ""

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
        """Token bucket per client host (IPv6: per /64), so cancel keys cannot be guessed at
        line rate."""
        now = time.monotonic() if now is None else now
        client_host = client_key(client_host)
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

    def refused_to_report(
        self, client_host: str, now: float | None = None
    ) -> tuple[int, float | None]:
        """Count a refused attempt. Returns how many to report in one log line now (0: not
        yet) and, when this attempt is the first one held back, the seconds after which
        take_unreported() must report the held ones (else None). One line per interval, so
        a spray of guesses cannot flood the log, and a spray that stops is still reported."""
        now = time.monotonic() if now is None else now
        self._refused_unreported += 1
        self.latest_refused_host = client_host
        since = now - self._last_report
        if since < _REPORT_INTERVAL_S:
            first_held = self._refused_unreported == 1
            return 0, (_REPORT_INTERVAL_S - since if first_held else None)
        count, self._refused_unreported = self._refused_unreported, 0
        self._last_report = now
        return count, None

    def take_unreported(self, now: float | None = None) -> int:
        """The refused attempts held back since the last log line, to report now."""
        count, self._refused_unreported = self._refused_unreported, 0
        if count:
            self._last_report = time.monotonic() if now is None else now
        return count


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
    # Cancel requests being sent to the database (a client's, or dbward's own): shutdown
    # waits for them, and they outlive the connection that asked.
    cancel_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Bytes of unfinished client messages buffered by all sessions (max_partial_message_bytes).
    partial_message_bytes: int = 0
    # Connections not authenticated yet, per client_key (hosts at zero are removed).
    unauthenticated: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    warned_superuser: bool = False  # the service role is a superuser: warned once per listener
    # Classifies very large statements off the event loop (None: everything inline).
    offload: ClassifierPool | None = None
    # tls-server-end-point data of client_tls's certificate: SCRAM-SHA-256-PLUS over TLS.
    client_tls_end_point: bytes | None = None
