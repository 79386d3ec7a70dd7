import numpy as np
import pytest

from ggfwd.adapter import AdapterImage, LoraAdapter
from ggfwd.base import read_base
from ggfwd.errors import UserError


def test_create_targets_q_and_v_with_seeded_a_and_zero_b(tiny_model):
    base = read_base(tiny_model)
    ad = LoraAdapter.create(base, rank=4, alpha=8, seed=3)
    assert ad.targets == [f"blk.{i}.attn_{t}.weight" for i in range(2) for t in ("q", "v")]
    for name in ad.targets:
        out_dim, in_dim = base.weight_shapes[name]
        assert ad.a[name].shape == (4, in_dim) and ad.b[name].shape == (out_dim, 4)
        assert not ad.b[name].any() and ad.a[name].std() > 0
    again = LoraAdapter.create(base, rank=4, alpha=8, seed=3)
    other = LoraAdapter.create(base, rank=4, alpha=8, seed=4)
    assert np.array_equal(ad.params, again.params) and not np.array_equal(ad.params, other.params)


def test_views_share_the_flat_vector(tiny_model):
    ad = LoraAdapter.create(read_base(tiny_model), rank=2)
    ad.params[:] = np.arange(ad.params.size, dtype=np.float32)
    name = ad.targets[1]
    a_slice, b_slice = ad.slices()[name]
    assert ad.a[name].ravel()[0] == a_slice.start and ad.b[name].ravel()[-1] == b_slice.stop - 1
    assert ad.mask("a").sum() + ad.mask("b").sum() == ad.params.size
    assert not (ad.mask("a") & ad.mask("b")).any()


def test_save_load_roundtrip_is_exact(tiny_model, tmp_path):
    base = read_base(tiny_model)
    ad = LoraAdapter.create(base, targets=["attn_k", "ffn_up"], rank=3, alpha=5, seed=0)
    ad.params[:] = np.random.default_rng(1).normal(size=ad.params.size).astype(np.float32)
    ad.save(tmp_path / "a.gguf")
    back = LoraAdapter.load(tmp_path / "a.gguf")
    assert back.targets == ad.targets and back.rank == 3 and back.alpha == 5 and back.arch == "llama"
    assert np.array_equal(back.params, ad.params)
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # no temporary file left behind


def test_image_bytes_equal_a_saved_file(tiny_model, tmp_path):
    ad = LoraAdapter.create(read_base(tiny_model), rank=2, seed=0)
    image = AdapterImage(ad)
    ad.params[:] = np.random.default_rng(2).normal(size=ad.params.size).astype(np.float32)
    image.update(ad.params)
    ad.save(tmp_path / "x.gguf")
    assert bytes(image.buffer) == (tmp_path / "x.gguf").read_bytes()


def test_validation_refuses_what_llama_cpp_would_not_take(tiny_model, tiny_tied_model, other_tiny_model):
    base, tied, other = read_base(tiny_model), read_base(tiny_tied_model), read_base(other_tiny_model)
    ad = LoraAdapter.create(base, rank=2)
    with pytest.raises(UserError, match="shape"):
        ad.validate(other)
    emb = LoraAdapter.create(base, targets=["token_embd"], rank=2)
    with pytest.raises(UserError, match="ties its embeddings"):
        emb.validate(tied)
    with pytest.raises(UserError, match="match no weight"):
        LoraAdapter.create(base, targets=["nonexistent"])
    foreign = LoraAdapter("qwen2", ad.alpha, ad.rank, ad.targets, ad.shapes, ad.params.copy())
    with pytest.raises(UserError, match="architecture"):
        foreign.validate(base)
    ad.params[5] = np.nan
    with pytest.raises(UserError, match="NaN"):
        ad.validate(base)
