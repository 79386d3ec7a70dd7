"""The update: the one function that turns a round's aggregate into the next adapter.

The server applies it, and every federated client replays it from the broadcast seeds and scalars, so it must
give bitwise the same result wherever it runs: a `Replica` is the adapter values plus the optimizer state, and
`Replica.apply(aggregate, step)` is the only way either changes. Single-device training, the simulated
federation and the Flower apps all call it.

An update whose result is not finite is rejected: the replica stays as it was (the optimizer's state too), and
the caller records why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .clientmemory import ClientMemory, staleness_weight
from .errors import UserError
from .optimizer import Optimizer


LR_SCALINGS = ("auto", "linear", "sqrt", "none")


def check_lr_scaling(scaling: str, cap: float = 0.0) -> None:
    if scaling not in LR_SCALINGS:
        raise UserError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}, got '{scaling}'")
    if not (cap >= 0 and math.isfinite(cap)):
        raise UserError(f"--lr-scale-max must be 0 (no cap) or a positive number, got {cap}")


@dataclass(frozen=True)
class UpdateRule:
    """The optimizer settings of a run: what every replica needs to apply an update.

    The step-size rule: an update that averages N directions (`Aggregate.effective`: N = M K for M clients of
    K directions at equal weights) has about 1/N the variance of a one-direction estimate. Its step is the base
    learning rate (`lr`, with its schedule and warm-up) times `lr_scale(N)`:

    - `linear` (N): with SGD a round of N directions then moves as far in expectation as N one-direction
      steps, with the same accumulated noise (the zeroth-order noise term grows with lr^2 / N): one round
      of N clients does the work of N single-device steps, as long as the estimator's noise, not the loss's
      curvature along the gradient, limits the step. MeZO's analysis ties that limit to the loss's effective
      rank r (the factor over one direction is about N (r + 1) / (N + r): it flattens once N passes r), and on
      SST-2 with Gemma-3-270M it was reached early: N = 8 at 8x the rate was fastest to 80% and then stalled at 82-84%, and 4 skewed clients
      at 4x fell from 83.6% to 76.6% in the federate demo (docs/federation.md);
    - `sqrt` (sqrt N): the scaling that keeps Adam's update statistics (its normaliser already shrinks with the
      estimate's noise), and for SGD the measured safe middle;
    - `auto` (the default): sqrt, but `none` when reports may be stale (`max_staleness` > 0): with client memory
      an update re-applies entries it applied before, so its N counts directions that are not new noise, and
      asynchronous updates come many times a second; measured (docs/federation.md), the sqrt factor made
      asynchronous runs fall from 81.8% to 70.7% (memory) and 65.2% (without) in 4 simulated seconds, while the
      base rate climbed to 82.8%;
    - `none`: the base rate whatever N.

    `lr_scale_max` > 0 caps the factor. One direction on one client gives factor 1 in every mode.
    """

    optimizer: str = "sgd"
    lr: float = 2e-2
    schedule: str = "constant"
    warmup: int = 0
    total_steps: int = 1
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_scaling: str = "none"
    lr_scale_max: float = 0.0
    max_staleness: int = 0  # > 0: reports count while at most this many updates old (asynchronous rounds)
    client_memory: bool = True  # with max_staleness: every update reuses each client's latest report (clientmemory.py)

    def make_optimizer(self, n: int) -> Optimizer:
        return Optimizer(n, self.optimizer, self.lr, self.schedule, self.warmup, self.total_steps,
                         momentum=self.momentum, weight_decay=self.weight_decay)

    def lr_scale(self, effective: float) -> float:
        """The factor on the learning rate for an update that averages `effective` directions."""
        mode = self.lr_scaling
        if mode == "auto":
            mode = "none" if self.max_staleness else "sqrt"
        if mode == "none" or not effective > 1:
            return 1.0
        factor = float(effective) if mode == "linear" else math.sqrt(effective)
        return min(factor, self.lr_scale_max) if self.lr_scale_max > 0 else factor


class Replica:
    """One copy of the trained state: the adapter's flat parameters (`theta`, full length) and the optimizer
    state over the trained coordinates `index`. `version` counts the updates attempted (applied or rejected),
    which is the round (step) number the replica is at."""

    def __init__(self, theta: np.ndarray, index: np.ndarray, rule: UpdateRule, version: int = 0):
        self.theta = np.array(theta, dtype=np.float32, copy=True)
        self.index = index
        self.rule = rule
        self.optimizer = rule.make_optimizer(int(index.size))
        self.version = int(version)
        self.last_update: np.ndarray | None = None  # kept once `track_updates` is called (candidate sampling)
        # every client's latest report, reused by later updates (None: an update uses its own round's reports)
        self.memory = ClientMemory(rule.max_staleness) if rule.max_staleness and rule.client_memory else None

    def track_updates(self) -> None:
        """Keep the change each applied update makes to the trained values (`last_update`, zero until the first
        one): discriminative sampling ranks candidates against it, so every replica must hold the same."""
        if self.last_update is None:
            self.last_update = np.zeros(self.index.size, dtype=np.float32)

    def apply(self, aggregate: np.ndarray | None, step: int, scale: float = 1.0) -> str | None:
        """Apply update `step` (must equal `version`) from the aggregate estimate over the trained coordinates,
        at `scale` x the rule's learning rate. None (no usable reports) or a non-finite result leaves the values
        unchanged; returns the reason then."""
        if step != self.version:
            raise ValueError(f"replica is at version {self.version}, cannot apply update {step}")
        self.version += 1
        if aggregate is None:
            return "no reports"
        new = self.optimizer.step(self.theta[self.index], aggregate, step, scale)
        if not np.all(np.isfinite(new)):
            return "non-finite update"
        self.optimizer.commit()
        if self.last_update is not None:
            self.last_update = (new - self.theta[self.index]).astype(np.float32)
        self.theta[self.index] = new
        return None

    @property
    def trained(self) -> np.ndarray:
        return self.theta[self.index]

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything another replica needs to continue bitwise from here."""
        out = {f"optimizer.{k}": v for k, v in self.optimizer.state_dict().items()}
        out["theta"] = self.theta
        out["version"] = np.asarray(self.version, dtype=np.int64)
        if self.last_update is not None:
            out["last_update"] = self.last_update
        if self.memory is not None:
            out.update({f"memory.{k}": v for k, v in self.memory.columns().items()})
        return out

    def load_state_dict(self, state) -> None:
        theta = np.asarray(state["theta"], dtype=np.float32)
        if theta.shape != self.theta.shape:
            raise UserError(f"adapter state holds {theta.size} values, this run's adapter has {self.theta.size}")
        self.optimizer.load_state_dict({k.removeprefix("optimizer."): state[k] for k in state
                                        if k.startswith("optimizer.")})
        self.theta[...] = theta
        self.version = int(state["version"])
        if "last_update" in state:
            last = np.asarray(state["last_update"], dtype=np.float32)
            if last.shape != (self.index.size,):
                raise UserError(f"adapter state holds a last update of {last.size} values, this run trains "
                                f"{self.index.size}")
            self.last_update = last.copy()
        if self.memory is not None:
            cols = {k.removeprefix("memory."): state[k] for k in state if k.startswith("memory.")}
            try:
                self.memory.load_columns(cols) if cols else self.memory.entries.clear()
            except (KeyError, ValueError) as exc:
                raise UserError(f"adapter state holds a damaged client memory: {exc}") from None

    def copy(self) -> "Replica":
        other = Replica(self.theta, self.index, self.rule, self.version)
        other.load_state_dict(self.state_dict())
        return other


