"""Profile a running dbward with py-spy under benchmark load; print where the time goes.

    python bench/profile_proxy.py [--duration 10] [--rate 250] [--workloads a,b,...]
                                  [--top 25] [--out-dir DIR] [--flamegraph]

Workloads: select-simple (pgbench -S -M simple), select-extended, select-prepared,
tpcb-batched / tpcb-strict (TPC-B-like, -M simple, against dbward with that durability),
rows-select / rows-copy (1M rows fetched by psql in a loop).

For each workload it records `py-spy record --format raw` (collapsed stacks) of the dbward
process, then prints the top functions by self time (leaf samples) and by inclusive time
(samples where the function is anywhere on the stack). The raw files stay in --out-dir; feed
them to flamegraph.pl / speedscope, or pass --flamegraph for an SVG per workload as well (a
second recording pass). Needs `pip install py-spy` and root or CAP_SYS_PTRACE.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, BenchEnv, Target, bench_env, cpu_seconds
from run import run_rows

WORKLOADS = {
    "select-simple": ("dbward-strict", ["-S", "-M", "simple"]),
    "select-extended": ("dbward-strict", ["-S", "-M", "extended"]),
    "select-prepared": ("dbward-strict", ["-S", "-M", "prepared"]),
    "tpcb-batched": ("dbward-batched", ["-M", "simple"]),
    "tpcb-strict": ("dbward-strict", ["-M", "simple"]),
    "rows-select": ("dbward-strict", "select"),
    "rows-copy": ("dbward-strict", "copy"),
}
DEFAULT = "select-simple,rows-select,tpcb-batched"

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install py-spy (into the venv)")
    return found


def short_file(path: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def frame_key(frame: str, *, with_line: bool = False) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    where = short_file(m.group("file"))
    if with_line and m.group("line"):
        where += f":{m.group('line')}"
    return f"{m.group('func')} ({where})"


def analyse(raw: Path, top: int) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_fn: collections.Counter[str] = collections.Counter()
    self_line: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_fn[frame_key(frames[-1])] += count
        self_line[frame_key(frames[-1], with_line=True)] += count
        for key in {frame_key(f) for f in frames}:
            incl[key] += count
    if not total:
        return "  (no samples: was dbward busy? py-spy needs root or CAP_SYS_PTRACE)\n"
    out = [f"  {total} busy samples\n  top by self time:"]
    out += [f"    {n / total:6.1%}  {k}" for k, n in self_fn.most_common(top)]
    out.append("  top lines by self time:")
    out += [f"    {n / total:6.1%}  {k}" for k, n in self_line.most_common(min(top, 15))]
    out.append("  top dbward/asyncio functions by inclusive time:")
    picked = [
        (k, n)
        for k, n in incl.most_common()
        if ("dbward/" in k or "asyncio" in k or "uvloop" in k or "sqlite" in k)
        and "<module>" not in k
    ]
    out += [f"    {n / total:6.1%}  {k}" for k, n in picked[:top]]
    return "\n".join(out) + "\n"


def _load(env: BenchEnv, target: Target, workload: str, seconds: float) -> subprocess.Popen[str]:
    spec = WORKLOADS[workload][1]
    cmd = ["pgbench", "-n", *target.libpq_args(), "-c", "8", "-j", "2"]
    cmd += ["-T", str(int(seconds)), *spec, "app"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=target.env()
    )


def profile_one(
    env: BenchEnv,
    workload: str,
    duration: float,
    rate: int,
    out: Path,
    fmt: str,
    extra: tuple[str, ...] = (),
) -> tuple[Path, str]:
    target = env.targets[WORKLOADS[workload][0]]
    pid = target.pid()
    suffix = {"raw": "txt", "flamegraph": "svg"}[fmt]
    path = out / f"{workload}.{suffix}"
    spy = [py_spy(), "record", "--pid", str(pid), "--duration", str(int(duration))]
    spy += ["--rate", str(rate), "--format", fmt, "--output", str(path), *extra]
    if "--native" not in extra:
        spy.append("--nonblocking")  # py-spy cannot unwind native stacks without pausing
    note = ""
    if workload.startswith("tpcb"):
        env.sql("VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history;")
    if workload.startswith("rows"):
        query = str(WORKLOADS[workload][1])
        stop = threading.Event()
        times: list[float] = []

        def loop() -> None:
            deadline = time.monotonic() + duration + 30
            while not stop.is_set() and time.monotonic() < deadline:
                times.append(run_rows(target, query)["seconds"])

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        time.sleep(0.5)
        cpu0 = cpu_seconds(pid)
        subprocess.run(spy, check=True, capture_output=True, timeout=duration + 60)
        cpu1 = cpu_seconds(pid)
        stop.set()
        worker.join(timeout=120)
        if times:
            note = f"{len(times)} fetches, median {sorted(times)[len(times) // 2]:.2f} s"
    else:
        load = _load(env, target, workload, duration + 4)
        time.sleep(2)
        cpu0 = cpu_seconds(pid)
        subprocess.run(spy, check=True, capture_output=True, timeout=duration + 60)
        cpu1 = cpu_seconds(pid)
        stdout, _ = load.communicate(timeout=duration + 120)
        m = re.search(r"^tps = ([0-9.]+)", stdout, re.M)
        note = f"tps {float(m.group(1)):.0f} (while sampled)" if m else "pgbench failed"
    if cpu0 is not None and cpu1 is not None:
        note += f"; dbward CPU {(cpu1 - cpu0) / duration:.2f} cores"
    return path, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per recording")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--native", action="store_true", help="include C frames (uvloop, sqlite3, kernel calls)"
    )
    parser.add_argument("--gil", action="store_true", help="only sample the thread holding the GIL")
    parser.add_argument("--workloads", default=DEFAULT, help=f"from {','.join(WORKLOADS)}")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--flamegraph", action="store_true", help="also record an SVG each")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        parser.error(f"unknown workloads: {', '.join(bad)}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out_dir or ROOT / "bench" / "results" / f"profile-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    py_spy()
    report: list[str] = []
    with bench_env(pgbouncer=False) as env:
        for name, target in env.targets.items():
            if name != "direct":
                run_rows(target, "copy")  # warm-up
        for workload in workloads:
            print(f"[profile] {workload} for {args.duration:g} s", file=sys.stderr, flush=True)
            extra = tuple(f for f, on in (("--native", args.native), ("--gil", args.gil)) if on)
            raw, note = profile_one(env, workload, args.duration, args.rate, out, "raw", extra)
            section = f"== {workload}: {note}\n{analyse(raw, args.top)}"
            print(section, flush=True)
            report.append(section)
            if args.flamegraph:
                profile_one(env, workload, args.duration, args.rate, out, "flamegraph", extra)
    (out / "report.txt").write_text("\n".join(report))
    print(f"raw stacks and report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
