"""Shared fixtures: tiny random llama GGUFs written in the test session, and the real Gemma-3-270M."""

from __future__ import annotations

from pathlib import Path

import pytest

import tinymodel

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"


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
def sst2_dir() -> Path:
    assert (SST2 / "dev.tsv").is_file(), f"shared SST-2 data missing at {SST2}"
    return SST2
