"""Device profiles: what a device can give to training, as TOML files shipped in `ggfwd.device_profiles`.

A profile names a device class, its llama.cpp backend, compute threads, a memory budget for ggfwd, and (when
it was measured) its scoring speed on the demo model, with how it was measured. Profiles that were not
measured say so (`tokens_per_second` absent) rather than guess.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError

BACKENDS = ("cpu", "metal", "vulkan", "cuda")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    backend: str
    threads: int
    memory_mib: int
    tokens_per_second: float | None = None  # Gemma-3-270M Q4_K_M, 16 SST-2 examples per decode
    measured: str = ""  # how and where tokens_per_second was measured


def builtin_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("ggfwd.device_profiles").iterdir()
                  if p.name.endswith(".toml"))


def load_profile(spec: str) -> DeviceProfile:
    """A built-in profile by name, or a TOML file."""
    if spec in builtin_profiles():
        text = resources.files("ggfwd.device_profiles").joinpath(f"{spec}.toml").read_text()
        where = spec
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"unknown device profile '{spec}' (built-in: {', '.join(builtin_profiles())})")
        text, where = path.read_text(), str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"device profile {where} is not valid TOML: {exc}") from None
    fields = set(DeviceProfile.__dataclass_fields__)
    unknown = set(raw) - fields
    if unknown:
        raise UserError(f"device profile {where}: unknown keys {sorted(unknown)}")
    try:
        profile = DeviceProfile(**raw)
    except TypeError as exc:
        raise UserError(f"device profile {where}: {exc}") from None
    if profile.backend not in BACKENDS:
        raise UserError(f"device profile {where}: backend must be one of {', '.join(BACKENDS)}")
    if profile.threads < 1 or profile.memory_mib < 64:
        raise UserError(f"device profile {where}: threads must be >= 1 and memory_mib >= 64")
    return profile
