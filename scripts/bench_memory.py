#!/usr/bin/env python
"""Peak memory of a ggfwd training step against an eval pass, and against PyTorch backprop LoRA.

Every configuration runs in its own subprocess, so numbers do not contaminate each other:
  eval        load the GGUF through ggfwd.Session, score the batch once (with the adapter applied)
  train       the same, then training steps: perturb, score at x + eps z and x - eps z, update, reload
  torch       PyTorch fp32, the same weights (GGUF dequantized for Gemma; the BF16 checkpoint the GGUF was
              converted from for the 1B model), hand-rolled LoRA (same targets and rank), forward + backward
              + SGD update on the same token ids
Each child reports its peak RSS twice: over its whole life (ru_maxrss) and during the measured work only
(sampled every 5 ms after loading). The ratios use the whole-life peak (what the machine must have).

    python scripts/bench_memory.py --model gemma                   # Gemma-3-270M Q4_K_M, 16 SST-2 rows
    python scripts/bench_memory.py --model llama1b                 # random ~1.1B Llama at q4_k_m
    python scripts/bench_memory.py --smoke                         # seconds: tiny random Llama, 4 rows, 1 step
Targets: train / eval <= 1.10. The scoring session is ggfwd train's (ggfwd.session.SessionSettings with the
batch as its batch size). For gemma (and tiny) the PyTorch side loads the fp32 reference copy that
scripts/fidelity.py caches (GGFWD_FIDELITY_DIR), made beforehand in its own process so that the conversion
does not count in the measured peak.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("GGFWD_BENCH_DIR") or Path(tempfile.gettempdir()) / "ggfwd-mem")
TARGETS = ("attn_q", "attn_v")
MAX_TOKENS = 128  # ggfwd train's default


# ------------------------------------------------------------------------------------------- children
class PeakSampler:
    """Peak RSS of this process, sampled in a thread between start() and stop()."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def start(self):
        self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def stop(self) -> int:
        self._stop.set()
        self.t.join()
        return max(self.peak, self.proc.memory_info().rss)


def child_llama(args) -> dict:
    from ggfwd.adapter import LoraAdapter
    from ggfwd.perturbation import Perturbations
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import TokenizedData, TokenizedExample, load_task

    spec = json.loads(Path(args.tokens).read_text())
    session = SessionSettings(batch_size=len(spec["tokens"]), max_tokens=MAX_TOKENS, threads=args.threads).open(
        args.gguf)
    data = TokenizedData(load_task("sst2"), [
        TokenizedExample(np.asarray(t, np.int32), np.asarray([len(t) - 1], np.int32), np.asarray([y], np.int32))
        for t, y in zip(spec["tokens"], spec["labels"])], np.asarray(spec["classes"], np.int32))
    plan = session.plan(data)
    adapter = LoraAdapter.create(session.base, targets=TARGETS, rank=8, seed=0)
    sampler = PeakSampler()
    sampler.start()
    session.set_adapter(adapter)
    loss = session.score(plan).loss
    if args.mode == "train":
        pert = Perturbations(adapter, seed=0, part="b")
        x = adapter.params.copy()
        for step in range(args.steps):
            z = pert.direction(step, 0, 0)
            session.set_params(x + np.float32(args.eps) * z)
            lp = session.score(plan).loss
            session.set_params(x - np.float32(args.eps) * z)
            lm = session.score(plan).loss
            x -= np.float32(1e-3 * (lp - lm) / (2 * args.eps)) * z
            session.set_params(x)
        loss = session.score(plan).loss if args.steps else loss
    step_peak = sampler.stop()
    return {"loss": loss, "step_peak": step_peak, "n_tokens": plan.n_tokens}


