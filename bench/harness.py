"""Benchmark set-up shared by run.py and profile_proxy.py.

One throwaway PostgreSQL (the test fixture, tuned a little), pgbench tables at scale 10 plus a
1M-row table, a pgbouncer (session pooling, SCRAM from clients) and dbward processes with
different audit durability, all on 127.0.0.1 and all reaching PostgreSQL over TCP.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dbward.wire.postgres.scram import make_verifier  # noqa: E402
from fixtures.ports import free_port  # noqa: E402
from fixtures.postgres import (  # noqa: E402
    PgServer,
    _clean_env,
    _ensure_service_user,
    start_pg_server,
    stop_pg_server,
)

DBNAME = "app"
ROWS_TABLE = "bench_rows"
ROWS = 1_000_000
CLIENT_USER = "bench"  # the identity clients use at pgbouncer and dbward

# Applied with ALTER SYSTEM on top of the fixture's settings (fsync=off, 32MB buffers), so the
# direct baseline is not starved: a fast baseline makes the ratios honest, not flattering.
PG_TUNING = {
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
    "checkpoint_timeout": "30min",
    "max_connections": "300",
}


@dataclass
class Target:
    """Something pgbench/psql/psycopg can connect to."""

    name: str
    host: str
    port: int
    user: str
    password: str
    pid_file: Path | None = None  # where to read the process id (CPU accounting)
    process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return _clean_env() | {"PGPASSWORD": self.password, "PGSSLMODE": "disable"}

    def libpq_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]

    def conninfo(self) -> dict[str, str | int]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": DBNAME,
            "sslmode": "disable",
        }

    def pid(self) -> int | None:
        """The serving process (pgbouncer runs under runuser, so read its pid file)."""
        if self.pid_file is not None:
            try:
                return int(self.pid_file.read_text().strip())
            except (OSError, ValueError):
                return None
        return self.process.pid if self.process is not None else None


def cpu_times(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process, from /proc (None when unknown)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, from /proc (None when unknown)."""
    times = cpu_times(pid)
    return None if times is None else times[0] + times[1]


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening:\n{log.read_text()[-4000:]}")


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class BenchEnv:
    """Everything started for one benchmark run; `close()` stops it all."""

    pg: PgServer
    pg_base: Path
    work: Path
    direct: Target
    targets: dict[str, Target] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def sql(self, sql: str) -> str:
        """Run SQL as the superuser over the unix socket (set-up and housekeeping only)."""
        return self.pg.psql(sql)

    def close(self) -> None:
        for target in self.targets.values():
            _stop_process(target.process)
        stop_pg_server(self.pg, self.pg_base)
        shutil.rmtree(self.work, ignore_errors=True)


def _tune_and_restart(pg: PgServer) -> None:
    pg.psql(
        "".join(f"ALTER SYSTEM SET {k} = '{v}';\n" for k, v in PG_TUNING.items()),
        dbname="postgres",
    )
    runas = _ensure_service_user()
    subprocess.run(
        runas.argv(
            [
                str(pg.bindir / "pg_ctl"),
                "-D",
                str(pg.data_dir),
                "-l",
                str(pg.log_file),
                "-w",
                "-t",
                "60",
                "restart",
                "-m",
                "fast",
            ]
        ),
        cwd=pg.data_dir.parent,
        check=True,
        capture_output=True,
        env=_clean_env(),
        timeout=120,
    )


def _load_data(pg: PgServer, scale: int) -> None:
    # As the service user over the unix socket (trust), so it owns the tables dbward reads.
    subprocess.run(
        [
            "pgbench",
            "-i",
            "-q",
            "-s",
            str(scale),
            "-h",
            str(pg.socket_dir),
            "-p",
            str(pg.port),
            "-U",
            pg.service_user,
            DBNAME,
        ],
        check=True,
        capture_output=True,
        env=_clean_env(),
        timeout=600,
    )
    pg.psql(
        "CREATE EXTENSION IF NOT EXISTS pg_prewarm;\n"
        f"SET ROLE {pg.service_user};\n"
        f"CREATE TABLE {ROWS_TABLE} AS SELECT g, md5(g::text) AS m "
        f"FROM generate_series(1, {ROWS}) g;\n"
        f"VACUUM ANALYZE {ROWS_TABLE};\n"
        "VACUUM ANALYZE pgbench_accounts, pgbench_branches, pgbench_tellers;\n"
        "SELECT pg_prewarm('pgbench_accounts'), pg_prewarm('pgbench_accounts_pkey'),"
        f" pg_prewarm('{ROWS_TABLE}');\n",
    )


def start_pgbouncer(work: Path, pg: PgServer, password: str) -> Target:
    """pgbouncer as the unprivileged fixture user: session pooling, SCRAM from clients."""
    runas = _ensure_service_user()
    directory = work / "pgbouncer"
    directory.mkdir(mode=0o755)
    port = free_port()
    (directory / "userlist.txt").write_text(
        f'"{CLIENT_USER}" "{password}"\n"{pg.service_user}" "{pg.service_password}"\n'
    )
    (directory / "pgbouncer.ini").write_text(
        f"""[databases]
{DBNAME} = host=127.0.0.1 port={pg.port} dbname={DBNAME} user={pg.service_user} \
password={pg.service_password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {directory}/userlist.txt
pool_mode = session
max_client_conn = 500
default_pool_size = 40
ignore_startup_parameters = extra_float_digits
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
log_connections = 0
log_disconnections = 0
"""
    )
    for path in (directory, *directory.iterdir()):
        runas.chown(path)
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    log = directory / "stdout.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            runas.argv(["pgbouncer", str(directory / "pgbouncer.ini")]),
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
        )
    _wait_port(port, proc, log, "pgbouncer")
    return Target(
        "pgbouncer",
        "127.0.0.1",
        port,
        CLIENT_USER,
        password,
        pid_file=directory / "pgbouncer.pid",
        process=proc,
    )


