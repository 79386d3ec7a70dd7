"""Iterate averaging: the adapter that is evaluated and saved is a moving average of the trained one.

A zeroth-order step moves the adapter by `lr * s * z`: along the gradient on average, but mostly along the
random direction z. The random parts of successive steps are independent, so over a few dozen steps they
partly cancel in an average while the drift along the gradient does not (Polyak-Ruppert averaging). The
training trajectory itself is untouched; only what is evaluated and written as the result changes.

The average is exponential with decay `beta`, and normalised by the weight accumulated so far (as Adam
corrects its moments), so it starts as the first iterate rather than as zeros:

    acc_t = beta * acc_{t-1} + (1 - beta) * theta_t,    w_t = beta * w_{t-1} + (1 - beta),    avg_t = acc_t / w_t

`beta = 0.98` weighs about the last 50 steps. The state (acc, w) is saved with each checkpoint, so resumed
runs average bitwise like uninterrupted ones.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError


class IterateAverage:
    def __init__(self, n: int, beta: float):
        if not 0 < beta < 1:
            raise UserError(f"averaging decay must lie in (0, 1), got {beta}")
        self.beta = float(beta)
        self.acc = np.zeros(n, dtype=np.float32)
        self.weight = 0.0

    def update(self, theta: np.ndarray) -> None:
        b = np.float32(self.beta)
        self.acc *= b
        self.acc += (np.float32(1) - b) * theta
        self.weight = self.beta * self.weight + (1 - self.beta)

    def value(self) -> np.ndarray | None:
        """The average so far, or None before the first update."""
        if self.weight == 0:
            return None
        return self.acc / np.float32(self.weight)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"average": self.acc, "average_weight": np.asarray(self.weight, dtype=np.float64)}

    def load_state_dict(self, state) -> None:
        if "average" not in state:
            raise UserError("the checkpoint holds no adapter average; it was written without --average")
        acc = np.asarray(state["average"], dtype=np.float32)
        if acc.shape != self.acc.shape:
            raise UserError(f"the checkpoint's adapter average holds {acc.size} values, expected {self.acc.size}")
        self.acc = acc.copy()
        self.weight = float(state["average_weight"])
