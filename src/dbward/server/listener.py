"""Start listeners, drain them on shutdown: the socket-facing half of the runtime."""

from __future__ import annotations

import asyncio
import logging

from dbward.relay.login import report_held_logins
from dbward.relay.postgres import PgSession
from dbward.relay.services import ListenerServices

log = logging.getLogger("dbward.server")

# After the grace period's sessions are told 57P01: how long their clients have to take it
# before the connections still open (a client not reading) are dropped.
_ABORT_AFTER_S = 1.0


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

    async def drain(self, grace_s: float) -> None:
        """Refuse new connections, let in-flight work finish, then end every session."""
        services = self.services
        services.draining = True
        if self._server is not None:
            self._server.close()
        # Those over max_connections too: each would be refused, and audited, at its
        # StartupMessage, which could come while the audit log closes (the record lost).
        for session in [*services.sessions, *services.over_limit]:
            session.request_shutdown()
        await self._wait_for_sessions(grace_s)
        for session in [*services.sessions, *services.over_limit]:
            session.force_close()
        # Closing a connection waits until what is left to send has been sent: one whose client
        # stopped reading never goes, and its last records (its disconnect) would come after
        # the audit log closed. Those still there after a moment are dropped.
        await self._wait_for_sessions(_ABORT_AFTER_S)
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

    async def _wait_for_sessions(self, timeout_s: float) -> None:
        """Until every session (and connection over the limit) has gone, at most timeout_s."""
        services = self.services
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (services.sessions or services.over_limit) and loop.time() < deadline:
            await asyncio.sleep(0.05)
