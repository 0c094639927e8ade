"""Probing logins must not tell which user names exist, nor stall the proxy (no network)."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dbward.audit.records import AuditEvent
from dbward.audit.sink import MemorySink
from dbward.config.model import (
    AuditSettings,
    Config,
    ListenerSettings,
    UpstreamSettings,
    UserSettings,
)
from dbward.core.errors import AuthenticationFailed, ConfigError
from dbward.identity.auth_secret import load_auth_secret
from dbward.identity.base import AuthStep
from dbward.identity.local import LocalAuthenticator
from dbward.relay.postgres import PgSession
from dbward.relay.services import SITE_SHARE, CancelRegistry, ListenerServices
from dbward.sql.postgres import PostgresClassifier
from dbward.wire.postgres import messages, scram
from dbward.wire.postgres.scram import make_verifier
from fixtures.detached import PeerTransport

_SECRET = b"\x07" * 32
USERS = [
    UserSettings(name="alice", password_verifier=make_verifier("a-pass", iterations=8192)),
    UserSettings(name="bob", password_verifier=make_verifier("b-pass", iterations=8192)),
    UserSettings(name="carol", password_verifier=make_verifier("c-pass")),
]


def _salts_in_a_new_process(verifiers: dict[str, str], secret_file: Path) -> dict[str, str]:
    """Start a fresh interpreter (a restarted proxy) and collect the salts it hands out."""
    script = f"""
import asyncio, json
from pathlib import Path
from dbward.config.model import UserSettings
from dbward.identity.auth_secret import load_auth_secret
from dbward.identity.local import LocalAuthenticator
from dbward.wire.postgres import messages, scram
from dbward.wire.postgres.scram import ScramClient

users = [UserSettings(name=n, password_verifier=v) for n, v in {verifiers!r}.items()]
auth = LocalAuthenticator(users, mock_secret=load_auth_secret(Path({str(secret_file)!r})))

async def first(name):
    client = ScramClient("whatever")
    frame = messages.sasl_initial_response("SCRAM-SHA-256", client.client_first())
    reply = (await auth.begin(name, tls=False).step(frame[5:])).reply
    return reply[reply.index(b",s="):].decode()

