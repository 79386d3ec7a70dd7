"""The server's side of a round: what each client is sent, which reports are accepted, and the round step.

The server never trusts a report: it is decoded with bounds (`messages.decode`), and refused unless it answers
this round's instruction to that client (round, version, client, direction count) with finite scalars. The
accepted reports, ordered by client, form the round's `Broadcast`; the server applies it with `update.advance`
(aggregate from seeds and scalars, then the update), exactly as every client replays it.

A client at version v needs the broadcasts of rounds v .. now-1, which the server keeps for `max_lag` rounds;
a client further behind, or one that has never joined, is sent a `Snapshot` instead (adapter values and
optimizer state). Both are counted as the client's download bytes.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..sampling import check_indices
from ..update import Replica, advance
from .client import snapshot_of
from .messages import Broadcast, Instruction, MessageError, Report, decode, encode


class Server:
    def __init__(self, replica: Replica, perturbations, clip: float = 0.0, max_lag: int = 10):
        if max_lag < 0:
            raise ValueError("max_lag must be >= 0")
        self.replica, self.perturbations = replica, perturbations
        self.clip, self.max_lag = clip, max_lag
        self._history: OrderedDict[int, bytes] = OrderedDict()  # round -> encoded Broadcast
        self._expected: dict[int, Instruction] = {}  # this round's instructions by client

    @property
    def version(self) -> int:
        return self.replica.version

    # ----------------------------------------------------------------- downlink
    def catch_up(self, client_version: int | None) -> list[bytes]:
        """The messages that bring a client at `client_version` (None: never joined) to the current version:
        the missed broadcasts, or a snapshot when it is too far behind or the broadcasts are gone."""
        now = self.version
        if client_version is not None and client_version > now:
            client_version = None  # a client ahead of the server (e.g. after a server restart): resend the state
        if client_version is not None and now - client_version <= self.max_lag and \
                all(r in self._history for r in range(client_version, now)):
            return [self._history[r] for r in range(client_version, now)]
        return [encode(snapshot_of(self.replica))]

    def instruct(self, round_: int, client: int, directions: int, batch_size: int, eps: float,
                 deadline: float = float("inf"), candidates: int = 0, sampling: int = 0) -> bytes:
        """The instruction for `client` this round. `candidates` > 0 with `sampling` (ggfwd.sampling.CODES):
        the client chooses its directions among that many candidates and reports their indices."""
        if round_ != self.version:
            raise ValueError(f"server is at version {self.version}, cannot instruct round {round_}")
        instruction = Instruction(round_, self.version, client, directions, batch_size, eps, deadline,
                                  candidates, sampling)
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
        del self._expected[report.client]  # one report per client and round
        if instruction.candidates:
            return report.client, report.scalars, report.indices
        return report.client, report.scalars

    # ----------------------------------------------------------------- the round step
    def close_round(self, round_: int, accepted: list[tuple]):
        """Apply the round from the accepted reports. Returns (encoded broadcast, Aggregate, rejection reason)."""
        if round_ != self.version:
            raise ValueError(f"server is at version {self.version}, cannot close round {round_}")
        broadcast = Broadcast.of(round_, sorted(accepted, key=lambda cs: cs[0]))
        data = encode(broadcast)
        agg, reason = advance(self.replica, self.perturbations, round_, broadcast.entries(), self.clip)
        self._history[round_] = data
        while len(self._history) > self.max_lag:
            self._history.popitem(last=False)
        self._expected.clear()
        return data, agg, reason
