"""A large client message costs the relay about its own size in memory, not three times it.

Review 25: the framer gathered a large message in a bytearray, copied it into a frame (bytes),
copied the frame's payload, and the relay joined the frame with what followed it into one more
copy before writing: 3-4 times the message at once (a 200 MiB message: 600-800 MiB).
"""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
from collections.abc import Callable

import pytest

from dbward.audit.sink import MemorySink
from dbward.relay.postgres import PgSession
from dbward.wire.postgres import messages as m
from fixtures.detached import RecordingTransport, detached_session, frames

MIB = 1024 * 1024
CHUNK = 256 * 1024  # what one socket read delivers


class _Keeping(RecordingTransport):
    """An upstream transport that keeps what it is given without copying it."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[bytes | bytearray] = []

    def write(self, data: bytes | bytearray) -> None:
        self.pieces.append(data)


def _query(size: int) -> bytes:
    body = b"SELECT '" + b"x" * size + b"'\x00"
    return b"Q" + struct.pack("!I", 4 + len(body)) + body


def _traced_peak(data: bytes, feed: Callable[[bytes], None]) -> int:
    """Feed `data` in socket-sized chunks; the peak of traced memory meanwhile, in bytes
    (above what was allocated before, the input included)."""
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        while chunks:
            feed(chunks.pop(0))
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _through_relay(data: bytes) -> tuple[float, bytes, bytes]:
    """Feed `data` in socket-sized chunks; the traced peak as a multiple of its size, what
    went upstream and what the client was sent."""

    async def run() -> tuple[float, bytes, bytes]:
        session, client, _ = _session()
        upstream = _Keeping()
        assert session._upstream is not None
        session._upstream.transport = upstream  # type: ignore[assignment]
        peak = _traced_peak(data, session.data_received)
        return peak / len(data), b"".join(upstream.pieces), bytes(client.written)

    return asyncio.run(run())


@pytest.mark.parametrize(
    "data",
    [
        # COPY data (PostgreSQL ignores it outside a copy; the relay passes it on either way).
        m.copy_data(b"x" * 16 * MIB) + m.copy_done(),
        # A large parameter, with what a client sends after it in the same write (a Bind of a
        # statement dbward holds: one it does not is asked about instead, not forwarded).
        m.parse_message("", "SELECT $1::text")
        + m.bind_message("", "", [b"x" * 16 * MIB])
        + m.execute_message("")
        + m.sync(),
    ],
    ids=["copydata", "bind"],
)
def test_a_large_message_is_forwarded_without_copies(data: bytes) -> None:
    ratio, forwarded, _ = _through_relay(data)
    assert forwarded.startswith(data[:-20]) and len(forwarded) >= len(data) - 20
    assert ratio < 1.3, f"peak {ratio:.2f} times the message"


def test_a_query_too_long_to_parse_is_refused_without_copies() -> None:
    data = _query(20 * MIB)  # max_statement_bytes is 16 MiB
    ratio, forwarded, _ = _through_relay(data)
    assert b"x" * 100 not in forwarded  # refused: its text never reaches PostgreSQL
    assert forwarded.startswith(b"Q")
    assert ratio < 1.3, f"peak {ratio:.2f} times the message"


def test_large_messages_kept_in_place_are_read_like_small_ones() -> None:
    """What the relay reads of a large message (a Query's text, a Bind's names) is the same
    whether it arrived in one piece or over many reads."""
    big_bind = m.bind_message("p1", "", [b"y" * (300 * 1024)])
    text = "SELECT 1 /* " + "z" * (300 * 1024) + " */"
    data = m.parse_message("", "SELECT $1::text") + big_bind + m.execute_message("p1")
    data += m.sync() + m.query(text)
    _, forwarded, _ = _through_relay(data)
    assert forwarded == data  # allowed: passed on as they came
    # Another session, the same stream in one piece: the same decisions.
    _, whole, _ = asyncio.run(_one_feed(data))
    assert whole == forwarded


def _session() -> tuple[PgSession, RecordingTransport, RecordingTransport]:
    session, client, upstream = detached_session(MemorySink())
    session._framer.max_message_bytes = session.services.settings.max_message_bytes  # logged in
    return session, client, upstream


async def _one_feed(data: bytes) -> tuple[float, bytes, bytes]:
    session, client, upstream = _session()
    session.data_received(data)
    return 0.0, bytes(upstream.written), bytes(client.written)


def test_a_large_bind_with_a_malformed_name_is_refused_as_before() -> None:
    body = b"portal-without-terminator" + b"y" * (300 * 1024)
    data = b"B" + struct.pack("!I", 4 + len(body)) + body
    _, forwarded, written = _through_relay(data)
    assert forwarded == m.terminate()  # the session is ended, nothing of the Bind was sent
    assert [k for k, _ in frames(written)] == [b"E"]
    assert b"08P01" in written


def test_a_large_error_from_the_database_is_not_decoded() -> None:
    """An error can quote a large value (`select repeat('x', n)::int`): it is held until
    complete and its body is copied once to be read, but its fields other than severity,
    SQLSTATE and context are neither copied nor decoded (4 times its size before)."""

    async def run() -> tuple[float, bytes]:
        session, client, _ = _session()
        client.keep = False
        session.data_received(m.query("SELECT 1"))
        body = b"SERROR\0VERROR\0C22P02\0M" + b"x" * (16 * MIB) + b"\0\0"
        data = b"E" + struct.pack("!I", 4 + len(body)) + body + m.ready_for_query(b"I")
        peak = _traced_peak(data, session._on_upstream_data)
        outcome = next(r for r in session.services.audit.records if r.status)  # type: ignore[attr-defined]
        return peak / len(body), f"{outcome.status} {outcome.sqlstate}".encode()

    ratio, outcome = asyncio.run(run())
    assert outcome == b"error 22P02"
    assert ratio < 2.5, f"peak {ratio:.2f} times the message"
