"""dbward end-to-end benchmarks: pgbench ratios, 1M-row throughput, connection rate.

    python bench/run.py [--quick] [--reps N] [--duration S] [--out bench/results/X.json]

Starts its own PostgreSQL, pgbouncer and dbward processes (see harness.py), alternates the
targets within every repetition (rotating the order), prints medians and ratios and writes
the raw numbers as JSON. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DBNAME,
    ROOT,
    ROWS,
    ROWS_TABLE,
    BenchEnv,
    Target,
    bench_env,
    cpu_seconds,
    run_pgbench,
)

MODES = ("simple", "extended", "prepared")
ROWS_FETCHES = 3  # 1M-row fetches per target per repetition (each one is a sample)
GROUPS = ("select", "tpcb", "rows", "conn")

# What the lead must hit (policy and audit on).
GOALS = {
    "select": {"dbward/direct": 0.45, "dbward/pgbouncer": 0.70},
    "tpcb": {"batched/direct": 0.45, "batched/pgbouncer": 0.70},
    "rows": {"dbward/direct": 0.75},
}

RAW = dict[str, dict[str, list[dict[str, float]]]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotated(items: list[Target], rep: int) -> list[Target]:
    k = rep % len(items)
    return items[k:] + items[:k]


def reset_tpcb(env: BenchEnv) -> None:
    """What pgbench does before a run without -n, done the same way for every target."""
    env.sql(
        "VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history;",
    )


def run_rows(target: Target, query: str) -> dict[str, float]:
    """Wall time of psql fetching 1M rows to /dev/null (psql buffers, formats in C)."""
    sql = {
        "copy": f"COPY (SELECT g, m FROM {ROWS_TABLE}) TO STDOUT",
        "select": f"SELECT g, m FROM {ROWS_TABLE}",
    }[query]
    cmd = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *target.libpq_args()]
    cmd += ["-d", DBNAME, "-o", "/dev/null", "-c", sql]
    pid = target.pid() if target.name != "direct" else None
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=target.env(), timeout=600, check=False
    )
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds(pid)
    if proc.returncode != 0:
        raise RuntimeError(f"psql failed against {target.name}: {proc.stderr[-2000:]}")
    result = {"seconds": wall, "rows_per_s": ROWS / wall}
    if cpu0 is not None and cpu1 is not None:
        result["proxy_cpu_s"] = cpu1 - cpu0
    return result


def run_connect(target: Target, duration: float, limit: int = 2000) -> dict[str, float]:
    """Sequential psycopg connect + SELECT 1 + close, for `duration` s or `limit` times."""
    import psycopg

    info = target.conninfo()
    count = 0
    t0 = time.perf_counter()
    deadline = t0 + duration
    while count < limit and time.perf_counter() < deadline:
        with psycopg.connect(**info, connect_timeout=10) as conn:  # type: ignore[arg-type]
            conn.execute("SELECT 1").fetchone()
        count += 1
    elapsed = time.perf_counter() - t0
    return {"connections": count, "seconds": elapsed, "conn_per_s": count / elapsed}


def measure(env: BenchEnv, reps: int, duration: float, groups: set[str]) -> RAW:
    raw: RAW = {}
    t = env.targets
    proxies = [x for x in ("pgbouncer", "dbward-strict") if x in t]
    select_targets = [t["direct"], *(t[x] for x in proxies)]
    tpcb_targets = [
        t[x] for x in ("direct", "pgbouncer", "dbward-batched", "dbward-strict") if x in t
    ]
    conn_duration = min(duration, 5.0)

    def record(name: str, target: Target, fn: Callable[[], dict[str, float]]) -> None:
        result = fn()
        raw.setdefault(name, {}).setdefault(target.name, []).append(result)
        shown = {k: round(v, 3) for k, v in result.items()}
        log(f"  {name:<18} {target.name:<15} {shown}")

    log("warm-up (not recorded): caches, pools, first-connection costs")
    for target in t.values():
        run_pgbench(target, ["-S"], 2)
        if "rows" in groups and target in select_targets:
            run_rows(target, "copy")
    for rep in range(reps):
        log(f"repetition {rep + 1}/{reps}")
        if "select" in groups:
            for mode in MODES:
                for target in rotated(select_targets, rep):
                    record(
                        f"select-{mode}",
                        target,
                        lambda target=target, mode=mode: run_pgbench(
                            target, ["-S", "-M", mode], duration
                        ),
                    )
        if "tpcb" in groups:
            for mode in MODES:
                for target in rotated(tpcb_targets, rep):
                    reset_tpcb(env)
                    record(
                        f"tpcb-{mode}",
                        target,
                        lambda target=target, mode=mode: run_pgbench(
                            target, ["-M", mode], duration
                        ),
                    )
        if "rows" in groups:
            # A fetch takes well under a second, so background work (autovacuum after the
            # TPC-B runs, a checkpoint) shows: settle first, and take ROWS_FETCHES per rep.
            env.sql("CHECKPOINT;")
            time.sleep(1)
            for query in ("copy", "select"):
                for _ in range(ROWS_FETCHES):
                    for target in rotated(select_targets, rep):
                        record(
                            f"rows-{query}",
                            target,
                            lambda target=target, query=query: run_rows(target, query),
                        )
        if "conn" in groups:
            for target in rotated(select_targets, rep):
                record(
                    "conn-psycopg",
                    target,
                    lambda target=target: run_connect(target, conn_duration),
                )
            for target in rotated(select_targets, rep):
                record(
                    "conn-pgbench-C",
                    target,
                    lambda target=target: run_pgbench(target, ["-C", "-S"], conn_duration),
                )
    return raw


METRIC = {
    "select": "tps",
    "tpcb": "tps",
    "rows": "rows_per_s",
    "conn-psycopg": "conn_per_s",
    "conn-pgbench-C": "tps",
}


def metric_of(workload: str) -> str:
    return METRIC.get(workload) or METRIC[workload.split("-", maxsplit=1)[0]]


def summarise(raw: RAW) -> dict[str, Any]:
    """Medians per workload and target, and the ratios the goals talk about."""
    summary: dict[str, Any] = {}
    for workload, per_target in raw.items():
        metric = metric_of(workload)
        med = {
            name: statistics.median(r[metric] for r in results)
            for name, results in per_target.items()
        }
        cpu = {
            name: statistics.median(r["proxy_cpu_util"] for r in results)
            for name, results in per_target.items()
            if all("proxy_cpu_util" in r for r in results)
        }

        def ratio(a: str, b: str, med: dict[str, float] = med) -> float | None:
            return round(med[a] / med[b], 3) if a in med and b in med and med[b] else None

        ratios: dict[str, float | None] = {}
        if workload.startswith("tpcb"):
            ratios["batched/direct"] = ratio("dbward-batched", "direct")
            ratios["batched/pgbouncer"] = ratio("dbward-batched", "pgbouncer")
            ratios["strict/direct"] = ratio("dbward-strict", "direct")
            ratios["strict/pgbouncer"] = ratio("dbward-strict", "pgbouncer")
        else:
            ratios["dbward/direct"] = ratio("dbward-strict", "direct")
            ratios["dbward/pgbouncer"] = ratio("dbward-strict", "pgbouncer")
        ratios["pgbouncer/direct"] = ratio("pgbouncer", "direct")
        spread = {
            name: round(
                (max(r[metric] for r in results) - min(r[metric] for r in results))
                / med[name]
                * 100,
                1,
            )
            for name, results in per_target.items()
            if med[name]
        }
        summary[workload] = {
            "metric": metric,
            "median": med,
            "spread_pct": spread,
            "ratios": ratios,
            "proxy_cpu_util": cpu,
        }
    return summary


def goal_check(workload: str, ratios: dict[str, float | None]) -> str:
    goals = GOALS.get(workload.split("-", maxsplit=1)[0], {})
    if not goals:
        return ""
    misses = [k for k, want in goals.items() if (ratios.get(k) or 0) < want]
    return "ok" if not misses else "MISS " + ",".join(misses)


def print_table(summary: dict[str, Any]) -> None:
    cols = ["direct", "pgbouncer", "dbward-batched", "dbward-strict"]
    head = f"{'workload':<16}{'metric':<11}" + "".join(f"{c:>15}" for c in cols)
    print(head + f"{'spread%':>9}   ratios of medians")
    print("-" * (len(head) + 60))
    for workload, s in summary.items():
        cells = "".join(
            f"{s['median'][c]:>15.1f}" if c in s["median"] else f"{'-':>15}" for c in cols
        )
        ratios = "  ".join(f"{k}={v:.2f}" for k, v in s["ratios"].items() if v is not None)
        check = goal_check(workload, s["ratios"])
        spread = max(s["spread_pct"].values(), default=0.0)
        print(f"{workload:<16}{s['metric']:<11}{cells}{spread:>9.0f}   {ratios}  {check}")
    print("(spread%: largest (max - min) / median over the samples of any one target)")
    print()
    print("proxy CPU (cores busy during the run, median):")
    for workload, s in summary.items():
        if s["proxy_cpu_util"]:
            print(
                f"  {workload:<16}"
                + "  ".join(f"{k}={v:.2f}" for k, v in s["proxy_cpu_util"].items())
            )


def machine_info(env: BenchEnv) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        rev = ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": os.uname().release,
        "git_head": rev,
        **env.versions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 reps x 3 s")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--duration", type=float, default=None, help="pgbench -T (default 10)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated subset of {','.join(GROUPS)}",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    duration = args.duration or (3.0 if args.quick else 10.0)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = groups - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    started = dt.datetime.now(dt.UTC)
    out = args.out or ROOT / "bench" / "results" / f"{started:%Y%m%dT%H%M%SZ}.json"

    with bench_env(scale=args.scale) as env:
        log(f"targets: {', '.join(f'{n}:{t.port}' for n, t in env.targets.items())}")
        raw = measure(env, reps, duration, groups)
        machine = machine_info(env)
    summary = summarise(raw)
    print()
    print(
        f"dbward bench: {reps} reps x {duration:g} s, pgbench -c 8 -j 2, scale {args.scale}, "
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), PostgreSQL {machine['postgresql']}"
    )
    print_table(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": started.isoformat(),
                "params": {
                    "reps": reps,
                    "duration_s": duration,
                    "scale": args.scale,
                    "clients": 8,
                    "threads": 2,
                    "rows": ROWS,
                    "groups": sorted(groups),
                },
                "machine": machine,
                "summary": summary,
                "raw": raw,
            },
            indent=2,
        )
    )
    print(f"\nraw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
