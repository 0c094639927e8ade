"""The operations endpoint: Prometheus metrics, liveness and readiness over plain HTTP.

An aiohttp low-level server on the proxy's own event loop (no thread), bound with the
listeners and closed after they have drained. Nothing here is on the relay's path: the
sessions keep plain int counts (ListenerCounts, the audit sink's), and `DbwardCollector`
reads them when /metrics is scraped. No label is anything a client chooses: listener names
(from the configuration) and fixed vocabularies only; never identities, addresses or SQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from http.client import responses
from typing import Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from dbward import __version__
from dbward.audit.records import AuditEvent
from dbward.config.model import MetricsSettings
from dbward.core.types import StatementKind
from dbward.relay.services import ListenerCounts, ListenerServices
from dbward.server.listener import ACCEPT_RECOVERY_S

log = logging.getLogger("dbward.metrics")

# How long an idle HTTP connection is kept (aiohttp's default is an hour: a scraper comes back
# every 15-60 s), and how long shutdown waits for a request in progress.
_KEEPALIVE_S = 75.0
_SHUTDOWN_S = 1.0
# Longest request line or header, and most headers, a request may have (400/431 beyond).
_MAX_LINE = 8190
_MAX_HEADERS = 128
# Most HTTP connections open at once: one more is closed as soon as it is accepted. Scrapers
# and probes use one or two each; without a cap, idle connections (each kept up to
# _KEEPALIVE_S) would take the file descriptors the PostgreSQL listeners need to accept.
MAX_CONNECTIONS = 32
# The process metrics read /proc, listing every open file descriptor: ~0.1 ms idle, ~26 ms with
# 19,000 descriptors (10,000 sessions). They are read again only once the last reading has cost
# at most 1/_PROCESS_BUDGET of the time since, so a client scraping in a loop cannot take more
# than ~1 % of the proxy's event loop with them (dbward's own counts are always read fresh).
_PROCESS_BUDGET = 100
# The text format every Prometheus (and compatible scraper) reads; prometheus_client 0.22+
# labels the same body "version=1.0.0", which older servers do not know. dbward's names and
# labels are all plain ASCII, so the two are identical.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AuditStats(Protocol):
    """What the collector and /readyz read from the audit sink (ProcessAuditSink)."""

    @property
    def healthy(self) -> bool: ...

    @property
    def pending_records(self) -> int: ...

    @property
    def committed_records(self) -> int: ...

    @property
    def restarts(self) -> int: ...


class ObservedListener(Protocol):
    """What the collector and /readyz read from a listener (PgListener)."""

    @property
    def services(self) -> ListenerServices: ...

    @property
    def serving(self) -> bool: ...


class Observed(Protocol):
    """The running proxy as the operations endpoint sees it (dbward.runtime.Runtime)."""

    @property
    def draining(self) -> bool: ...

    @property
    def audit(self) -> AuditStats: ...

    @property
    def observed_listeners(self) -> Sequence[ObservedListener]: ...

    @property
    def expected_listeners(self) -> int: ...

    @property
    def accept_failing(self) -> bool: ...


def not_ready_reason(observed: Observed) -> str | None:
    """Why the proxy should not get new connections now (None: it is ready)."""
    if observed.draining:
        return "draining: shutting down"
    listeners = observed.observed_listeners
    if len(listeners) < observed.expected_listeners or not all(
        listener.serving for listener in listeners
    ):
        return "starting: not every listener is accepting connections"
    if observed.accept_failing:
        return "out of file descriptors: new connections cannot be accepted"
    if not observed.audit.healthy:
        return "audit log failing: statements are refused"
    return None


class DbwardCollector:
    """Reads dbward's plain counters at scrape time and yields them as metric families."""

    def __init__(self, observed: Observed) -> None:
        self._observed = observed

    def collect(self) -> Iterator[Metric]:
        observed = self._observed
        info = GaugeMetricFamily(
            "dbward_build_info", "dbward's version (always 1)", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        draining = GaugeMetricFamily("dbward_draining", "1 while shutting down (SIGTERM/SIGINT)")
        draining.add_metric([], 1 if observed.draining else 0)
        yield draining
        accept_failing = GaugeMetricFamily(
            "dbward_accept_failing",
            "1 while new connections cannot be accepted for want of file descriptors (and "
            f"for {ACCEPT_RECOVERY_S:g} s after the last failure)",
        )
        accept_failing.add_metric([], 1 if observed.accept_failing else 0)
        yield accept_failing
        yield from self._audit(observed.audit)
        yield from self._listeners(observed.observed_listeners)

    @staticmethod
    def _audit(audit: AuditStats) -> Iterator[Metric]:
        failing = GaugeMetricFamily(
            "dbward_audit_failing",
            "1 while the audit log cannot record (writer down, write failure, backlog full): "
            "statements are refused",
        )
        failing.add_metric([], 0 if audit.healthy else 1)
        yield failing
        pending = GaugeMetricFamily(
            "dbward_audit_queue_records", "audit records queued or sent and not yet committed"
        )
        pending.add_metric([], audit.pending_records)
        yield pending
        committed = CounterMetricFamily(
            "dbward_audit_records", "audit records committed to the log since start"
        )
        committed.add_metric([], audit.committed_records)
        yield committed
        restarts = CounterMetricFamily(
            "dbward_audit_writer_restarts", "audit writer processes restarted after one died"
        )
        restarts.add_metric([], audit.restarts)
        yield restarts

    @staticmethod
    def _listeners(listeners: Sequence[ObservedListener]) -> Iterator[Metric]:
        names = ["listener"]
        up = GaugeMetricFamily(
            "dbward_listener_up", "1 while the listener accepts connections", labels=names
        )
        sessions = GaugeMetricFamily(
            "dbward_sessions_active",
            "client connections holding a max_connections slot (logging in or logged in)",
            labels=names,
        )
        limit = GaugeMetricFamily(
            "dbward_sessions_max", "the listener's max_connections", labels=names
        )
        connections = CounterMetricFamily(
            "dbward_connections", "client connections accepted", labels=names
        )
        refused = CounterMetricFamily(
            "dbward_connections_refused",
            "client connections refused before login, by reason",
            labels=[*names, "reason"],
        )
        logins = CounterMetricFamily(
            "dbward_logins", "login attempts, by result", labels=[*names, "result"]
        )
        statements = CounterMetricFamily(
            "dbward_statements",
            "statements by what became of them (allow: forwarded; deny: refused by the "
            "policy; audit_unavailable: refused because the audit log could not record them) "
            "and kind",
            labels=[*names, "decision", "kind"],
        )
        cancels = CounterMetricFamily(
            "dbward_cancel_requests", "CancelRequests, by result", labels=[*names, "result"]
        )
        upstream_lost = CounterMetricFamily(
            "dbward_upstream_lost",
            "sessions that lost (or could not open) their database connection",
            labels=names,
        )
        protocol_errors = CounterMetricFamily(
            "dbward_protocol_errors",
            "sessions ended or refused for a protocol error or a limit",
            labels=names,
        )
        escalations = CounterMetricFamily(
            "dbward_privilege_escalations",
            "sessions terminated because the database session gained privileges",
            labels=names,
        )
        for listener in listeners:
            services = listener.services
            name = services.settings.name
            counts: ListenerCounts = services.counts
            up.add_metric([name], 1 if listener.serving else 0)
            sessions.add_metric([name], len(services.sessions))
            limit.add_metric([name], services.settings.max_connections)
            connections.add_metric([name], counts.connections)
            for reason, value in counts.refused.items():
                refused.add_metric([name, reason], value)
            for result, value in counts.logins.items():
                logins.add_metric([name, result], value)
            for kind in StatementKind:
                statements.add_metric([name, "allow", kind.value], counts.allowed[kind])
                statements.add_metric([name, "deny", kind.value], counts.denied[kind])
                statements.add_metric(
                    [name, "audit_unavailable", kind.value], counts.audit_refused[kind]
                )
            for result, value in counts.cancels.items():
                cancels.add_metric([name, result], value)
            events = counts.events
            upstream_lost.add_metric([name], events[AuditEvent.UPSTREAM_LOST])
            protocol_errors.add_metric([name], events[AuditEvent.PROTOCOL_ERROR])
            escalations.add_metric([name], events[AuditEvent.PRIVILEGE_ESCALATION])
        yield from (up, sessions, limit, connections, refused, logins, statements, cancels)
        yield from (upstream_lost, protocol_errors, escalations)


def build_registry(observed: Observed) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one): dbward's counters, and the
    process's CPU, memory and file descriptors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DbwardCollector(observed))
    registry.register(BudgetedCollector(ProcessCollector(registry=None)))
    return registry


