"""The `dbward` command: serve, demo, users and audit subcommands."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import click

from dbward import __version__
from dbward.core.errors import AuditUnavailable, ConfigError
from dbward.wire.postgres.scram import MIN_VERIFIER_ITERATIONS


@click.group()
@click.version_option(__version__, prog_name="dbward")
def cli() -> None:
    """dbward: identity-aware access proxy for databases."""


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Path to dbward.yaml.",
)
def serve(config_path: Path) -> None:
    """Run the proxy until SIGINT/SIGTERM, then drain sessions and flush the audit log."""
    from dbward.config import load_config
    from dbward.runtime import configure_logging, run_until_stopped

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"dbward: {exc.message}", err=True)
        sys.exit(2)
    configure_logging(config.log_level)
    try:
        code = run_until_stopped(config)
    except ConfigError as exc:
        click.echo(f"dbward: {exc.message}", err=True)
        sys.exit(2)
    except AuditUnavailable as exc:
        # Without an audit log nothing may run (fail closed): refuse to start.
        click.echo(f"dbward: audit.path: cannot open the audit log: {exc.message}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"dbward: cannot start: {exc.strerror or exc}", err=True)
        sys.exit(1)
    sys.exit(code)


@cli.command("check-config")
@click.argument("config_arg", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--config",
    "config_opt",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The configuration file (as for serve); or give it as the argument.",
)
def check_config(config_arg: Path | None, config_opt: Path | None) -> None:
    """Validate a configuration file and exit (2 when invalid)."""
    # `serve` and `audit` take --config: a user who types that here as well should not be
    # told the file is missing.
    if (config_arg is None) == (config_opt is None):
        raise click.UsageError("give the configuration file, as CONFIG or --config CONFIG (once)")
    config_path = config_arg if config_arg is not None else config_opt
    assert config_path is not None
    from dbward.audit.query import existing_log_problem
    from dbward.audit.sqlite import location_problem
    from dbward.config import load_config, secret_file_warnings, upstream_password_problems
    from dbward.identity.auth_secret import load_auth_secret
    from dbward.server.tls import listener_contexts

    try:
        config = load_config(config_path)
        for index, listener in enumerate(config.listeners):
            listener_contexts(listener, index)  # certificates, keys, CA files load as in `serve`
        if config.auth_secret_path.exists():  # `serve` creates it when missing
            load_auth_secret(config.auth_secret_path)
        problem = location_problem(config.audit.path)
        if problem is not None:
            raise ConfigError(f"audit.path: cannot create the audit log: {problem}")
        problem = existing_log_problem(config.audit.path)
        if problem is not None:  # `serve` refuses it too (exit 2)
            raise ConfigError(f"audit.path: {problem}")
        problems = upstream_password_problems(config)
        # A password file must be readable here as there; an environment variable may well be
        # set only where `serve` runs: warn about it, do not fail.
        unreadable = [(k, p) for k, p in problems if k.endswith(".password_file")]
        if unreadable:
            raise ConfigError(
                "invalid configuration:\n  " + "\n  ".join(f"{k}: {p}" for k, p in unreadable)
            )
    except ConfigError as exc:
        click.echo(f"dbward: {exc.message}", err=True)
        sys.exit(2)
    for key, problem in problems:
        click.echo(f"dbward: warning: {key}: {problem} here; `serve` needs it", err=True)
    for key, warning in secret_file_warnings(config):
        click.echo(f"dbward: warning: {key}: {warning}", err=True)
    click.echo(f"ok: {len(config.listeners)} listener(s), {len(config.users)} user(s)")


@cli.group()
def users() -> None:
    """Manage local users."""


@users.command("hash-password")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option(
    "--iterations",
    default=4096,
    show_default=True,
    type=click.IntRange(MIN_VERIFIER_ITERATIONS, 1_000_000),
    help=(
        "PBKDF2 rounds: each login and each offline guess against a leaked verifier costs "
        "this many; more is slower for both."
    ),
)
def hash_password(password_stdin: bool, iterations: int) -> None:
    """Print a SCRAM-SHA-256 verifier for `password_verifier:` (the password is not stored)."""
    from dbward.wire.postgres.scram import make_verifier

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            click.echo("dbward: the passwords differ", err=True)
            sys.exit(2)
    if not password:
        click.echo("dbward: an empty password is not allowed", err=True)
        sys.exit(2)
    click.echo(make_verifier(password, iterations=iterations))


def _attach_optional_commands() -> None:
    from dbward.cli.audit import audit_group
    from dbward.cli.demo import demo_command

    cli.add_command(audit_group, "audit")
    cli.add_command(demo_command, "demo")


_attach_optional_commands()


def main() -> None:
    """Console-script entry point."""
    cli()
