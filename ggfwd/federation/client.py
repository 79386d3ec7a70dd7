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
from .messages import Broadcast, Instruction, MessageError, Report, Snapshot

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
                 replica: Replica | None = None):
        self.id = int(client_id)
        self.data = data  # TokenizedData: this client's private examples
        self.estimator = estimator
        self.seed, self.rule, self.clip = seed, rule, clip
        self.replica = replica  # None until a snapshot arrives (a client that has not joined yet)

    @property
    def version(self) -> int | None:
        return None if self.replica is None else self.replica.version

    # ----------------------------------------------------------------- catching up
    def sync(self, messages) -> int:
        """Apply a Snapshot and/or Broadcasts in order; returns how many rounds were replayed. A broadcast for
        another version than the replica's next one raises NeedsAdapter (nothing is applied)."""
        replayed = 0
        for message in messages:
            if isinstance(message, Snapshot):
                self.replica = replica_from_snapshot(message, self.estimator.perturbations, self.rule)
            elif isinstance(message, Broadcast):
                if self.replica is None or message.round != self.replica.version:
                    raise NeedsAdapter(f"client {self.id} at version {self.version} got round {message.round}")
                advance(self.replica, self.estimator.perturbations, message.round, message.entries(), self.clip)
                replayed += 1
            else:
                raise MessageError(f"a client cannot sync from a {type(message).__name__}")
        return replayed

    # ----------------------------------------------------------------- a round's work
    def work(self, instruction: Instruction) -> tuple[Report, StepEstimate]:
        if self.replica is None or self.replica.version != instruction.version:
            raise NeedsAdapter(f"client {self.id} is at version {self.version}, the round needs {instruction.version}")
        if instruction.eps != self.estimator.eps:
            raise MessageError(f"instruction eps {instruction.eps} differs from the run's {self.estimator.eps}")
        plan = self.batch_plan(instruction.round, instruction.batch_size)
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

    def batch_plan(self, round_: int, batch_size: int):
        """The scoring plan of this client's batch for a round (its tokens decide the round's cost)."""
        batch = batch_indices(self.seed, round_, len(self.data), batch_size, self.id)
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


def replica_from_snapshot(snapshot: Snapshot, perturbations, rule: UpdateRule) -> Replica:
    if snapshot.theta.size != perturbations.size:
        raise MessageError(f"snapshot holds {snapshot.theta.size} adapter values, this run's adapter has "
                           f"{perturbations.size}")
    replica = Replica(snapshot.theta, perturbations.index, rule, snapshot.version)
    state = {"theta": snapshot.theta, "version": np.asarray(snapshot.version),
             "optimizer.t": np.asarray(snapshot.steps)}
    state.update({f"optimizer.{k}": v for k, v in snapshot.state.items() if k != "last_update"})
    if "last_update" in snapshot.state:  # the server tracks updates (candidate sampling): so must the client
        state["last_update"] = snapshot.state["last_update"]
    try:
        replica.load_state_dict(state)
    except Exception as exc:  # a snapshot for another adapter layout or optimizer
        raise MessageError(f"snapshot does not fit this run: {exc}") from None
    return replica


def snapshot_of(replica: Replica) -> Snapshot:
    state = replica.optimizer.state_dict()
    arrays = {k: np.asarray(v, np.float32) for k, v in state.items() if k != "t"}
    if replica.last_update is not None:
        arrays["last_update"] = replica.last_update.copy()
    return Snapshot(replica.version, replica.theta.copy(), arrays, int(state["t"]))
