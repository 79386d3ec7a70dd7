"""Would perturbing some tensor kinds more help a zeroth-order step? Answered: no, G / H is about equal for all.

Where the gradient of a fresh LoRA adapter lives: the share of the exact gradient's energy |g|^2 in
each target tensor's B, against that tensor's share of the coordinates (78% of it in attn_v, 20% of the
coordinates, on Gemma-3-270M), and the ratio that bounds a step, gradient energy over curvature.

"efficiency" is the energy share over the coordinate share. It is not what bounds a zeroth-order step:
that is the gradient energy over the curvature the same coordinates carry, `G / H` below, with G = |mean
gradient|^2 and H = the trace of the Gauss-Newton curvature, mean over rows of p(1-p) |grad of the logit
margin|^2 (one backward pass per row). A tensor kind with a higher G / H would be worth perturbing more.
The exact gradients come from PyTorch autograd on the same GGUF weights (dequantized by transformers, LoRA
applied by hand, see scripts/fidelity.py); torch is used only here, never on the training path.

    python scripts/research/gradient_energy.py --rows 48
    python scripts/research/gradient_energy.py --rows 64 \
        --targets attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))  # fidelity.py
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
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
    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import load_examples, load_task, tokenize_examples

    path, task = demo_model(), load_task("sst2")
    with SessionSettings(max_tokens=128, threads=1).open(path) as s:
        data = tokenize_examples(load_examples(sst2_file("train"), task, args.rows), task, s.tokenize,
                                 s.detokenize, 128)
        adapter = LoraAdapter.create(s.base, targets=args.targets.split(","), rank=args.rank, seed=args.seed)
    import numpy as np
    import torch

    ref = fidelity.TorchHF(path, threads=1)
    tensors = {n: (torch.tensor(adapter.a[n]), torch.tensor(adapter.b[n], requires_grad=True)) for n in adapter.targets}
    classes = torch.as_tensor(data.classes, dtype=torch.long)
    mean_grad = {n: np.zeros(adapter.b[n].size) for n in adapter.targets}
    curvature = {n: 0.0 for n in adapter.targets}
    loss, rows = 0.0, len(data.examples)
    for ex in data.examples:
        for _, b in tensors.values():
            b.grad = None
        z = ref.logits(ex.tokens, tensors, adapter.scale, last_only=True)[-1, classes].to(torch.float64)
        y = int(ex.targets[0])
        margin = z[y] - torch.logsumexp(torch.cat([z[:y], z[y + 1:]]), 0)
        p = float(torch.sigmoid(margin.detach()))
        loss += float(torch.logsumexp(z.detach(), 0) - z[y].detach()) / rows
        margin.backward()
        for n, (_, b) in tensors.items():
            gm = b.grad.double().numpy().ravel()
            mean_grad[n] += -(1 - p) * gm / rows  # d loss / d B for two classes: -(1 - p) d margin / d B
            curvature[n] += p * (1 - p) * float(gm @ gm) / rows
    energy = {n: float(mean_grad[n] @ mean_grad[n]) for n in adapter.targets}
    dims = {name: adapter.b[name].size for name in adapter.targets}
    total_e, total_d = sum(energy.values()), sum(dims.values())

    t = Table(title=f"Gradient energy of B at initialisation (loss {loss:.3f}, {len(data)} rows)")
    for col in ("tensors", "energy share", "coordinate share", "efficiency", "G / H"):
        t.add_column(col, justify="right" if col != "tensors" else "left")
    kinds = sorted({name.split(".")[2] for name in adapter.targets})
    groups = [(k, [n for n in adapter.targets if n.split(".")[2] == k]) for k in kinds]
    groups += [(n, [n]) for n in adapter.targets]
    for label, names in groups:
        e, d = sum(energy[n] for n in names) / total_e, sum(dims[n] for n in names) / total_d
        ratio = sum(energy[n] for n in names) / sum(curvature[n] for n in names)
        t.add_row(label, f"{e:.3f}", f"{d:.3f}", f"{e / d:.2f}", f"{ratio:.3f}")
    Console().print(t)


if __name__ == "__main__":
    main()
