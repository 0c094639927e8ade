"""Configuration errors name the key that has the problem, and only real problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbward.config import parse_config, upstream_password_problems
from dbward.core.errors import ConfigError


def _listener(**upstream: object) -> dict[str, object]:
    return {"name": "l", "upstream": {"user": "svc", **upstream}}


def _problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=Path("/"))
    lines = caught.value.message.splitlines()
    assert lines[0] == "invalid configuration:"
    return [line.strip() for line in lines[1:]]


def test_a_bad_value_in_the_only_listener_is_the_only_problem_reported() -> None:
    problems = _problems({"listeners": [_listener(port="abc")]})
    assert len(problems) == 1, problems
    assert problems[0].startswith("listeners[0].upstream.port: Input should be a valid integer")


def test_an_empty_listener_list_is_reported() -> None:
    assert _problems({"listeners": []}) == [
        "listeners: List should have at least 1 item after validation, not 0"
    ]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (
            {"require_auth": ["scram-sha-256", "sha1"]},
            "listeners[0].upstream.require_auth[1]: Input should be 'scram-sha-256', 'md5', "
            "'password' or 'none'",
        ),
        (
            {"require_auth": []},
            "listeners[0].upstream.require_auth: expected at least one of scram-sha-256, md5, "
            "password, none",
        ),
        (
            {"channel_binding": "on"},
            "listeners[0].upstream.channel_binding: Input should be 'disable', 'prefer' or "
            "'require'",
        ),
        (
            {"channel_binding": "require", "tls": {"mode": "disable"}},
            "listeners[0].upstream: channel_binding 'require' needs TLS: expected tls.mode "
            "prefer, require or verify-full, not disable",
        ),
        (
            {"channel_binding": "require", "host": "/run/postgresql"},
            "listeners[0].upstream: channel_binding 'require' needs TLS, which is not used over "
            "a unix socket (host /run/postgresql): expected channel_binding 'prefer' or 'disable'",
        ),
        (
            {"channel_binding": "require", "require_auth": "scram-sha-256,md5"},
            "listeners[0].upstream: channel_binding 'require' accepts only SCRAM-SHA-256 with "
            "channel binding: require_auth must list only scram-sha-256, not md5",
        ),
    ],
    ids=["unknown-method", "empty", "binding-value", "binding-no-tls", "binding-unix", "md5"],
)
def test_upstream_auth_settings_name_the_key_and_what_is_expected(
    upstream: dict[str, object], expected: str
) -> None:
    assert _problems({"listeners": [_listener(**upstream)]}) == [expected]


def test_require_auth_accepts_libpq_comma_list() -> None:
    config = parse_config(
        {"listeners": [_listener(require_auth="scram-sha-256, md5", channel_binding="disable")]},
        base_dir=Path("/"),
    )
    upstream = config.listeners[0].upstream
    assert (upstream.require_auth, upstream.channel_binding) == (
        ("scram-sha-256", "md5"),
        "disable",
    )


def test_every_relative_file_path_is_resolved_against_the_config_directory() -> None:
    # configuration.md: "Relative file paths are resolved against the directory of the
    # configuration file" -- auth_secret_file was left relative to the working directory, so
    # `serve` started elsewhere created a second secret (and new fake salts) there.
    listener = {
        "name": "l",
        "tls": {"mode": "required", "cert_file": "tls.crt", "key_file": "tls.key"},
        "upstream": {
            "user": "svc",
            "password_file": "pw",
            "tls": {"mode": "verify-full", "ca_file": "ca.pem"},
        },
    }
    data = {"listeners": [listener], "audit": {"path": "audit.db"}, "auth_secret_file": "auth.key"}
    config = parse_config(data, base_dir=Path("/etc/dbward"))
    up = config.listeners[0].upstream
    paths = [
        config.listeners[0].tls.cert_file,
        config.listeners[0].tls.key_file,
        up.password_file,
        up.tls.ca_file,
        config.audit.path,
        config.auth_secret_file,
        config.auth_secret_path,
    ]
    assert all(p is not None and p.parent == Path("/etc/dbward") for p in paths), paths


def test_a_user_verifier_below_4096_iterations_is_refused() -> None:
    """A verifier is what a leaked configuration hands an offline guesser; one iteration was
    accepted (hash-password writes at least 4096)."""
    from dbward.wire.postgres.scram import make_verifier

    weak = make_verifier("pw", iterations=1024)
    data = {"listeners": [_listener()], "users": [{"name": "u", "password_verifier": weak}]}
    assert _problems(data) == [
        "users[0].password_verifier: expected at least 4096 SCRAM iterations, got "
        "1024 (hash the password again with 'dbward users hash-password')"
    ]
    strong = make_verifier("pw", iterations=4096)
    parse_config(
        {"listeners": [_listener()], "users": [{"name": "u", "password_verifier": strong}]},
        base_dir=Path("/"),
    )


def test_partial_message_timeout_has_a_default_and_bounds() -> None:
    config = parse_config({"listeners": [_listener()]}, base_dir=Path("/"))
    assert config.listeners[0].partial_message_timeout_s == 60.0
    for bad, why in ((0, "greater than 0"), (-1, "greater than 0"), (3601, "less than or equal")):
        listener = {**_listener(), "partial_message_timeout_s": bad}
        (problem,) = _problems({"listeners": [listener]})
        assert problem.startswith("listeners[0].partial_message_timeout_s: Input should be")
        assert why in problem


def test_failed_login_throttle_keys_have_defaults_bounds_and_an_off_switch() -> None:
    listener = parse_config({"listeners": [_listener()]}, base_dir=Path("/")).listeners[0]
    assert (listener.auth_fail_burst, listener.auth_fail_rate_per_s) == (10, 0.2)
    off = {**_listener(), "auth_fail_burst": 0}
    assert parse_config({"listeners": [off]}, base_dir=Path("/")).listeners[0].auth_fail_burst == 0
    for key, bad, why in (
        ("auth_fail_burst", -1, "greater than or equal to 0"),
        ("auth_fail_burst", 1_000_001, "less than or equal to 1000000"),
        ("auth_fail_burst", 2.5, "valid integer"),
        ("auth_fail_rate_per_s", 0, "greater than 0"),
        ("auth_fail_rate_per_s", -0.5, "greater than 0"),
        ("auth_fail_rate_per_s", 10_001, "less than or equal to 10000"),
        ("auth_fail_rate_per_s", "fast", "valid number"),
    ):
        (problem,) = _problems({"listeners": [{**_listener(), key: bad}]})
        assert problem.startswith(f"listeners[0].{key}: Input should be"), problem
        assert why in problem, problem


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # YAML has lists and mappings: pydantic's "tuple" and model class names mean nothing
        # to someone editing dbward.yaml.
        ({"listeners": {}}, "listeners: Input should be a list"),
        ({"listeners": [_listener()], "users": "alice"}, "users: Input should be a list"),
        (
            {"listeners": [_listener()], "users": ["alice"]},
            "users[0]: Input should be a mapping (key: value)",
        ),
        (
            {"listeners": [{"name": "l", "upstream": "db.internal"}]},
            "listeners[0].upstream: Input should be a mapping (key: value)",
        ),
        (
            {"listeners": [{"name": "l", "tls": "required", "upstream": {"user": "u"}}]},
            "listeners[0].tls: Input should be a mapping (key: value)",
        ),
        ({"listeners": [_listener()], "audit": "a.db"}, "audit: Input should be a mapping"),
        (
            {"listeners": [_listener(require_auth=5)]},
            "listeners[0].upstream.require_auth: Input should be a list",
        ),
        # A port alone, or one out of range, says so.
        (
            {"listeners": [{"name": "l", "listen": 6432, "upstream": {"user": "u"}}]},
            "listeners[0].listen: expected HOST:PORT, e.g. 127.0.0.1:6432, not a port alone",
        ),
        (
            {"listeners": [{"name": "l", "listen": "127.0.0.1:99999", "upstream": {"user": "u"}}]},
            "listeners[0].listen: expected HOST:PORT with a port from 1 to 65535, not 99999",
        ),
        (
            {"listeners": [{"name": "l", "listen": "0.0.0.0:0", "upstream": {"user": "u"}}]},
            "listeners[0].listen: expected HOST:PORT with a port from 1 to 65535, not 0",
        ),
        (
            {"listeners": [{"name": "l", "listen": "*:" + "9" * 5000, "upstream": {"user": "u"}}]},
            "listeners[0].listen: expected HOST:PORT with a port from 1 to 65535, not 9999999999…",
        ),
    ],
    ids=[
        "listeners-mapping",
        "users-string",
        "user-string",
        "upstream-string",
        "tls-string",
        "audit-string",
        "require-auth-number",
        "listen-port-alone",
        "listen-port-too-large",
        "listen-port-zero",
        "listen-port-5000-digits",
    ],
)
def test_wrong_types_are_named_in_yaml_terms(data: dict[str, object], expected: str) -> None:
    problems = _problems(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems
    for word in ("tuple", "Tuple", "Settings", "instance of"):
        assert word not in problems[0], problems


def test_an_empty_upstream_password_is_a_problem_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL has no empty passwords: an empty variable or file (`VAR=$(cat missing)`) is a
    mistake, reported when dbward starts rather than by every client's failed login."""
    empty_file = tmp_path / "password"
    empty_file.write_text("\n")
    config = parse_config(
        {
            "listeners": [
                _listener(password_env="DBWARD_TEST_EMPTY_PW"),
                {
                    "name": "m",
                    "listen": "127.0.0.1:6433",  # not the first one's (the default)
                    "upstream": {"user": "svc", "password_file": str(empty_file)},
                },
            ]
        },
        base_dir=tmp_path,
    )
    monkeypatch.setenv("DBWARD_TEST_EMPTY_PW", "")
    assert upstream_password_problems(config) == [
        (
            "listeners[0].upstream.password_env",
            "the environment variable DBWARD_TEST_EMPTY_PW is empty",
        ),
        ("listeners[1].upstream.password_file", f"{empty_file} is empty"),
    ]
    monkeypatch.setenv("DBWARD_TEST_EMPTY_PW", "secret")
    empty_file.write_text("secret\n")
    assert upstream_password_problems(config) == []


