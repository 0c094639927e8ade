"""Answer a CancelRequest: within its client's budget, forward it to the session it names."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from dbward.audit.records import AuditEvent
from dbward.server.upstream import UpstreamConnection, send_cancel
from dbward.wire.postgres.messages import CancelRequest

if TYPE_CHECKING:
    from dbward.relay.services import CancelRegistry, ListenerServices

log = logging.getLogger("dbward.session")
_T = TypeVar("_T")


class Audit(Protocol):
    """Writes a record of the connection that sent the CancelRequest (its session's _audit)."""

    def __call__(self, event: AuditEvent, **fields: object) -> None: ...


def _log_refused_cancels(count: int, latest_host: str) -> None:
    log.warning(
        "cancel requests are rate-limited: %d refused since the last report, the latest from %s",
        count,
        latest_host,
    )


def _report_held_cancels(cancels: CancelRegistry) -> None:
    """The interval's end: report the refused attempts held back since the last line."""
    count = cancels.take_unreported()
    if count:
        _log_refused_cancels(count, cancels.latest_refused_host)


async def answer_cancel(
    services: ListenerServices, client_host: str, packet: CancelRequest, audit: Audit
) -> None:
    """Forward the request to the database of the session its key names, if its client is
    within its cancel budget (over it: counted and logged, not audited; only attempts naming
    no live session spend it); recorded through `audit`: refused, forwarded, and failed if it
    never went."""
    counts = services.counts.cancels
    if not services.cancels.allow_attempt(client_host):
        counts["throttled"] += 1
        cancels = services.cancels
        refused, report_in = cancels.refused_to_report(client_host)
        if refused:
            _log_refused_cancels(refused, client_host)
        elif report_in is not None:
            asyncio.get_running_loop().call_later(report_in, _report_held_cancels, cancels)
    else:
        target = services.cancels.lookup(packet.pid, packet.key)
        if target is not None:
            services.cancels.refund_attempt(client_host)  # a rightful cancel spends nothing
        if target is None or target._upstream is None:
            counts["refused"] += 1
            audit(AuditEvent.CANCEL, status="refused", reason="unknown cancel key")
        else:
            detail = f"session={target.session_id}"
            # Recorded before it goes, as every action is; a second record if it never went.
            counts["forwarded"] += 1
            audit(AuditEvent.CANCEL, status="forwarded", detail=detail)
            forward = track_cancel(
                services, _forward_cancel(services, target._upstream, detail, audit)
            )
            # A client may hang up once it has sent the request (tokio-postgres does), and
            # the auth timeout may strike: neither stops the cancel (nor its record).
            await asyncio.shield(forward)


async def _forward_cancel(
    services: ListenerServices, upstream: UpstreamConnection, detail: str, audit: Audit
) -> None:
    failure = await send_cancel(services.settings.upstream, upstream)
    if failure is not None:
        services.counts.cancels["failed"] += 1
        audit(AuditEvent.CANCEL, status="failed", reason=failure, detail=detail)


def track_cancel(services: ListenerServices, sending: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """Run a cancel on its own task, kept (and awaited at shutdown) by the listener."""
    task = asyncio.get_running_loop().create_task(sending)
    cancels = services.cancel_tasks
    cancels.add(task)
    task.add_done_callback(cancels.discard)
    return task
