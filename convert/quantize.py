"""GGUF-to-GGUF type changes through llama.cpp's own quantizer (`llama_model_quantize`).

Used for the K-quants, which gguf-py cannot produce, and for re-typing an existing GGUF.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from ..errors import UserError

# ggfwd --type -> llama_ftype (llama.h)
FTYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")


def quantize_gguf(src: Path, dst: Path, type_name: str, threads: int) -> None:
    import llama_cpp

    from ..session import _quiet_llama

    _quiet_llama(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[type_name]
    params.nthread = max(1, threads)
    params.allow_requantize = True
    params.max_buf_size = 64 << 20  # rows of one tensor buffered at a time: keeps peak memory low
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise UserError(f"llama.cpp could not quantize {src.name} to {type_name} (code {rc})")
