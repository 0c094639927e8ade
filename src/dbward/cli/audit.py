"""The `dbward audit` commands: tail and search the audit log."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from dbward.audit import query
from dbward.audit.records import AuditRecord
from dbward.audit.render import WIDE_TABLE_COLUMNS, follow_lines, record_json, records_table
from dbward.core.errors import AuditUnavailable, DbwardError

__all__ = ["audit_group"]

F = TypeVar("F", bound=Callable[..., Any])

_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


class TimeParam(click.ParamType[int]):
    """An ISO 8601 time (UTC when no offset is given) or a relative age like 15m, 2h, 1d."""

    name = "time"

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value)
        m = _RELATIVE.match(text)
        if m:
            digits = m.group(1)
            # Past 15 digits no age fits (int() would refuse 4,300 digits with a traceback).
            now = self._now_ms()
            ms = int(digits) * _UNITS_MS[m.group(2)] if len(digits) <= 15 else None
            if ms is None or now - ms < query.MIN_TS_MS:
                self.fail(f"{text!r} is out of range (before the year 1)", param, ctx)
            return now - ms
        try:
            dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            self.fail(
                f"{text!r} is neither an ISO 8601 time (2024-05-01T12:00:00Z) "
                "nor a relative age (30s, 15m, 2h, 1d, 1w)",
                param,
                ctx,
            )
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return int(dt.timestamp() * 1000)


def _db_options(func: F) -> F:
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="dbward configuration file; its audit.path is read.",
    )(func)
    func = click.option(
        "--audit-db",
        "audit_db",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="DBWARD_AUDIT_DB",
        help="Audit log SQLite file (env DBWARD_AUDIT_DB).",
    )(func)
    return click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")(func)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(2)


def _resolve_db(audit_db: Path | None, config_path: Path | None) -> Path:
    if audit_db is not None and config_path is not None:
        source = click.get_current_context().get_parameter_source("audit_db")
        if source is not click.core.ParameterSource.ENVIRONMENT:
            raise click.UsageError("give either --audit-db or --config, not both")
        audit_db = None  # --config on the command line wins over DBWARD_AUDIT_DB
    if audit_db is not None:
        return audit_db
    if config_path is None:
        raise click.UsageError(
            "give the audit log with --audit-db PATH, --config FILE "
            "or the environment variable DBWARD_AUDIT_DB"
        )
    try:
        # Lazy: the config package is heavier than the audit reader and --audit-db needs none of it.
        from dbward.config import (  # type: ignore[attr-defined,unused-ignore]
            load_config,
        )
    except ImportError:
        raise click.UsageError("--config is not supported by this build; use --audit-db") from None
    try:
        cfg = load_config(config_path)
    except DbwardError as exc:
        raise click.UsageError(f"invalid config {config_path}: {exc.message}") from None
    except OSError as exc:
        raise click.UsageError(f"cannot read config {config_path}: {exc}") from None
    path: Path = cfg.audit.path
    return path


def _show(records: list[AuditRecord], as_json: bool) -> None:
    if as_json:
        for rec in records:
            click.echo(record_json(rec))
        return
    console = Console(highlight=False, markup=False, emoji=False)
    if not records:
        console.print("no matching audit records")
        return
    # A narrow terminal (or a pipe, 80 columns) gets the compact table; --json has every field.
    compact = console.width < WIDE_TABLE_COLUMNS
    console.print(records_table(records, compact=compact, width=console.width))


def _query(func: Callable[[], list[AuditRecord]]) -> list[AuditRecord]:
    try:
        return func()
    except FileNotFoundError as exc:
        _fail(str(exc))
    except AuditUnavailable as exc:
        _fail(exc.message)


@click.group("audit")
def audit_group() -> None:
    """Read the audit log."""


@audit_group.command("tail")
@click.option(
    "-n",
    "--lines",
    "n",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many of the latest records to show.",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Then keep printing records as they are written, one line each, until interrupted.",
)
@_db_options
def tail_cmd(
    n: int, follow: bool, as_json: bool, audit_db: Path | None, config_path: Path | None
) -> None:
    """Show the last N audit records (and, with --follow, those written after them)."""
    path = _resolve_db(audit_db, config_path)
    records = _query(lambda: query.tail(path, n))
    if not follow:
        _show(records, as_json)
        return
    _follow(path, records, as_json)


def _follow(path: Path, records: list[AuditRecord], as_json: bool) -> None:
    """Print `records`, then each record committed after them, as it comes (Ctrl-C ends it)."""
    console = Console(highlight=False, markup=False, emoji=False)
    header = True
    after = records[-1].seq if records and records[-1].seq is not None else 0
    try:
        for rec in _query_iter(lambda: query.follow(path, after_seq=after), records):
            # One line per record, in fixed columns, so lines printed apart still align.
            if as_json:
                click.echo(record_json(rec))
            else:
                console.print(follow_lines([rec], header=header, width=console.width))
                header = False
    except KeyboardInterrupt:
        return


def _query_iter(
    func: Callable[[], Iterator[AuditRecord]], first: list[AuditRecord]
) -> Iterator[AuditRecord]:
    """`first`, then what `func` yields; a missing or unreadable log ends the command (exit 2)."""
    yield from first
    try:
        yield from func()
    except FileNotFoundError as exc:
        _fail(str(exc))
    except AuditUnavailable as exc:
        _fail(exc.message)


@audit_group.command("search")
@click.option("--identity", help="Exact identity name.")
@click.option("--session", help="Session id (or a prefix of it).")
@click.option("--kind", help="Statement kind: read, write, ddl, dcl, admin, ...")
@click.option(
    "--table",
    help="A table the statement touches, as recorded (s.t); also matches statements on all "
    "of its schema (s.*) or database (*).",
)
@click.option("--event", help="Event: connect, statement, outcome, ...")
@click.option(
    "--status",
    help="Statement outcome: ok, error, denied, rolled_back, not_executed, unknown, ...",
)
@click.option("--since", type=TimeParam(), help="From this time: ISO 8601 or 15m/2h/1d ago.")
@click.option("--until", type=TimeParam(), help="Before this time: ISO 8601 or 15m/2h/1d ago.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Show at most this many (the most recent); a note on stderr says if more match.",
)
@_db_options
def search_cmd(  # noqa: PLR0917 (click passes each option positionally by name)
    identity: str | None,
    session: str | None,
    kind: str | None,
    table: str | None,
    event: str | None,
    status: str | None,
    since: int | None,
    until: int | None,
    limit: int,
    as_json: bool,
    audit_db: Path | None,
    config_path: Path | None,
) -> None:
    """Find audit records (the most recent LIMIT matches, oldest first)."""
    path = _resolve_db(audit_db, config_path)
    # One more than asked: whether older matches were left out, which the reader must know.
    records = _query(
        lambda: query.search(
            path,
            identity=identity,
            session=session,
            kind=kind,
            table=table,
            event=event,
            status=status,
            since_ms=since,
            until_ms=until,
            limit=limit + 1,
        )
    )
    if len(records) > limit:
        records = records[1:]  # the oldest: the rest are the `limit` most recent
        click.echo(
            f"note: showing the {limit} most recent matching records; older ones match too "
            "(raise --limit or narrow the search)",
            err=True,
        )
    _show(records, as_json)
