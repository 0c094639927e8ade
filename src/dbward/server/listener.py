"""Start listeners, drain them on shutdown: the socket-facing half of the runtime."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from dbward.relay.login import report_held_logins
from dbward.relay.postgres import SHUTDOWN_ABORT_S, PgSession
from dbward.relay.services import ListenerServices

log = logging.getLogger("dbward.server")

# Out of file descriptors: the process's (RLIMIT_NOFILE) or the system's.
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})
# How often AcceptHealth checks that a descriptor can be opened, and how long after the last
# failure the proxy still says it cannot accept (so that readiness does not flap).
_PROBE_INTERVAL_S = 1.0
ACCEPT_RECOVERY_S = 5.0

_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class AcceptHealth:
    """Whether new connections can be accepted: not while file descriptors run out (EMFILE,
    ENFILE), nor for ACCEPT_RECOVERY_S after the last time they did.

    asyncio hands a failed accept to the loop's exception handler (and retries a second
    later). uvloop says nothing: libuv closes a descriptor it keeps in reserve, accepts and
    closes every pending connection, and reopens the reserve, so clients just see their
    connection closed. Hence a probe as well: one descriptor opened and closed every second.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last_failure = float("-inf")
        self._reported = False  # the failure was logged, its recovery not yet
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: _ExceptionHandler | None = None

    @property
    def failing(self) -> bool:
        """True while accepts fail, and until ACCEPT_RECOVERY_S after the last failure."""
        return self._clock() - self._last_failure < ACCEPT_RECOVERY_S

    def failed(self, exc: OSError) -> None:
        """An accept (or the probe) found no file descriptor."""
        self._last_failure = self._clock()
        if not self._reported:
            self._reported = True
            log.error(
                "out of file descriptors (%s): new connections cannot be accepted; raise the "
                "limit (ulimit -n, systemd LimitNOFILE=) or lower max_connections",
                exc.strerror,
            )

    def probe(self) -> None:
        """Open and close one descriptor: a failure is an accept that would fail now."""
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            if exc.errno in _OUT_OF_FDS:
                self.failed(exc)
            return
        if self._reported and not self.failing:
            self._reported = False
            log.warning("file descriptors available again: accepting new connections")

    def handle_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: asyncio reports failed accepts here."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_FDS:
            self.failed(exc)
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def start(self) -> None:
        """Watch the running loop: its exception handler, and the probe every second."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self.handle_exception)
        self._task = loop.create_task(self._probe_every_second())

    def stop(self) -> None:
        """Stop the probe and give the loop its exception handler back."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)
            self._loop = None

    async def _probe_every_second(self) -> None:
        while True:
            self.probe()
            await asyncio.sleep(_PROBE_INTERVAL_S)


class PgListener:
    """One listening socket serving PostgreSQL clients."""

    def __init__(self, services: ListenerServices) -> None:
        self.services = services
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and start accepting connections."""
        settings = self.services.settings
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: PgSession(self.services),
            host=settings.listen_host,
            port=settings.listen_port,
            reuse_address=True,
            backlog=1024,
        )
        log.info("listener %s: PostgreSQL on %s", settings.name, self.bound_addresses())

    def bound_addresses(self) -> list[str]:
        """Addresses actually bound (useful with port 0)."""
        if self._server is None:
            return []
        out = []
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"{host}:{port}")
        return out

    @property
    def serving(self) -> bool:
        """True while the socket accepts connections (bound and not closed by a drain)."""
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def drain(self, grace_s: float, hurry: asyncio.Event | None = None) -> None:
        """Refuse new connections, let in-flight work finish, then end every session.

        The grace period ends early once `hurry` is set (a second SIGTERM/SIGINT)."""
        services = self.services
        services.draining = True
        if self._server is not None:
            self._server.close()
        # Those over max_connections too: each would be refused, and audited, at its
        # StartupMessage, which could come while the audit log closes (the record lost).
        # Each told 57P01 (an idle one now, a busy one once answered) is dropped a moment
        # later if its client does not read it: only in-flight work holds the grace period.
        for session in [*services.sessions, *services.over_limit]:
            session.request_shutdown()
        await self._wait_for_sessions(grace_s, hurry)
        for session in [*services.sessions, *services.over_limit]:
            session.force_close()
        # Closing a connection waits until what is left to send has been sent: one whose client
        # stopped reading never goes, and its last records (its disconnect) would come after
        # the audit log closed. Those still there after a moment are dropped.
        await self._wait_for_sessions(SHUTDOWN_ABORT_S)
        for session in [*services.sessions, *services.over_limit]:
            session.abort()
        # Statements cut off by the deadline (or whose client left) must not run on after
        # dbward exits: the cancels being sent (each ends within 5 s) are waited for. So are
        # the logins just ended, whose last records (a refusal already read) come from them.
        tasks = [*services.cancel_tasks, *services.startup_tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        # Refused logins still held for their interval's report: written before the log closes.
        if services.logins is not None:
            report_held_logins(services, services.logins)
        await asyncio.sleep(0)

    async def _wait_for_sessions(
        self, timeout_s: float, hurry: asyncio.Event | None = None
    ) -> None:
        """Until every session (and connection over the limit) has gone, at most timeout_s
        (or until `hurry` is set)."""
        services = self.services
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (services.sessions or services.over_limit) and loop.time() < deadline:
            if hurry is not None and hurry.is_set():
                return
            await asyncio.sleep(0.05)
