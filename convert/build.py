"""`ggfwd convert`: SRC (Hugging Face directory or GGUF) -> OUTDIR/{model.gguf, adapter.gguf, ggfwd.json}.

Everything that can be checked is checked before the first byte is written; the output is built in a
temporary directory beside OUTDIR and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from ..adapter import LoraAdapter
from ..base import BaseModel, field_value, read_base
from ..errors import UserError
from . import architectures as archs
from .quantize import FTYPES, quantize_gguf
from .staging import check_output_dir, sha256_file, staged_dir

TYPES = tuple(FTYPES)
SHORT_TARGETS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                 "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
FORMAT_VERSION = 1


def parse_targets(spec: str) -> list[str]:
    """'q,v' -> ['attn_q', 'attn_v']; full patterns ('attn_output', 'blk.0.ffn_up') pass through."""
    names = [SHORT_TARGETS.get(p.strip(), p.strip()) for p in spec.split(",") if p.strip()]
    if not names:
        raise UserError("--targets is empty")
    return names


def check_type(out_type: str) -> str:
    t = out_type.lower()
    if t not in FTYPES:
        raise UserError(f"unknown --type '{out_type}'; choose from {', '.join(TYPES)}")
    return t


def _base_from_plan(plan, arch_name: str, n_layers: int) -> BaseModel:
    shapes = {p.name: (p.shape[0], p.shape[1]) for p in plan if len(p.shape) == 2}
    return BaseModel(path=Path("(planned)"), arch=arch_name, weight_shapes=shapes,
                     tied_embeddings="output.weight" not in shapes, n_layers=n_layers, file_type="")


def _intermediate_type(plan):
    """Type of the GGUF handed to llama.cpp's quantizer: lossless for the checkpoint's own dtype."""
    import gguf

    Q = gguf.GGMLQuantizationType
    dtypes = {p.source.dtype for p in plan if p.source is not None and len(p.shape) == 2}
    return {frozenset({"BF16"}): Q.BF16, frozenset({"F16"}): Q.F16}.get(frozenset(dtypes), Q.F32)


def convert_model(src: Path, out: Path, out_type: str | None = None, rank: int = 8, alpha: float = 16.0,
                  targets: str = "q,v", seed: int = 0, force: bool = False, threads: int = 2,
                  progress: Callable[[int], Callable[[str], None]] | None = None,
                  status: Callable[[str], None] | None = None) -> dict:
    """Convert and write OUTDIR; returns the ggfwd.json record.

    `progress(n_tensors)` returns a per-tensor callback (the CLI draws a bar); `status(text)` reports steps.
    """
    src, out = Path(src), Path(out)
    say = status or (lambda text: None)
    out_type = check_type(out_type) if out_type is not None else None
    target_names = parse_targets(targets)
    if not src.exists():
        raise UserError(f"source not found: {src}")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError("the output directory must not be the source or inside it")
    check_output_dir(out, force)

    if src.is_file():
        plan_fn = _plan_from_gguf
    elif src.is_dir():
        plan_fn = _plan_from_hf
    else:
        raise UserError(f"source is neither a directory nor a file: {src}")
    job = plan_fn(src, out_type)
    adapter = LoraAdapter.create(job["base"], targets=target_names, rank=rank, alpha=alpha, seed=seed)

    with staged_dir(out, force) as tmp:
        model_path = tmp / "model.gguf"
        job["write"](model_path, tmp, threads, progress, say)
        say("writing adapter")
        adapter.validate(read_base(model_path))
        adapter.save(tmp / "adapter.gguf", extra={
            "general.name": f"{src.name} LoRA r{rank}",
            "ggfwd.source": str(src.resolve()),
            "ggfwd.head_count": job["n_head"],
            "ggfwd.head_count_kv": job["n_head_kv"],
        })
        record = {
            "format": FORMAT_VERSION,
            "source": str(src.resolve()),
            "source_kind": job["kind"],
            "hf_architecture": job.get("hf_class"),
            "architecture": job["arch"],
            "type": job["type"],
            "rank": rank,
            "alpha": float(alpha),
            "targets": target_names,
            "seed": seed,
            "head_count": job["n_head"],
            "head_count_kv": job["n_head_kv"],
            "qk_permuted": job["arch"] == "llama",
            "tokenizer": job.get("tokenizer"),
            "files": {"model": "model.gguf", "adapter": "adapter.gguf"},
            "sha256": {"model.gguf": sha256_file(model_path), "adapter.gguf": sha256_file(tmp / "adapter.gguf")},
        }
        (tmp / "ggfwd.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


# --------------------------------------------------------------------------------------- Hugging Face source
def _plan_from_hf(src: Path, out_type: str | None) -> dict:
    from . import hf
    from .config import read_config
    from .safetensors_files import index_tensors
    from .tokenizer import tokenizer_kind

    import gguf

    out_type = out_type or "f16"
    cfg = read_config(src)
    arch = archs.for_hf_class(cfg.hf_class)
    tokenizer_kind(src)  # fail early without a tokenizer
    tensors = index_tensors(src)
    Q = gguf.GGMLQuantizationType
    direct = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}.get(out_type)
    plan = hf.plan_tensors(arch, cfg, tensors, direct if direct is not None else Q.F32)
    if direct is None:  # K-quant: write the checkpoint's own precision, then llama.cpp quantizes
        first = _intermediate_type(plan)
        plan = hf.plan_tensors(arch, cfg, tensors, first)
    else:
        first = direct
    job = {"kind": "hf", "hf_class": cfg.hf_class, "arch": arch.gguf_name, "type": out_type,
           "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv,
           "base": _base_from_plan(plan, arch.gguf_name, cfg.n_layers)}

    def write(model_path: Path, tmp: Path, threads: int, progress, say) -> None:
        target = model_path if direct is not None else tmp / "unquantized.gguf"
        tick = progress(len(plan)) if progress else None
        job["tokenizer"] = hf.write_gguf(src, cfg, arch, plan, first, target, tick)
        if direct is None:
            say(f"quantizing to {out_type} with llama.cpp")
            quantize_gguf(target, model_path, out_type, threads)
            target.unlink()

    job["write"] = write
    return job


# --------------------------------------------------------------------------------------- GGUF source
def _plan_from_gguf(src: Path, out_type: str | None) -> dict:
    from ..base import open_gguf

    base = read_base(src)
    reader = open_gguf(src)
    n_head = int(field_value(reader, f"{base.arch}.attention.head_count", 0) or 0)
    n_head_kv = int(field_value(reader, f"{base.arch}.attention.head_count_kv", n_head) or n_head)
    del reader
    job = {"kind": "gguf", "arch": base.arch, "type": out_type or base.file_type.lower() or "unchanged",
           "n_head": n_head, "n_head_kv": n_head_kv, "base": base}

    def write(model_path: Path, tmp: Path, threads: int, progress, say) -> None:
        if out_type is None:
            say("copying the model")
            shutil.copyfile(src, model_path)
        else:
            say(f"re-typing to {out_type} with llama.cpp")
            quantize_gguf(src, model_path, out_type, threads)

    job["write"] = write
    return job
