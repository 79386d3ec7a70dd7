"""The federation's wire format: typed records <-> bytes. The in-process simulation and Flower carry the same bytes.

A message is

    b"GGFW" | format version (u16) | kind (u16) | header length (u32) | payload length (u32) | CRC-32 (u32)
    | header: compact JSON object of plain fields and array descriptors | payload: raw little-endian arrays

Everything is bounded before it is allocated (header, payload, array lengths, message size per kind), the
CRC-32 covers the whole message (a flipped bit anywhere is refused, not applied), and each kind's fields
are checked by type and range. Decoding never evaluates code: no pickle. A message that fails any check
raises `MessageError` with a one-line reason; nothing of it reaches the model.

Records:
- `Instruction` (server -> client): do round R on adapter version V with K directions of a batch of B
  examples at eps, within `deadline` simulated seconds; optionally choose the K directions among C candidates
  (`candidates`, `sampling`: see ggfwd.sampling).
- `Report` (client -> server): the K loss-difference scalars (float32) of round R, with loss statistics,
  tokens scored and forward passes; with candidates, the candidate index (uint16) of each scalar.
- `Broadcast` (server -> clients): the round's accepted (client, scalars[, indices]) lists and, when clients
  are not weighted equally, each client's relative weight; in asynchronous rounds, each report's age (updates
  since the version it computed on, one byte per client while below 256): from these every client replays the
  update.

Optional fields and arrays (the candidate sampling ones) are written only when used, so a run without them
sends the same bytes as before; a decoder that does not know them refuses them.
- `Snapshot` (server -> a client that cannot catch up from broadcasts): the trained values (or, from older
  servers, the whole adapter), the optimizer state and the client memory (ggfwd.clientmemory) at a version. A
  client rebuilds the untrained values from its own start adapter.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"GGFW"
FORMAT_VERSION = 1
_FRAME = struct.Struct("<4sHHIII")  # magic, version, kind, header length, payload length, crc32

MAX_HEADER = 16 * 1024
MAX_DIRECTIONS = 4096  # per report
MAX_CANDIDATES = 0xFFFF  # candidate indices travel as uint16
MAX_ROUND_SCALARS = 1 << 20  # per broadcast
MAX_SNAPSHOT_VALUES = 1 << 28  # float32 values per snapshot array (1 GiB)
_DTYPES = {"f32": np.dtype("<f4"), "u32": np.dtype("<u4"), "u16": np.dtype("<u2"), "u8": np.dtype("u1"),
           "d8": np.dtype("u1"), "b1": np.dtype("u1")}
# d8: ascending ids as gaps (first id + 1, then differences), one byte each; b1: ids as a bitmap (bit i of the
# little-endian bit order set for id i), for many clients out of a small population


class MessageError(ValueError):
    """A message that is malformed, damaged, of another format version, or out of bounds."""


# ----------------------------------------------------------------------------- records
@dataclass
class Instruction:
    round: int
    version: int  # adapter version (updates applied) the client must be at
    client: int
    directions: int
    batch_size: int
    eps: float
    deadline: float  # simulated seconds the round allows (inf: none)
    candidates: int = 0  # > 0: choose the directions among candidates 0..C-1 (see ggfwd.sampling); 0: 0..K-1
    sampling: int = 0  # with candidates: 1 discriminative (top-K by |cosine|), 2 unbiased (importance-weighted)
    start: int = 0  # to a joiner: `start_digest` of the run's version-0 adapter, which the joiner builds itself
    spread: int = 0  # 1: score each direction on its own batch of the client's data (0: all on one batch)

    KIND = 1


@dataclass
class Report:
    round: int
    client: int
    version: int
    scalars: np.ndarray  # float32, one per direction
    loss: float  # mean of the perturbed losses
    loss_std: float  # their standard deviation
    tokens: int
    passes: int
    indices: np.ndarray | None = None  # uint16, the candidate index of each scalar (only when instructed)

    KIND = 2


@dataclass
class Broadcast:
    round: int
    clients: np.ndarray  # uint32 (sent as uint16 when every id fits), the clients whose reports were accepted
    counts: np.ndarray  # uint16, scalars per client
    scalars: np.ndarray  # float32, all accepted scalars, client after client
    indices: np.ndarray | None = None  # uint16 per scalar: its candidate index, when the round sampled candidates
    weights: np.ndarray | None = None  # float32 per client: relative weights in the aggregate (None: equal)
    ages: np.ndarray | None = None  # uint16 per client: updates since the version it computed on (None: all 0)

    KIND = 3

    @classmethod
    def of(cls, round_: int, reports: list[tuple], weights=None, ages=None) -> "Broadcast":
        """From (client, scalars) pairs, or (client, scalars, indices) triples when the round sampled
        candidates; `weights`: the clients' relative weights (`estimator.client_weights`), None when equal;
        `ages` (asynchronous rounds): per client, None when every report is this round's."""
        clients = np.asarray([r[0] for r in reports], dtype=np.uint32)
        counts = np.asarray([len(r[1]) for r in reports], dtype=np.uint16)
        scalars = (np.concatenate([np.asarray(r[1], np.float32) for r in reports]) if reports
                   else np.zeros(0, np.float32))
        indices = None
        if any(len(r) > 2 and r[2] is not None for r in reports):
            if not all(len(r) > 2 and r[2] is not None for r in reports):
                raise ValueError("a broadcast's reports either all carry candidate indices or none does")
            indices = np.concatenate([np.asarray(r[2], np.uint16) for r in reports])
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)
        if ages is not None and not any(int(a) for a in ages):
            ages = None
        return cls(round_, clients, counts, scalars, indices, weights,
                   None if ages is None else np.asarray(ages, np.uint16))

    def entries(self) -> list[tuple]:
        """(client, scalars) pairs in order; (client, scalars, indices) triples when the round sampled
        candidates."""
        ends = np.cumsum(self.counts.astype(np.int64))
        starts = ends - self.counts
        if self.indices is None:
            return [(int(c), self.scalars[a:b]) for c, a, b in zip(self.clients, starts, ends)]
        return [(int(c), self.scalars[a:b], self.indices[a:b]) for c, a, b in zip(self.clients, starts, ends)]


