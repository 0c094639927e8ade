"""One client's pipeline cannot hold the event loop that serves every session.

Round 63: a socket read brings up to 256 KB, and every message in it was handled before the
loop could serve anyone else: 6,500 Parse/Bind/Execute triples took 0.4 s, and a client
pipelining without end made the other clients' SELECT 1 take up to 3.5 s. Past
_MESSAGES_PER_TURN messages the rest of the read waits, in order, for the loop's next turn.
"""

from __future__ import annotations

import asyncio

from dbward.audit.sink import MemorySink
from dbward.relay.postgres import _MESSAGES_PER_TURN
from dbward.wire.postgres import messages as m
from fixtures.detached import detached_session

TRIPLE = m.parse_message("", "SELECT 1") + m.bind_message("", "", []) + m.execute_message("")


def test_a_long_read_is_handled_over_several_turns_in_order() -> None:
    triples = _MESSAGES_PER_TURN  # three messages each: three turns' worth
    data = TRIPLE * triples + m.sync()

    async def run() -> tuple[int, bool, int, bytes, bool]:
        session, client, upstream = detached_session(MemorySink())
        session.data_received(data)
        first_turn = len(upstream.written)
        paused = not client.reading
        turns = 1
        while session._inbox:
            await asyncio.sleep(0)
            turns += 1
            assert turns < 100
        return first_turn, paused, turns, bytes(upstream.written), client.reading

    first_turn, paused, turns, forwarded, reading = asyncio.run(run())
    # The first turn handled _MESSAGES_PER_TURN messages and stopped reading the client.
    assert first_turn == len(TRIPLE) * (_MESSAGES_PER_TURN // 3) + len(
        TRIPLE[: len(m.parse_message("", "SELECT 1"))]
    )
    assert paused
    assert turns >= 3
    # Everything went through, in order, and the client is read again.
    assert forwarded == data
    assert reading


def test_copy_data_does_not_count_toward_a_turn() -> None:
    """COPY data only passes through: a read of many CopyData messages is not split."""
    session, client, upstream = detached_session(MemorySink())
    session._copying = True
    rows = m.copy_data(b"row\n") * (_MESSAGES_PER_TURN * 3)
    session.data_received(rows)
    assert bytes(upstream.written) == rows
    assert client.reading
