"""`ggfwd export`: an adapter GGUF -> a PEFT LoRA directory, or a llama.cpp-ready adapter GGUF.

For the llama architecture the converter reordered the rows of q and k (see architectures.qk_row_permutation),
so the rows of B for attn_q/attn_k are in GGUF order; PEFT export puts them back. A is not permuted (its
columns follow the layer input, which is unchanged). Undoing the permutation needs the head counts: from
--base, from the ggfwd.json of the conversion, or from the adapter's own ggfwd.* metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..adapter import LoraAdapter
from ..base import field_value, open_gguf
from ..errors import UserError
from . import architectures as archs
from .staging import staged_dir

PEFT_PREFIX = "base_model.model.model.layers"


def find_record(adapter_path: Path) -> dict | None:
    """The ggfwd.json of the conversion this adapter belongs to: beside it or up to two folders up."""
    folder = adapter_path.resolve().parent
    for candidate in (folder, *list(folder.parents)[:2]):
        path = candidate / "ggfwd.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise UserError(f"cannot read {path}") from None
    return None


def head_counts(adapter: LoraAdapter, adapter_path: Path, base: Path | None) -> tuple[int, int] | None:
    if base is not None:
        reader = open_gguf(base, "base model")
        arch = field_value(reader, "general.architecture")
        if arch != adapter.arch:
            raise UserError(f"--base is a '{arch}' model but the adapter is for '{adapter.arch}'")
        n = int(field_value(reader, f"{arch}.attention.head_count", 0) or 0)
        return (n, int(field_value(reader, f"{arch}.attention.head_count_kv", n) or n)) if n else None
    record = find_record(adapter_path)
    if record and record.get("architecture") == adapter.arch and record.get("head_count"):
        return int(record["head_count"]), int(record.get("head_count_kv") or record["head_count"])
    reader = open_gguf(adapter_path, "adapter")
    n = int(field_value(reader, "ggfwd.head_count", 0) or 0)
    return (n, int(field_value(reader, "ggfwd.head_count_kv", n) or n)) if n else None


def to_hf_b(adapter: LoraAdapter, name: str, heads: tuple[int, int] | None) -> np.ndarray:
    """B of one target with its rows in Hugging Face order."""
    arch = archs.for_gguf_name(adapter.arch)
    b = adapter.b[name]
    short = archs.short_name(name)
    if arch is None or not arch.permute_qk or short not in ("attn_q", "attn_k"):
        return np.ascontiguousarray(b)
    if heads is None:
        raise UserError("the adapter targets llama q/k, whose rows must be un-permuted, but the head counts "
                        "are unknown (no ggfwd.json beside it); pass --base MODEL.gguf")
    n = archs.qk_heads(arch, short, *heads)
    return np.ascontiguousarray(b[np.argsort(archs.qk_row_permutation(b.shape[0], n))])


def peft_tensors(adapter: LoraAdapter, heads: tuple[int, int] | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT state dict (lora_A / lora_B per module) and the module names it covers."""
    if archs.for_gguf_name(adapter.arch) is None:
        raise UserError(f"cannot export a '{adapter.arch}' adapter to PEFT; supported: "
                        f"{', '.join(a.gguf_name for a in archs.ARCHITECTURES)}")
    tensors, modules = {}, []
    for name in adapter.targets:
        parts = name.split(".")
        module = archs.HF_MODULES.get(archs.short_name(name))
        if parts[0] != "blk" or module is None or parts[-1] != "weight":
            raise UserError(f"cannot export a LoRA on '{name}' to PEFT; supported targets: "
                            f"{', '.join(archs.HF_MODULES)}")
        layer = int(parts[1])
        key = f"{PEFT_PREFIX}.{layer}.{module}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(adapter.a[name])
        tensors[f"{key}.lora_B.weight"] = to_hf_b(adapter, name, heads)
        modules.append(f"model.layers.{layer}.{module}")
    return tensors, modules


def peft_config(adapter: LoraAdapter, modules: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_adapter(adapter_path: Path, to: str, out: Path, base: Path | None = None, force: bool = False) -> list[Path]:
    adapter_path, out = Path(adapter_path), Path(out)
    to = to.lower()
    if to not in ("peft", "gguf"):
        raise UserError(f"unknown --to '{to}'; choose peft or gguf")
    adapter = LoraAdapter.load(adapter_path)
    heads = head_counts(adapter, adapter_path, base)
    record = find_record(adapter_path) or {}
    if to == "peft":
        from safetensors.numpy import save_file

        tensors, modules = peft_tensors(adapter, heads)
        with staged_dir(out, force) as tmp:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            config = peft_config(adapter, modules, record.get("source") or "")
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return [out / "adapter_model.safetensors", out / "adapter_config.json"]
    extra = {"general.name": f"{adapter_path.stem} LoRA r{adapter.rank}"}
    if record.get("source"):
        extra["ggfwd.source"] = record["source"]
    if heads:
        extra["ggfwd.head_count"], extra["ggfwd.head_count_kv"] = heads
    with staged_dir(out, force) as tmp:
        adapter.save(tmp / "adapter.gguf", extra=extra)
        LoraAdapter.load(tmp / "adapter.gguf")  # read back: what we hand out must load
    return [out / "adapter.gguf"]
