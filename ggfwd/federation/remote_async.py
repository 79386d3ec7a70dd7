"""Asynchronous updates over remote nodes (`ggfwd serve --mode async`): the rules of the simulated asynchronous
federation (asynchronous.py) on real devices and a real clock.

Every connected node is given a job as soon as it is free: the catch-up to the newest version and an instruction
on it (`--directions` directions on its next batch). Replies are collected as they arrive (`transport.collect`);
the server applies an update as soon as `clients_per_round` reports were accepted since the last one (one per
connected node when fewer are connected). A report computed on an older version counts while it is at most
`max_staleness` updates old, its age in the broadcast (staleness weight; the client memory keeps it for later
updates); an older one is refused and the node gets a new job at once. A node that reported waits for the update
and then starts on the new version, so each client counts once per update. A job whose reply has not come within
`deadline` seconds is lost: its instruction is dropped and the node is given a new one (Flower queues it behind the
one the node may still be working on). An update that cannot gather its reports closes at the deadline with what
it has. A node whose reply is an error waits for the next update before it is given work again.

Unlike the simulation, arrivals come in the order the machines produce them, so two runs differ. What stays exact
is that every replica (the server's, each node's, and a replay of the run's history) holds the same values at every
version: an update is a broadcast of seeds, scalars, weights and ages. Jobs in flight when the server stops are
lost (a reply to the previous server's instruction is refused); after a restart every node gets a new job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .messages import MessageError, decode, snapshot_sizes
from .remote import RemoteFederation


@dataclass
class Job:
    handle: object  # the transport's id of the message
    client: int
    version: int  # the adapter version it computes on
    sent: float  # time.monotonic() when it was pushed


class RemoteAsyncFederation(RemoteFederation):
    """`RemoteFederation` whose step is one asynchronous update (see the module docstring)."""

    def setup(self) -> None:
        super().setup()
        self.jobs: dict[int, Job] = {}  # node -> its job in flight
        self.waiting: set[int] = set()  # nodes that reported since the last update, or whose reply was an error
        self.need: set[int] = set()  # nodes that asked for the adapter: their next job carries a snapshot
        self.pending: dict[int, tuple] = {}  # node -> (reply, arrival time) collected but not yet read

    def give_jobs(self, nodes: list[int], events: dict, snapshot: frozenset = frozenset()) -> None:
        """A job for each of `nodes` on the current version; those in `snapshot` get the adapter with it."""
        c, r = self.config, self.server.version
        requests = {}
        for node in nodes:
            m = self.members[node]
            catch_up = [self.server.snapshot()] if node in snapshot else self.server.catch_up(m.version)
            if m.version is None:
                events["joiners"].append(m.client)
                events["join_bytes"] += sum(map(len, catch_up))
            instruction = self.server.instruct(r, m.client, c.directions, c.batch_size, c.eps, self.remote.deadline,
                                               start=self.start_digest if m.version is None else 0,
                                               spread=int(c.spread == "batches"))
            requests[node] = catch_up + [instruction]
        handles, sent = self.transport.send("train", requests)
        now = time.monotonic()
        for node, handle in handles.items():
            client = self.members[node].client
            self.jobs[node] = Job(handle, client, r, now)
            snaps = snapshot_sizes(requests[node])
            events["snapshots"] += len(snaps)
            events["snapshot_bytes"] += sum(snaps)
            events["bytes_down"] += sum(map(len, requests[node]))
            events["wire_down"][str(client)] = events["wire_down"].get(str(client), 0) + sent.get(node, 0)
            events["started"] += 1

    def train_step(self) -> dict:
        c, r = self.config, self.counters.step
        wall = time.perf_counter()
        end = time.monotonic() + self.remote.deadline
        self.admit()
        if not self.members:
            self.wait_for_nodes()
        for node in [n for n in self.jobs if n not in self.members]:  # the node left: its job is lost
            self.server.forget(self.jobs.pop(node).client)
            self.pending.pop(node, None)
        events = {"joiners": [], "join_bytes": 0, "snapshots": 0, "snapshot_bytes": 0, "bytes_down": 0,
                  "wire_down": {}, "started": 0}
        accepted, arrivals, refused, lost, scalars, wire_up = [], {}, {}, [], {}, {}
        passes = tokens = up = 0
        while True:
            free = [n for n in sorted(self.members) if n not in self.jobs and n not in self.waiting]
            if free:
                self.give_jobs(free, events, frozenset(self.need))
                self.need -= set(free)
            wanted = min(self.remote.clients_per_round, len(self.members))
            if len(accepted) >= wanted or not self.jobs or time.monotonic() >= end:
                break
            if not self.pending:  # read what has arrived first; collect more only when it is used up
                until = min([end] + [j.sent + self.remote.deadline for j in self.jobs.values()])
                replies = self.transport.collect({n: j.handle for n, j in self.jobs.items()}, until - time.monotonic())
                now = time.monotonic()
                self.pending.update({n: (reply, now) for n, reply in replies.items()})
            for node in sorted(self.pending):
                if len(accepted) >= wanted:  # the rest are read by the next update, one version older
                    break
                reply, arrived = self.pending.pop(node)
                job = self.jobs.pop(node)
                if reply.kind == "need":  # it cannot reach the version: the adapter and a new instruction
                    self.log(f"update {r}: node {node} (client {job.client}) asked for the adapter")
                    self.need.add(node)
                    continue
                try:
                    if reply.kind != "report" or len(reply.data) != 1:
                        raise MessageError(reply.text or f"a '{reply.kind}' reply to an instruction")
                    up += len(reply.data[0])
                    wire_up[str(job.client)] = wire_up.get(str(job.client), 0) + reply.wire
                    report = decode(reply.data[0])
                    self.members[node].version = job.version  # it caught up to the job's version
                    accepted.append(self.server.accept(reply.data[0]))
                except MessageError as exc:
                    refused[str(job.client)] = str(exc)
                    if reply.kind != "report":
                        self.waiting.add(node)  # an error: no new job before the next update
                    continue  # a refused report (too stale): a new job at once
                self.waiting.add(node)
                arrivals[str(job.client)] = {"age": r - job.version, "seconds": round(arrived - job.sent, 4),
                                             "directions": int(report.scalars.size), "loss": report.loss}
                scalars[str(job.client)] = [float(x) for x in report.scalars]
                passes += report.passes
                tokens += report.tokens
            now = time.monotonic()
            for node, job in list(self.jobs.items()):
                if node not in self.pending and now - job.sent >= self.remote.deadline:
                    # lost; the version we believe it holds stays
                    del self.jobs[node]
                    self.server.forget(job.client)
                    lost.append(job.client)
        self.server.examples = {m.client: m.examples for m in self.members.values()}  # for --weighting examples
        _, agg, reason = self.server.close_round(r, accepted)
        self.waiting.clear()
        record = {"step": r + 1, "nodes": len(self.members), "accepted": [cs[0] for cs in accepted],
                  "arrivals": arrivals, "scalars": scalars, "eps": c.eps,
                  "effective_directions": round(agg.effective, 4),
                  "lr": self.replica.optimizer.lr_at(r) * self.replica.rule.lr_scale(agg.effective),
                  "update_shares": self.server.last_shares, "jobs_started": events["started"],
                  "bytes_up": up, "bytes_down": events["bytes_down"], "snapshot_bytes": events["snapshot_bytes"],
                  "snapshots": events["snapshots"], "joiners": events["joiners"], "join_bytes": events["join_bytes"],
                  "wire_up": wire_up, "wire_down": events["wire_down"],
                  "round_seconds": round(time.perf_counter() - wall, 4), "clipped": agg.clipped}
        losses = [a["loss"] for a in arrivals.values()]
        return self.close_update(record, lost, refused, losses, reason, passes, tokens, wall)