@dataclass
class Snapshot:
    version: int
    theta: np.ndarray  # float32: the trained values (over the run's mask), or the adapter's full flat vector
    state: dict = field(default_factory=dict)  # optimizer arrays (float32) by name
    steps: int = 0  # the optimizer's update count
    memory: dict | None = None  # client memory columns (clientmemory.ClientMemory.columns), when the run keeps one

    KIND = 4


# A snapshot's client memory: column -> wire dtype (sent as arrays named "memory.<column>")
MEMORY_COLUMNS = {"clients": "u32", "counts": "u16", "scalars": "f32", "versions": "u32", "weights": "f32",
                  "indices": "u16"}


KINDS = {cls.KIND: cls for cls in (Instruction, Report, Broadcast, Snapshot)}
# Fields of each kind: name -> (type, min, max). Arrays: name -> (dtype, max length).
_INT, _FLOAT = "int", "float"
_FIELDS = {
    Instruction: {"round": (_INT, 0, 2**40), "version": (_INT, 0, 2**40), "client": (_INT, 0, 2**32 - 1),
                  "directions": (_INT, 1, MAX_DIRECTIONS), "batch_size": (_INT, 1, 4096),
                  "eps": (_FLOAT, 0, 1e6), "deadline": (_FLOAT, 0, float("inf"))},
    Report: {"round": (_INT, 0, 2**40), "client": (_INT, 0, 2**32 - 1), "version": (_INT, 0, 2**40),
             "loss": (_FLOAT, None, None), "loss_std": (_FLOAT, None, None), "tokens": (_INT, 0, 2**40),
             "passes": (_INT, 0, 2**32)},
    Broadcast: {"round": (_INT, 0, 2**40)},
    Snapshot: {"version": (_INT, 0, 2**40), "steps": (_INT, 0, 2**40)},
}
# Optional fields (name -> (type, min, max, default)): encoded only when not at their default, so the messages
# of a run that does not use them keep their bytes; a decoder that predates them refuses them (unknown field).
_OPTIONAL = {Instruction: {"candidates": (_INT, 0, MAX_CANDIDATES, 0), "sampling": (_INT, 0, 2, 0),
                           "start": (_INT, 0, 2**32 - 1, 0), "spread": (_INT, 0, 1, 0)}}
_OPTIONAL_ARRAYS = {Report: {"indices": ("u16", MAX_DIRECTIONS)},
                    Broadcast: {"indices": ("u16", MAX_ROUND_SCALARS), "weights": ("f32", MAX_ROUND_SCALARS),
                                "ages": (("u8", "u16"), MAX_ROUND_SCALARS)}}
