"""Differential protocol fuzzing, bounded: fixed seeds, each sequence sent to PostgreSQL directly
and through dbward, every reply compared (tests/fixtures/protofuzz.py; the long-running
version is bench/protocol_fuzz.py). A difference is shrunk to a minimal sequence in the
failure message."""

from __future__ import annotations

import random

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
