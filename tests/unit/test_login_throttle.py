"""Failed-login throttling per client address (auth_fail_burst, auth_fail_rate_per_s), no network.

A client address that fails too many logins is refused before any SCRAM work until its budget
refills; the refusals reach the log and the audit log once an interval, with their count.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import pytest

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sink import MemorySink
from dbward.config.model import AuditSettings, ListenerSettings, UpstreamSettings, UserSettings
from dbward.identity.base import AuthExchange
from dbward.identity.local import LocalAuthenticator
from dbward.relay import services as services_module
from dbward.relay.login import report_held_logins
from dbward.relay.postgres import PgSession
from dbward.relay.services import (
    CancelRegistry,
    ListenerServices,
    LoginThrottle,
    client_key,
    login_throttle,
    site_key,
)
from dbward.server.listener import PgListener
from dbward.sql.postgres import PostgresClassifier
from dbward.wire.postgres import messages
from dbward.wire.postgres.scram import make_verifier
from fixtures.detached import PeerTransport

T0 = 1000.0


def _record(addr: str) -> AuditRecord:
    return AuditRecord(AuditEvent.AUTH_FAIL, 0, "s", client_addr=addr)


def test_a_burst_of_failures_then_refusal_until_the_budget_refills() -> None:
    throttle = LoginThrottle(burst=3, rate_per_s=0.5)
    assert throttle.retry_after("192.0.2.1", T0) == 0.0
    assert [throttle.failed("192.0.2.1", T0) for _ in range(2)] == [0.0, 0.0]
    assert throttle.retry_after("192.0.2.1", T0) == 0.0  # two failures: still allowed
    assert throttle.failed("192.0.2.1", T0) == pytest.approx(2.0)  # the third locks it
    assert throttle.retry_after("192.0.2.1", T0 + 0.5) == pytest.approx(1.5)
    # Asking (a refused attempt) spends nothing: the wait does not grow with retries.
    for _ in range(100):
        throttle.retry_after("192.0.2.1", T0 + 1.0)
    assert throttle.retry_after("192.0.2.1", T0 + 1.0) == pytest.approx(1.0)
    # Refilled at 0.5/s: one more try after 2 s, and a failure locks it again at once.
    assert throttle.retry_after("192.0.2.1", T0 + 2.0) == 0.0
    assert throttle.failed("192.0.2.1", T0 + 2.0) == pytest.approx(2.0)
    # After the whole burst's time the full burst is back (and not more).
    assert [throttle.failed("192.0.2.1", T0 + 100.0) for _ in range(3)][-1] == pytest.approx(2.0)
    # Other addresses were never affected.
    assert throttle.retry_after("192.0.2.2", T0 + 100.0) == 0.0


def test_failures_beyond_the_budget_are_owed() -> None:
    """Logins begun while the address still had budget and failing together (a guesser
    opening many connections at once) each count: the wait pays them all back, so the rate
    over time stays auth_fail_rate_per_s whatever the concurrency."""
    throttle = LoginThrottle(burst=3, rate_per_s=0.5)
    waits = [throttle.failed("192.0.2.1", T0) for _ in range(8)]
    assert waits[-1] == pytest.approx(12.0)  # 5 owed + 1 to try again, at 0.5/s
    assert throttle.retry_after("192.0.2.1", T0 + 11.0) == pytest.approx(1.0)
    assert throttle.retry_after("192.0.2.1", T0 + 12.0) == 0.0


def test_a_step_holds_a_token_kept_if_it_fails_given_back_if_not() -> None:
    """A login step (its password checked) spends a token first: the failure is counted as
    the password is checked, so logins begun together get no more checks than the budget."""
    throttle = LoginThrottle(burst=2, rate_per_s=0.5)
    table = throttle._buckets._buckets
    assert throttle.reserve("192.0.2.1", T0) and throttle.reserve("192.0.2.1", T0)
    assert not throttle.reserve("192.0.2.1", T0)  # two steps under way: nothing left
    throttle.release("192.0.2.1", T0)  # one did not fail
    assert throttle.reserve("192.0.2.1", T0)
    assert throttle.retry_after("192.0.2.1", T0) == pytest.approx(2.0)
    # Steps that all succeed leave nothing behind: the table holds clients that spent.
    assert throttle.reserve("192.0.2.9", T0)
    throttle.release("192.0.2.9", T0)
    assert "192.0.2.9" not in table
    throttle.release("192.0.2.10", T0)  # forgotten meanwhile: nothing to give back to
    assert "192.0.2.10" not in table


def test_one_ipv6_64_is_one_address() -> None:
    throttle = LoginThrottle(burst=2, rate_per_s=0.1)
    throttle.failed("2001:db8:1:2::1", T0)
    throttle.failed("2001:db8:1:2::2", T0)
    assert throttle.retry_after("2001:db8:1:2:ffff::9", T0) > 0  # a fresh address, same /64
    assert throttle.retry_after("2001:db8:1:3::1", T0) == 0.0  # another /64
    throttle.failed("192.0.2.7", T0)
    throttle.failed("::ffff:192.0.2.7", T0)  # the same IPv4 client on a dual-stack socket
    assert throttle.retry_after("192.0.2.7", T0) > 0
    assert throttle.retry_after("fe80::1%eth0", T0) == 0.0


def test_the_table_is_bounded_and_keeps_an_address_that_keeps_trying() -> None:
    throttle = LoginThrottle(burst=1, rate_per_s=0.001)
    table = throttle._buckets._buckets
    throttle.failed("192.0.2.1", T0)  # locked for 1000 s
    for i in range(12_000):
        throttle.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", T0)
        if i % 1000 == 0:
            assert throttle.retry_after("192.0.2.1", T0) > 0  # refused: seen again
    assert len(table) == 10_000
    assert throttle.retry_after("192.0.2.1", T0) > 0  # not evicted by the spray
    assert throttle.retry_after("10.0.0.0", T0) == 0.0  # the least recently seen was
    # Asking about addresses that never failed takes no room.
    for i in range(100):
        assert throttle.retry_after(f"198.51.100.{i}", T0) == 0.0
    assert "198.51.100.1" not in table


def test_refusals_are_reported_once_an_interval_with_their_count() -> None:
    throttle = LoginThrottle(burst=1, rate_per_s=0.001)
    reports = [throttle.refused(_record(f"192.0.2.{i % 7}:5"), T0 + i * 0.001) for i in range(5000)]
    assert reports[0] == (1, None)  # the first at once
    assert reports[1] == (0, pytest.approx(10.0 - 0.001))  # one timer for the rest
    assert all(report == (0, None) for report in reports[2:])
    assert throttle.refusals.latest == _record("192.0.2.1:5")  # 4999 % 7 == 1
    assert throttle.refusals.take_unreported(T0 + 10.0) == 4999
    assert throttle.refusals.take_unreported(T0 + 10.5) == 0


# ------------------------------------------------------------------ through a session


class _CountingAuthenticator:
    """LocalAuthenticator, counting the exchanges begun (each is SCRAM work)."""

    def __init__(self) -> None:
        verifier = make_verifier("a-pass", iterations=4096)
        self._real = LocalAuthenticator(
            [UserSettings(name="alice", password_verifier=verifier)], mock_secret=b"\x07" * 32
        )
        self.begun = 0

    def begin(self, user: str, *, tls: bool, channel_binding: bytes | None = None) -> AuthExchange:
        self.begun += 1
        return self._real.begin(user, tls=tls, channel_binding=channel_binding)


def _services(
    sink: MemorySink,
    authenticator: _CountingAuthenticator,
    burst: int = 2,
    client_tls: ssl.SSLContext | None = None,
) -> ListenerServices:
    settings = ListenerSettings(
        name="t",
        upstream=UpstreamSettings(user="svc", tls={"mode": "disable"}),
        auth_fail_burst=burst,
        auth_fail_rate_per_s=0.01,
    )
    return ListenerServices(
        settings=settings,
        audit_settings=AuditSettings(),
        audit=sink,
        classifier=PostgresClassifier(),
        authenticator=authenticator,
        client_tls=client_tls,
        upstream_tls=None,
        cancels=CancelRegistry(5),
        logins=login_throttle(settings),
    )


async def _login(services: ListenerServices, address: str, app: str) -> PeerTransport:
    """A login that fails (a mechanism dbward does not offer), or is refused before it starts."""
    transport = PeerTransport(address)
    session = PgSession(services)
    session.connection_made(transport)  # type: ignore[arg-type]
    startup = {"user": "alice", "database": "app", "application_name": app}
    session.data_received(messages.startup_message(startup))
    session.data_received(messages.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc"))
    for _ in range(20):
        await asyncio.sleep(0)
        if transport.closed:
            break
    assert transport.closed
    session.connection_lost(None)
    return transport


def test_a_locked_address_is_refused_before_scram_and_audited_in_aggregate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An interval no run of this test outlasts, however loaded the machine (a 0.2 s one ended
    # in the middle of the 300 logins on a busy host, splitting the aggregate): the report the
    # first held refusal schedules is captured and run, as the loop would at the interval's end.
    monkeypatch.setattr(services_module, "_REPORT_INTERVAL_S", 3600.0)
    sink = MemorySink()
    authenticator = _CountingAuthenticator()
    services = _services(sink, authenticator)
    scheduled: list[tuple[float, Callable[..., object], tuple[object, ...]]] = []

    async def run() -> tuple[list[PeerTransport], list[PeerTransport], PeerTransport]:
        loop = asyncio.get_running_loop()
        call_later = loop.call_later

        def capture(delay: float, callback: Callable[..., object], *args: object) -> object:
            if callback is report_held_logins:
                scheduled.append((delay, callback, args))
                return None
            return call_later(delay, callback, *args)  # login timeouts and the like

        loop.call_later = capture  # type: ignore[method-assign, assignment]
        failed = [await _login(services, "192.0.2.5", f"fail{i}") for i in range(2)]
        refused = [await _login(services, "192.0.2.5", f"refused{i}") for i in range(300)]
        other = await _login(services, "192.0.2.6", "other")
        # The first held refusal, and only it, asked for a report at the interval's end.
        assert [(round(delay), callback) for delay, callback, _ in scheduled] == [
            (3600, report_held_logins)
        ]
        _, callback, args = scheduled[0]
        callback(*args)  # the interval ends: the held refusals are reported
        return failed, refused, other

    failed, refused, other = asyncio.run(run())
    for transport in [*failed, other]:
        assert b"28P01" in transport.written
    for transport in refused:
        assert transport.written[:1] == b"E"  # the error, no SASL offer before it
        fields = messages.parse_error_fields(bytes(transport.written[5:]))
        assert (fields["S"], fields["C"]) == ("FATAL", "28000")
        assert fields["M"].startswith(
            "dbward: too many failed logins from this address; try again in"
        )
    assert authenticator.begun == 3  # two failures and the other address: no SCRAM for refusals
    assert services.unauthenticated == {} and not services.sessions
    fails = [r for r in sink.records if r.event == AuditEvent.AUTH_FAIL]
    # The two real failures (the second says the address is now locked out), then the
    # refusals: the first at once, the other 299 in one record when the interval ended.
    assert [(r.application_name, r.sqlstate, r.detail) for r in fails] == [
        ("fail0", "28P01", ""),
        ("fail1", "28P01", "locked out: logins from 192.0.2.5 refused for 100 s"),
        ("refused0", "28000", "refused=1"),
        ("other", "28P01", ""),
        ("refused299", "28000", "refused=299"),
    ]
    refusal = fails[2]
    assert refusal.reason == "too many failed logins from this client address (auth_fail_burst)"
    assert (refusal.identity, refusal.client_addr) == ("alice", "192.0.2.5:5432")
    # Refused connections leave no connect (nor disconnect) record: only the aggregate.
    connects = [r.application_name for r in sink.records if r.event == AuditEvent.CONNECT]
    assert connects == ["fail0", "fail1", "other"]


async def _settle(transport: PeerTransport) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
        if transport.closed:
            return


@pytest.mark.parametrize("returns", ["locked", "budget-back", "hangs-up"])
def test_a_locked_address_gets_no_tls_handshake(returns: str) -> None:
    """The lockout was checked at the StartupMessage, after the TLS handshake: a guesser made
    dbward do a handshake per try only to be refused. A locked-out address's SSLRequest is
    answered 'N', no handshake; its plaintext StartupMessage is refused readably (even if its
    budget came back in between: it would log in without the TLS it asked for), and a client
    that hangs up at the 'N' (sslmode require) counts as a refused login too."""
    sink = MemorySink()
    services = _services(
        sink, _CountingAuthenticator(), client_tls=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    )

    async def run() -> PeerTransport:
        for i in range(2):
            await _login(services, "192.0.2.5", f"fail{i}")
        transport = PeerTransport("192.0.2.5")
        session = PgSession(services)
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(messages.ssl_request())
        await _settle(transport)
        assert transport.written == b"N" and not transport.closed
        assert services.logins is not None
        if returns == "budget-back":
            services.logins.release("192.0.2.5")  # a token back: the address may try again
            assert services.logins.retry_after("192.0.2.5") == 0.0
        if returns == "hangs-up":
            session.connection_lost(None)
        else:
            session.data_received(messages.startup_message({"user": "alice", "database": "a"}))
        await _settle(transport)
        session.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    assert services.counts.logins["throttled"] == 1
    assert services.unauthenticated == {} and not services.sessions
    if returns == "hangs-up":
        return
    assert transport.written[:2] == b"NE"  # the refusal, in the clear: no SASL offer
    fields = messages.parse_error_fields(bytes(transport.written[6:]))
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert fields["M"].startswith("dbward: too many failed logins from this address")
    assert transport.closed


def test_an_address_with_budget_gets_tls_and_one_ssl_request_only() -> None:
    """As PostgreSQL: one SSLRequest per connection; a second one is a protocol violation."""
    sink = MemorySink()
    services = _services(sink, _CountingAuthenticator())  # no TLS on this listener: 'N'

    async def run() -> PeerTransport:
        transport = PeerTransport("192.0.2.5")
        session = PgSession(services)
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(messages.ssl_request())
        await _settle(transport)
        assert transport.written == b"N"
        session.data_received(messages.ssl_request())
        await _settle(transport)
        session.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    fields = messages.parse_error_fields(bytes(transport.written[6:]))
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert "SSLRequest after the SSL negotiation" in fields["M"]
    assert services.counts.logins["throttled"] == 0


def test_throttling_off_when_the_burst_is_zero() -> None:
    sink = MemorySink()
    authenticator = _CountingAuthenticator()
    services = _services(sink, authenticator, burst=0)
    assert services.logins is None

    async def run() -> list[PeerTransport]:
        return [await _login(services, "192.0.2.5", f"fail{i}") for i in range(20)]

    assert all(b"28P01" in t.written for t in asyncio.run(run()))
    assert authenticator.begun == 20


def test_refusals_held_at_shutdown_are_reported_before_the_log_closes() -> None:
    sink = MemorySink()
    services = _services(sink, _CountingAuthenticator())

    async def run() -> None:
        for i in range(2):
            await _login(services, "192.0.2.5", f"fail{i}")
        for i in range(5):
            await _login(services, "192.0.2.5", f"refused{i}")
        await PgListener(services).drain(0)  # well within the 10 s interval

    asyncio.run(run())
    refusals = [r for r in sink.records if r.sqlstate == "28000"]
    assert [(r.application_name, r.detail) for r in refusals] == [
        ("refused0", "refused=1"),
        ("refused4", "refused=4"),
    ]


@pytest.mark.parametrize("how", ["hang-up", "terminate"])
def test_a_client_that_gives_up_before_trying_a_password_is_not_counted(how: str) -> None:
    """psql connects without a password, sees the SASL offer, hangs up and asks the user for
    one: no password was tried, so no budget is spent (nor by a Terminate instead)."""
    sink = MemorySink()
    services = _services(sink, _CountingAuthenticator())  # auth_fail_burst 2

    async def abandon() -> None:
        transport = PeerTransport("192.0.2.5")
        session = PgSession(services)
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(messages.startup_message({"user": "alice", "database": "app"}))
        for _ in range(5):
            await asyncio.sleep(0)
        assert transport.written[:1] == b"R"  # the SASL offer
        if how == "terminate":
            session.data_received(messages.terminate())
        for _ in range(5):
            await asyncio.sleep(0)
        session.connection_lost(None)
        for _ in range(5):
            await asyncio.sleep(0)

    async def run() -> PeerTransport:
        for _ in range(10):
            await abandon()
        return await _login(services, "192.0.2.5", "tries")

    assert b"28P01" in asyncio.run(run()).written  # tried, not refused
    assert [r.sqlstate for r in sink.records if r.event == AuditEvent.AUTH_FAIL][-1] == "28P01"
    assert services.logins is not None
    assert services.logins.retry_after("192.0.2.5") == 0.0  # one failure of two


class _Settled:
    """A session the drain ends at once."""

    def request_shutdown(self) -> None: ...

    def force_close(self) -> None: ...

    def abort(self) -> None: ...


def test_a_refusal_made_after_the_drain_reported_is_written_at_once() -> None:
    """A StartupMessage read just before the drain began is handled during it, after the
    drain wrote the held refusals (grace 0: nothing to wait for first): its refusal was held
    for a report 10 s later, after dbward had exited."""
    sink = MemorySink()
    services = _services(sink, _CountingAuthenticator())

    async def run() -> None:
        for i in range(2):
            await _login(services, "192.0.2.5", f"fail{i}")
        await _login(services, "192.0.2.5", "refused-before")  # reported at once
        services.settings = services.settings.model_copy(update={"max_connections": 1})
        services.sessions.add(_Settled())  # type: ignore[arg-type]
        transport = PeerTransport("192.0.2.5")
        late = PgSession(services)
        late.connection_made(transport)  # type: ignore[arg-type]
        assert late not in services.sessions  # over max_connections: refused at its startup
        for _ in range(5):
            await asyncio.sleep(0)
        late.data_received(messages.startup_message({"user": "alice", "application_name": "late"}))
        await PgListener(services).drain(0)
        assert transport.closed
        late.connection_lost(None)

    asyncio.run(run())
    refusals = [r for r in sink.records if r.sqlstate == "28000"]
    assert [(r.application_name, r.detail) for r in refusals] == [
        ("refused-before", "refused=1"),
        ("late", "refused=1"),
    ]


def test_an_ipv6_address_carrying_an_ipv4_one_is_that_ipv4_address() -> None:
    """IPv4 clients translated into the NAT64 prefix all fell in one /64: one guesser locked
    every IPv4 client out. A 6to4 host has a /48 (65,536 /64s, each with a fresh budget) for
    its one IPv4 address."""
    assert client_key("64:ff9b::192.0.2.1") == "192.0.2.1"
    assert client_key("2002:c000:201:ffff::9") == "192.0.2.1"
    assert client_key("2001:0:4136:e378:8000:63bf:3fff:fdd2") == "192.0.2.45"  # Teredo
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    throttle = LoginThrottle(burst=1, rate_per_s=0.001)
    throttle.failed("64:ff9b::192.0.2.1", T0)
    assert throttle.retry_after("64:ff9b::192.0.2.2", T0) == 0.0  # another IPv4 client
    assert throttle.retry_after("192.0.2.1", T0) > 0
    throttle.failed("2002:c633:6401:1::1", T0)  # 198.51.100.1 over 6to4
    assert throttle.retry_after("2002:c633:6401:2::1", T0) > 0  # another /64 of its /48


def test_an_ipv6_48_shares_a_budget_of_four_addresses() -> None:
    """A client holding a /48 holds 65,536 /64s: a budget per /64 alone let it guess 10 times
    from each, and cycling them pushed its own entries out of the table, each back full."""
    assert site_key("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert site_key("192.0.2.1") is None
    assert site_key("::ffff:192.0.2.1") is None  # an IPv4 client: its own address only
    assert site_key("2002:c000:201:ffff::9") is None  # 6to4: the IPv4 address inside
    throttle = LoginThrottle(burst=2, rate_per_s=0.1)
    for subnet in range(4):  # each /64 within its own budget, the site's 8 spent
        for _ in range(2):
            throttle.failed(f"2001:db8:1:{subnet}::1", T0)
    assert throttle.retry_after("2001:db8:1:ff::1", T0) > 0  # a fresh /64 of the same site
    assert throttle.lockouts("2001:db8:1:ff::1", T0) == [("2001:db8:1::/48", 2.5)]
    assert not throttle.reserve("2001:db8:1:ff::1", T0)
    assert throttle.retry_after("2001:db8:2:ff::1", T0) == 0.0  # another site
    # The site earns its budget back at four addresses' rate: one try 2.5 s later.
    assert throttle.retry_after("2001:db8:1:ff::1", T0 + 2.5) == 0.0


def test_a_reserved_step_holds_the_sites_token_too() -> None:
    throttle = LoginThrottle(burst=1, rate_per_s=0.001)
    hosts = [f"2001:db8:7:{subnet}::1" for subnet in range(5)]
    assert [throttle.reserve(host, T0) for host in hosts] == [True] * 4 + [False]
    assert [key for key, _ in throttle.lockouts(hosts[4], T0)] == ["2001:db8:7::/48"]
    throttle.release(hosts[0], T0)  # that step did not fail: its tokens come back
    assert throttle.retry_after(hosts[0], T0) == 0.0
    assert throttle.reserve(hosts[4], T0)
    # A /64 out of its own budget is locked as itself while its site still has some.
    throttle = LoginThrottle(burst=1, rate_per_s=0.001)
    throttle.failed(hosts[0], T0)
    assert [key for key, _ in throttle.lockouts(hosts[0], T0)] == ["2001:db8:7::/64"]
    assert not throttle.reserve(hosts[0], T0)
    assert throttle.reserve(hosts[1], T0)  # the /64's refusal spent nothing of the site's


def test_a_site_that_spent_its_budget_is_named_in_the_lockout_record() -> None:
    sink = MemorySink()
    authenticator = _CountingAuthenticator()
    services = _services(sink, authenticator, burst=1)

    async def run() -> list[PeerTransport]:
        # Four /64s of one /48 fail once each (each its own budget), the fifth is refused.
        return [await _login(services, f"2001:db8:5:{n}::1", f"v6-{n}") for n in range(5)]

    transports = asyncio.run(run())
    for transport in transports[:4]:
        assert b"28P01" in transport.written
    assert b"28000" in transports[4].written
    assert authenticator.begun == 4
    fails = [(r.application_name, r.detail) for r in sink.records if r.event == "auth_fail"]
    assert fails[:4] == [
        ("v6-0", "locked out: logins from 2001:db8:5::/64 refused for 100 s"),
        ("v6-1", "locked out: logins from 2001:db8:5:1::/64 refused for 100 s"),
        ("v6-2", "locked out: logins from 2001:db8:5:2::/64 refused for 100 s"),
        (
            "v6-3",
            "locked out: logins from 2001:db8:5:3::/64 refused for 100 s,"
            " from 2001:db8:5::/48 refused for 25 s",
        ),
    ]
