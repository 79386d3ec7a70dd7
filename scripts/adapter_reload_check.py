"""Reload a LoRA adapter many times, scoring a batch after each load, with the adapter loaded by
llama.cpp's own file-based `llama_adapter_lora_init` rather than ggfwd's in-memory loader. A backend that
corrupts memory when the adapter changes crashes here; a healthy one prints "ok".

    python scripts/adapter_reload_check.py --reloads 40
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TEXTS = ["the movie was great", "a dull plot , bad actors", "i love this film", "not fun",
         "the actors hate the plot , very dull", "great great fun", "terrible", "was it good ? no"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reloads", type=int, default=40)
    args = ap.parse_args()

    import llama_cpp
    import tinymodel

    from ggfwd.adapter import LoraAdapter
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import BUILTIN_TASKS, Example, tokenize_examples

    task = BUILTIN_TASKS["sst2"]
    with tempfile.TemporaryDirectory() as tmp:
        model = tinymodel.write_gguf(Path(tmp) / "tiny.gguf", tinymodel.make_weights(seed=0))
        with SessionSettings(batch_size=4, max_tokens=128, threads=2).open(model) as s:
            examples = [Example(text=t, label=i % 2) for i, t in enumerate(TEXTS)]
            plan = s.plan(tokenize_examples(examples, task, s.tokenize, s.detokenize, 64))
            adapter = LoraAdapter.create(s.base, rank=4, seed=1)
            rng = np.random.default_rng(0)
            scales = (ctypes.c_float * 1)(1.0)
            for i in range(args.reloads):
                for name in adapter.targets:
                    adapter.b[name][...] = rng.normal(0, 0.05, adapter.b[name].shape)
                path = Path(tmp) / f"adapter{i % 2}.gguf"
                adapter.save(path)
                lora = llama_cpp.llama_adapter_lora_init(s.model, str(path).encode())
                if not lora:
                    sys.exit(f"llama.cpp refused the adapter at reload {i + 1}")
                llama_cpp.llama_set_adapters_lora(s.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora), 1,
                                                  scales)
                s.score(plan)
                # Adapters stay allocated until the model is freed (llama.cpp frees them with it).
        print(f"ok: {args.reloads} adapter reloads, each followed by scoring {len(TEXTS)} examples")


if __name__ == "__main__":
    main()
