"""TLS contexts for the client side (dbward as server) and the upstream side (as client)."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from dbward.config.model import ClientTlsSettings, ListenerSettings, UpstreamTlsSettings
from dbward.core.errors import ConfigError


def listener_contexts(
    listener: ListenerSettings, index: int
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """Both TLS contexts of `listeners[index]` (client side, upstream side), files loaded now.

    Used by `serve` and by `check-config`, so a certificate that cannot be loaded is reported
    by both, with the key in the same form as other configuration errors.
    """
    try:
        client = server_context(listener.tls)
        server_end_point(listener.tls)  # the certificate must be readable for channel binding
        return client, upstream_context(listener.upstream.tls)
    except ConfigError as exc:
        raise ConfigError(f"listeners[{index}].{exc.message}") from None


def server_context(settings: ClientTlsSettings) -> ssl.SSLContext | None:
    """The context offered to clients, or None when the listener has TLS disabled."""
    if settings.mode == "disabled":
        return None
    assert settings.cert_file is not None and settings.key_file is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 client may ask for a new handshake at will, each as costly to dbward as the
    # first: refused, as PostgreSQL does (OpenSSL 3 refuses it unless allowed; 1.1.1, which
    # Python may be built with, allows it).
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls.cert_file/tls.key_file: cannot load {settings.cert_file}: {exc}"
        ) from None
    return context


def upstream_context(settings: UpstreamTlsSettings) -> ssl.SSLContext | None:
    """The context for connecting to the database, following libpq's sslmode semantics."""
    if settings.mode == "disable":
        return None
    if settings.mode == "verify-full":
        assert settings.ca_file is not None
        try:
            context = ssl.create_default_context(cafile=str(settings.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"upstream.tls.ca_file: cannot load {settings.ca_file}: {exc}"
            ) from None
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        # prefer/require encrypt without verifying the server, exactly as libpq does; use
        # verify-full to be protected against an active attacker.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_end_point(settings: ClientTlsSettings) -> bytes | None:
    """The tls-server-end-point channel binding data (RFC 5929) of the listener's certificate.

    The hash of the leaf certificate (the first in cert_file, the one presented), with the
    hash function of its signature, SHA-256 in place of MD5 and SHA-1, as PostgreSQL computes
    it. None when TLS is disabled or the signature names no hash (Ed25519): SCRAM-SHA-256-PLUS
    is then not offered.
    """
    if settings.mode == "disabled" or settings.cert_file is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(Path(settings.cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls.cert_file: cannot load {settings.cert_file}: {exc}") from None
    return _end_point_hash(cert)


def peer_end_point(der: bytes | None) -> bytes | None:
    """The tls-server-end-point data of the certificate the database presented (DER), for
    SCRAM-SHA-256-PLUS upstream; None when there is none or its signature names no hash."""
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return _end_point_hash(cert)


def _end_point_hash(cert: x509.Certificate) -> bytes | None:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:  # a signature cryptography cannot name: no binding offered
        return None
    if algorithm is None:
        return None
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.finalize()