def test_a_yaml_boolean_is_not_taken_for_a_number() -> None:
    """YAML 1.1 reads yes/no/on/off as booleans, which pydantic took as 1 and 0:
    `auth_fail_burst: off` turned the failed-login throttle off, `auth_timeout_s: yes` was 1 s."""
    import yaml

    text = """
listeners:
  - name: l
    auth_fail_burst: off
    auth_timeout_s: yes
    upstream: {user: svc, port: on}
audit: {max_delay_ms: true}
"""
    assert sorted(_problems(yaml.safe_load(text))) == [
        "audit.max_delay_ms: expected a number, not the boolean true",
        "listeners[0].auth_fail_burst: expected a number, not the boolean false",
        "listeners[0].auth_timeout_s: expected a number, not the boolean true",
        "listeners[0].upstream.port: expected a number, not the boolean true",
    ]


def test_a_path_starting_with_a_tilde_is_not_taken_for_a_folder_named_tilde() -> None:
    """Review r61: `audit.path: ~/audit.db` was resolved against the configuration's folder,
    so dbward wrote its log into a new folder literally named "~" there."""
    problems = _problems(
        {
            "listeners": [_listener(password_file="~/pw")],
            "audit": {"path": "~dbward/audit.db"},
            "auth_secret_file": "sub/~/ok.key",  # only a leading ~ is the shell's
        }
    )
    assert problems == [
        "listeners[0].upstream.password_file: ~/pw: '~' is not expanded here; give the full path",
        "audit.path: ~dbward/audit.db: '~' is not expanded here; give the full path",
    ]
