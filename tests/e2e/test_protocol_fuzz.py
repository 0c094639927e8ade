"""Differential protocol fuzzing, bounded: fixed seeds, each sequence sent to PostgreSQL directly
and through dbward, every reply compared (tests/fixtures/protofuzz.py; the long-running
version is bench/protocol_fuzz.py). A difference is shrunk to a minimal sequence in the
failure message."""

from __future__ import annotations

import random

from dbward.wire.postgres import messages as m
from fixtures import protofuzz as fz
from fixtures.postgres import PgServer
from fixtures.proxy import USERS, Proxy

SEEDS = range(20231, 20231 + 250)


def test_replies_through_dbward_match_postgres(proxy: Proxy, pg_server: PgServer) -> None:
    direct = fz.Endpoint(pg_server.port, pg_server.service_user, pg_server.service_password)
    proxied = fz.Endpoint(proxy.port, "alice", USERS["alice"][0])
    compared = 0
    for seed in SEEDS:
        groups = fz.generate(random.Random(seed))
        verdict = fz.check(direct, proxied, groups)
        if verdict.difference is not None:

            def still_fails(candidate: list[list[fz.Unit]]) -> bool:
                return fz.check(direct, proxied, candidate).difference is not None

            small = fz.shrink(groups, still_fails)
            final = fz.check(direct, proxied, small)
            detail = final.difference.describe() if final.difference else "(did not recur)"
            raise AssertionError(
                f"seed {seed}: dbward answers differently; minimal sequence:\n"
                f"{fz.render(small)}\n{detail}\n(full sequence:\n{fz.render(groups)})"
            )
        if verdict.refused is None:
            compared += 1
    # Most sequences are compared to the end, not cut short by a dbward refusal.
    assert compared > len(SEEDS) // 2, compared


def test_a_sequence_that_crashes_postgresql_is_refused(proxy: Proxy, pg_server: PgServer) -> None:
    """Found by the fuzzer: PostgreSQL 15.20 itself segfaults, directly, on an Execute of the
    unnamed portal after these simple Queries in a failed READ ONLY block (every session of
    the server is cut off while it restarts). Through dbward the Execute never reaches it: no
    portal of that name was bound through dbward, so it is refused as uninspected."""
    import psycopg

    sequence = [
        m.query("END; START TRANSACTION READ ONLY"),
        m.query("CLOSE c1"),  # fails: the block is aborted
        m.query("SELECT count(*) FROM t"),  # fails: in a failed block
        m.execute_message("", 2),
    ]
    with psycopg.connect(pg_server.dsn(), autocommit=True) as bystander:
        proxied = fz.Endpoint(proxy.port, "alice", USERS["alice"][0])
        outcome = fz.run_one(proxied, [(str(i), b) for i, b in enumerate(sequence)], timeout=10)
        assert outcome.ending == "ok", outcome
        refusals = [r for r in outcome.replies if fz._is_refusal(r)]
        assert len(refusals) == 1 and any(
            "could not be inspected and is refused (portal <...> was not seen by dbward)" in part
            for part in refusals[0]
        ), outcome.replies
        # Another session of the server lives on: nothing crashed.
        assert bystander.execute("SELECT 1").fetchone() == (1,)
