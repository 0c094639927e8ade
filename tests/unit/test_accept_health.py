"""AcceptHealth: readiness while the listeners cannot accept for want of file descriptors.

uvloop's side (nothing reported: the probe finds it) is tested end to end, on a real
`dbward serve`, in tests/e2e/test_metrics.py; asyncio's (the loop's exception handler) here,
in a child process whose descriptor limit is lowered.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from typing import Any

from dbward.server.listener import ACCEPT_RECOVERY_S, AcceptHealth


def test_accepts_fail_until_some_seconds_after_the_last_failure() -> None:
    now = [100.0]
    health = AcceptHealth(clock=lambda: now[0])
    assert not health.failing
    health.failed(OSError(errno.EMFILE, "Too many open files"))
    now[0] += ACCEPT_RECOVERY_S - 0.1
    assert health.failing
    now[0] += 0.2
    assert not health.failing  # recovered by itself


def test_other_errors_go_to_the_loop_handler_that_was_there() -> None:
    seen: list[dict[str, Any]] = []

    class _Loop:
        def default_exception_handler(self, context: dict[str, Any]) -> None:
            seen.append(context)

    health = AcceptHealth()
    context = {"message": "boom", "exception": OSError(errno.ECONNRESET, "reset")}
    health.handle_exception(_Loop(), context)  # type: ignore[arg-type]
    assert seen == [context]
    assert not health.failing


_ASYNCIO_ACCEPTS = """
import asyncio, os, resource, socket
from dbward.server.listener import AcceptHealth

async def main():
    loop = asyncio.get_running_loop()
    health = AcceptHealth()
    loop.set_exception_handler(health.handle_exception)  # no probe: the handler alone
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.socket() for _ in range(4)]  # their descriptors taken beforehand
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1, hard))
    try:
        for client in clients:
            client.setblocking(False)
            await loop.sock_connect(client, ("127.0.0.1", port))
        await asyncio.sleep(0.3)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print("failing" if health.failing else "ready")

asyncio.run(main())
"""


def test_asyncio_reports_a_failed_accept_to_the_loop_exception_handler() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _ASYNCIO_ACCEPTS],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == "failing", done.stderr
    # Passed on to the default handler as well, which logs it.
    assert "socket.accept() out of system resource" in done.stderr
    assert "out of file descriptors (Too many open files)" in done.stderr
