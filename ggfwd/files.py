"""Atomic file output: write to a temporary file beside the target, then rename over it.

A reader (or a run killed half-way) sees either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in `path`'s folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get ordinary permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(binary_file)` and put the result at `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _open_binary(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def read_lines(path: str | os.PathLike):
    """Yield (line number, text) for each line of a UTF-8 text file (gzip-compressed when it ends in .gz).
    Bytes that are not UTF-8, or a damaged .gz, become a one-line UserError naming the file and line."""
    import gzip
    import zlib

    from .errors import UserError

    path = Path(path)
    n = 0
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path.name} line {n}: not UTF-8 text") from None
    except (gzip.BadGzipFile, zlib.error, EOFError):
        raise UserError(f"{path.name}: damaged or truncated gzip data (after line {n})") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a file") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A whole UTF-8 text file as one string; decoding errors become a one-line UserError (file and line)."""
    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return "".join(text for _, text in read_lines(path))