class BudgetedCollector:
    """Another collector's metrics, read again only when the last reading cost at most
    1/_PROCESS_BUDGET of the time since (served as they were read meanwhile)."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector
        self._metrics: list[Metric] = []
        self._until = float("-inf")

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        if started >= self._until:
            self._metrics = list(self._collector.collect())
            done = time.monotonic()
            self._until = done + (done - started) * _PROCESS_BUDGET
        return iter(self._metrics)


class _Handler(RequestHandler):
    """aiohttp's protocol for one HTTP connection, answering its errors with dbward's page."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (400, 431, ...), or a handler's exception (500)."""
        # aiohttp's own answer names its and Python's versions (Server) and quotes the bytes it
        # could not parse. Its logging (and its refusal once a response began) is kept for a
        # handler's exception, a bug; a request that could not be parsed is the client's doing,
        # and aiohttp would log each one at ERROR with a traceback: anyone reaching the port
        # could fill the log, one entry per connection.
        if status >= 500:
            super().handle_error(request, status, exc, message)
        else:
            log.debug("metrics endpoint: unparseable request (%d): %s", status, exc)
            if request.writer.output_size > 0:  # as aiohttp: the connection is broken
                raise ConnectionError("response already begun: no error page can follow")
        response = _text(status, f"{status} {responses.get(status, 'Error')}", Server="dbward")
        response.force_close()
        return response


