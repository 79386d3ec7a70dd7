"""Asynchronous rounds: every client works back to back at its own speed; nothing waits for the slowest device.

In a synchronous round (simulate.py) the server picks clients and waits for the last of them, so a fleet whose
devices are 200x apart in speed advances at the pace of its slowest member, and the fast devices idle. Here
(`--mode async`, FedBuff's shape, arXiv 2106.06639) each client is given a job as soon as it is free: K
directions (`--directions`, or the pacer's count) on the newest adapter version, on the next batch of its own
data. The server applies an update as soon as `clients_per_round` reports have arrived since the last one; a
report computed on an older version still counts while it is at most `max_staleness` updates old, at a reduced
weight, and is refused after that (the work is lost and the client gets a new job).

Two rules keep the slow devices' data in the model under label skew (CA2FL, ICLR 2024):
- the client memory (clientmemory.py, MIFA): every update averages the latest report of every client that
  reported within the staleness limit, each client once at its client weight (examples by default) times
  1 / sqrt(1 + age), so a device that reports rarely still counts in every update until its report is too old;
- a client reports at most once per update: after it reports it waits until the update is applied and then
  starts its next job on the new version (at most one update's wait, and no second report that would push its
  first out of the memory before it was used).

A job's identity is (client, the version it computes on): a client reports at most once per version, so that
seeds its batch and its directions as in a synchronous round, and the broadcast carries each report's age (the
updates since its version), from which every replica rebuilds the same directions and weights (`update.advance`).

Simulated time is an event clock: a job started at t on version v arrives at t + its duration on the client's
profile (clock.client_time: its catch-up download, the passes it scored, its report, latency). The job's scores
are computed when it starts (on version v, which is what the device would score). Availability: when a client is
free, a seeded draw says whether it is online; if not, it comes back after the time its job would have taken.
Dropout: a started job is lost with probability `dropout` (nothing is scored; the client is busy for its
predicted duration and then starts again). Hostile clients misbehave as in the synchronous federation; NaN is
refused at the server, the clip bounds the rest (also their memory entries, which the clip limits at every
update they are part of).

Kill and resume stay bitwise, the event clock included: the jobs in flight (their report bytes and arrival
times), each client's free time, availability draws and replica version, and the server's open instructions are
part of the checkpoint (the clients' replicas are rebuilt from the history on resume, at no simulated cost);
the client memory is part of the replica.
"""

from __future__ import annotations

import base64
import time

import numpy as np

from .. import sampling
from .clock import client_time
from .messages import MessageError, Snapshot, decode, encode
from .simulate import Federation

_AVAIL_STREAM = 0xA5A11
_DROP_STREAM = 0xD50F
MAX_ROUND_SECONDS = 1e7  # simulated: an update that cannot gather its reports in this long closes with what it has


