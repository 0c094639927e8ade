"""Shared pytest setup: fixture plugins and automatic markers."""

from __future__ import annotations

from pathlib import Path

import pytest

# tests/ is on sys.path (rootdir conftest, no tests/__init__.py), so `fixtures` is importable.
pytest_plugins = [
    "fixtures.ports",
    "fixtures.tls",
    "fixtures.postgres",
    "fixtures.proxy",
    "fixtures.foreign_clients",
]

_E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e gets the `e2e` marker (select with -m e2e / -m 'not e2e')."""
    for item in items:
        if _E2E_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
