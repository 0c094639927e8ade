"""Typed settings: the whole dbward.yaml as pydantic models with defaults and validation."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dbward.core.types import DEFAULT_MAX_STATEMENTS

# Field types a YAML boolean must not stand in for (see _Strict).
_NUMBERS: frozenset[object] = frozenset({int, float})


class _Strict(BaseModel):
    """Base: unknown keys are errors, so a typo never silently disables a setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        # YAML reads yes/no/on/off as booleans, which pydantic would take as 1 and 0:
        # `auth_fail_burst: off` would turn the throttle off, `auth_timeout_s: yes` be 1 s.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in _NUMBERS:
                raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
        return value


class AuditSettings(_Strict):
    """Where and how durably the audit log is written."""

    path: Path = Path("dbward-audit.db")
    # strict: statements that change anything wait until their intent record is fsync'd.
    # batched: every record is committed within max_delay_ms; nothing waits.
    durability: Literal["strict", "batched"] = "strict"
    max_delay_ms: int = Field(default=50, ge=1, le=100)
    sql_text_max: int = Field(default=4096, ge=64, le=1_048_576)


class UserSettings(_Strict):
    """A local identity with a stored SCRAM-SHA-256 verifier (never a clear password)."""

    name: str = Field(min_length=1, max_length=63)
    password_verifier: str
    groups: tuple[str, ...] = ()
    kind: Literal["user", "agent"] = "user"

    @field_validator("password_verifier")
    @classmethod
    def _check_verifier(cls, value: str) -> str:
        from dbward.wire.postgres.scram import MIN_VERIFIER_ITERATIONS, parse_verifier

        try:
            verifier = parse_verifier(value)
        except ValueError as exc:
            raise ValueError(
                f"expected a SCRAM-SHA-256 verifier as printed by "
                f"'dbward users hash-password' ({exc})"
            ) from None
        if verifier.iterations < MIN_VERIFIER_ITERATIONS:
            # The verifier is what a leaked configuration exposes to offline guessing: below
            # PostgreSQL's default count it costs the guesser almost nothing.
            raise ValueError(
                f"expected at least {MIN_VERIFIER_ITERATIONS} SCRAM iterations, got "
                f"{verifier.iterations} (hash the password again with "
                "'dbward users hash-password')"
            )
        return value


class ClientTlsSettings(_Strict):
    """TLS offered to clients connecting to a listener."""

    mode: Literal["disabled", "optional", "required"] = "disabled"
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _files_when_enabled(self) -> ClientTlsSettings:
        if self.mode != "disabled" and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"tls.mode '{self.mode}' needs tls.cert_file and tls.key_file")
        return self


class UpstreamTlsSettings(_Strict):
    """TLS from dbward to the database, with libpq's sslmode meanings."""

    mode: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _ca_for_verify(self) -> UpstreamTlsSettings:
        if self.mode == "verify-full" and self.ca_file is None:
            raise ValueError("tls.mode 'verify-full' needs tls.ca_file")
        return self


# Longest upstream password file read (PostgreSQL's own limit on a password is far lower).
MAX_PASSWORD_FILE_BYTES = 64 * 1024


# libpq's names for the methods a database may authenticate a client with ("none": it lets
# the client in without asking, as trust and peer do).
UpstreamAuthMethod = Literal["scram-sha-256", "md5", "password", "none"]
UPSTREAM_AUTH_METHODS: tuple[str, ...] = get_args(UpstreamAuthMethod)


