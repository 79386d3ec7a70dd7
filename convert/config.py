"""A Hugging Face `config.json`, read into the handful of numbers a GGUF header needs.

Read as plain JSON (no transformers import), because a conversion should not need torch. Handles both the
transformers 4.x spelling (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) and the 5.x one
(`rope_parameters`, optionally split per layer kind).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    raw: dict
    hf_class: str
    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float

    def get(self, key, default=None):
        return self.raw.get(key, default)

    def rope(self, layer_kind: str = "full_attention") -> dict:
        """RoPE settings for one kind of layer: {'rope_theta': ..., 'rope_type': ..., 'factor': ...}."""
        params = self.raw.get("rope_parameters")
        if isinstance(params, dict) and params:
            if isinstance(params.get(layer_kind), dict):
                return dict(params[layer_kind])
            if isinstance(params.get("full_attention"), dict):  # split per kind, but not this kind
                return dict(params["full_attention"])
            return dict(params)
        out = dict(self.raw.get("rope_scaling") or {})
        if "type" in out and "rope_type" not in out:
            out["rope_type"] = out["type"]
        if layer_kind == "sliding_attention" and "rope_local_base_freq" in self.raw:
            return {"rope_theta": self.raw["rope_local_base_freq"], "rope_type": "default"}
        out.setdefault("rope_theta", self.raw.get("rope_theta", 10000.0))
        return out


def read_config(src: Path) -> ModelConfig:
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src} has no config.json; is it a Hugging Face model directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if isinstance(raw.get("text_config"), dict):  # multimodal wrappers keep the text model here
        raw = {**raw, **raw["text_config"]}
    classes = raw.get("architectures") or []
    hf_class = classes[0] if classes else str(raw.get("model_type", "unknown"))
    try:
        hidden = int(raw["hidden_size"])
        n_head = int(raw["num_attention_heads"])
        cfg = ModelConfig(
            raw=raw,
            hf_class=hf_class,
            n_layers=int(raw["num_hidden_layers"]),
            hidden=hidden,
            ffn=int(raw["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(raw.get("num_key_value_heads") or n_head),
            head_dim=int(raw.get("head_dim") or hidden // n_head),
            vocab_size=int(raw["vocab_size"]),
            context_length=int(raw.get("max_position_embeddings") or 4096),
            rms_eps=float(raw.get("rms_norm_eps") or 1e-6),
        )
    except KeyError as exc:
        raise UserError(f"{path} lacks {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path} has a malformed value: {exc}") from None
    return cfg