class AsyncFederation(Federation):
    """`Federation` whose step is one asynchronous update (see the module docstring)."""

    def setup(self) -> None:
        super().setup()
        n = self.fed.clients
        self.jobs: dict[int, dict] = {}  # client -> job in flight
        self.free_at = [0.0] * n  # when an idle client may start its next job
        self.tries = [0] * n  # each client's availability draws so far
        self.waiting: set[int] = set()  # clients that reported since the last update

    def _draw(self, stream: int, client: int, k: int) -> float:
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.config.seed, stream, client, k])))
        return float(rng.random())

    # ----------------------------------------------------------------- a job
    def start_job(self, i: int, now: float, events: dict) -> None:
        """Client i is free at `now`: go offline for a while, or take a job on the current version."""
        c, f = self.config, self.fed
        client, profile = self.clients[i], self.profiles[i]
        count = self.pacer.count if self.pacer is not None else c.directions
        self.tries[i] += 1
        if self._draw(_AVAIL_STREAM, i, self.tries[i]) >= profile.availability:
            self.free_at[i] = now + self.cost(i, self.server.version, 0).seconds(count)  # away for about one job
            events["offline"] = events.get("offline", 0) + 1
            return
        r = self.server.version
        catch_up = self.server.catch_up(client.version)
        candidates = (min(f.candidates, 0xFFFF), sampling.CODES[f.sampling]) if f.sampling != "random" else (0, 0)
        start = self.start_digest if client.version is None else 0
        instruction = self.server.instruct(r, i, min(count, f.candidates) if candidates[0] else count, c.batch_size,
                                           c.eps, float("inf"), *candidates, start,
                                           spread=int(c.spread == "batches"))
        down = sum(map(len, catch_up)) + len(instruction)
        messages = [decode(m) for m in catch_up]
        if client.version is None:
            events["joined"] += 1
            events["join_bytes"] += sum(map(len, catch_up))
        else:
            events["snapshot_bytes"] += sum(len(raw) for raw, m in zip(catch_up, messages) if isinstance(m, Snapshot))
        client.sync(messages)
        events["bytes_down"] += down
        if self._draw(_DROP_STREAM, i, self.tries[i]) < f.dropout:  # lost: nothing scored, the time is spent
            self.free_at[i] = now + self.cost(i, r, down).seconds(count)
            events["dropped"].append(i)
            return
        report, est = client.work(decode(instruction))
        self._misbehave(i, report)
        data = encode(report)
        t = client_time(profile, self.model_stats, down, len(data), est.tokens, est.forward_passes,
                        outputs=min(c.batch_size, len(client.data)))
        events["passes"] += est.forward_passes
        events["tokens"] += est.tokens
        events["started"] += 1
        self.jobs[i] = {"arrival": now + t.total, "data": data, "version": r, "loss": est.loss,
                        "seconds": t.total, "directions": int(report.scalars.size)}

    # ----------------------------------------------------------------- one update
    def train_step(self) -> dict:
        c, f, k = self.config, self.fed, self.counters
        r = k.step
        wall = time.perf_counter()
        began = now = k.sim_seconds
        events = {"dropped": [], "refused": {}, "joined": 0, "join_bytes": 0, "snapshot_bytes": 0, "bytes_down": 0,
                  "passes": 0, "tokens": 0, "started": 0}
        accepted, arrivals, up = [], {}, 0
        while len(accepted) < f.clients_per_round and now - began < MAX_ROUND_SECONDS:
            for i in range(f.clients):  # every free client takes a job at once
                if i not in self.jobs and i not in self.waiting and self.free_at[i] <= now:
                    self.start_job(i, now, events)
            upcoming = [(job["arrival"], i) for i, job in self.jobs.items()]
            upcoming += [(self.free_at[i], i) for i in range(f.clients)
                         if i not in self.jobs and i not in self.waiting and self.free_at[i] > now]
            if not upcoming:
                break
            now, i = min(upcoming)
            job = self.jobs.pop(i, None) if self.jobs.get(i, {}).get("arrival") == now else None
            if job is None:
                continue  # client i comes back online at `now`: it takes a job on the next pass
            up += len(job["data"])
            try:
                accepted.append(self.server.accept(job["data"]))
            except MessageError as exc:  # too stale, or refused: the client starts again at once
                events["refused"][str(i)] = str(exc)
                self.free_at[i] = now
                continue
            self.waiting.add(i)
            arrivals[str(i)] = {"age": r - job["version"], "seconds": round(job["seconds"], 4),
                                "directions": job["directions"], "loss": job["loss"]}
        _, agg, reason = self.server.close_round(r, accepted)
        for i in self.waiting:  # they start on the new version at once
            self.free_at[i] = now
        self.waiting.clear()
        plan = {}
        if self.pacer is not None:
            losses = [a["loss"] for a in arrivals.values()]
            plan["pacing"] = self.pacer.update(float(np.mean(losses)) if losses else None)
        k.bytes_up += up
        k.bytes_down += events["bytes_down"]
        k.sim_seconds = now
        record = {"step": r + 1, "round_seconds": now - began, "sim_seconds": round(now, 4),
                  "accepted": [cs[0] for cs in accepted], "arrivals": arrivals,
                  "scalars": {str(cs[0]): [float(x) for x in cs[1]] for cs in accepted}, "eps": c.eps,
                  "effective_directions": round(agg.effective, 4),
                  "lr": self.replica.optimizer.lr_at(r) * self.replica.rule.lr_scale(agg.effective),
                  "update_shares": self.server.last_shares, "jobs_started": events["started"],
                  "bytes_up": up, "bytes_down": events["bytes_down"], "snapshot_bytes": events["snapshot_bytes"],
                  "join_bytes": events["join_bytes"], "clipped": agg.clipped, **plan,
                  **{key: events[key] for key in ("dropped", "refused", "joined", "offline") if events.get(key)}}
        if arrivals:
            record["loss"] = float(np.mean([a["loss"] for a in arrivals.values()]))
        record.update(total_bytes_up=k.bytes_up, total_bytes_down=k.bytes_down)
        return self.close_step(record, reason, events["passes"], events["tokens"], wall)

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict:
        out = super().extra_state()
        out["asynchronous"] = {
            "jobs": {str(i): {**job, "data": base64.b64encode(job["data"]).decode()} for i, job in self.jobs.items()},
            "free_at": self.free_at, "tries": self.tries, "versions": [cl.version for cl in self.clients],
            "instructions": {str(i): base64.b64encode(data).decode() for i, data in self.server.open_jobs().items()}}
        return out

    def resume(self) -> int:
        step = super().resume()
        state = self.run_dir.read_state().get("asynchronous")
        if state is None:
            raise ValueError("an asynchronous federation's checkpoint lacks its jobs in flight")
        self.jobs = {int(i): {**job, "data": base64.b64decode(job["data"])} for i, job in state["jobs"].items()}
        self.free_at = [float(x) for x in state["free_at"]]
        self.tries = [int(x) for x in state["tries"]]
        self.waiting = set()
        self.server.reopen_jobs({int(i): base64.b64decode(b) for i, b in state["instructions"].items()})
        # The devices did not restart with the simulator: each client's replica is rebuilt, free of simulated time
        # and bytes, at the version it held, so that the event clock (and with it the order of arrivals) continues
        # exactly as if the run had not stopped.
        history = self.server.history.since(0) or []
        for client, version in zip(self.clients, state["versions"]):
            if version is not None and version <= len(history):
                client.sync([decode(m) for m in history[:version]])
        return step

