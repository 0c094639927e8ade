"""The `dbward audit tail` and `dbward audit search` commands."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sqlite import SqliteAuditSink
from dbward.cli.audit import TimeParam, audit_group
from fixtures.tmpfs import mounted_tmpfs

NOW = int(time.time() * 1000)


def _append(path: Path, records: list[AuditRecord]) -> None:
    async def main() -> None:
        sink = SqliteAuditSink(path)
        sink.start()
        for r in records:
            sink.append(r)
        await sink.close()

    asyncio.run(main())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    # Relative times (--since 45s) are measured from now: stamp the records at test time,
    # not at import time, or a long test session shifts them out of the window.
    global NOW
    NOW = int(time.time() * 1000)
    path = tmp_path / "audit.db"
    records = [
        AuditRecord(
            event=AuditEvent.STATEMENT,
            ts_ms=NOW - 3 * 3_600_000,  # 3 h ago
            session_id="aaaaaaaa-1111",
            identity="alice",
            kind="read",
            tables=("users",),
            sql_text="SELECT * FROM users",
            decision="allow",
        ),
        AuditRecord(
            event=AuditEvent.STATEMENT,
            ts_ms=NOW - 60_000,  # 1 min ago
            session_id="bbbbbbbb-2222",
            identity="bob",
            kind="write",
            tables=("orders",),
            sql_text="DELETE FROM orders;\n\x1b[31m[red]pwned[/red]",
            decision="deny",
        ),
        AuditRecord(
            event=AuditEvent.OUTCOME,
            ts_ms=NOW - 30_000,
            session_id="bbbbbbbb-2222",
            identity="bob",
            status="error",
            sqlstate="42501",
            rows=0,
            duration_ms=0.5,
        ),
    ]
    _append(path, records)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(audit_group, list(args), env={"COLUMNS": "250"})
    return result.exit_code, result.stdout, result.stderr


def test_tail_table(db: Path) -> None:
    code, out, _ = invoke("tail", "--audit-db", str(db))
    assert code == 0, out
    assert "SELECT * FROM users" in out
    assert "DELETE FROM orders;\\n\\x1b[31m[red]pwned[/red]" in out
    assert "\x1b" not in out
    assert "error 42501" in out
    assert "aaaaaaaa" in out
    assert "aaaaaaaa-1111" not in out


def test_tail_json(db: Path) -> None:
    code, out, _ = invoke("tail", "-n", "2", "--json", "--audit-db", str(db))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    data = [json.loads(line) for line in lines]
    assert [d["seq"] for d in data] == [2, 3]
    assert data[0]["sql_text"].endswith("[red]pwned[/red]")
    assert data[0]["tables"] == ["orders"]
    assert "\x1b" not in out


def test_audit_db_from_env(db: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(audit_group, ["tail", "--json"], env={"DBWARD_AUDIT_DB": str(db)})
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 3


def test_search_filters(db: Path) -> None:
    def seqs(*args: str) -> list[int]:
        code, out, err = invoke("search", "--json", "--audit-db", str(db), *args)
        assert code == 0, err
        return [json.loads(line)["seq"] for line in out.splitlines()]

    assert seqs() == [1, 2, 3]
    assert seqs("--identity", "bob") == [2, 3]
    assert seqs("--session", "bbbbbbbb") == [2, 3]
    assert seqs("--kind", "write") == [2]
    assert seqs("--table", "users") == [1]
    assert seqs("--event", "outcome") == [3]
    assert seqs("--status", "error") == [3]
    assert seqs("--status", "ok") == []
    assert seqs("--since", "2h") == [2, 3]
    assert seqs("--until", "2h") == [1]
    assert seqs("--since", "45s") == [3]
    assert seqs("--limit", "1") == [3]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((NOW - 7_200_000) / 1000))
    assert seqs("--since", iso) == [2, 3]


def test_search_says_when_its_limit_left_matches_out(db: Path) -> None:
    """--limit keeps the most recent matches: the older ones left out are said, on stderr."""
    code, out, err = invoke("search", "--json", "--limit", "2", "--audit-db", str(db))
    assert code == 0, err
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [2, 3]
    assert err == (
        "note: showing the 2 most recent matching records; older ones match too "
        "(raise --limit or narrow the search)\n"
    )
    for args in (("--limit", "3"), ("--limit", "2", "--identity", "bob"), ()):
        code, out, err = invoke("search", "--json", *args, "--audit-db", str(db))
        assert code == 0
        assert err == "", args


def test_search_table_output_and_no_match(db: Path) -> None:
    code, out, _ = invoke("search", "--identity", "alice", "--audit-db", str(db))
    assert code == 0
    assert "SELECT * FROM users" in out
    assert "DELETE" not in out
    code, out, _ = invoke("search", "--identity", "zed", "--audit-db", str(db))
    assert code == 0
    assert "no matching audit records" in out


def test_invalid_since_names_option(db: Path) -> None:
    code, _, err = invoke("search", "--since", "yesterday-ish", "--audit-db", str(db))
    assert code == 2
    assert "--since" in err
    assert "ISO 8601" in err


def test_missing_db_exits_2(tmp_path: Path) -> None:
    code, _, err = invoke("tail", "--audit-db", str(tmp_path / "missing.db"))
    assert code == 2
    assert "does not exist" in err


def test_foreign_db_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite" * 100)
    code, _, err = invoke("search", "--audit-db", str(bad))
    assert code == 2
    assert "not a dbward audit log" in err


def test_db_source_required(tmp_path: Path) -> None:
    code, _, err = invoke("tail")
    assert code == 2
    assert "--audit-db PATH, --config FILE or the environment variable DBWARD_AUDIT_DB" in err
    code, _, err = invoke("tail", "--audit-db", "x.db", "--config", "y.yaml")
    assert code == 2


def test_config_on_the_command_line_wins_over_the_audit_db_variable(
    db: Path, tmp_path: Path
) -> None:
    """With DBWARD_AUDIT_DB exported, every documented `--config dbward.yaml` command was
    refused as giving both ("give either --audit-db or --config, not both", exit 2)."""
    config = tmp_path / "dbward.yaml"
    config.write_text(
        f"audit: {{path: {db}}}\nlisteners: [{{name: l, upstream: {{user: svc}}}}]\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    env = {"DBWARD_AUDIT_DB": str(tmp_path / "elsewhere.db")}
    result = runner.invoke(audit_group, ["tail", "--json", "--config", str(config)], env=env)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


def test_time_param() -> None:
    param = TimeParam(now_ms=lambda: 10_000_000_000)
    assert param.convert("15m", None, None) == 10_000_000_000 - 900_000
    assert param.convert("1d", None, None) == 10_000_000_000 - 86_400_000
    assert param.convert("1970-01-01T00:00:01Z", None, None) == 1000
    assert param.convert("1970-01-01T01:00:00+01:00", None, None) == 0
    assert param.convert("1970-01-01 00:00:02", None, None) == 2000  # naive means UTC
    with pytest.raises(click.BadParameter):
        param.convert("15 parsecs", None, None)


def test_huge_counts_mean_everything(db: Path) -> None:
    """-n/--limit past SQLite's integer range crashed with an OverflowError traceback."""
    for args in (("tail", "-n"), ("search", "--limit")):
        code, out, err = invoke(*args, "99999999999999999999", "--json", "--audit-db", str(db))
        assert code == 0, err
        assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 2, 3]


