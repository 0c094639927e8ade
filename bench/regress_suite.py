"""PostgreSQL's own regression suite run directly and through dbward, outputs compared.

Usage (as root or as a user who may start PostgreSQL; about 2 minutes a run on 2 cores):

    PYTHONPATH=src .venv/bin/python bench/regress_suite.py \\
        /path/to/postgresql-15.x/src/test/regress [--work /tmp/r62] [--serial] \\
        [--schedule FILE] [--setup-direct] [--neutralize AUDIT_DB] [--only a|b]

The argument is the suite's directory (sql/, expected/, data/, parallel_schedule, regress.c), e.g.
from `apt-get source postgresql-15`. Two throwaway clusters of the same kind are started (the
test fixture's, `tests/fixtures/postgres.py`): run (a) is `pg_regress --use-existing` straight
against the first, run (b) against a `dbward serve` in front of the second. Both runs log in as
the superuser `dbward_regress` (in (b) a dbward local user of that name, the service role of the
same name behind it) so `current_user` prints the same. regress.so is built from regress.c when
PostgreSQL's server headers are installed (`postgresql-server-dev-15`); without it the tests
that need it fail the same way on both sides.

`--setup-direct` runs the first test (`test_setup`, which loads the shared tables with
server-side `COPY ... FROM 'file'`, refused by dbward's guard) directly against the second
cluster too, so the remaining tests through dbward start from the same data and differences
are not a cascade of that one refusal.

`--neutralize AUDIT_DB` runs both ways a copy of the suite in which every statement dbward
denied in an earlier run (its audit.db) reads `SELECT 'dbward denied this'`: what still
differs is not a refusal nor its cascade (a refused SET ROLE runs the rest as the superuser),
except for statements psql builds from variables, which cannot be found in the files.

Writes into --work: a/ and b/ (pg_regress output dirs), diffs/<test>.diff (b against a, the
direct run being the reference), dbward/ (config, log, audit.db) and summary.json. Prints the
tests that differ, tracebacks in dbward's log and audit records of kind `unknown`.
Not part of the test command.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dbward.wire.postgres.scram import make_verifier  # noqa: E402
from fixtures.ports import free_port  # noqa: E402
from fixtures.postgres import (  # noqa: E402
    PgServer,
    _ensure_service_user,
    find_bindir,
    start_pg_server,
    stop_pg_server,
)

USER = "dbward_regress"
PASSWORD = "regress-Secret-pw1"
PG_REGRESS = Path("/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress")

# Limits raised for the suite (see the README section): it opens ~20 sessions at once,
# logs in as users dbward does not know (`\c - regress_...`, expected to fail) and keeps
# full statements in the audit log for triage.
LISTENER_LIMITS = {
    "auth_fail_burst": 0,
    "max_connections": 1000,
    "max_unauthenticated_per_host": 1000,
    "cancel_rate_per_s": 10000,
}
AUDIT_LIMITS = {"sql_text_max": 1_048_576}

# What pg_regress's create_database() does when it creates the database itself.
DB_SETUP = """
CREATE ROLE {user} SUPERUSER LOGIN PASSWORD '{password}';
CREATE DATABASE regression TEMPLATE=template0;
ALTER DATABASE regression SET lc_messages TO 'C';
ALTER DATABASE regression SET lc_monetary TO 'C';
ALTER DATABASE regression SET lc_numeric TO 'C';
ALTER DATABASE regression SET lc_time TO 'C';
ALTER DATABASE regression SET bytea_output TO 'hex';
ALTER DATABASE regression SET timezone_abbreviations TO 'Default';
"""


def build_libdir(suite: Path, work: Path) -> Path:
    """regress.so (if server headers exist) plus autoinc/refint from the installation."""
    lib = work / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    pkglib = Path(_pg_config("--pkglibdir") or "/usr/lib/postgresql/15/lib")
    for name in ("autoinc.so", "refint.so"):
        if (pkglib / name).exists():
            shutil.copyfile(pkglib / name, lib / name)
    inc = _pg_config("--includedir-server")
    if inc and (Path(inc) / "postgres.h").exists():
        proc = subprocess.run(
            [
                "cc",
                "-O2",
                "-fPIC",
                "-shared",
                f"-I{inc}",
                "-o",
                str(lib / "regress.so"),
                str(suite / "regress.c"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(f"regress.so not built:\n{proc.stderr[-2000:]}")
    else:
        print("no server headers (postgresql-server-dev-15): regress.so not built")
    for p in lib.iterdir():
        p.chmod(0o755)
    return lib


def _pg_config(flag: str) -> str:
    try:
        return subprocess.run(
            ["pg_config", flag], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def neutralized_suite(suite: Path, audit_db: Path, dest: Path) -> tuple[Path, int, int]:
    """A copy of the suite whose statements dbward denied (per audit_db) read `SELECT ...`.

    Run both ways, the copy shows what differs apart from the refusals and their cascades
    (a refused SET ROLE makes everything after it run as the superuser). Statements whose
    recorded text is not in a file verbatim (psql variables interpolated) stay as they are.
    Returns the copy, the number of denied texts replaced and of those not found.
    """
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(suite, dest, ignore=shutil.ignore_patterns("results", "*.o", "*.so"))
    con = sqlite3.connect(f"file:{audit_db}?mode=ro", uri=True)
    try:
        texts = {
            str(r[0]).rstrip().rstrip(";").rstrip()
            for r in con.execute(
                "SELECT DISTINCT sql_text FROM audit_log WHERE decision = 'deny'"
                " AND rule != 'guard.function_call' AND sql_text != ''"
            )
        }
    finally:
        con.close()
    files = {f: f.read_text() for f in (dest / "sql").glob("*.sql")}
    found = 0
    for text in sorted(texts, key=len, reverse=True):
        pattern = re.compile(r"(?m)(?:^|(?<=;))(\s*)" + re.escape(text) + r"(?=\s*;)")
        hit = False
        for f, body in files.items():
            new, n = pattern.subn(
                lambda m: m.group(1) + "SELECT 'dbward denied this' AS neutralized", body
            )
            if n:
                files[f] = new
                hit = True
        found += hit
    for f, body in files.items():
        f.write_text(body)
    return dest, found, len(texts) - found


def start_cluster() -> tuple[PgServer, Path]:
    pg, base = start_pg_server(None)
    pg.psql(DB_SETUP.format(user=USER, password=PASSWORD), dbname="postgres")
    return pg, base


def run_pg_regress(
    suite: Path,
    out: Path,
    lib: Path,
    port: int,
    schedule: Path,
    *,
    serial: bool,
    tests: list[str] | None = None,
) -> int:
    """pg_regress --use-existing against 127.0.0.1:port; returns its exit code."""
    out.mkdir(parents=True, exist_ok=True)
    # The server (run as the fixture's unprivileged user) writes COPY TO files under it.
    for d in (out, out / "results"):
        d.mkdir(exist_ok=True)
        d.chmod(0o777)
    cmd = [
        str(PG_REGRESS),
        "--use-existing",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--user={USER}",
        f"--inputdir={suite}",
        f"--outputdir={out}",
        f"--bindir={find_bindir()}",
        f"--dlpath={lib}",
    ]
    if tests:
        cmd += tests
    else:
        cmd.append(f"--schedule={schedule}")
    if serial:
        cmd.append("--max-connections=1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = PASSWORD
    with (out / "pg_regress.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    return proc.returncode


def start_dbward(work: Path, pg: PgServer) -> tuple[subprocess.Popen[bytes], int]:
    d = work / "dbward"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    pwfile = d / "upstream-password"
    pwfile.write_text(PASSWORD)
    pwfile.chmod(0o600)
    port = free_port()
    config = {
        "audit": {"path": str(d / "audit.db"), "durability": "strict", **AUDIT_LIMITS},
        "users": [{"name": USER, "password_verifier": make_verifier(PASSWORD)}],
        "listeners": [
            {
                "name": "regress",
                "listen": f"127.0.0.1:{port}",
                **LISTENER_LIMITS,
                "upstream": {
                    "host": pg.host,
                    "port": pg.port,
                    "database": "regression",
                    "user": USER,
                    "password_file": str(pwfile),
                    "tls": {"mode": "disable"},
                },
            }
        ],
        "shutdown_grace_s": 5,
    }
    (d / "dbward.yaml").write_text(yaml.safe_dump(config))
    log = (d / "dbward.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbward", "serve", "--config", str(d / "dbward.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")},
    )
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((d / "dbward.log").read_text())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("dbward did not listen")


def schedule_tests(schedule: Path) -> list[str]:
    tests: list[str] = []
    for line in schedule.read_text().splitlines():
        if line.startswith("test:"):
            tests += line.split()[1:]
    return tests


def compare(work: Path, tests: list[str]) -> dict[str, object]:
    diffs = work / "diffs"
    if diffs.exists():
        shutil.rmtree(diffs)
    diffs.mkdir()
    same: list[str] = []
    differ: list[str] = []
    for t in tests:
        a = work / "a" / "results" / f"{t}.out"
        b = work / "b" / "results" / f"{t}.out"
        la = a.read_text(errors="replace").splitlines(keepends=True) if a.exists() else []
        lb = b.read_text(errors="replace").splitlines(keepends=True) if b.exists() else []
        if la == lb:
            same.append(t)
            continue
        differ.append(t)
        text = "".join(difflib.unified_diff(la, lb, f"a/{t}.out", f"b/{t}.out", n=2))
        (diffs / f"{t}.diff").write_text(text)
    return {"tests": len(tests), "identical": same, "different": differ}


def proxy_findings(work: Path) -> dict[str, object]:
    """Tracebacks in dbward's log; denials by rule; audit records that need a look."""
    log = (work / "dbward" / "dbward.log").read_text(errors="replace")
    con = sqlite3.connect(f"file:{work / 'dbward' / 'audit.db'}?mode=ro", uri=True)
    try:
        denials = dict(
            con.execute(
                "SELECT rule, count(*) FROM audit_log WHERE decision = 'deny' GROUP BY rule"
            ).fetchall()
        )
        # Kind unknown is expected for what dbward could not parse and for FunctionCall.
        unknown = con.execute(
            "SELECT event, command, substr(sql_text, 1, 200) FROM audit_log"
            " WHERE kind = 'unknown' AND coalesce(rule, '') NOT IN"
            " ('guard.unparseable', 'guard.function_call')"
        ).fetchall()
        internal = con.execute(
            "SELECT event, reason FROM audit_log WHERE reason LIKE '%internal error%'"
            " OR reason LIKE '%unexpected%' OR reason LIKE '%Traceback%'"
        ).fetchall()
        statuses = dict(
            con.execute(
                "SELECT event || ':' || coalesce(status, ''), count(*) FROM audit_log GROUP BY 1"
            ).fetchall()
        )
    finally:
        con.close()
    return {
        "denials_by_rule": denials,
        "records_by_event_status": statuses,
        "tracebacks": log.count("Traceback"),
        "unknown_kind_unexpected": unknown[:50],
        "internal_reasons": internal[:50],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("suite", type=Path, help="src/test/regress of a PostgreSQL 15 source tree")
    ap.add_argument("--work", type=Path, default=Path("/tmp/regress-suite"))
    ap.add_argument("--schedule", type=Path, help="default: SUITE/parallel_schedule")
    ap.add_argument("--serial", action="store_true", help="--max-connections=1")
    ap.add_argument("--setup-direct", action="store_true", help="test_setup directly in (b)")
    ap.add_argument("--only", choices=["a", "b", "diff"], help="one step only")
    ap.add_argument(
        "--neutralize",
        type=Path,
        metavar="AUDIT_DB",
        help="run a copy of the suite whose statements denied in AUDIT_DB (the audit.db of an"
        " earlier run) are replaced by a SELECT, both ways",
    )
    args = ap.parse_args()
    suite = args.suite.resolve()
    if args.neutralize:
        suite, found, missing = neutralized_suite(
            suite, args.neutralize.resolve(), args.work.resolve() / "suite-neutralized"
        )
        print(f"neutralized {found} denied statement texts ({missing} not found verbatim)")
    schedule = (args.schedule or suite / "parallel_schedule").resolve()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    _ensure_service_user()
    lib = build_libdir(suite, work)
    tests = schedule_tests(schedule)

    if args.only in (None, "a"):
        shutil.rmtree(work / "a", ignore_errors=True)
        pg, base = start_cluster()
        try:
            t0 = time.monotonic()
            rc = run_pg_regress(suite, work / "a", lib, pg.port, schedule, serial=args.serial)
            print(f"(a) direct: pg_regress exit {rc} in {time.monotonic() - t0:.0f} s")
        finally:
            stop_pg_server(pg, base)
    if args.only in (None, "b"):
        shutil.rmtree(work / "b", ignore_errors=True)
        pg, base = start_cluster()
        proc = None
        try:
            sched = schedule
            if args.setup_direct:
                run_pg_regress(
                    suite, work / "b", lib, pg.port, schedule, serial=False, tests=[tests[0]]
                )
                rest = [
                    line
                    for line in schedule.read_text().splitlines()
                    if line.strip() != f"test: {tests[0]}"
                ]
                sched = work / "schedule-b"
                sched.write_text("\n".join(rest) + "\n")
                shutil.move(work / "b" / "pg_regress.log", work / "b" / "pg_regress-setup.log")
            proc, port = start_dbward(work, pg)
            t0 = time.monotonic()
            rc = run_pg_regress(suite, work / "b", lib, port, sched, serial=args.serial)
            print(
                f"(b) dbward: pg_regress exit {rc} in {time.monotonic() - t0:.0f} s;"
                f" dbward alive: {proc.poll() is None}"
            )
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            stop_pg_server(pg, base)
    result = compare(work, tests)
    result["proxy"] = proxy_findings(work)
    result["limits"] = {"listener": LISTENER_LIMITS, "audit": AUDIT_LIMITS}
    (work / "summary.json").write_text(json.dumps(result, indent=1))
    different = result["different"]
    assert isinstance(different, list)
    print(
        f"{result['tests']} tests: {len(result['identical'])} identical,"  # type: ignore[arg-type]
        f" {len(different)} different: {' '.join(different)}"
    )
    print(json.dumps(result["proxy"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
