"""Where dbward's select-only throughput goes: the same load with parts of the work removed.

    python bench/ablation.py [--mode simple] [--reps 3] [--duration 8]

Runs `pgbench -S` against direct PostgreSQL, pgbouncer, a bare uvloop byte relay (the floor
for a Python proxy built like dbward) and dbward variants in which one part of the per-statement
work is made (almost) free by patching the running proxy:

- `dbward`: as shipped (audit durability `batched`);
- `dbward-classify-free`: classification memoized by statement shape (digits ignored), so
  normalizing, the template lookup and building the Statement are skipped;
- `dbward-audit-free`: audit records dropped before the sink (the writer process idles);
- `dbward-both-free`: both.

The patched variants are measuring instruments, not modes of the product: they are loaded
through a `sitecustomize` module on PYTHONPATH that only this script writes. For each target it
prints the median TPS, the ratio to direct, the proxy's CPU per transaction (event loop
user/system, audit writer process) and the idle CPU of the machine. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Target, bench_env, cpu_times, run_pgbench, start_dbward

from fixtures.ports import free_port

# Loaded by every Python process started with PYTHONPATH pointing at its directory.
SITECUSTOMIZE = """
import os
_ablate = os.environ.get("DBWARD_ABLATE", "")
if "classify" in _ablate:
    from dbward.sql import postgres as _sql
    _classify = _sql.PostgresClassifier.classify
    _shapes = {}
    _digits = str.maketrans("", "", "0123456789")
    def _memoized(self, text):
        key = text.translate(_digits)
        found = _shapes.get(key)
        if found is None:
            found = _shapes[key] = _classify(self, text)
        return found
    _sql.PostgresClassifier.classify = _memoized
if "audit" in _ablate:
    from dbward.audit import process as _process
    def _drop(self, record):
        return None
    def _drop_durable(self, record):
        future = self._loop.create_future()
        future.set_result(0)
        return future
    _process.ProcessAuditSink.append = _drop
    _process.ProcessAuditSink.append_durable = _drop_durable
"""

CEILING = Path(__file__).resolve().parent / "ceiling.py"

VARIANTS = {
    "dbward": "",
    "dbward-classify-free": "classify",
    "dbward-audit-free": "audit",
    "dbward-both-free": "classify,audit",
}

TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(x) for x in found.stdout.split()]


def _idle() -> float:
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (values[3] + values[4]) / TICK


def measure(target: Target, mode: str, duration: float) -> dict[str, float]:
    """One pgbench -S run; TPS plus CPU per transaction of the proxy and its writer child."""
    pid = target.pid() if target.name != "direct" else None
    processes = ([pid, *_children(pid)] if pid is not None else [])[:2]
    before = [cpu_times(p) or (0.0, 0.0) for p in processes]
    idle0, t0 = _idle(), time.monotonic()
    result = run_pgbench(target, ["-S", "-M", mode], duration)
    wall = time.monotonic() - t0
    out = {"tps": result["tps"], "idle_cores": (_idle() - idle0) / wall}
    transactions = result["tps"] * wall
    for label, p, (user0, sys0) in zip(("loop", "writer"), processes, before, strict=False):
        user1, sys1 = cpu_times(p) or (user0, sys0)
        out[f"{label}_user_us"] = (user1 - user0) / transactions * 1e6
        out[f"{label}_sys_us"] = (sys1 - sys0) / transactions * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="simple", choices=("simple", "extended", "prepared"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8)
    args = parser.parse_args(argv)
    site = Path(tempfile.mkdtemp(prefix="dbward-ablation-"))
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    with bench_env(durabilities=()) as env:
        password = "ablation-pw-1"
        for name, ablate in VARIANTS.items():
            extra = {"PYTHONPATH": str(site), "DBWARD_ABLATE": ablate}
            target = start_dbward(env.work, env.pg, password, "batched", name=name, extra_env=extra)
            env.targets[name] = target
        port = free_port()
        relay = subprocess.Popen(
            # ceiling.py's bytes-only relay: asyncio Protocols on uvloop, like dbward.
            [sys.executable, str(CEILING), "--relay", str(env.direct.port), str(port), "bare", ""]
        )
        time.sleep(1.0)
        direct = env.direct
        env.targets["bare-relay"] = Target(
            "bare-relay", "127.0.0.1", port, direct.user, direct.password, process=relay
        )
        order = ["direct", "pgbouncer", "bare-relay", *VARIANTS]
        print_table(alternate(env.targets, order, args.mode, args.reps, args.duration), args)
    return 0


def alternate(
    targets: dict[str, Target], order: list[str], mode: str, reps: int, duration: float
) -> dict[str, list[dict[str, float]]]:
    """Measure every target once per repetition, each repetition starting one further along."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    for rep in range(reps):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            sample = measure(targets[name], mode, duration)
            samples[name].append(sample)
            print(f"rep {rep + 1} {name}: {sample['tps']:,.0f} tps", file=sys.stderr)
    return samples


def medians(samples: list[dict[str, float]]) -> tuple[float, str, str, float]:
    """One target's median TPS, loop CPU ("u + s" µs per transaction), writer CPU, idle cores."""

    def median(key: str) -> float | None:
        values = [s[key] for s in samples if key in s]
        return statistics.median(values) if values else None

    user, system = median("loop_user_us"), median("loop_sys_us")
    loop = f"{user:.1f} u + {system:.1f} s" if user is not None and system is not None else "-"
    writer_user, writer_sys = median("writer_user_us"), median("writer_sys_us")
    writer = "-"
    if writer_user is not None and writer_sys is not None:
        writer = f"{writer_user + writer_sys:.1f}"
    return median("tps") or 0.0, loop, writer, median("idle_cores") or 0.0


def print_table(samples: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    direct = medians(samples["direct"])[0] or 1.0
    print(f"\npgbench -S -M {args.mode}, -c 8 -j 2, {args.reps} x {args.duration:g} s, medians")
    print(f"{'target':22} {'TPS':>8} {'/direct':>8} {'loop us/txn':>16} {'writer':>7} {'idle':>6}")
    for name, runs in samples.items():
        tps, loop, writer, idle = medians(runs)
        print(f"{name:22} {tps:8,.0f} {tps / direct:8.2f} {loop:>16} {writer:>7} {idle:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
