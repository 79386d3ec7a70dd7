#!/usr/bin/env python
"""Check ggfwd's memory and speed models against measurement on this machine, at three model sizes, and put
PyTorch beside them.

For each model (Gemma-3-270M Q4_K_M, a random ~1.1B llama at q4_k_m, a random 7B-class llama at q4_k_m) it
prints what `ggfwd.memory.predict_memory` and the profile's speed model predict next to what a training step
measured: peak resident memory (sampled every 5 ms, in a fresh subprocess per model) and seconds per pass
(new adapter values loaded before every pass, median of the repeats), at batch 16 x 64 tokens.

Beside ggfwd's seconds per pass it measures PyTorch fp32 (the engine MeZO uses): the same batch of token ids,
a plain forward with a rank-8 LoRA on q/v applied, the same threads, in the same run, at 270M and 1.1B (the
random llamas are built with transformers from the same config; forward time does not depend on the
values). And it states what PyTorch backprop LoRA would need in memory at each size: computed from the model
dimensions (`torch_backprop_bytes`), checked against a measured backward step at 270M and 1.1B.
The 7B-class model is also measured with `--memory lean` (weights read instead of mapped, one KV stream
shared by the batch's sequences), the session mode that brings its training step under a phone's 6 GB.

The random llamas are written as F16 GGUFs one tensor at a time with gguf-py (never all weights in memory),
quantized with llama.cpp's `llama_model_quantize`, and deleted at the end unless `--keep`.

    python scripts/bench_devices.py                       # full run (~1 h on 2 cores; ~20 GB of disk at peak)
    python scripts/bench_devices.py --smoke               # tiny random llama only, seconds
    python scripts/bench_devices.py --models gemma,llama1b --profile ci-x86-2core
Targets: memory within 10%, time per pass within 25%, 7B training step under 6 GB at 16 x 64 tokens,
PyTorch / ggfwd seconds per pass >= 1.5 at 270M and >= 3 at 1.1B.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("GGFWD_BENCH_DIR", "/tmp/ggfwd-bench-devices"))

# Random llama shapes: TinyLlama-1.1B and Llama-2-7B (MHA, 11008 FFN), and a tiny one for --smoke.
LLAMAS = {
    "tiny": dict(d=256, ff=688, layers=2, heads=4, kv=2, vocab=2000),
    "llama1b": dict(d=2048, ff=5632, layers=22, heads=32, kv=4, vocab=32000),
    "llama7b": dict(d=4096, ff=11008, layers=32, heads=32, kv=32, vocab=32000),
}


# ------------------------------------------------------------------------------------------ model files
def llama_tensor_list(spec: dict):
    """(name, numpy shape (out, in), dtype) of a llama GGUF, in file order."""
    d, ff, hd = spec["d"], spec["ff"], spec["d"] // spec["heads"]
    yield "token_embd.weight", (spec["vocab"], d), np.float16
    for i in range(spec["layers"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (d,), np.float32
        yield p + "attn_q.weight", (spec["heads"] * hd, d), np.float16
        yield p + "attn_k.weight", (spec["kv"] * hd, d), np.float16
        yield p + "attn_v.weight", (spec["kv"] * hd, d), np.float16
        yield p + "attn_output.weight", (d, spec["heads"] * hd), np.float16
        yield p + "ffn_norm.weight", (d,), np.float32
        yield p + "ffn_gate.weight", (ff, d), np.float16
        yield p + "ffn_up.weight", (ff, d), np.float16
        yield p + "ffn_down.weight", (d, ff), np.float16
    yield "output_norm.weight", (d,), np.float32
    yield "output.weight", (spec["vocab"], d), np.float16


def random_f16(shape, rng) -> np.ndarray:
    """Random F16 values of magnitude 2^-6..2^-5 with random signs, made from random bits (fast, no floats)."""
    bits = rng.integers(0, 1 << 11, size=shape, dtype=np.uint16)
    return ((bits & 0x3FF) | 0x2400 | ((bits & 0x400) << 5)).astype(np.uint16).view(np.float16)


def write_random_llama(path: Path, spec: dict, seed: int = 0) -> Path:
    """A llama-architecture F16 GGUF with random weights, written one tensor at a time."""
    import gguf

    rng = np.random.default_rng(seed)
    hd = spec["d"] // spec["heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random-llama-{spec['layers']}x{spec['d']}")
    w.add_context_length(4096)
    w.add_embedding_length(spec["d"])
    w.add_block_count(spec["layers"])
    w.add_feed_forward_length(spec["ff"])
    w.add_head_count(spec["heads"])
    w.add_head_count_kv(spec["kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(spec["vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_words = spec["vocab"] - 3 - 256
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"\u2581w{i}" for i in range(n_words)]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n_words)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * n_words)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tensors = list(llama_tensor_list(spec))
    for name, shape, dtype in tensors:
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, dtype in tensors:
        w.write_tensor_data(np.ones(shape, np.float32) if dtype == np.float32 else random_f16(shape, rng))
    w.close()
    return path


def make_llama(name: str, threads: int, workdir: Path = WORK) -> Path:
    """The random llama `name` at q4_k_m under `workdir` (made once; the F16 intermediate is deleted)."""
    from ggfwd.convert.quantize import quantize_gguf

    out = workdir / f"{name}-q4_k_m.gguf"
    if out.exists():
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    f16 = workdir / f"{name}-f16.gguf"
    t0 = time.perf_counter()
    write_random_llama(f16, LLAMAS[name])
    t1 = time.perf_counter()
    tmp = out.with_suffix(".part")
    try:
        quantize_gguf(f16, tmp, "q4_k_m", threads)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
    print(f"made {out.name}: F16 written in {t1 - t0:.0f} s, quantized in {time.perf_counter() - t1:.0f} s, "
          f"{out.stat().st_size / 2**30:.2f} GiB", flush=True)
    return out


# ------------------------------------------------------------------------------------------ children
# Each measurement runs in a fresh subprocess: a peak RSS is then that configuration's alone.
def child_ggfwd(args) -> dict:
    import llama_cpp

    from ggfwd.devicebench import measure_model
    from ggfwd.session import _quiet_llama

    _quiet_llama(False)
    llama_cpp.llama_backend_init()  # the runtime term: the process with llama.cpp loaded, before the model
    bench = measure_model(args.gguf, threads=args.threads, batch_size=args.batch, tokens=args.tokens,
                          repeats=args.repeats, steps=args.steps, calibrate=False, shapes=(args.tokens,),
                          warmup=args.repeats > 1, memory=args.memory)
    return {"points": [p.as_dict() for p in bench.points], "baseline_rss": bench.baseline_rss,
            "step_peak": bench.step_peak_rss, "step_seconds": bench.step_seconds}


def _torch_model(stats):
    """A transformers model with the GGUF's dimensions and random weights (fp32)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=stats.n_vocab, hidden_size=stats.n_embd, intermediate_size=stats.n_ff,
                  num_hidden_layers=stats.n_layers, num_attention_heads=stats.n_head,
                  num_key_value_heads=stats.n_head_kv, tie_word_embeddings=stats.tied_embeddings,
                  max_position_embeddings=4096)
    if stats.arch == "gemma3":
        config = Gemma3TextConfig(head_dim=stats.head_dim_k, sliding_window=512, query_pre_attn_scalar=stats.head_dim_k,
                                  **common)
        model = Gemma3ForCausalLM(config)
    elif stats.arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, **common))
    else:
        raise SystemExit(f"no PyTorch twin for architecture {stats.arch}")
    return model.float()