@pytest.mark.parametrize(
    "value", ["99999999999999999999d", "9999999999999999d", "9" * 5000 + "s", "1" * 400 + "w"]
)
def test_out_of_range_times_are_usage_errors(db: Path, value: str) -> None:
    """They crashed with an OverflowError (or int()'s digit limit) traceback, exit 1."""
    code, _, err = invoke("search", "--since", value, "--audit-db", str(db))
    assert code == 2
    assert "--since" in err and "out of range" in err
    assert "Traceback" not in err


def test_search_for_text_that_is_not_utf8(tmp_path: Path) -> None:
    """A filter holding undecodable bytes (a non-UTF-8 argv) crashed with UnicodeEncodeError;
    it now matches the text as the writer stored it (undecodable bytes as \\udcXX)."""
    path = tmp_path / "audit.db"

    async def main() -> None:
        sink = SqliteAuditSink(path)
        sink.start()
        sink.append(
            AuditRecord(event=AuditEvent.AUTH_FAIL, ts_ms=NOW, session_id="s", identity="b\udcffd")
        )
        await sink.close()

    asyncio.run(main())
    for option in ("--identity", "--session", "--kind", "--table", "--event", "--status"):
        code, _, err = invoke("search", option, "x\udcff", "--audit-db", str(path))
        assert code == 0, err
    code, out, err = invoke("search", "--identity", "b\udcffd", "--json", "--audit-db", str(path))
    assert code == 0, err
    assert [json.loads(line)["identity"] for line in out.splitlines()] == ["b\\udcffd"]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("tables", "'not json'"),
        ("tables", "'\"abc\"'"),
        ("tables", "'{\"a\": 1}'"),
        ("ts_ms", "999999999999999999"),
        ("ts_ms", "'abc'"),
        ("sql_text", "x'41ff00'"),
        ("rows", "'x'"),
        ("duration_ms", "'abc'"),
        ("duration_ms", "1e999"),
        ("statement_id", "'x'"),
    ],
)
def test_a_malformed_record_is_a_clear_error(db: Path, column: str, value: str) -> None:
    """A damaged or hand-edited row crashed tail/search with a traceback (or printed
    Infinity, which is not JSON); it is now named, exit 2."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute(f"UPDATE audit_log SET {column} = {value} WHERE seq = 2")
    conn.close()
    for args in (("tail",), ("tail", "--json"), ("search", "--identity", "bob")):
        code, out, err = invoke(*args, "--audit-db", str(db))
        assert code == 2, (args, out, err)
        assert "record seq 2 is malformed" in err and column in err
        assert "Traceback" not in err


@pytest.mark.parametrize("as_json", [False, True], ids=["lines", "json"])
def test_tail_follow_prints_records_as_they_are_written_until_interrupted(
    db: Path, as_json: bool
) -> None:
    """`audit tail --follow` (a real process, as an operator runs it): the last N, then each
    record committed later, one line each in fixed columns; Ctrl-C ends it quietly."""
    import signal
    import subprocess
    import sys

    args = ["-n", "1", "--follow", "--audit-db", str(db)] + (["--json"] if as_json else [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbward", "audit", "tail", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "120"},
        text=True,
    )
    assert proc.stdout is not None
    try:
        first = [proc.stdout.readline() for _ in range(1 if as_json else 2)]
        assert "error" in first[-1] and "42501" in first[-1], first  # the last record only
        later = AuditRecord(
            AuditEvent.STATEMENT, NOW, "cccccccc-3333", identity="carol", sql_text="SELECT 42"
        )
        _append(db, [later, later._replace(sql_text="SELECT 43")])
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and err == "", err
    if as_json:
        assert [json.loads(line)["sql_text"] for line in lines] == ["SELECT 42", "SELECT 43"]
        assert [json.loads(line)["seq"] for line in lines] == [4, 5]
    else:
        assert "SELECT 42" in lines[0] and "SELECT 43" in lines[1], lines
        assert "carol" in lines[0] and "seq" not in lines[0]  # no header again
        # Fixed columns: each starts at the same place on lines printed apart.
        assert first[-1].index("bob") == lines[0].index("carol") == lines[1].index("carol")
        assert lines[0].index("SELECT") == lines[1].index("SELECT")


def test_follow_lines_keep_their_columns_whatever_the_record() -> None:
    from rich.console import Console

    from dbward.audit.render import follow_lines

    def shown(rec: AuditRecord, header: bool) -> list[str]:
        console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(follow_lines([rec], header=header, width=120))
        return console.export_text().splitlines()

    short = AuditRecord(AuditEvent.STATEMENT, NOW, "s1", seq=7, identity="x", sql_text="SELECT 1")
    long = short._replace(seq=123456, identity="a-rather-long-name", kind="write", decision="deny")
    head, first = shown(short, header=True)
    (second,) = shown(long, header=False)
    assert head.split()[0] == "seq"
    assert first.index("SELECT 1") == second.index("SELECT 1") == head.index("sql")


def test_follow_lines_show_the_sql_in_80_columns() -> None:
    """Review r64: `audit tail -f` in an 80-column terminal (or piped: 80 columns) showed no
    SQL at all. The fixed columns took 81 of the 80, so the header's `sql` and every
    statement's text were cropped off the line."""
    from rich.console import Console

    from dbward.audit.render import follow_lines

    def shown(rec: AuditRecord, header: bool) -> list[str]:
        console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(follow_lines([rec], header=header, width=80))
        return console.export_text().splitlines()

    denied = AuditRecord(
        AuditEvent.STATEMENT,
        NOW,
        "s1",
        seq=123456789,
        identity="a-rather-long-name",
        kind="session",
        decision="deny",
        status="denied",
        sqlstate="42501",
        sql_text="SET ROLE postgres",
    )
    head, first = shown(denied, header=True)
    later = denied._replace(seq=1234567890, kind="read", sql_text="SELECT 42")
    (second,) = shown(later, header=False)
    assert max(len(head), len(first), len(second)) <= 80
    assert head.split()[-1] == "sql", head
    assert "SET ROLE" in first and "SELECT 42" in second, (first, second)
    # Still in fixed columns, and nothing that says what happened is cut to fit.
    assert first.index("SET ROLE") == second.index("SELECT 42") == head.index("sql")
    assert "deny denied 42501" in first and "123456789 " in first and "1234567890 " in second


