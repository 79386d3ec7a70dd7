"""The tokenizer part of a GGUF header: SentencePiece (`tokenizer.model`) or byte-level BPE (`tokenizer.json`).

Special tokens, BOS/EOS flags, merges and the chat template come from gguf-py's SpecialVocab.
For BPE, llama.cpp does not read the pre-tokenizer regex from the file; it picks a built-in one by the name
in `tokenizer.ggml.pre`. llama.cpp's own converter finds that name from a hash of the token ids of a test
string, which only works for vocabularies it has seen. ggfwd reads the pre-tokenizer itself from
`tokenizer.json` and names the llama.cpp implementation of the same rules, so a new vocabulary built with a
known pre-tokenizer (as in the tests) converts too; an unknown pre-tokenizer is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import UserError
from .architectures import Architecture

# Pre-tokenizer regexes as they appear in tokenizer.json, and the llama.cpp name implementing each.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS = {
    # (regex splits, ByteLevel use_regex, individual digits) -> tokenizer.ggml.pre
    ((LLAMA3_REGEX,), False, False): "llama-bpe",
    ((QWEN2_REGEX,), False, False): "qwen2",
    ((), True, False): "gpt-2",
    ((), True, True): "smollm",
}
SUPPORTED_PRE = "Llama 3 (llama-bpe), Qwen2 (qwen2), GPT-2 (gpt-2), SmolLM (smollm)"


def _pre_tokenizer_steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [s for p in pre.get("pretokenizers", []) for s in _pre_tokenizer_steps(p)]
    return [pre]


def bpe_pre_name(tokenizer_json: dict) -> str:
    """The `tokenizer.ggml.pre` value whose llama.cpp pre-tokenizer matches this tokenizer.json."""
    regexes, byte_level_regex, digits = [], None, False
    for step in _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "Split" and "Regex" in (step.get("pattern") or {}):
            regexes.append(step["pattern"]["Regex"])
        elif kind == "ByteLevel":
            byte_level_regex = bool(step.get("use_regex", True))
        elif kind == "Digits" and step.get("individual_digits"):
            digits = True
        else:
            raise UserError(f"BPE pre-tokenizer step {kind!r} is not supported; supported: {SUPPORTED_PRE}")
    if byte_level_regex is None:
        raise UserError("BPE tokenizer is not byte-level (no ByteLevel pre-tokenizer); not supported")
    name = BPE_PRE_TOKENIZERS.get((tuple(regexes), byte_level_regex, digits))
    if name is None:
        raise UserError(f"unknown BPE pre-tokenizer in tokenizer.json; supported: {SUPPORTED_PRE}")
    return name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path.name}: {exc}") from None


def _added_tokens(src: Path) -> list[tuple[int, str, bool]]:
    """(id, text, special) of the tokens added on top of the base vocabulary."""
    if (src / "tokenizer.json").is_file():
        data = _read_json(src / "tokenizer.json")
        return [(int(t["id"]), t["content"], bool(t.get("special"))) for t in data.get("added_tokens", [])]
    if (src / "tokenizer_config.json").is_file():
        decoder = _read_json(src / "tokenizer_config.json").get("added_tokens_decoder", {})
        return [(int(i), t["content"], bool(t.get("special"))) for i, t in decoder.items()]
    return []


def tokenizer_kind(src: Path) -> str:
    """'spm' or 'bpe'; raises when the directory has no tokenizer ggfwd can convert."""
    if (src / "tokenizer.model").is_file():
        return "spm"
    if (src / "tokenizer.json").is_file():
        model_type = _read_json(src / "tokenizer.json").get("model", {}).get("type")
        if model_type == "BPE":
            return "bpe"
        raise UserError(f"tokenizer.json has a {model_type} model; ggfwd converts SentencePiece and BPE only")
    raise UserError(f"no tokenizer in {src}: need tokenizer.model (SentencePiece) or tokenizer.json (BPE)")


def write_vocab(writer, src: Path, arch: Architecture, n_vocab: int) -> str:
    """Write the vocabulary and special tokens of `src` into the GGUF header; returns a short description."""
    import gguf

    kind = tokenizer_kind(src)
    if kind == "spm":
        _write_sentencepiece(writer, src, arch, n_vocab)
        desc = "SentencePiece"
    else:
        pre = _write_bpe(writer, src, n_vocab)
        desc = f"BPE ({pre})"
    vocab_log = logging.getLogger("gguf.vocab")  # its guesses about pair templates are noise here
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(src, load_merges=(kind == "bpe"), n_vocab=n_vocab)
    finally:
        vocab_log.setLevel(level)
    special.add_to_gguf(writer, quiet=True)
    return desc


def _pad(tokens: list, types: list, scores: list | None, n_vocab: int) -> None:
    import gguf

    for i, tok in enumerate(tokens):
        if tok is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = gguf.TokenType.UNUSED
            if scores is not None:
                scores[i] = -1000.0


def _write_sentencepiece(writer, src: Path, arch: Architecture, n_vocab: int) -> None:
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    if not sp.Load(str(src / "tokenizer.model")):
        raise UserError("cannot load tokenizer.model")
    if sp.vocab_size() > n_vocab:
        raise UserError(f"tokenizer.model has {sp.vocab_size()} pieces but the model only {n_vocab} embeddings")
    tokens: list = [None] * n_vocab
    scores: list = [0.0] * n_vocab
    types: list = [gguf.TokenType.NORMAL] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = gguf.TokenType.BYTE
    for token_id, text, special in _added_tokens(src):
        if token_id >= n_vocab:
            raise UserError(f"added token {text!r} has id {token_id}, beyond the model's {n_vocab} embeddings")
        tokens[token_id] = text if special else text.replace("\u2581", " ")
        scores[token_id] = -1000.0
        types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    _pad(tokens, types, scores, n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    space_prefix = arch.spm_space_prefix
    if space_prefix is None:  # does the model prepend '▁' to the text (SentencePiece add_dummy_prefix)?
        space_prefix = "".join(sp.EncodeAsPieces("a")).startswith("\u2581")
    writer.add_add_space_prefix(bool(space_prefix))


def _write_bpe(writer, src: Path, n_vocab: int) -> str:
    import gguf

    data = _read_json(src / "tokenizer.json")
    pre = bpe_pre_name(data)
    tokens: list = [None] * n_vocab
    types: list = [gguf.TokenType.NORMAL] * n_vocab
    for text, token_id in data["model"]["vocab"].items():
        if token_id >= n_vocab:
            raise UserError(f"token {text!r} has id {token_id}, beyond the model's {n_vocab} embeddings")
        tokens[token_id] = text
    for token_id, text, special in _added_tokens(src):
        if token_id >= n_vocab:
            raise UserError(f"added token {text!r} has id {token_id}, beyond the model's {n_vocab} embeddings")
        tokens[token_id] = text
        types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    _pad(tokens, types, None, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return pre
