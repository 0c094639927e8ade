"""The configuration the docs show is the configuration dbward reads.

Every ```yaml block in README.md and docs/ is a dbward.yaml example: it must load through the
real loader. docs/configuration.md's tables must list exactly the keys of the model, with the
model's defaults, bounds and allowed values, so neither can drift from the other unnoticed.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dbward.config.loader import load_config
from dbward.config.model import (
    AuditSettings,
    Config,
    ListenerSettings,
    MetricsSettings,
    UpstreamSettings,
    UserSettings,
)
from dbward.wire.postgres.scram import make_verifier

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGURATION = ROOT / "docs" / "configuration.md"

# What an example writes where a value of the reader's own belongs.
_PLACEHOLDER_VERIFIER = "SCRAM-SHA-256$4096:…"

_FENCE = re.compile(r"^```yaml\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _yaml_examples() -> list[tuple[str, str]]:
    examples = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for found in _FENCE.finditer(text):
            line = text.count("\n", 0, found.start()) + 1
            examples.append((f"{path.relative_to(ROOT)}:{line}", found.group(1)))
    return examples


_EXAMPLES = _yaml_examples()


def test_the_docs_have_yaml_examples() -> None:
    assert _EXAMPLES, "no ```yaml block found: the test below would check nothing"


@pytest.mark.parametrize(("where", "example"), _EXAMPLES, ids=[w for w, _ in _EXAMPLES])
def test_every_yaml_example_in_the_docs_loads(tmp_path: Path, where: str, example: str) -> None:
    text = example.replace(_PLACEHOLDER_VERIFIER, make_verifier("example password"))
    path = tmp_path / "dbward.yaml"
    path.write_text(text, encoding="utf-8")
    load_config(path)  # raises ConfigError naming the key that is wrong


# ------------------------------------------------------------------ configuration.md tables

# Section heading of configuration.md -> the model its table documents.
_SECTIONS: dict[str, type[BaseModel]] = {
    "Top level": Config,
    "`users[]`": UserSettings,
    "`listeners[]`": ListenerSettings,
    "`listeners[].upstream`": UpstreamSettings,
    "`audit`": AuditSettings,
    "`metrics`": MetricsSettings,
}
# Keys whose default the table explains in words instead of showing a value.
_DEFAULTS_IN_WORDS = {("Top level", "audit"), ("Top level", "auth_secret_file")}


def _tables() -> dict[str, list[tuple[list[str], str, str]]]:
    """Section -> rows of (keys, default cell, meaning cell) of the table under that heading."""
    tables: dict[str, list[tuple[list[str], str, str]]] = {}
    section = ""
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        if section not in _SECTIONS or not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        keys = re.findall(r"`([^`]+)`", cells[0])
        assert len(cells) == 3, f"{section}: a row of three cells expected: {line[:60]}"
        tables.setdefault(section, []).append((keys, cells[1], cells[2]))
    return tables


_TABLES = _tables()


def _fields(model: type[BaseModel], documented: set[str]) -> dict[str, FieldInfo]:
    """The model's keys as the table names them: a nested settings model (tls) by its own
    keys (tls.mode), unless the table documents it as one key (upstream, audit)."""
    out: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        nested = info.annotation
        if name not in documented and isinstance(nested, type) and issubclass(nested, BaseModel):
            for sub, sub_info in nested.model_fields.items():
                out[f"{name}.{sub}"] = sub_info
        else:
            out[name] = info
    return out


def _normal(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_normal(v) for v in value]
    return value


def test_configuration_md_documents_every_section() -> None:
    assert set(_TABLES) == set(_SECTIONS)


@pytest.mark.parametrize("section", list(_SECTIONS))
def test_configuration_md_lists_exactly_the_models_keys(section: str) -> None:
    documented = [key for keys, _, _ in _TABLES[section] for key in keys]
    assert len(documented) == len(set(documented)), documented
    fields = _fields(_SECTIONS[section], set(documented))
    assert sorted(documented) == sorted(fields)


@pytest.mark.parametrize("section", list(_SECTIONS))
def test_configuration_md_shows_the_models_defaults(section: str) -> None:
    fields = _fields(_SECTIONS[section], {k for keys, _, _ in _TABLES[section] for k in keys})
    in_words = set()
    for keys, cell, _ in _TABLES[section]:
        for key in keys:
            info = fields[key]
            if cell.startswith("(required"):
                assert info.is_required(), key
                continue
            assert not info.is_required(), f"{key} is required, the table shows {cell!r}"
            if cell.startswith("—"):
                assert info.default is None, f"{key}: default {info.default!r}, shown {cell!r}"
                continue
            literal = re.fullmatch(r"`([^`]*)`|([0-9][0-9,]*)", cell)
            if literal is None:
                in_words.add((section, key))
                continue
            shown = yaml.safe_load(literal.group(1) or literal.group(2).replace(",", ""))
            default = _normal(info.get_default(call_default_factory=True))
            if isinstance(default, BaseModel):
                pytest.fail(f"{key}: a settings model, shown as {cell!r}")
            assert shown == default, f"{key}: the model's default is {default!r}, shown {cell!r}"
    assert in_words == {k for k in _DEFAULTS_IN_WORDS if k[0] == section}


# Numbers as the tables write them: 1,000,000, 3600, 0.2, 64 KiB, 1 GiB.
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?:\s*(KiB|MiB|GiB))?")
_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _numbers(text: str) -> set[float]:
    """Every number a meaning cell mentions."""
    return {
        float(digits.replace(",", "")) * _UNITS.get(unit, 1)
        for digits, unit in _NUMBER.findall(text)
    }


def _bounds(info: FieldInfo) -> list[tuple[str, float]]:
    """The field's numeric bounds and length limits (a minimum length of 1 is "required")."""
    out = []
    for item in info.metadata:
        if isinstance(item, annotated_types.MinLen):
            if item.min_length > 1:
                out.append(("min_length", float(item.min_length)))
            continue
        for kind in ("ge", "gt", "le", "lt", "max_length"):
            value = getattr(item, kind, None)
            if value is not None:
                out.append((kind, float(value)))
    return out


