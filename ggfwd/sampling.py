"""Which directions a client scores: FwdLLM's discriminative sampling, and an unbiased variant.

A round's candidates for client c are the seeded directions (step, c, j), j = 0..C-1 (`Perturbations.masked`,
so candidate j is exactly the plain direction j and nothing new is stored or sent). Every candidate is ranked
by its |cosine| with the previous global update u (the change the last applied round made to the trained
values, which every replica holds: `Replica.last_update`). The sign does not matter: the estimate
`s_k z_k` is the same for z and -z. All C candidates are ranked (FwdLLM's public code ranks only the last
1,000 of its 10,000).

- `discriminative` (FwdLLM design 3): the K candidates of highest |cosine|, each weighing 1. Biased toward u.
- `unbiased`: K draws with replacement from p_j = (1 - MIX) / C + MIX |cos_j| / sum |cos|, each scalar scaled
  by w = 1 / (C p_j). Then E[w s_j z_j] = mean over all C candidates of s_j z_j, an unbiased estimate like
  plain sampling, with more draws where u points (weights lie in [0, 1 / (1 - MIX)], so they are bounded).
  A candidate drawn twice is scored once and its (weighted) scalar sent twice.

The client sends each scalar with its candidate index; the server checks the indices (range, and for the
discriminative rule no repeats) and rebuilds exactly the directions the indices name, as every replaying
client does. The importance weight is folded into the scalar the client sends: the server cannot tell it from
any other scalar, so a hostile client gains nothing it did not have (its scalars are clipped like everyone's).
With no previous update (the first round, or u = 0) both rules fall back to plain directions 0..K-1.
"""

from __future__ import annotations

import numpy as np

MODES = ("random", "discriminative", "unbiased")
CODES = {"random": 0, "discriminative": 1, "unbiased": 2}
MIX = 0.5  # the unbiased rule's share of probability that follows |cosine| (the rest is uniform)
_SAMPLING_STREAM = 0x5A3D1E


def cosines(perturbations, step: int, client: int, candidates: int, reference: np.ndarray) -> np.ndarray:
    """|cos(z_j, u)| for every candidate j in 0..C-1 (float64); zeros when u is zero."""
    out = np.zeros(candidates)
    norm = float(np.linalg.norm(reference.astype(np.float64)))
    if norm == 0 or not np.isfinite(norm):
        return out
    z = np.empty(perturbations.n, dtype=np.float32)
    for j in range(candidates):
        perturbations.masked(step, client, j, out=z)
        out[j] = abs(float(np.dot(z, reference))) / (float(np.linalg.norm(z)) * norm)
    return out


def choose(mode: str, cos: np.ndarray, k: int, seed: int, step: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidate indices, importance weights) of the K directions to score, from the candidates' |cosines|."""
    c = cos.size
    if k > c:
        raise ValueError(f"cannot choose {k} of {c} candidates")
    if not np.any(cos > 0):
        return np.arange(k), np.ones(k)
    if mode == "discriminative":
        return np.argsort(-cos, kind="stable")[:k], np.ones(k)
    if mode != "unbiased":
        raise ValueError(f"unknown sampling mode '{mode}'")
    p = (1 - MIX) / c + MIX * cos / cos.sum()
    p = p / p.sum()
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, _SAMPLING_STREAM, step, client])))
    idx = rng.choice(c, size=k, replace=True, p=p)
    return idx, 1.0 / (c * p[idx])


def check_indices(indices: np.ndarray, k: int, candidates: int, mode: int) -> str | None:
    """Why a report's candidate indices are not acceptable (None: they are)."""
    if indices is None:
        return "no candidate indices"
    if indices.size != k:
        return f"{indices.size} candidate indices for {k} directions"
    if indices.size and int(indices.max()) >= candidates:
        return f"candidate index {int(indices.max())} out of range 0..{candidates - 1}"
    if mode == CODES["discriminative"] and np.unique(indices).size != indices.size:
        return "a candidate index repeats"
    return None