def start_dbward(
    work: Path,
    pg: PgServer,
    password: str,
    durability: str,
    *,
    name: str = "",
    extra_env: dict[str, str] | None = None,
    python: str = "",
) -> Target:
    """`python -m dbward serve` with one local user, audit on, the given durability.

    `name` (default `dbward-<durability>`) names the target and its directory; `extra_env` is
    added to the process environment (ablation.py uses it to load its variants); `python` is
    the interpreter to run it with (default: this one).
    """
    name = name or f"dbward-{durability}"
    directory = work / name
    directory.mkdir()
    port = free_port()
    secret = directory / "upstream-password"
    secret.write_text(pg.service_password)
    secret.chmod(0o600)
    config = {
        "audit": {"path": str(directory / "audit.db"), "durability": durability},
        "users": [
            {"name": CLIENT_USER, "password_verifier": make_verifier(password), "groups": []}
        ],
        "listeners": [
            {
                "name": "bench",
                "protocol": "postgres",
                "listen": f"127.0.0.1:{port}",
                "tls": {"mode": "disabled"},
                "upstream": {
                    "host": "127.0.0.1",
                    "port": pg.port,
                    "database": DBNAME,
                    "user": pg.service_user,
                    "password_file": str(secret),
                    "tls": {"mode": "disable"},
                },
            }
        ],
        "shutdown_grace_s": 5,
    }
    config_path = directory / "dbward.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = directory / "dbward.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [python or sys.executable, "-m", "dbward", "serve", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**_clean_env(), "PYTHONUNBUFFERED": "1", **(extra_env or {})},
        )
    _wait_port(port, proc, log, name)
    return Target(name, "127.0.0.1", port, CLIENT_USER, password, process=proc)


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


@contextmanager
def bench_env(
    *,
    scale: int = 10,
    pgbouncer: bool = True,
    durabilities: tuple[str, ...] = ("batched", "strict"),
    log: bool = True,
) -> Iterator[BenchEnv]:
    """Start PostgreSQL, load data, start the proxies; stop and clean up everything on exit."""
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench not found (apt-get install -y postgresql-client)")
    if pgbouncer and shutil.which("pgbouncer") is None:
        raise SystemExit("pgbouncer not found: apt-get install -y pgbouncer")

    def say(msg: str) -> None:
        if log:
            print(f"[setup] {msg}", file=sys.stderr, flush=True)

    say("starting PostgreSQL")
    pg, pg_base = start_pg_server(None)
    work = Path(tempfile.mkdtemp(prefix="dbward-bench-"))
    os.chmod(work, 0o755)
    env = BenchEnv(
        pg,
        pg_base,
        work,
        direct=Target("direct", "127.0.0.1", pg.port, pg.service_user, pg.service_password),
    )
    try:
        _tune_and_restart(pg)
        say(f"loading pgbench scale {scale} and {ROWS} rows into {ROWS_TABLE}")
        _load_data(pg, scale)
        env.targets["direct"] = env.direct
        password = secrets.token_urlsafe(12)
        if pgbouncer:
            say("starting pgbouncer")
            env.targets["pgbouncer"] = start_pgbouncer(work, pg, password)
        for durability in durabilities:
            say(f"starting dbward (durability: {durability})")
            target = start_dbward(work, pg, password, durability)
            env.targets[target.name] = target
        env.versions = {
            "postgresql": pg.psql("SHOW server_version", dbname="postgres"),
            "pgbench": _version(["pgbench", "--version"]),
            "pgbouncer": _version(["pgbouncer", "--version"]) if pgbouncer else "",
            "python": sys.version.split()[0],
        }
        yield env
    finally:
        say("stopping everything")
        env.close()


_PGBENCH_FIGURES = {
    "tps": r"^tps = ([0-9.]+)",
    "latency_ms": r"^latency average = ([0-9.]+) ms",
    "failed": r"^number of failed transactions: ([0-9]+)",
    "connect_ms": r"^average connection time = ([0-9.]+) ms",
}


def parse_pgbench(output: str) -> dict[str, float]:
    """tps, average latency and failure count from pgbench's summary."""
    result: dict[str, float] = {}
    for key, pattern in _PGBENCH_FIGURES.items():
        m = re.search(pattern, output, re.M)
        if m:
            result[key] = float(m.group(1))
    return result


def run_pgbench(
    target: Target,
    args: list[str],
    duration: float,
    *,
    clients: int = 8,
    threads: int = 2,
) -> dict[str, float]:
    """One pgbench run against a target; also records the serving process's CPU use."""
    cmd = [
        "pgbench",
        "-n",
        *target.libpq_args(),
        "-c",
        str(clients),
        "-j",
        str(threads),
        "-T",
        str(int(duration)),
        *args,
        DBNAME,
    ]
    pid = target.pid() if target.name != "direct" else None
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=target.env(), timeout=duration + 120, check=False
    )
    wall = time.monotonic() - t0
    cpu1 = cpu_seconds(pid)
    result = parse_pgbench(proc.stdout)
    if proc.returncode != 0 or "tps" not in result:
        raise RuntimeError(
            f"pgbench failed against {target.name} ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    if cpu0 is not None and cpu1 is not None:
        result["proxy_cpu_util"] = round((cpu1 - cpu0) / wall, 3)
    return result
