"""What the speed and memory models need to know about a base GGUF model, read from its header alone.

`ModelStats.from_gguf(path)` reads the architecture's hyperparameters, the bytes of every tensor by type and
the (out, in) shape of every weight, without loading the model into llama.cpp. From those it counts the
work of a forward pass:

- every matrix multiply inside the blocks costs 2 FLOP per weight per token (`body_params`);
- attention costs 2 x (key + value width) x heads FLOP per token per layer per position attended to;
- the output projection (vocabulary x width) runs only at the positions a loss is scored at, one per
  example for classification, so it is counted per scored position, not per token.

The same counts convert a public prompt-processing figure (`llama-bench` pp512: 512 tokens, one output)
into an effective compute rate, and back into seconds per pass for another model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .base import BaseModel, field_value, open_gguf, read_base
from .errors import UserError


@dataclass(frozen=True)
class ModelStats:
    """Sizes and shapes of a base model, enough to predict its memory and time per pass."""

    name: str
    arch: str
    quant: str  # file type, lower case: q4_k_m, q8_0, f16, f32, ...
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    tied_embeddings: bool
    params: int  # all weight values in the file
    body_params: int  # 2-D weights inside the blocks: the per-token matrix multiplies
    output_params: int  # the output projection (token_embd when tied)
    weight_bytes: int  # tensor data in the file
    embedding_bytes: int  # token_embd's data
    file_bytes: int
    repackable_bytes: int = 0  # weights llama.cpp's CPU backend copies into its interleaved layouts
    body_params_by_type: dict = field(default_factory=dict)  # ggml type (lower case) -> block weight values
    output_type: str = "f32"  # ggml type of the output projection
    path: str = ""
    base: BaseModel | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "ModelStats":
        """Read a base model's header (the file is checked first: missing, not GGUF, truncated)."""
        from gguf import GGMLQuantizationType, LlamaFileType

        base = read_base(path)
        reader = open_gguf(path, "model")
        arch = base.arch

        def hp(key: str, default=None):
            value = field_value(reader, f"{arch}.{key}", default)
            if isinstance(value, list):  # per-layer values (some architectures): take the widest
                value = max(value) if value else default
            return value

        n_embd, n_head = hp("embedding_length"), hp("attention.head_count")
        if not n_embd or not n_head:
            raise UserError(f"model file lacks {arch}.embedding_length or {arch}.attention.head_count: {path}")
        n_embd, n_head = int(n_embd), int(n_head)
        n_head_kv = int(hp("attention.head_count_kv", n_head) or n_head)
        head_k = int(hp("attention.key_length", n_embd // n_head) or n_embd // n_head)
        head_v = int(hp("attention.value_length", head_k) or head_k)
        n_ff = int(hp("feed_forward_length", 4 * n_embd) or 4 * n_embd)
        tensors = {t.name: t for t in reader.tensors}
        embd = tensors.get("token_embd.weight")
        tokens = field_value(reader, "tokenizer.ggml.tokens")
        if embd is not None:
            n_vocab = int(embd.shape[1]) if len(embd.shape) > 1 else int(embd.shape[0])
        elif tokens:
            n_vocab = len(tokens)
        else:
            raise UserError(f"model file has neither token_embd.weight nor a vocabulary: {path}")
        params = sum(int(t.n_elements) for t in reader.tensors)
        body = sum(int(t.n_elements) for t in reader.tensors
                   if t.name.startswith("blk.") and t.name in base.weight_shapes)
        out = tensors.get("output.weight", embd)
        out_params = int(out.n_elements) if out is not None else 0
        file_type = field_value(reader, "general.file_type")
        try:
            quant = LlamaFileType(int(file_type)).name.lower().removeprefix("mostly_").removeprefix("all_")
        except (TypeError, ValueError):
            types = [t.tensor_type for t in reader.tensors if t.name in base.weight_shapes and t.name.startswith("blk.")]
            quant = GGMLQuantizationType(max(set(types), key=types.count)).name.lower() if types else "unknown"
        by_type: dict[str, int] = {}
        for t in reader.tensors:
            if t.name.startswith("blk.") and t.name in base.weight_shapes:
                key = GGMLQuantizationType(t.tensor_type).name.lower()
                by_type[key] = by_type.get(key, 0) + int(t.n_elements)
        out_type = GGMLQuantizationType(out.tensor_type).name.lower() if out is not None else "f32"
        return cls(
            name=Path(path).name, arch=arch, quant=quant, n_layers=base.n_layers, n_embd=n_embd, n_ff=n_ff,
            n_head=n_head, n_head_kv=n_head_kv, head_dim_k=head_k, head_dim_v=head_v, n_vocab=n_vocab,
            tied_embeddings=base.tied_embeddings, params=params, body_params=body, output_params=out_params,
            weight_bytes=sum(int(t.n_bytes) for t in reader.tensors),
            embedding_bytes=int(embd.n_bytes) if embd is not None else 0,
            file_bytes=Path(path).stat().st_size, repackable_bytes=_repackable(reader),
            body_params_by_type=dict(sorted(by_type.items(), key=lambda kv: -kv[1])), output_type=out_type,
            path=str(path), base=base)

    # ------------------------------------------------------------------ work
    def attention_flops_per_token(self, context: float) -> float:
        """Q K^T and softmax(.) V for one token attending to `context` positions, all layers."""
        return 2.0 * self.n_layers * self.n_head * (self.head_dim_k + self.head_dim_v) * context

    def flops_by_type(self, tokens: int, outputs: int, seq_tokens: int | None = None) -> dict[str, float]:
        """FLOP of one decode of `tokens` tokens in sequences of `seq_tokens` (causal: each token attends to
        half its sequence on average) with `outputs` scored positions, by the ggml type of the weights the
        work multiplies ('attention' for the products with the KV cache)."""
        seq = seq_tokens or tokens
        out = {k: 2.0 * tokens * n for k, n in self.body_params_by_type.items()}
        out[self.output_type] = out.get(self.output_type, 0.0) + 2.0 * outputs * self.output_params
        out["attention"] = tokens * self.attention_flops_per_token((seq + 1) / 2)
        return out

    def flops_per_pass(self, tokens: int, outputs: int, seq_tokens: int | None = None) -> float:
        """All FLOP of one decode (see `flops_by_type`)."""
        return sum(self.flops_by_type(tokens, outputs, seq_tokens).values())

    def pp_flops_per_token(self, prompt: int = 512) -> float:
        """FLOP per token of llama-bench's ppN test (one sequence of N tokens, one output): the conversion
        between a public tokens/s figure and an effective compute rate."""
        return self.flops_per_pass(prompt, 1, prompt) / prompt

    # ------------------------------------------------------------------ adapter
    def lora_params(self, targets, rank: int, part: str = "all") -> int:
        """Values of a rank-`rank` LoRA on the weights matching `targets` (as `ggfwd train` makes it): A and
        B (`part="all"`), or only B (`"b"`, what is trained by default) or only A."""
        if self.base is None:
            raise ValueError("ModelStats built without its base model")
        names = self.base.matching(list(targets))
        if not names:
            raise UserError(f"targets {','.join(targets)} match no weight of {self.name}")
        shapes = [self.base.weight_shapes[n] for n in names]
        return sum(rank * ((out if part in ("all", "b") else 0) + (inp if part in ("all", "a") else 0))
                   for out, inp in shapes)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "base"}


def _repackable(reader) -> int:
    """Bytes of the matrices llama.cpp's CPU backend repacks (observed on x86-64 AVX2, llama-cpp-python
    0.3.36: Q4_0, Q4_K and IQ4_NL weights with a row count divisible by 8; the token embedding is read row
    by row and stays as it is)."""
    from gguf import GGMLQuantizationType

    from .memory import REPACKED_TYPES

    total = 0
    for t in reader.tensors:
        if (len(t.shape) == 2 and t.name != "token_embd.weight" and int(t.shape[1]) % 8 == 0
                and GGMLQuantizationType(t.tensor_type).name in REPACKED_TYPES):
            total += int(t.n_bytes)
    return total


def dims_flops_per_token(*, n_layers: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, head_dim: int,
                         context: float, gated_ffn: bool = True) -> float:
    """FLOP per token of a standard decoder block stack given only its dimensions, for converting public
    figures of models that are not at hand (llama-bench ppN: average context (N + 1) / 2, no output)."""
    attn_w = n_embd * n_head * head_dim * 2 + n_embd * n_head_kv * head_dim * 2  # q, o and k, v
    ffn_w = (3 if gated_ffn else 2) * n_embd * n_ff
    return 2.0 * n_layers * (attn_w + ffn_w) + 2.0 * n_layers * n_head * 2 * head_dim * context
