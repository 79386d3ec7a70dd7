"""Per architecture: a tiny random transformers model with a tokenizer trained here, converted to GGUF and run
through the real llama.cpp, against transformers as the reference.

Checks: base logits, tokenization, a non-zero LoRA (built in Hugging Face space, moved to GGUF by the test's
own permutation code), and the PEFT export of that adapter loaded through `peft`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import PROMPTS, TOKENIZATION_CORPUS, hf_logits, make_model, rel_err  # noqa: E402

from ggfwd.adapter import LoraAdapter  # noqa: E402
from ggfwd.convert.build import convert_model  # noqa: E402
from ggfwd.convert.export import export_adapter  # noqa: E402
from ggfwd.session import Session  # noqa: E402

KINDS = ["llama-spm", "llama-bpe", "mistral", "qwen2", "qwen3", "gemma3"]
TOL = 1e-3  # max |llama.cpp - transformers| relative to the largest reference logit
HF_MODULE = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
             "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


@pytest.fixture(scope="module", params=KINDS)
def converted(request, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    model, tok, specials = make_model(request.param, root / "hf")
    record = convert_model(root / "hf", root / "out", "f32", targets="q,k,v,o,gate,up,down", rank=4, alpha=8,
                           threads=1)
    session = Session(root / "out" / "model.gguf", n_threads=1, kv_f32=True)
    yield dict(kind=request.param, root=root, model=model, tok=tok, specials=specials, record=record,
               session=session)
    session.close()


def test_record_describes_the_conversion(converted):
    record = json.loads((converted["root"] / "out" / "ggfwd.json").read_text())
    assert record["type"] == "f32" and record["rank"] == 4 and record["alpha"] == 8.0
    assert set(record["sha256"]) == {"model.gguf", "adapter.gguf"}
    assert record["qk_permuted"] == (record["architecture"] == "llama")
    adapter = LoraAdapter.load(converted["root"] / "out" / "adapter.gguf")
    assert adapter.rank == 4 and np.all(adapter.params[adapter.mask("b")] == 0)
    assert np.abs(adapter.params[adapter.mask("a")]).max() > 0


def test_logits_match_transformers(converted):
    for prompt in PROMPTS:
        ids = converted["tok"](prompt).input_ids
        ref = hf_logits(converted["model"], ids)
        got = converted["session"].logits(ids)
        assert got.shape == ref.shape
        assert rel_err(got, ref) < TOL, (converted["kind"], prompt, rel_err(got, ref))


def test_tokenization_matches_transformers(converted):
    first, last = converted["specials"][0], converted["specials"][-1]
    corpus = TOKENIZATION_CORPUS + [f"{first}hi{last}x", f"{first}\nuser text {last} reply", f"a{last}{first}b"]
    for text in corpus:
        want = converted["tok"](text).input_ids
        got = converted["session"].tokenize(text, add_special=True, parse_special=True)
        assert got == want, (converted["kind"], text)


def _hf_lora(model, names, rank, seed):
    """Random A (r, in) and B (out, r) per target, keyed by GGUF name, in Hugging Face row order."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name in names:
        layer, short = int(name.split(".")[1]), name.split(".")[2]
        group = "mlp" if short.startswith("ffn") else "self_attn"
        weight = getattr(getattr(model.model.layers[layer], group), HF_MODULE[short]).weight
        out_dim, in_dim = weight.shape
        lora[name] = (rng.normal(0, 0.3, (rank, in_dim)).astype(np.float32),
                      rng.normal(0, 0.3, (out_dim, rank)).astype(np.float32))
    return lora


