"""Directions: reproducible from seeds, zero outside their mask, scaled per tensor as documented."""

import numpy as np
import pytest

from ggfwd.adapter import LoraAdapter
from ggfwd.errors import UserError
from ggfwd.perturbation import Perturbations


def adapter(rank=4, alpha=8.0, seed=0) -> LoraAdapter:
    shapes = {f"blk.{i}.attn_{t}.weight": ((96 if t == "q" else 32), 48 if i < 2 else 80)
              for i in range(3) for t in "qv"}
    names = list(shapes)
    ad = LoraAdapter("llama", alpha, rank, names, shapes,
                     np.zeros(LoraAdapter.n_params_for(shapes, names, rank), np.float32))
    rng = np.random.default_rng(seed)
    for n in names:  # as LoraAdapter.create initialises A
        ad.a[n][...] = rng.uniform(-1, 1, ad.a[n].shape) / np.sqrt(ad.a[n].shape[1])
    return ad


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("part", ["a", "b", "all"])
def test_same_seeds_same_direction_and_zero_outside_mask(distribution, part):
    ad = adapter()
    p1 = Perturbations(ad, 7, distribution, part)
    p2 = Perturbations(ad.copy(), 7, distribution, part)
    d = p1.direction(5, 2, 1)
    assert d.dtype == np.float32 and d.shape == ad.params.shape
    assert np.array_equal(d, p2.direction(5, 2, 1))
    assert np.array_equal(d, p1.direction(5, 2, 1))  # no hidden state between calls
    assert np.array_equal(p1.mask, ad.mask(part))
    assert np.all(d[~p1.mask] == 0) and np.count_nonzero(d[p1.mask]) > 0.99 * p1.n
    others = [p1.direction(6, 2, 1), p1.direction(5, 3, 1), p1.direction(5, 2, 2),
              Perturbations(ad, 8, distribution, part).direction(5, 2, 1)]
    for o in others:
        assert not np.array_equal(d, o)
    assert np.array_equal(p1.scatter(p1.masked(5, 2, 1)), d)


def test_rademacher_is_plus_minus_std():
    p = Perturbations(adapter(), 1, "rademacher", "b", scaling="unit")
    z = p.masked(0)
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(z.mean()) < 0.05


def test_tensor_scaling_gives_weight_changes_of_rms_one_over_sqrt_in():
    """With scaling='tensor', a unit B direction changes every effective weight scale * dB A by an RMS
    of about 1/sqrt(in), whatever the tensor's input width, rank or alpha."""
    for rank, alpha in [(4, 8.0), (8, 32.0)]:
        ad = adapter(rank, alpha)
        p = Perturbations(ad, 3, "gaussian", "b")
        for name in ad.targets:
            ms = [np.mean((ad.scale * ad.with_params(p.direction(0, 0, k)).b[name] @ ad.a[name]) ** 2)
                  for k in range(8)]
            in_dim = ad.shapes[name][1]
            assert 0.85 < np.sqrt(np.mean(ms)) * np.sqrt(in_dim) < 1.15, (name, rank, alpha)
        pa = Perturbations(ad, 3, "gaussian", "a")
        da = ad.with_params(pa.direction(0))
        for name in ad.targets:  # A perturbations match A's own scale
            ratio = da.a[name].std() / ad.a[name].std()
            assert 0.85 < ratio < 1.15


def test_unit_scaling_is_standard_normal():
    p = Perturbations(adapter(), 3, "gaussian", "all", scaling="unit")
    z = p.masked(0)
    assert abs(z.std() - 1) < 0.05


def test_layer_selection():
    ad = adapter()
    p = Perturbations(ad, 0, layers=[0, "blk.2.attn_v*"])
    assert p.targets == ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.2.attn_v.weight"]
    d = ad.with_params(p.direction(1))
    assert np.all(d.b["blk.1.attn_q.weight"] == 0) and np.all(d.b["blk.2.attn_q.weight"] == 0)
    assert np.any(d.b["blk.2.attn_v.weight"] != 0)
    assert Perturbations(ad, 0, layers="attn_v").targets == [t for t in ad.targets if "attn_v" in t]


@pytest.mark.parametrize("kwargs", [dict(distribution="uniform"), dict(part="c"), dict(layers=[9]),
                                    dict(scaling="x"), dict(seed=-1)])
def test_bad_arguments(kwargs):
    args = dict(seed=0) | kwargs
    with pytest.raises(UserError):
        Perturbations(adapter(), **args)
