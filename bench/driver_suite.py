"""Run asyncpg's own test suite directly against PostgreSQL and through dbward, and diff.

Usage:

    pip download --no-binary :all: --no-deps asyncpg==0.32.0 -d /tmp/r60   # the installed version
    tar xzf /tmp/r60/asyncpg-0.32.0.tar.gz -C /tmp/r60
    python bench/driver_suite.py --suite /tmp/r60/asyncpg-0.32.0 --out /tmp/r60/out
    python bench/driver_suite.py --suite ... --out ... -k test_copy    # a subset (pytest -k)

One throwaway PostgreSQL per run (the test fixture's cluster, run as the unprivileged
`dbward-test` user) and, for the second run, one `dbward serve` in front of it (audit
`durability: strict` unless `--durability batched`, the built-in guards, every other setting
at its default). Both runs log in as `postgres`: directly with SCRAM over TCP as the
superuser, through dbward as the local user `postgres`, which dbward takes to the database
as its service user `postgres` (the same superuser), so the two runs see the same role.

asyncpg's suite targets a running server when PGHOST is set (asyncpg/_testbase:
`RunningCluster`, reached through PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE; `--pghost`
does that), but then skips the tests that put its own fuzzing TCP proxy in front of the
server. By default a conftest.py written into the copy of the tests makes the running server
the suite's default cluster instead, with PGHOST unset, and those run too. The tests are
copied out of the sdist, so the installed (compiled) asyncpg is what they import, not the
sdist's uncompiled sources. Test-only dependency: `distro` (test_connect imports it; e.g.
`pip install --target DIR distro` and PYTHONPATH=DIR).

Writes `<out>/direct.xml` and `<out>/dbward.xml` (JUnit), `<out>/*.log` (pytest output) and
`<out>/diff.txt`: every test whose outcome differs, and the counts. Tests that build clusters
of their own (HotStandbyTestCase, test_connect's auth-method clusters, `new_cluster`) run
initdb as the current user; as root they fail (or are skipped) in both runs alike.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import _stop_process, _wait_port  # noqa: E402

from dbward.wire.postgres.scram import make_verifier  # noqa: E402
from fixtures.ports import free_port  # noqa: E402
from fixtures.postgres import _clean_env, start_pg_server, stop_pg_server  # noqa: E402
from fixtures.tls import TestCA, make_test_ca  # noqa: E402

ROLE = "postgres"  # the superuser both runs log in as (through dbward: the service user)

# Settings of asyncpg's own ClusterTestCase.get_server_settings, and what some tests need.
PG_SETTINGS = ("jit = off", "max_prepared_transactions = 10")


# Without PGHOST asyncpg's suite would init a cluster of its own; with it, it skips the tests
# that put its fuzzing TCP proxy in front of the server (test_adversity, the termination
# listener). This makes the running server its default cluster, with PGHOST unset.
_CONFTEST = """\
import os

from asyncpg import _testbase, cluster

_testbase._default_cluster = cluster.RunningCluster(
    host="127.0.0.1",
    port=int(os.environ["DBWARD_SUITE_PORT"]),
    user=os.environ["DBWARD_SUITE_USER"],
    password=os.environ["DBWARD_SUITE_PASSWORD"],
    database="postgres",
    **({"ssl": "require"} if os.environ.get("DBWARD_SUITE_TLS") else {}),
)
"""


def _outcomes(path: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from a JUnit XML file."""
    result: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag if child.tag != "failure" else "failed"
                break
        # A test can be reported twice (a teardown error after a pass): the worse one wins.
        if result.get(name) in (None, "passed", "skipped"):
            result[name] = outcome
    return result


