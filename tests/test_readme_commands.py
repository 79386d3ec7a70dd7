"""Every `ggfwd` command in the README and docs/usage.md parses as written: the subcommand exists, every option
and argument is accepted with its value's type (click parses them exactly as the shell would hand them over;
nothing runs). A renamed or removed flag, or a README that drifted from the CLI, fails here. Files that the
commands read from the repository (docs/examples/...) must exist. What the commands then do is tested by the
command's own tests; the set-up commands themselves run in CI (.ci/run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from ggfwd.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "docs" / "usage.md")


def commands(path: Path) -> list[tuple[int, str]]:
    """(line, command) for every `ggfwd ...` command in the file's shell code blocks, continuation lines joined
    and `&&` chains split."""
    out, block, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh", "```shell", "```console")
            continue
        if not block:
            continue
        if not pending:
            start = n
        text = line.rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        full, pending = pending + text, ""
        for part in re.split(r"\s&&\s", full):
            words = shlex.split(part, comments=True)
            if words[:1] == ["ggfwd"]:
                out.append((start, part.strip()))
    return out


ALL = [(f"{p.relative_to(ROOT)}:{n}", c) for p in DOCS for n, c in commands(p)]


def test_the_docs_hold_the_tour_commands():
    names = {shlex.split(c, comments=True)[1] for _, c in ALL}
    assert {"train", "eval", "federate", "serve", "join", "certs", "devices", "convert"} <= names


@pytest.mark.parametrize("where, command", ALL, ids=[w for w, _ in ALL])
def test_readme_command_parses(where, command):
    # Groups are walked by name (`ggfwd devices compare ...`), then the command parses its own words. Duck-typed
    # on purpose: newer typer releases carry a click of their own, so `click.Group` is not the class typer uses.
    args = shlex.split(command, comments=True)[1:]
    cmd, name, rest, parent = typer.main.get_command(app), "ggfwd", list(args), None
    while hasattr(cmd, "get_command"):
        assert rest, f"{where}: `{command}` names no subcommand"
        ctx = cmd.context_class(cmd, info_name=name, parent=parent)
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"{where}: `{command}`: no command {rest[0]!r}"
        cmd, name, rest, parent = sub, rest[0], rest[1:], ctx
    try:
        cmd.make_context(name, rest, parent=parent)
    except Exception as exc:  # click's UsageError (from whichever click typer uses)
        pytest.fail(f"{where}: `{command}`: {getattr(exc, 'format_message', exc.__str__)()}")
    for word in args:  # files the repository itself provides
        if word.startswith("docs/"):
            assert (ROOT / word).exists(), f"{where}: {word} is not in the repository"