class UpstreamSettings(_Strict):
    """The database behind a listener and the service credentials dbward uses for it."""

    host: str = "127.0.0.1"  # a host name, an IP, or a unix-socket directory (starts with /)
    port: int = Field(default=5432, ge=1, le=65535)
    database: str = "postgres"
    user: str = Field(min_length=1)
    password_env: str | None = None
    password_file: Path | None = None
    tls: UpstreamTlsSettings = UpstreamTlsSettings()
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # libpq's require_auth: the methods the database may authenticate dbward with (None: any
    # the rules for connections that are not known to reach the database allow).
    require_auth: tuple[UpstreamAuthMethod, ...] | None = None
    # libpq's channel_binding: require refuses a login whose SCRAM is not bound to the TLS
    # connection (and every method other than SCRAM).
    channel_binding: Literal["disable", "prefer", "require"] = "prefer"

    @field_validator("require_auth", mode="before")
    @classmethod
    def _split_auth_list(cls, value: object) -> object:
        if isinstance(value, str):  # libpq's form: "scram-sha-256,md5"
            return tuple(part.strip() for part in value.split(","))
        return value

    @field_validator("require_auth")
    @classmethod
    def _some_auth(
        cls, value: tuple[UpstreamAuthMethod, ...] | None
    ) -> tuple[UpstreamAuthMethod, ...] | None:
        if value is not None and not value:
            raise ValueError(f"expected at least one of {', '.join(UPSTREAM_AUTH_METHODS)}")
        return value

    @model_validator(mode="after")
    def _one_password_source(self) -> UpstreamSettings:
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("set only one of password_env and password_file")
        return self

    @model_validator(mode="after")
    def _binding_possible(self) -> UpstreamSettings:
        if self.channel_binding != "require":
            return self
        if self.is_unix_socket:
            raise ValueError(
                "channel_binding 'require' needs TLS, which is not used over a unix socket "
                f"(host {self.host}): expected channel_binding 'prefer' or 'disable'"
            )
        if self.tls.mode == "disable":
            raise ValueError(
                "channel_binding 'require' needs TLS: expected tls.mode prefer, require or "
                "verify-full, not disable"
            )
        others = [m for m in self.require_auth or () if m != "scram-sha-256"]
        if others:
            raise ValueError(
                "channel_binding 'require' accepts only SCRAM-SHA-256 with channel binding: "
                f"require_auth must list only scram-sha-256, not {', '.join(others)}"
            )
        return self

    @property
    def is_unix_socket(self) -> bool:
        """True when host names a unix-socket directory, as in libpq."""
        return self.host.startswith("/")

    @property
    def address(self) -> str:
        """Where the database is: host:port, or the unix socket's path."""
        if self.is_unix_socket:
            return f"{self.host.rstrip('/')}/.s.PGSQL.{self.port}"
        return f"{self.host}:{self.port}"

    def read_password(self) -> str | None:
        """The service password from its env var or file; None means no password (trust)."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise LookupError(f"environment variable {self.password_env} is not set")
            return value
        if self.password_file is not None:
            path = self.password_file
            # Read at every login, on the event loop: a file that is not a password (a log,
            # /dev/zero) must not be read whole.
            with path.open("rb") as file:
                raw = file.read(MAX_PASSWORD_FILE_BYTES + 1)
            if len(raw) > MAX_PASSWORD_FILE_BYTES:
                raise ValueError(
                    f"{path} is larger than {MAX_PASSWORD_FILE_BYTES // 1024} KiB: not a "
                    "password file"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # Not the decoder's message: it quotes a byte of the secret and its position.
                raise ValueError(f"{path} is not UTF-8 text") from None
            return text.rstrip("\r\n")
        return None


def check_listen(value: str, *, example_port: int) -> str:
    """A `listen` value: HOST:PORT with HOST an IP address, localhost, * or empty."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"expected HOST:PORT, e.g. 127.0.0.1:{example_port} or [::1]:{example_port}"
        )
    if len(port) > 5 or not 0 < int(port) < 65536:  # (int() refuses 4,300 digits and more)
        shown = port if len(port) <= 10 else port[:10] + "…"
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, not {shown}")
    host = host.strip("[]")
    if host not in ("", "localhost", "*"):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"'{host}' is not an IP address, 'localhost' or '*'") from None
    return value


