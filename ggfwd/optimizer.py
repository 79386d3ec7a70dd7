"""Optimizers for the aggregated zeroth-order estimate, on the masked coordinates only.

- `sgd`: momentum SGD (momentum 0 is plain SGD), weight decay added to the gradient (L2).
- `adam`: Adam with bias correction and decoupled weight decay (AdamW). On zeroth-order estimates the
  second moment acts as a per-coordinate normaliser of the noisy projected gradients (as in ZO-AdaMM).

The learning rate follows a schedule that is a pure function of the step (constant, cosine or linear decay,
each with linear warmup). All state is numpy arrays plus the step count, so it round-trips through `.npz`
bitwise.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")


def lr_at(step: int, lr: float, schedule: str = "constant", warmup: int = 0, total: int = 1,
          final_fraction: float = 0.0) -> float:
    """Learning rate for update number `step` (0-based): linear warmup over `warmup` steps, then the
    schedule decays from `lr` to `final_fraction * lr` at step `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(1, total - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * t))
    else:
        f = 1.0 - t
    return lr * (final_fraction + (1 - final_fraction) * f)


def check_settings(kind: str, lr: float, schedule: str = "constant", warmup: int = 0, momentum: float = 0.0,
               weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999) -> None:
    """Refuse settings no optimizer can run with (one line each), before anything is created."""
    if kind not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{kind}'")
    if schedule not in SCHEDULES:
        raise UserError(f"learning-rate schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"learning rate must be a positive number, got {lr}")
    if warmup < 0:
        raise UserError(f"warmup must be >= 0 steps, got {warmup}")
    if not 0 <= momentum < 1 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
        raise UserError("momentum and betas must lie in [0, 1)")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise UserError(f"weight decay must be >= 0, got {weight_decay}")


class Optimizer:
    def __init__(self, n: int, kind: str = "adam", lr: float = 1e-3, schedule: str = "constant", warmup: int = 0,
                 total_steps: int = 1, momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.999,
                 adam_eps: float = 1e-8, weight_decay: float = 0.0, final_fraction: float = 0.0):
        check_settings(kind, lr, schedule, warmup, momentum, weight_decay, beta1, beta2)
        self.n, self.kind, self.lr, self.schedule = n, kind, float(lr), schedule
        self.warmup, self.total_steps, self.final_fraction = int(warmup), max(1, int(total_steps)), final_fraction
        self.momentum, self.beta1, self.beta2, self.adam_eps = momentum, beta1, beta2, adam_eps
        self.weight_decay = weight_decay
        self.t = 0  # updates applied
        self.m = np.zeros(n, dtype=np.float32)
        self.v = np.zeros(n, dtype=np.float32) if kind == "adam" else None
        self._d = np.empty(n, dtype=np.float32)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.schedule, self.warmup, self.total_steps, self.final_fraction)

    def step(self, params: np.ndarray, grad: np.ndarray, step: int, scale: float = 1.0) -> np.ndarray:
        """The new masked parameters for update `step` at `scale` x the scheduled learning rate (a new array;
        `params` and the state are untouched until `commit`), so a non-finite result can be rejected without
        side effects."""
        lr = np.float32(self.lr_at(step) * scale)
        d = self._d
        if self.kind == "sgd":
            g = grad if self.weight_decay == 0 else grad + np.float32(self.weight_decay) * params
            if self.momentum:
                m = np.float32(self.momentum) * self.m + g
                self._pending = (m, None)
            else:  # plain SGD keeps no state (m stays zero), so a snapshot need not carry one
                m = g
                self._pending = (self.m, None)
            np.multiply(m, lr, out=d)
            return params - d
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        m = b1 * self.m + (1 - b1) * grad
        v = b2 * self.v + (1 - b2) * grad * grad
        t = self.t + 1
        mhat_scale = np.float32(1.0 / (1 - self.beta1 ** t))
        vhat_scale = np.float32(1.0 / (1 - self.beta2 ** t))
        np.sqrt(v * vhat_scale, out=d)
        d += np.float32(self.adam_eps)
        np.divide(m * mhat_scale, d, out=d)
        if self.weight_decay:
            d += np.float32(self.weight_decay) * params
        d *= lr
        self._pending = (m, v)
        return params - d

    def commit(self) -> None:
        """Keep the state computed by the last `step`."""
        self.m, v = self._pending
        if v is not None:
            self.v = v
        self.t += 1
        self._pending = None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"t": np.asarray(self.t, dtype=np.int64), "m": self.m}
        if self.v is not None:
            out["v"] = self.v
        return out

    def load_state_dict(self, state) -> None:
        m = np.asarray(state["m"], dtype=np.float32)
        if m.shape != (self.n,):
            raise UserError(f"optimizer state holds {m.size} values but the adapter mask has {self.n}")
        if (self.kind == "adam") != ("v" in state):
            raise UserError("optimizer state was written by a different optimizer")
        self.t = int(state["t"])
        self.m = m.copy()
        if self.kind == "adam":
            self.v = np.asarray(state["v"], dtype=np.float32).copy()
