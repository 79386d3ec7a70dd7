#!/usr/bin/env python
"""How far can the adapter go at all? Backpropagation on ggfwd's own LoRA parameterization, as a reference.

Trains the same fresh adapter that `ggfwd train` starts from (same targets, rank, alpha, seeded A, B = 0) with
exact gradients (PyTorch autograd, Adam) on the Gemma-3-270M weights dequantized from the Q4_K_M GGUF, on the
same SST-2 batches (`ggfwd.trainer.batch_indices`), and reports dev accuracy in fp32 PyTorch along the way.
The final adapter is written as a llama.cpp adapter GGUF and scored through llama.cpp on the Q4_K_M base,
like any `ggfwd train` result. With `--part b` (ggfwd's default: A frozen) this is the accuracy a perfect
gradient estimator could reach in the same adapter; `--optimizer sgd` takes the step ggfwd's SGD takes in
expectation (lr in the same per-tensor units), i.e. ggfwd's mean path with the estimator's noise removed;
`--part all` and wider `--targets` show what a larger adapter would add. Torch is used only here, never on
the training path.

    python scripts/ceiling.py --steps 250 --part b --targets attn_q,attn_v --min-words 10
    python scripts/ceiling.py --steps 150 --optimizer sgd --lr 0.02   # ggfwd's default step, without its noise
    python scripts/ceiling.py --steps 250 --part all --targets attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down
    python scripts/ceiling.py --smoke      # seconds: tiny random Llama (F32), 2 Adam steps, 8 dev rows
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))


def torch_eval(model, classes, data) -> tuple[float, float]:
    import fidelity
    import torch

    losses, correct = [], []
    with torch.no_grad():
        for ids, mask, last, y in fidelity.padded_batches(data.examples, 16):
            z = fidelity.class_logits(model, classes, ids, mask, last).double()
            losses.append(torch.nn.functional.cross_entropy(z, y, reduction="none"))
            correct.append(z.argmax(1) == y)
    return float(torch.cat(correct).double().mean()), float(torch.cat(losses).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="adam (lr in weight units), or plain SGD with lr in ggfwd's per-tensor units: the step "
                         "`ggfwd train --optimizer sgd --lr LR` takes in expectation, without the estimator's noise")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--part", choices=["b", "all"], default="b", help="train B only (A frozen, as ggfwd) or A and B")
    ap.add_argument("--targets", default="attn_q,attn_v")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=4000)
    ap.add_argument("--min-words", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=50, help="steps between fp32 evaluations on the dev rows")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N dev rows (default: all 872)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("ceiling-adapter.gguf"), help="adapter GGUF to write")
    ap.add_argument("--model", type=Path, default=None, help="base GGUF (default: the demo Gemma-3-270M)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: scripts/smoke_model.py's random Llama (F32) unless --model, 2 steps of batch 4, "
                         "lr 0.01, evaluations on 8 dev rows after each step")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.lr, args.eval_every = 2, 4, 1e-2, 1
        args.train_limit, args.min_words, args.eval_limit = 64, 0, 8

    import fidelity
    import torch

    from ggfwd.adapter import LoraAdapter
    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import load_examples, load_task, tokenize_examples
    from ggfwd.trainer import batch_indices

    torch.manual_seed(args.seed)
    if args.smoke and args.model is None:
        from smoke_model import tiny_llama

        args.model = tiny_llama("f32")[1]
    path, task = args.model or demo_model(), load_task("sst2")
    settings = SessionSettings(max_tokens=128, threads=args.threads)  # ggfwd's scoring settings (batch 16)
    with settings.open(path) as s:
        tok = lambda ex: tokenize_examples(ex, task, s.tokenize, s.detokenize, settings.max_tokens)
        train = tok(load_examples(sst2_file("train"), task, args.train_limit, args.min_words))
        dev = tok(load_examples(sst2_file("dev"), task, args.eval_limit))
        adapter = LoraAdapter.create(s.base, targets=args.targets.split(","), rank=args.rank, seed=args.seed)
    ref = fidelity.TorchHF(path, args.threads)  # the dequantized weights, LoRA forward hooks on every projection
    torch.set_num_threads(args.threads)
    model, classes = ref.model, torch.as_tensor(train.classes, dtype=torch.long)
    tensors = {n: (torch.tensor(adapter.a[n], requires_grad=args.part == "all"),
                   torch.tensor(adapter.b[n], requires_grad=True)) for n in adapter.targets}
    ref.lora, ref.scale = tensors, adapter.scale
    trained = [t for pair in tensors.values() for t in pair if t.requires_grad]
    if args.optimizer == "adam":
        opt = torch.optim.Adam(trained, lr=args.lr)
    else:
        # ggfwd's SGD step is lr * s * (std * u) with s = g . (std * u), so in expectation lr * std^2 * g.
        from ggfwd.perturbation import Perturbations
        stds = Perturbations(adapter, seed=0, part=args.part).tensor_stds
        groups = []
        for name, (a, b) in tensors.items():
            a_std, b_std = stds(adapter.shapes[name][1], adapter.rank, adapter.scale)
            groups += [{"params": [t], "lr": args.lr * std ** 2} for t, std in ((a, a_std), (b, b_std))
                       if t.requires_grad]
        opt = torch.optim.SGD(groups, lr=args.lr)
    n_values = sum(t.numel() for t in trained)
    print(f"ceiling: {len(adapter.targets)} tensors ({args.targets}), rank {args.rank}, part {args.part}: "
          f"{n_values} trained values; {len(train)} train rows, {len(dev)} dev rows, {args.optimizer} lr {args.lr}",
          flush=True)

    start = time.perf_counter()

    def evaluate(step):
        acc, loss = torch_eval(model, classes, dev)
        print(json.dumps({"step": step, "examples": step * args.batch_size, "torch_accuracy": acc,
                          "torch_loss": loss, "seconds": round(time.perf_counter() - start, 1)}), flush=True)

    evaluate(0)
    for step in range(args.steps):
        batch = train.subset(batch_indices(args.seed, step, len(train), args.batch_size)).examples
        (ids, mask, last, y), = fidelity.padded_batches(batch, len(batch))
        loss = torch.nn.functional.cross_entropy(fidelity.class_logits(model, classes, ids, mask, last).double(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)

    for name, (a, b) in tensors.items():
        adapter.a[name][...] = a.detach().numpy()
        adapter.b[name][...] = b.detach().numpy()
    adapter.save(args.out)
    with settings.open(path) as s:
        s.set_adapter(adapter)
        scores = s.score(s.plan(dev))
    result = {"llama_cpp_q4_k_m_accuracy": scores.accuracy, "llama_cpp_q4_k_m_loss": scores.loss,
              "adapter": str(args.out), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
