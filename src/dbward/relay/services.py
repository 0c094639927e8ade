"""What a listener's sessions share: settings, policy inputs, audit, cancel keys, failed-login
budgets, live sessions."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sink import AuditSink
from dbward.config.model import AuditSettings, ListenerSettings
from dbward.core.types import StatementKind
from dbward.identity.base import Authenticator
from dbward.sql.offload import ClassifierPool
from dbward.sql.postgres import PostgresClassifier

if TYPE_CHECKING:
    from dbward.relay.postgres import PgSession


# Clients whose budget (cancel attempts, failed logins) is tracked, per table; the least
# recently seen is forgotten first.
_MAX_TRACKED_CLIENTS = 10_000
_REPORT_INTERVAL_S = 10.0  # refused attempts: at most one report (log line, record) this often

_T = TypeVar("_T")

# How many addresses' worth of failed logins an IPv6 /48 has in all (LoginThrottle).
SITE_SHARE = 4

# The NAT64 well-known prefix 64:ff9b::/96, as the address's top 96 bits.
_NAT64_PREFIX = int(ipaddress.IPv6Address("64:ff9b::")) >> 32


def client_key(client_host: str) -> str:
    """Whose budget (cancel attempts, connections before login) a client spends: an IPv4
    address, or an IPv6 /64.

    One host usually holds a whole IPv6 /64 (SLAAC, privacy addresses, a /64 per VM or
    container), so counting each IPv6 address on its own let one client take a fresh budget
    for every guess, and its spray evicted everyone else's from the table.

    An IPv6 address that carries a client's IPv4 address is that IPv4 address: all IPv4
    clients translated into the NAT64 prefix share one /64 (so one of them would spend the
    budget of all), and a 6to4 host holds a whole /48 (65,536 /64s) for its one IPv4 address.
    """
    try:
        address = ipaddress.ip_address(client_host)
    except ValueError:
        return client_host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d on a dual-stack socket
            return str(address.ipv4_mapped)
        value = int(address)
        if value >> 32 == _NAT64_PREFIX:  # 64:ff9b::a.b.c.d (RFC 6052, SIIT, NAT64)
            return str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
        if address.sixtofour is not None:  # 2002:a.b.c.d::/48
            return str(address.sixtofour)
        if address.teredo is not None:  # 2001::/32: the client's public IPv4 address
            return str(address.teredo[1])
        # From the integer: a scoped address (fe80::1%eth0) cannot be formatted back.
        return str(ipaddress.IPv6Network((value >> 64 << 64, 64)))
    return client_host


def site_key(client_host: str) -> str | None:
    """The IPv6 /48 (one site's usual delegation) that a native IPv6 client address is in,
    or None for an IPv4 client or an IPv6 address carrying an IPv4 one (see client_key).

    A client holding a /48 holds 65,536 /64s: a budget per /64 gave it 65,536 budgets, and
    spraying them cycled its own entries out of the bounded table, each coming back full."""
    return site_of_key(client_key(client_host))


def site_of_key(key: str) -> str | None:
    """site_key of a client whose client_key is `key` (for a caller that has it already)."""
    if not key.endswith("/64"):
        return None
    return str(ipaddress.IPv6Network(key).supernet(new_prefix=48))


class ClientBuckets:
    """A token bucket per client (client_key: an IPv4 address or an IPv6 /64), in a table of
    bounded size. A client absent from the table has a full bucket, so only clients that
    spent something take room, and a spray of sources evicts one entry per new source."""

    def __init__(
        self, rate_per_s: float, burst: float, key: Callable[[str], str] = client_key
    ) -> None:
        self._key = key  # what a client is counted as (its budget's key)
        self._rate = rate_per_s
        self._burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client key -> (tokens, last time)

    def _tokens(self, key: str, now: float) -> float:
        """The client's tokens now, its entry taken out of the table (put it back with
        _store, last: the dict's order is least recently seen first)."""
        tokens, last = self._buckets.pop(key, (self._burst, now))
        return min(self._burst, tokens + (now - last) * self._rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        buckets = self._buckets
        buckets[key] = (tokens, now)
        if len(buckets) > _MAX_TRACKED_CLIENTS:  # O(1): one eviction per request
            del buckets[next(iter(buckets))]

    def take(self, client_host: str, now: float) -> bool:
        """Spend one token if the client has one; False (nothing spent) if not."""
        key = self._key(client_host)
        tokens = self._tokens(key, now)
        allowed = tokens >= 1.0
        self._store(key, tokens - 1.0 if allowed else tokens, now)
        return allowed

    def charge(self, client_host: str, now: float) -> float:
        """Spend one token whether or not the client has one (it may go into debt, which
        it pays off at the refill rate); returns the seconds until it has one again (0.0:
        it still has one)."""
        key = self._key(client_host)
        tokens = self._tokens(key, now) - 1.0
        self._store(key, tokens, now)
        return self._wait(tokens)

    def refund(self, client_host: str, now: float) -> None:
        """Give back a token taken for something that did not spend it after all; a client
        whose bucket is full again leaves the table."""
        key = self._key(client_host)
        if key not in self._buckets:
            return  # forgotten meanwhile: it has a full bucket
        tokens = self._tokens(key, now) + 1.0
        if tokens < self._burst:
            self._store(key, tokens, now)

    def wait_s(self, client_host: str, now: float) -> float:
        """Seconds until the client has a token (0.0: it has one now); spends nothing. A
        client that is waiting is seen again: its entry is not the next to be forgotten."""
        key = self._key(client_host)
        if key not in self._buckets:
            return 0.0
        tokens = self._tokens(key, now)
        self._store(key, tokens, now)
        return self._wait(tokens)

    def _wait(self, tokens: float) -> float:
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def __len__(self) -> int:
        return len(self._buckets)


def take_with_site(
    buckets: ClientBuckets, sites: ClientBuckets, client_host: str, now: float
) -> bool:
    """Spend a token of the client's bucket and, for a native IPv6 client, of its /48's
    (`sites`, keyed by site_key); False if either is empty, and then neither is spent."""
    if not buckets.take(client_host, now):
        return False
    site = site_key(client_host)
    if site is None or sites.take(site, now):
        return True
    buckets.refund(client_host, now)  # refused by its site: its own bucket spent nothing
    return False


def refund_with_site(
    buckets: ClientBuckets, sites: ClientBuckets, client_host: str, now: float
) -> None:
    """Give back what take_with_site spent: the client's token and its /48's."""
    buckets.refund(client_host, now)
    site = site_key(client_host)
    if site is not None:
        sites.refund(site, now)


class RefusalReport(Generic[_T]):
    """Counts refused attempts so that they are reported (a log line, an audit record) at
    most once per interval: a spray cannot flood the log, and a spray that stops is still
    reported. `latest` is what the caller said of the latest refused attempt."""

    def __init__(self) -> None:
        self._unreported = 0
        self._last_report = -_REPORT_INTERVAL_S
        self.latest: _T | None = None

    def refused(self, latest: _T, now: float) -> tuple[int, float | None]:
        """Count a refused attempt. Returns how many to report now (0: not yet) and, when
        this attempt is the first one held back, the seconds after which take_unreported()
        must report the held ones (else None)."""
        self._unreported += 1
        self.latest = latest
        since = now - self._last_report
        if since < _REPORT_INTERVAL_S:
            first_held = self._unreported == 1
            return 0, (_REPORT_INTERVAL_S - since if first_held else None)
        count, self._unreported = self._unreported, 0
        self._last_report = now
        return count, None

    def take_unreported(self, now: float) -> int:
        """The refused attempts held back since the last report, to report now."""
        count, self._unreported = self._unreported, 0
        if count:
            self._last_report = now
        return count


class CancelRegistry:
    """Maps the cancel keys dbward hands out to live sessions; rate-limits attempts per client."""

    def __init__(self, rate_per_s: float, burst: float = 10.0) -> None:
        self._sessions: dict[tuple[int, bytes], PgSession] = {}
        burst = max(burst, rate_per_s)
        self._buckets = ClientBuckets(rate_per_s, burst)
        # Native IPv6 clients also spend from their /48's bucket (SITE_SHARE times a /64's):
        # a client holding a /48 had a budget per /64, 65,536 of them, to guess keys with.
        self._sites = ClientBuckets(rate_per_s * SITE_SHARE, burst * SITE_SHARE, str)
        # Refused attempts not yet reported in the log; `latest` is the latest one's host.
        self._refusals: RefusalReport[str] = RefusalReport()

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
        """Token bucket per client host (IPv6: per /64, and per /48 at SITE_SHARE times
        that), so cancel keys cannot be guessed at line rate."""
        now = time.monotonic() if now is None else now
        return take_with_site(self._buckets, self._sites, client_host, now)

    def refund_attempt(self, client_host: str, now: float | None = None) -> None:
        """Give back what allow_attempt spent: the attempt named a live session, so it was
        no guess. The budget is there against guessing keys; spent by rightful cancels too,
        it dropped those of a client whose calls time out often (asyncpg cancels every call
        that times out), and their statements ran on. An empty budget still drops every
        attempt, right or wrong: otherwise guesses made with it would go on being tried."""
        refund_with_site(
            self._buckets, self._sites, client_host, time.monotonic() if now is None else now
        )

    def refused_to_report(
        self, client_host: str, now: float | None = None
    ) -> tuple[int, float | None]:
        """Count a refused attempt: see RefusalReport.refused."""
        return self._refusals.refused(client_host, time.monotonic() if now is None else now)

    def take_unreported(self, now: float | None = None) -> int:
        """The refused attempts held back since the last log line, to report now."""
        return self._refusals.take_unreported(time.monotonic() if now is None else now)

    @property
    def latest_refused_host(self) -> str:
        """The host of the latest refused attempt ("" before the first)."""
        return self._refusals.latest or ""


class LoginThrottle:
    """Failed logins per client (an IPv4 address or an IPv6 /64): each spends a token of a
    bucket of `burst` refilled at `rate_per_s`; a client without a token is refused before
    any SCRAM work until it has one again. Refusals spend nothing, and a successful login
    gives nothing back (see docs/configuration.md, auth_fail_burst)."""

    def __init__(self, burst: int, rate_per_s: float) -> None:
        self._buckets = ClientBuckets(rate_per_s, float(burst))
        # Native IPv6 clients also spend from their /48's bucket (site_key), which holds
        # SITE_SHARE times an address's budget: a site's users rarely fail together, and a
        # client spraying its /64s gets that much, not a budget per /64.
        self._sites = ClientBuckets(rate_per_s * SITE_SHARE, float(burst * SITE_SHARE), str)
        # Refusals not yet in the log and the audit log; `latest` is the latest one's record.
        self.refusals: RefusalReport[AuditRecord] = RefusalReport()

    def retry_after(self, client_host: str, now: float | None = None) -> float:
        """0.0 if the client may try to log in now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        wait = self._buckets.wait_s(client_host, now)
        site = site_key(client_host)
        return wait if site is None else max(wait, self._sites.wait_s(site, now))

    def failed(self, client_host: str, now: float | None = None) -> float:
        """Count a failed login; returns the seconds until the client may try again (0.0:
        it still may)."""
        now = time.monotonic() if now is None else now
        wait = self._buckets.charge(client_host, now)
        site = site_key(client_host)
        return wait if site is None else max(wait, self._sites.charge(site, now))

    def lockouts(self, client_host: str, now: float | None = None) -> list[tuple[str, float]]:
        """Who is locked out with this client, and for how many seconds: its address
        (client_key) and its /48, each that has spent its budget (for the audit record)."""
        now = time.monotonic() if now is None else now
        found = [(client_key(client_host), self._buckets.wait_s(client_host, now))]
        site = site_key(client_host)
        if site is not None:
            found.append((site, self._sites.wait_s(site, now)))
        return [(key, wait) for key, wait in found if wait > 0.0]

    def reserve(self, client_host: str, now: float | None = None) -> bool:
        """Spend a token for a step of a login (its password checked, perhaps) if the client
        has one (False: nothing spent, refuse it). The token is the failure's if the step
        fails, else give it back (release): while a password is being checked its failure is
        already counted, so logins begun together cannot have more passwords checked than
        the client's budget."""
        now = time.monotonic() if now is None else now
        return take_with_site(self._buckets, self._sites, client_host, now)

    def release(self, client_host: str, now: float | None = None) -> None:
        """Give back the token of a login step that did not fail (see reserve)."""
        refund_with_site(
            self._buckets, self._sites, client_host, time.monotonic() if now is None else now
        )

    def refused(self, record: AuditRecord, now: float | None = None) -> tuple[int, float | None]:
        """Count a refused login: see RefusalReport.refused."""
        return self.refusals.refused(record, time.monotonic() if now is None else now)


def login_throttle(settings: ListenerSettings) -> LoginThrottle | None:
    """The listener's failed-login throttle, or None when auth_fail_burst is 0 (off)."""
    if not settings.auth_fail_burst:
        return None
    return LoginThrottle(settings.auth_fail_burst, settings.auth_fail_rate_per_s)


class ListenerCounts:
    """What a listener's sessions did, as plain ints read by the metrics endpoint at scrape
    time (dbward.server.metrics): incrementing one costs a dict or attribute update on the
    event loop, no lock (prometheus_client's own counters take one per increment).

    Only fixed vocabularies key them (statement kinds, audit events, outcome names): nothing
    a client chooses (identities, addresses, SQL) is ever a key.
    """

    __slots__ = (
        "allowed",
        "audit_refused",
        "cancels",
        "connections",
        "denied",
        "events",
        "logins",
        "refused",
    )

    # Outcomes of a login attempt, of a CancelRequest, and why a connection was refused.
    LOGIN_RESULTS = ("ok", "failed", "abandoned", "throttled")
    CANCEL_RESULTS = ("forwarded", "refused", "failed", "throttled")
    REFUSAL_REASONS = ("max_connections", "max_unauthenticated_per_host", "draining")

    def __init__(self) -> None:
        self.connections = 0  # TCP connections accepted (each one, refused or not)
        # Statements by what became of them, by kind (an EXECUTE: the kind it runs): allowed
        # (forwarded), denied by the policy, or refused because the audit log could not
        # record them (fail closed, 58030; a durable intent that failed included).
        self.allowed: dict[StatementKind, int] = dict.fromkeys(StatementKind, 0)
        self.denied: dict[StatementKind, int] = dict.fromkeys(StatementKind, 0)
        self.audit_refused: dict[StatementKind, int] = dict.fromkeys(StatementKind, 0)
        # Session-level audit events written by the sessions (connect, upstream_lost, ...).
        self.events: dict[AuditEvent, int] = dict.fromkeys(AuditEvent, 0)
        self.logins: dict[str, int] = dict.fromkeys(self.LOGIN_RESULTS, 0)
        self.cancels: dict[str, int] = dict.fromkeys(self.CANCEL_RESULTS, 0)
        self.refused: dict[str, int] = dict.fromkeys(self.REFUSAL_REASONS, 0)


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
    # Failed logins per client address (None: auth_fail_burst is 0, no throttling).
    logins: LoginThrottle | None = None
    clock: Callable[[], float] = time.time
    sessions: set[PgSession] = field(default_factory=set)
    # Connections over max_connections, to be refused at their StartupMessage: not counted
    # in `sessions`, but the drain ends them too (a refusal is audited, so it must not come
    # after the audit log closed).
    over_limit: set[PgSession] = field(default_factory=set)
    # Cancel requests being sent to the database (a client's, or dbward's own): shutdown
    # waits for them, and they outlive the connection that asked.
    cancel_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Logins (and CancelRequests) under way: one ended by the drain can still write a record
    # (a refusal read before the drain), so shutdown waits for them too.
    startup_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Bytes of unfinished client messages buffered by all sessions (max_partial_message_bytes).
    partial_message_bytes: int = 0
    # Connections not authenticated yet, per client_key (hosts at zero are removed).
    unauthenticated: dict[str, int] = field(default_factory=dict)
    # The same, per IPv6 /48 of native IPv6 clients (site_key): capped at SITE_SHARE times a host's.
    unauthenticated_sites: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    warned_superuser: bool = False  # the service role is a superuser: warned once per listener
    # Classifies very large statements off the event loop (None: everything inline).
    offload: ClassifierPool | None = None
    # tls-server-end-point data of client_tls's certificate: SCRAM-SHA-256-PLUS over TLS.
    client_tls_end_point: bytes | None = None
    # Counts for the metrics endpoint (read at scrape time; never reset).
    counts: ListenerCounts = field(default_factory=ListenerCounts)
