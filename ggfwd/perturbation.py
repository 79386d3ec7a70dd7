"""Perturbation directions over a LoRA adapter's flat parameter vector, regenerated from seeds.

A direction is a pure function of (run seed, step, client, index): it is drawn from a counter-based
generator, `Philox(SeedSequence([seed, step, client, index]))`, so it is never stored or sent. A gradient
estimate travels as (seeds, loss-difference scalars) and is rebuilt wherever it is needed.

Masks restrict a direction to part of the adapter: only B (the default: with A fixed, the weight change
`scale * B A` is linear in the trained values), only A, both, and optionally only the targets matching some
layer patterns. Coordinates outside the mask are exactly zero.

Per-tensor scaling (`scaling="tensor"`, the default) makes a perturbation of size eps mean the same thing on
every tensor and on every model: the change it causes in the effective weight `delta W = scale * B A` has
RMS about `eps / sqrt(in)`, the RMS of a unit-variance-preserving weight. It depends on the layout only
(rank, alpha, input width), never on current values, so directions stay reproducible while B trains:

- A starts uniform in +-1/sqrt(in), RMS `1/sqrt(3 in)`; an A perturbation has that per-coordinate std
  (commensurate with A's own scale).
- B starts at zero, so its scale comes from what it multiplies: `(dB A)` has entries of RMS
  `std_B * sqrt(r) * rms(A)`, hence `std_B = sqrt(3) / (scale * sqrt(r))` (0.31 for r=8, alpha=16).

`scaling="unit"` draws z ~ N(0, I) (or +-1) unscaled, as MeZO and FwdLLM do. For a B-only mask on one model
the two differ by a constant factor, equivalent to rescaling eps and the learning rate.
"""

from __future__ import annotations

import fnmatch
import re

import numpy as np

from .adapter import LoraAdapter
from .errors import UserError

DISTRIBUTIONS = ("gaussian", "rademacher")
PARTS = ("a", "b", "all")
SCALINGS = ("tensor", "unit")


def _layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def select_targets(targets: list[str], layers) -> list[str]:
    """Targets kept by `layers`: None (all), ints (layer indices), or strings (glob patterns like
    'blk.1[0-7].*', or a dotted component like 'attn_v')."""
    if layers is None:
        return list(targets)
    if isinstance(layers, (str, int)):
        layers = [layers]
    kept = []
    for name in targets:
        for p in layers:
            if isinstance(p, (int, np.integer)):
                hit = _layer_of(name) == int(p)
            elif any(c in p for c in "*?["):
                hit = fnmatch.fnmatchcase(name, p)
            else:
                hit = p == name or p in name.split(".")
            if hit:
                kept.append(name)
                break
    if not kept:
        raise UserError(f"layer patterns {list(layers)} select none of the adapter's {len(targets)} targets")
    return kept


def check_settings(distribution: str, part: str, scaling: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise UserError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got '{distribution}'")
    if part not in PARTS:
        raise UserError(f"perturbed part must be one of {', '.join(PARTS)}, got '{part}'")
    if scaling not in SCALINGS:
        raise UserError(f"scaling must be one of {', '.join(SCALINGS)}, got '{scaling}'")


class Perturbations:
    """Seeded perturbation directions for one adapter layout.

    `direction(step, client, index)` returns a float32 vector of `adapter.params.size`, zero outside the mask.
    `masked(step, client, index)` returns only the masked coordinates (in mask order), which is what the
    estimator works with; `scatter` puts such a compact vector back into full size.
    """

    def __init__(self, adapter: LoraAdapter, seed: int, distribution: str = "gaussian", part: str = "b",
                 layers=None, scaling: str = "tensor"):
        check_settings(distribution, part, scaling)
        if int(seed) < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self.seed, self.distribution, self.part, self.scaling = int(seed), distribution, part, scaling
        self.size = adapter.params.size
        self.targets = select_targets(adapter.targets, layers)
        mask = np.zeros(self.size, dtype=bool)
        std = np.zeros(self.size, dtype=np.float32)
        slices = adapter.slices()
        for name in self.targets:
            a_slice, b_slice = slices[name]
            in_dim = adapter.shapes[name][1]
            a_std, b_std = self.tensor_stds(in_dim, adapter.rank, adapter.scale)
            if part in ("a", "all"):
                mask[a_slice] = True
                std[a_slice] = a_std
            if part in ("b", "all"):
                mask[b_slice] = True
                std[b_slice] = b_std
        self.mask = mask
        self.index = np.flatnonzero(mask)
        self.n = int(self.index.size)
        self.std = std[self.index]  # per masked coordinate
        self._uniform_std = float(self.std[0]) if self.n and np.all(self.std == self.std[0]) else None

    def tensor_stds(self, in_dim: int, rank: int, lora_scale: float) -> tuple[float, float]:
        """Per-coordinate std of an A and a B perturbation (see the module docstring)."""
        if self.scaling == "unit":
            return 1.0, 1.0
        a_std = 1.0 / np.sqrt(3.0 * in_dim)
        b_std = np.sqrt(3.0) / (lora_scale * np.sqrt(rank))
        return float(a_std), float(b_std)

    # ----------------------------------------------------------------- generation
    def generator(self, step: int, client: int, index: int) -> np.random.Generator:
        return np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, int(step), int(client),
                                                                            int(index)])))

    def masked(self, step: int, client: int = 0, index: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """The direction's masked coordinates, float32, length `self.n`."""
        rng = self.generator(step, client, index)
        if out is None:
            out = np.empty(self.n, dtype=np.float32)
        if self.distribution == "gaussian":
            rng.standard_normal(self.n, dtype=np.float32, out=out)
        else:
            out[...] = rng.integers(0, 2, self.n, dtype=np.int8)
            out *= 2
            out -= 1
        if self._uniform_std is not None:
            if self._uniform_std != 1.0:
                out *= self._uniform_std
        else:
            out *= self.std
        return out

    def scatter(self, compact: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """A full-size float32 vector holding `compact` at the masked coordinates and zero elsewhere."""
        if out is None:
            out = np.zeros(self.size, dtype=np.float32)
        else:
            out[...] = 0
        out[self.index] = compact
        return out

    def direction(self, step: int, client: int = 0, index: int = 0) -> np.ndarray:
        """The full-size direction, float32, zero outside the mask."""
        return self.scatter(self.masked(step, client, index))

    def describe(self) -> dict:
        return {"seed": self.seed, "distribution": self.distribution, "part": self.part,
                "scaling": self.scaling, "targets": len(self.targets), "coordinates": self.n}
