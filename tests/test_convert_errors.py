"""Bad input to `ggfwd convert` / `ggfwd export`: one line on stderr, exit code 2, and nothing left behind
(no OUTDIR, no temporary directory beside it)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import make_model  # noqa: E402

from ggfwd import cli  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    make_model("llama-spm", root / "hf")
    return root / "hf"


@pytest.fixture
def work(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    return src, tmp_path / "parent"


def run_cli(capsys, monkeypatch, *args):
    """Run the real CLI entry point in-process; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ggfwd", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def run_ok(capsys, monkeypatch, *args):
    code, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err


def assert_refused(capsys, monkeypatch, out, *args, says):
    code, err = run_cli(capsys, monkeypatch, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert says in lines[0], lines[0]
    assert not out.exists(), "no partial output directory"
    if out.parent.exists():
        assert list(out.parent.iterdir()) == [], "no temporary directory left behind"


def test_unknown_architecture_lists_supported(work, capsys, monkeypatch):
    src, parent = work
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = parent / "out"
    assert_refused(capsys, monkeypatch, out, "convert", src, "-o", out, says="unsupported architecture 'Falcon")
    _, err = run_cli(capsys, monkeypatch, "convert", src, "-o", out)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Gemma3ForCausalLM"):
        assert name in err


def test_missing_tokenizer(work, capsys, monkeypatch):
    src, parent = work
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.json").unlink()
    out = parent / "out"
    assert_refused(capsys, monkeypatch, out, "convert", src, "-o", out, says="no tokenizer")


def test_missing_shard(work, capsys, monkeypatch):
    src, parent = work
    shard = src / "model.safetensors"
    shard.rename(src / "model-00001-of-00002.safetensors")
    names = ["model.embed_tokens.weight"]
    index = {"metadata": {}, "weight_map": {names[0]: "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = parent / "out"
    assert_refused(capsys, monkeypatch, out, "convert", src, "-o", out, says="model-00002-of-00002.safetensors")


def test_truncated_shard(work, capsys, monkeypatch):
    src, parent = work
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    out = parent / "out"
    assert_refused(capsys, monkeypatch, out, "convert", src, "-o", out, says="truncated")


def test_unknown_type(work, capsys, monkeypatch):
    src, parent = work
    out = parent / "out"
    assert_refused(capsys, monkeypatch, out, "convert", src, "-o", out, "--type", "q3_k_xs", says="q4_k_m")


def test_targets_matching_nothing(work, capsys, monkeypatch):
    src, parent = work
    out = parent / "out"
    assert_refused(capsys, monkeypatch, out, "convert", src, "-o", out, "--targets", "nothing_here",
                   says="match no weight")


def test_failure_while_writing_leaves_nothing(work, capsys, monkeypatch):
    """A problem found only after the temporary directory exists (a token id beyond the embeddings)."""
    src, parent = work
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 100000, "content": "<|late|>", "special": True, "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False})
    (src / "tokenizer.json").write_text(json.dumps(tok))
    out = parent / "out"
    assert_refused(capsys, monkeypatch, out, "convert", src, "-o", out, says="beyond the model")


def test_existing_output_needs_force(work, capsys, monkeypatch):
    src, parent = work
    out = parent / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, monkeypatch, "convert", src, "-o", out, "--type", "f32", "-q")
    assert code == 2 and err.strip().startswith("error: ") and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    run_ok(capsys, monkeypatch, "convert", src, "-o", out, "--type", "f32", "-q", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "ggfwd.json", "model.gguf"]
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_export_needs_head_counts_for_llama_qk(work, capsys, monkeypatch, tmp_path):
    src, parent = work
    out = parent / "out"
    run_ok(capsys, monkeypatch, "convert", src, "-o", out, "--type", "f32", "-q", "--targets", "q,k")
    from ggfwd.adapter import LoraAdapter

    lonely = tmp_path / "alone" / "adapter.gguf"
    LoraAdapter.load(out / "adapter.gguf").save(lonely)  # no ggfwd.* metadata, no ggfwd.json nearby
    dest = tmp_path / "exports" / "peft"
    assert_refused(capsys, monkeypatch, dest, "export", lonely, "--to", "peft", "-o", dest, says="--base")
    code, err = run_cli(capsys, monkeypatch, "export", lonely, "--to", "onnx", "-o", dest)
    assert code == 2 and "peft or gguf" in err
    run_ok(capsys, monkeypatch, "export", lonely, "--to", "peft", "-o", dest, "--base", out / "model.gguf")
    assert (dest / "adapter_model.safetensors").is_file()
