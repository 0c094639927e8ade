"""A/B: select-only throughput of two dbward source trees in one run, alternating.

    python bench/ab.py --base /tmp/wt-base [--reps 5] [--duration 6] [--modes simple,prepared]

`--base` is another checkout of dbward (e.g. `git worktree add /tmp/wt-base <commit>`); its
`src` is put first on PYTHONPATH of the "base" dbward process, while "new" runs this tree. Both
serve the same PostgreSQL with audit `batched`; each repetition runs them in alternating order,
so drifts of the machine hit both alike. Prints, per pgbench mode, the median TPS, the loop's
CPU per transaction (user + system, µs) and every sample. A change of a few percent is within
the noise of a 2-core machine (see bench/README.md); look at the loop's CPU too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import measure
from harness import bench_env, start_dbward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="the other dbward checkout")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--modes", default="simple,extended,prepared")
    args = parser.parse_args(argv)
    base_src = args.base.resolve() / "src"
    if not (base_src / "dbward" / "__init__.py").is_file():
        parser.error(f"--base: no dbward sources under {base_src}")
    password = "ab-password-1"
    with bench_env(durabilities=()) as env:
        env.targets["base"] = start_dbward(
            env.work,
            env.pg,
            password,
            "batched",
            name="base",
            extra_env={"PYTHONPATH": str(base_src)},
        )
        env.targets["new"] = start_dbward(env.work, env.pg, password, "batched", name="new")
        print(f"pgbench -S -c 8 -j 2, {args.reps} x {args.duration:g} s, audit batched")
        for mode in args.modes.split(","):
            samples: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
            for rep in range(args.reps):
                for name in ("base", "new") if rep % 2 == 0 else ("new", "base"):
                    samples[name].append(measure(env.targets[name], mode, args.duration))
            for name, runs in samples.items():
                tps = statistics.median(s["tps"] for s in runs)
                user = statistics.median(s["loop_user_us"] for s in runs)
                system = statistics.median(s["loop_sys_us"] for s in runs)
                each = ", ".join(f"{s['tps']:,.0f}" for s in runs)
                print(
                    f"{mode:9} {name:5} {tps:8,.0f} TPS  loop {user:5.1f} u + {system:5.1f} s"
                    f"  [{each}]",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
