"""dbward's login to the database refuses servers that could be impostors (no network)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest

from dbward.server.upstream import ServiceLogin, UpstreamError
from dbward.wire.postgres import messages
from dbward.wire.postgres.scram import MAX_CLIENT_ITERATIONS, ScramClient


class _Sent:
    """Stands in for the upstream transport: keeps what dbward answers."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _login(*, private: bool = True, tls: bool = False, **settings: Any) -> ServiceLogin:
    return ServiceLogin(user="svc", password="s3cret", private=private, tls=tls, **settings)


def _answer(frame: bytes, login: ServiceLogin | None = None, **settings: Any) -> bytes:
    """What dbward sends back to one Authentication* message (`login` keeps the exchange)."""
    login = login if login is not None else _login(**settings)
    sent = _Sent()
    payload = frame[5:]  # an Authentication* message without its header, as the reader gives it
    asyncio.run(login.answer(sent, payload))  # type: ignore[arg-type]
    return sent.data


def _scram(login: ServiceLogin) -> ScramClient:
    assert login.scram is not None
    return login.scram


def test_authentication_ok_before_the_scram_proof_is_refused() -> None:
    """A server that knows the password proves it in SASLFinal; skipping that is refused."""
    login = _login()
    sent = _answer(messages.authentication_sasl(["SCRAM-SHA-256"]), login)
    assert isinstance(login.scram, ScramClient) and sent.startswith(b"p")
    with pytest.raises(UpstreamError, match="without proving it knows the password"):
        _answer(messages.authentication_ok(), login)


def test_cleartext_password_is_not_sent_without_tls() -> None:
    with pytest.raises(UpstreamError, match="in clear text on a connection without TLS or whose"):
        _answer(messages.authentication_cleartext(), private=False)
    sent = _answer(messages.authentication_cleartext(), private=True)  # verified TLS, unix socket
    assert b"s3cret" in sent
    # Listing it in require_auth does not lift the rule.
    with pytest.raises(UpstreamError, match="in clear text on a connection without TLS or whose"):
        _answer(messages.authentication_cleartext(), private=False, require_auth=("password",))


def _server_first(scram: ScramClient, iterations: int) -> bytes:
    """SASLContinue extending the client's nonce, with a fresh salt and this iteration count."""
    nonce = scram.client_first().split(b"r=")[1]
    salt = base64.b64encode(str(time.monotonic_ns()).encode())  # never in the PBKDF2 cache
    return messages.authentication_sasl_continue(
        b"r=" + nonce + b"srv,s=" + salt + b",i=" + str(iterations).encode()
    )


def test_huge_scram_iteration_count_does_not_stall_the_event_loop() -> None:
    """The server picks the PBKDF2 count (up to 10 million: ~2 s of CPU); every session shares
    the loop, so the hashing runs in a thread while the loop goes on serving."""
    login = _login(private=False)
    _answer(messages.authentication_sasl(["SCRAM-SHA-256"]), login)
    frame = _server_first(_scram(login), MAX_CLIENT_ITERATIONS)

    async def run() -> tuple[float, bytes]:
        sent = _Sent()
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)  # ticking
        await login.answer(sent, frame[5:])  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # a tick spanning a stall, if any, is recorded
        ticking.cancel()
        return max(gaps, default=0.0), sent.data

    worst, sent = asyncio.run(run())
    assert sent.startswith(b"p") and b"p=" in sent  # the proof was sent
    assert worst < 0.5, f"the event loop stalled for {worst:.2f} s"


@pytest.mark.parametrize(
    "server_first",
    [b"r=bad,s=QUJD,i=4096", b"i=1", b"r=%s,s=QUJD,i=0"],
)
def test_bad_scram_server_first_is_an_upstream_error(server_first: bytes) -> None:
    """Reported as the database's failure (UpstreamError: logged and audited as upstream_lost),
    not as the client's failed password."""
    login = _login()
    _answer(messages.authentication_sasl(["SCRAM-SHA-256"]), login)
    nonce = _scram(login).client_first().split(b"r=")[1]
    frame = messages.authentication_sasl_continue(server_first.replace(b"%s", nonce + b"x"))
    with pytest.raises(UpstreamError, match="upstream SCRAM exchange failed"):
        _answer(frame, login)


def test_sasl_final_before_the_client_proof_is_refused() -> None:
    """'v=' (an empty signature) right after server-first, before any proof was computed."""
    login = _login()
    _answer(messages.authentication_sasl(["SCRAM-SHA-256"]), login)
    scram = _scram(login)
    scram.read_server_first(_server_first(scram, 4096)[9:])
    with pytest.raises(UpstreamError, match="out of order"):
        _answer(messages.authentication_sasl_final(b"v="), login)


# ------------------------------------------------------------------ md5, require_auth, binding

