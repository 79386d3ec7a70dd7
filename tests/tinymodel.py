"""A tiny random llama-architecture GGUF written in the test, and an independent numpy forward pass of it.

The numpy forward follows llama.cpp's conventions for the llama architecture (RMSNorm, rotary embedding on
adjacent pairs, grouped-query attention, SwiGLU) so the engine's logits, with and without a LoRA adapter,
can be checked against an exact computation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["great", "terrible", "good", "bad", "movie", "film", "the", "a", "is", "was", "not", "very",
         "review", "sentiment", "fun", "dull", "love", "hate", "plot", "actors"]


def vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, letters and some whole words."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(":.,!?\n")
    words = ["\u2581" + w for w in WORDS] + ["Review", "Sentiment", "\u2581or"]
    # SentencePiece merges adjacent pieces pairwise, so every prefix of a word must be a piece too.
    pieces += sorted({w[:k] for w in words for k in range(2, len(w) + 1)}, key=lambda p: (len(p), p))
    for i, p in enumerate(pieces):
        tokens.append(p)
        scores.append(-float(i) if len(p) == 1 else float(len(p)))
        types.append(1)
    return tokens, scores, types


def make_weights(seed: int = 0, d: int = 64, n_layers: int = 2, n_head: int = 4, n_head_kv: int = 2,
                 ff: int = 128, n_vocab: int | None = None) -> dict:
    n_vocab = n_vocab or len(vocab()[0])
    rng = np.random.default_rng(seed)
    hd = d // n_head
    w = {"token_embd.weight": rng.normal(0, 1, (n_vocab, d)).astype(np.float32),
         "output_norm.weight": (1 + 0.1 * rng.normal(size=d)).astype(np.float32),
         "output.weight": rng.normal(0, d ** -0.5, (n_vocab, d)).astype(np.float32)}
    for i in range(n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = (1 + 0.1 * rng.normal(size=d)).astype(np.float32)
        w[p + "attn_q.weight"] = rng.normal(0, d ** -0.5, (n_head * hd, d)).astype(np.float32)
        w[p + "attn_k.weight"] = rng.normal(0, d ** -0.5, (n_head_kv * hd, d)).astype(np.float32)
        w[p + "attn_v.weight"] = rng.normal(0, d ** -0.5, (n_head_kv * hd, d)).astype(np.float32)
        w[p + "attn_output.weight"] = rng.normal(0, d ** -0.5, (d, n_head * hd)).astype(np.float32)
        w[p + "ffn_norm.weight"] = (1 + 0.1 * rng.normal(size=d)).astype(np.float32)
        w[p + "ffn_gate.weight"] = rng.normal(0, d ** -0.5, (ff, d)).astype(np.float32)
        w[p + "ffn_up.weight"] = rng.normal(0, d ** -0.5, (ff, d)).astype(np.float32)
        w[p + "ffn_down.weight"] = rng.normal(0, ff ** -0.5, (d, ff)).astype(np.float32)
    w["_config"] = dict(d=d, n_layers=n_layers, n_head=n_head, n_head_kv=n_head_kv, ff=ff, eps=1e-5,
                        rope_base=10000.0, n_vocab=n_vocab)
    return w


def write_gguf(path: Path, weights: dict, tied: bool = False, dtype: str = "f32") -> Path:
    """Write the weights as a llama-architecture GGUF (optionally without output.weight: tied embeddings)."""
    import gguf

    c = weights["_config"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("ggfwd-tiny")
    writer.add_context_length(512)
    writer.add_embedding_length(c["d"])
    writer.add_block_count(c["n_layers"])
    writer.add_feed_forward_length(c["ff"])
    writer.add_head_count(c["n_head"])
    writer.add_head_count_kv(c["n_head_kv"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_rope_freq_base(c["rope_base"])
    writer.add_rope_dimension_count(c["d"] // c["n_head"])
    writer.add_vocab_size(c["n_vocab"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = vocab()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for name, value in weights.items():
        if name.startswith("_") or (tied and name == "output.weight"):
            continue
        if dtype == "f16" and value.ndim == 2:
            value = value.astype(np.float16)
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, base):
    """Rotate adjacent pairs (x[2i], x[2i+1]) as llama.cpp does for the llama architecture. x: (T, H, hd)."""
    hd = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def forward(weights: dict, tokens, lora: dict | None = None, scale: float = 1.0, tied: bool = False) -> np.ndarray:
    """Logits (T, n_vocab) in float64. `lora` maps a weight name to (A (r, in), B (out, r)):
    that weight then acts as W x + scale * B (A x)."""
    c = weights["_config"]
    W = {k: v.astype(np.float64) for k, v in weights.items() if not k.startswith("_")}
    if tied:
        W["output.weight"] = W["token_embd.weight"]

    def linear(name, x):
        y = x @ W[name].T
        if lora and name in lora:
            a, b = (m.astype(np.float64) for m in lora[name])
            y = y + scale * (x @ a.T) @ b.T
        return y

    tokens = np.asarray(tokens)
    T, H, Hkv = len(tokens), c["n_head"], c["n_head_kv"]
    hd = c["d"] // H
    pos = np.arange(T, dtype=np.float64)
    x = W["token_embd.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        h = _rms(x, W[p + "attn_norm.weight"], c["eps"])
        q = _rope(linear(p + "attn_q.weight", h).reshape(T, H, hd), pos, c["rope_base"])
        k = _rope(linear(p + "attn_k.weight", h).reshape(T, Hkv, hd), pos, c["rope_base"])
        v = linear(p + "attn_v.weight", h).reshape(T, Hkv, hd)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, H * hd)
        x = x + linear(p + "attn_output.weight", o)
        h = _rms(x, W[p + "ffn_norm.weight"], c["eps"])
        g = linear(p + "ffn_gate.weight", h)
        x = x + linear(p + "ffn_down.weight", g / (1 + np.exp(-g)) * linear(p + "ffn_up.weight", h))
    x = _rms(x, W["output_norm.weight"], c["eps"])
    return linear("output.weight", x)
