"""Tiny Hugging Face models and tokenizers built inside the tests, for the convert/export tests.

Every model is random (seeded), a few layers of hidden size 64, with a tokenizer trained here on a small
corpus: SentencePiece (Llama 2 / Mistral / Gemma style) or byte-level BPE (Llama 3 / Qwen style).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Numbers like 12, 345 and 67890 appear in text; so do dates (2024-05-17) and prices: $3.50, 1,000,000.
Café, naïve, façade, smörgåsbord, Ünïcödé; Ελληνικά, русский язык, 日本語のテキスト, 中文文本, 한국어.
Emojis 🙂🚀 and symbols: ->, =>, !=, <=, ###, ***, ~~~, ... and    runs   of     spaces.
def main():\n    return [x * 2 for x in range(10)]\n\tTabs\tand\nnew\n\nlines.
She said "hello" and he said 'goodbye'. It's, we're, they'll, I'd, you've.
Training models without gradients: forward passes only, perturb the adapter, measure the loss.
"""

# Tokenization corpus: unicode, digits, whitespace runs, special tokens (added per tokenizer).
TOKENIZATION_CORPUS = [
    "Hello world",
    " leading space and trailing space ",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000",
    "Whitespace    runs\t\ttabs\n\nnewlines\n   indented",
    "Café naïve façade Ünïcödé Ελληνικά русский 日本語 中文 한국어",
    "Emoji 🙂🚀🦙 and ZWJ 👩‍💻 done",
    "Code: def f(x):\n    return x**2  # square",
    "It's they'll I'd WE'RE you've",
    "!!! ??? ... --- === ***",
    "",
    "a",
    "   ",
]

PROMPTS = [
    "The quick brown fox",
    "Numbers like 12, 345 and 67890 appear in text",
    "Café, naïve, façade 日本語 🙂 and    spaces",
    "def main():\n    return [x * 2 for x in range(10)]",
]


def _sentences():
    return [line for line in TRAIN_TEXT.splitlines() if line.strip()] * 4


# ------------------------------------------------------------------------------------------- tokenizers
def sentencepiece_tokenizer(out: Path, vocab_size: int, specials: list[str], add_dummy_prefix: bool,
                            tokenizer_class: str, bos: str = "<s>", eos: str = "</s>", unk: str = "<unk>",
                            pad: str | None = None):
    """Train a byte-fallback SentencePiece BPE model, save it with its HF tokenizer, return the HF tokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=0.995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3 if pad else -1, unk_piece=unk, bos_piece=bos, eos_piece=eos,
        pad_piece=pad or "<pad>", user_defined_symbols=specials, allow_whitespace_only_pieces=False,
        minloglevel=2, num_threads=1,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": tokenizer_class, "bos_token": bos, "eos_token": eos, "unk_token": unk,
              "add_bos_token": True, "add_eos_token": False, "legacy": True}
    if pad:
        config["pad_token"] = pad
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(out)
    tok.save_pretrained(out)
    # Spell tokenizer.json the way the published Llama 2 / Mistral / Gemma files do: spaces become '▁' in
    # the normalizer, with a leading '▁' prepended (add_dummy_prefix) to every piece of text.
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    steps = ([{"type": "Prepend", "prepend": "\u2581"}] if add_dummy_prefix else []) + [replace]
    data["normalizer"] = {"type": "Sequence", "normalizers": steps}
    data["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    # transformers 5's LlamaTokenizer/GemmaTokenizer classes rebuild that normalizer (prepend only at the
    # very start); the generic class runs tokenizer.json exactly as written.
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_tokenizer(out: Path, vocab_size: int, style: str, specials: list[str], bos: str | None, eos: str):
    """Train a byte-level BPE with the Llama 3 ('llama3') or Qwen2 ('qwen2') pre-tokenizer; save and return
    the HF tokenizer. Llama 3 style adds BOS through a template and ignores merges for whole-word matches,
    as the real Llama 3 tokenizer does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[style]
    tok = Tokenizer(models.BPE(ignore_merges=(style == "llama3")))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_sentences(), trainer=trainer)
    if bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


# ------------------------------------------------------------------------------------------- models
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _save_model(model_cls, config, out: Path, seed: int, dtype="float32"):
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger-than-default weights make the logits far from uniform
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(-0.3, 0.3) if config.model_type.startswith("gemma") else p.uniform_(0.7, 1.3)
            else:
                p.normal_(0.0, 0.05)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    return model


def make_model(kind: str, out: Path, seed: int = 0):
    """Build tokenizer + random model of one family into `out`; returns (hf_model, hf_tokenizer, specials)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    out.mkdir(parents=True, exist_ok=True)
    if kind == "llama-spm":  # Llama 2 / TinyLlama style
        specials = ["<|user|>", "<|assistant|>"]
        tok = sentencepiece_tokenizer(out, 520, specials, True, "LlamaTokenizer")
        cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
                          tie_word_embeddings=False, **SMALL)
        model = _save_model(LlamaForCausalLM, cfg, out, seed)
    elif kind == "llama-bpe":  # Llama 3 / SmolLM style
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        tok = bpe_tokenizer(out, 420, "llama3", specials, bos="<|begin_of_text|>", eos="<|end_of_text|>")
        cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=0, eos_token_id=1, rope_theta=500000.0,
                          tie_word_embeddings=True, **SMALL)
        model = _save_model(LlamaForCausalLM, cfg, out, seed)
    elif kind == "mistral":
        specials = ["[INST]", "[/INST]"]
        tok = sentencepiece_tokenizer(out, 520, specials, True, "LlamaTokenizer")
        cfg = MistralConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, sliding_window=None,
                            rope_theta=1000000.0, tie_word_embeddings=False, **SMALL)
        model = _save_model(MistralForCausalLM, cfg, out, seed)
    elif kind in ("qwen2", "qwen3"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = bpe_tokenizer(out, 400, "qwen2", specials, bos=None, eos="<|im_end|>")
        common = dict(vocab_size=len(tok), bos_token_id=None, eos_token_id=2, rope_theta=1000000.0,
                      tie_word_embeddings=(kind == "qwen2"), **SMALL)
        if kind == "qwen2":
            model = _save_model(Qwen2ForCausalLM, Qwen2Config(**common), out, seed)
        else:
            model = _save_model(Qwen3ForCausalLM, Qwen3Config(head_dim=32, **common), out, seed)
    elif kind == "gemma3":
        specials = ["<start_of_turn>", "<end_of_turn>"]
        tok = sentencepiece_tokenizer(out, 520, specials, False, "GemmaTokenizer", bos="<bos>", eos="<eos>",
                                      pad="<pad>")
        small = dict(SMALL, num_hidden_layers=3)
        cfg = Gemma3TextConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                               head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               **small)
        cfg.architectures = ["Gemma3ForCausalLM"]
        model = _save_model(Gemma3ForCausalLM, cfg, out, seed)
    else:
        raise ValueError(kind)
    return model, tok, specials


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Largest deviation relative to the largest reference logit."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())