def test_a_log_that_cannot_be_read_now_is_not_called_foreign(db: Path) -> None:
    """Review r61: a log locked by another connection was reported as "not a dbward audit log
    (database is locked)", sending the operator after the wrong problem."""
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute(
            "INSERT INTO audit_log (ts_ms, event, session_id, statement_id) "
            "VALUES (1, 'connect', 'x', 0)"
        )
        code, _, err = invoke("tail", "--audit-db", str(db))
    finally:
        holder.close()
    assert code == 2
    assert f"error: cannot use the audit log {db}: database is locked" in err, err
    assert "not a dbward audit log" not in err


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A small tmpfs and a function that remounts it read-only (as a snapshot or backup)."""
    with mounted_tmpfs(tmp_path / "snapshot", "4m") as mount:

        def make_read_only() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)

        yield mount, make_read_only


def test_a_log_on_a_read_only_file_system_can_be_read(
    db: Path, read_only_mount: tuple[Path, Callable[[], None]]
) -> None:
    """Review r61: a log on a read-only mount (a snapshot, a backup) could not be read at all:
    SQLite cannot create the -shm file it locks to read a WAL database ("not a dbward audit
    log (unable to open database file)")."""
    mount, make_read_only = read_only_mount
    copy = mount / "audit.db"
    shutil.copyfile(db, copy)
    make_read_only()
    code, out, err = invoke("tail", "--json", "--audit-db", str(copy))
    assert code == 0, err
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 2, 3]


