"""`dbward demo`: embedded PostgreSQL + sample PII + local users + the proxy, in one process."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import yaml
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from dbward.demo.embedded import EmbeddedPostgres, Upstream

__all__ = ["DemoState", "run_demo", "write_config"]

DEMO_USERS: dict[str, tuple[str, ...]] = {"dev": ("developers",), "admin": ("admins",)}
LISTEN_HOST = "127.0.0.1"


@dataclass(frozen=True)
class DemoState:
    """Files under --state-dir."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def audit_db(self) -> Path:
        return self.root / "audit.db"

    @property
    def config(self) -> Path:
        return self.root / "dbward.yaml"

    @property
    def upstream_password(self) -> Path:
        return self.root / "upstream-password"

    @property
    def demo_passwords(self) -> Path:
        return self.root / "demo-passwords"


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option asyncio's server sets, so a TIME_WAIT leftover is not reported as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LISTEN_HOST, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _lock_state_dir(root: Path) -> int | None:
    """Hold an exclusive lock on the state directory for this process's lifetime.

    Returns the lock's file descriptor, or None when another demo holds it: two demos on one
    state dir would share (and one would stop) the other's embedded PostgreSQL and audit log.
    The kernel drops the lock when the process dies, even by SIGKILL.
    """
    fd = os.open(root / ".demo.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_holder(root: Path) -> str:
    try:
        pid = (root / ".demo.lock").read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def load_demo_passwords(path: Path) -> dict[str, str]:
    """The demo users' clear passwords (created on first run; a demo convenience, mode 0600)."""
    import secrets

    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    passwords = {name: str(stored.get(name) or secrets.token_urlsafe(12)) for name in DEMO_USERS}
    if passwords != stored:
        _write_private(path, json.dumps(passwords, indent=2) + "\n")
    else:
        os.chmod(path, 0o600)
    return passwords


def write_config(
    state: DemoState, upstream: Upstream, passwords: dict[str, str], port: int
) -> Path:
    """Write state/dbward.yaml (users as SCRAM verifiers; the upstream password stays in a file)."""
    from dbward.wire.postgres.scram import make_verifier

    config: dict[str, Any] = {
        "audit": {"path": str(state.audit_db), "durability": "strict"},
        "users": [
            {
                "name": name,
                "password_verifier": make_verifier(passwords[name]),
                "groups": list(groups),
            }
            for name, groups in DEMO_USERS.items()
        ],
        "listeners": [
            {
                "name": "demo",
                "protocol": "postgres",
                "listen": f"{LISTEN_HOST}:{port}",
                "tls": {"mode": "disabled"},
                "upstream": {
                    "host": str(upstream.socket_dir),
                    "port": upstream.port,
                    "database": upstream.database,
                    "user": upstream.user,
                    "password_file": str(upstream.password_file),
                    # A unix socket inside pgdata: nothing to encrypt, nobody in between.
                    "tls": {"mode": "disable"},
                },
            }
        ],
    }
    header = "# Written by `dbward demo` on every start; edits are overwritten.\n"
    _write_private(state.config, header + yaml.safe_dump(config, sort_keys=False))
    return state.config


def _connect_url(user: str, password: str, port: int, database: str) -> str:
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return f"postgresql://{auth}@{LISTEN_HOST}:{port}/{database}"


# SIGHUP too: closing the demo's terminal must stop it, not kill it and orphan the server.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # Until the runtime installs its own handlers, SIGTERM and SIGHUP must still unwind
    # through our `finally` so the embedded server is stopped instead of being orphaned.
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    # A second Ctrl-C while stopping must not abort the stop and orphan the server.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(
    *,
    port: int,
    state_dir: Path,
    console: Console | None = None,
    prepare_only: bool = False,
) -> int:
    """Run the demo until Ctrl-C; returns the process exit code."""
    out = console or Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if _port_in_use(port):
        err.print(
            f"[bold red]error:[/] port {port} on {LISTEN_HOST} is already in use; "
            "stop whatever is using it or pick another with --port",
            soft_wrap=True,
        )
        return 2
    try:
        from dbward.demo.embedded import EmbeddedPostgres
    except ImportError as exc:
        err.print(
            f"[bold red]error:[/] the demo needs extra packages ({exc.name} is missing); "
            "install them with: pip install 'dbward\\[demo]'"
        )
        return 1

    state = DemoState(state_dir.expanduser().resolve())
    try:
        state.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = _lock_state_dir(state.root)
    except OSError as exc:
        err.print(
            f"[bold red]error:[/] --state-dir {escape(str(state.root))}: cannot use it "
            f"({escape(exc.strerror or str(exc))}); pick a writable directory with --state-dir",
            soft_wrap=True,
        )
        return 2
    if lock is None:
        err.print(
            f"[bold red]error:[/] another dbward demo{_lock_holder(state.root)} is using "
            f"--state-dir {escape(str(state.root))}; stop it or pick another --state-dir",
            soft_wrap=True,
        )
        return 2
    pg = EmbeddedPostgres(state.pgdata)
    try:
        with _sigterm_as_interrupt():
            return _run(out, err, state, pg, port=port, prepare_only=prepare_only)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    finally:
        _stop_server(out, pg)
        os.close(lock)


