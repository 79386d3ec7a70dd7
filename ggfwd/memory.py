"""The memory a ggfwd training step needs, predicted from the GGUF header and the training shape.

What a training step holds at its peak, as measured on llama-cpp-python 0.3.36 (x86-64 CPU build; see
`scripts/bench_devices.py` for predicted against measured):

- runtime: the process before the model (Python, numpy, llama.cpp's libraries): measured per device;
- weights, mapped: llama.cpp maps the GGUF (`load_mode` MMAP, the default) and populates it, so the whole
  file is resident;
- weights, repacked: on CPUs llama.cpp copies the weights it has faster kernels for into an interleaved
  layout (here Q4_0, Q4_K and IQ4_NL matrices with a row count divisible by 8, except the token embedding),
  in anonymous memory, while the mapped originals stay resident too;
- KV cache: one stream per sequence, each padded to a multiple of 256 cells (`kv_cells`), F16 by default;
- outputs: logits for the scored positions (`max_outputs x n_vocab` floats);
- compute buffer: the largest set of intermediate tensors the graph needs at once (`compute_bytes`);
- vocabulary and bookkeeping: llama.cpp's tokenizer tables and the Python-side GGUF metadata, about 220
  bytes per token, plus a fixed 24 MiB (contexts, graphs, the trainer's objects; fitted, not itemised);
- adapter: the LoRA values in float32, in about eight copies during a step (parameters, theta, the
  perturbed work vector, the direction, its GGUF image, llama.cpp's loaded copy and the one replacing it),
  plus the optimizer's state.

For GPU backends the weights are not repacked; the total is what the device and host need together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import UserError

MIB = 2 ** 20
KV_PAD = 256  # llama.cpp pads each sequence's cache to this many cells
VOCAB_BYTES_PER_TOKEN = 220
FIXED_OVERHEAD = 24 * MIB  # llama.cpp's model, context and graph bookkeeping, the trainer's Python objects and
# buffers, a thread's malloc arena: not itemised, fitted to small models where it shows (17-20 MiB unexplained
# by the other parts on a 2-layer llama, llama-cpp-python 0.3.36, x86-64)
ADAPTER_COPIES = 8
OPTIMIZER_STATE = {"sgd": 1, "adam": 2}  # float32 values per trained parameter (momentum; m and v)
REPACKED_TYPES = ("Q4_0", "Q4_K", "IQ4_NL")


@dataclass(frozen=True)
class TrainingShape:
    """One training configuration: `batch_size` examples of `tokens` tokens per pass (the session is sized
    for exactly that: `max_tokens = tokens`), a rank-`rank` LoRA on `targets`, `directions` perturbations
    per step."""

    batch_size: int = 16
    tokens: int = 64
    rank: int = 8
    targets: tuple = ("attn_q", "attn_v")
    directions: int = 1
    scheme: str = "central"
    optimizer: str = "sgd"
    kv_type: str = "f16"
    memory: str = "standard"  # session.MEMORY_MODES

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"rank must be >= 1, got {self.rank}")
        if self.directions < 1:
            raise UserError(f"directions must be >= 1, got {self.directions}")
        if self.optimizer not in OPTIMIZER_STATE:
            raise UserError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE)}, got '{self.optimizer}'")
        if not self.targets:
            raise UserError("targets must name at least one weight pattern")
        self.settings()  # batch size, tokens and KV type are checked by the one definition of a session

    def settings(self, threads: int | None = None):
        from .session import SessionSettings

        return SessionSettings(batch_size=self.batch_size, max_tokens=self.tokens, threads=threads,
                               kv_type=self.kv_type, memory=self.memory)

    @property
    def tokens_per_pass(self) -> int:
        return self.batch_size * self.tokens

    @property
    def outputs_per_pass(self) -> int:
        return self.batch_size

    @property
    def passes_per_step(self) -> int:
        from .estimator import passes_per_step

        return passes_per_step(self.scheme, self.directions)


@dataclass
class MemoryEstimate:
    """Predicted peak resident bytes of a training step, by part."""

    runtime: int
    weights_mapped: int
    weights_repacked: int
    kv_cache: int
    outputs: int
    compute: int
    vocabulary: int
    adapter: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def kv_cells(batch_size: int, max_tokens: int, unified: bool = False) -> int:
    """KV cells llama.cpp allocates for `batch_size` sequences of `max_tokens`: one stream per sequence, each
    padded to 256 cells (what `Session` asks for), or with `unified` one stream padded as a whole."""
    n_ctx = _pad(batch_size * max_tokens, KV_PAD)
    return n_ctx if unified else batch_size * _pad(math.ceil(n_ctx / batch_size), KV_PAD)


def compute_bytes(stats, tokens: int, cells_per_seq: int, outputs: int) -> int:
    """The graph's largest simultaneous set of intermediates for a decode of `tokens` tokens: the larger of
    the attention step (scores and their softmax per head, queries, keys, values), the feed-forward step
    (four `n_ff`-wide activations and the residual) and the output step (logits of the scored positions)."""
    q = stats.n_head * stats.head_dim_k
    kv = stats.n_head_kv * (stats.head_dim_k + stats.head_dim_v)
    attention = tokens * (2 * cells_per_seq * stats.n_head + q + kv)
    ffn = tokens * (4 * stats.n_ff + stats.n_embd)
    out = outputs * stats.n_vocab + tokens * stats.n_embd
    return 4 * max(attention, ffn, out)


def predict_memory(stats, shape: TrainingShape, runtime_bytes: int | None = None,
                   backend: str = "cpu") -> MemoryEstimate:
    """Peak resident bytes of a training step of `stats` (a `ModelStats`) at `shape`; `runtime_bytes` is the
    process before the model is loaded (default: `profiles.DEFAULT_RUNTIME_MIB`). With `shape.memory` "lean"
    the session reads the weights instead of mapping them (llama.cpp's `load_mode` NONE: repacked weights then
    replace their originals instead of doubling them) and shares one KV stream between sequences."""
    from .profiles import DEFAULT_RUNTIME_MIB

    s = shape.settings()
    lean = s.memory == "lean"
    cells = kv_cells(s.batch_size, s.max_tokens, unified=lean)
    repacked = stats.repackable_bytes if backend == "cpu" else 0
    kv_elem = 2 if shape.kv_type == "f16" else 4
    kv = cells * stats.n_layers * stats.n_head_kv * (stats.head_dim_k + stats.head_dim_v) * kv_elem
    worst_tokens = min(s.batch_tokens, s.batch_size * s.max_tokens)
    n_lora = stats.lora_params(shape.targets, shape.rank)
    trained = stats.lora_params(shape.targets, shape.rank, part="b")  # ggfwd trains B by default
    adapter = 4 * (ADAPTER_COPIES * n_lora + OPTIMIZER_STATE[shape.optimizer] * trained)
    return MemoryEstimate(
        runtime=int(runtime_bytes if runtime_bytes is not None else DEFAULT_RUNTIME_MIB * MIB),
        weights_mapped=stats.file_bytes - repacked if lean else stats.file_bytes,
        weights_repacked=repacked,
        kv_cache=kv,
        outputs=4 * s.max_outputs * stats.n_vocab,
        compute=compute_bytes(stats, worst_tokens, cells if lean else cells // s.batch_size, s.max_outputs),
        vocabulary=FIXED_OVERHEAD + VOCAB_BYTES_PER_TOKEN * stats.n_vocab,
        adapter=adapter,
    )


def torch_backprop_bytes(stats, shape: TrainingShape, weight_bytes: int = 4, runtime_bytes: int = 0) -> dict:
    """What PyTorch backprop LoRA needs for the same batch (computed, not run): the process before the model
    (`runtime_bytes`), the weights at `weight_bytes` per value, the LoRA values with gradients and Adam's two
    moments (fp32), and the activations autograd keeps for the backward pass of a llama-style block in eager
    mode, per token and layer: the block input and its norm, the attention output, the second residual and
    its norm, the LoRA branch's input copies (6 x n_embd), queries (n_head x head width), keys and values
    (2 x kv width), the gate, up, activation and product (4 x n_ff), and the softmax of the scores
    (n_head x sequence); logits only at the scored positions (the lean way to train a classifier)."""
    n_lora = stats.lora_params(shape.targets, shape.rank)
    kv_width = stats.n_head_kv * stats.head_dim_k
    q_width = stats.n_head * stats.head_dim_k
    per_token_layer = (6 * stats.n_embd + q_width + 2 * kv_width + 4 * stats.n_ff + stats.n_head * shape.tokens)
    activations = weight_bytes * shape.tokens_per_pass * stats.n_layers * per_token_layer
    logits = 2 * 4 * shape.outputs_per_pass * stats.n_vocab
    weights = weight_bytes * stats.params
    lora = 4 * 4 * n_lora
    parts = {"runtime": int(runtime_bytes), "weights": weights, "lora_and_adam": lora, "activations": activations,
             "logits": logits}
    return {**parts, "total": sum(parts.values())}
