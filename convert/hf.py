"""Write a Hugging Face checkpoint as a GGUF file, one tensor at a time.

First pass: plan every output tensor (llama.cpp name, shape, type) from the safetensors headers alone and
write the GGUF header. Second pass: read, transform and encode one tensor, append it, drop it. Peak memory
is about the largest tensor (plus its encoded copy), not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from . import architectures as archs
from .architectures import Architecture
from .config import ModelConfig
from .safetensors_files import TensorEntry, as_float32, read_raw
from .tokenizer import write_vocab

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # llama.cpp name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # numpy order: (out, in) for a matrix
    qtype: "object"  # gguf.GGMLQuantizationType
    source: TensorEntry | None = None
    data: np.ndarray | None = None  # for tensors made here (rope_freqs)

    @property
    def nbytes(self) -> int:
        import gguf

        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))


def direct_type(name: str, shape: tuple[int, ...], wanted):
    """The type one tensor is stored in: vectors stay F32 (llama.cpp wants F32 norms and biases);
    a matrix whose rows do not split into Q8_0 blocks falls back to F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    if wanted in (Q.F32, Q.F16, Q.BF16):
        return wanted
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def is_tied(arch: Architecture, cfg: ModelConfig, tensors: dict[str, TensorEntry]) -> bool:
    return arch.always_tied or "lm_head.weight" not in tensors or bool(cfg.get("tie_word_embeddings", False))


def plan_tensors(arch: Architecture, cfg: ModelConfig, tensors: dict[str, TensorEntry], wanted) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its llama.cpp name and output type, without reading data."""
    import gguf

    name_map = arch.tensor_name_map(cfg.n_layers)
    tied = is_tied(arch, cfg, tensors)
    plan: list[PlannedTensor] = []
    for hf_name, entry in tensors.items():
        if hf_name.endswith(IGNORED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"cannot map tensor '{hf_name}' of {cfg.hf_class} to a llama.cpp name")
        plan.append(PlannedTensor(name, entry.shape, direct_type(name, entry.shape, wanted), source=entry))
    names = {p.name for p in plan}
    for needed in ("token_embd.weight", "output_norm.weight", f"blk.{cfg.n_layers - 1}.attn_q.weight"):
        if needed not in names:
            raise UserError(f"the checkpoint lacks the tensor llama.cpp calls '{needed}'")
    factors = archs.llama3_rope_factors(cfg)
    if factors is not None:
        plan.append(PlannedTensor("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, data=factors))
    return sorted(plan, key=_order)


def _order(p: PlannedTensor):
    parts = p.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), p.name)
    return (0 if parts[0] == "token_embd" else 2, 0, p.name)


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    """`data` (float32, float16, or uint16 holding BF16) encoded as `qtype`."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.BF16 and data.dtype == np.uint16:
        return data
    if qtype == Q.F16 and data.dtype == np.float16:
        return data
    f32 = as_float32(data)
    if qtype == Q.F32:
        return np.ascontiguousarray(f32)
    if qtype == Q.F16:
        return f32.astype(np.float16)
    return gguf.quants.quantize(f32, qtype)


def file_type_of(wanted) -> int:
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q8_0: F.MOSTLY_Q8_0}[wanted]


def write_gguf(src: Path, cfg: ModelConfig, arch: Architecture, plan: list[PlannedTensor], wanted, out: Path,
               on_tensor: Callable[[str], None] | None = None) -> str:
    """Write the GGUF; returns a description of the tokenizer that went in."""
    import gguf

    writer = gguf.GGUFWriter(str(out), arch.gguf_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(src.name)
        writer.add_file_type(file_type_of(wanted))
        archs.write_common_metadata(writer, cfg)
        if arch.extra_metadata is not None:
            arch.extra_metadata(writer, cfg)
        vocab_rows = next(p.shape[0] for p in plan if p.name == "token_embd.weight")
        tokenizer = write_vocab(writer, src, arch, vocab_rows)
        for p in plan:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:
            if p.source is not None:
                data = archs.transform(arch, cfg, p.name, read_raw(p.source))
            else:
                data = p.data
            writer.write_tensor_data(_encode(data, p.qtype))
            del data
            if on_tensor is not None:
                on_tensor(p.name)
    finally:
        writer.close()
    return tokenizer