def _run_suite(
    tests: Path, out: Path, label: str, port: int, password: str, args: argparse.Namespace
) -> dict[str, str]:
    if args.pghost:
        env = _clean_env() | {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(port),
            "PGUSER": ROLE,
            "PGPASSWORD": password,
            "PGDATABASE": "postgres",
        }
    else:
        (tests / "conftest.py").write_text(_CONFTEST)
        env = _clean_env() | {
            "DBWARD_SUITE_PORT": str(port),
            "DBWARD_SUITE_USER": ROLE,
            "DBWARD_SUITE_PASSWORD": password,
        }
        if args.tls:
            env["DBWARD_SUITE_TLS"] = "1"
    xml = out / f"{label}.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        f"--timeout={args.timeout}",
        f"--junitxml={xml}",
        "--import-mode=importlib",
        "--tb=short",
        str(tests),
    ]
    if args.k:
        cmd += ["-k", args.k]
    print(f"running the suite {label}: {' '.join(cmd)}", flush=True)
    with (out / f"{label}.log").open("wb") as log:
        # cwd: the copy's parent, so `import asyncpg` finds the installed package.
        subprocess.run(
            cmd, check=False, cwd=tests.parent, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return _outcomes(xml)


def _start_dbward(
    work: Path, pg_port: int, password: str, durability: str, ca: TestCA | None
) -> tuple[subprocess.Popen[bytes], int]:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    password_file = work / "upstream-password"
    password_file.write_text(password)
    password_file.chmod(0o600)
    port = free_port()
    config = {
        "audit": {"path": str(work / "audit.db"), "durability": durability},
        "users": [{"name": ROLE, "password_verifier": make_verifier(password)}],
        "listeners": [
            {
                "name": "suite",
                "listen": f"127.0.0.1:{port}",
                "tls": (
                    {
                        "mode": "optional",
                        "cert_file": str(ca.server_cert),
                        "key_file": str(ca.server_key),
                    }
                    if ca is not None
                    else {"mode": "disabled"}
                ),
                "upstream": {
                    "host": "127.0.0.1",
                    "port": pg_port,
                    "database": "postgres",
                    "user": ROLE,
                    "password_file": str(password_file),
                    "tls": (
                        {"mode": "verify-full", "ca_file": str(ca.ca_cert)}
                        if ca is not None
                        else {"mode": "disable"}
                    ),
                },
            }
        ],
        "shutdown_grace_s": 1,
    }
    (work / "dbward.yaml").write_text(yaml.safe_dump(config))
    log = work / "dbward.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbward", "serve", "--config", str(work / "dbward.yaml")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    _wait_port(port, proc, log, "dbward")
    return proc, port


def _diff(direct: dict[str, str], proxied: dict[str, str]) -> str:
    lines = []
    for name in sorted(direct.keys() | proxied.keys()):
        a, b = direct.get(name, "absent"), proxied.get(name, "absent")
        if a != b:
            lines.append(f"{a:>8} -> {b:<8} {name}")

    def count(r: dict[str, str], what: str) -> int:
        return sum(1 for v in r.values() if v == what)

    summary = [
        f"{'':10}{'passed':>8}{'failed':>8}{'error':>8}{'skipped':>8}",
        *(
            f"{label:10}"
            + "".join(f"{count(r, w):>8}" for w in ("passed", "failed", "error"))
            + f"{count(r, 'skipped'):>8}"
            for label, r in (("direct", direct), ("dbward", proxied))
        ),
        f"passed directly, not through dbward: "
        f"{sum(1 for n, v in direct.items() if v == 'passed' and proxied.get(n) != 'passed')}",
    ]
    return "\n".join([*summary, "", *lines]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, required=True, help="unpacked asyncpg sdist")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=int, default=120, help="per-test timeout (s)")
    parser.add_argument("-k", default="", help="pytest -k expression")
    parser.add_argument(
        "--pghost",
        action="store_true",
        help="select the server with PGHOST/PGPORT/... as asyncpg documents (skips 10 more)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS everywhere: clients connect with ssl='require', dbward verifies PostgreSQL",
    )
    parser.add_argument("--durability", choices=("strict", "batched"), default="strict")
    parser.add_argument("--only", choices=("direct", "dbward"), default=None)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, str]] = {}
    for label in ("direct", "dbward"):
        if args.only in (None, label):
            results[label] = _run_target(label, args)
    if len(results) == 2:
        text = _diff(results["direct"], results["dbward"])
        (args.out / "diff.txt").write_text(text)
        print(text)


def _run_target(label: str, args: argparse.Namespace) -> dict[str, str]:
    """One run on a cluster of its own, so neither run sees what the other left behind."""
    work = Path(tempfile.mkdtemp(prefix="dbward-suite-"))
    tests = work / "suite" / "tests"
    shutil.copytree(args.suite / "tests", tests)
    ca = make_test_ca(work / "ca") if args.tls else None
    pg, base = start_pg_server(ca, settings=PG_SETTINGS)
    proc = None
    try:
        password = secrets.token_urlsafe(18)
        pg.psql(f"ALTER ROLE {ROLE} PASSWORD '{password}'", dbname="postgres")
        print(f"{label}: PostgreSQL {pg.server_version} on port {pg.port}", flush=True)
        port = pg.port
        if label == "dbward":
            proc, port = _start_dbward(work / "dbward", pg.port, password, args.durability, ca)
        try:
            return _run_suite(tests, args.out, label, port, password, args)
        finally:
            if proc is not None:
                shutil.copy(work / "dbward" / "dbward.log", args.out / "dbward-server.log")
            shutil.copy(pg.log_file, args.out / f"postgres-{label}.log")
    finally:
        _stop_process(proc)
        stop_pg_server(pg, base)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
