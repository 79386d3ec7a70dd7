"""Index and read the tensors of a model's safetensors shards, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range) and
the raw data. All shards are checked up front (listed shards present, headers readable, byte ranges inside
the file) so a bad input fails before anything is written.

Tensors are read with positioned reads rather than through a memory map: pages of a map that has been read
count towards the process's resident memory until it is unmapped, so mapping a whole shard would make the
converter's peak memory grow with the shard size instead of the largest tensor. BF16 needs no torch: it is
read as uint16 and widened by a shift when float32 is wanted.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # "F32", "F16" or "BF16"
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> list[TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"safetensors shard is truncated (no header): {path.name}")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 1 << 28):
            raise UserError(f"safetensors shard is truncated or damaged (header of {n} bytes): {path.name}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"safetensors shard has a damaged header: {path.name}") from None
    data_start = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (int(x) for x in info["data_offsets"])
        if data_start + end > size:
            raise UserError(f"safetensors shard is truncated ({size} of {data_start + end} bytes): {path.name}")
        entries.append(TensorEntry(name, info["dtype"], tuple(int(d) for d in info["shape"]), path,
                                   data_start + begin, end - begin))
    return entries


def index_tensors(src: Path) -> dict[str, TensorEntry]:
    """All tensors of the model in `src`, by Hugging Face name, after checking every shard."""
    index_file = src / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError):
            raise UserError(f"cannot read {index_file.name}") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (src / shard).is_file():
                raise UserError(f"safetensors shard listed in {index_file.name} is missing: {shard}")
        paths = [src / s for s in shards]
    else:
        paths = sorted(src.glob("*.safetensors"))
        if not paths:
            raise UserError(f"no *.safetensors weights in {src}")
    tensors: dict[str, TensorEntry] = {}
    for path in paths:
        for entry in _read_header(path):
            if entry.dtype not in DTYPES:
                raise UserError(f"tensor {entry.name} has dtype {entry.dtype}; ggfwd converts F32, F16 and BF16")
            tensors[entry.name] = entry
    if index_file.is_file():
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise UserError(f"tensor {missing[0]} listed in {index_file.name} is in none of the shards")
    return tensors


def read_raw(entry: TensorEntry) -> np.ndarray:
    """The tensor in its stored dtype (BF16 as uint16), in a fresh array."""
    out = np.empty(entry.nbytes, dtype=np.uint8)
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        if f.readinto(memoryview(out)) != entry.nbytes:
            raise UserError(f"safetensors shard is truncated while reading {entry.name}: {entry.path.name}")
    return out.view(DTYPES[entry.dtype]).reshape(entry.shape)


def as_float32(data: np.ndarray) -> np.ndarray:
    """float32 values of an array from `read_raw` (uint16 means BF16)."""
    if data.dtype == np.uint16:
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False)