_ARRAYS = {
    Report: {"scalars": ("f32", MAX_DIRECTIONS)},
    Broadcast: {"clients": (("b1", "d8", "u16", "u32"), MAX_ROUND_SCALARS), "counts": ("u16", MAX_ROUND_SCALARS),
                "scalars": ("f32", MAX_ROUND_SCALARS)},
    Snapshot: {"theta": ("f32", MAX_SNAPSHOT_VALUES)},
}
_MAX_MESSAGE = {Instruction: 4096, Report: 4096 + 6 * MAX_DIRECTIONS,
                Broadcast: MAX_HEADER + 12 * MAX_ROUND_SCALARS, Snapshot: MAX_HEADER + 3 * 4 * MAX_SNAPSHOT_VALUES}


def start_digest(theta: np.ndarray) -> int:
    """A nonzero 32-bit digest (CRC-32) of a version-0 adapter's values: a joiner that replays the history from
    its own start adapter first checks that it built the server's."""
    return zlib.crc32(np.ascontiguousarray(theta, dtype="<f4").tobytes()) or 1


# ----------------------------------------------------------------------------- encoding
def encode(record) -> bytes:
    cls = type(record)
    if cls not in _FIELDS:
        raise TypeError(f"not a federation record: {cls.__name__}")
    header: dict = {}
    for name, (kind, _, _) in _FIELDS[cls].items():
        value = getattr(record, name)
        header[name] = int(value) if kind == _INT else _float_out(float(value))
    for name, (kind, _, _, default) in _OPTIONAL.get(cls, {}).items():
        if getattr(record, name) != default:
            header[name] = int(getattr(record, name))
    arrays = {}
    for name, (dtype, _) in _ARRAYS.get(cls, {}).items():
        arrays[name] = (dtype, getattr(record, name))
    for name, (dtype, _) in _OPTIONAL_ARRAYS.get(cls, {}).items():
        if getattr(record, name) is not None:
            arrays[name] = (dtype, getattr(record, name))
    if cls is Broadcast and record.ages is not None:  # one byte per client while every age is below 256
        arrays["ages"] = ("u8" if int(record.ages.max(initial=0)) < 256 else "u16", record.ages)
    if cls is Broadcast:
        arrays.update(_compact_broadcast(record))
    if cls is Snapshot:
        arrays.update({f"state.{k}": ("f32", v) for k, v in sorted(record.state.items())})
        arrays.update({f"memory.{k}": (MEMORY_COLUMNS[k], v) for k, v in (record.memory or {}).items()})
    payload, specs = [], []
    for name, (dtype, value) in arrays.items():
        data = np.ascontiguousarray(value, dtype=_DTYPES[dtype])
        specs.append([name, dtype, int(data.size)])
        payload.append(data.tobytes())
    if specs:
        header["_arrays"] = specs
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    body = b"".join(payload)
    crc = zlib.crc32(body, zlib.crc32(head))
    frame = _FRAME.pack(MAGIC, FORMAT_VERSION, cls.KIND, len(head), len(body), crc)
    return frame + head + body


def snapshot_sizes(records: list[bytes]) -> list[int]:
    """The sizes of the snapshots among `records` this process encoded (read from the frame alone: for counting
    what a server sends, not for checking what it receives)."""
    return [len(b) for b in records if len(b) >= _FRAME.size and _FRAME.unpack_from(b)[2] == Snapshot.KIND]


