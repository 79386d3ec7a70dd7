"""A client: one device's side of a round. It holds private data and a replica of the trained state.

`sync` brings the replica to the server's version, from a `Snapshot` or by replaying the broadcast rounds it
missed (`update.advance`, the same step the server runs). `work` draws the client's own batch for the round
(a pure function of run seed, round and client), scores the round's directions through the llama.cpp session
(`Estimator`) and returns a `Report` of float32 scalars and loss statistics.

Single-device training is the one-client case: its client shares the server's replica (co-located), so it
never needs a broadcast.
"""

from __future__ import annotations

import numpy as np

from .. import sampling
from ..estimator import Estimator, StepEstimate
from ..update import Replica, UpdateRule, advance
from .messages import Broadcast, Instruction, MessageError, Report, Snapshot, start_digest

_BATCH_STREAM = 0xBA7C4  # keeps batch sampling streams apart from perturbation streams


def batch_indices(seed: int, step: int, n: int, batch_size: int, client: int = 0) -> np.ndarray:
    """The examples (indices into a client's `n` examples) of round `step`: epochs are seeded permutations of
    the data, cut into batches. A pure function of (seed, step, n, batch_size, client); client 0 draws what
    single-device training always drew."""
    if batch_size >= n:
        return np.arange(n)
    per_epoch = n // batch_size
    epoch, j = divmod(step, per_epoch)
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, _BATCH_STREAM, epoch, client])))
    return np.sort(rng.permutation(n)[j * batch_size:(j + 1) * batch_size])


class NeedsAdapter(Exception):
    """The client cannot reach the instructed adapter version from what it holds: send it a Snapshot."""


class Client:
    def __init__(self, client_id: int, data, estimator: Estimator, seed: int, rule: UpdateRule, clip: float = 0.0,
                 replica: Replica | None = None, start: np.ndarray | None = None):
        self.id = int(client_id)
        self.data = data  # TokenizedData: this client's private examples
        self.estimator = estimator
        self.seed, self.rule, self.clip = seed, rule, clip
        self.replica = replica  # None until it joins (from round 0's broadcast or a snapshot)
        # The run's adapter at version 0, which the client builds itself (the base model's layout and the run's
        # seed): a joiner replays every broadcast from it, and a snapshot of trained values completes it.
        self.start = start
        self.track = False  # the run ranks candidates against the last update: a replica built here keeps it

    @property
    def version(self) -> int | None:
        return None if self.replica is None else self.replica.version

    # ----------------------------------------------------------------- catching up
    def sync(self, messages) -> int:
        """Apply a Snapshot and/or Broadcasts in order; returns how many rounds were replayed. A broadcast for
        another version than the replica's next one raises NeedsAdapter (nothing is applied)."""
        replayed = 0
        p = self.estimator.perturbations
        if self.replica is None and self.start is not None and not any(isinstance(m, Snapshot) for m in messages):
            self.replica = Replica(self.start, p.index, self.rule)  # a joiner replays from the start (version 0)
            if self.track:
                self.replica.track_updates()
        for message in messages:
            if isinstance(message, Snapshot):
                self.replica = replica_from_snapshot(message, p, self.rule, self.start)
            elif isinstance(message, Broadcast):
                if self.replica is None or message.round != self.replica.version:
                    raise NeedsAdapter(f"client {self.id} at version {self.version} got round {message.round}")
                advance(self.replica, p, message.round, message.entries(), self.clip, message.weights, message.ages)
                replayed += 1
            else:
                raise MessageError(f"a client cannot sync from a {type(message).__name__}")
        return replayed

    # ----------------------------------------------------------------- a round's work
    def check_start(self, instruction: Instruction) -> None:
        """A joiner's instruction names the server's version-0 adapter: refuse to replay from another one."""
        if instruction.start and (self.start is None or start_digest(self.start) != instruction.start):
            raise MessageError(f"client {self.id} builds another start adapter than the server's (another ggfwd "
                               "version, model or seed?): it cannot replay this run")

    def work(self, instruction: Instruction) -> tuple[Report, StepEstimate]:
        self.check_start(instruction)
        if self.replica is None and instruction.version == 0 and self.start is not None:
            self.sync([])
        if self.replica is None or self.replica.version != instruction.version:
            raise NeedsAdapter(f"client {self.id} is at version {self.version}, the round needs {instruction.version}")
        if instruction.eps != self.estimator.eps:
            raise MessageError(f"instruction eps {instruction.eps} differs from the run's {self.estimator.eps}")
        if instruction.spread and (instruction.candidates or self.estimator.scheme in ("forward", "centred")):
            raise MessageError("a batch per direction needs random directions and the central scheme")
        k = instruction.directions
        plan = ([self.batch_plan(instruction.round, instruction.batch_size, j, k) for j in range(k)]
                if instruction.spread else self.batch_plan(instruction.round, instruction.batch_size))
        if not instruction.candidates:
            est = self.estimator.estimate(self.replica.theta, plan, instruction.round, self.id,
                                          instruction.directions)
            indices = None
        else:
            est, indices = self._sampled(instruction, plan)
        losses = est.losses_plus if est.losses_minus is None else np.concatenate([est.losses_plus, est.losses_minus])
        report = Report(instruction.round, self.id, instruction.version, est.scalars, est.loss,
                        float(np.std(losses)), est.tokens, est.forward_passes, indices)
        return report, est

    def batch_plan(self, round_: int, batch_size: int, part: int = 0, parts: int = 1):
        """The scoring plan of this client's batch for a round (its tokens decide the round's cost); with
        `parts` batches in the round (one per direction), batch `part` of them: the client's epoch then advances
        `parts` batches a round."""
        batch = batch_indices(self.seed, round_ * parts + part, len(self.data), batch_size, self.id)
        return self.estimator.session.plan(self.data.subset(batch))

    def _sampled(self, instruction: Instruction, plan) -> tuple[StepEstimate, np.ndarray]:
        """Score K directions chosen among the instruction's candidates (ggfwd.sampling); a candidate drawn twice
        is scored once. The importance weights are folded into the scalars."""
        mode = {code: name for name, code in sampling.CODES.items()}.get(instruction.sampling)
        if mode in (None, "random") or instruction.directions > instruction.candidates:
            raise MessageError(f"instruction asks for {instruction.directions} of {instruction.candidates} "
                               f"candidates with sampling code {instruction.sampling}")
        self.replica.track_updates()
        cos = sampling.cosines(self.estimator.perturbations, instruction.round, self.id, instruction.candidates,
                               self.replica.last_update)
        indices, weights = sampling.choose(mode, cos, instruction.directions, self.seed, instruction.round, self.id)
        unique, inverse = np.unique(indices, return_inverse=True)
        est = self.estimator.estimate(self.replica.theta, plan, instruction.round, self.id, indices=unique)
        est.scalars = (est.scalars[inverse].astype(np.float64) * weights).astype(np.float32)
        return est, indices.astype(np.uint16)


