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


def test_long_names_through_dbward_match_postgres_or_are_refused(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """Statement and portal names of 63 bytes (PostgreSQL keeps them whole) and of 64 sharing
    those 63 (one name to PostgreSQL, refused by dbward with 42622): no difference."""
    direct = fz.Endpoint(pg_server.port, pg_server.service_user, pg_server.service_password)
    proxied = fz.Endpoint(proxy.port, "alice", USERS["alice"][0])
    refused = 0
    for seed in range(4821, 4821 + 60):
        groups = fz.generate(random.Random(seed), long_names=True)
        verdict = fz.check(direct, proxied, groups)
        assert verdict.difference is None, (seed, verdict.difference.describe())
        refused += verdict.refused is not None and "C=42622" in verdict.refused
    assert refused > 0


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


def _both(proxy: Proxy, pg_server: PgServer, sequence: list[bytes]) -> tuple[fz.Outcome, ...]:
    """The sequence's replies from PostgreSQL directly and through dbward (normalized: the
    source file, line and routine fields of errors aside)."""
    direct = fz.Endpoint(pg_server.port, pg_server.service_user, pg_server.service_password)
    proxied = fz.Endpoint(proxy.port, "alice", USERS["alice"][0])
    units = [(str(i), data) for i, data in enumerate(sequence)]
    return tuple(fz.run_one(endpoint, units, timeout=10) for endpoint in (direct, proxied))


def test_a_describe_of_the_unnamed_portal_after_a_refused_query_matches_postgresql(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """Found by the fuzzer (seed 530331). PostgreSQL runs a Query's statement in the unnamed
    portal; the EXECUTE fails there (no such prepared statement), and in a transaction block
    the failed portal stays: a Describe of it answers NoData. dbward refuses the EXECUTE (the
    statement was not prepared through it); its stand-in failed to parse, so PostgreSQL never
    made the portal and answered 34000. The stand-in now fails as it runs, like the EXECUTE."""
    sequence = [
        m.query("BEGIN"),
        m.query("EXECUTE q2(7)"),
        m.describe_message("P", ""),
        m.sync(),
    ]
    direct, proxied = _both(proxy, pg_server, sequence)
    assert ("n", "") in direct.replies, direct.replies  # NoData
    verdict = fz.compare(direct, proxied)
    assert verdict.difference is None and verdict.refused is None, (direct, proxied)
    refusals = [reply for reply in proxied.replies if fz._is_refusal(reply)]
    assert len(refusals) == 1 and "C=26000" in direct.replies[2], proxied.replies
    assert proxied.replies[3:] == direct.replies[3:]


def test_an_execute_of_a_portal_whose_bind_failed_matches_postgresql(
    proxy: Proxy, pg_server: PgServer
) -> None:
    """A Bind that PostgreSQL refused (a bad parameter, the wrong number of them) left no
    portal: an Execute of it in a later sync group gets 34000 from PostgreSQL, named or
    unnamed. dbward refused it as a portal it never saw (42501); it now asks PostgreSQL (a
    Describe of the portal in place of the Execute) and passes its answer on."""
    sequence = [
        m.parse_message("s1", "SELECT $1::int * 2 AS d"),
        m.bind_message("p1", "s1", [b"x"]),  # 22P02
        m.sync(),
        m.execute_message("p1"),
        m.sync(),
        m.bind_message("", "s1", []),  # 08P01: one parameter is needed
        m.sync(),
        m.execute_message("", 1),
        m.sync(),
    ]
    direct, proxied = _both(proxy, pg_server, sequence)
    missing = [reply for reply in direct.replies if "C=34000" in reply]
    assert len(missing) == 2, direct.replies
    assert proxied.replies == direct.replies
