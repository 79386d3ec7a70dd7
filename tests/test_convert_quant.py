"""Quantized outputs: q8_0 (written by gguf-py) and q4_k_m (llama.cpp's quantizer) load and score, and their
perplexity on a fixed text rises by a bounded, printed amount relative to F32. Also: a GGUF source is
re-typed, and a BF16 checkpoint converts losslessly to BF16.

The model is small (hidden 256, so rows split into 256-wide K-quant blocks) and is first trained for a few
seconds on the text, so its perplexity is low and quantization damage shows.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import TRAIN_TEXT, bpe_tokenizer, hf_logits, rel_err  # noqa: E402

from ggfwd.base import open_gguf  # noqa: E402
from ggfwd.convert.build import convert_model  # noqa: E402
from ggfwd.convert.staging import sha256_file  # noqa: E402
from ggfwd.session import Session  # noqa: E402

STEPS = 30
TEXT = TRAIN_TEXT.splitlines()[0] + " " + TRAIN_TEXT.splitlines()[6]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quant")
    tok = bpe_tokenizer(root / "hf", 420, "llama3", ["<|begin_of_text|>", "<|end_of_text|>"],
                        bos="<|begin_of_text|>", eos="<|end_of_text|>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor([tok(line).input_ids for line in [TEXT]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(root / "hf")
    return root, model, tok


def perplexity(session: Session, ids: list[int]) -> float:
    logits = session.logits(ids).astype(np.float64)[:-1]
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def tensor_types(path) -> set[str]:
    from gguf import GGMLQuantizationType

    return {GGMLQuantizationType(t.tensor_type).name for t in open_gguf(path).tensors}


def test_quantized_perplexity_rises_by_a_bounded_amount(trained):
    root, model, tok = trained
    ids = tok(TEXT).input_ids
    results = {}
    for t in ("f32", "q8_0", "q4_k_m"):
        convert_model(root / "hf", root / t, t, threads=1)
        with Session(root / t / "model.gguf", n_threads=1, kv_f32=True) as s:
            results[t] = perplexity(s, ids)
            if t == "f32":
                assert rel_err(s.logits(ids), hf_logits(model, ids)) < 1e-3
    assert {"Q8_0"} <= tensor_types(root / "q8_0" / "model.gguf")
    assert {"Q4_K", "Q6_K"} <= tensor_types(root / "q4_k_m" / "model.gguf")
    base = results["f32"]
    print(f"\nperplexity on {len(ids)} tokens: f32 {base:.4f}, "
          f"q8_0 {results['q8_0']:.4f} ({100 * (results['q8_0'] / base - 1):+.2f}%), "
          f"q4_k_m {results['q4_k_m']:.4f} ({100 * (results['q4_k_m'] / base - 1):+.2f}%)")
    assert base < 3.0, "training should have made the text predictable"
    assert abs(results["q8_0"] / base - 1) < 0.01
    assert abs(results["q4_k_m"] / base - 1) < 0.10


def test_gguf_source_is_retyped(trained):
    root, model, tok = trained
    src = root / "f32" / "model.gguf"
    if not src.exists():
        convert_model(root / "hf", root / "f32", "f32", threads=1)
    convert_model(src, root / "from_gguf", "q8_0", threads=1, targets="q,v,down")
    assert "Q8_0" in tensor_types(root / "from_gguf" / "model.gguf")
    copy_dir = root / "copied"
    record = convert_model(src, copy_dir, None, threads=1)
    assert record["sha256"]["model.gguf"] == sha256_file(src)  # unchanged type: a plain copy
    ids = tok(TEXT).input_ids
    with Session(root / "from_gguf" / "model.gguf", n_threads=1, kv_f32=True) as s:
        assert rel_err(s.logits(ids), hf_logits(model, ids)) < 2e-2


def test_bf16_checkpoint_converts_losslessly(trained, tmp_path):
    root, model, tok = trained
    bf16 = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16)
    model.to(torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / name).write_bytes((root / "hf" / name).read_bytes())
    convert_model(bf16, tmp_path / "out", "bf16", threads=1)
    from gguf import GGMLQuantizationType

    reader = open_gguf(tmp_path / "out" / "model.gguf")
    from safetensors import safe_open

    with safe_open(bf16 / "model.safetensors", framework="pt") as f:
        want = f.get_tensor("model.layers.0.self_attn.v_proj.weight").view(torch.int16).numpy().view(np.uint16)
    got = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert got.tensor_type == GGMLQuantizationType.BF16
    np.testing.assert_array_equal(np.asarray(got.data).view(np.uint16).reshape(want.shape), want)
