"""The scoring session against an exact numpy forward pass of the same tiny model."""

import numpy as np
import pytest

import tinymodel
from ggfwd.adapter import LoraAdapter
from ggfwd.session import Session
from ggfwd.tasks import BUILTIN_TASKS, Example, Task, tokenize_examples

TEXTS = ["the movie was great", "a dull plot , bad actors", "i love this film", "not fun",
         "the actors hate the plot , very dull", "great great fun", "terrible", "was it good ? no"]


@pytest.fixture(scope="module")
def session(tiny_model):
    with Session(tiny_model, n_threads=2, max_seqs=4, seq_tokens=128, batch_tokens=256, kv_f32=True) as s:
        yield s


def _rel(x, ref):
    return np.abs(x - ref).max() / np.abs(ref).max()


def _random_b(adapter, seed, std=0.2):
    rng = np.random.default_rng(seed)
    for name in adapter.targets:
        adapter.b[name][...] = rng.normal(0, std, adapter.b[name].shape)
    return adapter


def test_logits_match_numpy_forward(session, tiny_weights):
    ids = session.tokenize("Review: the movie was great\nSentiment (great or terrible):")
    session.set_adapter(None)
    assert _rel(session.logits(ids), tinymodel.forward(tiny_weights, ids)) < 1e-5


@pytest.mark.parametrize("targets", [["attn_q", "attn_v"], ["attn_k", "attn_output", "ffn_gate", "ffn_down"]])
def test_adapter_acts_as_w_plus_scaled_ba(session, tiny_weights, targets):
    """W x + (alpha / r) B (A x), checked exactly: orientation of A and B, and the alpha/r scale."""
    ad = _random_b(LoraAdapter.create(session.base, targets=targets, rank=4, alpha=12.0, seed=5), seed=6)
    ids = session.tokenize("a dull plot , bad actors")
    session.set_adapter(ad)
    got = session.logits(ids)
    lora = {n: (ad.a[n], ad.b[n]) for n in ad.targets}
    want = tinymodel.forward(tiny_weights, ids, lora=lora, scale=12.0 / 4)
    plain = tinymodel.forward(tiny_weights, ids)
    assert np.abs(want - plain).max() > 0.1  # the adapter matters...
    assert _rel(got, want) < 1e-5  # ...exactly as the formula says
    # The wrong scale (1.0 instead of alpha/r) would be far off.
    assert _rel(got, tinymodel.forward(tiny_weights, ids, lora=lora, scale=1.0)) > 1e-2
    session.set_adapter(None)


def _classification(session, texts=TEXTS):
    task = BUILTIN_TASKS["sst2"]
    examples = [Example(t, label=i % 2) for i, t in enumerate(texts)]
    return tokenize_examples(examples, task, session.tokenize, session.detokenize, 64)


def test_classification_losses_match_reference_and_batching(session, tiny_weights):
    data = _classification(session)
    ad = _random_b(LoraAdapter.create(session.base, rank=4, seed=1), seed=2, std=0.05)
    session.set_adapter(ad)
    plan = session.plan(data)
    assert len(plan.chunks) == 2  # 8 sequences, at most 4 per decode
    scores = session.score(plan)
    lora = {n: (ad.a[n], ad.b[n]) for n in ad.targets}
    for ex, loss, ok in zip(data.examples, scores.losses, scores.correct):
        z = tinymodel.forward(tiny_weights, ex.tokens, lora=lora, scale=ad.scale)[-1, data.classes]
        logp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
        assert loss == pytest.approx(-logp[ex.targets[0]], rel=1e-4, abs=1e-6)
        assert ok == (z.argmax() == ex.targets[0])
    session.set_adapter(None)