def decode(data: bytes, expect=None):
    """The record in `data`, or MessageError. `expect`: a record class (or tuple of them) to require."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("message is not bytes")
    data = bytes(data)
    if len(data) < _FRAME.size:
        raise MessageError(f"message too short ({len(data)} bytes)")
    magic, version, kind, head_len, body_len, crc = _FRAME.unpack_from(data)
    if magic != MAGIC:
        raise MessageError("not a ggfwd federation message (bad magic)")
    if version != FORMAT_VERSION:
        raise MessageError(f"message format version {version}; this ggfwd speaks {FORMAT_VERSION}")
    cls = KINDS.get(kind)
    if cls is None:
        raise MessageError(f"unknown message kind {kind}")
    if expect is not None and not issubclass(cls, expect):
        raise MessageError(f"expected {_names(expect)}, got {cls.__name__}")
    if head_len > MAX_HEADER:
        raise MessageError(f"header of {head_len} bytes exceeds {MAX_HEADER}")
    if len(data) > _MAX_MESSAGE[cls]:
        raise MessageError(f"{cls.__name__} of {len(data)} bytes exceeds its bound of {_MAX_MESSAGE[cls]}")
    if len(data) != _FRAME.size + head_len + body_len:
        raise MessageError(f"message length {len(data)} does not match its frame "
                           f"({_FRAME.size} + {head_len} + {body_len})")
    head = data[_FRAME.size:_FRAME.size + head_len]
    body = data[_FRAME.size + head_len:]
    if zlib.crc32(body, zlib.crc32(head)) != crc:
        raise MessageError("checksum mismatch: the message was damaged")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MessageError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise MessageError("header is not a JSON object")
    values = {}
    for name, (kind_, lo, hi) in _FIELDS[cls].items():
        values[name] = _field(cls, header, name, kind_, lo, hi)
    for name, (kind_, lo, hi, _) in _OPTIONAL.get(cls, {}).items():
        if name in header:
            values[name] = _field(cls, header, name, kind_, lo, hi)
    arrays = _arrays(cls, header.get("_arrays", []), body)
    unknown = set(header) - set(_FIELDS[cls]) - set(_OPTIONAL.get(cls, {})) - {"_arrays"}
    if unknown:
        raise MessageError(f"{cls.__name__} has unknown fields {sorted(unknown)}")
    if cls is Snapshot:
        state = {k.removeprefix("state."): v for k, v in arrays.items() if k.startswith("state.")}
        memory = {k.removeprefix("memory."): v for k, v in arrays.items() if k.startswith("memory.")}
        record = Snapshot(values["version"], arrays["theta"], state, values["steps"], memory or None)
    else:
        record = cls(**values, **arrays)
    _check_record(record)
    return record


def _compact_broadcast(b: Broadcast) -> dict:
    """The broadcast's ids and counts in their narrowest form: ids as one-byte gaps when ascending and close
    together (else uint16, else uint32), and one count when every client sent the same number of scalars (the
    decoder repeats it). A round's download is what every client pays, so its bytes matter most."""
    ids = b.clients.astype(np.int64)
    gaps = np.diff(ids, prepend=-1)
    ascending = bool(ids.size) and bool(np.all(gaps >= 1))
    options = [("u16" if ids.size == 0 or ids.max() <= 0xFFFF else "u32", ids)]
    if ascending and np.all(gaps <= 255):
        options.append(("d8", gaps))
    if ascending and ids.max() < 8 * MAX_ROUND_SCALARS:
        bits = np.zeros(int(ids.max()) + 1, dtype=np.uint8)
        bits[ids] = 1
        options.append(("b1", np.packbits(bits, bitorder="little")))
    clients = min(options, key=lambda o: o[1].size * _DTYPES[o[0]].itemsize)
    counts = b.counts
    if counts.size > 1 and np.all(counts == counts[0]):
        counts = counts[:1]
    return {"clients": clients, "counts": ("u16", counts)}


def _names(expect) -> str:
    classes = expect if isinstance(expect, tuple) else (expect,)
    return " or ".join(c.__name__ for c in classes)


def _float_out(x: float):
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return x


def _field(cls, header, name, kind, lo, hi):
    if name not in header:
        raise MessageError(f"{cls.__name__} lacks field '{name}'")
    value = header[name]
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{cls.__name__}.{name} must be an integer")
    else:
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MessageError(f"{cls.__name__}.{name} must be a number")
        value = float(value)
    if lo is not None and not (value >= lo and value <= hi):
        raise MessageError(f"{cls.__name__}.{name} = {value} lies outside [{lo}, {hi}]")
    return value