def _allowed_values(annotation: Any) -> list[str]:
    """The values a Literal field takes (also inside a tuple or an Optional)."""
    if typing.get_origin(annotation) is Literal:
        return [str(value) for value in typing.get_args(annotation)]
    return [value for arg in typing.get_args(annotation) for value in _allowed_values(arg)]


def _rows(section: str) -> list[tuple[str, FieldInfo, str]]:
    """(key, field, meaning cell) for each documented key the model has."""
    keys = {k for keys, _, _ in _TABLES[section] for k in keys}
    fields = _fields(_SECTIONS[section], keys)
    return [
        (key, fields[key], meaning)
        for keys, _, meaning in _TABLES[section]
        for key in keys
        if key in fields
    ]


@pytest.mark.parametrize("section", list(_SECTIONS))
def test_configuration_md_shows_the_models_bounds(section: str) -> None:
    problems = []
    for key, info, meaning in _rows(section):
        for kind, value in _bounds(info):
            if kind == "gt" and value == 0:
                # A timeout or rate of 0 is refused, not read as "off": say so.
                if "more than 0" not in meaning:
                    problems.append(f"{key}: must be more than 0, which the table does not say")
            elif value not in _numbers(meaning):
                problems.append(f"{key}: the model's {kind} {value:,.0f} is not in the table")
    assert not problems, problems


@pytest.mark.parametrize("section", list(_SECTIONS))
def test_configuration_md_names_every_allowed_value(section: str) -> None:
    missing = [
        f"{key}: `{value}`"
        for key, info, meaning in _rows(section)
        for value in _allowed_values(info.annotation)
        if f"`{value}`" not in meaning
    ]
    assert not missing, missing


def test_the_table_readers_find_what_they_look_for() -> None:
    """So that the two tests above, passing, have checked something."""
    rows = {key: (info, meaning) for key, info, meaning in _rows("`listeners[]`")}
    info, meaning = rows["max_message_bytes"]
    assert _bounds(info) == [("ge", 1024.0), ("le", 1024.0**3)]
    assert {1024.0, 1024.0**3} <= _numbers(meaning)
    assert _numbers("0 to 1,000,000, 0.2 and 64 GiB") == {0.0, 1e6, 0.2, 64.0 * 1024**3}
    assert _bounds(rows["name"][0]) == [("max_length", 63.0)]
    assert _allowed_values(rows["tls.mode"][0].annotation) == ["disabled", "optional", "required"]
    assert _allowed_values(UpstreamSettings.model_fields["require_auth"].annotation) == [
        "scram-sha-256",
        "md5",
        "password",
        "none",
    ]
