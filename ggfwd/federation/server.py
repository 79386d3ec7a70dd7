"""The server's side of a round: what each client is sent, which reports are accepted, and the round step.

The server never trusts a report: it is decoded with bounds (`messages.decode`), and refused unless it answers
this round's instruction to that client (round, version, client, direction count) with finite scalars. The
accepted reports, ordered by client, form the round's `Broadcast`; the server applies it with `update.advance`
(aggregate from seeds and scalars, then the update), exactly as every client replays it.

Clients are weighted by `weighting` (`estimator.client_weights`: equal, by training examples, or by directions);
the weights travel in the broadcast when they are not equal, so every replica aggregates alike.

With client memory (`rule.max_staleness` > 0: ggfwd.clientmemory) a report computed on an older version is
accepted while it is at most `max_staleness` updates old, and its age travels in the broadcast. In asynchronous
runs (`asynchronous`) a client's instruction stays open across updates until it reports or its job is too stale.

A client at version v needs the broadcasts of rounds v .. now-1; one that never joined needs those of rounds
0 .. now-1 and builds version 0 itself. The server keeps every round's broadcast (`History`, also in the run
folder) and sends the missed ones when they are at most `max_lag` rounds and fewer bytes than a `Snapshot` (the
trained values and optimizer state), which it sends otherwise. Both are counted as the client's download bytes.
"""

from __future__ import annotations

import numpy as np

from ..clientmemory import staleness_weight
from ..estimator import client_weights
from ..sampling import check_indices
from ..update import Replica, advance
from .client import snapshot_of
from .history import History
from .messages import Broadcast, Instruction, MessageError, Report, decode, encode


