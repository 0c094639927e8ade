"""dbward's login to the database refuses servers that could be impostors (no network)."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from dbward.server.upstream import UpstreamError, _answer_auth
from dbward.wire.postgres import messages
from dbward.wire.postgres.scram import MAX_CLIENT_ITERATIONS, ScramClient


class _Sent:
    """Stands in for the upstream transport: keeps what dbward answers."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _answer(
    frame: bytes, scram: ScramClient | None = None, *, private: bool = True
) -> tuple[ScramClient | None, bytes]:
    sent = _Sent()
    payload = frame[5:]  # an Authentication* message without its header, as the reader gives it
    result = asyncio.run(
        _answer_auth(sent, payload, "svc", "s3cret", scram, private=private)  # type: ignore[arg-type]
    )
    return result, sent.data


def test_authentication_ok_before_the_scram_proof_is_refused() -> None:
    """A server that knows the password proves it in SASLFinal; skipping that is refused."""
    scram, sent = _answer(messages.authentication_sasl(["SCRAM-SHA-256"]))
    assert isinstance(scram, ScramClient) and sent.startswith(b"p")
    with pytest.raises(UpstreamError, match="without proving it knows the password"):
        _answer(messages.authentication_ok(), scram)


def test_cleartext_password_is_not_sent_without_tls() -> None:
    with pytest.raises(UpstreamError, match="in clear text on a connection without TLS or whose"):
        _answer(messages.authentication_cleartext(), private=False)
    _, sent = _answer(
        messages.authentication_cleartext(), private=True
    )  # verified TLS, unix socket
    assert b"s3cret" in sent


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
    scram, _ = _answer(messages.authentication_sasl(["SCRAM-SHA-256"]))
    assert scram is not None
    frame = _server_first(scram, MAX_CLIENT_ITERATIONS)

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
        await _answer_auth(sent, frame[5:], "svc", "s3cret", scram, private=False)  # type: ignore[arg-type]
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
    scram, _ = _answer(messages.authentication_sasl(["SCRAM-SHA-256"]))
    assert scram is not None
    nonce = scram.client_first().split(b"r=")[1]
    frame = messages.authentication_sasl_continue(server_first.replace(b"%s", nonce + b"x"))
    with pytest.raises(UpstreamError, match="upstream SCRAM exchange failed"):
        _answer(frame, scram)


def test_sasl_final_before_the_client_proof_is_refused() -> None:
    """'v=' (an empty signature) right after server-first, before any proof was computed."""
    scram, _ = _answer(messages.authentication_sasl(["SCRAM-SHA-256"]))
    assert scram is not None
    scram.read_server_first(_server_first(scram, 4096)[9:])
    with pytest.raises(UpstreamError, match="out of order"):
        _answer(messages.authentication_sasl_final(b"v="), scram)
