"""The `dbward demo` command: a ready-to-try proxy in front of an embedded PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import click

from dbward.demo.command import run_demo

__all__ = ["demo_command"]


@click.command("demo")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=6432,
    show_default=True,
    help="Port the proxy listens on (127.0.0.1).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".dbward-demo"),
    show_default=True,
    help="Where the database, audit log, config and generated passwords live (reused).",
)
@click.option("--prepare-only", is_flag=True, hidden=True, help="Set up the state and exit.")
@click.pass_context
def demo_command(ctx: click.Context, port: int, state_dir: Path, prepare_only: bool) -> None:
    """Run dbward in front of an embedded PostgreSQL loaded with sample PII.

    Creates (or reuses) a database 'shop' with customers, orders and API keys, two local
    users (dev, admin), and prints a psql command to connect through the proxy. Ctrl-C stops
    everything.
    """
    ctx.exit(run_demo(port=port, state_dir=state_dir, prepare_only=prepare_only))
