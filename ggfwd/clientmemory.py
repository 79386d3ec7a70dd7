"""Client memory: every client's latest accepted report, reused by each update until it is too stale.

Without memory an update averages the reports of its own round only, so a client counts in the rounds it
reports in: a fast device reports often and a slow one rarely, and under label skew the model drifts toward the
fast devices' data (CA2FL, ICLR 2024). With memory (MIFA, arXiv 2106.12890) the trained state keeps each client's
latest report, and every update averages the entries of all clients that reported within `max_staleness`
rounds, each client once, whatever its speed. A report here is a few (seed, scalar) pairs, so the memory costs
bytes, not tensors: an entry is rebuilt from the seeds it was drawn with and its scalars. A job's directions are
seeded with (the version it computed on, its client, k): a client reports at most once per version (it waits for
the next update before its next job), so that identifies the job.

An entry computed on adapter version v counts in update u while u - v <= `max_staleness`, with its client weight
(examples, equal, ... fixed when it was accepted) times `staleness_weight(u - v)` = 1 / sqrt(1 + u - v): FedBuff's
down-weighting of stale updates (arXiv 2106.06639). The aggregate then normalises the weights (estimator.aggregate).

The memory is part of a replica (`update.Replica.memory`): every replica admits the same broadcasts in the same
order, so every replica holds the same entries; checkpoints and snapshots carry them all. `max_staleness` 0 keeps
no memory at all: an update uses its own round's reports, as before memory existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_STALENESS = 10_000  # rounds: entries' ages travel as uint16


def staleness_weight(age: int) -> float:
    """The factor on the weight of an entry computed `age` updates ago."""
    return 1.0 / math.sqrt(1.0 + age)


@dataclass
class Entry:
    version: int  # the adapter version it was computed on, which also seeds its directions
    scalars: np.ndarray  # float32
    indices: np.ndarray | None  # uint16 candidate indices, when its round sampled candidates
    weight: float  # the client's relative weight when it was accepted


class ClientMemory:
    def __init__(self, max_staleness: int):
        if not 1 <= max_staleness <= MAX_STALENESS:
            raise ValueError(f"max_staleness must lie in [1, {MAX_STALENESS}]")
        self.max_staleness = int(max_staleness)
        self.entries: dict[int, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def admit(self, step: int, reports, weights=None, ages=None) -> None:
        """Take update `step`'s accepted reports ((client, scalars[, indices]) in broadcast order, with their
        relative weights and ages; None: 1, 0): each replaces its client's entry."""
        for j, r in enumerate(reports):
            age = 0 if ages is None else int(ages[j])
            self.entries[int(r[0])] = Entry(step - age, np.array(r[1], dtype=np.float32),
                                            None if len(r) < 3 or r[2] is None else np.array(r[2], dtype=np.uint16),
                                            1.0 if weights is None else float(weights[j]))

    def expire(self, step: int) -> None:
        """Forget the entries too stale for update `step`."""
        for client in [c for c, e in self.entries.items() if step - e.version > self.max_staleness]:
            del self.entries[client]

    def rows(self, step: int) -> tuple[list[tuple], list[float], list[int]]:
        """(reports, weights, seed rounds) for update `step`, in client order, after expiring: the input of
        `estimator.aggregate`."""
        self.expire(step)
        reports, weights, draws = [], [], []
        for client in sorted(self.entries):
            e = self.entries[client]
            reports.append((client, e.scalars) if e.indices is None else (client, e.scalars, e.indices))
            weights.append(e.weight * staleness_weight(step - e.version))
            draws.append(e.version)
        return reports, weights, draws

    def ages(self, step: int) -> dict[int, int]:
        return {c: step - e.version for c, e in sorted(self.entries.items())}

    # ----------------------------------------------------------------- state
    def columns(self) -> dict[str, np.ndarray]:
        """The entries as arrays, in client order (the checkpoint's and the snapshot's form)."""
        clients = sorted(self.entries)
        es = [self.entries[c] for c in clients]
        out = {"clients": np.asarray(clients, np.uint32), "counts": np.asarray([e.scalars.size for e in es], np.uint16),
               "scalars": np.concatenate([e.scalars for e in es]) if es else np.zeros(0, np.float32),
               "versions": np.asarray([e.version for e in es], np.int64),
               "weights": np.asarray([e.weight for e in es], np.float64)}
        if any(e.indices is not None for e in es):
            out["indices"] = np.concatenate([e.indices for e in es])
        return out

    def load_columns(self, cols: dict) -> None:
        """Replace the entries by those of `columns()` output (checked: a damaged state raises ValueError)."""
        clients, counts = np.asarray(cols["clients"]), np.asarray(cols["counts"]).astype(np.int64)
        scalars = np.asarray(cols["scalars"], np.float32)
        indices = cols.get("indices")
        n = clients.size
        if not all(np.asarray(cols[k]).size == n for k in ("counts", "versions", "weights")):
            raise ValueError("client memory columns of different lengths")
        if int(counts.sum()) != scalars.size or np.any(counts < 1) or (indices is not None and indices.size != scalars.size):
            raise ValueError("client memory counts do not match its scalars")
        if len(set(clients.tolist())) != n or not np.all(np.isfinite(np.asarray(cols["weights"], np.float64))):
            raise ValueError("client memory lists a client twice or a non-finite weight")
        ends = np.cumsum(counts)
        self.entries = {}
        for j in range(n):
            a, b = int(ends[j] - counts[j]), int(ends[j])
            self.entries[int(clients[j])] = Entry(int(cols["versions"][j]), scalars[a:b].copy(),
                                                  None if indices is None else np.asarray(indices[a:b], np.uint16),
                                                  float(cols["weights"][j]))
