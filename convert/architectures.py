"""Everything ggfwd knows about each supported architecture, one entry per architecture.

An entry says which Hugging Face classes it covers, the GGUF architecture name llama.cpp expects, how the
weights must be changed on the way (q/k row permutation for llama, +1 on Gemma's norms), whether the
embeddings are always tied, and which metadata the GGUF header needs (RoPE, sliding window, ...).
Tensor names are mapped with gguf-py's own tables (`gguf.get_tensor_name_map`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import UserError
from .config import ModelConfig
from .safetensors_files import as_float32

# GGUF short name of a LoRA target -> the Hugging Face module inside a decoder layer (same in all five
# supported families). Used by `export --to peft`.
HF_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # general.architecture, e.g. "llama"
    hf_classes: tuple[str, ...]
    gguf_arch_key: str  # member of gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's llama graph wants q/k rows interleaved per head
    norm_offset: float = 0.0  # added to every norm weight (Gemma stores w - 1)
    always_tied: bool = False  # output projection is the embedding matrix
    spm_space_prefix: bool | None = None  # force tokenizer.ggml.add_space_prefix for SentencePiece
    extra_metadata: Callable[["object", ModelConfig], None] | None = field(default=None, repr=False)

    def model_arch(self):
        import gguf

        return getattr(gguf.MODEL_ARCH, self.gguf_arch_key)

    def tensor_name_map(self, n_layers: int):
        import gguf

        return gguf.get_tensor_name_map(self.model_arch(), n_layers)


# ----------------------------------------------------------------------------------------------- q/k permutation
def qk_row_permutation(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns Hugging Face q/k rows into llama.cpp's: `gguf_rows = hf_rows[perm]`.

    HF keeps each head's rotary pairs as (first half, second half); llama.cpp's llama graph rotates adjacent
    rows. Per head, row (half h, index i) moves to position 2*i + h. The inverse is `np.argsort(perm)`.
    """
    if n_rows % (2 * n_heads):
        raise UserError(f"cannot permute {n_rows} q/k rows over {n_heads} heads")
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)


def qk_heads(arch: Architecture, gguf_short: str, n_head: int, n_head_kv: int) -> int | None:
    """Heads to permute over for a q or k weight in this architecture; None when it is not permuted."""
    if not arch.permute_qk:
        return None
    return {"attn_q": n_head, "attn_k": n_head_kv}.get(gguf_short)


def short_name(gguf_tensor_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'token_embd.weight' -> 'token_embd'."""
    parts = gguf_tensor_name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def transform(arch: Architecture, cfg: ModelConfig, gguf_name: str, data: np.ndarray) -> np.ndarray:
    """Apply the architecture's weight changes to one tensor (any dtype for permutation; float for offsets)."""
    heads = qk_heads(arch, short_name(gguf_name), cfg.n_head, cfg.n_head_kv)
    if heads is not None:
        data = data[qk_row_permutation(data.shape[0], heads)]
    if arch.norm_offset and gguf_name.endswith("norm.weight"):
        data = as_float32(data) + np.float32(arch.norm_offset)
    return data


# ----------------------------------------------------------------------------------------------- metadata
def write_common_metadata(writer, cfg: ModelConfig) -> None:
    """Header fields shared by all supported decoder-only transformers."""
    import gguf

    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope("full_attention")
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):  # llama3 is a rope_freqs tensor, see llama3_rope_factors
        raise UserError(f"RoPE scaling type '{rope_type}' is not supported by ggfwd convert")


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3.1+ 'llama3' RoPE scaling as the per-frequency divisors llama.cpp reads from `rope_freqs`."""
    rope = cfg.rope("full_attention")
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = cfg.head_dim
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
    return out.astype(np.float32)


def _llama_metadata(writer, cfg: ModelConfig) -> None:
    writer.add_rope_dimension_count(cfg.head_dim)
    window = cfg.get("sliding_window")
    if window and int(window) < cfg.context_length:
        import warnings

        warnings.warn(f"{cfg.hf_class} uses a sliding window of {window} tokens; llama.cpp's llama graph "
                      "attends to the whole context, so outputs differ beyond that length")


def _gemma3_metadata(writer, cfg: ModelConfig) -> None:
    if cfg.get("attn_logit_softcapping") is not None:
        raise UserError("gemma3 with attn_logit_softcapping is not supported by llama.cpp")
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer (27B) model
    expected = cfg.hidden / cfg.n_head if cfg.n_layers == 62 else cfg.head_dim
    scalar = cfg.get("query_pre_attn_scalar", expected)
    if abs(float(scalar) - expected) > 1e-6:
        raise UserError(f"gemma3 query_pre_attn_scalar {scalar} differs from what llama.cpp uses ({expected:g})")
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(cfg.get("final_logit_softcapping")))
    window = cfg.get("sliding_window")
    if window:
        writer.add_sliding_window(int(window))
        layer_types = cfg.get("layer_types")
        if layer_types:
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
        elif cfg.get("sliding_window_pattern"):
            writer.add_sliding_window_pattern(int(cfg.get("sliding_window_pattern")))
        local = cfg.rope("sliding_attention")
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
        if str(local.get("rope_type") or "default") not in ("default",):
            raise UserError("gemma3 RoPE scaling on sliding-window layers is not supported by llama.cpp")


LLAMA = Architecture(
    gguf_name="llama",
    hf_classes=("LlamaForCausalLM", "MistralForCausalLM"),
    gguf_arch_key="LLAMA",
    permute_qk=True,
    extra_metadata=_llama_metadata,
)
QWEN2 = Architecture(gguf_name="qwen2", hf_classes=("Qwen2ForCausalLM",), gguf_arch_key="QWEN2")
QWEN3 = Architecture(gguf_name="qwen3", hf_classes=("Qwen3ForCausalLM",), gguf_arch_key="QWEN3")
GEMMA3 = Architecture(
    gguf_name="gemma3",
    hf_classes=("Gemma3ForCausalLM",),
    gguf_arch_key="GEMMA3",
    norm_offset=1.0,
    always_tied=True,
    spm_space_prefix=False,
    extra_metadata=_gemma3_metadata,
)

ARCHITECTURES = (LLAMA, QWEN2, QWEN3, GEMMA3)
SUPPORTED_HF_CLASSES = tuple(c for a in ARCHITECTURES for c in a.hf_classes)


def for_hf_class(hf_class: str) -> Architecture:
    for arch in ARCHITECTURES:
        if hf_class in arch.hf_classes:
            return arch
    raise UserError(f"unsupported architecture '{hf_class}'; supported: {', '.join(SUPPORTED_HF_CLASSES)}")


def for_gguf_name(name: str) -> Architecture | None:
    return next((a for a in ARCHITECTURES if a.gguf_name == name), None)
