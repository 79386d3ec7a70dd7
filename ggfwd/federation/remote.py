"""The server's round loop when the clients are other processes or machines (driven by Flower's ServerApp).

It is the in-process federation's round with the clients behind a transport: the same `Server` (catch_up,
instruct, accept, close_round), the same seeded selection (`Federation.select`, with "online" meaning a node
that is connected now), the same evaluation, checkpoints and resume (`Trainer`). Only bytes cross the transport:
the records of `messages.encode`, and a small bounded JSON hello.

Nodes and client ids: a node answers a hello with the client id it holds (given with `ggfwd join --client-id`,
or the one it was assigned before) or -1; it is admitted under that id when the id is free and below
`clients`, else under the lowest free id. Its instruction carries the id, and the node keeps it. A node that
vanishes frees its id; a node whose reply misses the round's deadline is left out of the round (its work is
discarded), and the round closes at the deadline. A node that cannot reach the instructed adapter version
answers `need`; it is sent the adapter (a Snapshot) and the instruction again within the same deadline.

With `mode` "async" the round is replaced by asynchronous updates (remote_async.py): every node works back to back
and an update is applied per `clients_per_round` reports, stale ones weighted down, with the client memory.

The transport (`flower_app.FlowerTransport`; tests may use any other) has these methods:
- `nodes()`: the connected node ids;
- `exchange(kind, requests, timeout)`: send `{node: [bytes, ...]}` as messages of `kind` ("hello" or "train"),
  wait up to `timeout` seconds, return (`{node: Reply}` for the nodes that answered in time, `{node: bytes
  sent}` as the transport measured them);
- `send(kind, requests)` -> ({node: handle}, {node: bytes sent}) and `collect(handles, timeout)` -> {node: Reply}
  (the replies in, as soon as there is at least one or at the timeout): the two halves of `exchange`, used by
  asynchronous updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np

from ..clientmemory import MAX_STALENESS
from ..errors import UserError
from ..estimator import WEIGHTINGS
from ..trainer import Trainer
from .handshake import parse_hello
from .history import History
from .messages import MessageError, decode, snapshot_sizes, start_digest
from .server import Server
from .simulate import MODES

REPLY_KINDS = ("hello", "report", "need", "error")


@dataclass
class RemoteConfig:
    clients: int = 100  # client ids 0 .. clients-1 that nodes may hold (selection draws over all of them)
    clients_per_round: int = 4
    deadline: float = 300.0  # wall-clock seconds a round waits for reports
    max_lag: int = 1000  # most rounds a node replays from the history (when fewer bytes than a snapshot)
    min_nodes: int = 1  # nodes to wait for before the first round
    wait: float = 600.0  # seconds to wait for them
    weighting: str = "examples"  # clients' weights in an update (estimator.client_weights)
    mode: str = "sync"  # sync: rounds of selected nodes | async: nodes work back to back (remote_async.py)
    max_staleness: int = 0  # > 0: reports (and memory entries) count while at most this many updates old
    client_memory: bool = True  # with max_staleness: every update reuses each client's latest report

    def check(self) -> None:
        if self.clients < 1:
            raise UserError(f"--clients must be >= 1, got {self.clients}")
        if not 1 <= self.clients_per_round <= self.clients:
            raise UserError(f"--clients-per-round must lie in [1, {self.clients}], got {self.clients_per_round}")
        if not (self.deadline > 0 and math.isfinite(self.deadline)):
            raise UserError(f"--deadline must be a positive number of seconds, got {self.deadline}")
        if self.max_lag < 0:
            raise UserError(f"--max-lag must be >= 0, got {self.max_lag}")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got '{self.weighting}'")
        if not 1 <= self.min_nodes <= self.clients:
            raise UserError(f"--min-nodes must lie in [1, {self.clients}], got {self.min_nodes}")
        if not self.wait >= 0:
            raise UserError(f"--wait must be >= 0 seconds, got {self.wait}")
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if not 0 <= self.max_staleness <= MAX_STALENESS:
            raise UserError(f"--max-staleness must lie in [0, {MAX_STALENESS}], got {self.max_staleness}")
        if self.mode == "async" and self.max_staleness < 1:
            raise UserError("--mode async needs --max-staleness >= 1 (how many updates old a report may be)")

    def stale(self) -> dict:
        """The update rule's staleness settings, which every replica (server and nodes) follows."""
        return {"max_staleness": self.max_staleness, "client_memory": self.client_memory}


@dataclass
class Reply:
    kind: str  # one of REPLY_KINDS
    data: list = field(default_factory=list)  # bytes records
    wire: int = 0  # bytes of the Flower message that carried it (0: not measured)
    text: str = ""  # an error reply's reason


