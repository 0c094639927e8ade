"""The docs carry no merge-conflict markers (ruff finds them in code, nothing in prose)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_MARKER = re.compile(r"^(<{7}|>{7}|={7})( |$)", re.MULTILINE)


def test_no_merge_markers_in_the_docs() -> None:
    texts = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts += sorted((ROOT / "bench").glob("*.md"))
    found = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
        for path in texts
        for text in [path.read_text(encoding="utf-8")]
        for m in _MARKER.finditer(text)
    ]
    assert found == []
