"""Phones under Termux have no torch: the training path must import only numpy, gguf, llama-cpp-python, typer,
rich and psutil (and what those need).

Each command runs in a fresh interpreter through a wrapper that records the modules loaded while the CLI ran
and prints them at exit; the test maps every new top-level module to the distribution that installed it and
requires that distribution to be Python itself, ggfwd, or in the dependency closure of ggfwd's core
requirements (no extras). torch and transformers are named explicitly as well. The checker is tested on a
command that does import a plotting library, so a broken checker fails here too.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys

import pytest

from clirun import TESTS

CORE = ("numpy", "gguf", "llama-cpp-python", "typer", "rich", "psutil")
# Imported by an allowed package when present, not required: gguf/vocab.py tries `from sentencepiece import ...`
# (and mistral_common) and carries on without them. The no-extras CI venv (.ci/termux.sh) has neither.
OPTIONAL_OF_ALLOWED = {"sentencepiece", "mistral_common"}
FORBIDDEN = ("torch", "transformers", "safetensors", "accelerate", "peft", "flwr", "matplotlib")

WRAPPER = r"""
import json, sys
before = set(sys.modules)
sys.argv = ["ggfwd", *json.loads(sys.argv[1])]
code = 0
try:
    from ggfwd.cli import main
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    print("MODULES " + json.dumps(sorted(set(sys.modules) - before)), file=sys.stderr)
sys.exit(code)
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def allowed_distributions() -> set[str]:
    """ggfwd's core requirements (markers naming an extra excluded) and everything they require in turn."""
    allowed, todo = set(), [r for r in md.requires("ggfwd") or [] if "extra ==" not in r]
    assert set(CORE) <= {_name(r) for r in todo}, "ggfwd's core requirements changed: update CORE"
    while todo:
        req = todo.pop()
        name = _name(req)
        if name in allowed:
            continue
        allowed.add(name)
        try:
            todo += [r for r in md.requires(name) or [] if "extra ==" not in r]
        except md.PackageNotFoundError:
            pass  # an optional platform dependency that is not installed here
    return allowed | {"ggfwd"}


def run_wrapped(*args) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps([str(a) for a in args])], cwd=TESTS,
                          capture_output=True, text=True, timeout=600)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("MODULES "))
    return proc, json.loads(line[len("MODULES "):])


def violations(modules: list[str]) -> list[str]:
    """'module (distribution)' for every loaded top-level module from outside the allowed set."""
    dists = md.packages_distributions()
    allowed = allowed_distributions()
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for top in sorted({m.split(".")[0] for m in modules}):
        if top in stdlib or top.startswith("_") and top.lstrip("_") in stdlib:
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(top, [])}
        if top in OPTIONAL_OF_ALLOWED:
            continue
        if top in FORBIDDEN or (owners and not owners & allowed):
            bad.append(f"{top} ({', '.join(sorted(owners)) or 'unknown'})")
    return bad


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinytask import make_tiny

    return make_tiny(tmp_path_factory.mktemp("notorch"))


def commands(tiny, out):
    m, t = tiny["model"], tiny["task"]
    return {
        "train": ["train", "--model", m, "--task", t, "--data", tiny["train"], "--eval-data", tiny["eval"],
                  "--steps", "2", "--eval-every", "0", "--batch-size", "4", "--threads", "1", "--out", out / "run"],
        "eval": ["eval", "--model", m, "--task", t, "--data", tiny["eval"], "--threads", "1", "--json"],
        "calibrate": ["calibrate", "--model", m, "--task", t, "--data", tiny["train"], "--batch-size", "4",
                      "--batches", "1", "--directions", "1", "--candidates", "0.01,0.1,0.3", "--threads", "1", "--json"],
        "devices list": ["devices", "list"],
        "join --help": ["join", "--help"],
        "serve --help": ["serve", "--help"],
        "devices compare": ["devices", "compare", "pi5", "phone-midrange", "--model", m, "--json"],
        "devices bench": ["devices", "bench", "--model", m, "--smoke", "--threads", "1", "--out", out / "here.toml"],
    }


@pytest.mark.parametrize("name", ["train", "eval", "calibrate", "devices list", "devices compare", "devices bench",
                                  "join --help", "serve --help"])
def test_client_commands_import_no_torch(tiny, tmp_path, name):
    proc, modules = run_wrapped(*commands(tiny, tmp_path)[name])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not {"torch", "transformers"} & {m.split(".")[0] for m in modules}
    assert violations(modules) == [], f"{name} imported modules outside ggfwd's core dependencies"


def test_the_checker_catches_a_forbidden_import(tiny, tmp_path):
    """`ggfwd plot` needs matplotlib (an extra): the same wrapper and checker must flag it."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    proc, _ = run_wrapped(*commands(tiny, tmp_path)["train"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc, modules = run_wrapped("plot", run, "--output", tmp_path / "c.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(v.startswith("matplotlib") for v in violations(modules))
    expected = "torch (torch)" if md.packages_distributions().get("torch") else "torch (unknown)"
    assert violations(["torch.nn", "numpy", "json"]) == [expected]
