"""tls-server-end-point channel binding data of the listener certificate (RFC 5929)."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from dbward.config.model import ClientTlsSettings
from dbward.server.tls import server_context, server_end_point
from fixtures.tls import TestCA


def test_end_point_is_the_hash_of_the_presented_certificate(test_ca: TestCA) -> None:
    settings = ClientTlsSettings(
        mode="required", cert_file=test_ca.server_cert, key_file=test_ca.server_key
    )
    # The first certificate of the file is the one presented; the test CA signs with SHA-256.
    der = ssl.PEM_cert_to_DER_cert(Path(test_ca.server_cert).read_text())
    assert server_end_point(settings) == hashlib.sha256(der).digest()


def test_no_end_point_without_tls() -> None:
    assert server_end_point(ClientTlsSettings(mode="disabled")) is None


def test_the_client_side_context_refuses_renegotiation(test_ca: TestCA) -> None:
    """Each renegotiation a TLS 1.2 client asks for is a full handshake for dbward (a CPU
    lever needing no credentials); PostgreSQL sets SSL_OP_NO_RENEGOTIATION, and OpenSSL
    before 3.0 allows client renegotiation without it."""
    settings = ClientTlsSettings(
        mode="optional", cert_file=test_ca.server_cert, key_file=test_ca.server_key
    )
    context = server_context(settings)
    assert context is not None
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
