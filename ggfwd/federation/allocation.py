"""Who does how many directions in a round, and how many directions a round asks for.

The simulation (and later the Flower server) asks each selected client for a `Cost`: the simulated seconds its
device profile predicts for this round, split into a part that does not depend on the number of directions
(messages, latency, the scheme's shared passes) and the seconds per direction (its passes on its own batch).
The policies below turn costs into per-client direction counts; they are pure functions, so every run with the
same inputs allocates the same way.

- `uniform`: every selected client gets the same count (the round waits for its slowest client, or drops the
  late ones at a deadline).
- `schedule`: FwdLLM's hand-written schedule, the same count for every client, rising with training progress
  (`FWDLLM_SCHEDULE`, data below).
- `speed`: speed-aware. For a round deadline D each client gets as many directions as its profile says it can
  finish by D (at most `cap`); a client that cannot finish one direction by D is skipped (it gets 0 and is
  not instructed: the rule chosen over a smaller batch, which would change its estimate's statistics). With a
  target count N instead of a deadline, D is the smallest deadline at which the clients' counts add up to N
  (so the fastest devices take the work first and the round is as short as the target allows); a configured
  deadline is then an upper bound on D.

`VariancePacer` is FwdLLM's design 2 (variance-controlled pacing) as a rule over the scalars the server
receives; `TrendPacer` is a scale-free trigger for more directions (a test on the training loss's trend);
`MissWeights` down-weights clients that keep missing their deadline in sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALLOCATIONS = ("uniform", "schedule", "speed")
PACINGS = ("fixed", "variance", "trend")
# FwdLLM's hand schedule of perturbations per client (1 -> 3 -> 5 -> 10) as (fraction of the run's rounds from
# which it applies, directions per client).
FWDLLM_SCHEDULE = ((0.0, 1), (0.25, 3), (0.5, 5), (0.75, 10))


@dataclass(frozen=True)
class Cost:
    """Predicted simulated seconds of one client's round: `fixed + per_direction * directions`."""

    fixed: float
    per_direction: float

    def seconds(self, directions: int) -> float:
        return self.fixed + self.per_direction * directions

    def fits(self, deadline: float, cap: int) -> int:
        """The most directions (<= cap) this client finishes by `deadline`; 0 if not even one."""
        if self.per_direction <= 0:
            return cap
        room = (deadline - self.fixed) / self.per_direction
        return int(max(0, min(cap, math.floor(room + 1e-9))))


def uniform(costs: list[Cost], directions: int) -> list[int]:
    return [int(directions)] * len(costs)


def scheduled(progress: float, schedule=FWDLLM_SCHEDULE) -> int:
    """Directions per client at `progress` (round / rounds) under a hand schedule."""
    count = schedule[0][1]
    for start, n in schedule:
        if progress + 1e-12 >= start:
            count = n
    return int(count)


def by_deadline(costs: list[Cost], deadline: float, cap: int) -> list[int]:
    """Speed-aware counts for a fixed deadline: each client's most directions that fit."""
    return [c.fits(deadline, cap) for c in costs]


def deadline_for(costs: list[Cost], target: int, cap: int, limit: float = float("inf"), min_clients: int = 0) -> float:
    """The smallest deadline at which the clients' speed-aware counts add up to `target` (every client at
    `cap` if they cannot) and at least `min_clients` clients finish one direction, at most `limit`.

    `min_clients` trades round length for breadth: under label skew, a round served by the fastest devices
    alone samples only their data (the time-to-accuracy benchmark's finding); the fast devices then fill the
    longer round with more directions, up to `cap`, instead of idling."""
    ends = sorted(c.seconds(k) for c in costs for k in range(1, cap + 1))
    if not ends:
        return 0.0
    d = ends[min(len(ends), max(1, int(target))) - 1]
    if min_clients > 0:
        firsts = sorted(c.seconds(1) for c in costs)
        d = max(d, firsts[min(len(firsts), min_clients) - 1])
    return min(d, limit)


