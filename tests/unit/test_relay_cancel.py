"""A cancel that fails unexpectedly still ends with a reason, a record and a closed client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dbward.audit.records import AuditEvent
from dbward.audit.sink import MemorySink
from dbward.relay.login import Login
from dbward.relay.postgres import PgSession
from dbward.server import upstream as upstream_module
from dbward.wire.postgres.messages import CancelRequest
from fixtures.detached import RecordingTransport, detached_session


class _ClosingTransport(RecordingTransport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_an_unexpected_failure_to_send_a_cancel_is_reported_and_the_client_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug on the cancel's path (as a missing cancel key once was: a ValueError) ended the
    # cancel's task with an exception: the cancelling client was never closed and no `failed`
    # record said the cancel never went.
    async def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(upstream_module, "_open_socket", broken)
    sink = MemorySink()
    target, _, _ = detached_session(sink, keep=False)
    assert target._upstream is not None
    target._upstream.backend_pid = 4242
    target._upstream.backend_key = b"\x00\x00\x00\x01"
    services = target.services
    key = services.cancels.issue(4242, target)

    canceller = PgSession(services)
    client = _ClosingTransport()
    canceller.transport = client  # type: ignore[assignment]

    async def cancel() -> None:
        await Login(canceller)._handle_cancel(CancelRequest(4242, key))
        await asyncio.gather(*services.cancel_tasks)

    asyncio.run(cancel())
    assert client.closed
    cancels = [r for r in sink.records if r.event == AuditEvent.CANCEL]
    assert [(r.status, r.reason) for r in cancels] == [
        ("forwarded", ""),
        ("failed", "internal error (RuntimeError)"),
    ]