def _stop_server(out: Console, pg: EmbeddedPostgres) -> None:
    if pg.socket_dir is not None:
        with _signals_ignored():
            try:
                out.print("stopping embedded PostgreSQL…")
            except OSError:  # the terminal is gone (SIGHUP): stop the server regardless
                pass
            pg.stop()


def _run(
    out: Console,
    err: Console,
    state: DemoState,
    pg: EmbeddedPostgres,
    *,
    port: int,
    prepare_only: bool,
) -> int:
    from dbward.demo.embedded import provision

    fresh = not (state.pgdata / "PG_VERSION").exists()
    what = "Creating" if fresh else "Starting"
    try:
        with out.status(f"{what} embedded PostgreSQL in {state.pgdata}…"):
            pg.start()
        with out.status("Preparing the sample database 'shop'…"):
            upstream = provision(pg, state.upstream_password)
    except Exception as exc:
        log = state.pgdata / "log"
        err.print(f"[bold red]error:[/] embedded PostgreSQL failed: {escape(str(exc))}")
        if log.exists():
            err.print(f"server log: {log}", soft_wrap=True)
        return 1
    passwords = load_demo_passwords(state.demo_passwords)
    config_path = write_config(state, upstream, passwords, port)
    if prepare_only:
        out.print(f"prepared {state.root} (config: {config_path})", soft_wrap=True)
        return 0

    from dbward.config import load_config

    try:
        from dbward.runtime import run_until_stopped
    except ImportError as exc:
        err.print(f"[bold red]error:[/] the proxy runtime is not available ({escape(str(exc))})")
        return 1
    config = load_config(config_path)

    def ready() -> None:
        _banner(out, state, upstream, passwords, port)

    return run_until_stopped(config, ready=ready, stop_on_hangup=True)


def _dbward_command() -> list[str]:
    """How to run dbward from this shell: the bare name only when that is what runs now."""
    here = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    on_path = shutil.which("dbward")
    if on_path is not None and here is not None and Path(on_path).resolve() == here:
        return ["dbward"]
    if here is not None and here.name == "dbward" and here.exists():
        return [str(here)]
    return [sys.executable, "-m", "dbward"]


def _banner(
    out: Console, state: DemoState, upstream: Upstream, passwords: dict[str, str], port: int
) -> None:
    db = upstream.database
    url = _connect_url("dev", passwords["dev"], port, db)
    admin_url = _connect_url("admin", passwords["admin"], port, db)
    out.print(
        f"[bold green]dbward demo is running[/] on {LISTEN_HOST}:{port} in front of an embedded "
        f"PostgreSQL (database [bold]{db}[/], users [bold]dev[/] and [bold]admin[/])",
        soft_wrap=True,
    )
    # Copy-pasteable lines: never wrapped, never parsed as markup.
    for line in (
        f'connect: psql "{url}"',
        f'  as admin: psql "{admin_url}"',
        f"audit log: {state.audit_db}",
        # Quoted for a shell (a --state-dir with a space); it shows the records once.
        "  read it: "
        + shlex.join([*_dbward_command(), "audit", "tail", "--audit-db", str(state.audit_db)]),
        f"state: {state.root} (Ctrl-C stops the proxy and PostgreSQL)",
    ):
        out.print(line, soft_wrap=True, markup=False)
    out.file.flush()
