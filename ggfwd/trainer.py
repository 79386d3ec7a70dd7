"""Single-device training: the one-client federation, run in a loop.

Each step is a round: the client (co-located with the server, sharing its replica) draws its batch and scores
the step's directions (`federation.client.Client.work`), and the server step (`update.advance`: aggregate
from seeds and scalars, then the update) moves the replica. The simulated federation and the Flower apps run
the same two pieces, so a one-client federation reaches the bitwise-same adapter as `ggfwd train`.

Everything random is a pure function of (seed, step, client): the batch (`batch_indices`), the directions
(`Perturbations`), the learning rate (`lr_at`). With llama.cpp's bitwise-reproducible scoring and exact F32
checkpoints (`rundir.RunDir`), a run that is killed and resumed reaches the bitwise-same adapter as an
uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .adapter import LoraAdapter
from .averaging import IterateAverage
from .errors import UserError
from .estimator import Estimator, check_settings
from .federation.client import Client, batch_indices  # noqa: F401  (batch_indices re-exported for the CLI and scripts)
from .federation.messages import Instruction
from .inputs import RunInputs
from .perturbation import Perturbations
from .rundir import RunDir, read_metrics, read_state  # noqa: F401  (re-exported for the CLI and scripts)
from .update import Replica, UpdateRule, advance, check_lr_scaling


SPREADS = ("directions", "batches")


@dataclass
class TrainConfig:
    steps: int = 200
    # Defaults: the notes' baseline recipe in per-tensor units (unit-variance eps 3e-2, lr 2e-3 <=> eps 0.1,
    # lr 0.02 here): on the same batches it beat adam lr 1e-2 (69.5% vs 66.8% on 256 dev rows at 80 passes).
    lr: float = 2e-2
    eps: float = 0.1
    directions: int = 1
    batch_size: int = 16
    optimizer: str = "sgd"
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    momentum: float = 0.0
    seed: int = 0
    distribution: str = "gaussian"
    part: str = "b"
    layers: list | None = None
    scaling: str = "tensor"
    scheme: str = "central"
    normalize: str = "none"
    average_decay: float = 0.0  # > 0: evaluate and save a moving average of the adapter (see averaging.py)
    eval_every: int = 50
    max_rejections: int = 10  # consecutive divergent steps before the run stops
    clip: float = 0.0  # > 0: scalars are limited to clip x the median client's median |s| (see estimator.aggregate)
    lr_scaling: str = "auto"  # step size x f(directions averaged): auto | linear | sqrt | none (update.UpdateRule)
    lr_scale_max: float = 0.0  # > 0: cap on that factor
    spread: str = "directions"  # a step's directions on one batch, or "batches": each on its own batch
    checkpoint_every: int = 1  # commit a checkpoint every N steps (and at the end)

    def check(self) -> None:
        """Every setting, before anything is created on disk (one line per mistake)."""
        from . import optimizer, perturbation

        check_settings(self.eps, self.directions, self.scheme, self.normalize)
        optimizer.check_settings(self.optimizer, self.lr, self.schedule, self.warmup, self.momentum,
                                 self.weight_decay)
        perturbation.check_settings(self.distribution, self.part, self.scaling)
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.eval_every < 0:
            raise UserError(f"eval interval must be >= 0, got {self.eval_every}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.clip != 0 and not (self.clip >= 1 and np.isfinite(self.clip)):
            raise UserError(f"clip must be 0 (off) or a number >= 1, got {self.clip}")
        if self.checkpoint_every < 1:
            raise UserError(f"checkpoint interval must be >= 1 step, got {self.checkpoint_every}")
        if self.max_rejections < 1:
            raise UserError(f"max rejections must be >= 1, got {self.max_rejections}")
        if not 0 <= self.average_decay < 1:
            raise UserError(f"averaging decay must lie in [0, 1), got {self.average_decay}")
        check_lr_scaling(self.lr_scaling, self.lr_scale_max)
        if self.spread not in SPREADS:
            raise UserError(f"--spread must be one of {', '.join(SPREADS)}, got '{self.spread}'")
        if self.spread == "batches" and self.scheme not in ("central", "central4"):
            raise UserError("--spread batches needs --scheme central or central4 (the others share a pass or a mean "
                            "across directions, so one batch)")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        # A run saved before the step-size rule existed stepped at the base rate: it resumes that way.
        return cls(**{"lr_scaling": "none", **{k: v for k, v in d.items() if k in names}})

    def update_rule(self) -> UpdateRule:
        return UpdateRule(self.optimizer, self.lr, self.schedule, self.warmup, self.steps, self.momentum,
                          self.weight_decay, self.lr_scaling, self.lr_scale_max)

    def perturbations(self, adapter: LoraAdapter) -> Perturbations:
        """The run's seeded directions over `adapter`'s trained part."""
        return Perturbations(adapter, self.seed, self.distribution, self.part, self.layers, self.scaling)

    def estimator(self, session, perturbations: Perturbations) -> Estimator:
        """How the run turns scores through `session` into scalars."""
        return Estimator(session, perturbations, self.eps, self.directions, self.scheme, self.normalize)

    def instruction(self, step: int, client: int = 0, directions: int | None = None) -> Instruction:
        return Instruction(step, step, client, directions or self.directions, self.batch_size, self.eps,
                           float("inf"), spread=int(self.spread == "batches"))


@dataclass
class Counters:
    step: int = 0  # updates attempted (applied or rejected)
    applied: int = 0
    rejected: int = 0
    forward_passes: int = 0
    tokens: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    sim_seconds: float = 0.0  # federation: simulated time
    bytes_up: int = 0  # federation: serialized reports
    bytes_down: int = 0  # federation: instructions, broadcasts and snapshots


@dataclass
class Trainer:
    """One training run over a session, an initial adapter and tokenized data."""

    KIND = "train"

    session: object
    adapter: LoraAdapter
    train_data: object  # TokenizedData
    config: TrainConfig
    rundir: Path
    eval_data: object | None = None
    inputs: RunInputs | None = None  # what the run reads, saved with it and checked on resume
    calibration: dict | None = None  # the eps calibration the run was started with, if any

    def __post_init__(self):
        c = self.config
        c.check()
        self.run_dir = RunDir(self.rundir)
        if len(self.train_data) == 0:
            raise UserError("no training examples")
        self.perturbations = c.perturbations(self.adapter)
        self.estimator = c.estimator(self.session, self.perturbations)
        self.replica = Replica(self.adapter.params, self.perturbations.index, c.update_rule())
        self.setup()
        self.average = IterateAverage(self.perturbations.n, c.average_decay) if c.average_decay else None
        self.counters = Counters()
        self._consecutive_rejections = 0
        self.session.set_adapter(self.adapter)
        self.eval_plan = self.session.plan(self.eval_data) if self.eval_data is not None else None

    def allow_stale(self, max_staleness: int, client_memory: bool) -> UpdateRule:
        """The update rule of a federation whose reports may be up to `max_staleness` updates old (with the client
        memory, or FedBuff's weights without); the server's replica follows it. Returns the rule (every client
        replica follows it too)."""
        rule = replace(self.config.update_rule(), max_staleness=max_staleness, client_memory=client_memory)
        if rule != self.replica.rule:
            self.replica = Replica(self.adapter.params, self.perturbations.index, rule)
        return rule

    def setup(self) -> None:
        """The clients: here one, co-located with the server (it shares the server's replica)."""
        c = self.config
        self.client = Client(0, self.train_data, self.estimator, c.seed, c.update_rule(), c.clip, replica=self.replica)

    @property
    def theta(self) -> np.ndarray:
        return self.replica.theta

    # ----------------------------------------------------------------- one step
    def train_step(self) -> dict:
        """One round of the one-client federation: estimate, then the shared server step; returns the metrics
        record."""
        c = self.config
        step = self.counters.step
        start = time.perf_counter()
        report, est = self.client.work(c.instruction(step))
        reports = [(self.client.id, report.scalars)] if est.finite else []
        agg, reason = advance(self.replica, self.perturbations, step, reports, c.clip)
        record = {"step": step + 1, "loss": est.loss, "batch_accuracy": est.accuracy,
                  "lr": self.replica.optimizer.lr_at(step) * self.replica.rule.lr_scale(agg.effective), "eps": c.eps,
                  "scalars": [float(x) for x in report.scalars]}
        if agg.clipped:
            record["clipped"] = agg.clipped
        return self.close_step(record, "non-finite loss" if not est.finite else reason, est.forward_passes,
                               est.tokens, start)

    def close_step(self, record: dict, reason: str | None, passes: int, tokens: int, started: float) -> dict:
        """After the round step: the moving average, the session back at theta, the counters, and the
        record's running totals."""
        k = self.counters
        if reason is None and self.average is not None:
            self.average.update(self.replica.trained)
        self.session.set_params(self.theta)
        k.step += 1
        k.forward_passes += passes
        k.tokens += tokens
        k.seconds += time.perf_counter() - started
        if reason:
            k.rejected += 1
            self._consecutive_rejections += 1
            record["rejected"] = reason
        else:
            k.applied += 1
            self._consecutive_rejections = 0
        record.update(forward_passes=k.forward_passes, tokens=k.tokens, seconds=round(k.seconds, 4))
        return record

    def result_params(self) -> np.ndarray:
        """The adapter values that are evaluated and saved: theta, or its moving average."""
        avg = self.average.value() if self.average is not None else None
        if avg is None:
            return self.theta
        out = self.theta.copy()
        out[self.perturbations.index] = avg
        return out

    def evaluate(self) -> dict:
        if self.eval_plan is None:
            return {}
        start = time.perf_counter()
        params = self.result_params()
        if params is not self.theta:  # score the average, then leave the session at theta again
            self.session.set_params(params)
        s = self.session.score(self.eval_plan)
        if params is not self.theta:
            self.session.set_params(self.theta)
        dt = time.perf_counter() - start
        self.counters.eval_seconds += dt
        out = {"eval_loss": s.loss}
        if s.accuracy is not None:
            out["eval_accuracy"] = s.accuracy
        out["eval_seconds"] = round(dt, 4)
        return out

    # ----------------------------------------------------------------- loop
    def run(self, on_step=None, stop_after: int | None = None, evaluate_now=None) -> dict:
        """Train up to `config.steps` (or `stop_after` more steps), evaluating every `eval_every` steps, at the
        end, and after any step where `evaluate_now(counters)` is true (e.g. at points of simulated time),
        checkpointing every `checkpoint_every` steps and at the end. `on_step(record)` sees every metrics record."""
        c, k = self.config, self.counters
        if k.step == 0 and not self.run_dir.has_run:
            record = {"step": 0, "forward_passes": 0, "tokens": 0, "seconds": 0.0, **self.evaluate()}
            self.run_dir.append_metrics(record)
            self.checkpoint()
            if on_step:
                on_step(record)
        target = c.steps if stop_after is None else min(c.steps, k.step + stop_after)
        record = {}
        while k.step < target:
            record = self.train_step()
            if self.eval_plan is not None and (k.step == c.steps or (c.eval_every and k.step % c.eval_every == 0)
                                               or (evaluate_now is not None and evaluate_now(k))):
                record.update(self.evaluate())
            self.run_dir.append_metrics(record)
            if k.step == target or k.step % c.checkpoint_every == 0:
                self.checkpoint()
            if on_step:
                on_step(record)
            if self._consecutive_rejections >= c.max_rejections:
                if k.step % c.checkpoint_every:
                    self.checkpoint()
                raise UserError(f"training diverged: {self._consecutive_rejections} consecutive steps gave "
                                f"non-finite losses or updates (last at step {k.step}); lower --lr or --eps")
        return record

    # ----------------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        """Commit the current step: adapter and every array needed to continue bitwise, then state.json."""
        k = self.counters
        arrays = self.replica.state_dict()
        if self.average is not None:
            arrays.update(self.average.state_dict())
        meta = {**(self.inputs.to_dict() if self.inputs else {}),
                **({"calibration": self.calibration} if self.calibration else {})}
        state = {"kind": self.KIND, "counters": asdict(k), "config": asdict(self.config), "meta": meta,
                 "perturbations": self.perturbations.describe(), **self.extra_state()}
        result = self.result_params()
        self.run_dir.commit(k.step, self.adapter.with_params(self.theta), arrays, state,
                            result=None if result is self.theta else self.adapter.with_params(result),
                            result_extra={"ggfwd.average_decay": self.average.beta} if self.average else None)

    def extra_state(self) -> dict:
        return {}

    def resume(self) -> int:
        """Continue from the committed state in `rundir`; returns the step resumed at."""
        state = self.run_dir.read_state()
        if state.get("kind", "train") != self.KIND:
            raise UserError(f"{self.rundir} holds a '{state.get('kind')}' run, not a '{self.KIND}' run")
        adapter, arrays = self.run_dir.load_checkpoint(state)
        if adapter.params.size != self.theta.size:
            raise UserError("the checkpoint's adapter does not match this run's adapter layout")
        if "theta" not in arrays:
            raise UserError(f"{self.rundir} was written by an older ggfwd; its checkpoint cannot be resumed")
        self.replica.load_state_dict(arrays)
        if not np.array_equal(self.replica.theta, adapter.params):
            raise UserError(f"{self.rundir}: the checkpoint's adapter and state disagree; the run is damaged")
        if self.average is not None:
            self.average.load_state_dict(arrays)
        self.session.set_params(self.theta)
        self.counters = Counters(**state["counters"])
        if self.counters.step != self.replica.version:
            raise UserError(f"{self.rundir}: state.json and the checkpoint disagree on the step; the run is damaged")
        self.run_dir.truncate_metrics(self.counters.step)
        return self.counters.step

    @property
    def current_adapter(self) -> LoraAdapter:
        """The result so far: the trained adapter, or its moving average."""
        return self.adapter.with_params(self.result_params())