def _arrays(cls, specs, body: bytes) -> dict:
    required = _ARRAYS.get(cls, {})
    allowed = {**required, **_OPTIONAL_ARRAYS.get(cls, {})}
    if not isinstance(specs, list) or len(specs) > 16:
        raise MessageError(f"{cls.__name__} array list is malformed")
    out, offset = {}, 0
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and spec[1] in _DTYPES
                and isinstance(spec[2], int) and not isinstance(spec[2], bool) and spec[2] >= 0):
            raise MessageError(f"{cls.__name__} has a malformed array descriptor")
        name, dtype, n = spec
        if name in out:
            raise MessageError(f"{cls.__name__} repeats array '{name}'")
        if name in allowed:
            want_dtype, limit = allowed[name]
        elif cls is Snapshot and name.startswith("state.") and len(name) <= 64:
            want_dtype, limit = "f32", MAX_SNAPSHOT_VALUES
        elif cls is Snapshot and name.removeprefix("memory.") in MEMORY_COLUMNS and name.startswith("memory."):
            want_dtype, limit = MEMORY_COLUMNS[name.removeprefix("memory.")], MAX_ROUND_SCALARS
        else:
            raise MessageError(f"{cls.__name__} has an unexpected array '{name}'")
        allowed_types = want_dtype if isinstance(want_dtype, tuple) else (want_dtype,)
        if dtype not in allowed_types or n > limit:
            raise MessageError(f"{cls.__name__}.{name}: {dtype}[{n}] where {'|'.join(allowed_types)}[<= {limit}] "
                               "is allowed")
        size = n * _DTYPES[dtype].itemsize
        if offset + size > len(body):
            raise MessageError(f"{cls.__name__}.{name} runs past the end of the message")
        out[name] = np.frombuffer(body, dtype=_DTYPES[dtype], count=n, offset=offset).copy()
        if dtype == "d8":
            if np.any(out[name] == 0):
                raise MessageError(f"{cls.__name__}.{name}: a zero gap between ascending ids")
            out[name] = np.cumsum(out[name].astype(np.int64)) - 1
        elif dtype == "b1":
            out[name] = np.flatnonzero(np.unpackbits(out[name], bitorder="little"))
        if name == "clients":
            out[name] = out[name].astype(np.uint32)
        if name == "ages":
            out[name] = out[name].astype(np.uint16)
        offset += size
    if offset != len(body):
        raise MessageError(f"{cls.__name__} carries {len(body) - offset} bytes no array accounts for")
    missing = set(required) - set(out)
    if missing:
        raise MessageError(f"{cls.__name__} lacks arrays {sorted(missing)}")
    return out


def _check_record(record) -> None:
    """Consistency between fields that the per-field bounds cannot see."""
    if isinstance(record, Report):
        if record.scalars.size == 0:
            raise MessageError("Report carries no scalars")
        scored = record.scalars.size if record.indices is None else np.unique(record.indices).size
        if record.indices is not None and record.indices.size != record.scalars.size:
            raise MessageError("Report carries a different number of candidate indices and scalars")
        if record.passes < scored:
            raise MessageError("Report claims fewer forward passes than directions")
    if isinstance(record, Broadcast):
        if record.counts.size == 1 and record.clients.size > 1:  # one count for every client
            record.counts = np.repeat(record.counts, record.clients.size)
        if record.clients.size != record.counts.size:
            raise MessageError("Broadcast lists a different number of clients and counts")
        if int(record.counts.astype(np.int64).sum()) != record.scalars.size:
            raise MessageError("Broadcast counts do not add up to its scalars")
        if np.any(record.counts == 0) or len(set(record.clients.tolist())) != record.clients.size:
            raise MessageError("Broadcast lists a client twice or with no scalars")
        if not np.all(np.isfinite(record.scalars)):
            raise MessageError("Broadcast carries non-finite scalars")
        if record.indices is not None and record.indices.size != record.scalars.size:
            raise MessageError("Broadcast carries a different number of candidate indices and scalars")
        if record.weights is not None and (record.weights.size != record.clients.size or
                                           not np.all(np.isfinite(record.weights)) or np.any(record.weights <= 0)):
            raise MessageError("Broadcast weights must be one positive finite number per client")
        if record.ages is not None and record.ages.size != record.clients.size:
            raise MessageError("Broadcast ages must be one number per client")
        if record.ages is not None and np.any(record.ages.astype(np.int64) > record.round):
            raise MessageError("Broadcast ages reach before version 0")
    if isinstance(record, Snapshot) and record.memory is not None:
        m = record.memory
        needed = set(MEMORY_COLUMNS) - {"indices"}
        if not needed <= set(m):
            raise MessageError(f"Snapshot memory lacks {sorted(needed - set(m))}")
        n = m["clients"].size
        if any(m[k].size != n for k in ("counts", "versions", "weights")) or np.any(m["counts"] == 0) \
                or int(m["counts"].astype(np.int64).sum()) != m["scalars"].size \
                or ("indices" in m and m["indices"].size != m["scalars"].size):
            raise MessageError("Snapshot memory columns do not fit together")
        if len(set(m["clients"].tolist())) != n or not np.all(np.isfinite(m["scalars"])) \
                or not np.all(np.isfinite(m["weights"])) or np.any(m["weights"] <= 0) \
                or np.any(m["versions"].astype(np.int64) > record.version):
            raise MessageError("Snapshot memory lists a client twice, a bad value or a version from the future")
    if isinstance(record, Snapshot) and not np.all(np.isfinite(record.theta)):
        raise MessageError("Snapshot carries non-finite adapter values")
