"""A client connection's login: startup packets, TLS, authentication, the database's login."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Final, NoReturn, Protocol, cast

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.core.errors import AuditUnavailable, AuthenticationFailed, DbwardError, ProtocolError
from dbward.core.text import one_line
from dbward.core.types import Identity, SessionContext
from dbward.relay.cancel import answer_cancel
from dbward.relay.services import LoginThrottle
from dbward.relay.startup import StartupRefusedError, upstream_parameters
from dbward.server.upstream import UpstreamConnection, UpstreamError, connect_upstream
from dbward.wire.postgres import messages
from dbward.wire.postgres.messages import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage

if TYPE_CHECKING:
    from dbward.relay.services import ListenerServices

log = logging.getLogger("dbward.session")

_PASSWORD, _TERMINATE = ord("p"), ord("X")
_INTERNAL_ERROR: Final = "XX000"
# The auth_fail reason of a login refused because its client address failed too many.
_THROTTLED_REASON = "too many failed logins from this client address (auth_fail_burst)"


class LoginThrottledError(DbwardError):
    """A login from a client address that failed too many (auth_fail_burst), refused before
    authentication. 28000, not 28P01 (the password may be right: the client is told to wait,
    not that it is wrong) nor 53300 (PostgreSQL's "too many connections": the server is full,
    which a client may take as passing and retry at once; class 28 says this login was
    refused)."""

    sqlstate = "28000"  # invalid_authorization_specification


def _report_refused_logins(services: ListenerServices, latest: AuditRecord, count: int) -> None:
    """One log line and one audit record for `count` logins refused since the last report:
    the latest refused attempt's record, its detail the count."""
    log.warning(
        "listener %s: logins refused after too many failed ones: %d refused since the last "
        "report, the latest from %s",
        services.settings.name,
        count,
        latest.client_addr,
    )
    try:
        services.audit.append(latest._replace(detail=f"refused={count}"))
    except AuditUnavailable:
        log.error("listener %s: audit unavailable, auth_fail record lost", services.settings.name)


def report_held_logins(services: ListenerServices, logins: LoginThrottle) -> None:
    """The interval's end (or shutdown): report the login refusals held back since the last
    report."""
    count = logins.refusals.take_unreported(time.monotonic())
    latest = logins.refusals.latest
    if count and latest is not None:
        now_ms = int(services.clock() * 1000)
        _report_refused_logins(services, latest._replace(ts_ms=now_ms), count)


class LoginSession(Protocol):
    """What a Login uses of its session (a PgSession, which stays the connection's asyncio
    protocol and keeps its relay state): who the connection is, its client channel, the
    fields its audit records carry, and how it ends."""

    # Who the connection is: fixed before the login starts.
    services: ListenerServices
    session_id: str
    client_addr: str
    _client_host: str
    _over_limit: bool  # past max_connections: refused once the StartupMessage is read
    # The client channel: the transport is replaced by the TLS upgrade.
    transport: asyncio.Transport | None

    async def _next_startup_frame(self) -> tuple[int, bytes, bytes]: ...
    def _has_unread_input(self) -> bool: ...
    def _set_encoding(self, name: str) -> None: ...

    # What the login tells the session, in order: who the client claims to be, that its
    # connection is recorded, who it is, and (through _attach_upstream) the database's login.
    _claimed_user: str
    _connect_audited: bool
    identity: Identity | None

    def _startup_received(self, user: str, application_name: str, database: str) -> None: ...
    def _logged_in(self, identity: Identity, context: SessionContext) -> None: ...
    def _attach_upstream(self, upstream: UpstreamConnection) -> None: ...

    # Records, and how the connection ends.
    def _base_fields(self) -> dict[str, str]: ...
    def _audit(self, event: AuditEvent, **fields: object) -> None: ...
    def _fatal(self, sqlstate: str, message: str) -> None: ...
    def _protocol_error(self, exc: ProtocolError) -> None: ...
    def _close_client(self) -> None: ...
    def _lost_in_handshake(self) -> None: ...
    def _client_gone(self) -> bool: ...


