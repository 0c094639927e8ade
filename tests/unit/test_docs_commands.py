"""Every `dbward` command line the docs show parses as the command line dbward has.

The lines come from the ```sh blocks of README.md and docs/ and from inline code that runs
`dbward` with options; each is parsed by click as `dbward` would parse it (nothing is run), so
an option renamed or removed in the code, or mistyped in the docs, fails here. Inline code that
ends with an option names it (`dbward audit search --identity` finds …): that option must exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from dbward.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_SH_BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`((?:\.venv/bin/)?dbward [^`]*\s-[^`]*)`")
# A line that runs dbward: optional VAR=value assignments, then dbward (or .venv/bin/dbward).
_RUNS_DBWARD = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(?:\.venv/bin/)?dbward\s+(.*)$")


def _command_lines() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        spans = [(m.start(1), m.group(1)) for m in _SH_BLOCK.finditer(text)]
        # Markdown reads a line break inside inline code as a space.
        spans += [(m.start(1), m.group(1).replace("\n", " ")) for m in _INLINE.finditer(text)]
        for start, span in spans:
            for offset, raw in enumerate(span.splitlines()):
                line = raw.split(" #", 1)[0].split(" | ", 1)[0].strip()  # comment, a pipe
                match = _RUNS_DBWARD.match(line)
                if match is not None:
                    where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, start) + 1 + offset}"
                    found.append((where, match.group(1)))
    return found


_LINES = _command_lines()


def _parse(args: list[str]) -> click.Command:
    """Parse a command line as `dbward` does, down to its (sub)command; UsageError if wrong."""
    command: click.Command = cli
    parent = None
    name = "dbward"
    while True:
        ctx = command.make_context(name, list(args), parent=parent)
        if not isinstance(command, click.Group):
            return command
        rest = [*ctx._protected_args, *ctx.args]
        sub_name, sub, args = command.resolve_command(ctx, rest)
        assert sub is not None and sub_name is not None
        command, parent, name = sub, ctx, sub_name


def test_the_docs_show_dbward_command_lines() -> None:
    assert len(_LINES) >= 15, _LINES  # the reader finds them: the test below checks something


@pytest.mark.parametrize(("where", "line"), _LINES, ids=[where for where, _ in _LINES])
def test_every_dbward_command_line_in_the_docs_parses(where: str, line: str) -> None:
    args = shlex.split(line.replace("…", "x"))
    named = args.pop() if args[-1].startswith("--") and "=" not in args[-1] else None
    command = _parse(args)
    assert not isinstance(command, click.Group), f"{where}: {line} names no command"
    if named is not None:  # an option the text talks about, or a flag
        options = {opt for param in command.params for opt in param.opts}
        assert named in options, f"{where}: {command.name} has no option {named}"


def test_a_wrong_option_is_caught() -> None:
    with pytest.raises(click.UsageError):
        _parse(["audit", "tail", "--no-such-option"])
    with pytest.raises(click.UsageError):
        _parse(["audit", "nope"])
    assert _parse(["audit", "search", "--since", "1h"]).name == "search"