names = ["alice", "bob", "mallory", "root"]
print(json.dumps({{n: asyncio.run(first(n)) for n in names}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_unknown_user_salts_survive_a_restart_like_real_ones(tmp_path: Path) -> None:
    """Comparing salts across a restart must not single out the names that do not exist."""
    verifiers = {user.name: user.password_verifier for user in USERS}
    secret = tmp_path / "dbward-auth.key"
    first = _salts_in_a_new_process(verifiers, secret)
    second = _salts_in_a_new_process(verifiers, secret)
    assert first == second
    assert len({first["mallory"], first["root"], first["alice"]}) == 3
    # Unknown names get the iteration count most configured users have.
    assert first["mallory"].endswith(",i=8192") and first["alice"].endswith(",i=8192")


def test_unknown_user_salts_survive_a_change_of_users(tmp_path: Path) -> None:
    """Sixteenth review: the fake salts were derived from every configured user's key, so
    adding a user (or rotating any password) changed every unknown name's salt while real
    users' salts stayed; salts recorded before and after told exactly which names exist."""
    secret = tmp_path / "dbward-auth.key"
    before = {user.name: user.password_verifier for user in USERS}
    after = dict(before, dave=make_verifier("d-pass"), carol=make_verifier("c-new"))
    first = _salts_in_a_new_process(before, secret)
    second = _salts_in_a_new_process(after, secret)
    assert first["mallory"] == second["mallory"] and first["root"] == second["root"]
    assert first["alice"] == second["alice"] and first["bob"] == second["bob"]


def test_auth_secret_file_is_created_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "dbward-auth.key"
    secret = load_auth_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_auth_secret(path) == secret
    assert LocalAuthenticator(USERS, mock_secret=secret)  # what the runtime builds


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("not hex\n", "expected 64 hexadecimal digits"),
        ("abcd\n", "holds 2 bytes, expected 32"),
        ("00" * 600, "too large"),
    ],
)
def test_a_bad_auth_secret_file_names_the_key(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "dbward-auth.key"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"auth_secret_file: .*{why}"):
        load_auth_secret(path)


def test_auth_secret_file_defaults_to_the_audit_folder(tmp_path: Path) -> None:
    listener = {"name": "pg", "upstream": {"host": "127.0.0.1", "user": "svc"}}
    config = Config.model_validate(
        {"listeners": [listener], "audit": {"path": str(tmp_path / "a" / "audit.db")}}
    )
    assert config.auth_secret_path == tmp_path / "a" / "dbward-auth.key"
    chosen = Config.model_validate(
        {"listeners": [listener], "auth_secret_file": str(tmp_path / "k")}
    )
    assert chosen.auth_secret_path == tmp_path / "k"


def test_a_spray_of_cancel_sources_keeps_the_rate_table_bounded_and_cheap() -> None:
    registry = CancelRegistry(rate_per_s=1.0, burst=2.0)
    now = 1000.0
    table = registry._buckets._buckets
    for i in range(12_000):
        registry.allow_attempt(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", now)
    assert len(table) <= 10_000
    # Bounded in place, one eviction per attempt: the table was rebuilt on every attempt past
    # 10,000 addresses before (7 ms each at 60,000, on the loop every session shares).
    assert registry._buckets._buckets is table
    # A host that keeps trying is still limited, spray or not.
    assert [registry.allow_attempt("192.0.2.1", now) for _ in range(4)] == [
        True,
        True,
        False,
        False,
    ]


def test_refused_cancel_attempts_are_reported_once_per_interval() -> None:
    """Sixteenth review: each refused attempt wrote a log line, so a spray flooded the log."""
    registry = CancelRegistry(rate_per_s=1.0, burst=1.0)
    reports = [registry.refused_to_report("192.0.2.1", 1000.0 + i * 0.001) for i in range(5000)]
    assert reports[0] == (1, None) and sum(1 for r, _ in reports if r) == 1
    assert registry.refused_to_report("192.0.2.1", 1011.0) == (5000, None)  # the rest


def test_refused_cancel_attempts_are_reported_when_the_spray_stops() -> None:
    """A spray that stopped before the interval ended was never reported: the count waited
    for a next attempt. The first attempt held back says when to report the rest."""
    registry = CancelRegistry(rate_per_s=1.0, burst=1.0)
    assert registry.refused_to_report("192.0.2.1", 1000.0) == (1, None)
    held = [registry.refused_to_report(f"192.0.2.{i}", 1001.0 + i) for i in range(1, 4)]
    assert held == [(0, 8.0), (0, None), (0, None)]  # one timer, at the interval's end
    assert registry.latest_refused_host == "192.0.2.3"
    assert registry.take_unreported(1010.0) == 3
    assert registry.take_unreported(1010.5) == 0  # nothing twice
    # The next line waits a whole interval after the timer's report.
    assert registry.refused_to_report("192.0.2.9", 1015.0) == (0, 5.0)


def test_cancel_attempts_from_one_ipv6_64_share_one_budget() -> None:
    """An IPv6 client owns a /64: a fresh address per guess must not mean a fresh budget."""
    registry = CancelRegistry(rate_per_s=1.0, burst=2.0)
    now = 1000.0
    spray = [registry.allow_attempt(f"2001:db8:1:2::{i:x}", now) for i in range(1, 50)]
    assert spray.count(True) == 2
    # Other /64s, and IPv4 clients (also seen as IPv4-mapped IPv6), keep their own budgets.
    assert registry.allow_attempt("2001:db8:1:3::1", now)
    assert registry.allow_attempt("192.0.2.7", now)
    assert registry.allow_attempt("::ffff:192.0.2.7", now)
    assert not registry.allow_attempt("::ffff:192.0.2.7", now)
    # Scoped (link-local) addresses too.
    assert [registry.allow_attempt(f"fe80::{i}%eth0", now) for i in range(1, 5)] == [
        True,
        True,
        False,
        False,
    ]


def test_cancel_attempts_from_one_ipv6_48_share_a_site_budget() -> None:
    """A client holding a /48 holds 65,536 /64s: a budget per /64 let it guess cancel keys
    65,536 times as fast. Its /64s now also spend from the /48's (four times a /64's)."""
    registry = CancelRegistry(rate_per_s=1.0, burst=2.0)
    now = 1000.0
    spray = [registry.allow_attempt(f"2001:db8:1:{i:x}::1", now) for i in range(1, 200)]
    assert spray.count(True) == 2 * SITE_SHARE
    # A refusal by the site spends nothing of the /64 it came from: hammered while the site
    # is dry, it still has its whole budget once the site's refills.
    assert not any(registry.allow_attempt("2001:db8:1:ff::1", now) for _ in range(5))
    assert [registry.allow_attempt("2001:db8:1:ff::1", now + 0.5) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    # Another /48, and IPv4 clients, are not affected.
    assert registry.allow_attempt("2001:db8:2:1::1", now)
    assert registry.allow_attempt("192.0.2.7", now)


def test_rightful_cancels_spend_no_budget_but_an_empty_one_drops_them_too() -> None:
    """r60: asyncpg cancels every call that times out; those cancels spent the budget kept
    against guessing keys, and past it were dropped. Attempts that name a live session are
    refunded now; guesses still spend, and once they have emptied the budget every attempt
    is dropped, a right key too (else guessing would go on at line rate)."""
    registry = CancelRegistry(rate_per_s=0.1, burst=2.0)
    now = 1000.0
    for host in ("192.0.2.1", "2001:db8:1:2::1"):
        for _ in range(20):  # rightful: refunded
            assert registry.allow_attempt(host, now)
            registry.refund_attempt(host, now)
        assert registry.allow_attempt(host, now)  # two guesses: not refunded
        assert registry.allow_attempt(host, now)
        assert not registry.allow_attempt(host, now)  # dry, whatever the key
    assert len(registry._buckets) == 2  # only the guessers take room in the table
    assert len(registry._sites) == 1  # and the IPv6 one's /48


def _offer(tls: bool, binding: bytes | None) -> bytes:
    return (
        LocalAuthenticator(USERS, mock_secret=_SECRET)
        .begin("alice", tls=tls, channel_binding=binding)
        .start()
    )


def test_scram_plus_offered_only_over_tls_with_a_binding() -> None:
    binding = b"\x01" * 32
    plus_first = _offer(True, binding)
    assert plus_first.endswith(b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00")
    for tls, bound in ((True, None), (False, binding), (False, None)):
        offer = _offer(tls, bound)
        assert offer.endswith(b"\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"), (tls, bound)


def test_scram_plus_chosen_when_not_offered_is_refused() -> None:
    frame = messages.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=x")
    for name in ("alice", "mallory"):
        exchange = LocalAuthenticator(USERS, mock_secret=_SECRET).begin(
            name, tls=False, channel_binding=b"\x01" * 32
        )
        with pytest.raises(AuthenticationFailed, match="unsupported SASL mechanism"):
            asyncio.run(exchange.step(frame[5:]))


def _services_capped_at(max_unauthenticated_per_host: int) -> ListenerServices:
    """A listener's services with no database, authenticator or audit behind them."""
    return ListenerServices(
        settings=ListenerSettings(
            name="t",
            upstream=UpstreamSettings(user="svc", tls={"mode": "disable"}),
            max_unauthenticated_per_host=max_unauthenticated_per_host,
        ),
        audit_settings=AuditSettings(),
        audit=None,  # type: ignore[arg-type]
        classifier=PostgresClassifier(),
        authenticator=None,  # type: ignore[arg-type]
        client_tls=None,
        upstream_tls=None,
        cancels=CancelRegistry(5),
    )


def test_connections_before_login_are_capped_per_ipv6_64() -> None:
    """An IPv6 client holds its whole /64: a fresh address per connection must not lift the
    max_unauthenticated_per_host cap (as for cancel attempts)."""
    services = _services_capped_at(2)

    async def connect(address: str) -> PeerTransport:
        transport = PeerTransport(address)
        PgSession(services).connection_made(transport)  # type: ignore[arg-type]
        return transport

    async def run() -> list[bool]:
        refused = []
        for address in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2::3", "2001:db8:9::1"):
            transport = await connect(address)
            refused.append(b"too many connections from this host" in transport.written)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return refused

    assert asyncio.run(run()) == [False, False, True, False]


def test_connections_before_login_are_capped_per_ipv6_48_too() -> None:
    """A client holding a /48 holds 65,536 /64s, each with its own cap: the /48's together
    may hold SITE_SHARE times one host's cap, then its /64s are refused; other sites are not."""
    services = _services_capped_at(2)

    async def run() -> tuple[list[bool], bool, dict[str, int], dict[str, int]]:
        transports, sessions = [], []
        for i in range(1, 2 * SITE_SHARE + 3):
            transport = PeerTransport(f"2001:db8:1:{i:x}::1")
            sessions.append(PgSession(services))
            sessions[-1].connection_made(transport)  # type: ignore[arg-type]
            transports.append(transport)
        refused = [b"too many connections from this host" in t.written for t in transports]
        other = PeerTransport("2001:db8:2::1")
        sessions.append(PgSession(services))
        sessions[-1].connection_made(other)  # type: ignore[arg-type]
        other_refused = b"too many connections" in other.written
        for session in sessions:  # the clients hang up
            session.connection_lost(None)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return refused, other_refused, services.unauthenticated, services.unauthenticated_sites

    refused, other_refused, hosts, sites = asyncio.run(run())
    assert refused == [False] * (2 * SITE_SHARE) + [True, True]
    assert not other_refused
    assert hosts == {} and sites == {}  # every slot given back, the refused ones never taken


def test_replicas_creating_the_auth_secret_at_once_agree(tmp_path: Path) -> None:
    """Twentieth review: the file was created empty and then written, so a replica starting at
    that moment (or a crash in between) read 0 bytes and refused to start."""
    path = tmp_path / "dbward-auth.key"
    script = (
        "import sys; from pathlib import Path; "
        "from dbward.identity.auth_secret import load_auth_secret; "
        "print(load_auth_secret(Path(sys.argv[1])).hex())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    assert len({out.strip() for out, _ in results}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["dbward-auth.key"]  # no temporary left


def test_known_and_unknown_names_cost_the_same_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 32: only an unknown name's exchange derived the fake verifier (three HMACs and a
    SHA-256, ~8 us), so its server-first-message came measurably later (through the proxy on
    loopback, medians 40 vs 50 us over 1,500 logins each): timing told which names exist.
    Every exchange now does the same hashing, whether or not the name is configured."""
    calls: list[str] = []
    real_hmac, real_h = scram._hmac, scram._h

    def counted_hmac(key: bytes, msg: bytes) -> bytes:
        calls.append("hmac")
        return real_hmac(key, msg)

    def counted_h(data: bytes) -> bytes:
        calls.append("sha256")
        return real_h(data)

    monkeypatch.setattr(scram, "_hmac", counted_hmac)
    monkeypatch.setattr(scram, "_h", counted_h)
    client_first = messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdefgh")[5:]
    proof = base64.b64encode(b"\x01" * 32).decode()
    client_final = b"c=biws,r=%s,p=" + proof.encode()
    costs = {}
    for name in ("alice", "mallory"):
        calls.clear()
        exchange = LocalAuthenticator(USERS, mock_secret=_SECRET).begin(name, tls=False)
        exchange.start()
        server_first = asyncio.run(exchange.step(client_first)).reply
        assert server_first is not None
        nonce = scram._attrs(server_first[9:], ValueError, "server-first")[0][1]
        with pytest.raises(AuthenticationFailed):
            asyncio.run(exchange.step(client_final % nonce))
        costs[name] = list(calls)
    assert costs["alice"] == costs["mallory"], costs


def test_a_refused_mechanism_name_is_shown_shortened() -> None:
    """Review 32: the mechanism a client chose was quoted whole in the auth_fail reason and the
    log, so any client could write 64 KiB into each (the trail keeps every record) per
    connection, before logging in."""
    frame = messages.sasl_initial_response("M" * 65_000, b"n,,n=,r=abc")
    exchange = LocalAuthenticator(USERS, mock_secret=_SECRET).begin("alice", tls=False)
    with pytest.raises(AuthenticationFailed) as caught:
        asyncio.run(exchange.step(frame[5:]))
    assert caught.value.message == f"unsupported SASL mechanism {'M' * 64!r}..."
    exchange = LocalAuthenticator(USERS, mock_secret=_SECRET).begin("alice", tls=False)
    with pytest.raises(AuthenticationFailed) as caught:
        asyncio.run(exchange.step(messages.sasl_initial_response("SCRAM-SHA-1", b"x")[5:]))
    assert caught.value.message == "unsupported SASL mechanism 'SCRAM-SHA-1'"


class _BrokenExchange:
    """An authenticator's exchange with a bug: its first step raises an unexpected error."""

    def start(self) -> bytes:
        return messages.authentication_sasl(["SCRAM-SHA-256"])

    async def step(self, payload: bytes) -> AuthStep:
        raise ValueError("a bug")


class _BrokenAuthenticator:
    def begin(
        self, user: str, *, tls: bool, channel_binding: bytes | None = None
    ) -> _BrokenExchange:
        return _BrokenExchange()


def test_an_internal_error_during_login_ends_the_connection_and_frees_its_slots() -> None:
    """Review 32: an exception other than dbward's own ended the startup task silently (a
    'Task exception was never retrieved' at exit): the client was never answered nor let go,
    and kept its max_connections and max_unauthenticated_per_host slots until it gave up
    (auth_timeout_s runs inside that task, so it no longer applied)."""
    sink = MemorySink()
    services = ListenerServices(
        settings=ListenerSettings(
            name="t", upstream=UpstreamSettings(user="svc", tls={"mode": "disable"})
        ),
        audit_settings=AuditSettings(),
        audit=sink,
        classifier=PostgresClassifier(),
        authenticator=_BrokenAuthenticator(),
        client_tls=None,
        upstream_tls=None,
        cancels=CancelRegistry(5),
    )

    async def run() -> PeerTransport:
        transport = PeerTransport("192.0.2.5")
        session = PgSession(services)
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(messages.startup_message({"user": "alice", "database": "app"}))
        session.data_received(messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
        for _ in range(20):
            await asyncio.sleep(0)
        if transport.closed:
            session.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    assert transport.closed
    assert b"XX000" in transport.written and b"dbward: internal error" in transport.written
    assert services.unauthenticated == {} and not services.sessions
    failed = [r for r in sink.records if r.event == AuditEvent.AUTH_FAIL]
    assert [(r.identity, r.sqlstate) for r in failed] == [("alice", "XX000")]
