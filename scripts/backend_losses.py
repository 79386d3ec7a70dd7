"""Print the losses one llama-cpp-python build gives on fixed inputs, as JSON, to compare builds.

    python scripts/backend_losses.py > cpu.json          # in the CPU build's environment
    python scripts/backend_losses.py --compare cpu.json  # in another build's environment
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def losses() -> dict:
    import llama_cpp
    import tinymodel

    from ggfwd.adapter import LoraAdapter
    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import load_examples, load_task, tokenize_examples

    out = {"system": llama_cpp.llama_print_system_info().decode()}
    task = load_task("sst2")
    examples = load_examples(sst2_file("dev"), task, limit=16)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny-f32": tinymodel.write_gguf(Path(tmp) / "t.gguf", tinymodel.make_weights(0))}
        try:
            models["gemma3-270m-q4_k_m"] = demo_model()
        except Exception:
            pass
        for name, path in models.items():
            with SessionSettings(batch_size=16, max_tokens=128).open(path) as s:
                data = tokenize_examples(examples, task, s.tokenize, s.detokenize, 128)
                plan = s.plan(data)
                ad = LoraAdapter.create(s.base, rank=8, seed=0)
                rng = np.random.default_rng(1)
                for t in ad.targets:
                    ad.b[t][...] = rng.normal(0, 0.02, ad.b[t].shape)
                s.set_adapter(ad)
                out[name] = s.score(plan).losses.tolist()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--compare", type=Path, help="JSON printed by another build; print the differences")
    args = p.parse_args()
    mine = losses()
    if not args.compare:
        print(json.dumps(mine))
        return
    other = json.loads(args.compare.read_text())
    print("this build:", mine["system"].strip())
    print("reference: ", other["system"].strip())
    for key in mine:
        if key != "system" and key in other:
            a, b = np.asarray(mine[key]), np.asarray(other[key])
            print(f"{key}: mean loss {a.mean():.6f} vs {b.mean():.6f}; max |diff| {np.abs(a - b).max():.2e}; "
                  f"bitwise equal: {a.tobytes() == b.tobytes()}")


if __name__ == "__main__":
    main()
