"""The configuration the docs show is the configuration dbward reads.

Every ```yaml block in README.md and docs/ is a dbward.yaml example: it must load through the
real loader. docs/configuration.md's tables must list exactly the keys of the model, with the
model's defaults, so neither can drift from the other unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def _tables() -> dict[str, list[tuple[list[str], str]]]:
    """Section -> rows of (keys, default cell) of the table under that heading."""
    tables: dict[str, list[tuple[list[str], str]]] = {}
    section = ""
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        if section not in _SECTIONS or not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        keys = re.findall(r"`([^`]+)`", cells[0])
        tables.setdefault(section, []).append((keys, cells[1]))
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
    documented = [key for keys, _ in _TABLES[section] for key in keys]
    assert len(documented) == len(set(documented)), documented
    fields = _fields(_SECTIONS[section], set(documented))
    assert sorted(documented) == sorted(fields)


@pytest.mark.parametrize("section", list(_SECTIONS))
def test_configuration_md_shows_the_models_defaults(section: str) -> None:
    fields = _fields(_SECTIONS[section], {k for keys, _ in _TABLES[section] for k in keys})
    in_words = set()
    for keys, cell in _TABLES[section]:
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
