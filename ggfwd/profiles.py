"""Device profiles: what a device can give to training, as validated TOML files.

A profile describes one device class: its kind and OS, the llama.cpp backend and threads, its memory and the
part of it a training run may use, a speed model, the network, how often it is online, and for every number
where it comes from (a `ggfwd devices bench` run on the device, or a cited public benchmark with the
conversion written out; a derived number says so).

Schema (unknown keys are refused; every number must be positive):

    name = "pi5"                  # equals the file name without .toml
    description = "..."
    kind = "sbc"                  # phone, laptop, desktop, sbc, server
    os = "linux"                  # android-termux, macos, linux, windows
    backend = "cpu"               # cpu, metal, vulkan, cuda
    threads = 4
    source = "..."                # where the hardware facts come from

    [memory]
    total_mib = 8192
    budget_mib = 6144             # what a training run may use (<= total)
    runtime_mib = 120             # optional: the process before the model (Python, libraries)
    source = "..."

    [speed]                       # seconds per pass = overhead_s + sum over weight types of FLOP / rate
    overhead_s = 0.01             # optional, per pass (adapter reload, graph setup, Python)
    source = "..."
    [speed.gflops]                # effective GFLOP/s of the work on weights of a ggml type
    default = 95.0                # every type without its own rate (required)
    q4_k = 120.0                  # optional, by type: q4_k, q5_0, q6_k, q8_0, f16, f32, ...

    [numerics]                    # optional: measured by ggfwd devices bench
    noise_floor = 0.002
    eps = 0.1
    model = "gemma-3-270m-q4_k_m.gguf"
    source = "..."

    [network]
    up_mbps = 19.2
    down_mbps = 61.5
    latency_ms = 28
    source = "..."

    [availability]
    online = 0.3                  # chance of being online in a round, (0, 1]
    source = "..."

    [bench]                       # optional: what a `ggfwd devices bench` run recorded
    ...

`load_profile(spec)` finds a profile by name in, in order: the folders passed in `dirs` (the CLI's
`--profiles DIR`), the folders in `$GGFWD_PROFILES` (separated by the OS path separator), the user's
folder (`$XDG_CONFIG_HOME/ggfwd/profiles`, where `ggfwd devices bench --save` writes), then the profiles
shipped in `ggfwd.device_profiles`; `spec` may also be a path to a .toml file. A profile found earlier
shadows one of the same name later.

The speed model: prompt processing in llama.cpp is compute-bound, so the time of a decode is its FLOP
(counted by `ModelStats.flops_by_type`, split by the ggml type of the weights each product uses) over an
effective rate that depends on the device, the backend and that type, plus a fixed cost per pass. Types
matter: on x86 CPUs llama.cpp runs repacked Q4_K weights at about 2.5x the rate of Q5_0 or Q6_K ones (the
ci-x86-2core profile), and Gemma-3-270M's "Q4_K_M" file is mostly Q5_0 because its 640-wide rows do not fit
K-quant blocks. A public `llama-bench` ppN figure of P tokens/s converts to one rate, P x (FLOP per token of
that model at ppN) / 1e9 GFLOP/s, written as `default`.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import UserError
from .tomltext import to_toml

KINDS = ("phone", "laptop", "desktop", "sbc", "server")
OSES = ("android-termux", "macos", "linux", "windows")
BACKENDS = ("cpu", "metal", "vulkan", "cuda")
ENV_VAR = "GGFWD_PROFILES"
DEFAULT_RUNTIME_MIB = 120.0  # Python + numpy + llama.cpp loaded, measured here (see ggfwd.memory)
DEFAULT_OUTPUTS = 16  # scored positions per pass when the caller does not say: one per example, batch 16


# ---------------------------------------------------------------------------------------------- schema
def _text(v):
    return isinstance(v, str)


def _positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _fraction(v):
    return _positive(v) and v <= 1


def _one_of(options):
    return lambda v: isinstance(v, str) and v in options


_WHAT = {_text: "a string", _positive: "a positive number", _non_negative: "a number >= 0",
         _positive_int: "a positive integer", _fraction: "a number in (0, 1]"}

# section -> key -> (check, required); "" is the top level
SCHEMA = {
    "": {"name": (_text, True), "description": (_text, True), "kind": (_one_of(KINDS), True),
         "os": (_one_of(OSES), True), "backend": (_one_of(BACKENDS), True), "threads": (_positive_int, True),
         "source": (_text, True)},
    "memory": {"total_mib": (_positive, True), "budget_mib": (_positive, True), "runtime_mib": (_positive, False),
               "source": (_text, True)},
    "speed": {"gflops": (dict, True), "overhead_s": (_non_negative, False), "source": (_text, True)},
    "numerics": {"noise_floor": (_positive, False), "eps": (_positive, False), "model": (_text, False),
                 "source": (_text, True)},
    "network": {"up_mbps": (_positive, True), "down_mbps": (_positive, True), "latency_ms": (_positive, True),
                "source": (_text, True)},
    "availability": {"online": (_fraction, True), "source": (_text, True)},
    "bench": {"date": (_text, True), "llama_cpp_python": (_text, True), "system_info": (_text, True),
              "build_flags": (_text, False), "machine": (_text, False), "models": (list, False),
              "points": (list, False), "peak_rss_mib": (_positive, False), "tokens_per_second": (_positive, False),
              "note": (_text, False)},
}
REQUIRED_SECTIONS = ("memory", "speed", "network", "availability")
_CHOICES = {"kind": KINDS, "os": OSES, "backend": BACKENDS}


def _expect(where: str, key: str, check) -> str:
    if key in _CHOICES:
        return f"{where}: {key} must be one of {', '.join(_CHOICES[key])}"
    return f"{where}: {key} must be {_WHAT.get(check, 'a table')}"


def validate(raw: dict, where: str) -> None:
    """Raise a one-line UserError naming `where` and the field for anything outside the schema."""
    for key, value in raw.items():
        if isinstance(value, dict) and key in SCHEMA and key:
            continue
        if key not in SCHEMA[""]:
            raise UserError(f"{where}: unknown key '{key}'" + (" (a section must be a table)" if key in SCHEMA else ""))
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise UserError(f"{where}: missing section [{section}]")
    for section, spec in SCHEMA.items():
        table = raw if section == "" else raw.get(section)
        if table is None:
            continue
        prefix = f"{section}." if section else ""
        for key, value in table.items():
            if section and key not in spec:
                raise UserError(f"{where}: unknown key '{prefix}{key}'")
        for key, (check, required) in spec.items():
            if key not in table:
                if required:
                    raise UserError(f"{where}: missing field {prefix}{key}")
                continue
            value = table[key]
            if check is dict or check is list:
                if not isinstance(value, check):
                    raise UserError(f"{where}: {prefix}{key} must be a {'table' if check is dict else 'list'}")
            elif not check(value):
                raise UserError(f"{_expect(where, prefix + key, check)}, got {value!r}")
    rates = raw["speed"]["gflops"]
    for quant, rate in rates.items():
        if quant != "default" and quant not in weight_types():
            raise UserError(f"{where}: speed.gflops.{quant} is not a ggml weight type (use default, "
                            f"{', '.join(weight_types()[:8])}, ...)")
        if not _positive(rate):
            raise UserError(f"{where}: speed.gflops.{quant} must be a positive number, got {rate!r}")
    if "default" not in rates:
        raise UserError(f"{where}: speed.gflops needs a default rate (e.g. default = 95.0)")
    mem = raw["memory"]
    if mem["budget_mib"] > mem["total_mib"]:
        raise UserError(f"{where}: memory.budget_mib ({mem['budget_mib']}) exceeds memory.total_mib ({mem['total_mib']})")


def weight_types() -> list[str]:
    from gguf import GGMLQuantizationType

    return [t.name.lower() for t in GGMLQuantizationType]


# ---------------------------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Times in seconds, sizes in bytes unless the name says otherwise."""

    name: str
    description: str
    kind: str
    os: str
    backend: str
    threads: int
    source: str
    memory_total_mib: float
    memory_budget_mib: float
    runtime_mib: float
    gflops: dict
    overhead_s: float
    up_mbps: float
    down_mbps: float
    latency_ms: float
    availability: float  # chance of being online in a round, (0, 1]
    raw: dict = field(repr=False, compare=False)
    path: str = ""

    @classmethod
    def from_dict(cls, raw: dict, where: str, path: str = "") -> "DeviceProfile":
        validate(raw, where)
        mem, speed, net = raw["memory"], raw["speed"], raw["network"]
        return cls(name=raw["name"], description=raw["description"], kind=raw["kind"], os=raw["os"],
                   backend=raw["backend"], threads=raw["threads"], source=raw["source"],
                   memory_total_mib=float(mem["total_mib"]), memory_budget_mib=float(mem["budget_mib"]),
                   runtime_mib=float(mem.get("runtime_mib", DEFAULT_RUNTIME_MIB)),
                   gflops={k.lower(): float(v) for k, v in speed["gflops"].items()},
                   overhead_s=float(speed.get("overhead_s", 0.0)), up_mbps=float(net["up_mbps"]),
                   down_mbps=float(net["down_mbps"]), latency_ms=float(net["latency_ms"]),
                   availability=float(raw["availability"]["online"]), raw=raw, path=path)

    # ------------------------------------------------------------------ what the federation reads
    @property
    def latency_s(self) -> float:
        """Round-trip latency in seconds."""
        return self.latency_ms / 1000.0

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mib * 2 ** 20)

    def upload_seconds(self, nbytes: int) -> float:
        """Seconds to send `nbytes` at the profile's upload bandwidth (latency not included)."""
        return 8.0 * nbytes / (self.up_mbps * 1e6)

    def download_seconds(self, nbytes: int) -> float:
        return 8.0 * nbytes / (self.down_mbps * 1e6)

    def rate(self, weight_type: str) -> tuple[float, str]:
        """(GFLOP/s, the key it comes from) for work on weights of `weight_type`: its own rate or `default`."""
        key = weight_type.lower() if weight_type.lower() in self.gflops else "default"
        return self.gflops[key], key

    def compute_seconds(self, model, tokens: int, outputs: int | None = None, seq_tokens: int | None = None) -> dict:
        """Seconds of one pass by weight type (see `seconds_per_pass`), without the fixed overhead."""
        if tokens < 1:
            raise ValueError("tokens must be >= 1")
        outputs = DEFAULT_OUTPUTS if outputs is None else outputs
        seq = seq_tokens or max(1, tokens // max(1, outputs))
        return {k: f / (self.rate(k)[0] * 1e9) for k, f in model.flops_by_type(tokens, outputs, seq).items()}

    def seconds_per_pass(self, model, tokens: int, outputs: int | None = None, seq_tokens: int | None = None) -> float:
        """Predicted seconds for one forward pass scoring `tokens` tokens of `model` (a `ModelStats`):
        `outputs` scored positions (default 16: one per example of a batch of 16) in sequences of
        `seq_tokens` tokens (default: `tokens / outputs`)."""
        return self.overhead_s + sum(self.compute_seconds(model, tokens, outputs, seq_tokens).values())

    # ------------------------------------------------------------------ display
    def section(self, name: str) -> dict:
        return dict(self.raw.get(name, {}))

    def as_dict(self) -> dict:
        return {**self.raw, "path": self.path}


# ---------------------------------------------------------------------------------------------- finding
def user_dir() -> Path:
    """Where `ggfwd devices bench --save NAME` writes by default: $XDG_CONFIG_HOME/ggfwd/profiles."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ggfwd" / "profiles"


def search_dirs(dirs=None) -> list[Path]:
    """Folders searched for profiles, first match wins: `dirs`, $GGFWD_PROFILES, the user folder."""
    out = []
    for d in dirs or []:
        d = Path(d)
        if not d.is_dir():
            raise UserError(f"profiles folder not found: {d}")
        out.append(d)
    for d in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        d = Path(d)
        if not d.is_dir():
            raise UserError(f"{ENV_VAR} names a folder that does not exist: {d}")
        out.append(d)
    out.append(user_dir())
    return out


def _builtin_files() -> dict[str, object]:
    root = resources.files("ggfwd.device_profiles")
    return {p.name.removesuffix(".toml"): p for p in root.iterdir() if p.name.endswith(".toml")}


def builtin_profiles() -> list[str]:
    return sorted(_builtin_files())


def _read(path_or_resource, where: str, stem: str) -> DeviceProfile:
    try:
        text = path_or_resource.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"device profile {where}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"device profile {where}: cannot be read ({exc.strerror or exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"device profile {where}: not valid TOML ({exc})") from None
    profile = DeviceProfile.from_dict(raw, f"device profile {where}", str(where))
    if profile.name != stem:
        raise UserError(f"device profile {where}: name '{profile.name}' differs from the file name '{stem}.toml'")
    return profile


def _found(dirs) -> dict[str, tuple[object, str]]:
    """name -> (file, shown location) over all folders; earlier folders shadow later ones."""
    found: dict[str, tuple[object, str]] = {}
    for d in search_dirs(dirs):
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, (p, str(p)))
    for name, res in sorted(_builtin_files().items()):
        found.setdefault(name, (res, f"{name} (built-in)"))
    return found


def load_profile(spec: str, dirs=None) -> DeviceProfile:
    """A profile by name (see the module docstring for where it is looked for) or a path to a .toml file."""
    spec = str(spec)
    path = Path(spec)
    if spec.endswith(".toml") or os.sep in spec or (os.altsep and os.altsep in spec):
        if not path.is_file():
            raise UserError(f"device profile file not found: {spec}")
        return _read(path, spec, path.stem)
    found = _found(dirs)
    if spec not in found:
        raise UserError(f"unknown device profile '{spec}' (known: {', '.join(sorted(found))})")
    res, where = found[spec]
    return _read(res, where, spec)


def list_profiles(dirs=None) -> list[DeviceProfile]:
    """Every profile found (each name once), sorted by name. A bad file is an error naming it."""
    return [_read(res, where, name) for name, (res, where) in sorted(_found(dirs).items())]


# ---------------------------------------------------------------------------------------------- writing
def save_profile(data: dict, path: str | os.PathLike) -> Path:
    """Validate `data`, write it as TOML atomically, and check that the written text loads back equal."""
    from .files import atomic_path

    path = Path(path)
    text = to_toml(data)
    if tomllib.loads(text) != data:
        raise RuntimeError("TOML writer round trip failed")
    DeviceProfile.from_dict(data, f"device profile {path}")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
