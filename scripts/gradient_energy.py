"""Where the gradient of a fresh LoRA adapter lives: the share of the exact gradient's energy |g|^2 in
each target tensor's B, against that tensor's share of the coordinates.

A zeroth-order step along a random direction of d coordinates makes progress proportional to |g|^2 / d, so
a tensor whose energy share exceeds its coordinate share is worth perturbing more often (its "efficiency"
below is that ratio). The exact gradient comes from PyTorch autograd on the same GGUF weights (dequantized by
transformers, LoRA applied by hand, see fidelity.py); torch is used only here, never on the training path.

    python scripts/gradient_energy.py --rows 48
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=48, help="SST-2 train rows in the batch")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="attn_q,attn_v")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import fidelity
    from rich.console import Console
    from rich.table import Table

    from ggfwd.adapter import LoraAdapter
    from ggfwd.demo import demo_model, sst2_dir
    from ggfwd.session import Session
    from ggfwd.tasks import load_examples, load_task, tokenize_examples

    path, task = demo_model(), load_task("sst2")
    with Session(path, n_threads=1, max_seqs=16, seq_tokens=128) as s:
        data = tokenize_examples(load_examples(sst2_dir() / "train.tsv", task, args.rows), task, s.tokenize,
                                 s.detokenize, 128)
        adapter = LoraAdapter.create(s.base, targets=args.targets.split(","), rank=args.rank, seed=args.seed)
    loss, g = fidelity.torch_loss_and_grad(fidelity.TorchHF(path), data, adapter)
    slices = adapter.slices()
    energy = {name: float(g[slices[name][1]] @ g[slices[name][1]]) for name in adapter.targets}
    dims = {name: adapter.b[name].size for name in adapter.targets}
    total_e, total_d = sum(energy.values()), sum(dims.values())

    t = Table(title=f"Gradient energy of B at initialisation (loss {loss:.3f}, {len(data)} rows)")
    for col in ("tensors", "energy share", "coordinate share", "efficiency"):
        t.add_column(col, justify="right" if col != "tensors" else "left")
    kinds = sorted({name.split(".")[2] for name in adapter.targets})
    groups = [(k, [n for n in adapter.targets if n.split(".")[2] == k]) for k in kinds]
    groups += [(n, [n]) for n in adapter.targets]
    for label, names in groups:
        e, d = sum(energy[n] for n in names) / total_e, sum(dims[n] for n in names) / total_d
        t.add_row(label, f"{e:.3f}", f"{d:.3f}", f"{e / d:.2f}")
    Console().print(t)


if __name__ == "__main__":
    main()
