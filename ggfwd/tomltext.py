"""TOML text for nested dicts of strings, numbers, booleans, lists and tables (what a device profile holds).

Python's standard library reads TOML (`tomllib`) but does not write it; a profile is small and regular, so a
few lines do. `ggfwd.profiles.save_profile` checks that the text loads back equal before writing it.
"""

from __future__ import annotations

import math


def to_toml(data: dict) -> str:
    """TOML text for a profile's nested dict (strings, numbers, booleans, lists of those or of tables)."""
    lines: list[str] = []

    def scalar(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError("profiles hold finite numbers only")
            return repr(v)
        if isinstance(v, str):
            return _string(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{_key(k)} = {scalar(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def emit(table: dict, prefix: str) -> None:
        plain = {k: v for k, v in table.items() if not isinstance(v, dict)
                 and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        for k, v in plain.items():
            lines.append(f"{_key(k)} = {scalar(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append("")
                lines.append(f"[{prefix}{_key(k)}]")
                emit(v, f"{prefix}{_key(k)}.")
        for k, v in table.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{prefix}{_key(k)}]]")
                    for ik, iv in item.items():
                        lines.append(f"{_key(ik)} = {scalar(iv)}")

    emit(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else scalar_key(k)


def scalar_key(k: str) -> str:
    return _string(k)


def _string(text: str) -> str:
    """A TOML basic string: quotes and backslashes escaped, control characters as \\uXXXX."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'
