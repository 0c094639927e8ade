"""Typed settings and the YAML loader."""

from dbward.config.loader import (
    load_config,
    parse_config,
    secret_file_warnings,
    upstream_password_problems,
)
from dbward.config.model import (
    AuditSettings,
    ClientTlsSettings,
    Config,
    ListenerSettings,
    UpstreamSettings,
    UpstreamTlsSettings,
    UserSettings,
)

__all__ = [
    "AuditSettings",
    "ClientTlsSettings",
    "Config",
    "ListenerSettings",
    "UpstreamSettings",
    "UpstreamTlsSettings",
    "UserSettings",
    "load_config",
    "parse_config",
    "secret_file_warnings",
    "upstream_password_problems",
]
