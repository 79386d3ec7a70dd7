"""A LoRA adapter as numpy float32 arrays, in llama.cpp's adapter GGUF format.

For each target weight W (out, in) of the base model the adapter holds A (r, in) and B (out, r); llama.cpp
computes `W x + scale * B (A x)` with `scale = alpha / r`. All A and B arrays are views into one flat
float32 vector `params`, so a perturbation or an update of the whole adapter is one vectorised operation.

Tensors stay F32: with F16 or Q8_0 adapter tensors llama.cpp rounds the activations entering the LoRA matmul
and small perturbations vanish.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .base import BaseModel, field_value, open_gguf
from .errors import UserError
from .files import atomic_path

DEFAULT_TARGETS = ("attn_q", "attn_v")


@dataclass
class LoraAdapter:
    """LoRA matrices for a list of base weights, all viewing one flat float32 parameter vector."""

    arch: str
    alpha: float
    rank: int
    targets: list[str]  # base tensor names, e.g. "blk.0.attn_q.weight"
    shapes: dict[str, tuple[int, int]]  # base weight (out, in) per target
    params: np.ndarray = field(repr=False)  # float32, A then B for each target in order
    a: dict[str, np.ndarray] = field(init=False, repr=False)
    b: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self):
        if self.params.dtype != np.float32 or self.params.ndim != 1:
            raise ValueError("params must be a flat float32 array")
        if self.params.size != self.n_params_for(self.shapes, self.targets, self.rank):
            raise ValueError("params has the wrong length for these targets and rank")
        self.a, self.b = {}, {}
        for name, (a_slice, b_slice) in self.slices().items():
            out_dim, in_dim = self.shapes[name]
            self.a[name] = self.params[a_slice].reshape(self.rank, in_dim)
            self.b[name] = self.params[b_slice].reshape(out_dim, self.rank)

    # ----------------------------------------------------------------- layout
    @staticmethod
    def n_params_for(shapes, targets, rank) -> int:
        return sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def slices(self) -> dict[str, tuple[slice, slice]]:
        """Where each target's A and B live in `params`."""
        out, pos = {}, 0
        for name in self.targets:
            out_dim, in_dim = self.shapes[name]
            a = slice(pos, pos + self.rank * in_dim)
            pos = a.stop
            b = slice(pos, pos + out_dim * self.rank)
            pos = b.stop
            out[name] = (a, b)
        return out

    def mask(self, part: str) -> np.ndarray:
        """Boolean mask over `params`: 'a', 'b' or 'all'."""
        m = np.zeros(self.params.size, dtype=bool)
        for a_slice, b_slice in self.slices().values():
            if part in ("a", "all"):
                m[a_slice] = True
            if part in ("b", "all"):
                m[b_slice] = True
        return m

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def copy(self) -> "LoraAdapter":
        return LoraAdapter(self.arch, self.alpha, self.rank, list(self.targets), dict(self.shapes), self.params.copy())

    def with_params(self, params: np.ndarray) -> "LoraAdapter":
        return LoraAdapter(self.arch, self.alpha, self.rank, list(self.targets), dict(self.shapes),
                           np.ascontiguousarray(params, dtype=np.float32))

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, base: BaseModel, targets=DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
               seed: int = 0) -> "LoraAdapter":
        """A fresh adapter: A uniform in +-1/sqrt(in) (as PEFT initialises it) from a seeded generator, B zero."""
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise UserError(f"LoRA alpha must be > 0, got {alpha}")
        names = base.matching(list(targets))
        if not names:
            raise UserError(f"target patterns {list(targets)} match no weight of the {base.arch} model")
        shapes = {n: base.weight_shapes[n] for n in names}
        params = np.zeros(cls.n_params_for(shapes, names, rank), dtype=np.float32)
        adapter = cls(base.arch, float(alpha), rank, names, shapes, params)
        rng = np.random.default_rng(seed)
        for name in names:
            in_dim = shapes[name][1]
            adapter.a[name][...] = rng.uniform(-1.0, 1.0, size=(rank, in_dim)) / np.sqrt(in_dim)
        adapter.validate(base)
        return adapter

    # ----------------------------------------------------------------- validation
    def validate(self, base: BaseModel) -> None:
        """Refuse an adapter llama.cpp would reject or abort on, with a one-line reason."""
        if self.arch != base.arch:
            raise UserError(f"adapter is for architecture '{self.arch}' but the model is '{base.arch}'")
        for name in self.targets:
            if name not in base.weight_shapes:
                raise UserError(f"adapter targets '{name}', which the model does not have")
            if name.startswith("token_embd") and base.tied_embeddings:
                raise UserError(f"adapter targets '{name}' but the model ties its embeddings; "
                                "llama.cpp cannot apply a LoRA there")
            if tuple(self.shapes[name]) != tuple(base.weight_shapes[name]):
                raise UserError(f"adapter shape for '{name}' is {self.shapes[name]} (out, in) but the model "
                                f"has {base.weight_shapes[name]}")
        if not np.all(np.isfinite(self.params)):
            raise UserError("adapter contains NaN or infinite values")

    # ----------------------------------------------------------------- GGUF
    def _write(self, path: Path, extra: dict | None = None) -> None:
        from gguf import GGUFWriter

        writer = GGUFWriter(str(path), self.arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(self.alpha))
        for key, value in (extra or {}).items():
            if isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_int64(key, value)
            else:
                writer.add_float64(key, float(value))
        for name in self.targets:
            writer.add_tensor(f"{name}.lora_a", self.a[name])
            writer.add_tensor(f"{name}.lora_b", self.b[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write the adapter GGUF atomically (temporary file in the same folder, then rename)."""
        with atomic_path(path) as tmp:
            self._write(tmp, extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LoraAdapter":
        reader = open_gguf(path, "adapter")
        if field_value(reader, "general.type") != "adapter" or field_value(reader, "adapter.type") != "lora":
            raise UserError(f"{path} is not a LoRA adapter GGUF")
        arch = field_value(reader, "general.architecture")
        alpha = float(field_value(reader, "adapter.lora.alpha", 0.0))
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for t in reader.tensors:
            for suffix in (".lora_a", ".lora_b"):
                if t.name.endswith(suffix):
                    if t.tensor_type != 0:  # F32
                        raise UserError(f"adapter tensor {t.name} is not F32; ggfwd trains F32 adapters only")
                    pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, dtype=np.float32)
        if not pairs:
            raise UserError(f"adapter {path} has no LoRA tensors")
        targets, shapes, ranks = [], {}, set()
        for name, pair in pairs.items():
            if set(pair) != {".lora_a", ".lora_b"}:
                raise UserError(f"adapter tensor {name} lacks its lora_a or lora_b half")
            a, b = pair[".lora_a"], pair[".lora_b"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise UserError(f"adapter tensors for {name} have inconsistent shapes {a.shape} and {b.shape}")
            targets.append(name)
            shapes[name] = (b.shape[0], a.shape[1])
            ranks.add(a.shape[0])
        if len(ranks) != 1:
            raise UserError(f"adapter mixes LoRA ranks {sorted(ranks)}; ggfwd needs one rank")
        rank = ranks.pop()
        if alpha <= 0:
            alpha = float(rank)
        params = np.concatenate([np.concatenate([pairs[n][".lora_a"].ravel(), pairs[n][".lora_b"].ravel()])
                                 for n in targets]).astype(np.float32)
        return cls(arch, alpha, rank, targets, shapes, params)


class AdapterImage:
    """The bytes of an adapter GGUF whose tensor data can be overwritten in place.

    Built once per adapter layout; afterwards `update(params)` copies new values into the byte buffer with
    one numpy copy per tensor. The session hands the buffer to llama.cpp from memory, so nothing touches
    the disk on the hot path.
    """

    def __init__(self, adapter: LoraAdapter):
        from gguf import GGUFReader

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "template.gguf"
            adapter._write(path)
            self.buffer = bytearray(path.read_bytes())
            reader = GGUFReader(path, "r")
            offsets = {t.name: int(t.data_offset) for t in reader.tensors}
        self.layout = (adapter.arch, adapter.rank, tuple(adapter.targets))
        self.alpha = adapter.alpha
        whole = np.frombuffer(self.buffer, dtype=np.uint8)
        self._views: list[tuple[np.ndarray, slice]] = []
        for name, (a_slice, b_slice) in adapter.slices().items():
            for suffix, sl in ((".lora_a", a_slice), (".lora_b", b_slice)):
                off = offsets[f"{name}{suffix}"]
                n = sl.stop - sl.start
                self._views.append((whole[off: off + 4 * n].view(np.float32), sl))
        self.update(adapter.params)

    def matches(self, adapter: LoraAdapter) -> bool:
        return self.layout == (adapter.arch, adapter.rank, tuple(adapter.targets)) and self.alpha == adapter.alpha

    def update(self, params: np.ndarray) -> None:
        for view, sl in self._views:
            view[...] = params[sl]