def advance(replica: Replica, perturbations, step: int, reports, clip: float = 0.0, weights=None, ages=None):
    """The round step every party runs: aggregate the round's (client, scalars) reports from their seeds with
    the clients' relative `weights` (`estimator.aggregate`; None: equal) and apply the update to `replica` at the
    rule's step size for the directions averaged. Returns (Aggregate, rejection reason or None). The server
    runs it on the reports it accepted; each client runs it on the broadcast of the same reports.

    `ages`: per report, how many updates old the version it computed on is (which also seeded its directions;
    None: all 0). A stale report counts at its client weight x `staleness_weight(age)` (FedBuff). With client
    memory the reports first replace their clients' entries, and the update averages every entry still within
    the staleness limit."""
    from .estimator import aggregate

    if step != replica.version:
        raise ValueError(f"replica is at version {replica.version}, cannot apply update {step}")
    if replica.memory is None:
        if ages is not None and any(int(a) for a in ages):  # stale reports, counted once each (no memory)
            weights = [(1.0 if weights is None else float(weights[j])) * staleness_weight(int(a))
                       for j, a in enumerate(ages)]
            agg = aggregate(perturbations, step, reports, clip, weights=weights,
                            draws=[step - int(a) for a in ages])
        else:
            agg = aggregate(perturbations, step, reports, clip, weights=weights)
    else:
        replica.memory.admit(step, reports, weights, ages)
        rows, row_weights, row_draws = replica.memory.rows(step)
        agg = aggregate(perturbations, step, rows, clip, weights=row_weights, draws=row_draws)
    return agg, replica.apply(agg.gradient, step, replica.rule.lr_scale(agg.effective))