def allocate(policy: str, costs: list[Cost], *, directions: int = 1, cap: int = 16, target: int = 0,
             deadline: float = float("inf"), progress: float = 0.0, min_clients: int = 0) -> tuple[list[int], float]:
    """(directions per client, the round's deadline) under `policy`. `target`: the round's total count for
    `speed` (0: use `deadline`); `deadline`: the configured deadline (inf: none); `min_clients`: with a
    target, the deadline also lets this many clients finish a direction (see `deadline_for`)."""
    if policy == "uniform":
        return uniform(costs, directions), deadline
    if policy == "schedule":
        return uniform(costs, scheduled(progress)), deadline
    if policy != "speed":
        raise ValueError(f"unknown allocation policy '{policy}'")
    if target > 0:
        deadline = deadline_for(costs, target, cap, deadline, min_clients)
    if not math.isfinite(deadline):
        raise ValueError("speed-aware allocation needs a deadline or a target count")
    return by_deadline(costs, deadline, cap), deadline


# ----------------------------------------------------------------------------- pacing
class VariancePacer:
    """Variance-controlled pacing: how many directions the next round asks for.

    Each round's accepted scalars s (all clients together) give the spread of the per-direction estimates:
    `pooled` = mean (s - mean s)^2, split into `within` (the spread of a client's scalars around its own mean,
    from clients with >= 2 directions) and `across` (the spread of the client means). The variance of the
    round's aggregate `sum s z / N` is proportional to pooled / N (FwdLLM's quantity: the variance of the
    per-perturbation gradient estimates is |z|^2 times that of the scalars). The rule keeps it at its budget,
    the value of the first `warmup` rounds at `base` directions:

        ema    <- decay * ema + (1 - decay) * pooled          (smoothed, since one round's spread is noisy)
        ref     = mean pooled over the first `warmup` rounds   (count stays `base` meanwhile)
        next    = clamp(ceil(base * ema / ref - tolerance), base, most)

    so the count rises when the measured variance rises above its starting level and falls back (never below
    `base`) when it drops. The signal (the true gradient's norm) cannot be measured from one round's scalars
    when the adapter has far more coordinates than the round has directions, so the budget is relative to
    the start rather than an absolute signal-to-noise ratio. Every input and the decision are logged.
    """

    def __init__(self, base: int, most: int, decay: float = 0.8, warmup: int = 3, tolerance: float = 0.25):
        if not 1 <= base <= most:
            raise ValueError("pacing needs 1 <= base <= most")
        self.base, self.most, self.decay, self.warmup, self.tolerance = base, most, decay, warmup, tolerance
        self.count, self.ema, self.ref, self.seen = base, None, None, []

    @staticmethod
    def spread(scalars_by_client: list[np.ndarray]) -> dict | None:
        groups = [np.asarray(s, np.float64) for s in scalars_by_client if len(s)]
        values = np.concatenate(groups) if groups else np.zeros(0)
        if values.size < 2:
            return None
        dof = sum(g.size - 1 for g in groups)
        within = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups) / dof if dof else None
        means = np.array([g.mean() for g in groups])
        return {"pooled": float(np.var(values)), "within": within,
                "across": float(np.var(means)) if means.size > 1 else None, "n": int(values.size)}

    def update(self, scalars_by_client: list[np.ndarray]) -> dict:
        """Take a round's accepted scalars; returns the logged record (inputs and the next count)."""
        s = self.spread(scalars_by_client)
        record = {"rule": "variance", "used": self.count}
        if s is None:
            record.update(note="fewer than 2 scalars: count kept", next=self.count)
            return record
        record.update(s)
        v = s["pooled"]
        self.ema = v if self.ema is None else self.decay * self.ema + (1 - self.decay) * v
        if self.ref is None:
            self.seen.append(v)
            if len(self.seen) >= self.warmup:
                self.ref = float(np.mean(self.seen))
        if self.ref is not None and self.ref > 0:
            ratio = self.ema / self.ref
            self.count = int(min(self.most, max(self.base, math.ceil(self.base * ratio - self.tolerance))))
            record["ratio"] = ratio
        record.update(ema=self.ema, ref=self.ref, next=self.count)
        return record

    def state(self) -> dict:
        return {"count": self.count, "ema": self.ema, "ref": self.ref, "seen": list(self.seen)}

    def load(self, state: dict) -> None:
        self.count, self.ema, self.ref = int(state["count"]), state["ema"], state["ref"]
        self.seen = list(state["seen"])


