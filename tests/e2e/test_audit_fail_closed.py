"""Fail closed: when the audit log cannot be written, statements are refused (58030)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from dbward.audit import query
from fixtures.clients import outcomes as outcomes_of
from fixtures.ports import free_port
from fixtures.proxy import Proxy
from fixtures.tmpfs import mounted_tmpfs


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 512 KiB file system, so SQLite gets a real SQLITE_FULL."""
    with mounted_tmpfs(tmp_path / "small", "512k") as mount:
        yield mount


def test_full_disk_refuses_statements_then_recovers(
    proxy_factory: Callable[..., Proxy], small_fs: Path
) -> None:
    audit_db = small_fs / "audit.db"
    proxy = proxy_factory(extra={"audit": {"path": str(audit_db), "durability": "strict"}})
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE t (x text)")
        ballast = small_fs / "ballast"
        with ballast.open("wb") as f, pytest.raises(OSError):
            f.write(b"\0" * 1024 * 1024)
        refused = None
        for _ in range(200):  # keep writing until the log cannot grow
            try:
                conn.execute("INSERT INTO t VALUES (%s)", ("z" * 3000,))
            except psycopg.Error as exc:
                refused = exc
                break
        assert refused is not None and refused.sqlstate == "58030", refused
        # reads are refused too while the log is down: nothing runs unrecorded
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT 1")
        assert info.value.sqlstate == "58030"
        ballast.unlink()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert conn.execute("SELECT 42").fetchone() == (42,)
                break
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    proxy.audit_path = audit_db
    records = proxy.audit(until=lambda rs: any(r.event == "disconnect" for r in rs))
    intents = [r for r in records if r.event == "statement"]
    # nothing is lost: the refused statements are in the log, marked as refused
    outcomes = {sid: r for (_, sid), r in outcomes_of(records).items()}
    failed_insert = [r for r in intents if outcomes[r.statement_id].status == "not_executed"]
    assert [r.command for r in failed_insert] == ["INSERT"]  # its durable intent failed
    assert outcomes[failed_insert[0].statement_id].sqlstate == "58030"
    refused = [r for r in intents if r.rule == "guard.audit_unavailable"]
    assert refused and all(r.decision == "deny" for r in refused)
    assert all(outcomes[r.statement_id].sqlstate == "58030" for r in refused)
    assert query.tail(audit_db, 1)[0].event == "disconnect"


def _writer_pid(proxy: Proxy) -> int:
    """The audit writer child of a running `dbward serve`."""
    children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children")
    for pid in children.read_text().split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"dbward.audit.writer_process" in cmdline:
            return int(pid)
    raise AssertionError(f"no audit writer among {children.read_text()!r}")


def test_shutdown_with_records_it_could_not_write_exits_1(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """operations.md: SIGTERM flushes the audit log and exits 0, or 1 when the writer could not
    commit everything within 5 s, the log naming how many records were not written."""
    proxy = proxy_factory()
    # The log replaced by a directory: the writer, once killed, cannot be restarted.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{proxy.audit_path}{suffix}").unlink(missing_ok=True)
    proxy.audit_path.mkdir()
    os.kill(_writer_pid(proxy), signal.SIGKILL)
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT 1")
        assert info.value.sqlstate == "58030"  # fail closed
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=30) == 1, proxy.log()
    assert 4 < time.monotonic() - started < 20
    assert re.search(r"audit log closed with \d+ records not written", proxy.log()), proxy.log()


def test_a_second_dbward_on_the_same_audit_log_stops_at_start(
    proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Review r61: a second dbward given the first one's audit.path started, and each then
    saw seqs the other had written: the second refused every statement for good, lost the
    records of what it had already let through and exited 1, naming "another process" only in
    its log. Its writer now waits a few seconds for the log (a killed predecessor's writer
    finishing) and then stops the start, exit 2."""
    first = proxy_factory()
    with psycopg.connect(**first.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT 1")
    config = tmp_path / "second.yaml"
    config.write_text(first.config_path.read_text().replace(f":{first.port}", f":{free_port()}"))
    proc = subprocess.run(
        [sys.executable, "-m", "dbward", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        f"dbward: audit.path: cannot open the audit log: audit log {first.audit_path} is in use "
        "by another dbward process (its audit writer holds the log): give each dbward an "
        "audit.path of its own"
    ) in proc.stderr, proc.stderr
    # The first one is untouched: it records, and its log stays gap-free.
    with psycopg.connect(**first.conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=30) == 0, first.log()
    seqs = [r.seq for r in query.search(first.audit_path, limit=1_000_000)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "another process" not in first.log()
