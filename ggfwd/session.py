"""A scoring session: one base model loaded through llama.cpp, scoring batches of tokenized examples.

- Many examples go into one `llama_decode` (one sequence id each, positions from 0), and logits are asked
  for only where a loss needs them.
- A `Plan` fixes the batch layout of a set of examples once. Scoring the same plan with the same adapter
  values is bitwise reproducible, so `L(theta + eps z)` and `L(theta - eps z)` see identical numerics.
- Adapter values are handed to llama.cpp from memory (a GGUF image opened with `fmemopen`), so changing
  them between evaluations never touches the disk.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from .adapter import AdapterImage, LoraAdapter
from .base import read_base
from .errors import UserError
from .tasks import TokenizedData

_LOG_STATE = {"verbose": False, "callback": None}


def _quiet_llama(verbose: bool) -> None:
    """Route llama.cpp's log through a callback that drops everything unless `verbose`."""
    import llama_cpp

    _LOG_STATE["verbose"] = verbose
    if _LOG_STATE["callback"] is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            if _LOG_STATE["verbose"] and text:
                os.write(2, text)

        _LOG_STATE["callback"] = callback
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def default_threads() -> int:
    """Physical cores available to this process: more compute threads than cores slows llama.cpp badly."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        available = os.cpu_count() or 1
    return max(1, min(physical, available))


def _libc():
    libc = ctypes.CDLL(None)
    libc.fmemopen.restype = ctypes.c_void_p
    libc.fmemopen.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    return libc


@dataclass
class Scores:
    """Per-example results of one evaluation."""

    losses: np.ndarray  # float64, one per example
    correct: np.ndarray | None  # bool per example (classification)
    n_tokens: int

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else float(self.correct.mean())


class _Chunk:
    """One llama_decode worth of sequences, with its llama_batch built once."""

    def __init__(self, examples, first: int, start_pos: int = 0):
        import llama_cpp

        self.first, self.count = first, len(examples)
        lengths = [len(e.tokens) for e in examples]
        n = sum(lengths)
        self.n_tokens = n
        self.batch = llama_cpp.llama_batch_init(n, 0, 1)
        self._batch_free = llama_cpp.llama_batch_free  # kept: free() may run while the interpreter shuts down
        b = self.batch
        np.ctypeslib.as_array(b.token, shape=(n,))[:] = np.concatenate([e.tokens for e in examples])
        np.ctypeslib.as_array(b.pos, shape=(n,))[:] = np.concatenate([start_pos + np.arange(k) for k in lengths])
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        flags = np.ctypeslib.as_array(b.logits, shape=(n,))
        flags[:] = 0
        starts = np.cumsum([0] + lengths[:-1])
        seq = np.repeat(np.arange(len(examples), dtype=np.int32), lengths)
        for i in range(n):  # once per plan: llama_batch keeps one pointer per token
            b.seq_id[i][0] = int(seq[i])
        # Output rows come back in batch order; remember which example and target each row belongs to.
        rows = [start + e.positions for start, e in zip(starts, examples)]
        flags[np.concatenate(rows)] = 1
        self.n_outputs = int(sum(len(r) for r in rows))
        self.row_example = np.repeat(np.arange(len(examples)), [len(r) for r in rows])
        self.row_target = np.concatenate([e.targets for e in examples])
        b.n_tokens = n

    def free(self):
        if self.batch is not None:
            self._batch_free(self.batch)
            self.batch = None


class Plan:
    """The fixed decode layout of a tokenized data set: which examples share which llama_decode."""

    def __init__(self, data: TokenizedData, chunks: list[_Chunk]):
        self.data, self.chunks = data, chunks
        self.n_tokens = sum(c.n_tokens for c in chunks)

    def __len__(self):
        return len(self.data)

    def __del__(self):
        for c in getattr(self, "chunks", []):
            c.free()


KV_TYPES = {"f16": None, "f32": 0}  # KV cache element type -> GGML type id (None: llama.cpp's default, F16)
# How a session holds the model (`--memory`):
# - standard: the GGUF is memory-mapped, and every sequence gets a KV stream of its own (padded by llama.cpp to
#   256 cells), so a sequence's scores do not depend on the other sequences of its decode;
# - lean: the weights are read instead of mapped (on CPUs llama.cpp's repacked copies then replace the
#   originals instead of sitting beside them) and the sequences share one KV stream sized for the decode's
#   tokens. About half the memory at 7B (`scripts/bench_devices.py`: 5,014 against 9,412 MiB); scores then
#   depend on a decode's composition and differ slightly from the standard session's (Gemma-3-270M's mean
#   loss on 16 dev rows 0.4967 against 0.4961; loss differences within the noise floor of about 0.01), still
#   bitwise reproducible for the same batches.
MEMORY_MODES = ("standard", "lean")


def check_memory(mode) -> None:
    if mode not in MEMORY_MODES:
        raise UserError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got '{mode}'")


DEFAULT_MAX_TOKENS = 128
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class SessionSettings:
    """The one definition of how every command and script sets up scoring.

    The batch layout (sequences per decode, tokens per sequence and per decode, scored positions per decode)
    and the KV cache type fix the numerics: two evaluations are comparable only under equal settings, so
    `ggfwd eval`, the in-run evaluation of `ggfwd train`, `ggfwd calibrate` and the benchmarks all build
    their sessions from this. Threads do not change results (bitwise equal at 1 and 2 threads)."""

    batch_size: int = DEFAULT_BATCH_SIZE  # sequences (examples) per llama_decode; a training batch of another
    # size is scored in decodes of this many, so evaluation and training share one layout
    max_tokens: int = DEFAULT_MAX_TOKENS  # longest example; longer texts are cut from the left
    threads: int | None = None  # compute threads (None: physical cores)
    kv_type: str = "f16"
    flash_attn: bool = False
    kind: str = "classification"  # the task's kind: generation scores many positions per sequence
    memory: str = "standard"  # MEMORY_MODES

    def __post_init__(self):
        if not 1 <= self.batch_size <= 256:
            raise UserError(f"batch size must be between 1 and 256 examples per decode, got {self.batch_size}")
        if not 8 <= self.max_tokens <= 8192:
            raise UserError(f"max tokens must be between 8 and 8192, got {self.max_tokens}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if self.kv_type not in KV_TYPES:
            raise UserError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got '{self.kv_type}'")
        check_memory(self.memory)

    @property
    def batch_tokens(self) -> int:
        return max(1024, self.max_tokens)

    @property
    def max_outputs(self) -> int:
        """Classification scores one position per sequence; generation up to 256 per decode (llama.cpp
        reserves n_vocab floats for each)."""
        return self.batch_size if self.kind == "classification" else max(256, self.max_tokens)

    def open(self, model_path, verbose: bool = False) -> "Session":
        return Session(model_path, n_threads=self.threads, max_seqs=self.batch_size, seq_tokens=self.max_tokens,
                       batch_tokens=self.batch_tokens, max_outputs=self.max_outputs,
                       kv_f32=self.kv_type == "f32", flash_attn=self.flash_attn, lean=self.memory == "lean",
                       verbose=verbose)


class Session:
    """A base GGUF model loaded once, with a context sized for the plans it scores.

    `max_seqs` sequences of up to `seq_tokens` tokens each, at most `batch_tokens` tokens and
    `max_outputs` scored positions per decode (default: one per sequence, as classification needs; llama.cpp
    reserves `max_outputs x n_vocab` floats for logits, 1 GiB for 1024 outputs of a 262k vocabulary).
    These settings fix the numerics: keep them the same for evaluations that must be comparable. `lean` reads
    the weights instead of mapping them and shares one KV stream between the sequences (see MEMORY_MODES).
    """

    def __init__(self, model_path: str | os.PathLike, *, n_threads: int | None = None, max_seqs: int = 16,
                 seq_tokens: int = 256, batch_tokens: int = 1024, max_outputs: int | None = None,
                 kv_f32: bool = False, flash_attn: bool = False, lean: bool = False, verbose: bool = False):
        import llama_cpp

        self.base = read_base(model_path)
        if n_threads is not None and n_threads < 1:
            raise UserError("threads must be >= 1")
        if max_seqs < 1 or max_seqs > 256:
            raise UserError("sequences per decode must be between 1 and 256")
        self.n_threads = n_threads or default_threads()
        self.max_seqs, self.seq_tokens = max_seqs, seq_tokens
        self.batch_tokens = max(batch_tokens, seq_tokens)
        self.max_outputs = max_outputs or max_seqs
        self.kv_f32, self.flash_attn, self.lean = kv_f32, flash_attn, lean
        _quiet_llama(verbose)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        if lean:
            mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        self.model = llama_cpp.llama_model_load_from_file(str(self.base.path).encode(), mparams)
        if not self.model:
            raise UserError(f"llama.cpp could not load the model (unsupported architecture or damaged file): "
                            f"{self.base.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        self._libc = _libc()
        self._image: AdapterImage | None = None
        self._lora = None  # llama_adapter_lora_p currently active
        self._make_context()

    # ------------------------------------------------------------------ lifecycle
    def _make_context(self):
        import llama_cpp

        p = llama_cpp.llama_context_default_params()
        p.n_seq_max = self.max_seqs
        p.n_ctx = self.max_seqs * self.seq_tokens
        p.n_batch = p.n_ubatch = self.batch_tokens
        p.n_outputs_max = self.max_outputs
        p.n_threads = p.n_threads_batch = self.n_threads
        p.kv_unified = self.lean
        p.swa_full = True
        p.flash_attn_type = 1 if self.flash_attn else 0
        p.no_perf = True
        if self.kv_f32:
            p.type_k = p.type_v = 0  # GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise UserError("llama.cpp could not create a context (out of memory?)")
        self.mem = llama_cpp.llama_get_memory(self.ctx)

    def close(self):
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self._lora:
            llama_cpp.llama_adapter_lora_free(self._lora)
            self._lora = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        import llama_cpp

        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def detokenize(self, ids, remove_special: bool = False, unparse_special: bool = False) -> str:
        import llama_cpp

        ids = list(ids)
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        cap = 8 * len(ids) + 16
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            buf = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        return buf.raw[:n].decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ adapter
    def set_adapter(self, adapter: LoraAdapter | None) -> None:
        """Make `adapter` (validated against the base model) active; None removes it."""
        import llama_cpp

        if adapter is None:
            llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
            if self._lora:
                llama_cpp.llama_adapter_lora_free(self._lora)
            self._lora, self._image = None, None
            return
        if self._image is None or not self._image.matches(adapter):
            adapter.validate(self.base)
            self._image = AdapterImage(adapter)
        elif not np.all(np.isfinite(adapter.params)):
            raise UserError("adapter contains NaN or infinite values")
        self.set_params(adapter.params)

    def set_params(self, params: np.ndarray) -> None:
        """Load new values for the active adapter's flat parameter vector (the hot path: no disk I/O)."""
        import llama_cpp

        if self._image is None:
            raise RuntimeError("set_adapter() must be called before set_params()")
        self._image.update(params)
        buf = self._image.buffer
        addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        handle = self._libc.fmemopen(addr, len(buf), b"rb")
        if not handle:
            raise OSError("fmemopen failed")
        try:
            lora = llama_cpp.llama_adapter_lora_init_from_file_ptr(self.model, handle)
        finally:
            self._libc.fclose(handle)
        if not lora:
            raise UserError("llama.cpp rejected the adapter")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
        scales = (ctypes.c_float * 1)(1.0)
        llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        if self._lora:
            llama_cpp.llama_adapter_lora_free(self._lora)
        self._lora = lora

    # ------------------------------------------------------------------ scoring
    def plan(self, data: TokenizedData) -> Plan:
        """Pack examples, in order, into decodes that respect the context's limits."""
        chunks, group, tokens, outputs = [], [], 0, 0
        first = 0
        for i, ex in enumerate(data.examples):
            n = len(ex.tokens)
            if n > self.seq_tokens:
                raise UserError(f"an example has {n} tokens, more than the session's {self.seq_tokens} per sequence")
            if n == 0 or ex.tokens.min() < 0 or ex.tokens.max() >= self.n_vocab:
                raise UserError("an example holds token ids outside the model's vocabulary")
            k = len(ex.positions)
            if k > self.max_outputs:
                raise UserError(f"an example scores {k} tokens, more than the session's {self.max_outputs}")
            if group and (len(group) == self.max_seqs or tokens + n > self.batch_tokens
                          or outputs + k > self.max_outputs):
                chunks.append(_Chunk(group, first))
                group, tokens, outputs, first = [], 0, 0, i
            group.append(ex)
            tokens += n
            outputs += k
        if group:
            chunks.append(_Chunk(group, first))
        if data.classes is not None and (data.classes.max() >= self.n_vocab or data.classes.min() < 0):
            raise UserError("verbalizer token ids lie outside the model's vocabulary")
        return Plan(data, chunks)

    def score(self, plan: Plan, on_chunk=None) -> Scores:
        """Per-example losses (and correctness for classification) under the active adapter."""
        import llama_cpp

        data = plan.data
        losses = np.zeros(len(data), dtype=np.float64)
        correct = np.zeros(len(data), dtype=bool) if data.classes is not None else None
        for chunk in plan.chunks:
            llama_cpp.llama_memory_clear(self.mem, True)
            rc = llama_cpp.llama_decode(self.ctx, chunk.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx),
                                           shape=(chunk.n_outputs, self.n_vocab))
            ex = chunk.row_example + chunk.first
            if data.classes is not None:
                z = logits[:, data.classes].astype(np.float64)
                lse = _logsumexp(z)
                losses[ex] = lse - z[np.arange(len(z)), chunk.row_target]
                correct[ex] = z.argmax(axis=1) == chunk.row_target
            else:
                nll = _logsumexp(logits) - logits[np.arange(len(logits)), chunk.row_target].astype(np.float64)
                np.add.at(losses, ex, nll)
            if on_chunk is not None:
                on_chunk(chunk)
        if data.classes is None:
            losses /= np.asarray([len(e.targets) for e in data.examples])
        return Scores(losses, correct, plan.n_tokens)

    def logits(self, token_ids) -> np.ndarray:
        """Next-token logits at every position of one sequence (n_tokens, n_vocab), for checks and tests.
        Decoded in windows of `max_outputs` tokens that continue the same sequence in the KV cache."""
        import llama_cpp

        from .tasks import TokenizedExample

        ids = np.asarray(token_ids, dtype=np.int32)
        if len(ids) == 0 or len(ids) > self.seq_tokens:
            raise UserError(f"sequence must have 1 to {self.seq_tokens} tokens")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise UserError("token ids outside the model's vocabulary")
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        window = min(self.max_outputs, self.batch_tokens)
        llama_cpp.llama_memory_clear(self.mem, True)
        for start in range(0, len(ids), window):
            part = ids[start: start + window]
            ex = TokenizedExample(part, np.arange(len(part), dtype=np.int32), np.zeros(len(part), np.int32))
            chunk = _Chunk([ex], 0, start_pos=start)
            try:
                if llama_cpp.llama_decode(self.ctx, chunk.batch) != 0:
                    raise RuntimeError("llama_decode failed")
                out[start: start + len(part)] = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx),
                                                                      shape=(len(part), self.n_vocab))
            finally:
                chunk.free()
        return out


def _logsumexp(z: np.ndarray, block: int = 16) -> np.ndarray:
    """Row-wise log-sum-exp in float64, a block of rows at a time (rows may span a 262k vocabulary)."""
    out = np.empty(len(z), dtype=np.float64)
    for i in range(0, len(z), block):
        rows = z[i: i + block].astype(np.float64)
        m = rows.max(axis=1, keepdims=True)
        out[i: i + block] = (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))[:, 0]
    return out
