"""The tiny model behind the benchmarks' `--smoke` modes.

A random Llama (hidden 256, 2 layers, vocabulary 1024; 1.7M parameters) written as a Hugging Face checkpoint
(BF16 safetensors, a byte-level BPE tokenizer trained on SST-2 dev text so that the `sst2` prompt's words and
verbalizers are single tokens) and converted to GGUF by `ggfwd.convert`, so llama.cpp (the GGUF) and PyTorch
(the checkpoint, or transformers' GGUF loader) read the same weights. Built once per folder:
`$GGFWD_SMOKE_DIR`, default `<tmp>/ggfwd-smoke`.

    python scripts/smoke_model.py          # build it (F32) and print the GGUF's path
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, vocab=1024)
STD = 0.05  # of the random weights: large enough that the verbalizer logits differ between examples


def smoke_dir() -> Path:
    return Path(os.environ.get("GGFWD_SMOKE_DIR") or Path(tempfile.gettempdir()) / "ggfwd-smoke")


def _corpus() -> list[str]:
    from ggfwd.demo import sst2_file
    from ggfwd.tasks import BUILTIN_TASKS, load_examples

    task = BUILTIN_TASKS["sst2"]
    texts = [e.text for e in load_examples(sst2_file("dev"), task)]
    prompts = [t.template.replace("{text}", "") + v for t in BUILTIN_TASKS.values() if t.kind == "classification"
               for v in t.verbalizers]
    return texts + prompts * 100


def tiny_llama(out_type: str = "f32", folder: Path | None = None) -> tuple[Path, Path]:
    """(Hugging Face checkpoint folder, GGUF) of the smoke model at `out_type`, built on first use. Concurrent
    first uses each build privately and the first rename wins."""
    folder = folder or smoke_dir()
    final = folder / f"llama-{out_type}"
    hf, gguf = final / "hf", final / "gguf" / "model.gguf"
    if gguf.is_file():
        return hf, gguf
    folder.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".llama-{out_type}-", dir=folder))
    try:
        import bench_convert

        from ggfwd.convert.build import convert_model

        s = SHAPE
        bench_convert.write_checkpoint(build / "hf", s["hidden"], s["ffn"], s["layers"], s["heads"], s["kv_heads"],
                                       s["vocab"], 1 << 20, seed=0, corpus=_corpus(), tokenizer_vocab=s["vocab"],
                                       std=STD, verbose=False)
        convert_model(build / "hf", build / "gguf", out_type, threads=1)
        try:
            os.rename(build, final)
        except OSError:  # another process finished first
            if not gguf.is_file():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return hf, gguf


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="f32", help="GGUF type of the base model (f32, f16, q8_0, q4_k_m)")
    print(tiny_llama(ap.parse_args().type)[1])