def test_a_read_only_log_with_records_still_in_its_wal_is_not_read_short(
    tmp_path: Path, read_only_mount: tuple[Path, Callable[[], None]]
) -> None:
    """Its last records are in the -wal file, which an immutable open would leave out."""
    mount, make_read_only = read_only_mount
    live = tmp_path / "live.db"

    async def main() -> None:
        sink = SqliteAuditSink(live)
        sink.start()
        await sink.append_durable(AuditRecord(AuditEvent.CONNECT, NOW, "s"))
        for suffix in ("", "-wal"):  # copied while the writer has it open
            shutil.copyfile(f"{live}{suffix}", f"{mount / 'audit.db'}{suffix}")
        await sink.close()

    asyncio.run(main())
    assert (mount / "audit.db-wal").stat().st_size > 0
    make_read_only()
    code, _, err = invoke("tail", "--audit-db", str(mount / "audit.db"))
    assert code == 2
    assert f"its last records are still in {mount / 'audit.db-wal'}" in err, err


def test_every_option_of_tail_and_search_is_explained_in_help() -> None:
    """Review r64: `dbward audit tail --help` listed `-n, --lines` with no word of what it
    counts, where every other option of `tail` and `search` says what it does."""
    for command in ("tail", "search"):
        code, out, _ = invoke(command, "--help")
        assert code == 0, out
        options = out.split("Options:\n", 1)[1]
        # Each option's first line: the flags, then (after two spaces or more) its help.
        for line in options.splitlines():
            if line.lstrip().startswith("-"):
                flags, _, text = line.strip().partition("  ")
                text = re.sub(r"\[default: [^]]*\]|\[required\]", "", text)  # click's notes
                assert text.strip(), f"{command}: {flags} has no help text"
