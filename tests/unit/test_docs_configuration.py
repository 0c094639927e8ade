"""docs/configuration.md against the pydantic models: every key, default, bound and value.

The reference's tables are the configuration's documentation; these tests read them and fail
when a key is added, renamed or removed, a default or a bound changes, or an allowed value is
added, on one side only. Prose (the meanings) is not checked beyond the numbers and values
named here.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dbward.config.model import (
    AuditSettings,
    Config,
    ListenerSettings,
    MetricsSettings,
    UpstreamSettings,
    UserSettings,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Each `## ` section of the reference whose table documents one model.
SECTIONS: dict[str, type[BaseModel]] = {
    "Top level": Config,
    "`users[]`": UserSettings,
    "`listeners[]`": ListenerSettings,
    "`listeners[].upstream`": UpstreamSettings,
    "`audit`": AuditSettings,
    "`metrics`": MetricsSettings,
}
DOCUMENTED_MODELS = set(SECTIONS.values())

_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?:\s*(KiB|MiB|GiB))?")


class Row(typing.NamedTuple):
    keys: tuple[str, ...]
    default: str
    meaning: str


def _sections() -> dict[str, list[Row]]:
    """The table rows under each `## ` heading of the reference."""
    out: dict[str, list[Row]] = {}
    rows: list[Row] | None = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            rows = out.setdefault(line[3:].strip(), [])
            continue
        if rows is None or not line.startswith("| `"):
            continue
        # `\|` in a meaning is a literal bar, not a cell border.
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, f"a key table row has three cells: {line[:80]}"
        keys = tuple(re.findall(r"`([^`]+)`", cells[0]))
        rows.append(Row(keys, cells[1], cells[2]))
    return out


ROWS = _sections()


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (itself, in a tuple, or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _leaf_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """Keys a section's table should list: a field holding a model that has a section of its
    own is one row (`upstream`: see below); one that has none (`tls`) is listed by its keys
    (`tls.mode`)."""
    out: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        inner = _model_in(info.annotation)
        if inner is None or inner in DOCUMENTED_MODELS:
            out[name] = info
        else:
            for sub, sub_info in _leaf_fields(inner).items():
                out[f"{name}.{sub}"] = sub_info
    return out


def _documented(section: str) -> dict[str, Row]:
    """The section's rows by key, for the keys the model has (the others are reported by
    test_the_documented_keys_are_the_models_keys)."""
    fields = _leaf_fields(SECTIONS[section])
    return {key: row for row in ROWS[section] for key in row.keys if key in fields}


def test_every_section_has_a_table() -> None:
    for section in SECTIONS:
        assert ROWS.get(section), f"docs/configuration.md: no key table under '## {section}'"


@pytest.mark.parametrize("section", SECTIONS)
def test_the_documented_keys_are_the_models_keys(section: str) -> None:
    documented = {key for row in ROWS[section] for key in row.keys}
    fields = set(_leaf_fields(SECTIONS[section]))
    assert not documented - fields, f"{section}: documented, no such key: {documented - fields}"
    assert not fields - documented, f"{section}: keys missing from the docs: {fields - documented}"


def _allowed_values(annotation: Any) -> list[str]:
    """The values of a Literal field (also inside a tuple or an Optional)."""
    if typing.get_origin(annotation) is Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return [v for arg in typing.get_args(annotation) for v in _allowed_values(arg)]


def _plain_default(cell: str) -> str | None:
    """The default cell's value when it is one plain value (`30`, `info`, 268435456)."""
    match = re.fullmatch(r"`([^`]+)`|(\d+(?:\.\d+)?)", cell)
    if match is None:
        return None
    return match.group(1) or match.group(2)


def _same(documented: str, default: Any) -> bool:
    if isinstance(default, bool):
        return documented == str(default).lower()
    if isinstance(default, int | float):
        return float(documented) == float(default)
    if isinstance(default, tuple):
        return documented == "[]" and default == ()
    return documented == str(default)


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_defaults_are_the_models(section: str) -> None:
    fields = _leaf_fields(SECTIONS[section])
    for key, row in _documented(section).items():
        info = fields[key]
        if row.default.startswith("(required"):
            assert info.is_required(), f"{section} {key}: documented as required, has a default"
            continue
        assert not info.is_required(), f"{section} {key}: required, documented with a default"
        plain = _plain_default(row.default)
        if plain is not None:
            assert _same(plain, info.default), f"{section} {key}: {plain} != {info.default!r}"
        elif row.default.startswith("—"):
            assert info.default is None, f"{section} {key}: documented as unset by default"
        elif row.default == "see below":
            assert isinstance(info.default, BaseModel), f"{section} {key}: not a section"
        else:
            # Written out in words: the only such default is where auth_secret_file goes.
            assert (section, key) == ("Top level", "auth_secret_file"), (
                f"{section} {key}: a default the test cannot read: {row.default!r}"
            )
            assert info.default is None


def _numbers(text: str) -> set[float]:
    """Every number a meaning cell mentions: 1,000,000 and 64 KiB included."""
    found = set()
    for digits, unit in _NUMBER.findall(text):
        found.add(float(digits.replace(",", "")) * _UNITS.get(unit, 1))
    return found


def _bounds(info: FieldInfo) -> list[tuple[str, float]]:
    out = []
    for item in info.metadata:
        for kind in ("ge", "gt", "le", "lt", "max_length"):
            value = getattr(item, kind, None)
            if value is not None and not isinstance(item, annotated_types.MinLen):
                out.append((kind, float(value)))
        if isinstance(item, annotated_types.MinLen) and item.min_length > 1:
            out.append(("min_length", float(item.min_length)))
    return out


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_ranges_are_the_models(section: str) -> None:
    fields = _leaf_fields(SECTIONS[section])
    problems = []
    for key, row in _documented(section).items():
        mentioned = _numbers(row.meaning)
        for kind, value in _bounds(fields[key]):
            if kind == "gt" and value == 0:
                # "more than 0": a timeout or a rate of 0 is refused, not read as "off".
                if "more than 0" not in row.meaning:
                    problems.append(f"{key}: > 0 is not said ('more than 0')")
            elif value not in mentioned:
                problems.append(f"{key}: its bound {kind} {value:,.0f} is not in the docs")
    assert not problems, f"docs/configuration.md, {section}: {problems}"


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_values_are_the_models(section: str) -> None:
    fields = _leaf_fields(SECTIONS[section])
    problems = [
        f"{key}: `{value}`"
        for key, row in _documented(section).items()
        for value in _allowed_values(fields[key].annotation)
        if f"`{value}`" not in row.meaning
    ]
    assert not problems, f"docs/configuration.md, {section}: values not documented: {problems}"


def test_the_checks_can_fail() -> None:
    """The readers above find what they look for (so a passing test means something)."""
    listeners = _documented("`listeners[]`")
    assert {"tls.mode", "tls.cert_file", "tls.key_file", "upstream"} <= set(listeners)
    assert _plain_default(listeners["max_message_bytes"].default) == "268435456"
    assert {1024.0, 1024.0**3} <= _numbers(listeners["max_message_bytes"].meaning)
    assert _numbers("0 to 1,000,000 and 64 GiB") == {0.0, 1_000_000.0, 64.0 * 1024**3}
    assert _allowed_values(UpstreamSettings.model_fields["require_auth"].annotation) == [
        "scram-sha-256",
        "md5",
        "password",
        "none",
    ]
    assert not _same("5433", 5432) and _same("10", 10.0) and _same("[]", ())