_MD5 = messages.authentication_md5(b"salt")
_BOTH = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_md5_is_answered_only_to_a_server_known_to_be_the_database() -> None:
    """An md5 answer can be relayed by whoever sits on the path (his own certificate with
    prefer/require, or TLS stripped): as for cleartext, only over verify-full TLS or a unix
    socket, unless require_auth lists md5 (the operator accepts it)."""
    with pytest.raises(UpstreamError, match="md5 password hash on a connection without TLS or"):
        _answer(_MD5, private=False)
    with pytest.raises(UpstreamError, match=r"list md5 in upstream\.require_auth"):
        _answer(_MD5, private=False, tls=True)  # prefer/require: the certificate is unchecked
    assert _answer(_MD5, private=True).startswith(b"p")  # verify-full TLS, unix socket
    assert _answer(_MD5, private=False, require_auth=("scram-sha-256", "md5")).startswith(b"p")


@pytest.mark.parametrize(
    ("frame", "name"),
    [
        (_MD5, "md5"),
        (messages.authentication_cleartext(), "password"),
        (messages.authentication_sasl(["SCRAM-SHA-256"]), "scram-sha-256"),
    ],
)
def test_a_method_require_auth_does_not_list_is_refused(frame: bytes, name: str) -> None:
    allowed = tuple(m for m in ("scram-sha-256", "md5", "password") if m != name)
    with pytest.raises(UpstreamError, match=rf"\({name}\), but upstream.require_auth allows only"):
        _answer(frame, require_auth=allowed)
    assert _answer(frame, require_auth=(name,)).startswith(b"p")


def test_no_authentication_at_all_needs_none_in_require_auth() -> None:
    """A server (or someone in its place) that lets dbward in without asking anything."""
    with pytest.raises(UpstreamError, match=r"without authentication, but upstream\.require_auth"):
        _answer(messages.authentication_ok(), require_auth=("scram-sha-256",))
    _answer(messages.authentication_ok(), require_auth=("scram-sha-256", "none"))
    _answer(messages.authentication_ok())  # no require_auth: trust and peer work as before


def test_a_second_method_after_the_first_is_refused() -> None:
    login = _login()
    _answer(_MD5, login)
    with pytest.raises(UpstreamError, match="a cleartext password after asking for an md5"):
        _answer(messages.authentication_cleartext(), login)


@pytest.mark.parametrize(
    ("frame", "tls", "binding", "message"),
    [
        (messages.authentication_sasl(["SCRAM-SHA-256"]), True, b"h" * 32, "does not offer"),
        (messages.authentication_sasl(_BOTH), False, None, "does not use TLS"),
        (messages.authentication_sasl(_BOTH), True, None, "certificate allows no channel"),
        (_MD5, True, b"h" * 32, "md5 password hash, which has no channel binding"),
        (messages.authentication_ok(), True, b"h" * 32, "without authentication, so without"),
    ],
    ids=["plus-not-offered", "no-tls", "no-hash", "md5", "trust"],
)
def test_channel_binding_require_refuses_every_login_without_it(
    frame: bytes, tls: bool, binding: bytes | None, message: str
) -> None:
    login = _login(tls=tls, binding=binding, channel_binding="require")
    with pytest.raises(UpstreamError, match=message):
        _answer(frame, login)
    assert login.scram is None


@pytest.mark.parametrize(
    ("channel_binding", "mechanism", "gs2"),
    [
        ("require", b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,"),
        ("prefer", b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,"),
        ("disable", b"SCRAM-SHA-256\0", b"n,,"),
    ],
)
def test_channel_binding_setting_picks_the_mechanism(
    channel_binding: str, mechanism: bytes, gs2: bytes
) -> None:
    login = _login(tls=True, binding=b"h" * 32, channel_binding=channel_binding)
    sent = _answer(messages.authentication_sasl(_BOTH), login)
    assert sent[5:].startswith(mechanism) and gs2 + b"n=,r=" in sent, sent


def test_plus_offered_over_unverified_tls_with_a_certificate_allowing_no_binding() -> None:
    """Someone on the path presenting his own Ed25519 certificate (its signature names no hash:
    nothing to bind to) and offering -PLUS got a plain, unbound exchange ('n') to relay to the
    real server. Refused unless the certificate is verified (nobody else could present it) or
    binding is disabled (the operator accepts the risk)."""
    with pytest.raises(UpstreamError, match="its certificate allows none"):
        _answer(messages.authentication_sasl(_BOTH), tls=True, private=False)
    for settings in ({"private": True}, {"private": False, "channel_binding": "disable"}):
        sent = _answer(messages.authentication_sasl(_BOTH), tls=True, **settings)
        assert sent[5:].startswith(b"SCRAM-SHA-256\0") and b"n,,n=,r=" in sent, settings


def test_a_huge_list_of_unsupported_mechanisms_is_kept_short_in_the_refusal() -> None:
    """The refusal is audited (upstream_lost) and logged: a server (or someone on a path
    without TLS) offering 1 MB of mechanism names put 1 MB into each record."""
    offer = messages.authentication_sasl(["X" * 900_000, "SCRAM-SHA-1"])
    with pytest.raises(UpstreamError, match="offers no supported SASL mechanism") as caught:
        _answer(offer)
    assert len(caught.value.message) < 1000
