"""Differential protocol fuzzing, long-running: random frontend message sequences sent to
PostgreSQL directly and through dbward, replies compared (see tests/fixtures/protofuzz.py).

    python bench/protocol_fuzz.py --minutes 20 [--seed 1] [--out /tmp/fuzz] [--chunked]
        [--durability batched] [--long-names]

Starts its own throwaway PostgreSQL and dbward. Every difference is shrunk to a minimal
sequence and written to --out (one text file each); the run goes on until the time is up.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import protofuzz as fz  # noqa: E402
from fixtures.postgres import start_pg_server, stop_pg_server  # noqa: E402
from fixtures.proxy import USERS, start_proxy, stop_proxy  # noqa: E402


def _wait_for(endpoint: fz.Endpoint, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            endpoint.connect(5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dbward-fuzz")
    parser.add_argument(
        "--chunked",
        action="store_true",
        help="send through dbward message by message with short random pauses",
    )
    parser.add_argument("--max-groups", type=int, default=14)
    parser.add_argument(
        "--long-names",
        action="store_true",
        help="statement and portal names of 63 bytes, and of 64 that PostgreSQL cuts to those",
    )
    parser.add_argument(
        "--durability",
        choices=["strict", "batched"],
        default="strict",
        help="dbward's audit durability (strict holds writes for their intent record)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pg, base = start_pg_server(None)
    directory = Path(tempfile.mkdtemp(prefix="dbward-fuzz-"))
    audit = {"path": str(directory / "audit.db"), "durability": args.durability}
    proxy = start_proxy(directory, pg, extra={"audit": audit})
    direct = fz.Endpoint(pg.port, pg.service_user, pg.service_password)
    proxied = fz.Endpoint(proxy.port, "alice", USERS["alice"][0])
    deadline = time.monotonic() + args.minutes * 60
    tried = differences = 0
    refusals: Counter[str] = Counter()
    seen: set[str] = set()
    try:
        seed = args.seed
        while time.monotonic() < deadline:
            rng = random.Random(seed)
            groups = fz.generate(rng, args.max_groups, long_names=args.long_names)
            chunker = random.Random(seed) if args.chunked else None
            try:
                verdict = fz.check(direct, proxied, groups, chunked=chunker)
            except fz.NotAnswered as exc:
                print(f"seed {seed}: skipped, {exc}", flush=True)
                seed += 1
                _wait_for(direct)  # a backend that crashed restarts the whole server
                continue
            tried += 1
            if verdict.refused is not None:
                refusals[" ".join(p for p in verdict.refused if p[:2] == "M=")[:90]] += 1
            if verdict.difference is not None:
                differences += 1

                def still_fails(candidate: list[list[fz.Unit]], s: int = seed) -> bool:
                    chunk = random.Random(s) if args.chunked else None
                    verdict = fz.check(direct, proxied, candidate, chunked=chunk)
                    return verdict.difference is not None

                small = fz.shrink(groups, still_fails)
                final = fz.check(direct, proxied, small, chunked=chunker)
                key = fz.render(small)
                if key not in seen:
                    seen.add(key)
                    text = f"seed {seed}\n{key}\n\n" + (
                        final.difference.describe() if final.difference else "(flaky)"
                    )
                    (args.out / f"diff-{seed}.txt").write_text(text + "\n")
                    print(f"DIFFERENCE seed {seed}:\n{text}\n", flush=True)
            if tried % 200 == 0:
                print(f"{tried} sequences, {differences} differences", flush=True)
            seed += 1
    finally:
        stop_proxy(proxy)
        stop_pg_server(pg, base)
    print(
        f"done: {tried} sequences, {differences} differences ({len(seen)} distinct),"
        f" seeds {args.seed}..{seed - 1}"
    )
    for reason, count in refusals.most_common():
        print(f"  stopped at a dbward refusal {count}x: {reason}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