def child_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.tokens).read_text())
    if args.hf:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.hf)
        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32, attn_implementation="eager")
    else:  # the fp32 copy of the dequantized GGUF that scripts/fidelity.py caches (made by the parent)
        import fidelity

        model = fidelity.load_reference(Path(args.gguf))
        config = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    rank, scale = 8, 2.0
    lora = []
    for layer in model.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            a = torch.nn.Parameter(torch.empty(rank, mod.in_features).uniform_(-1, 1) / mod.in_features ** 0.5)
            b = torch.nn.Parameter(torch.zeros(mod.out_features, rank))
            lora += [a, b]
            mod.register_forward_hook(lambda m, i, o, a=a, b=b: o + scale * (i[0] @ a.T) @ b.T)
    opt = torch.optim.SGD(lora, lr=1e-3)
    classes = torch.as_tensor(spec["classes"])
    # Right-padded batch, the usual way to train; logits only at each sequence's last real token.
    n = max(len(t) for t in spec["tokens"])
    ids = torch.zeros(len(spec["tokens"]), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(spec["tokens"]):
        ids[i, : len(t)] = torch.as_tensor(t)
        mask[i, : len(t)] = 1
    last = torch.as_tensor([len(t) - 1 for t in spec["tokens"]])
    labels = torch.as_tensor(spec["labels"])
    sampler = PeakSampler()
    sampler.start()
    for _ in range(max(1, args.steps)):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        h = hidden[torch.arange(len(last)), last]
        logits = model.lm_head(h)[:, classes] if hasattr(model, "lm_head") else None
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_peak = sampler.stop()
    del config
    return {"loss": float(loss), "step_peak": step_peak, "n_tokens": int(mask.sum())}


def child_main(args) -> None:
    if args.mode == "reference":  # build fidelity's cached reference copy, outside the measured children
        import fidelity

        print("RESULT " + json.dumps({"path": str(fidelity.reference_dir(Path(args.gguf)))}), flush=True)
        return
    out = child_torch(args) if args.mode == "torch" else child_llama(args)
    out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------- parent
def prepare_tokens(gguf: Path, n: int, path: Path) -> None:
    """Token ids of n SST-2 dev rows through the model's own tokenizer, written once (in a subprocess)."""
    code = f"""
import importlib.util, json, os, sys
if importlib.util.find_spec('ggfwd') is None:
    sys.path.insert(0, {str(ROOT)!r})
from ggfwd.demo import sst2_file
from ggfwd.session import SessionSettings
from ggfwd.errors import UserError
from ggfwd.tasks import Task, load_examples, load_task, tokenize_examples
s = SessionSettings(batch_size=1, max_tokens={MAX_TOKENS}, threads=1).open({str(gguf)!r})
task = load_task('sst2')
rows = load_examples(sst2_file('dev'), task, {n})
try:
    d = tokenize_examples(rows, task, s.tokenize, s.detokenize, {MAX_TOKENS})
except UserError:  # a synthetic tokenizer may split the verbalizers on a shared leading space
    task = Task(task.name, task.kind, task.template, task.labels, ('terrible', 'great'))
    d = tokenize_examples(rows, task, s.tokenize, s.detokenize, {MAX_TOKENS})
with open({str(path)!r} + '.tmp', 'w') as f:
    json.dump({{'tokens': [e.tokens.tolist() for e in d.examples], 'labels': [int(e.targets[0]) for e in d.examples],
               'classes': d.classes.tolist()}}, f)
os.replace({str(path)!r} + '.tmp', {str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def run_child(extra: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *extra], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {extra} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def make_llama1b() -> tuple[Path, Path]:
    """A random ~1.1B Llama (TinyLlama shapes) as a BF16 HF checkpoint and its q4_k_m GGUF, via
    scripts/bench_convert.py's writer and `ggfwd convert`."""
    import bench_convert as bc

    src, out = WORK / "llama1b-hf", WORK / "llama1b-gguf"
    gguf = out / "model.gguf"
    if gguf.exists():
        return src, gguf
    bc.write_checkpoint(src, 2048, 5632, 22, 32, 4, 32000, 500 << 20, seed=0)
    subprocess.run([sys.executable, "-m", "ggfwd", "convert", str(src), "-o", str(out), "--type", "q4_k_m", "-q",
                    "--threads", "2"], check=True)
    return src, gguf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gemma", "llama1b", "tiny"], default="gemma",
                    help="tiny: scripts/smoke_model.py's random Llama (F32), PyTorch through fidelity's cache")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="eval,train,torch")
    ap.add_argument("--smoke", action="store_true", help="seconds: --model tiny --batch 4 --steps 1")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="eval", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)

    if args.smoke:
        args.model, args.batch, args.steps = "tiny", 4, 1
    WORK.mkdir(parents=True, exist_ok=True)
    if args.model == "gemma":
        from ggfwd.demo import demo_model

        gguf, hf = demo_model(), None
    elif args.model == "tiny":
        from smoke_model import tiny_llama

        gguf, hf = tiny_llama("f32")[1], None
    else:
        hf, gguf = make_llama1b()
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()} {st.st_size} {st.st_mtime_ns} {MAX_TOKENS}".encode()).hexdigest()[:10]
    tokens = WORK / f"tokens-{args.model}-{key}-{args.batch}.json"
    if not tokens.exists():
        prepare_tokens(gguf, args.batch, tokens)
    if "torch" in args.modes.split(",") and hf is None:
        run_child(["--mode", "reference", "--gguf", str(gguf)])
    common = ["--gguf", str(gguf), "--tokens", str(tokens), "--threads", str(args.threads), "--steps",
              str(args.steps), "--eps", str(args.eps)]
    results = {}
    for mode in args.modes.split(","):
        extra = common + ["--mode", mode] + (["--hf", str(hf)] if hf and mode == "torch" else [])
        t0 = time.perf_counter()
        results[mode] = run_child(extra)
        results[mode]["seconds"] = time.perf_counter() - t0
        r = results[mode]
        print(f"{mode:6s} peak RSS {r['maxrss'] / 2**20:7.0f} MiB (during work {r['step_peak'] / 2**20:7.0f} MiB), "
              f"loss {r['loss']:.4f}, {r['n_tokens']} tokens, {r['seconds']:.0f} s", flush=True)
    print(f"\n{args.model} ({gguf.name}, {gguf.stat().st_size / 2**20:.0f} MiB file), batch {args.batch}:")
    if "eval" in results and "train" in results:
        for key, what in (("maxrss", "whole-process peak"), ("step_peak", "peak during the work")):
            e, t = results["eval"][key], results["train"][key]
            print(f"  train step / eval pass, {what}: {t / e:.3f}  (target <= 1.10)")
    if "torch" in results and "train" in results:
        for key, what in (("maxrss", "whole-process peak"), ("step_peak", "peak during the work")):
            p, t = results["torch"][key], results["train"][key]
            print(f"  torch backprop LoRA / ggfwd train step, {what}: {p / t:.2f}x ({p / 2**20:.0f} vs "
                  f"{t / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
