"""Every `ggfwd` command in the README and docs/usage.md parses as written: the subcommand exists, every option
and argument is accepted with its value's type (click parses them exactly as the shell would hand them over;
nothing runs). A renamed or removed flag, or a README that drifted from the CLI, fails here. Files that the
commands read from the repository (docs/examples/...) must exist. What the commands then do is tested by the
command's own tests; the set-up commands themselves run in CI (.ci/run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
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
    group = typer.main.get_command(app)
    args = shlex.split(command, comments=True)[1:]
    ctx = group.make_context("ggfwd", list(args), resilient_parsing=False)
    cmd_name, cmd, rest = group.resolve_command(ctx, ctx.protected_args + ctx.args)
    while isinstance(cmd, click.Group):  # `ggfwd devices compare ...`
        sub = cmd.make_context(cmd_name, list(rest), parent=ctx)
        cmd_name, cmd, rest = cmd.resolve_command(sub, sub.protected_args + sub.args)
        ctx = sub
    try:
        cmd.make_context(cmd_name, list(rest), parent=ctx)
    except click.exceptions.UsageError as exc:
        pytest.fail(f"{where}: `{command}`: {exc.format_message()}")
    for word in args:  # files the repository itself provides
        if word.startswith("docs/"):
            assert (ROOT / word).exists(), f"{where}: {word} is not in the repository"
