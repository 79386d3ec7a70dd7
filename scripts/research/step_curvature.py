"""Why does a larger step not help once training plateaus? Answered: slope^2 / curvature along z collapses.

What limits a zeroth-order step: directional slope and curvature of the loss per adapter tensor group.

For a one-direction SGD step `theta -= lr * s * z` with `s = g.z`, the loss changes by about
`-lr s^2 + lr^2 s^2 (z'Hz) / 2`. Both terms are measured here through llama.cpp along random directions of
the training distribution (per-tensor scaling, B only), one tensor group at a time:

    s    = (L(+eps z) - L(-eps z)) / (2 eps)          slope
    z'Hz = (L(+eps z) + L(-eps z) - 2 L(0)) / eps^2    curvature along z

so the step size that helps most is `lr* = E[s^2] / E[s^2 z'Hz]` (about 1 / E[z'Hz]) and the loss a step can
remove at best is `E[s^2] / (2 E[z'Hz])`. Compare groups at a fresh adapter and at a trained one (--adapter).
Only numpy and ggfwd: llama.cpp does the scoring.

    python scripts/research/step_curvature.py --adapter runs/x/adapter.gguf --groups attn_q,attn_v
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, action="append", default=[],
                    help="trained adapter(s) to measure at, besides a fresh one (repeatable)")
    ap.add_argument("--groups", default="attn_q,attn_v", help="comma-separated tensor patterns, one group each")
    ap.add_argument("--rows", type=int, default=32, help="SST-2 train rows in the batch")
    ap.add_argument("--offset", type=int, default=1000, help="first train row of the batch")
    ap.add_argument("--directions", type=int, default=6)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ggfwd.adapter import LoraAdapter
    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.perturbation import Perturbations
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import load_examples, load_task, tokenize_examples

    task = load_task("sst2")
    table = Table(title=f"Slope and curvature along random directions (eps {args.eps}, {args.rows} rows, "
                        f"{args.directions} directions per group)")
    for col in ("adapter", "group", "values", "L(0)", "mean s^2", "mean z'Hz (sd)", "lr*", "best loss drop / step"):
        table.add_column(col, justify="left" if col in ("adapter", "group") else "right")
    # all rows in one batch of sequences
    with SessionSettings(batch_size=args.rows, max_tokens=128, threads=args.threads).open(demo_model()) as s:
        rows = load_examples(sst2_file("train"), task, args.offset + args.rows)[args.offset:]
        data = tokenize_examples(rows, task, s.tokenize, s.detokenize, 128)
        fresh = LoraAdapter.create(s.base, rank=8, alpha=16.0, seed=0)
        points = [("fresh", fresh)] + [(f"{p.parent.name}/{p.name}", LoraAdapter.load(p)) for p in args.adapter]
        s.set_adapter(fresh)
        plan = s.plan(data)
        for label, adapter in points:
            theta = adapter.params.astype(np.float32)
            s.set_params(theta)
            base = s.score(plan).loss
            for group in args.groups.split(","):
                p = Perturbations(adapter, 7, "gaussian", "b", [group], "tensor")
                slope, curv = [], []
                for k in range(args.directions):
                    z = p.direction(0, 0, k)
                    s.set_params(theta + np.float32(args.eps) * z)
                    lp = s.score(plan).loss
                    s.set_params(theta - np.float32(args.eps) * z)
                    lm = s.score(plan).loss
                    slope.append((lp - lm) / (2 * args.eps))
                    curv.append((lp + lm - 2 * base) / args.eps ** 2)
                slope, curv = np.array(slope), np.array(curv)
                s2 = float(np.mean(slope ** 2))
                weighted = float(np.mean(slope ** 2 * curv))
                lr = s2 / weighted if weighted > 0 else float("inf")
                drop = s2 * s2 / (2 * weighted) if weighted > 0 else float("inf")
                table.add_row(label, group, str(p.n), f"{base:.4f}", f"{s2:.4f}",
                              f"{np.mean(curv):.2f} ({np.std(curv):.2f})", f"{lr:.3f}", f"{drop:.5f}")
    Console().print(table)


if __name__ == "__main__":
    main()