class _CappedServer(web.Server):
    """aiohttp's low-level server, closing a connection accepted beyond MAX_CONNECTIONS."""

    def __call__(self) -> RequestHandler:
        # As aiohttp's own, with dbward's error pages: aiohttp has no option for them.
        return _Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        over = len(self.connections) >= MAX_CONNECTIONS
        super().connection_made(handler, transport)
        if over:
            # On the next turn, before the handler's task starts: closed at once, it would
            # find its connection lost and fail an assertion (logged, once per connection).
            self._loop.call_soon(handler.force_close)


def _text(status: int, body: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=body + "\n", headers=headers or None)


class MetricsServer:
    """The HTTP endpoint: GET /metrics, /healthz, /readyz; 404 elsewhere, 405 for other methods."""

    def __init__(self, settings: MetricsSettings, observed: Observed) -> None:
        self.settings = settings
        self._observed = observed
        self._registry = build_registry(observed)
        self._runner: web.ServerRunner | None = None
        self._routes: dict[str, Callable[[], web.Response]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    async def start(self) -> None:
        """Bind (OSError if the address is taken) and serve on the running loop."""
        server = _CappedServer(
            self._handle,
            keepalive_timeout=_KEEPALIVE_S,
            # A body left unread (none is read) closes the connection after the answer, instead
            # of aiohttp reading and discarding up to 10 s of it.
            lingering_time=0,
            access_log=None,  # a line per scrape, with the scraper's address: not wanted
            # aiohttp's defaults in recent releases, stated so that every version holds them.
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
            max_headers=_MAX_HEADERS,
        )
        runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_S)
        await runner.setup()
        site = web.TCPSite(
            runner,
            host=self.settings.listen_host,
            port=self.settings.listen_port,
            reuse_address=True,
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = self.bound_addresses()
        log.info("metrics: http://%s/metrics (/healthz, /readyz)", ", ".join(addresses))
        if self.settings.listen_host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "metrics.listen %s is not a loopback address: the endpoint has no "
                "authentication; expose it only on a private network",
                self.settings.listen,
            )

    def bound_addresses(self) -> list[str]:
        """host:port of each socket bound (useful with port 0)."""
        runner = self._runner
        if runner is None:
            return []
        out = []
        for address in runner.addresses:
            host, port = address[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    async def stop(self) -> None:
        """Close the socket and any connection still open."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        route = self._routes.get(request.path)
        if route is None:
            response = _text(404, "not found")
        elif request.method != "GET":
            response = _text(405, "method not allowed", Allow="GET")
        else:
            response = route()
        # aiohttp's default names its and Python's versions to whoever can reach the port.
        response.headers["Server"] = "dbward"
        return response

    def _metrics(self) -> web.Response:
        body = generate_latest(self._registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    @staticmethod
    def _healthz() -> web.Response:
        return _text(200, "ok")

    def _readyz(self) -> web.Response:
        reason = not_ready_reason(self._observed)
        if reason is not None:
            return _text(503, f"not ready: {reason}")
        return _text(200, "ready")