class Login:
    """One connection's login, run as its startup task: the client's startup packets, TLS,
    authentication and the failed-login throttle, then the database's login, handed to the
    session; or the session ended with the reason the login failed."""

    def __init__(self, session: LoginSession) -> None:
        self._session = session
        self.services = session.services
        self.session_id = session.session_id
        self._client_host = session._client_host
        self._tls = False

    async def run(self) -> None:
        """The startup task: log in, or end the session with the reason the login failed."""
        session = self._session
        settings = self.services.settings
        try:
            try:
                upstream_params = await asyncio.wait_for(
                    self._startup(), timeout=settings.auth_timeout_s
                )
            except TimeoutError:
                if session._connect_audited:
                    # A login begun and never finished (a stalled password prompt, or a
                    # guesser holding slots) is a failed authentication for the trail.
                    self.services.counts.logins["abandoned"] += 1
                    session._audit(
                        AuditEvent.AUTH_FAIL,
                        identity=session._claimed_user,
                        reason=f"authentication timed out ({settings.auth_timeout_s:g} s)",
                        sqlstate="08006",
                    )
                session._fatal("08006", "dbward: authentication timed out")
                return
            if upstream_params is not None:
                # The client has logged in: the database's login has its own timeout
                # (connect_timeout_s), and its slowness is not the client's.
                await self._login_upstream(upstream_params)
        except AuthenticationFailed as exc:
            log.info("session %s: authentication failed: %s", self.session_id, exc.message)
            session._fatal("28P01", "password authentication failed")
        except StartupRefusedError as exc:
            session._audit(
                AuditEvent.PROTOCOL_ERROR,
                identity=session._claimed_user,
                reason=exc.message,
                sqlstate=exc.sqlstate,
            )
            session._fatal(exc.sqlstate, exc.message)
        except UpstreamError as exc:
            # The database's message, without the startup values it quotes (upstream.py),
            # can still quote a name the client claimed: escaped for the log.
            log.warning("session %s: upstream refused: %s", self.session_id, one_line(exc.message))
            session._audit(AuditEvent.UPSTREAM_LOST, reason=exc.message, sqlstate=exc.sqlstate)
            if exc.frame is not None and session.transport is not None:
                session.transport.write(exc.frame)
                session._close_client()
            else:
                session._fatal(exc.sqlstate, exc.message)
        except ProtocolError as exc:
            session._protocol_error(exc)
        except (ConnectionError, OSError) as exc:
            if not session._client_gone():
                log.warning(
                    "session %s: cannot reach the database at %s: %s",
                    self.session_id,
                    self.services.settings.upstream.address,
                    exc,
                )
                session._audit(AuditEvent.UPSTREAM_LOST, reason=str(exc), sqlstate="08001")
                session._fatal("08001", "dbward: could not connect to the database")
        except asyncio.CancelledError:
            pass
        except DbwardError as exc:
            session._fatal(exc.sqlstate, exc.message)
        except Exception:
            # A bug (here, or in an authenticator) must not leave the client waiting with no
            # answer, holding its max_connections and max_unauthenticated_per_host slots
            # until it gives up: auth_timeout_s no longer runs once this task has ended.
            log.exception("session %s: internal error during startup", self.session_id)
            if session._connect_audited and session.identity is None:
                self.services.counts.logins["failed"] += 1
                session._audit(
                    AuditEvent.AUTH_FAIL,
                    identity=session._claimed_user,
                    reason="internal error during authentication",
                    sqlstate=_INTERNAL_ERROR,
                )
            session._fatal(_INTERNAL_ERROR, "dbward: internal error")

    async def _startup(self) -> dict[str, str] | None:
        """The client's startup and authentication (bounded by auth_timeout_s): the
        parameters for the database's login, or None when there is none to make (a
        CancelRequest)."""
        session = self._session
        services = self.services
        # Each negotiation is answered once, as PostgreSQL does: SSLRequest once, GSSENCRequest
        # once and not inside TLS (it answers a repeat as an unsupported protocol version).
        asked_ssl = asked_gss = False
        tls_declined = False  # TLS refused to a locked-out address: its login is refused
        while True:
            try:
                _, payload, _ = await session._next_startup_frame()
            except (ConnectionResetError, asyncio.CancelledError):
                if tls_declined and services.logins is not None:
                    # A client that logs in only over TLS (sslmode require) hangs up at the
                    # 'N' (or never answers it): a refused login all the same.
                    self._count_throttled(services.logins)
                raise
            packet = messages.parse_startup_packet(payload)
            if isinstance(packet, SSLRequest):
                if asked_ssl:
                    raise ProtocolError("SSLRequest after the SSL negotiation")
                asked_ssl = True
                tls_declined = await self._answer_ssl_request()
                continue
            if isinstance(packet, GSSENCRequest):
                if asked_gss or self._tls:
                    raise ProtocolError("GSSENCRequest after the encryption negotiation")
                asked_gss = True
                assert session.transport is not None
                session.transport.write(b"N")
                continue
            if isinstance(packet, CancelRequest):
                await self._handle_cancel(packet)
                return None
            assert isinstance(packet, StartupMessage)
            break
        params = packet.params
        user = params.get("user", "")
        application_name = params.get("application_name", "")
        database = params.get("database") or services.settings.upstream.database
        # Known before any refusal, so every record of this connection says who claimed it.
        session._startup_received(user, application_name, database)
        if services.logins is not None:
            # Before anything else costs dbward work, and before the connect record: a locked
            # out client's spray leaves one aggregated record per interval, not one per try.
            self._refuse_if_throttled(services.logins, tls_declined=tls_declined)
        tls_required = services.settings.tls.mode == "required"
        if services.client_tls is not None and tls_required and not self._tls:
            raise StartupRefusedError(
                "dbward: this listener requires TLS; connect with sslmode=require or stronger"
            )
        if session._over_limit:
            services.counts.refused["max_connections"] += 1
            log.warning(
                "listener %s: refusing %s, max_connections (%d) reached",
                services.settings.name,
                session.client_addr,
                services.settings.max_connections,
            )
            raise StartupRefusedError("sorry, too many clients already", sqlstate="53300")
        if not user:
            raise StartupRefusedError("no user name specified in the startup message")
        upstream_params = upstream_parameters(params, services.settings.upstream.database)
        minor = packet.protocol & 0xFFFF
        extensions = sorted(name for name in params if name.startswith("_pq_."))
        if minor > 0 or extensions:
            # Like PostgreSQL: answer with the version and options we speak, then carry on.
            assert session.transport is not None
            session.transport.write(messages.negotiate_protocol_version(0, extensions))
        encoding = params.get("client_encoding")
        if encoding is not None:
            session._set_encoding(encoding)
        session._audit(AuditEvent.CONNECT)
        session._connect_audited = True
        identity = await self._authenticate(user)
        session._logged_in(
            identity,
            SessionContext(
                session_id=self.session_id,
                identity=identity,
                listener=services.settings.name,
                database=database,
                client_addr=session.client_addr,
                application_name=application_name,
                service_role=services.settings.upstream.user,
            ),
        )
        services.counts.logins["ok"] += 1
        session._audit(AuditEvent.AUTH_OK)
        return upstream_params

    async def _login_upstream(self, upstream_params: dict[str, str]) -> None:
        """Log in to the database as the service user (bounded by connect_timeout_s)."""
        services = self.services
        try:
            password = services.settings.upstream.read_password()
        except (OSError, LookupError, ValueError) as exc:
            # ValueError: a rotated file that is not UTF-8 text, or too large (its message
            # names the file, never its content).
            log.error(
                "listener %s: cannot read the upstream password: %s", services.settings.name, exc
            )
            raise UpstreamError(
                "dbward: the upstream credentials are unavailable", sqlstate="08001"
            ) from None
        upstream_settings = services.settings.upstream
        try:
            upstream = await asyncio.wait_for(
                connect_upstream(
                    upstream_settings, upstream_params, services.upstream_tls, password
                ),
                timeout=upstream_settings.connect_timeout_s,
            )
        except TimeoutError:
            # The database's silence, not the client's: not "authentication timed out".
            raise UpstreamError(
                "dbward: the database did not complete the login within "
                f"{upstream_settings.connect_timeout_s:g} s (upstream.connect_timeout_s)",
                sqlstate="08001",
            ) from None
        if self._session._client_gone():
            upstream.transport.close()
            return
        self._session._attach_upstream(upstream)

    async def _answer_ssl_request(self) -> bool:
        """Negotiate TLS, or decline it ('N'); True if declined because the address is locked
        out by auth_fail_burst.

        Its login is refused at its StartupMessage, and a TLS handshake for it would be CPU
        spent on a refusal (for a guesser, on every try): 'N' instead.

        'N', not the ErrorResponse straight away: libpq does not show an error sent in answer
        to SSLRequest (it cannot be trusted before TLS; the user sees "server sent an error
        response during SSL exchange"). With 'N', a client with sslmode prefer (libpq's
        default) or allow sends its StartupMessage in the clear and shows the refusal; one
        with sslmode require hangs up ("server does not support SSL"): no client can read a
        reason without a handshake."""
        logins = self.services.logins
        locked_out = logins is not None and bool(logins.retry_after(self._client_host))
        if self.services.client_tls is None or not locked_out:
            await self._negotiate_tls()
            return False
        transport = self._session.transport
        assert transport is not None
        transport.write(b"N")
        return True

    async def _negotiate_tls(self) -> None:
        session = self._session
        transport = session.transport
        assert transport is not None
        context = self.services.client_tls
        if context is None or self._tls:
            transport.write(b"N")
            return
        if session._has_unread_input():
            # Plaintext sent after SSLRequest would be treated as encrypted (CVE-2021-23214).
            raise ProtocolError("unencrypted data after SSLRequest")
        transport.pause_reading()
        transport.write(b"S")
        loop = asyncio.get_running_loop()
        # The session is its connection's asyncio protocol: TLS runs beneath it.
        protocol = cast(asyncio.BaseProtocol, session)
        try:
            new_transport = await loop.start_tls(transport, protocol, context, server_side=True)
            if new_transport is None:
                raise ConnectionResetError("TLS handshake failed")
        except BaseException:
            session._lost_in_handshake()
            raise
        session.transport = new_transport
        self._tls = True

    async def _authenticate(self, user: str) -> Identity:
        session = self._session
        transport = session.transport
        assert transport is not None
        services = self.services
        exchange = services.authenticator.begin(
            user,
            tls=self._tls,
            channel_binding=services.client_tls_end_point if self._tls else None,
        )
        transport.write(exchange.start())
        logins = services.logins
        gave_up = False  # a Terminate: the client has no password to offer, it tried none
        reserved = False  # a token of auth_fail_burst is held for the step being taken
        try:
            while True:
                msg_type, payload, _ = await session._next_startup_frame()
                if msg_type != _PASSWORD:
                    gave_up = msg_type == _TERMINATE
                    raise AuthenticationFailed("expected an authentication message")
                if logins is not None:
                    # Checked at each step, not only at the StartupMessage: logins begun
                    # together while the address had budget would each have their password
                    # checked. A step that fails keeps its token: the failure's. (The local
                    # SCRAM steps never await, so no two steps hold tokens at once; an
                    # authenticator whose steps await would hold one per login in flight.)
                    if not logins.reserve(self._client_host):
                        self._throttled_in_exchange(logins)
                    reserved = True
                step = await exchange.step(payload)
                if reserved:
                    reserved = False
                    assert logins is not None
                    logins.release(self._client_host)
                if step.reply is not None:
                    transport.write(step.reply)
                if step.identity is not None:
                    return step.identity
        except AuthenticationFailed as exc:
            self._failed_login(exc.message, counted=not gave_up, spent=reserved)
            raise
        except ProtocolError as exc:
            self._failed_login(exc.message, spent=reserved)
            raise AuthenticationFailed(exc.message) from None
        except BaseException:
            if reserved:  # the client left mid-step, or an internal error: not a failure
                assert logins is not None
                logins.release(self._client_host)
            raise

    def _throttled_in_exchange(self, logins: LoginThrottle) -> NoReturn:
        """Refuse a login begun while its address had budget, which others from it spent
        meanwhile: its password is not checked. Audited on its own (it has a connect
        record), then LoginThrottledError."""
        wait = max(logins.retry_after(self._client_host), 1.0)
        self.services.counts.logins["throttled"] += 1
        self._session._audit(
            AuditEvent.AUTH_FAIL,
            reason=_THROTTLED_REASON,
            sqlstate=LoginThrottledError.sqlstate,
        )
        raise LoginThrottledError(
            f"dbward: too many failed logins from this address; try again in {math.ceil(wait)} s"
        )

    def _failed_login(self, reason: str, *, counted: bool = True, spent: bool = False) -> None:
        """A login failed (wrong password, unknown user, a malformed exchange): audited, and
        (unless the client gave up without trying a password) counted against its
        auth_fail_burst; `spent`: counted already, by the token its failed step holds."""
        detail = ""
        logins = self.services.logins
        if logins is not None and counted:
            now = time.monotonic()
            if spent:
                wait = logins.retry_after(self._client_host, now)
            else:
                wait = logins.failed(self._client_host, now)
            if wait:
                locked = ", ".join(
                    f"from {key} refused for {math.ceil(seconds)} s"
                    for key, seconds in logins.lockouts(self._client_host, now)
                )
                detail = f"locked out: logins {locked}"
                log.warning(
                    "listener %s: too many failed logins: %s",
                    self.services.settings.name,
                    locked,
                )
        # A client that gave up before trying a password (psql hangs up to ask the user for
        # one) is not a failed guess.
        self.services.counts.logins["failed" if counted else "abandoned"] += 1
        self._session._audit(AuditEvent.AUTH_FAIL, reason=reason, sqlstate="28P01", detail=detail)

    def _refuse_if_throttled(self, logins: LoginThrottle, *, tls_declined: bool) -> None:
        """Refuse a login from a client that spent its failed-login budget (LoginThrottledError,
        before any SCRAM work); its auth_fail record is written with others, once an interval.
        `tls_declined`: its SSLRequest was answered 'N' for that, and it is refused even if its
        budget came back meanwhile (it would log in without the TLS it asked for)."""
        wait = logins.retry_after(self._client_host)
        if tls_declined:
            wait = max(wait, 1.0)
        if not wait:
            return
        self._count_throttled(logins)
        raise LoginThrottledError(
            f"dbward: too many failed logins from this address; try again in {math.ceil(wait)} s"
        )

    def _count_throttled(self, logins: LoginThrottle) -> None:
        """Count a login refused by auth_fail_burst; its auth_fail record is written with
        others, once an interval."""
        self.services.counts.logins["throttled"] += 1
        record = AuditRecord(
            event=AuditEvent.AUTH_FAIL,
            ts_ms=int(self.services.clock() * 1000),
            sqlstate=LoginThrottledError.sqlstate,
            reason=_THROTTLED_REASON,
            **self._session._base_fields(),  # type: ignore[arg-type]
        )
        refused, report_in = logins.refused(record)
        if refused:
            _report_refused_logins(self.services, record, refused)
        elif self.services.draining:
            # The drain may have written the held refusals already (a connection over
            # max_connections is not among the sessions it ends): a timer would fire too late.
            report_held_logins(self.services, logins)
        elif report_in is not None:
            asyncio.get_running_loop().call_later(
                report_in, report_held_logins, self.services, logins
            )

    async def _handle_cancel(self, packet: CancelRequest) -> None:
        try:
            await answer_cancel(self.services, self._client_host, packet, self._session._audit)
        finally:
            self._session._close_client()  # whatever happened: a cancel client waits to be let go
