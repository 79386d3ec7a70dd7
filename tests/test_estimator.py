"""Estimator and optimizer on the real engine (tiny llama GGUF written in the test)."""

import numpy as np
import pytest

from ggfwd.adapter import LoraAdapter
from ggfwd.errors import UserError
from ggfwd.estimator import Estimator, aggregate, client_weights, passes_per_step, rebuild
from ggfwd.optimizer import Optimizer, lr_at
from ggfwd.perturbation import Perturbations
from ggfwd.session import Session
from ggfwd.tasks import load_examples, load_task, tokenize_examples
from tinymodel import forward, make_weights
from tinytask import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny(tmp_path_factory.mktemp("tiny"), n_train=8)
    session = Session(paths["model"], n_threads=1, max_seqs=8, seq_tokens=64, batch_tokens=512, kv_f32=True)
    task = load_task(str(paths["task"]))
    data = tokenize_examples(load_examples(paths["train"], task), task, session.tokenize, session.detokenize, 64)
    adapter = LoraAdapter.create(session.base, rank=4, alpha=8.0, seed=1)
    adapter.b["blk.0.attn_v.weight"][...] = 0.05  # away from B = 0, so A directions matter too
    session.set_adapter(adapter)
    yield session, data, adapter
    session.close()


def reference_loss(adapter, data, params):
    """Mean verbalizer cross-entropy from the independent numpy forward pass (float64)."""
    ad = adapter.with_params(params)
    lora = {n: (ad.a[n], ad.b[n]) for n in ad.targets}
    w = make_weights(0)
    out = []
    for ex in data.examples:
        z = forward(w, ex.tokens, lora, ad.scale)[ex.positions[0], data.classes]
        out.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ex.targets[0]])
    return float(np.mean(out))


def test_central_scalars_match_independent_reference(tiny):
    session, data, adapter = tiny
    p = Perturbations(adapter, seed=3, part="all")
    est = Estimator(session, p, eps=0.1, directions=3)
    plan = session.plan(data)
    theta = adapter.params.copy()
    e = est.estimate(theta, plan, step=4)
    assert e.forward_passes == 6 and e.finite
    for k, s in enumerate(e.scalars):
        z = p.direction(4, 0, k)
        ref = (reference_loss(adapter, data, theta + 0.1 * z) - reference_loss(adapter, data, theta - 0.1 * z)) / 0.2
        assert s == pytest.approx(ref, rel=0.02, abs=1e-3)
    assert np.any(np.abs(e.scalars) > 1e-2)  # the check above is not vacuous


def test_central4_cancels_the_curvature_term_of_central_differences(tiny):
    session, data, adapter = tiny
    p = Perturbations(adapter, seed=3, part="all")
    plan = session.plan(data)
    theta = adapter.params.copy()
    eps, k = 0.1, 6
    c2 = Estimator(session, p, eps=eps, directions=k).estimate(theta, plan, step=4)
    c4 = Estimator(session, p, eps=eps, directions=k, scheme="central4").estimate(theta, plan, step=4)
    assert c4.forward_passes == passes_per_step("central4", k) == 4 * k and c4.finite
    assert np.array_equal(c4.losses_plus, c2.losses_plus) and np.array_equal(c4.losses_minus, c2.losses_minus)
    assert c4.losses_wide.shape == (2, k)
    want = (8 * (c4.losses_plus - c4.losses_minus) - (c4.losses_wide[0] - c4.losses_wide[1])) / (12 * eps)
    assert np.allclose(c4.scalars, want)
    h = 1e-4  # exact directional derivatives from the float64 reference
    exact = np.array([(reference_loss(adapter, data, theta + h * p.direction(4, 0, j))
                       - reference_loss(adapter, data, theta - h * p.direction(4, 0, j))) / (2 * h)
                      for j in range(k)])
    err2, err4 = np.linalg.norm(c2.scalars - exact), np.linalg.norm(c4.scalars - exact)
    assert err2 > 0.004 * np.linalg.norm(exact)  # the eps^2 term of central differences shows (0.8% here)
    assert err4 < 0.25 * err2  # and central4 removes most of it (10x here)


def test_estimates_are_reproducible_and_rebuilt_from_seeds(tiny):
    session, data, adapter = tiny
    p = Perturbations(adapter, seed=5)
    est = Estimator(session, p, eps=0.1, directions=2)
    plan = session.plan(data)
    theta = adapter.params.copy()
    session.set_params(theta)
    before = session.score(plan).losses.copy()
    e1 = est.estimate(theta, plan, step=1)
    g1 = aggregate(p, 1, [(0, e1.scalars)]).gradient  # the one route: single-device is one client
    assert e1.scalars.dtype == np.float32  # the wire type
    e2 = est.estimate(theta, plan, step=1)
    assert np.array_equal(e1.scalars, e2.scalars)
    # rebuilt elsewhere from (seed, step, client) and the scalars alone
    g = rebuild(Perturbations(adapter.copy(), seed=5), 1, 0, e1.scalars)
    assert np.array_equal(g, g1)
    want = (e1.scalars[0] * p.masked(1, 0, 0) + e1.scalars[1] * p.masked(1, 0, 1)) / 2
    assert np.allclose(g, want, rtol=1e-5, atol=1e-7)
    # the session is left at theta: scores equal those taken before the estimate, bit for bit
    assert session.score(plan).losses.tobytes() == before.tobytes()
    assert not np.array_equal(e1.losses_plus, np.full(2, before.mean()))  # and the perturbations did move it
    base = Estimator(session, p, eps=0.1, directions=1)
    e0 = base.estimate(theta, plan, step=1)
    assert e0.scalars[0] == e1.scalars[0]