class TrendPacer:
    """Pacing that does not fade: more directions once the training loss stops falling measurably.

    FwdLLM raises the perturbation count when the estimates' variance is high; measured as a level (absolute,
    or relative to the start as in `VariancePacer`) that signal fades, because the scalars shrink with the
    gradient as training goes on. The norm test of Bollapragada, Byrd and Nocedal (arXiv 1710.11258) is the
    scale-free form of the question "is the noise larger than the signal?", but with zeroth-order estimates it
    cannot act: a direction's estimate s z carries the gradient's component along z plus n - 1 components of
    noise, so the test's variance term is about n / N times its signal term for N directions over n trained
    values (184,320 for Gemma-3-270M's default adapter): it asks for the maximum from the first round on.

    This rule asks the question where the zeroth-order estimate can answer it: in the loss. Every report
    carries its batch's loss at the current adapter; over a window of W rounds the pacer fits the mean reported
    loss against the round by least squares and tests the slope b against its standard error se (a t-statistic,
    b / se, which neither the loss's scale nor its level changes: scale-free). While the loss falls by more
    than `threshold` standard errors over the window the count stays; when it does not (t > -threshold: progress
    is lost in the noise of the estimates at this count), the count doubles (at most `most`) and the window
    starts again at the new count. The count never falls: like FwdLLM's schedule, more directions later, but
    triggered by the run, not by the calendar. Inputs and the decision are logged every round.
    """

    def __init__(self, base: int, most: int, window: int = 16, threshold: float = 1.0):
        if not 1 <= base <= most or window < 3:
            raise ValueError("pacing needs 1 <= base <= most and a window of at least 3 rounds")
        self.base, self.most, self.window, self.threshold = base, most, window, threshold
        self.count, self.losses = base, []

    @staticmethod
    def trend(losses: list[float]) -> tuple[float, float]:
        """(slope per round, its standard error) of the least-squares line through the losses."""
        y = np.asarray(losses, dtype=np.float64)
        x = np.arange(y.size, dtype=np.float64) - (y.size - 1) / 2
        sxx = float(np.sum(x * x))
        slope = float(np.sum(x * (y - y.mean())) / sxx)
        resid = y - y.mean() - slope * x
        return slope, math.sqrt(float(np.sum(resid * resid)) / (y.size - 2) / sxx)

    def update(self, loss: float | None) -> dict:
        """Take a round's mean reported loss (None: no report); returns the logged record."""
        record = {"rule": "trend", "used": self.count}
        if loss is None or not math.isfinite(loss):
            record.update(note="no loss this round: count kept", next=self.count)
            return record
        self.losses.append(float(loss))
        record["window"] = len(self.losses)
        if len(self.losses) < self.window:
            record["next"] = self.count
            return record
        slope, se = self.trend(self.losses)
        t = slope / se if se > 0 else (-math.inf if slope < 0 else math.inf)
        record.update(slope=slope, se=se, t=t)
        if t > -self.threshold and self.count < self.most:
            self.count = min(self.most, 2 * self.count)
            self.losses = []
            record["decision"] = "loss not falling: more directions"
        else:
            self.losses.pop(0)
        record["next"] = self.count
        return record

    def state(self) -> dict:
        return {"count": self.count, "losses": list(self.losses)}

    def load(self, state: dict) -> None:
        self.count, self.losses = int(state["count"]), [float(x) for x in state["losses"]]


class MissWeights:
    """Sampling weights that down-weight clients which keep missing deadlines: a client's miss count decays by
    `decay` each round and grows by 1 when, selected, it contributed nothing in time (late, or no direction
    fits the round's deadline); its weight is 1 / (1 + misses)."""

    def __init__(self, clients: int, decay: float):
        self.decay = decay
        self.misses = np.zeros(clients)

    def weights(self) -> np.ndarray:
        return 1.0 / (1.0 + self.misses)

    def update(self, missed: list[int]) -> None:
        self.misses *= self.decay
        for i in missed:
            self.misses[i] += 1.0

    def state(self) -> list[float]:
        return [float(x) for x in self.misses]

    def load(self, state: list[float]) -> None:
        self.misses = np.asarray(state, dtype=np.float64)
