"""What ggfwd needs to know about a base GGUF model, read without loading it into llama.cpp.

The file is checked here (exists, is GGUF, not truncated) because llama.cpp aborts the process on some
malformed files instead of returning an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

GGUF_MAGIC = b"GGUF"


def field_value(reader, key: str, default=None):
    """The value of a GGUF metadata field as a Python object (str, number or list), or `default`."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


@dataclass(frozen=True)
class BaseModel:
    """A base model's architecture and the (out, in) shape of each 2-D weight, by GGUF tensor name."""

    path: Path
    arch: str
    weight_shapes: dict[str, tuple[int, int]]
    tied_embeddings: bool
    n_layers: int
    file_type: str

    def matching(self, patterns: list[str]) -> list[str]:
        """Names of 2-D weights whose name contains one of `patterns` as a dotted component
        (`attn_q` matches `blk.3.attn_q.weight`), in file order."""
        names = []
        for name in self.weight_shapes:
            parts = name.split(".")
            if any(p in parts or p == name for p in patterns):
                names.append(name)
        return names


def check_gguf_file(path: Path, what: str = "model") -> None:
    """Raise UserError unless `path` is a readable file that starts with the GGUF magic."""
    if not path.exists():
        raise UserError(f"{what} file not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} path is not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{what} file is not GGUF (bad magic {magic!r}): {path}")


def open_gguf(path: str | os.PathLike, what: str = "model"):
    """Open a GGUF file with gguf-py's reader, refusing files that are missing, not GGUF or truncated."""
    from gguf import GGUFReader

    path = Path(path)
    check_gguf_file(path, what)
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises assorted errors on a damaged header
        raise UserError(f"{what} file is damaged or truncated ({type(exc).__name__}): {path}") from None
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise UserError(f"{what} file is truncated ({size} of {end} bytes): {path}")
    return reader


def read_base(path: str | os.PathLike) -> BaseModel:
    """Read a base model's metadata and weight shapes."""
    from gguf import GGMLQuantizationType

    reader = open_gguf(path, "model")
    path = Path(path)
    if field_value(reader, "general.type", "model") == "adapter":
        raise UserError(f"{path} is a LoRA adapter, not a base model")
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"model file has no general.architecture: {path}")
    shapes: dict[str, tuple[int, int]] = {}
    for t in reader.tensors:
        if len(t.shape) == 2 or (len(t.shape) > 2 and int(np.prod(t.shape[2:])) == 1):
            ne0, ne1 = int(t.shape[0]), int(t.shape[1])
            shapes[t.name] = (ne1, ne0)  # ggml lists the fastest dimension first; numpy (out, in)
    names = {t.name for t in reader.tensors}
    types = {t.tensor_type for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(".weight")}
    quant = sorted({GGMLQuantizationType(q).name for q in types if len(types)})
    return BaseModel(
        path=path,
        arch=arch,
        weight_shapes=shapes,
        tied_embeddings="output.weight" not in names,
        n_layers=int(field_value(reader, f"{arch}.block_count", 0) or 0),
        file_type="+".join(quant),
    )
