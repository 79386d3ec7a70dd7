"""A run folder: the commit point, checkpoints, metrics and what resuming needs.

Layout (`RUNDIR`):
- `state.json`: the commit point, written last with temp + os.replace: the step (round) reached, counters, the
  run's settings and inputs, and the names of the checkpoint files it belongs to.
- `checkpoint/adapter-STEP.gguf`, `checkpoint/state-STEP.npz`: the adapter and every array needed to continue
  bitwise (optimizer state, moving average, ...) after STEP updates. The previous checkpoint's files are
  removed only after the new state.json is in place.
- `adapter.gguf`: the result (a hard link to the checkpoint's adapter, or a separate file when the result is a
  moving average), replaced atomically.
- `metrics.jsonl`: one JSON object per step or round; lines past the committed step are dropped on resume (they
  are recomputed, bitwise, by the resumed run).

Checkpoints can be taken every N steps (`--checkpoint-every`): a phone's flash should not take one per step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_write

STATE = "state.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoint"
RESULT = "adapter.gguf"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def has_run(self) -> bool:
        return (self.path / STATE).exists()

    def create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- state
    def read_state(self) -> dict:
        return read_state(self.path)

    def commit(self, step: int, adapter, arrays: dict[str, np.ndarray], state: dict, result=None,
               result_extra: dict | None = None) -> None:
        """Write the checkpoint of `step` (adapter GGUF + arrays), then state.json, then the result, then remove
        older checkpoints. `result` (a LoraAdapter) is the adapter to publish as adapter.gguf when it is not
        the checkpoint's own (e.g. a moving average)."""
        ckdir = self.path / CHECKPOINTS
        ckdir.mkdir(parents=True, exist_ok=True)
        adapter_path = ckdir / f"adapter-{step:08d}.gguf"
        arrays_path = ckdir / f"state-{step:08d}.npz"
        adapter.save(adapter_path, extra={"ggfwd.step": step})
        atomic_write(arrays_path, lambda f: np.savez(f, **arrays))
        state = {**state, "step": step, "adapter": adapter_path.name, "arrays": arrays_path.name}
        atomic_write(self.path / STATE, lambda f: f.write(json.dumps(state, indent=1).encode()))
        latest = self.path / RESULT
        if result is not None:
            result.save(latest, extra={"ggfwd.step": step, **(result_extra or {})})
        else:
            tmp = self.path / f".{RESULT}.link"
            tmp.unlink(missing_ok=True)
            try:
                os.link(adapter_path, tmp)
            except OSError:
                shutil.copyfile(adapter_path, tmp)
            os.replace(tmp, latest)
        for old in ckdir.iterdir():
            if old.name not in (adapter_path.name, arrays_path.name):
                old.unlink()

    def load_checkpoint(self, state: dict):
        """(adapter, arrays) of the committed checkpoint."""
        from .adapter import LoraAdapter

        ckdir = self.path / CHECKPOINTS
        for key in ("adapter", "arrays"):
            if not isinstance(state.get(key), str) or not (ckdir / state[key]).is_file():
                raise UserError(f"{self.path / STATE} names a checkpoint file that is missing; the run is damaged")
        adapter = LoraAdapter.load(ckdir / state["adapter"])
        try:
            with np.load(ckdir / state["arrays"], allow_pickle=False) as z:
                arrays = {key: z[key] for key in z.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"checkpoint {ckdir / state['arrays']} is damaged: {exc}") from None
        return adapter, arrays

    # ----------------------------------------------------------------- metrics
    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate_metrics(self, step: int) -> None:
        """Drop records past `step` (written after the last commit of a run that was then killed)."""
        path = self.path / METRICS
        if path.exists():
            keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))


def read_state(rundir: str | os.PathLike) -> dict:
    path = Path(rundir) / STATE
    if not path.is_file():
        raise UserError(f"no run to resume in {rundir} ({STATE} not found)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{path} is damaged")
    return state


def read_metrics(rundir: str | os.PathLike) -> list[dict]:
    path = Path(rundir) / METRICS
    if not path.is_file():
        raise UserError(f"no metrics in {rundir} ({METRICS} not found)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path} line {n} is damaged") from None
    return out