@dataclass
class Member:
    client: int
    version: int | None  # the adapter version the server believes the node holds
    profile: str = ""
    examples: int = 0


class RemoteFederation(Trainer):
    """`Trainer` whose step is a round over remote nodes. `train_data` is unused (the nodes hold the data)."""

    KIND = "flower"

    def __init__(self, session, adapter, config, rundir, eval_data=None, inputs=None, *, remote: RemoteConfig,
                 transport, log=print):
        remote.check()
        self.remote, self.transport, self.log = remote, transport, log
        super().__init__(session, adapter, [None], config, rundir, eval_data, inputs)

    def setup(self) -> None:
        c, r = self.config, self.remote
        self.allow_stale(r.max_staleness, r.client_memory)
        self.server = Server(self.replica, self.perturbations, c.clip, r.max_lag, r.weighting, {},
                             History(self.rundir), asynchronous=r.mode == "async")
        self.start_digest = start_digest(self.adapter.params)
        self.members: dict[int, Member] = {}  # node id -> member
        self.refused_nodes: dict[int, str] = {}

    # ----------------------------------------------------------------- nodes
    def admit(self, timeout: float | None = None) -> list[int]:
        """Greet the nodes that connected since the last round, forget those that left; returns new node ids."""
        present = set(self.transport.nodes())
        for node in [n for n in self.members if n not in present]:
            self.log(f"node {node} (client {self.members.pop(node).client}) left")
        for node in [n for n in self.refused_nodes if n not in present]:
            del self.refused_nodes[node]
        new = sorted(present - set(self.members) - set(self.refused_nodes))
        if not new:
            return []
        replies, _ = self.transport.exchange("hello", {n: [] for n in new}, timeout or min(60.0, self.remote.deadline))
        admitted = []
        for node in new:  # in node order, so that a tie over a wanted id is settled the same way every time
            reply = replies.get(node)
            if reply is None:
                continue  # asked again next round
            try:
                if reply.kind != "hello" or len(reply.data) != 1:
                    raise MessageError(reply.text or f"a '{reply.kind}' reply to a hello")
                hello = parse_hello(reply.data[0])
            except MessageError as exc:
                self.refused_nodes[node] = str(exc)
                self.log(f"node {node} refused: {exc}")
                continue
            client = self._client_id(hello["client"])
            if client is None:
                self.refused_nodes[node] = f"no free client id for {hello['client']}"
                self.log(f"node {node} refused: client id {hello['client']} is taken or none is free")
                continue
            version = hello["version"] if hello["version"] >= 0 and hello["client"] == client else None
            self.members[node] = Member(client, version, hello["profile"], hello["examples"])
            admitted.append(node)
            self.log(f"node {node} joined as client {client} ({hello['profile'] or 'no profile'}, "
                     f"{hello['examples']} examples, adapter version {version})")
        return admitted

    def _client_id(self, wanted: int) -> int | None:
        taken = {m.client for m in self.members.values()}
        if 0 <= wanted < self.remote.clients:
            return None if wanted in taken else wanted
        return next((i for i in range(self.remote.clients) if i not in taken), None)

    def wait_for_nodes(self) -> None:
        end = time.monotonic() + self.remote.wait
        while True:
            self.admit()
            if len(self.members) >= self.remote.min_nodes:
                return
            if time.monotonic() > end:
                raise UserError(f"{len(self.members)} of the {self.remote.min_nodes} nodes asked for joined within "
                                f"{self.remote.wait:.0f} s")
            time.sleep(0.5)

    # ----------------------------------------------------------------- one round
    def select(self, round_: int) -> list[int]:
        """The in-process federation's seeded selection, with 'online' meaning a connected node holds the id."""
        from .simulate import Federation

        held = {m.client for m in self.members.values()}
        on, off = SimpleNamespace(availability=1.0), SimpleNamespace(availability=0.0)
        view = SimpleNamespace(config=self.config,
                               fed=SimpleNamespace(clients=self.remote.clients,
                                                   clients_per_round=self.remote.clients_per_round),
                               profiles=[on if i in held else off for i in range(self.remote.clients)],
                               misses=None)  # no down-weighting of clients that missed deadlines
        _, selected, _ = Federation.select(view, round_)
        return selected

    def train_step(self) -> dict:
        c, r = self.config, self.counters.step
        wall = time.perf_counter()
        end = time.monotonic() + self.remote.deadline
        self.admit()
        selected = self.select(r)
        node_of = {m.client: node for node, m in self.members.items()}
        requests, down, snap_bytes, snapshots, joiners, join_bytes = {}, {}, 0, 0, [], {}
        for client in selected:
            node = node_of[client]
            version = self.members[node].version
            catch_up = self.server.catch_up(version)
            if version is None:  # a joiner: the history of broadcasts (nothing at round 0), or a snapshot
                joiners.append(client)
                join_bytes[client] = sum(map(len, catch_up))
            instruction = self.server.instruct(r, client, c.directions, c.batch_size, c.eps, self.remote.deadline,
                                               start=self.start_digest if version is None else 0,
                                               spread=int(c.spread == "batches"))
            requests[node] = catch_up + [instruction]
        replies, sent = self.transport.exchange("train", requests, max(0.0, end - time.monotonic()))
        # nodes that cannot reach the instructed version get the adapter and the instruction again
        need = [n for n, rep in replies.items() if rep.kind == "need"]
        if need:
            again = {n: [self.server.snapshot(), requests[n][-1]] for n in need}
            for n in need:
                self.log(f"round {r}: node {n} (client {self.members[n].client}) asked for the adapter")
                requests[n] = requests[n] + again[n]
                del replies[n]
            later, sent_again = self.transport.exchange("train", again, max(0.0, end - time.monotonic()))
            replies.update(later)
            for n, b in sent_again.items():
                sent[n] = sent.get(n, 0) + b
        accepted, refused, lost, scalars, losses = [], {}, [], {}, []
        passes = tokens = up = 0
        wire_down, wire_up = {}, {}
        for client in selected:
            node = node_of[client]
            down[client] = sum(map(len, requests[node]))
            snaps = snapshot_sizes(requests[node])
            snapshots += len(snaps)
            snap_bytes += sum(snaps)
            wire_down[client] = sent.get(node, 0)
            reply = replies.get(node)
            if reply is None:  # late or gone: its work is discarded; the version we believe it holds stays
                lost.append(client)
                continue
            wire_up[client] = reply.wire
            try:
                if reply.kind != "report" or len(reply.data) != 1:
                    raise MessageError(reply.text or f"a '{reply.kind}' reply to an instruction")
                up += len(reply.data[0])
                report = decode(reply.data[0])
                accepted.append(self.server.accept(reply.data[0]))
            except MessageError as exc:
                refused[str(client)] = str(exc)
                continue
            self.members[node].version = r
            passes += report.passes
            tokens += report.tokens
            losses.append(report.loss)
            scalars[str(client)] = [float(x) for x in report.scalars]
        self.server.examples = {m.client: m.examples for m in self.members.values()}  # for --weighting examples
        _, agg, reason = self.server.close_round(r, accepted)
        record = {"step": r + 1, "nodes": len(self.members), "selected": selected,
                  "accepted": [cs[0] for cs in accepted], "scalars": scalars,
                  "lr": self.replica.optimizer.lr_at(r) * self.replica.rule.lr_scale(agg.effective),
                  "eps": c.eps, "bytes_up": up, "bytes_down": sum(down.values()), "snapshot_bytes": snap_bytes,
                  "snapshots": snapshots, "joiners": joiners, "join_bytes": sum(join_bytes.values()),
                  "wire_up": {str(i): v for i, v in wire_up.items()},
                  "wire_down": {str(i): v for i, v in wire_down.items()},
                  "round_seconds": round(time.perf_counter() - wall, 4), "clipped": agg.clipped}
        return self.close_update(record, lost, refused, losses, reason, passes, tokens, wall)

    def close_update(self, record, lost, refused, losses, reason, passes, tokens, wall) -> dict:
        """Count the update's bytes (`record`'s bytes_up and bytes_down), add what was lost, refused and the mean
        training loss to its record, and close the step."""
        k = self.counters
        k.bytes_up += record["bytes_up"]
        k.bytes_down += record["bytes_down"]
        if lost:
            record["lost"] = lost
        if refused:
            record["refused"] = refused
        if losses:
            record["loss"] = float(np.mean(losses))
        record.update(total_bytes_up=k.bytes_up, total_bytes_down=k.bytes_down)
        return self.close_step(record, reason, passes, tokens, wall)

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict:
        return {"remote": asdict(self.remote)}

    def resume(self) -> int:
        state = self.run_dir.read_state()
        if state.get("kind") != self.KIND:
            raise UserError(f"{self.rundir} holds a '{state.get('kind', 'train')}' run, not a Flower federation")
        step = super().resume()  # nodes are greeted again and catch up from the history kept in the run folder
        self.server.history.load(step)
        return step
