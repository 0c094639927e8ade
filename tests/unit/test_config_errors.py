"""Configuration errors name the key that has the problem, and only real problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbward.config import parse_config
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
        "listeners: Tuple should have at least 1 item after validation, not 0"
    ]


def test_partial_message_timeout_has_a_default_and_bounds() -> None:
    config = parse_config({"listeners": [_listener()]}, base_dir=Path("/"))
    assert config.listeners[0].partial_message_timeout_s == 60.0
    for bad, why in ((0, "greater than 0"), (-1, "greater than 0"), (3601, "less than or equal")):
        listener = {**_listener(), "partial_message_timeout_s": bad}
        (problem,) = _problems({"listeners": [listener]})
        assert problem.startswith("listeners[0].partial_message_timeout_s: Input should be")
        assert why in problem