def replica_from_snapshot(snapshot: Snapshot, perturbations, rule: UpdateRule, start: np.ndarray | None = None
                          ) -> Replica:
    """A replica from a snapshot: of the trained values (completed from the client's `start` adapter, whose
    untrained values no update changes) or of the whole adapter."""
    theta = snapshot.theta
    if theta.size == perturbations.n and start is not None and theta.size != perturbations.size:
        theta = np.array(start, dtype=np.float32, copy=True)
        theta[perturbations.index] = snapshot.theta
    if theta.size != perturbations.size:
        raise MessageError(f"snapshot holds {snapshot.theta.size} adapter values, this run's adapter has "
                           f"{perturbations.size} ({perturbations.n} trained)")
    replica = Replica(theta, perturbations.index, rule, snapshot.version)
    state = {"theta": theta, "version": np.asarray(snapshot.version), "optimizer.t": np.asarray(snapshot.steps),
             "optimizer.m": np.zeros(perturbations.n, np.float32)}  # plain SGD keeps no momentum: none is sent
    state.update({f"optimizer.{k}": v for k, v in snapshot.state.items() if k != "last_update"})
    if "last_update" in snapshot.state:  # the server tracks updates (candidate sampling): so must the client
        state["last_update"] = snapshot.state["last_update"]
    if snapshot.memory and replica.memory is None:
        raise MessageError("snapshot carries a client memory this run does not keep")
    state.update({f"memory.{k}": v for k, v in (snapshot.memory or {}).items()})
    try:
        replica.load_state_dict(state)
    except Exception as exc:  # a snapshot for another adapter layout or optimizer
        raise MessageError(f"snapshot does not fit this run: {exc}") from None
    return replica


def snapshot_of(replica: Replica) -> Snapshot:
    """What cannot be rebuilt from seeds: the trained values, the optimizer's state (none for plain SGD) and the
    client memory (its entries are seeds and scalars)."""
    opt = replica.optimizer
    state = opt.state_dict()
    stateless = opt.kind == "sgd" and not opt.momentum
    arrays = {k: np.asarray(v, np.float32) for k, v in state.items() if k != "t" and not (stateless and k == "m")}
    if replica.last_update is not None:
        arrays["last_update"] = replica.last_update.copy()
    memory = replica.memory.columns() if replica.memory is not None and len(replica.memory) else None
    return Snapshot(replica.version, replica.trained.copy(), arrays, int(state["t"]), memory)
