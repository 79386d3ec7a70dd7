"""Shared fixtures: tiny random llama GGUFs written in the test session, and the real Gemma-3-270M."""

from __future__ import annotations

from pathlib import Path

import pytest

import tinymodel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_weights():
    return tinymodel.make_weights(seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_weights) -> Path:
    return tinymodel.write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", tiny_weights)


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory, tiny_weights) -> Path:
    return tinymodel.write_gguf(tmp_path_factory.mktemp("tied") / "tied.gguf", tiny_weights, tied=True)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    """Same architecture, different hidden size: adapters for one do not fit the other."""
    w = tinymodel.make_weights(seed=1, d=32, ff=64)
    return tinymodel.write_gguf(tmp_path_factory.mktemp("other") / "other.gguf", w)


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    from ggfwd.demo import demo_model

    return demo_model()


@pytest.fixture(scope="session")
def sst2() -> dict[str, Path]:
    """The SST-2 files shipped in the package (one source of truth for the tests, as for users)."""
    import os

    from ggfwd.demo import sst2_file

    assert "GGFWD_SST2" not in os.environ, "unset GGFWD_SST2: the tests read the packaged SST-2 copy"
    return {split: sst2_file(split) for split in ("train", "dev")}
