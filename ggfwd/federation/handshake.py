"""The handshake of a federation across machines: what the server tells every node about the run, and what a
node answers to a hello. Both halves of each exchange live here, side by side, and the server's round loop
(`remote`) and a node (`node`) both import this module instead of each other.

- `run_settings` (server) -> `parse_run` (node): the training settings, the model-side inputs (never the server's
  file paths), the model's fingerprint and the staleness rule every replica follows (`stale`), as bounded JSON;
  the node checks them like a command line's.
- `hello_reply` (node) -> `parse_hello` (server): the client id and adapter version the node holds, its device
  profile and its number of training examples, as at most `MAX_HELLO` bytes of JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from ..clientmemory import MAX_STALENESS
from ..inputs import RunInputs
from ..trainer import TrainConfig
from .messages import MessageError

MAX_HELLO = 1024  # bytes of a node's hello reply
MAX_RUN_SETTINGS = 64 * 1024  # characters of the run settings a node accepts
RUN_INPUTS = ("task", "min_words", "rank", "alpha", "targets", "max_tokens")  # the inputs a node takes from the run


def model_fingerprint(path: str | os.PathLike) -> str:
    """Size and SHA-256 of the first and last MiB: enough to tell two different GGUFs apart cheaply."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()[:32]}"


NO_STALENESS = {"max_staleness": 0, "client_memory": True}  # the staleness rule of runs that predate it


def run_settings(config, inputs, stale: dict | None = None) -> str:
    """What every node needs to take part, as JSON: the training settings, the model-side inputs (not the
    server's file paths), the model's fingerprint (a node with another model refuses to train) and `stale`, the
    update rule's staleness settings (`UpdateRule.max_staleness`, `.client_memory`; every replica needs them)."""
    return json.dumps({"config": asdict(config), "inputs": {k: getattr(inputs, k) for k in RUN_INPUTS},
                       "model": model_fingerprint(inputs.model), "stale": {**NO_STALENESS, **(stale or {})}},
                      sort_keys=True, separators=(",", ":"))


def parse_run(text) -> dict:
    """The run settings a server sends (`run_settings`), bounded and checked."""
    if not isinstance(text, str) or len(text) > MAX_RUN_SETTINGS:
        raise MessageError("run settings are missing or too long")
    try:
        run = json.loads(text)
        config = TrainConfig.from_dict(run["config"])
        inputs = RunInputs(model="", data="", **{k: run["inputs"][k] for k in RUN_INPUTS})
        fingerprint = str(run["model"])
        stale = run.get("stale", NO_STALENESS)
        if not isinstance(stale, dict) or set(stale) != set(NO_STALENESS) \
                or not isinstance(stale["client_memory"], bool) or isinstance(stale["max_staleness"], bool) \
                or not isinstance(stale["max_staleness"], int) or not 0 <= stale["max_staleness"] <= MAX_STALENESS:
            raise ValueError(f"'stale' is not max_staleness in [0, {MAX_STALENESS}] and client_memory")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MessageError(f"run settings are malformed: {exc}") from None
    config.check()
    # The key names the run a kept replica belongs to. It leaves out the step count, the one setting a resumed
    # run may change: a replica of version v is the same whatever the run's length, so a node keeps it (and
    # catches up from broadcasts) when the server resumes with more --rounds.
    identity = {**run, "config": {k: v for k, v in run["config"].items() if k != "steps"}}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    return {"config": config, "inputs": inputs, "model": fingerprint, "key": key,
            "rule": replace(config.update_rule(), **stale)}


def hello_reply(client: int | None, version: int | None, profile: str, examples: int) -> bytes:
    return json.dumps({"client": -1 if client is None else client, "version": -1 if version is None else version,
                       "profile": profile, "examples": examples}, separators=(",", ":")).encode()


def parse_hello(data) -> dict:
    """A node's hello, bounded and typed; MessageError otherwise."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_HELLO:
        raise MessageError("hello is not bytes of at most 1 KiB")
    try:
        hello = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MessageError("hello is not JSON") from None
    if not isinstance(hello, dict) or set(hello) != {"client", "version", "profile", "examples"}:
        raise MessageError("hello has other fields than client, version, profile, examples")
    for key, hi in (("client", 2**32 - 1), ("version", 2**40), ("examples", 2**40)):
        v = hello[key]
        if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v <= hi:
            raise MessageError(f"hello.{key} is not an integer in [-1, {hi}]")
    if not isinstance(hello["profile"], str) or len(hello["profile"]) > 64:
        raise MessageError("hello.profile is not a name of at most 64 characters")
    return hello
