"""eps calibration: the analysis on synthetic losses with known noise and curvature, and the real thing on tiny
models, checked against the numpy float64 reference forward."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tinymodel
from ggfwd.adapter import LoraAdapter
from ggfwd.calibration import Calibration, analyse, calibrate_eps
from ggfwd.perturbation import Perturbations
from ggfwd.session import Session
from ggfwd.tasks import load_examples, load_task, tokenize_examples
from tinytask import make_tiny

CANDIDATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


# ----------------------------------------------------------------------------- synthetic
def synthetic(sigma, g, c, q=0.0, seed=0, candidates=CANDIDATES):
    """Losses L(x +- e z) = L0 +- (g e + c e^3 + q e^5) + even part + N(0, sigma^2) per evaluation."""
    rng = np.random.default_rng(seed)
    e = np.asarray(candidates)[None, :]
    g, c = np.asarray(g)[:, None], np.asarray(c)[:, None]
    odd = g * e + c * e ** 3 + q * e ** 5
    even = 0.7 * e ** 2
    plus = 1.0 + odd + even + rng.normal(0, sigma, odd.shape)
    minus = 1.0 - odd + even + rng.normal(0, sigma, odd.shape)
    return plus, minus


def test_analysis_recovers_noise_and_picks_the_balanced_eps():
    g = np.array([1.0, -0.6, 1.3, -1.1, 0.8, -0.9])
    c = np.array([2.0, -3.0, 2.5, 1.5, -2.0, 3.0])
    sigma = 1e-3
    plus, minus = synthetic(sigma, g, c, seed=3)
    cal = analyse(CANDIDATES, plus, minus, 1.0)
    assert isinstance(cal, Calibration)
    assert 0.6 * sigma < cal.noise_floor < 1.6 * sigma
    assert 0.5 * np.sqrt((c ** 2).mean()) < cal.curvature < 1.5 * np.sqrt((c ** 2).mean())
    # Theory: error^2 = (sigma/sqrt2)^2 / e^2 + (c e^2)^2 is smallest at e = (sigma^2 / (4 c^2))^(1/6).
    c_rms = np.sqrt((c ** 2).mean())
    best = (sigma ** 2 / (4 * c_rms ** 2)) ** (1 / 6)
    assert best / 2 < cal.eps < best * 2
    assert cal.predicted_rel_error < 0.05
    assert np.corrcoef(cal.directional, g)[0, 1] > 0.999
    assert cal.table() is not None and "eps" in cal.summary()


def test_analysis_flags_noise_dominated_and_dead_losses():
    g = np.array([1.0, -0.5, 0.7])
    plus, minus = synthetic(0.5, g, np.zeros(3), seed=1)
    cal = analyse(CANDIDATES, plus, minus, 1.0)
    assert cal.predicted_rel_error > 0.3
    assert any("unreliable" in w for w in cal.warnings)
    flat = np.ones((3, len(CANDIDATES)))
    dead = analyse(CANDIDATES, flat, flat, 1.0)
    assert any("did not respond" in w for w in dead.warnings)
    assert dead.rows[0].unchanged == 1.0


# ----------------------------------------------------------------------------- real, tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import ctypes

    import llama_cpp

    folder = tmp_path_factory.mktemp("calib")
    paths = make_tiny(folder, n_train=8, n_eval=8)
    weights = tinymodel.make_weights(0)
    paths["f16"] = tinymodel.write_gguf(folder / "tiny-f16.gguf", weights, dtype="f16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 7  # Q8_0
    params.nthread = 1
    paths["q8_0"] = folder / "tiny-q8_0.gguf"
    assert llama_cpp.llama_model_quantize(str(paths["model"]).encode(), str(paths["q8_0"]).encode(),
                                          ctypes.byref(params)) == 0
    paths["weights"] = weights
    return paths


def setup(tiny, model_key="model", **session_kwargs):
    session = Session(tiny[model_key], n_threads=1, max_seqs=8, seq_tokens=64, batch_tokens=512, **session_kwargs)
    task = load_task(str(tiny["task"]))
    data = tokenize_examples(load_examples(tiny["train"], task), task, session.tokenize, session.detokenize, 64)
    adapter = LoraAdapter.create(session.base, rank=4, seed=0)
    rng = np.random.default_rng(5)
    for name in adapter.targets:  # away from the special point B = 0
        adapter.b[name][...] = rng.normal(0, 0.1, adapter.b[name].shape)
    session.set_adapter(adapter)
    return session, session.plan(data), data, adapter


def reference_loss(weights, data, adapter, params) -> float:
    a = adapter.with_params(params.astype(np.float64).astype(np.float32) if params.dtype != np.float64 else
                            params.astype(np.float32))
    lora = {n: (a.a[n], a.b[n]) for n in a.targets}
    total = 0.0
    for ex in data.examples:
        logits = tinymodel.forward(weights, ex.tokens, lora=lora, scale=a.scale)[ex.positions[0], data.classes]
        m = logits.max()
        total += m + math.log(np.exp(logits - m).sum()) - logits[ex.targets[0]]
    return total / len(data)


def reference_directional(weights, data, adapter, z, h=1e-3) -> float:
    """Exact (to ~1e-6 relative) directional derivative from the float64 numpy forward. The adapter is
    float32, so the step is applied in float64 through a linear map on the (A, B) values instead."""
    x = adapter.params.astype(np.float64)

    def loss(t):
        p = x + t * z.astype(np.float64)
        ad = LoraAdapter(adapter.arch, adapter.alpha, adapter.rank, list(adapter.targets), dict(adapter.shapes),
                         np.zeros(adapter.params.size, np.float32))
        lora = {}
        for name, (a_sl, b_sl) in adapter.slices().items():
            out_dim, in_dim = adapter.shapes[name]
            lora[name] = (p[a_sl].reshape(adapter.rank, in_dim), p[b_sl].reshape(out_dim, adapter.rank))
        total = 0.0
        for ex in data.examples:
            logits = tinymodel.forward(weights, ex.tokens, lora=lora, scale=ad.scale)[ex.positions[0], data.classes]
            m = logits.max()
            total += m + math.log(np.exp(logits - m).sum()) - logits[ex.targets[0]]
        return total / len(data)

    # Richardson-extrapolated central difference: error O(h^4) in float64.
    d1 = (loss(h) - loss(-h)) / (2 * h)
    d2 = (loss(2 * h) - loss(-2 * h)) / (4 * h)
    return (4 * d1 - d2) / 3


def test_chosen_eps_on_f32_matches_the_exact_derivative(tiny):
    session, plan, data, adapter = setup(tiny, kv_f32=True)
    pert = Perturbations(adapter, seed=11, part="b")
    before = session.score(plan).losses.copy()
    cal = calibrate_eps(session, plan, adapter, pert, candidates=CANDIDATES, n_directions=4)
    # The adapter values are restored afterwards, bit for bit.
    assert np.array_equal(session.score(plan).losses, before)
    assert cal.n_evaluations == 1 + 2 * 4 * len(CANDIDATES)
    assert cal.predicted_rel_error < 0.05, cal.summary()
    x = adapter.params.copy()
    errors = []
    for k in range(100, 104):  # fresh directions, not the calibration's own
        z = pert.direction(0, 0, k)
        session.set_params(x + np.float32(cal.eps) * z)
        lp = session.score(plan).loss
        session.set_params(x - np.float32(cal.eps) * z)
        lm = session.score(plan).loss
        est = (lp - lm) / (2 * cal.eps)
        exact = reference_directional(tiny["weights"], data, adapter, z)
        errors.append(abs(est - exact) / abs(exact))
    session.set_params(x)
    assert max(errors) < 0.05, (errors, cal.summary())
    session.close()


def test_several_batches_pool_their_directions(tiny):
    session, plan, data, adapter = setup(tiny, kv_f32=True)
    halves = [session.plan(data.subset(range(0, 4))), session.plan(data.subset(range(4, 8)))]
    base = [session.score(h).loss for h in halves]
    assert base[0] != base[1]
    pert = Perturbations(adapter, seed=11, part="b")
    seen = []
    one = calibrate_eps(session, halves[:1], adapter, pert, candidates=CANDIDATES, n_directions=2)
    two = calibrate_eps(session, halves, adapter, pert, candidates=CANDIDATES, n_directions=2,
                        on_eval=lambda done, total: seen.append((done, total)))
    assert (two.n_batches, two.n_directions, two.n_evaluations) == (2, 4, 2 * (1 + 2 * 2 * len(CANDIDATES)))
    assert seen[-1] == (two.n_evaluations, two.n_evaluations)
    assert two.base_loss == pytest.approx(np.mean(base))
    # the first batch's directions are the one-batch run's (same indices), the second batch's are new
    assert np.array_equal(two.differences[:2], one.differences)
    assert not np.allclose(two.differences[2:], one.differences)
    assert np.isfinite(two.predicted_rel_error) and CANDIDATES[0] <= two.eps <= CANDIDATES[-1]
    session.close()


def test_noise_floor_is_higher_for_reduced_precision_weights(tiny):
    floors = {}
    for key in ("model", "f16", "q8_0"):
        session, plan, data, adapter = setup(tiny, key, kv_f32=True)
        cal = calibrate_eps(session, plan, adapter, Perturbations(adapter, seed=3, part="b"),
                            candidates=CANDIDATES, n_directions=3)
        floors[key] = cal.noise_floor
        session.close()
    assert floors["f16"] > 10 * floors["model"], floors
    assert floors["q8_0"] > 10 * floors["f16"], floors