def test_forward_scheme_and_std_normalisation(tiny):
    session, data, adapter = tiny
    p = Perturbations(adapter, seed=5)
    plan = session.plan(data)
    theta = adapter.params.copy()
    central = Estimator(session, p, eps=0.1, directions=2).estimate(theta, plan, 2)
    fwd = Estimator(session, p, eps=0.1, directions=2, scheme="forward").estimate(theta, plan, 2)
    assert fwd.forward_passes == 3 and central.forward_passes == 4
    assert (fwd.forward_passes, central.forward_passes) == (passes_per_step("forward", 2), passes_per_step("central", 2))
    session.set_params(theta)
    assert fwd.loss_zero == session.score(plan).loss
    assert np.allclose(fwd.scalars, (fwd.losses_plus - fwd.loss_zero) / 0.1)
    assert np.array_equal(fwd.losses_plus, central.losses_plus)
    norm = Estimator(session, p, eps=0.1, directions=2, normalize="std").estimate(theta, plan, 2)
    spread = np.std(np.concatenate([norm.losses_plus, norm.losses_minus]))
    assert np.allclose(norm.scalars, (norm.losses_plus - norm.losses_minus) / (2 * spread))


def test_centred_scheme_needs_no_base_evaluation_and_cancels_the_common_offset(tiny):
    session, data, adapter = tiny
    p = Perturbations(adapter, seed=6, part="all")
    plan = session.plan(data)
    theta = adapter.params.copy()
    k, eps = 4, 0.3
    e = Estimator(session, p, eps=eps, directions=k, scheme="centred").estimate(theta, plan, 1)
    assert e.forward_passes == k == passes_per_step("centred", k) and e.losses_minus is None and e.loss_zero is None
    ref = np.array([reference_loss(adapter, data, theta + eps * p.direction(1, 0, j)) for j in range(k)])
    assert np.allclose(e.losses_plus, ref, rtol=1e-3, atol=1e-5)
    assert np.allclose(e.scalars, k / (k - 1) * (ref - ref.mean()) / eps, rtol=0.02, atol=2e-3)
    assert abs(e.scalars.astype(np.float64).sum()) < 1e-6 * np.abs(e.scalars).max()  # a shared loss offset leaves no trace (float32 scalars)
    assert np.ptp(e.scalars) > 1e-2
    session.set_params(theta)
    fwd = Estimator(session, p, eps=eps, directions=k, scheme="forward").estimate(theta, plan, 1)
    assert np.allclose(e.scalars, k / (k - 1) * (fwd.scalars - fwd.scalars.mean()))


def test_aggregate_balances_clients_clips_and_skips_broken_reports(tiny):
    _, _, adapter = tiny
    p = Perturbations(adapter, seed=2)
    reports = [(0, np.array([0.5, -1.0], np.float32)), (3, np.array([2.0], np.float32))]
    mean0 = (0.5 * p.masked(7, 0, 0) - 1.0 * p.masked(7, 0, 1)) / 2
    agg = aggregate(p, 7, reports)  # each client's mean first, then the clients alike
    assert np.allclose(agg.gradient, (mean0 + 2.0 * p.masked(7, 3, 0)) / 2, rtol=1e-5, atol=1e-7)
    assert (agg.clients, agg.directions, agg.clipped) == (2, 3, 0)
    assert agg.effective == pytest.approx(1 / (0.25 / 2 + 0.25 / 1))  # fewer than 3: the lone direction weighs 1/2
    # weighting by directions is the rule before client balancing: every direction alike
    by_direction = aggregate(p, 7, reports, weights=client_weights("directions", reports))
    assert np.allclose(by_direction.gradient, (2 * mean0 + 2.0 * p.masked(7, 3, 0)) / 3, rtol=1e-5, atol=1e-7)
    assert by_direction.effective == pytest.approx(3)
    # by training examples: client 0 holds 3x client 3's; a claim above 4x the round's median is capped
    by_examples = aggregate(p, 7, reports, weights=client_weights("examples", reports, {0: 30, 3: 10}))
    assert np.allclose(by_examples.gradient, 0.75 * mean0 + 0.25 * 2.0 * p.masked(7, 3, 0), rtol=1e-5, atol=1e-6)
    three = reports + [(5, np.array([1.0], np.float32))]
    assert client_weights("examples", three, {0: 10, 3: 10, 5: 10**9}) == [10, 10, 40]
    assert client_weights("equal", three) is None
    # one client's report is that client's mean, bitwise what rebuild gives, whatever its weight
    for w in (None, [1.0], [7.0]):
        assert np.array_equal(aggregate(p, 7, reports[:1], weights=w).gradient, rebuild(p, 7, 0, reports[0][1]))
    # non-finite or empty reports are left out; none usable gives no gradient
    broken = reports + [(5, np.array([np.nan], np.float32)), (6, np.zeros(0, np.float32))]
    assert np.array_equal(aggregate(p, 7, broken).gradient, agg.gradient)
    assert aggregate(p, 7, broken[2:]).gradient is None
    # clipping: an outlier client is limited to clip x the median client's median |s|
    hostile = reports + [(4, np.array([1e6], np.float32))]
    clipped = aggregate(p, 7, hostile, clip=2.0)
    assert clipped.threshold == 4.0 and clipped.clipped == 1  # client medians 0.75, 2, 1e6: median 2, x clip 2
    want = (mean0 + 2.0 * p.masked(7, 3, 0) + 4.0 * p.masked(7, 4, 0)) / 3
    assert np.allclose(clipped.gradient, want, rtol=1e-5, atol=1e-7)


