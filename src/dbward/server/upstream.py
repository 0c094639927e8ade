"""Open an authenticated connection to the upstream PostgreSQL with the service credentials."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from dbward.config.model import UpstreamSettings
from dbward.core.errors import AuthenticationFailed, DbwardError, ProtocolError
from dbward.core.text import QUOTED_ERROR_MAX, capped, without_quoted_values
from dbward.server.tls import peer_end_point
from dbward.wire.postgres import messages
from dbward.wire.postgres.framing import BackendFramer
from dbward.wire.postgres.scram import MECHANISM, MECHANISM_PLUS, ScramClient, md5_password

_MAX_STARTUP_FRAME = 1024 * 1024
# The whole cancel (connect, TLS handshake, request, the database closing): a cancel that
# arrives later than this is of no use, and shutdown waits for the ones it sends.
_CANCEL_TIMEOUT_S = 5.0

log = logging.getLogger("dbward.upstream")


class UpstreamError(DbwardError):
    """The database refused the connection; carries its ErrorResponse to relay to the client."""

    def __init__(self, message: str, *, sqlstate: str, frame: bytes | None = None) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.frame = frame  # the upstream's own ErrorResponse, relayed as-is when present


class UpstreamProtocol(asyncio.Protocol):
    """Socket callbacks for the upstream side; during startup it frames, then it forwards."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._raw = bytearray()  # before framing starts: the one-byte answer to SSLRequest
        self._framer: BackendFramer | None = None
        self._messages: deque[tuple[int, bytes, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: Exception | None = None
        # Set by the session once the connection is ready; hot-path callbacks.
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        on_data = self.on_data
        if on_data is not None:
            on_data(data)
            return
        if self._framer is None:
            self._raw += data
        else:
            try:
                self._messages.extend(self._framer.feed(data))
            except ProtocolError as exc:
                self._closed = exc
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = exc or ConnectionResetError("upstream closed the connection")
        self._wake()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        if self.on_resume is not None:
            self.on_resume()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if isinstance(self._closed, ProtocolError):
            raise self._closed
        if self._closed is not None:
            raise UpstreamError(
                "the database closed the connection during startup", sqlstate="08006"
            )
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None

    async def read_byte(self) -> int:
        """One raw byte (the answer to SSLRequest), before message framing starts."""
        while not self._raw:
            await self._wait()
        value = self._raw[0]
        del self._raw[0]
        return value

    async def wait_closed(self) -> None:
        """Until the database closes the connection (it does once it has read a cancel). It
        answers a cancel with nothing: whatever it sends instead ends the wait, unkept."""
        while self._closed is None and not self._raw:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        self._raw.clear()

    @property
    def unread_raw(self) -> bool:
        """True if bytes arrived that nobody has read yet (before framing starts)."""
        return bool(self._raw)

    async def read_message(self) -> tuple[int, bytes, bytes]:
        """One backend message as (type, payload, raw frame) during startup."""
        if self._framer is None:
            self._framer = BackendFramer(_MAX_STARTUP_FRAME)
            if self._raw:
                self._messages.extend(self._framer.feed(bytes(self._raw)))
                self._raw.clear()
        while not self._messages:
            await self._wait()
        return self._messages.popleft()

    def take_buffered(self) -> bytes:
        """Bytes that arrived after ReadyForQuery, handed to the relay."""
        parts = [raw for _, _, raw in self._messages]
        self._messages.clear()
        if self._framer is not None:
            parts.append(self._framer.take_pending())
        parts.append(bytes(self._raw))
        self._raw.clear()
        return b"".join(parts)


@dataclass
class UpstreamConnection:
    """A ready upstream session: its transport, what to relay, and its cancel key."""

    transport: asyncio.Transport
    protocol: UpstreamProtocol
    startup_frames: list[bytes] = field(default_factory=list)  # ParameterStatus/Notice, raw
    ready_frame: bytes = b""  # the ReadyForQuery that ended startup
    backend_pid: int = 0
    backend_key: bytes = b""
    server_params: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    # The TLS context of this login when it used TLS, for its cancels; None: plaintext.
    cancel_context: ssl.SSLContext | None = None


async def _open_socket(settings: UpstreamSettings) -> tuple[asyncio.Transport, UpstreamProtocol]:
    loop = asyncio.get_running_loop()
    if settings.is_unix_socket:
        transport, protocol = await loop.create_unix_connection(UpstreamProtocol, settings.address)
    else:
        transport, protocol = await loop.create_connection(
            UpstreamProtocol, settings.host, settings.port
        )
    return transport, protocol


async def _negotiate_tls(
    transport: asyncio.Transport,
    protocol: UpstreamProtocol,
    settings: UpstreamSettings,
    context: ssl.SSLContext | None,
) -> tuple[asyncio.Transport, bool]:
    if context is None or settings.is_unix_socket:
        return transport, False
    transport.write(messages.ssl_request())
    answer = await protocol.read_byte()
    if answer == ord("S"):
        if protocol.unread_raw:
            # Bytes after 'S' and before the handshake would be injected plaintext (CVE-2021-23222).
            raise ProtocolError("upstream sent unencrypted data after accepting SSLRequest")
        loop = asyncio.get_running_loop()
        # Checked against the certificate with verify-full only (the context says so); sent as
        # SNI in every mode, as libpq does (sslsni=1), unless it is an IP address: proxies and
        # poolers in front of many databases route on it.
        new_transport = await loop.start_tls(
            transport, protocol, context, server_hostname=settings.host
        )
        protocol.transport = cast(asyncio.Transport, new_transport)
        return protocol.transport, True
    if answer == ord("N"):
        if settings.tls.mode in ("require", "verify-full"):
            raise UpstreamError(
                f"the database does not accept TLS but upstream.tls.mode is {settings.tls.mode}",
                sqlstate="08001",
            )
        return transport, False
    raise ProtocolError(f"unexpected answer {answer!r} to SSLRequest from upstream")


async def connect_upstream(
    settings: UpstreamSettings,
    params: dict[str, str],
    context: ssl.SSLContext | None,
    password: str | None,
) -> UpstreamConnection:
    """Connect, negotiate TLS, authenticate as the service user and wait for ReadyForQuery."""
    transport, protocol = await _open_socket(settings)
    try:
        transport, tls = await _negotiate_tls(transport, protocol, settings, context)
        startup = {"user": settings.user, **params}
        transport.write(messages.startup_message(startup))
        conn = UpstreamConnection(
            transport=transport,
            protocol=protocol,
            tls=tls,
            cancel_context=context if tls else None,
        )
        login = ServiceLogin(
            user=settings.user,
            password=password,
            # Known to be the database: TLS with its certificate verified, or a unix socket (it
            # never leaves the host). Without TLS anyone on the path could be answering; with
            # prefer/require (certificate unchecked) anyone presenting his own certificate.
            private=(tls and settings.tls.mode == "verify-full") or settings.is_unix_socket,
            tls=tls,
            binding=_channel_binding(transport) if tls else None,
            require_auth=settings.require_auth,
            channel_binding=settings.channel_binding,
        )
        while True:
            msg_type, payload, raw = await protocol.read_message()
            if msg_type == ord("E"):
                fields = messages.parse_error_fields(payload)
                # The message can quote a startup parameter's value as the client sent it
                # (invalid value for parameter "DateStyle": "…", up to 10 KB), a password
                # typed into the wrong option among them: the audit record and the log get
                # the message without it, and its start (the client gets the error whole).
                refused = capped(without_quoted_values(fields.get("M", "")), QUOTED_ERROR_MAX)
                raise UpstreamError(
                    f"the database refused the connection: {refused}",
                    sqlstate=fields.get("C", "08006"),
                    frame=raw,
                )
            if (msg_type == ord("R")) == login.authenticated:
                # PostgreSQL asks only for authentication until AuthenticationOk, and never
                # after it (libpq refuses both). A login without AuthenticationOk skipped every
                # check made there: the server's SCRAM proof, channel binding, require_auth.
                raise ProtocolError(
                    f"unexpected message {chr(msg_type)!r} from upstream "
                    + ("after" if login.authenticated else "before")
                    + " authentication completed"
                )
            if msg_type == ord("R"):
                await login.answer(transport, payload)
            elif msg_type == ord("S"):
                name, value = messages.parse_parameter_status(payload)
                conn.server_params[name] = value
                conn.startup_frames.append(raw)
            elif msg_type == ord("K"):
                conn.backend_pid, conn.backend_key = messages.parse_backend_key_data(payload)
            elif msg_type == ord("N"):
                conn.startup_frames.append(raw)
            elif msg_type == ord("Z"):
                if payload != b"I":
                    # A login ends idle: anything else would start the client inside a
                    # transaction (or a state) dbward knows nothing of.
                    # (Its payload as sent, which may be 1 MB: the start is enough to say.)
                    status = capped(repr(payload), QUOTED_ERROR_MAX)
                    raise ProtocolError(f"ReadyForQuery status {status} at the end of login")
                conn.ready_frame = raw
                return conn
            else:
                raise ProtocolError(
                    f"unexpected message {chr(msg_type)!r} from upstream at startup"
                )
    except ProtocolError as exc:
        transport.abort()
        # The database's fault, not the client's: reported and audited as such.
        raise UpstreamError(
            f"the database sent an invalid message during login: {exc.message}", sqlstate="08P01"
        ) from None
    except BaseException:
        transport.abort()
        raise


# What each authentication request is called in upstream.require_auth (libpq's names).
_METHOD_NAMES = {3: "password", 5: "md5", 10: "scram-sha-256"}
_METHOD_TEXT = {3: "a cleartext password", 5: "an md5 password hash", 10: "SCRAM-SHA-256"}


def _refuse(message: str) -> UpstreamError:
    """A login dbward will not complete; the client gets FATAL 28000 and the audit
    upstream_lost with this reason, as for any other refusal of the service login."""
    return UpstreamError(message, sqlstate="28000")


@dataclass
class ServiceLogin:
    """dbward's side of its authentication to the database as the service user: what it may
    answer (the settings, how the connection is protected) and the exchange so far."""

    user: str
    password: str | None
    private: bool  # the peer is known to be the database (verify-full TLS, or a unix socket)
    tls: bool
    binding: bytes | None = None  # tls-server-end-point of the certificate the server presented
    require_auth: tuple[str, ...] | None = None  # None: any method the rules below allow
    channel_binding: str = "prefer"  # disable, prefer or require, as libpq
    scram: ScramClient | None = None
    method: int | None = None  # the authentication request code the database used
    authenticated: bool = False  # AuthenticationOk has arrived (and passed _check_ok)

    async def answer(self, transport: asyncio.Transport, payload: bytes) -> None:
        """Answer one Authentication* message (payload without its header)."""
        code, data = messages.parse_authentication(payload)
        if code == 0:  # AuthenticationOk
            self._check_ok()
            self.authenticated = True
        elif code in (3, 5, 10):
            self._check_method(code)
            password = self.password
            if password is None:
                raise UpstreamError(
                    "the database asks for a password but the upstream has no "
                    "password_env/password_file",
                    sqlstate="28P01",
                )
            self.method = code
            if code == 3:  # cleartext
                transport.write(messages.password_message(password))
            elif code == 5:  # md5
                transport.write(
                    messages.password_message(md5_password(self.user, password, data[:4]))
                )
            else:
                self.scram = self._start_scram(password, data)
                transport.write(
                    messages.sasl_initial_response(self.scram.mechanism, self.scram.client_first())
                )
        elif code == 11:  # SASL continue
            if self.scram is None:
                raise ProtocolError("SASLContinue without SASL")
            scram = self.scram
            try:
                scram.read_server_first(data)
                # PBKDF2 with the iteration count the server chose (up to seconds of CPU): in a
                # thread, so one database asking for a huge count does not stall every session.
                loop = asyncio.get_running_loop()
                salted = await loop.run_in_executor(None, scram.salted_password)
                final = scram.client_final_with(salted)
            except AuthenticationFailed as exc:
                raise _refuse(f"upstream SCRAM exchange failed: {exc}") from None
            transport.write(messages.sasl_response(final))
        elif code == 12:  # SASL final
            if self.scram is None:
                raise ProtocolError("SASLFinal without SASL")
            try:
                self.scram.verify_server_final(data)
            except AuthenticationFailed as exc:
                raise _refuse(f"upstream SCRAM verification failed: {exc}") from None
        else:
            raise _refuse(f"unsupported upstream authentication request {code}")

    def _check_ok(self) -> None:
        scram = self.scram
        if scram is not None and not scram.verified:
            # A server that knows the password proves it in SASLFinal; one that skips the proof
            # may be an impostor that let us in to see what we send.
            raise _refuse(
                "the database ended SCRAM authentication without proving it knows the password"
            )
        if self.method is None:
            # Let in without being asked anything (trust, peer) — or by someone on the path
            # who is not the database and wants to see what dbward sends.
            if self.channel_binding == "require":
                raise _refuse(
                    "the database let dbward in without authentication, so without channel "
                    "binding, but upstream.channel_binding is require"
                )
            if self.require_auth is not None and "none" not in self.require_auth:
                raise _refuse(
                    "the database let dbward in without authentication, but "
                    f"upstream.require_auth allows only {', '.join(self.require_auth)}"
                )

    def _check_method(self, code: int) -> None:
        name, text = _METHOD_NAMES[code], _METHOD_TEXT[code]
        if self.method is not None and self.method != code:
            raise _refuse(
                f"the database asks for {text} after asking for "
                f"{_METHOD_TEXT[self.method]}: refused"
            )
        if self.require_auth is not None and name not in self.require_auth:
            raise _refuse(
                f"the database asks for {text} ({name}), but upstream.require_auth allows only "
                f"{', '.join(self.require_auth)}"
            )
        if code != 10 and self.channel_binding == "require":
            raise _refuse(
                f"the database asks for {text}, which has no channel binding, but "
                "upstream.channel_binding is require"
            )
        if code == 3 and not self.private:
            # Without TLS (or with prefer, which someone on the path can strip) anyone on the
            # path could have asked; with require anyone presenting his own certificate.
            raise _refuse(
                "the database asks for the service password in clear text on a connection "
                "without TLS or whose certificate is not verified: refused (use upstream tls "
                "mode verify-full, or SCRAM)"
            )
        if code == 5 and not self.private and "md5" not in (self.require_auth or ()):
            # The answer is relayable (someone on the path passes the database's salt to
            # dbward and its answer to the database, and holds the logged-in session) and is
            # an offline attack on the password: as for cleartext, unless the operator
            # accepted that by listing md5.
            raise _refuse(
                "the database asks for an md5 password hash on a connection without TLS or "
                "whose certificate is not verified: refused (use upstream tls mode "
                "verify-full or SCRAM, or list md5 in upstream.require_auth to accept it)"
            )

    def _start_scram(self, password: str, data: bytes) -> ScramClient:
        mechanisms = [m for m in data.split(b"\x00") if m]
        offered_plus = MECHANISM_PLUS.encode() in mechanisms
        if self.channel_binding == "require":
            if not self.tls:
                raise _refuse(
                    "the connection to the database does not use TLS, so SCRAM cannot be bound "
                    "to it, but upstream.channel_binding is require"
                )
            if not offered_plus:
                raise _refuse(
                    "the database does not offer channel binding (SCRAM-SHA-256-PLUS), but "
                    "upstream.channel_binding is require"
                )
            if self.binding is None:
                raise _refuse(
                    "the database's certificate allows no channel binding (its signature names "
                    "no hash), but upstream.channel_binding is require"
                )
        if self.channel_binding != "disable" and offered_plus and self.binding is not None:
            # Bound to this TLS connection: a proof relayed by a man in the middle is useless.
            return ScramClient(password, channel_binding=self.binding)
        if self.channel_binding != "disable" and offered_plus and self.tls and not self.private:
            # -PLUS offered over TLS, but the certificate presented gives nothing to bind to
            # (Ed25519, or a signature algorithm that names no known hash). Unverified, it may
            # be anyone's: someone on the path presenting such a certificate would get an
            # unbound exchange ('n') to relay to the real server. libpq fails here too.
            raise _refuse(
                "the database offers channel binding but its certificate allows none (its "
                "signature names no hash, as Ed25519) and is not verified: someone on the path "
                "could relay the SCRAM exchange, refused (use upstream tls mode verify-full, a "
                "certificate signed with SHA-256, or channel_binding disable to accept the risk)"
            )
        if MECHANISM.encode() in mechanisms:
            # Over TLS, 'y' tells a server that supports binding that its offer was stripped
            # (it refuses); with PLUS offered but no hash of a verified certificate, 'n'
            # (nobody else could have presented it); with binding disabled, 'n' as libpq.
            supported = self.tls and not offered_plus and self.channel_binding != "disable"
            return ScramClient(password, binding_supported=supported)
        # The list is the server's (or whoever answers in its place) and may be 1 MB long: the
        # refusal is audited and logged, so it keeps the list's start.
        offered = capped(repr(mechanisms), QUOTED_ERROR_MAX)
        raise _refuse(f"the database offers no supported SASL mechanism ({offered})")


def _channel_binding(transport: asyncio.Transport) -> bytes | None:
    """tls-server-end-point data of the certificate the database presented over this TLS
    connection (verified or not: the binding is what makes an unverified one safe to log in
    over with SCRAM)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    return peer_end_point(ssl_object.getpeercert(binary_form=True))


async def send_cancel(settings: UpstreamSettings, upstream: UpstreamConnection) -> str | None:
    """Send the CancelRequest of `upstream`'s backend on a fresh connection (best effort);
    returns why it could not be sent, None once it was.

    When the session's own login used TLS, the cancel goes inside TLS with the same context
    (and so the same verification), as libpq 17 does: in plaintext it would show anyone on the
    path the backend's secret key, and with it the power to cancel that session's statements
    at will. It is then never sent in plaintext, even if the database (or someone in between)
    declines TLS this time.
    """
    if not upstream.backend_key:
        # No BackendKeyData at login (PostgreSQL always sends one; a pooler or someone on the
        # path need not): there is nothing to send, as libpq finds.
        reason = "the database sent no cancel key at login"
        log.warning(
            "cannot send a cancel request to the database at %s: %s", settings.address, reason
        )
        return reason
    transport: asyncio.Transport | None = None
    sent = False
    try:
        async with asyncio.timeout(_CANCEL_TIMEOUT_S):
            transport, protocol = await _open_socket(settings)
            context = upstream.cancel_context
            if context is not None:
                transport, tls = await _negotiate_tls(transport, protocol, settings, context)
                if not tls:
                    raise UpstreamError(
                        "the database did not accept TLS for the cancel request of a session "
                        "that uses TLS: not sent in plaintext",
                        sqlstate="08001",
                    )
            transport.write(messages.cancel_request(upstream.backend_pid, upstream.backend_key))
            sent = True
            # The database closes the connection once it has read the request; waiting for
            # that (as libpq does) means a cancel sent at shutdown has arrived before exiting.
            await protocol.wait_closed()
    except (OSError, TimeoutError, DbwardError) as exc:  # ssl.SSLError is an OSError
        if not sent:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.warning(
                "cannot send a cancel request to the database at %s: %s", settings.address, reason
            )
            return str(reason)
    except Exception as exc:
        # A bug, not the network: the cancel's task must still end with a reason (its client
        # waits to be let go, and the audit for a `failed` record), not with an exception.
        if not sent:
            log.error("cancel request to the database failed unexpectedly", exc_info=True)
            return f"internal error ({type(exc).__name__})"
    finally:
        if transport is not None:
            transport.close()
    return None
