"""dbward's login to the database refuses servers that could be impostors (no network)."""

from __future__ import annotations

import pytest

from dbward.server.upstream import UpstreamError, _answer_auth
from dbward.wire.postgres import messages
from dbward.wire.postgres.scram import ScramClient


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
    result = _answer_auth(sent, payload, "svc", "s3cret", scram, private=private)  # type: ignore[arg-type]
    return result, sent.data


def test_authentication_ok_before_the_scram_proof_is_refused() -> None:
    """A server that knows the password proves it in SASLFinal; skipping that is refused."""
    scram, sent = _answer(messages.authentication_sasl(["SCRAM-SHA-256"]))
    assert isinstance(scram, ScramClient) and sent.startswith(b"p")
    with pytest.raises(UpstreamError, match="without proving it knows the password"):
        _answer(messages.authentication_ok(), scram)


def test_cleartext_password_is_not_sent_without_tls() -> None:
    with pytest.raises(UpstreamError, match="in clear text on a connection without TLS"):
        _answer(messages.authentication_cleartext(), private=False)
    _, sent = _answer(messages.authentication_cleartext(), private=True)  # TLS or unix socket
    assert b"s3cret" in sent
