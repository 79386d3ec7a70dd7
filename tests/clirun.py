"""Running the installed `ggfwd` CLI in a subprocess, as a user would.

The subprocess starts in the tests folder: from the repository root, `python -m ggfwd` would import the source
tree's ggfwd/ (which lacks the ggfwd.convert subpackage) instead of the installed package.
"""

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
COMMAND = [sys.executable, "-m", "ggfwd"]


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 600)
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, cwd=TESTS, **kw)


def start_cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([*COMMAND, *map(str, args)], cwd=TESTS, **kw)
