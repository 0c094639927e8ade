"""CPU instructions per pgbench transaction of the relay's Python, counted by cachegrind.

Wall-clock figures from relay_micro.py move with the machine's load; instruction counts do not.
Each mode runs twice under `valgrind --tool=cachegrind --cache-sim=no`, building the same
`--total` requests and feeding the first `--n1`, then the first `--n2` of them to a session:
start-up, the requests' building and first-run costs are the same in both runs, so
(Ir(n2) - Ir(n1)) / (n2 - n1) is what one more transaction costs. PYTHONHASHSEED is fixed so
that string hashing (dict and set layouts) is the same in every run.
Run: .venv/bin/python bench/relay_ir.py [--modes simple,extended,prepared] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def count(mode: str, total: int, fed: int) -> int:
    """Instructions of one child run feeding `fed` of `total` requests of `mode`."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            mode,
            str(total),
            str(fed),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{result.stderr}")
    return int(found.group(1).replace(",", ""))


def child(mode: str, total: int, fed: int) -> None:
    sys.path.insert(0, str(HERE))
    from relay_micro import feed, workload

    session, _, requests, reply = workload(total, mode)
    feed(session, requests[:fed], reply)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="simple,extended,prepared")
    parser.add_argument("--n1", type=int, default=1000)
    parser.add_argument("--n2", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode; the median is shown")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        per_txn = [
            (count(mode, args.n2, args.n2) - count(mode, args.n2, args.n1)) / (args.n2 - args.n1)
            for _ in range(args.repeat)
        ]
        spread = f" (runs: {', '.join(f'{x:,.0f}' for x in per_txn)})" if args.repeat > 1 else ""
        print(f"{mode:9s} {statistics.median(per_txn):9,.0f} instructions per transaction{spread}")


if __name__ == "__main__":
    main()