def _add_lora(model, rank: int = 8, scale: float = 2.0, train: bool = False) -> list:
    """Rank-`rank` LoRA on every q_proj and v_proj, added to their outputs by forward hooks."""
    import torch

    params = []
    for layer in model.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            a = torch.nn.Parameter(torch.randn(rank, mod.in_features) / mod.in_features ** 0.5, requires_grad=train)
            b = torch.nn.Parameter(torch.full((mod.out_features, rank), 1e-3), requires_grad=train)
            mod.register_forward_hook(lambda m, i, o, a=a, b=b: o + scale * (i[0] @ a.T) @ b.T)
            params += [a, b]
    return params


def child_torch(args) -> dict:
    """PyTorch fp32 seconds per pass (mode forward) or peak memory of a backprop LoRA step (mode backprop)."""
    import torch
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM  # noqa: F401  (runtime before the model)

    from ggfwd.devicebench import PeakRSS, synthetic_data
    from ggfwd.modelstats import ModelStats

    torch.set_num_threads(args.threads)
    stats = ModelStats.from_gguf(args.gguf)
    data = synthetic_data(stats.n_vocab, args.batch, args.tokens, seed=args.tokens)
    ids = torch.as_tensor(np.stack([e.tokens for e in data.examples]).astype(np.int64))
    labels = torch.as_tensor(data.labels.astype(np.int64))
    classes = torch.as_tensor(data.classes.astype(np.int64))
    sampler = PeakRSS()
    baseline = sampler.rss()
    model = _torch_model(stats)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.mode == "forward":
        model.eval()
        _add_lora(model)
        times = []
        with torch.inference_mode():
            for r in range(args.repeats + 1):
                start = time.perf_counter()
                hidden = model.model(input_ids=ids).last_hidden_state
                model.lm_head(hidden[:, -1])[:, classes]
                if r:  # the first pass is a warm-up
                    times.append(time.perf_counter() - start)
        return {"seconds": times, "baseline_rss": baseline}
    lora = _add_lora(model, train=True)
    opt = torch.optim.Adam(lora, lr=1e-4)
    model.train()
    sampler.start()
    for _ in range(args.steps):
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model.lm_head(hidden[:, -1])[:, classes]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"step_peak": sampler.stop(), "baseline_rss": baseline}


