"""The server's broadcast history: every round's encoded `Broadcast`, kept so that a client that joins late or
was away long catches up by replaying seeds and scalars instead of downloading the adapter (DeComFL and FedKSeed
rebuild models from their seed histories the same way).

A round's broadcast is a few hundred bytes; a snapshot of Gemma-3-270M's rank-8 q/v LoRA is 0.74 MB of trained
values. With a run folder the history is also written to `RUNDIR/history.bin` (each record a little-endian u32
length and the encoded broadcast, appended as rounds close), so a resumed server still lets clients replay
from round 0. On load, records past the committed step (written after the last checkpoint of a killed run) and
a torn or damaged tail are dropped: the resumed run recomputes those rounds bitwise.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..files import atomic_write
from .messages import Broadcast, MessageError, decode

HISTORY = "history.bin"
_LEN = struct.Struct("<I")


class History:
    def __init__(self, folder: str | os.PathLike | None = None):
        self.path = None if folder is None else Path(folder) / HISTORY
        self.rounds: list[bytes] = []  # rounds[r] is round r's encoded broadcast
        self.first = 0  # the first round held (rounds before it are unknown: a run that kept no history)

    @property
    def end(self) -> int:
        return self.first + len(self.rounds)

    def reset(self, version: int) -> None:
        """Hold nothing, at `version` (a run resumed without a usable history file)."""
        self.rounds, self.first = [], version
        if self.path is not None:
            atomic_write(self.path, lambda f: None)

    def load(self, version: int) -> None:
        """The rounds 0 .. version-1 from the run folder; without all of them, start empty at `version`."""
        rounds = []
        try:
            data = self.path.read_bytes() if self.path is not None else b""
        except OSError:
            data = b""
        at = 0
        while len(rounds) < version and at + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, at)
            record = data[at + _LEN.size:at + _LEN.size + n]
            try:
                if len(record) != n or decode(record, Broadcast).round != len(rounds):
                    break
            except MessageError:
                break
            rounds.append(record)
            at += _LEN.size + n
        if len(rounds) < version:
            self.reset(version)
            return
        self.rounds, self.first = rounds, 0
        if at != len(data):  # rounds past the commit point, or a torn tail
            atomic_write(self.path, lambda f: f.write(data[:at]))

    def append(self, round_: int, data: bytes) -> None:
        if round_ != self.end:
            raise ValueError(f"history holds rounds up to {self.end - 1}, cannot append round {round_}")
        self.rounds.append(data)
        if self.path is not None:  # round 0 starts the file anew (a folder may hold an abandoned run's)
            with open(self.path, "wb" if round_ == 0 else "ab") as f:
                f.write(_LEN.pack(len(data)) + data)

    def since(self, version: int) -> list[bytes] | None:
        """The broadcasts of rounds version .. end-1, or None when some of them are not held."""
        if version < self.first or version > self.end:
            return None
        return self.rounds[version - self.first:]