class Server:
    def __init__(self, replica: Replica, perturbations, clip: float = 0.0, max_lag: int = 1000,
                 weighting: str = "equal", examples=None, history: History | None = None, asynchronous: bool = False):
        if max_lag < 0:
            raise ValueError("max_lag must be >= 0")
        # asynchronous: a client's job outlives the round it was given in, and its report counts while it is at
        # most the replica's max_staleness updates old (client memory)
        self.asynchronous = asynchronous
        self.max_staleness = replica.rule.max_staleness
        self.replica, self.perturbations = replica, perturbations
        self.clip, self.max_lag = clip, max_lag
        self.weighting, self.examples = weighting, examples  # examples: client id -> training examples
        self.history = history if history is not None else History()  # load it when resuming (History.load)
        self._expected: dict[int, Instruction] = {}  # each client's open instruction (sync: this round's)
        self._accepted: dict[int, Instruction] = {}  # instructions answered since the last update, by client
        self._snapshot: tuple[int, bytes] | None = None  # (version, encoded snapshot), made when first needed
        self.last_shares: dict[str, list] = {}  # the last update's weight by client (see `shares`)

    @property
    def version(self) -> int:
        return self.replica.version

    # ----------------------------------------------------------------- downlink
    def catch_up(self, client_version: int | None) -> list[bytes]:
        """The messages that bring a client at `client_version` (None: never joined) to the current version:
        the missed broadcasts (from round 0 for a joiner), or a snapshot when they are gone, more than `max_lag`
        rounds or more bytes than the snapshot."""
        now = self.version
        if client_version is not None and client_version > now:
            client_version = None  # a client ahead of the server (e.g. after a server restart): start it again
        start = 0 if client_version is None else client_version
        held = self.history.end == now and now - start <= self.max_lag
        missed = self.history.since(start) if held else None
        if missed is not None:
            size = sum(map(len, missed))
            # a snapshot holds at least 4 bytes per trained value: encode one only when the history might be larger
            if size < 4 * self.perturbations.n or size < len(self.snapshot()):
                return list(missed)  # nothing at all for a joiner at version 0: it starts from its own adapter
        return [self.snapshot()]

    def snapshot(self) -> bytes:
        """The encoded snapshot of the current version (made once per version)."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, encode(snapshot_of(self.replica)))
        return self._snapshot[1]

    def instruct(self, round_: int, client: int, directions: int, batch_size: int, eps: float,
                 deadline: float = float("inf"), candidates: int = 0, sampling: int = 0, start: int = 0,
                 spread: int = 0) -> bytes:
        """The instruction for `client` this round. `candidates` > 0 with `sampling` (ggfwd.sampling.CODES):
        the client chooses its directions among that many candidates and reports their indices. `start`: for a
        joiner, the digest of the version-0 adapter it must have built (`messages.start_digest`). `spread` 1: a
        batch of the client's data per direction."""
        if round_ != self.version:
            raise ValueError(f"server is at version {self.version}, cannot instruct round {round_}")
        instruction = Instruction(round_, self.version, client, directions, batch_size, eps, deadline, candidates,
                                  sampling, start, spread)
        self._expected[client] = instruction
        return encode(instruction)

    # ----------------------------------------------------------------- uplink
    def accept(self, data: bytes) -> tuple:
        """(client, scalars) of a valid report for this round, or (client, scalars, indices) when the round
        sampled candidates; MessageError (one line) otherwise."""
        report = decode(data, Report)
        instruction = self._expected.get(report.client)
        if instruction is None:
            raise MessageError(f"report from client {report.client}, which was not instructed this round")
        if report.round != instruction.round or report.version != instruction.version:
            raise MessageError(f"client {report.client} reported round {report.round} at version {report.version}; "
                               f"the round is {instruction.round} at version {instruction.version}")
        if self.version - report.version > self.max_staleness:
            del self._expected[report.client]
            raise MessageError(f"client {report.client}'s report of version {report.version} is "
                               f"{self.version - report.version} updates old (at most {self.max_staleness})")
        if report.client in self._accepted:
            raise MessageError(f"client {report.client} already reported since the last update")
        if report.scalars.size != instruction.directions:
            raise MessageError(f"client {report.client} sent {report.scalars.size} scalars for "
                               f"{instruction.directions} directions")
        if not np.all(np.isfinite(report.scalars)):
            raise MessageError(f"client {report.client} sent non-finite scalars")
        if instruction.candidates:
            why = check_indices(report.indices, instruction.directions, instruction.candidates, instruction.sampling)
            if why:
                raise MessageError(f"client {report.client}: {why}")
        elif report.indices is not None:
            raise MessageError(f"client {report.client} sent candidate indices it was not asked for")
        self._accepted[report.client] = self._expected.pop(report.client)  # one report per instruction
        if instruction.candidates:
            return report.client, report.scalars, report.indices
        return report.client, report.scalars

    def shares(self, step: int, broadcast: Broadcast) -> dict[str, list]:
        """Each client's share of update `step` and the age of what it counted with: {"client": [share, age]}
        (with client memory, every entry within the staleness limit; otherwise the round's usable reports)."""
        memory = self.replica.memory
        if memory is not None:
            w = {c: e.weight * staleness_weight(step - e.version) for c, e in memory.entries.items()
                 if step - e.version <= memory.max_staleness}
            ages = {c: step - e.version for c, e in memory.entries.items()}
        else:
            entries = broadcast.entries()
            weights = [1.0] * len(entries) if broadcast.weights is None else [float(x) for x in broadcast.weights]
            age = [0] * len(entries) if broadcast.ages is None else [int(a) for a in broadcast.ages]
            w = {e[0]: weights[j] * staleness_weight(age[j]) for j, e in enumerate(entries) if np.all(np.isfinite(e[1]))}
            ages = {e[0]: age[j] for j, e in enumerate(entries)}
        total = sum(w.values()) or 1.0
        return {str(c): [round(v / total, 4), ages[c]] for c, v in sorted(w.items())}

    def forget(self, client: int) -> None:
        """Drop `client`'s open instruction (its job was lost): a report answering it is refused."""
        self._expected.pop(client, None)

    def open_jobs(self) -> dict[int, bytes]:
        """The instructions not answered yet, encoded, by client (an asynchronous run checkpoints them)."""
        return {c: encode(ins) for c, ins in sorted(self._expected.items())}

    def reopen_jobs(self, jobs: dict[int, bytes]) -> None:
        self._expected = {int(c): decode(data, Instruction) for c, data in jobs.items()}

    # ----------------------------------------------------------------- the round step
    def close_round(self, round_: int, accepted: list[tuple]):
        """Apply the round from the accepted reports. Returns (encoded broadcast, Aggregate, rejection reason)."""
        if round_ != self.version:
            raise ValueError(f"server is at version {self.version}, cannot close round {round_}")
        reports = sorted(accepted, key=lambda cs: cs[0])
        ages = [round_ - self._accepted[r[0]].version if r[0] in self._accepted else 0 for r in reports]
        population = list(self.examples.values()) if self.max_staleness and self.examples else None
        weights = client_weights(self.weighting, reports, self.examples, population=population)
        broadcast = Broadcast.of(round_, reports, weights, ages)
        data = encode(broadcast)
        agg, reason = advance(self.replica, self.perturbations, round_, broadcast.entries(), self.clip,
                              broadcast.weights, broadcast.ages)
        self.last_shares = self.shares(round_, broadcast)
        if self.history.end != round_:  # resumed without loading the history: it restarts here
            self.history.reset(round_)
        self.history.append(round_, data)
        self._accepted.clear()
        if not self.asynchronous:
            self._expected.clear()
        return data, agg, reason