def _cpu_features(info: str) -> str:
    return " ".join(info.split())


def pick_profile(name: str) -> str:
    """`auto`: the shipped profile measured on a llama.cpp build with this build's CPU features (the project's
    machines come in more than one host class); a profile measured on other features predicts another
    machine, which is said before anything runs."""
    import llama_cpp

    from ggfwd.profiles import list_profiles, load_profile

    info = llama_cpp.llama_print_system_info()
    here = _cpu_features(info.decode() if isinstance(info, bytes) else str(info))
    if name == "auto":
        same = [p.name for p in list_profiles() if _cpu_features(p.section("bench").get("system_info", "")) == here]
        name = same[0] if same else "ci-x86-2core"
    recorded = _cpu_features(load_profile(name).section("bench").get("system_info", ""))
    if recorded and recorded != here:
        print(f"warning: profile {name} was measured on a llama.cpp build with other CPU features ({recorded}) than "
              f"this one ({here}): its times predict that machine. Measure this one with `ggfwd devices bench "
              f"--save here` and pass --profile here.", flush=True)
    return name


def run_child(kind: str, gguf: Path, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--gguf", str(gguf), "--threads", str(args.threads),
           "--batch", str(args.batch), "--tokens", str(args.tokens)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["maxrss"] = out.get("maxrss", 0)
            return out
    raise RuntimeError(f"{kind} child on {gguf.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def child_main(args) -> None:
    out = child_ggfwd(args) if args.child == "ggfwd" else child_torch(args)
    out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ parent
def model_path(name: str, args) -> Path:
    if name == "gemma":
        from ggfwd.demo import demo_model

        return Path(demo_model())
    from ggfwd.session import default_threads

    return make_llama(name, default_threads(), args.workdir)  # quantizing is not measured: all cores


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma,llama1b,llama7b", help="comma-separated: gemma, llama1b, llama7b, tiny")
    ap.add_argument("--profile", default="auto", help="device profile whose speed model predicts the times (auto: the "
                    "shipped one measured on a build with this build's CPU features)")
    ap.add_argument("--threads", type=int, default=None, help="compute threads (default: the profile's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per model (1 for 7B-class models)")
    ap.add_argument("--steps", type=int, default=1, help="training steps measured for the peak memory")
    ap.add_argument("--torch", default="gemma,llama1b,tiny", help="models also run in PyTorch (forward timing)")
    ap.add_argument("--backprop-check", default="gemma,llama1b,tiny",
                    help="models whose computed PyTorch backprop memory is checked by a measured step")
    ap.add_argument("--workdir", type=Path, default=WORK)
    ap.add_argument("--keep", action="store_true", help="keep the random models for the next run")
    ap.add_argument("--smoke", action="store_true", help="the tiny random llama only, 1 repeat: a check that runs")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--lean", default="llama7b", help="comma-separated models also measured with `--memory lean` "
                    "(weights read instead of mapped, one KV stream shared by the batch), one training step each")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="forward", help=argparse.SUPPRESS)
    ap.add_argument("--memory", default="standard", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)

    from ggfwd.memory import TrainingShape, predict_memory, torch_backprop_bytes
    from ggfwd.modelstats import ModelStats
    from ggfwd.profiles import load_profile

    profile = load_profile(pick_profile(args.profile))
    args.threads = args.threads or profile.threads
    if args.smoke:
        args.models, args.repeats, args.steps, args.lean = "tiny", 1, 1, "tiny"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    torch_models = {m.strip() for m in args.torch.split(",")}
    check_models = {m.strip() for m in args.backprop_check.split(",")}
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        print("PyTorch or transformers is not installed: the PyTorch columns are left out", flush=True)
        torch_models, check_models = set(), set()
    lean = {m.strip() for m in args.lean.split(",") if m.strip()}
    shape = TrainingShape(batch_size=args.batch, tokens=args.tokens)
    print(f"profile {profile.name} ({profile.threads} threads), running with {args.threads} thread(s), "
          f"batch {args.batch} x {args.tokens} tokens; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows, made = [], []
    for name in names:
        path = model_path(name, args)
        if name != "gemma":
            made.append(path)
        stats = ModelStats.from_gguf(path)
        big = stats.params > 3e9
        repeats = 1 if big else args.repeats
        t0 = time.perf_counter()
        g = run_child("ggfwd", path, args, repeats=repeats, steps=args.steps)
        point = g["points"][0]
        mem = predict_memory(stats, shape, runtime_bytes=g["baseline_rss"])
        row = {"model": name, "file": path.name, "params": stats.params, "quant": stats.quant,
               "measured_rss": g["step_peak"], "maxrss": g["maxrss"], "predicted_rss": mem.total,
               "memory_parts": mem.as_dict(), "measured_s": point["seconds"],
               "predicted_s": profile.seconds_per_pass(stats, shape.tokens_per_pass, shape.outputs_per_pass, args.tokens),
               "step_seconds": g["step_seconds"], "stats": stats}
        print(f"{name}: ggfwd measured in {time.perf_counter() - t0:.0f} s", flush=True)
        if name in torch_models and not big:
            t = run_child("torch", path, args, mode="forward", repeats=args.repeats)
            row["torch_s"] = float(np.median(t["seconds"]))
            print(f"{name}: PyTorch forward {row['torch_s']:.2f} s", flush=True)
        if name in check_models and not big:
            b = run_child("torch", path, args, mode="backprop", steps=1)
            row["torch_backprop_measured"] = b["step_peak"]
            row["torch_runtime"] = b["baseline_rss"]
            print(f"{name}: PyTorch backprop step peak {fmt_mib(b['step_peak'])} MiB", flush=True)
        if name in lean:
            w = run_child("ggfwd", path, args, repeats=1, steps=1, memory="lean")
            pred = predict_memory(stats, TrainingShape(batch_size=args.batch, tokens=args.tokens, memory="lean"),
                                  runtime_bytes=w["baseline_rss"])
            row["lean"] = {"measured_rss": w["step_peak"], "predicted_rss": pred.total,
                           "seconds": w["points"][0]["seconds"]}
            print(f"{name}: --memory lean: {fmt_mib(w['step_peak'])} MiB measured, {fmt_mib(pred.total)} predicted, "
                  f"{w['points'][0]['seconds']:.2f} s per pass", flush=True)
        rows.append(row)
    runtimes = [r["torch_runtime"] for r in rows if "torch_runtime" in r]
    for r in rows:  # computed at every size; the torch runtime is what the measured children had
        r["torch_backprop"] = torch_backprop_bytes(r.pop("stats"), shape, runtime_bytes=r.get(
            "torch_runtime", max(runtimes) if runtimes else 0))
    if not args.keep:
        for p in made:
            p.unlink(missing_ok=True)
    report(rows, args, profile)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def report(rows, args, profile) -> None:
    print(f"\nggfwd training step at batch {args.batch} x {args.tokens} tokens, {args.threads} thread(s); "
          f"predicted by ggfwd.memory and profile {profile.name}")
    head = (f"{'model':<9}{'params':>8}  {'peak RSS MiB pred/meas':>23} {'err':>6}  {'s/pass pred/meas':>17} {'err':>6}"
            f"  {'torch fp32 s':>12} {'ratio':>6}  {'torch backprop MiB':>19}")
    print(head)
    print("-" * len(head))
    for r in rows:
        mem_err = r["predicted_rss"] / r["measured_rss"] - 1
        t_err = r["predicted_s"] / r["measured_s"] - 1
        torch_s = f"{r['torch_s']:.2f}" if "torch_s" in r else "-"
        ratio = f"{r['torch_s'] / r['measured_s']:.2f}x" if "torch_s" in r else "-"
        tb = fmt_mib(r["torch_backprop"]["total"])
        if "torch_backprop_measured" in r:
            tb += f" ({fmt_mib(r['torch_backprop_measured'])} meas.)"
        else:
            tb += " (computed)"
        print(f"{r['model']:<9}{r['params'] / 1e9:>7.2f}B  {fmt_mib(r['predicted_rss']):>11}/{fmt_mib(r['measured_rss']):<11} "
              f"{mem_err:>+6.1%}  {r['predicted_s']:>8.2f}/{r['measured_s']:<8.2f} {t_err:>+6.1%}  {torch_s:>12} {ratio:>6}  {tb:>19}")
    print("\nratio: PyTorch fp32 seconds per pass / ggfwd seconds per pass (same batch, same threads, same run).")
    print("torch backprop: weights fp32 + LoRA with Adam + saved activations (ggfwd.memory.torch_backprop_bytes);"
          " 'meas.' is a measured PyTorch step's peak RSS (including ~the torch runtime).")
    for r in rows:
        parts = ", ".join(f"{k} {fmt_mib(v)}" for k, v in r["memory_parts"].items() if k != "total")
        print(f"  {r['model']}: predicted parts (MiB): {parts}; whole-process ru_maxrss {fmt_mib(r['maxrss'])} MiB")
    for r in rows:
        if "lean" in r:
            w = r["lean"]
            print(f"  {r['model']} with --memory lean: peak RSS {fmt_mib(w['measured_rss'])} MiB measured, "
                  f"{fmt_mib(w['predicted_rss'])} predicted ({w['predicted_rss'] / w['measured_rss'] - 1:+.1%}); "
                  f"{w['seconds']:.2f} s per pass (standard {r['measured_s']:.2f} s)")
    for r in rows:
        if r["params"] > 3e9:
            lean = f", --memory lean {r['lean']['measured_rss'] / 1e9:.2f} GB" if "lean" in r else ""
            print(f"  {r['model']}: training step peak {r['measured_rss'] / 1e9:.2f} GB{lean} (goal < 6 GB); PyTorch "
                  f"backprop LoRA would need {r['torch_backprop']['total'] / 1e9:.1f} GB in fp32 "
                  f"({torch_backprop_bf16(r) / 1e9:.1f} GB with bf16 weights and activations)")


def torch_backprop_bf16(row) -> float:
    t = row["torch_backprop"]
    return t["weights"] / 2 + t["lora_and_adam"] + t["activations"] / 2 + t["logits"]


if __name__ == "__main__":
    main()
