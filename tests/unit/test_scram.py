"""SCRAM-SHA-256 server and client, verifiers, SASLprep and md5."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbward.core.errors import AuthenticationFailed
from dbward.wire.postgres.scram import (
    InvalidVerifier,
    ScramClient,
    ScramServer,
    ScramVerifier,
    make_verifier,
    md5_password,
    parse_verifier,
    saslprep,
)

# RFC 7677 section 3.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

FAST = 64  # iterations for tests that do not care about the count


@pytest.fixture(scope="module")
def rfc_verifier() -> ScramVerifier:
    return parse_verifier(make_verifier("pencil", salt=RFC_SALT))


def test_rfc7677_server(rfc_verifier: ScramVerifier) -> None:
    server = ScramServer(rfc_verifier, nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.succeeded


def test_rfc7677_client() -> None:
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_client_derives_the_salted_password_once_per_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each upstream login ran PBKDF2 on the event loop (~0.75 ms at 4,096 iterations); the
    service password and the server's salt do not change between logins."""
    derived: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(*args: Any, **kwargs: Any) -> bytes:
        derived.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    for _ in range(3):
        test_rfc7677_client()  # a real exchange, proof and server signature checked
    assert len(derived) <= 1  # derived at most once (none if an earlier test cached it)


def exchange(server: ScramServer, client: ScramClient) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.client_final(server_first))
    client.verify_server_final(server_final)


def test_client_server_success_with_libpq_style_empty_user() -> None:
    server = ScramServer(parse_verifier(make_verifier("s3cret", iterations=FAST)))
    client = ScramClient("s3cret")
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")
    exchange(server, client)
    assert server.succeeded


def test_gs2_y_flag_accepted() -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)), nonce=b"SRV")
    first = server.handle_client_first(b"y,,n=,r=abc")
    assert first.startswith(b"r=abcSRV,")
    # Rebuild the proof the way a client with gs2 flag 'y' does (c= carries "y,,").
    salt = base64.b64decode(first.split(b",")[1][2:])
    salted = hashlib.pbkdf2_hmac("sha256", b"pw", salt, FAST)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    without_proof = b"c=" + base64.b64encode(b"y,,") + b",r=abcSRV"
    auth = b"n=,r=abc," + first + b"," + without_proof
    sig = hmac.digest(stored, auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    final = server.handle_client_final(without_proof + b",p=" + base64.b64encode(proof))
    assert final.startswith(b"v=")


def _bound_final(
    server_first: bytes, password: str, bare: bytes, c_data: bytes, iterations: int = FAST
) -> bytes:
    """A client-final-message whose c= carries `c_data` (gs2 header + channel binding data)."""
    attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs[b"s"]), iterations
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    without_proof = b"c=" + base64.b64encode(c_data) + b",r=" + attrs[b"r"]
    auth = bare + b"," + server_first + b"," + without_proof
    sig = hmac.digest(stored, auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


BINDING = hashlib.sha256(b"the server certificate").digest()
PLUS_GS2 = b"p=tls-server-end-point,,"


def test_scram_plus_with_the_right_binding_succeeds() -> None:
    verifier = parse_verifier(make_verifier("pw", iterations=FAST))
    server = ScramServer(verifier, channel_binding=BINDING, plus=True)
    first = server.handle_client_first(PLUS_GS2 + b"n=,r=abc")
    final = server.handle_client_final(_bound_final(first, "pw", b"n=,r=abc", PLUS_GS2 + BINDING))
    assert final.startswith(b"v=") and server.succeeded


@pytest.mark.parametrize(
    "c_data",
    [
        PLUS_GS2 + hashlib.sha256(b"a man in the middle's certificate").digest(),
        PLUS_GS2,  # no binding data at all
        b"n,,",
    ],
    ids=["other-certificate", "no-data", "no-binding"],
)
def test_scram_plus_with_another_binding_fails(c_data: bytes) -> None:
    """A relayed exchange (another TLS connection, so another certificate) fails the proof."""
    verifier = parse_verifier(make_verifier("pw", iterations=FAST))
    server = ScramServer(verifier, channel_binding=BINDING, plus=True)
    first = server.handle_client_first(PLUS_GS2 + b"n=,r=abc")
    with pytest.raises(AuthenticationFailed, match="channel binding does not match"):
        server.handle_client_final(_bound_final(first, "pw", b"n=,r=abc", c_data))
    assert not server.succeeded


@pytest.mark.parametrize(
    ("binding", "plus", "first", "match"),
    [
        # -PLUS was offered, the client says it can bind but believes the server cannot:
        # someone stripped -PLUS from the offer (RFC 5802 section 6).
        (BINDING, False, b"y,,n=,r=abc", "negotiation error"),
        (BINDING, True, b"y,,n=,r=abc", "without channel binding data"),
        (BINDING, True, b"n,,n=,r=abc", "without channel binding data"),
        (BINDING, False, PLUS_GS2 + b"n=,r=abc", "without choosing SCRAM-SHA-256-PLUS"),
        (None, False, PLUS_GS2 + b"n=,r=abc", "without choosing SCRAM-SHA-256-PLUS"),
        (BINDING, True, b"p=tls-unique,,n=,r=abc", "unsupported SCRAM channel binding type"),
        (BINDING, True, b"p=tls-server-end-point", "bad gs2 flag"),
        (BINDING, True, b"p=tls-server-end-point,a=bob,n=,r=abc", "authorization identity"),
    ],
    ids=[
        "y-while-offered",
        "plus-with-y",
        "plus-with-n",
        "p-without-plus",
        "p-not-offered",
        "tls-unique",
        "no-header-end",
        "authzid",
    ],
)
def test_scram_binding_negotiation_refusals(
    binding: bytes | None, plus: bool, first: bytes, match: str
) -> None:
    server = ScramServer(
        parse_verifier(make_verifier("pw", iterations=FAST)), channel_binding=binding, plus=plus
    )
    with pytest.raises(AuthenticationFailed, match=match):
        server.handle_client_first(first)


def test_scram_without_binding_accepted_when_plus_offered() -> None:
    """A client that chooses plain SCRAM-SHA-256 with 'n' (channel_binding=disable) logs in."""
    verifier = parse_verifier(make_verifier("pw", iterations=FAST))
    server = ScramServer(verifier, channel_binding=BINDING, plus=False)
    first = server.handle_client_first(b"n,,n=,r=abc")
    server.handle_client_final(_bound_final(first, "pw", b"n=,r=abc", b"n,,"))
    assert server.succeeded


def test_wrong_password() -> None:
    server = ScramServer(parse_verifier(make_verifier("right", iterations=FAST)))
    client = ScramClient("wrong")
    first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthenticationFailed, match="proof is invalid"):
        server.handle_client_final(client.client_final(first))
    assert not server.succeeded


