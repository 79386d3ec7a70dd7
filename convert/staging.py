"""Build an output directory next to its final place and move it there only when complete.

A failed or interrupted command leaves nothing behind: no partial OUTDIR, no temporary directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"output directory already exists: {out} (use --force to replace it)")
        if not out.is_dir():
            raise UserError(f"output path exists and is not a directory: {out}")


@contextmanager
def staged_dir(out: Path, force: bool):
    """Yield a fresh temporary directory beside `out`; on success it replaces `out` (atomically when `out`
    did not exist), on any failure it is removed."""
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
