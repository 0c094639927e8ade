"""Read dbward.yaml into a Config, turning every problem into a ConfigError naming the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from dbward.config.model import Config
from dbward.core.errors import ConfigError


def _format_location(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a YAML-ish key path: listeners[0].upstream.port."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: ErrorDetails) -> str:
    """pydantic's message in the YAML file's terms: the models hold lists as tuples and
    sections as classes, which a reader of dbward.yaml has never heard of."""
    kind = err["type"]
    if kind == "tuple_type":
        return "Input should be a list"
    if kind == "model_type":
        return "Input should be a mapping (key: value)"
    message = err["msg"].removeprefix("Value error, ")
    if kind in ("too_short", "too_long"):
        message = message.replace("Tuple should", "List should", 1)
    return message


def parse_config(data: Any, *, base_dir: Path) -> Config:
    """Validate already-parsed YAML data; relative paths are resolved against base_dir."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a mapping at the top level")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = []
        for err in errors:
            if err["type"] == "too_short" and any(
                other["loc"][: len(err["loc"])] == err["loc"]
                and len(other["loc"]) > len(err["loc"])
                for other in errors
            ):
                # pydantic drops an invalid item and then also reports the list as too short
                # ("listeners: should have at least 1 item"): only the item's own error is real.
                continue
            if not err["loc"]:
                # Checks across sections (Config's own validators) name their keys themselves.
                problems.append(_message(err))
            else:
                problems.append(f"{_format_location(err['loc'])}: {_message(err)}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
    return _resolve_paths(config, base_dir)


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    """Make every file path absolute relative to the config file's directory."""
    problems: list[str] = []

    def fix(key: str, path: Path | None) -> Path | None:
        if path is None or path.is_absolute():
            return path
        if path.parts[0].startswith("~"):
            # Not a shell: "~/audit.db" would be a folder named "~" beside this file.
            problems.append(f"{key}: {path}: '~' is not expanded here; give the full path")
            return path
        return (base_dir / path).resolve()

    listeners = []
    for index, listener in enumerate(config.listeners):
        at = f"listeners[{index}]"
        tls = listener.tls.model_copy(
            update={
                "cert_file": fix(f"{at}.tls.cert_file", listener.tls.cert_file),
                "key_file": fix(f"{at}.tls.key_file", listener.tls.key_file),
            }
        )
        up = listener.upstream
        up_tls = up.tls.model_copy(
            update={"ca_file": fix(f"{at}.upstream.tls.ca_file", up.tls.ca_file)}
        )
        upstream = up.model_copy(
            update={
                "password_file": fix(f"{at}.upstream.password_file", up.password_file),
                "tls": up_tls,
            }
        )
        listeners.append(listener.model_copy(update={"tls": tls, "upstream": upstream}))
    audit = config.audit.model_copy(update={"path": fix("audit.path", config.audit.path)})
    auth_secret_file = fix("auth_secret_file", config.auth_secret_file)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config.model_copy(
        update={
            "listeners": tuple(listeners),
            "audit": audit,
            "auth_secret_file": auth_secret_file,
        }
    )


# Larger is not a configuration (a log, a database, /dev/zero given by mistake): refused
# before it is read whole into memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last of two equal keys without a word, so a section or a setting written
    twice (`audit:` at the top and again further down) would silently lose one of them. Keys a
    merge (`<<: *defaults`) brings in may still be overridden: that is what merges are for.
    """

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}  # key -> the line it was first given on
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=False)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the SafeLoader refuses it itself
                continue
            if first is not None:
                raise ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice in one mapping (first on line {first + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path) -> str:
    """The file's text; ConfigError if it cannot be read, is too large or is not UTF-8."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB: not a dbward "
            "configuration file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The byte itself is not shown: it may be part of a secret pasted into the wrong file.
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (line {line}, byte {exc.start + 1} of the file)"
        ) from None


def load_config(path: Path) -> Config:
    """Load and validate a YAML configuration file."""
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, base_dir=path.resolve().parent)


def upstream_password_problems(config: Config) -> list[tuple[str, str]]:
    """Read every listener's upstream password once: (key, problem) for each that fails.

    The password is read again at every connection (so a rotated file needs no restart); this
    is the check at start, so a missing variable or unreadable file is not first noticed by a
    client's failed login.
    """
    problems = []
    for index, listener in enumerate(config.listeners):
        upstream = listener.upstream
        key = f"listeners[{index}].upstream"
        # PostgreSQL has no empty passwords (it refuses them at login): an empty variable or
        # file is a mistake (VAR=$(cat missing)), said here rather than by each failed login.
        if upstream.password_env is not None:
            value = os.environ.get(upstream.password_env)
            if value is None or value == "":
                state = "is not set" if value is None else "is empty"
                problems.append(
                    (
                        f"{key}.password_env",
                        f"the environment variable {upstream.password_env} {state}",
                    )
                )
        elif upstream.password_file is not None:
            try:
                if upstream.read_password() == "":
                    problems.append((f"{key}.password_file", f"{upstream.password_file} is empty"))
            except OSError as exc:
                reason = exc.strerror or str(exc)
                problems.append(
                    (f"{key}.password_file", f"cannot read {upstream.password_file}: {reason}")
                )
            except ValueError as exc:  # not UTF-8, or too large: the message says which
                problems.append((f"{key}.password_file", str(exc)))
    return problems


def secret_file_warnings(config: Config) -> list[tuple[str, str]]:
    """(key, warning) for each secret file other users can read (group or world access).

    A warning, not an error: some platforms mount secrets readable by all (Kubernetes secret
    volumes are 0644 unless defaultMode says otherwise), and the file may be shared on purpose.
    """
    files: list[tuple[str, Path]] = [
        (f"listeners[{index}].upstream.password_file", listener.upstream.password_file)
        for index, listener in enumerate(config.listeners)
        if listener.upstream.password_file is not None
    ]
    files.append(("auth_secret_file", config.auth_secret_path))
    warnings = []
    for key, path in files:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # missing or unreadable: reported (or created) elsewhere
        if mode & 0o077:
            warnings.append(
                (
                    key,
                    f"{path} is open to other users (mode {mode & 0o777:04o}): "
                    f"restrict it to dbward's user (chmod 600 {path})",
                )
            )
    return warnings