def test_unknown_user_fails_only_at_final_step() -> None:
    server = ScramServer(None, username="ghost", mock_secret=b"k")
    client = ScramClient("anything")
    first = server.handle_client_first(client.client_first())
    assert b",s=" in first and first.endswith(b",i=4096")
    with pytest.raises(AuthenticationFailed, match="unknown user"):
        server.handle_client_final(client.client_final(first))


def test_unknown_user_salt_stable_per_name() -> None:
    def salt_for(name: str) -> bytes:
        server = ScramServer(None, username=name, mock_secret=b"secret")
        return server.handle_client_first(b"n,,n=,r=abc").split(b",")[1]

    assert salt_for("ghost") == salt_for("ghost")
    assert salt_for("ghost") != salt_for("phantom")


def test_tampered_nonce() -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)))
    client = ScramClient("pw")
    first = server.handle_client_first(client.client_first())
    final = client.client_final(first)
    tampered = final.replace(b",r=", b",r=X", 1)
    with pytest.raises(AuthenticationFailed, match="nonce"):
        server.handle_client_final(tampered)


def test_tampered_channel_binding() -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)))
    client = ScramClient("pw")
    first = server.handle_client_first(client.client_first())
    final = client.client_final(first).replace(b"c=biws", b"c=eSws")
    with pytest.raises(AuthenticationFailed, match="channel binding"):
        server.handle_client_final(final)