def _bound_hosts(listen: str) -> set[str]:
    """The addresses a valid `listen` value binds: "0.0.0.0"/"::" stand for every address of
    their family (asyncio binds both for * and an empty host, and localhost's two)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "*"):
        return {"0.0.0.0", "::"}
    if host == "localhost":
        return {"127.0.0.1", "::1"}
    return {str(ipaddress.ip_address(host))}


def listen_addresses_overlap(one: str, other: str) -> bool:
    """True if two valid `listen` values cannot both be bound (same port, an address in common
    or a wildcard of the same family)."""
    if one.rpartition(":")[2] != other.rpartition(":")[2]:
        return False
    for a in _bound_hosts(one):
        for b in _bound_hosts(other):
            if ipaddress.ip_address(a).version != ipaddress.ip_address(b).version:
                continue
            if a == b or a in ("0.0.0.0", "::") or b in ("0.0.0.0", "::"):
                return True
    return False


def listen_host(listen: str) -> str | None:
    """The host part of a valid `listen` value for asyncio (None binds every address)."""
    host = listen.rpartition(":")[0].strip("[]")
    return None if host in ("", "*") else host


class _Listening(_Strict):
    """Settings with a `listen` address ("HOST:PORT"), checked and split the same way."""

    EXAMPLE_PORT: ClassVar[int]  # the port error messages suggest
    if TYPE_CHECKING:
        # Declared by each subclass, so the field keeps its place among the subclass's own.
        listen: str

    @field_validator("listen", mode="before", check_fields=False)
    @classmethod
    def _port_alone(cls, value: object) -> object:
        # YAML reads `listen: 6432` as a number: say what is missing, not "a valid string".
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:{value}, not a port alone")
        return value

    @field_validator("listen", check_fields=False)
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return check_listen(value, example_port=cls.EXAMPLE_PORT)

    @property
    def listen_host(self) -> str | None:
        """Host part for asyncio (None binds every address)."""
        return listen_host(self.listen)

    @property
    def listen_port(self) -> int:
        """Port part of listen."""
        return int(self.listen.rpartition(":")[2])


class ListenerSettings(_Listening):
    """One listening socket, the protocol it speaks and the upstream it fronts."""

    EXAMPLE_PORT = 6432
    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")
    protocol: Literal["postgres"] = "postgres"
    listen: str = "127.0.0.1:6432"
    tls: ClientTlsSettings = ClientTlsSettings()
    upstream: UpstreamSettings
    max_message_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # A message is buffered whole until its last byte arrives (and then copied): all sessions
    # of the listener together may hold this much in unfinished messages.
    max_partial_message_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=1024 * 1024, le=64 * 1024 * 1024 * 1024
    )
    # ... and a large one (1 MiB or more) must be complete this long after its header arrived:
    # a client sending one byte now and then held its share of that budget for good.
    partial_message_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Parsing takes about 100 times the SQL text in memory (a 24.6 MB INSERT: 2.4 GB, 5.8 s):
    # longer SQL is refused unparsed, so one statement cannot exhaust the host's memory.
    max_statement_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    auth_timeout_s: float = Field(default=30.0, gt=0, le=600)
    cancel_rate_per_s: float = Field(default=5.0, gt=0, le=10_000)
    # Failed logins per client address (an IPv6 /64 as one): this many in a row, then one
    # more per 1 / auth_fail_rate_per_s seconds; past it logins are refused (28000) before
    # any SCRAM work. 0 turns the throttle off.
    auth_fail_burst: int = Field(default=10, ge=0, le=1_000_000)
    auth_fail_rate_per_s: float = Field(default=0.2, gt=0, le=10_000)
    # Each client session holds one upstream connection: cap them before PostgreSQL's own
    # max_connections is exhausted by one noisy client.
    max_connections: int = Field(default=500, ge=1, le=100_000)
    # Connections from one client address that have not authenticated yet. Before login a
    # client needs no credentials: without a cap one host held max_connections (locking
    # everyone out) and any number of sockets more, each for auth_timeout_s.
    max_unauthenticated_per_host: int = Field(default=128, ge=1, le=100_000)

    @model_validator(mode="after")
    def _partial_budget_holds_a_message(self) -> ListenerSettings:
        if self.max_partial_message_bytes < self.max_message_bytes:
            raise ValueError(
                f"max_partial_message_bytes ({self.max_partial_message_bytes}) must be at least "
                f"max_message_bytes ({self.max_message_bytes}): the largest message accepted "
                "must fit"
            )
        return self


class MetricsSettings(_Listening):
    """The operations endpoint: /metrics (Prometheus), /healthz and /readyz over plain HTTP.

    It has no authentication: bind it to localhost or a private interface.
    """

    EXAMPLE_PORT = 9187
    listen: str


class Config(_Strict):
    """The whole configuration file."""

    listeners: tuple[ListenerSettings, ...] = Field(min_length=1)
    users: tuple[UserSettings, ...] = ()
    audit: AuditSettings = AuditSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_s: float = Field(default=30.0, ge=0, le=3600)
    # Statements accepted in one query string (each costs the shared event loop two audit
    # records); a larger string is refused whole with SQLSTATE 54000.
    max_statements_per_query: int = Field(default=DEFAULT_MAX_STATEMENTS, ge=1, le=1_000_000)
    # dbward's secret for the fake SCRAM salts of unknown user names, created on first start;
    # default: dbward-auth.key in the audit log's folder. Replicas should share one.
    auth_secret_file: Path | None = None
    # The operations endpoint (/metrics, /healthz, /readyz); None: no HTTP listener at all.
    metrics: MetricsSettings | None = None

    @property
    def auth_secret_path(self) -> Path:
        """Where the auth secret is kept (auth_secret_file, or beside the audit log)."""
        if self.auth_secret_file is not None:
            return self.auth_secret_file
        return self.audit.path.parent / "dbward-auth.key"

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for label, names in (
            ("listeners", [listener.name for listener in self.listeners]),
            ("users", [user.name for user in self.users]),
        ):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"{label}: the name '{name}' is used twice")
                seen.add(name)
        return self

    @model_validator(mode="after")
    def _distinct_addresses(self) -> Config:
        # Found here, by check-config too, rather than as "address already in use" (exit 1)
        # once serve has bound the first of them.
        keyed = [(f"listeners[{i}].listen", item.listen) for i, item in enumerate(self.listeners)]
        if self.metrics is not None:
            keyed.append(("metrics.listen", self.metrics.listen))
        for index, (key, listen) in enumerate(keyed):
            for earlier_key, earlier in keyed[:index]:
                if listen_addresses_overlap(listen, earlier):
                    raise ValueError(
                        f"{key}: {listen} overlaps {earlier_key} ({earlier}): each listener "
                        "and the metrics endpoint need an address of their own"
                    )
        return self