def test_step_size_rule_scales_with_the_directions_averaged():
    from ggfwd.update import UpdateRule

    assert UpdateRule(lr_scaling="linear").lr_scale(8) == 8
    assert UpdateRule(lr_scaling="sqrt").lr_scale(16) == 4
    assert UpdateRule(lr_scaling="none").lr_scale(16) == 1
    assert UpdateRule(optimizer="sgd", lr_scaling="auto").lr_scale(4) == 2  # sqrt, as measured (update.py)
    assert UpdateRule(optimizer="adam", lr_scaling="auto").lr_scale(4) == 2
    assert UpdateRule(lr_scaling="linear", lr_scale_max=6).lr_scale(16) == 6
    assert all(UpdateRule(lr_scaling=m).lr_scale(1) == 1 for m in ("auto", "linear", "sqrt", "none"))


def test_non_finite_losses_are_flagged(tiny):
    session, data, adapter = tiny
    est = Estimator(session, Perturbations(adapter, seed=0), eps=1e38)  # theta + eps z overflows float32: inf weights, NaN logits
    e = est.estimate(adapter.params.copy(), session.plan(data), 0)
    assert not e.finite


@pytest.mark.parametrize("kwargs", [dict(eps=0), dict(eps=-1), dict(eps=float("nan")), dict(directions=0),
                                    dict(scheme="x"), dict(normalize="x"), dict(scheme="centred")])
def test_bad_estimator_settings(tiny, kwargs):
    session, _, adapter = tiny
    args = dict(eps=0.1, directions=1) | kwargs
    with pytest.raises(UserError):
        Estimator(session, Perturbations(adapter, 0), **args)


# ---------------------------------------------------------------- optimizer

def test_schedules():
    assert lr_at(0, 1.0, "constant", warmup=4) == 0.25 and lr_at(3, 1.0, "constant", warmup=4) == 1.0
    assert lr_at(10, 1.0, "cosine", 0, 10) == pytest.approx(0.0)
    assert lr_at(5, 1.0, "cosine", 0, 10) == pytest.approx(0.5)
    assert lr_at(5, 1.0, "linear", 0, 10) == pytest.approx(0.5)
    assert lr_at(20, 1.0, "linear", 0, 10, final_fraction=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizers_minimise_a_noisy_quadratic_and_state_round_trips(kind, tmp_path):
    rng = np.random.default_rng(0)
    target = rng.normal(size=50).astype(np.float32)
    opt = Optimizer(50, kind, lr=0.05 if kind == "adam" else 0.02, schedule="cosine", total_steps=400)
    x = np.zeros(50, np.float32)
    for t in range(400):
        g = (x - target) + rng.normal(scale=0.3, size=50).astype(np.float32)
        x = opt.step(x, g, t)
        opt.commit()
    assert np.linalg.norm(x - target) < 0.1 * np.linalg.norm(target)
    np.savez(tmp_path / "s.npz", **opt.state_dict())
    again = Optimizer(50, kind, lr=0.05 if kind == "adam" else 0.02, schedule="cosine", total_steps=400)
    with np.load(tmp_path / "s.npz") as z:
        again.load_state_dict({k: z[k] for k in z.files})
    g = rng.normal(size=50).astype(np.float32)
    assert np.array_equal(opt.step(x, g, 7), again.step(x, g, 7))


def test_rejected_step_leaves_optimizer_state_alone():
    opt = Optimizer(3, "adam", lr=0.1)
    x = np.ones(3, np.float32)
    opt.step(x, np.array([np.nan, 1, 1], np.float32), 0)  # not committed
    assert opt.t == 0 and np.all(opt.m == 0) and np.all(opt.v == 0)


@pytest.mark.parametrize("kwargs", [dict(kind="lion"), dict(lr=0), dict(schedule="step"), dict(warmup=-1),
                                    dict(momentum=1.0), dict(weight_decay=-1)])
def test_bad_optimizer_settings(kwargs):
    with pytest.raises(UserError):
        Optimizer(3, **kwargs)