def test_tampered_proof() -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)))
    client = ScramClient("pw")
    first = server.handle_client_first(client.client_first())
    final = client.client_final(first)
    head, _, proof = final.rpartition(b",p=")
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    with pytest.raises(AuthenticationFailed, match="proof"):
        server.handle_client_final(head + b",p=" + base64.b64encode(bytes(raw)))


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        (b"n,a=admin,n=,r=abc", "authorization identity"),
        (b"n,,m=ext,n=,r=abc", "extension"),
        (b"x,,n=,r=abc", "gs2"),
        (b"n,,r=abc", "expected n= and r="),
        (b"n,,n=", "expected n= and r="),
        (b"n,,n=,r=", "nonce"),
        (b"n,,n=,r=a\x01b", "nonce"),
        (b"n,", "gs2 header"),
        (b"", "gs2"),
        (b"n,,n=,r=abc,,", "attribute"),
        (b"n,,n=,r=" + b"a" * 5000, "too long"),
    ],
)
def test_malformed_client_first(message: bytes, match: str) -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)))
    with pytest.raises(AuthenticationFailed, match=match):
        server.handle_client_first(message)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"c=biws,r=abcSRV", "no proof"),
        (b"r=abcSRV,c=biws,p=AAAA", "expected c= and r="),
        (b"c=b!ws,r=abcSRV,p=AAAA", "base64"),
        (b"c=biws,r=abcSRV,p=AAAA", "proof length"),
        (b"c=biws,r=abcSRV,p=", "proof length"),
        (b"c=biws,r=abcSRV,p=%%%", "base64"),
        (b"c=,r=abcSRV,p=AAAA", "channel binding"),
        (b"c=biws,r=abcSRX,p=AAAA", "nonce"),
        (b"c=biws,r=abcSRV,p=" + b"A" * 5000, "too long"),
    ],
)
def test_malformed_client_final(message: bytes, match: str) -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)), nonce=b"SRV")
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(AuthenticationFailed, match=match):
        server.handle_client_final(message)


def test_server_out_of_order_and_no_retry() -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)))
    with pytest.raises(AuthenticationFailed, match="out of order"):
        server.handle_client_final(b"c=biws,r=x,p=AAAA")
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)))
    with pytest.raises(AuthenticationFailed):
        server.handle_client_first(b"bogus")
    # A failed step ends the exchange: no second attempt on the same object.
    with pytest.raises(AuthenticationFailed, match="out of order"):
        server.handle_client_first(b"n,,n=,r=abc")


@given(st.binary(max_size=300), st.binary(max_size=300))
@settings(max_examples=200)
def test_server_fuzz_only_authentication_failed(first: bytes, final: bytes) -> None:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=1)))
    try:
        server.handle_client_first(first)
        server.handle_client_final(final)
    except AuthenticationFailed:
        return
    raise AssertionError("random bytes authenticated")


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        (b"r=XXXX,s=QUJD,i=4096", "nonce"),
        (b"r=abc,s=QUJD,i=4096", "nonce"),  # no server part
        (b"r=abcdef,s=,i=4096", "salt"),
        (b"r=abcdef,s=!!,i=4096", "salt"),
        (b"r=abcdef,s=QUJD,i=0", "iteration"),
        (b"r=abcdef,s=QUJD,i=10000001", "iteration"),
        (b"r=abcdef,s=QUJD,i=99999999999999", "iteration"),
        (b"r=abcdef,s=QUJD,i=-1", "iteration"),
        (b"r=abcdef,s=QUJD,i=", "iteration"),
        (b"m=x,r=abcdef,s=QUJD,i=1", "extension"),
        (b"r=abcdef,i=1,s=QUJD", "expected r=, s=, i="),
        (b"r=abcdef", "expected r=, s=, i="),
        (b"garbage", "attribute"),
    ],
)
def test_client_rejects_bad_server_first(server_first: bytes, match: str) -> None:
    client = ScramClient("pw", nonce=b"abc")
    client.client_first()
    with pytest.raises(AuthenticationFailed, match=match):
        client.client_final(server_first)


def client_after_final() -> ScramClient:
    server = ScramServer(parse_verifier(make_verifier("pw", iterations=FAST)))
    client = ScramClient("pw")
    client.client_final(server.handle_client_first(client.client_first()))
    return client


@pytest.mark.parametrize(
    ("server_final", "match"),
    [
        (b"v=" + base64.b64encode(b"\x00" * 32), "signature"),
        (b"e=invalid-proof", "invalid-proof"),
        (b"x=1", "expected v="),
        (b"v=***", "base64"),
        (b"", "attribute"),
    ],
)
def test_client_rejects_bad_server_final(server_final: bytes, match: str) -> None:
    with pytest.raises(AuthenticationFailed, match=match):
        client_after_final().verify_server_final(server_final)


def test_client_out_of_order() -> None:
    client = ScramClient("pw")
    with pytest.raises(AuthenticationFailed, match="out of order"):
        client.client_final(b"r=x,s=QUJD,i=1")
    with pytest.raises(AuthenticationFailed, match="out of order"):
        ScramClient("pw").verify_server_final(b"v=AAAA")


@given(st.binary(max_size=200), st.binary(max_size=200))
@settings(max_examples=200)
def test_client_fuzz_only_authentication_failed(first: bytes, final: bytes) -> None:
    client = ScramClient("pw", nonce=b"n")
    client.client_first()
    try:
        client.client_final(first)
        client.verify_server_final(final)
    except AuthenticationFailed:
        return
    raise AssertionError("random bytes verified")