def test_generation_loss_is_mean_token_cross_entropy(session, tiny_weights):
    task = Task("gen", "generation", "{prompt}")
    examples = [Example("the movie was", completion=" great fun"), Example("i hate", completion=" the plot")]
    data = tokenize_examples(examples, task, session.tokenize, session.detokenize, 64)
    session.set_adapter(None)
    scores = session.score(session.plan(data))
    for ex, loss in zip(data.examples, scores.losses):
        logits = tinymodel.forward(tiny_weights, ex.tokens)[ex.positions]
        m = logits.max(1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
        assert len(ex.targets) >= 2
        assert loss == pytest.approx(-logp[np.arange(len(ex.targets)), ex.targets].mean(), rel=1e-4)


def test_scoring_is_bitwise_reproducible_and_eps_roundtrip_returns_original(tiny_model):
    # Default settings (F16 KV cache): the numerics the trainer uses.
    with Session(tiny_model, n_threads=2, max_seqs=4, seq_tokens=128, batch_tokens=256) as s:
        data = _classification(s)
        ad = _random_b(LoraAdapter.create(s.base, rank=4, seed=1), seed=3, std=0.05)
        s.set_adapter(ad)
        plan = s.plan(data)
        first = s.score(plan).losses
        again = s.score(plan).losses
        assert first.tobytes() == again.tobytes()
        theta = ad.params.copy()
        z = np.random.default_rng(0).normal(size=theta.size).astype(np.float32)
        s.set_params(theta + 0.01 * z)
        plus = s.score(plan).losses
        s.set_params(theta - 0.01 * z)
        minus = s.score(plan).losses
        s.set_params(theta)
        back = s.score(plan).losses
        assert not np.array_equal(plus, minus)  # the perturbation is visible
        assert back.tobytes() == first.tobytes()
        # A second plan of the same examples gives the same layout, so the same bits.
        assert s.score(s.plan(data)).losses.tobytes() == first.tobytes()


def test_lean_memory_keeps_sequences_apart_and_reproduces_bitwise(tiny_model, tiny_weights):
    """`lean` reads the weights instead of mapping them and gives the decode's sequences one shared KV stream:
    the attention masks must still keep them apart (each loss is the exact forward pass of its own text), and a
    plan must score to the same bits again, also after a perturbation and its return."""
    import llama_cpp

    with Session(tiny_model, n_threads=1, max_seqs=4, seq_tokens=128, batch_tokens=256) as standard:
        assert llama_cpp.llama_n_ctx_seq(standard.ctx) == 256  # a stream per sequence, padded to 256 cells
    with Session(tiny_model, n_threads=2, max_seqs=4, seq_tokens=128, batch_tokens=256, kv_f32=True, lean=True) as s:
        assert llama_cpp.llama_n_ctx_seq(s.ctx) == llama_cpp.llama_n_ctx(s.ctx) == 512  # one shared stream
        data = _classification(s)
        ad = _random_b(LoraAdapter.create(s.base, rank=4, seed=1), seed=2, std=0.05)
        s.set_adapter(ad)
        plan = s.plan(data)
        scores = s.score(plan)
        lora = {n: (ad.a[n], ad.b[n]) for n in ad.targets}
        for ex, loss in zip(data.examples, scores.losses):
            z = tinymodel.forward(tiny_weights, ex.tokens, lora=lora, scale=ad.scale)[-1, data.classes]
            logp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
            assert loss == pytest.approx(-logp[ex.targets[0]], rel=1e-4, abs=1e-6)
        theta = ad.params.copy()
        s.set_params(theta + 0.01)
        assert not np.array_equal(s.score(plan).losses, scores.losses)
        s.set_params(theta)
        assert s.score(plan).losses.tobytes() == scores.losses.tobytes()


def test_left_truncation_keeps_the_end_of_the_text(session):
    long_text = " ".join(["very"] * 200) + " the movie was great"
    data = _classification(session, [long_text, "fun"])
    assert data.n_truncated == 1
    assert len(data.examples[0].tokens) <= 64
    assert "great" in session.detokenize(data.examples[0].tokens[-40:])
    assert data.examples[1].tokens.size < 64
