"""Composition root: the one place that picks concrete backends and wires them together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from dbward.audit.process import ProcessAuditSink
from dbward.config.loader import secret_file_warnings, upstream_password_problems
from dbward.config.model import Config
from dbward.core.errors import AuditUnavailable, ConfigError
from dbward.identity.auth_secret import load_auth_secret
from dbward.identity.local import LocalAuthenticator
from dbward.relay.services import CancelRegistry, ListenerServices, login_throttle
from dbward.server.listener import AcceptHealth, PgListener
from dbward.server.tls import listener_contexts, server_end_point
from dbward.sql.offload import ClassifierPool
from dbward.sql.postgres import PostgresClassifier

if TYPE_CHECKING:
    from dbward.server.metrics import MetricsServer

log = logging.getLogger("dbward")


class Runtime:
    """A running dbward: the audit sink and every listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.audit = ProcessAuditSink(config.audit.path, max_delay_ms=config.audit.max_delay_ms)
        self.listeners: list[PgListener] = []
        self.offload = ClassifierPool(max_statements=config.max_statements_per_query)
        self.metrics: MetricsServer | None = None
        self.accepts = AcceptHealth()
        self._draining = False
        self._stopped = asyncio.Event()
        # Set by a second SIGTERM/SIGINT: the drain's grace period ends at once.
        self.hurry = asyncio.Event()

    # What the operations endpoint reads (dbward.server.metrics.Observed).

    @property
    def draining(self) -> bool:
        """True once stop() has begun."""
        return self._draining

    @property
    def observed_listeners(self) -> list[PgListener]:
        """The listeners bound so far."""
        return self.listeners

    @property
    def accept_failing(self) -> bool:
        """True while (and shortly after) the listeners cannot accept: out of descriptors."""
        return self.accepts.failing

    @property
    def expected_listeners(self) -> int:
        """How many listeners the configuration names."""
        return len(self.config.listeners)

    async def start(self) -> None:
        """Open the audit log, then bind every listener (fail early on any error)."""
        problems = upstream_password_problems(self.config)
        if problems:
            raise ConfigError(
                "invalid configuration:\n  "
                + "\n  ".join(f"{key}: {problem}" for key, problem in problems)
            )
        for key, warning in secret_file_warnings(self.config):
            log.warning("%s: %s", key, warning)
        self.audit.start(asyncio.get_running_loop())
        classifier = PostgresClassifier(max_statements=self.config.max_statements_per_query)
        offload = self.offload
        try:
            # After the audit writer started (the default secret lives beside the log, in the
            # folder it creates): a bad secret must stop that writer too, not orphan it.
            authenticator = LocalAuthenticator(
                self.config.users, mock_secret=load_auth_secret(self.config.auth_secret_path)
            )
            for index, settings in enumerate(self.config.listeners):
                client_tls, upstream_tls = listener_contexts(settings, index)
                services = ListenerServices(
                    settings=settings,
                    audit_settings=self.config.audit,
                    audit=self.audit,
                    classifier=classifier,
                    offload=offload,
                    authenticator=authenticator,
                    client_tls=client_tls,
                    client_tls_end_point=server_end_point(settings.tls),
                    upstream_tls=upstream_tls,
                    cancels=CancelRegistry(settings.cancel_rate_per_s),
                    logins=login_throttle(settings),
                )
                listener = PgListener(services)
                try:
                    await listener.start()
                except OSError as exc:
                    # e.g. "[Errno 98] error while attempting to bind on address (…): address
                    # already in use": say which key to change.
                    raise OSError(
                        exc.errno,
                        f"listeners[{index}].listen: cannot listen on {settings.listen}: "
                        f"{os.strerror(exc.errno) if exc.errno else exc}",
                    ) from None
                self.listeners.append(listener)
            self.accepts.start()
            if self.config.metrics is not None:
                # Imported only when configured: aiohttp and prometheus-client cost every
                # dbward process ~13 MB and ~0.1 s at start.
                from dbward.server.metrics import MetricsServer

                metrics = MetricsServer(self.config.metrics, self)
                try:
                    await metrics.start()
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"metrics.listen: cannot listen on {self.config.metrics.listen}: "
                        f"{os.strerror(exc.errno) if exc.errno else exc}",
                    ) from None
                self.metrics = metrics
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Drain every listener, then flush and close the audit log.

        The metrics endpoint answers during the drain (/readyz: 503) and closes after it."""
        self._draining = True
        await asyncio.gather(
            *(
                listener.drain(self.config.shutdown_grace_s, self.hurry)
                for listener in self.listeners
            )
        )
        if self.metrics is not None:
            await self.metrics.stop()
        self.accepts.stop()
        self.offload.close()
        await self.audit.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Block until stop() has completed."""
        await self._stopped.wait()


def configure_logging(level: str) -> None:
    """Plain, single-line logs on stderr."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def install_event_loop_policy() -> None:
    """Use uvloop where available: it halves the per-message cost of the relay."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _hangup_ignored() -> None:
    log.warning(
        "SIGHUP ignored: dbward does not reload its configuration; restart it to apply "
        "changes (SIGTERM drains sessions first)"
    )


def run_until_stopped(
    config: Config,
    *,
    ready: Callable[[], None] | None = None,
    stop_on_hangup: bool = False,
) -> int:
    """Serve until SIGINT/SIGTERM, then drain and exit 0 (used by `serve` and `demo`).

    SIGHUP is logged and ignored, or (`stop_on_hangup`, the demo: its terminal closed) stops
    like SIGTERM.
    """
    install_event_loop_policy()

    async def main() -> int:
        runtime = Runtime(config)
        await runtime.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP's default action would kill the process at once: no drain, records still in
        # the relay lost. Operators send it to reload (systemctl reload, PostgreSQL's habit);
        # dbward reads its configuration only at start, so say so and keep serving.
        loop.add_signal_handler(signal.SIGHUP, stop.set if stop_on_hangup else _hangup_ignored)
        for listener in runtime.listeners:
            log.info(
                "listening: %s -> %s",
                ", ".join(listener.bound_addresses()),
                listener.services.settings.upstream.address,
            )
        if ready is not None:
            ready()
        await stop.wait()
        log.info("shutting down: draining sessions (grace %ss)", config.shutdown_grace_s)

        def hurry() -> None:
            # An operator pressing Ctrl-C again wants out now; the records are still written.
            if not runtime.hurry.is_set():
                log.warning(
                    "second signal: ending the grace period now (statements still running "
                    "are cancelled; the audit log is still flushed)"
                )
                runtime.hurry.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, hurry)
        try:
            await runtime.stop()
        except AuditUnavailable as exc:
            # Not a start-up failure (exit 2 says the configuration is wrong): records were lost.
            log.error("shutting down: %s", exc.message)
            return 1
        log.info("audit log flushed; bye")
        return 0

    return asyncio.run(main())