# --------------------------------------------------------------------------------------------
# Verifiers, SASLprep, md5
# --------------------------------------------------------------------------------------------


def test_make_verifier_format() -> None:
    text = make_verifier("pencil", salt=RFC_SALT)
    prefix, params, keys = text.split("$")
    assert prefix == "SCRAM-SHA-256"
    assert params == "4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = base64.b64encode(hashlib.sha256(client_key).digest()).decode()
    server = base64.b64encode(hmac.digest(salted, b"Server Key", "sha256")).decode()
    assert keys == f"{stored}:{server}"
    assert str(parse_verifier(text)) == text


def test_make_verifier_random_salt() -> None:
    a = parse_verifier(make_verifier("pw"))
    b = parse_verifier(make_verifier("pw"))
    assert len(a.salt) == 16 and a.salt != b.salt and a.iterations == 4096
    with pytest.raises(ValueError):
        make_verifier("pw", iterations=0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abc",
        "SCRAM-SHA-256$",
        "SCRAM-SHA-256$4096:c2FsdA==$",
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2F!sdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$QUJD:" + "A" * 43 + "=",
        "SCRAM-SHA-256$\u0664096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    ],
)
def test_parse_verifier_rejects(text: str) -> None:
    with pytest.raises(InvalidVerifier):
        parse_verifier(text)


def test_invalid_verifier_is_value_error() -> None:
    assert issubclass(InvalidVerifier, ValueError)


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        ("pencil", b"pencil"),
        ("ctrl\x07ok", b"ctrl\x07ok"),  # pure ASCII passes untouched, as in PostgreSQL
        ("I\u00adX", b"IX"),  # soft hyphen maps to nothing
        ("a\u00a0b", b"a b"),  # non-ASCII space maps to space
        ("\u2168", b"IX"),  # NFKC
        ("\u00aa", b"a"),
        ("caf\u00e9", "caf\u00e9".encode()),
        ("a\u0007\u00e9", "a\u0007\u00e9".encode()),  # prohibited control: raw bytes
        ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi rule broken: raw bytes
        ("\u00ad", "\u00ad".encode()),  # empty after mapping: raw bytes
    ],
)
def test_saslprep(password: str, expected: bytes) -> None:
    assert saslprep(password) == expected


def test_saslprep_length_limit() -> None:
    with pytest.raises(ValueError):
        saslprep("x" * 1025)


def test_md5_password() -> None:
    inner = hashlib.md5(b"secretpostgres").hexdigest().encode()
    assert md5_password("postgres", "secret", b"abcd") == (
        "md5" + hashlib.md5(inner + b"abcd").hexdigest()
    )


def test_client_plus_binds_the_proof_to_the_connection() -> None:
    """dbward's own client (upstream) speaks SCRAM-SHA-256-PLUS: accepted by a server that
    sees the same certificate, refused by one behind a man in the middle (another one)."""
    verifier = parse_verifier(make_verifier("pw", iterations=FAST))
    client = ScramClient("pw", channel_binding=BINDING)
    assert client.mechanism == "SCRAM-SHA-256-PLUS"
    server = ScramServer(verifier, channel_binding=BINDING, plus=True)
    final = server.handle_client_final(
        client.client_final(server.handle_client_first(client.client_first()))
    )
    client.verify_server_final(final)
    assert client.verified and server.succeeded
    relayed = ScramClient("pw", channel_binding=hashlib.sha256(b"the mitm's cert").digest())
    real = ScramServer(verifier, channel_binding=BINDING, plus=True)
    first = real.handle_client_first(relayed.client_first())
    with pytest.raises(AuthenticationFailed, match="channel binding does not match"):
        real.handle_client_final(relayed.client_final(first))


def test_client_without_plus_offered_over_tls_says_y() -> None:
    """A server that supports binding but was offered none (stripped on the way) refuses 'y'."""
    client = ScramClient("pw", binding_supported=True)
    assert client.mechanism == "SCRAM-SHA-256" and client.client_first().startswith(b"y,,n=,r=")
    verifier = parse_verifier(make_verifier("pw", iterations=FAST))
    with pytest.raises(AuthenticationFailed):
        ScramServer(verifier, channel_binding=BINDING, plus=False).handle_client_first(
            client.client_first()
        )
    # Without TLS (no binding possible) it stays 'n'.
    assert ScramClient("pw").client_first().startswith(b"n,,")