def _to_gguf_rows(b, short, cfg):
    """The llama converter's q/k row order, written out independently of ggfwd.convert."""
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(short)
    if heads is None:
        return b
    return b.reshape(heads, 2, b.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(b.shape)


def _merged_logits(model, lora, scale, ids):
    """transformers logits with W + scale * B A merged into each target (restored afterwards)."""
    saved = []
    with torch.no_grad():
        for name, (a, b) in lora.items():
            layer, short = int(name.split(".")[1]), name.split(".")[2]
            group = "mlp" if short.startswith("ffn") else "self_attn"
            weight = getattr(getattr(model.model.layers[layer], group), HF_MODULE[short]).weight
            saved.append((weight, weight.detach().clone()))
            weight += scale * torch.from_numpy(b @ a)
        try:
            return hf_logits(model, ids)
        finally:
            for weight, old in saved:
                weight.copy_(old)


def test_lora_and_peft_export_match_transformers(converted, tmp_path):
    from peft import PeftModel

    model, session, out = converted["model"], converted["session"], converted["root"] / "out"
    adapter = LoraAdapter.load(out / "adapter.gguf")
    lora = _hf_lora(model, adapter.targets, adapter.rank, seed=1)
    permuted = converted["record"]["architecture"] == "llama"
    for name, (a, b) in lora.items():
        adapter.a[name][...] = a
        b_gguf = _to_gguf_rows(b, name.split(".")[2], model.config) if permuted else b
        adapter.b[name][...] = b_gguf
    trained = out / "trained.gguf"  # where training leaves it: export finds ggfwd.json beside it
    adapter.save(trained)

    session.set_adapter(LoraAdapter.load(trained))
    try:
        for prompt in PROMPTS[:2]:
            ids = converted["tok"](prompt).input_ids
            ref = _merged_logits(model, lora, adapter.scale, ids)
            base = hf_logits(model, ids)
            assert rel_err(base, ref) > 20 * TOL, "the adapter must change the logits for this check to mean anything"
            assert rel_err(session.logits(ids), ref) < TOL, (converted["kind"], prompt)
    finally:
        session.set_adapter(None)

    peft_dir = tmp_path / "peft"
    export_adapter(trained, "peft", peft_dir)
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    prompts = [converted["tok"](p).input_ids for p in PROMPTS[:2]]
    refs = [_merged_logits(model, lora, adapter.scale, ids) for ids in prompts]
    peft_model = PeftModel.from_pretrained(model, peft_dir).eval()
    try:
        state = {k: v.numpy() for k, v in peft_model.state_dict().items() if "lora_" in k}
        for name, (a, b) in lora.items():  # exact round trip of the Hugging Face-space matrices
            layer, short = int(name.split(".")[1]), name.split(".")[2]
            key = next(k for k in state if f"layers.{layer}." in k and f".{HF_MODULE[short]}.lora_B" in k)
            np.testing.assert_array_equal(state[key], b)
            np.testing.assert_array_equal(state[key.replace("lora_B", "lora_A")], a)
        for ids, ref in zip(prompts, refs):
            with torch.no_grad():
                got = peft_model(torch.tensor([ids])).logits[0].float().numpy()
            assert rel_err(got, ref) < 1e-4, converted["kind"]  # merged vs. unmerged float32 rounding
    finally:
        peft_model.unload()


def test_export_gguf_loads_in_llama_cpp(converted, tmp_path):
    out = converted["root"] / "out"
    adapter = LoraAdapter.load(out / "adapter.gguf")
    adapter.b[adapter.targets[0]][...] = 0.5
    trained = tmp_path / "trained.gguf"
    adapter.save(trained)
    export_adapter(trained, "gguf", tmp_path / "exported", base=out / "model.gguf")
    exported = LoraAdapter.load(tmp_path / "exported" / "adapter.gguf")
    np.testing.assert_array_equal(exported.params, adapter.params)
    ids = converted["tok"](PROMPTS[0]).input_ids
    session = converted["session"]
    try:
        session.set_adapter(adapter)
        want = session.logits(ids)
        session.set_adapter(exported)
        np.testing.assert_array_equal(session.logits(ids), want)
    finally:
        session.set_adapter(None)
