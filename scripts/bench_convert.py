"""Benchmark `ggfwd convert` on a ~1B-parameter Llama-architecture checkpoint with random BF16 weights.

The checkpoint (TinyLlama-1.1B shapes by default: hidden 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632,
vocabulary 32000) is written here shard by shard, one tensor at a time, so this script stays small too.
The conversion runs in a subprocess (`python -m ggfwd convert ... --type q4_k_m`) whose peak resident
memory is measured (psutil sampling, and the kernel's ru_maxrss for children), and must stay below 40% of
the safetensors size.

    python scripts/bench_convert.py --workdir /tmp/ggfwd_bench            # ~2.2 GB of input under workdir
    python scripts/bench_convert.py --layers 2 --workdir /tmp/small        # 2 full-size layers
    python scripts/bench_convert.py --smoke                                # a tiny checkpoint, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LIMIT = 0.40  # peak RSS / safetensors bytes


def llama_tensors(hidden, ffn, layers, heads, kv_heads, vocab):
    """(name, shape) of a LlamaForCausalLM checkpoint, in the order transformers writes them."""
    head_dim = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (heads * head_dim, hidden)
        yield p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (ffn, hidden)
        yield p + "mlp.up_proj.weight", (ffn, hidden)
        yield p + "mlp.down_proj.weight", (hidden, ffn)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def random_bf16(shape, rng, norm: bool, std: float = 0.02) -> np.ndarray:
    """Random values as BF16 bit patterns (the top half of float32), made in row blocks to bound memory."""
    if norm:
        return (np.ones(shape, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty(shape, np.uint16)
    rows = max(1, (16 << 20) // (4 * int(np.prod(shape[1:]))))
    for start in range(0, shape[0], rows):
        block = rng.standard_normal((min(rows, shape[0] - start),) + shape[1:], dtype=np.float32) * np.float32(std)
        out[start:start + len(block)] = (block.view(np.uint32) >> 16).astype(np.uint16)
    return out


def write_shards(out: Path, tensors, shard_bytes: int, seed: int, std: float = 0.02, verbose: bool = True) -> int:
    """Write BF16 safetensors shards plus model.safetensors.index.json; returns the total file size."""
    rng = np.random.default_rng(seed)
    groups, current, size = [], [], 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        if current and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    groups.append(current)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in group:
            n = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape in group:
                random_bf16(shape, rng, name.endswith("norm.weight"), std).tofile(f)
        total += (out / fname).stat().st_size
        if verbose:
            print(f"  wrote {fname} ({(out / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def write_tokenizer(out: Path, corpus: list[str] | None = None, vocab_size: int = 600) -> None:
    """A small byte-level BPE (the config's larger vocabulary is padded by the converter), trained on `corpus`
    (default: one pangram)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or ["The quick brown fox jumps over the lazy dog. 0123456789"] * 50, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))


def run_measured(cmd: list[str]) -> tuple[int, float, int, int, str]:
    """Run `cmd`; returns (exit code, wall seconds, sampled peak RSS, ru_maxrss of children, stderr tail)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return proc.returncode, wall, peak, maxrss, (out + err)[-2000:]


def write_checkpoint(src: Path, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int,
                     shard_bytes: int, seed: int = 0, corpus: list[str] | None = None, tokenizer_vocab: int = 600,
                     std: float = 0.02, verbose: bool = True) -> tuple[int, int]:
    """A random LlamaForCausalLM checkpoint in `src` (config, tokenizer, BF16 shards); returns (parameters,
    safetensors bytes)."""
    src.mkdir(parents=True, exist_ok=True)
    shapes = list(llama_tensors(hidden, ffn, layers, heads, kv_heads, vocab))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    write_tokenizer(src, corpus, tokenizer_vocab)
    st_bytes = write_shards(src, shapes, shard_bytes, seed=seed, std=std, verbose=verbose)
    return sum(int(np.prod(s)) for _, s in shapes), st_bytes


SMOKE = dict(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, vocab=1024, shard_mb=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="emptied first (default /tmp/ggfwd_bench; with --smoke a new temporary folder)")
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and output")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: a 1.7M-parameter checkpoint in 1 MB shards (hidden 256, 2 layers, vocabulary "
                         "1024); the memory limit is reported but not enforced (the interpreter alone outweighs "
                         "such a checkpoint)")
    args = ap.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="ggfwd-convert-smoke-")) if args.smoke else Path("/tmp/ggfwd_bench")

    src, out = args.workdir / "hf", args.workdir / "out"
    shutil.rmtree(args.workdir, ignore_errors=True)
    src.mkdir(parents=True)
    shapes = list(llama_tensors(args.hidden, args.ffn, args.layers, args.heads, args.kv_heads, args.vocab))
    n_params = sum(int(np.prod(s)) for _, s in shapes)
    print(f"writing a {n_params / 1e9:.2f}B-parameter Llama checkpoint (BF16) to {src}", flush=True)
    n_params, st_bytes = write_checkpoint(src, args.hidden, args.ffn, args.layers, args.heads, args.kv_heads,
                                          args.vocab, args.shard_mb << 20)

    cmd = [sys.executable, "-m", "ggfwd", "convert", str(src), "-o", str(out), "--type", args.type, "-q",
           "--threads", str(args.threads)]
    print("running:", " ".join(cmd), flush=True)
    code, wall, peak, maxrss, tail = run_measured(cmd)
    if code != 0:
        print(tail)
        print(f"conversion failed with exit code {code}")
        return 1
    model_bytes = (out / "model.gguf").stat().st_size
    peak_rss = max(peak, maxrss)
    ratio = peak_rss / st_bytes
    print(f"params            {n_params / 1e9:.3f} B ({n_params})")
    print(f"safetensors       {st_bytes / 2**30:.2f} GiB (BF16, {st_bytes} bytes)")
    print(f"output            {model_bytes / 2**30:.2f} GiB ({args.type}, {model_bytes} bytes)")
    print(f"wall time         {wall:.1f} s")
    print(f"peak RSS          {peak_rss / 2**20:.0f} MiB (sampled {peak / 2**20:.0f}, ru_maxrss {maxrss / 2**20:.0f})")
    print(f"peak RSS / input  {100 * ratio:.1f}% (limit {100 * LIMIT:.0f}%" +
          ("; not enforced with --smoke)" if args.smoke else ")"))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if ratio < LIMIT or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
