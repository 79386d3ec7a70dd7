"""The in-process federation: N clients in one process on one loaded model, with their own data, seeds,
replicas and simulated clocks, and the server's round loop.

It is `Trainer` (single-device training) with the round replaced: each round the server samples the online
clients, sends each its catch-up (missed broadcasts or a snapshot) and an instruction, every selected client
syncs its replica, scores its own batch and reports float32 scalars; the server accepts the valid, on-time
reports, closes the round with the shared step (`update.advance`), and the broadcast is what every client
replays later. All messages cross as bytes (`messages.encode/decode`), so the bytes counted are the bytes
Flower would carry.

Rules (documented in docs/federation.md):
- Availability: each client is online in a round with its profile's probability (a seeded draw per round).
- Dropout: a selected client that drops mid-round sends nothing; its partial work is discarded.
- Deadline: reports whose simulated arrival is after the round's deadline are discarded; the round then lasts
  until the deadline.
- Hostile clients (`hostile`): the last N clients send scalars x 1e6 (`scale`), NaN (`nan`) or with random
  signs (`signs`). NaN is refused at the server; `clip` bounds the others.
- A resumed simulation restarts its clients too: they rejoin with a snapshot (counted in the bytes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import sampling
from ..errors import UserError
from ..estimator import WEIGHTINGS, passes_per_step
from ..trainer import Trainer
from ..clientmemory import MAX_STALENESS
from .allocation import ALLOCATIONS, PACINGS, Cost, MissWeights, TrendPacer, VariancePacer, allocate
from .client import Client, NeedsAdapter
from .clock import client_time, round_time
from .history import History
from .messages import MAX_CANDIDATES, MAX_DIRECTIONS, MessageError, Snapshot, decode, encode, start_digest
from .partition import parse_spec, partition
from .server import Server

_SELECT_STREAM = 0x5E1EC7
_INSTRUCTION_BOUND = 256  # bytes: an instruction is about 120-150 (tested)
_REPORT_BOUND = 320  # bytes of a report beyond its 4-byte scalars and 2-byte indices (about 160; tested)
HOSTILE_KINDS = ("scale", "nan", "signs")
MODES = ("sync", "async")
# Settings a run folder written before they existed ran with: such a run resumes with these.
SAVED_BEFORE = {"weighting": "directions"}  # every direction alike, the rule before client balancing


@dataclass
class FedConfig:
    clients: int = 10
    clients_per_round: int = 4
    devices: str = ""  # "PROFILE:COUNT,..." (counts add up to `clients`); "" = every client on `default_device`
    default_device: str = "laptop-x86"
    partition: str = "dirichlet:0.5"
    deadline: float = 0.0  # simulated seconds per round; 0: wait for every selected client
    max_lag: int = 1000  # most rounds a client replays from broadcasts (when fewer bytes than a snapshot)
    weighting: str = "examples"  # clients' weights in a round's update: examples | equal | directions
    dropout: float = 0.0  # chance that a selected, online client drops mid-round
    hostile: str = ""  # "N:KIND": the last N clients misbehave (KIND: scale, nan, signs)
    # Time-to-accuracy (see allocation.py and sampling.py); the defaults keep the plain federation.
    allocation: str = "uniform"  # uniform | schedule (FwdLLM's 1-3-5-10) | speed (speed-aware, by deadline)
    pacing: str = "fixed"  # fixed | variance: the round's direction count follows the scalars' variance
    target: int = 0  # directions per round for `speed`/`variance` (0: clients_per_round x directions)
    max_directions: int = 16  # most directions one client is given in a round (speed-aware allocation)
    min_clients: int = 0  # speed-aware allocation with a target: the deadline lets at least this many finish one
    pacing_max: int = 64  # most directions per round the variance pacer may ask for
    downweight: float = 0.0  # > 0: sampling down-weights clients that miss deadlines (their miss count's decay)
    sampling: str = "random"  # random | discriminative | unbiased (directions among `candidates`)
    candidates: int = 64  # candidate directions per client and round for discriminative/unbiased sampling
    # Heterogeneous fleets (asynchronous.py, clientmemory.py)
    mode: str = "sync"  # sync: rounds of selected clients | async: clients work back to back, an update per
    #                     `clients_per_round` reports
    max_staleness: int = 0  # > 0: reports (and memory entries) count while at most this many updates old
    client_memory: bool = True  # with max_staleness: every update reuses each client's latest report

    def check(self) -> None:
        if self.clients < 1:
            raise UserError(f"--clients must be >= 1, got {self.clients}")
        if not 1 <= self.clients_per_round <= self.clients:
            raise UserError(f"--clients-per-round must lie in [1, {self.clients}], got {self.clients_per_round}")
        parse_spec(self.partition)
        if not (self.deadline >= 0):
            raise UserError(f"--deadline must be >= 0 seconds, got {self.deadline}")
        if self.max_lag < 0:
            raise UserError(f"--max-lag must be >= 0, got {self.max_lag}")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got '{self.weighting}'")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must lie in [0, 1), got {self.dropout}")
        self.hostile_clients()
        self.device_names()
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got '{self.allocation}'")
        if self.pacing not in PACINGS:
            raise UserError(f"--pacing must be one of {', '.join(PACINGS)}, got '{self.pacing}'")
        if self.sampling not in sampling.MODES:
            raise UserError(f"--sampling must be one of {', '.join(sampling.MODES)}, got '{self.sampling}'")
        if not 1 <= self.max_directions <= MAX_DIRECTIONS:
            raise UserError(f"--max-directions must lie in [1, {MAX_DIRECTIONS}], got {self.max_directions}")
        if not 0 <= self.min_clients <= self.clients_per_round:
            raise UserError(f"--min-clients must lie in [0, --clients-per-round {self.clients_per_round}], "
                            f"got {self.min_clients}")
        if not 0 <= self.target <= MAX_DIRECTIONS:
            raise UserError(f"--target must lie in [0, {MAX_DIRECTIONS}], got {self.target}")
        if not 1 <= self.pacing_max <= MAX_DIRECTIONS:
            raise UserError(f"--pacing-max must lie in [1, {MAX_DIRECTIONS}], got {self.pacing_max}")
        if not 0 <= self.downweight < 1:
            raise UserError(f"--downweight must lie in [0, 1), got {self.downweight}")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise UserError(f"--candidates must lie in [1, {MAX_CANDIDATES}], got {self.candidates}")
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if not 0 <= self.max_staleness <= MAX_STALENESS:
            raise UserError(f"--max-staleness must lie in [0, {MAX_STALENESS}], got {self.max_staleness}")
        if self.mode == "async":
            if self.max_staleness < 1:
                raise UserError("--mode async needs --max-staleness >= 1 (how many updates old a report may be)")
            if self.allocation != "uniform" or self.pacing == "variance" or self.deadline or self.downweight:
                raise UserError("--mode async gives every client --directions per job (or --pacing trend): it "
                                "cannot be combined with --allocation, --pacing variance, --deadline or --downweight")

    def device_names(self) -> list[str]:
        """One profile name per client, from the `devices` spec."""
        if not self.devices.strip():
            return [self.default_device] * self.clients
        names = []
        for item in self.devices.split(","):
            name, sep, count = item.strip().rpartition(":")
            if not sep or not name:
                raise UserError(f"--devices takes PROFILE:COUNT,...; got '{item.strip()}'")
            try:
                n = int(count)
            except ValueError:
                raise UserError(f"--devices count for '{name}' must be an integer, got '{count}'") from None
            if n < 1:
                raise UserError(f"--devices count for '{name}' must be >= 1, got {n}")
            names += [name] * n
        if len(names) != self.clients:
            raise UserError(f"--devices lists {len(names)} clients but --clients is {self.clients}")
        return names

    def hostile_clients(self) -> tuple[set[int], str]:
        if not self.hostile:
            return set(), ""
        count, _, kind = self.hostile.partition(":")
        try:
            n = int(count)
        except ValueError:
            raise UserError(f"--hostile takes N:KIND, got '{self.hostile}'") from None
        if kind not in HOSTILE_KINDS or not 1 <= n <= self.clients:
            raise UserError(f"--hostile takes N:KIND with 1 <= N <= --clients and KIND one of "
                            f"{', '.join(HOSTILE_KINDS)}; got '{self.hostile}'")
        return set(range(self.clients - n, self.clients)), kind


def check_federation(config, fed: FedConfig) -> None:
    """A federation's settings, and the rules between them and the training settings."""
    fed.check()
    if config.spread == "batches" and fed.sampling != "random":
        raise UserError("--spread batches scores random directions: it cannot be combined with --sampling")


class Federation(Trainer):
    """`Trainer` whose step is a federated round. Extra arguments: `fed` (FedConfig), `profiles` (client ->
    DeviceProfile) and `model_stats` (the base model's ModelStats for the speed model)."""

    KIND = "federate"

    def __init__(self, session, adapter, train_data, config, rundir, eval_data=None, inputs=None,
                 calibration=None, *, fed: FedConfig, profiles: list, model_stats):
        check_federation(config, fed)
        if len(profiles) != fed.clients:
            raise ValueError("one profile per client")
        self.fed, self.profiles, self.model_stats = fed, profiles, model_stats
        super().__init__(session, adapter, train_data, config, rundir, eval_data, inputs, calibration)

    def setup(self) -> None:
        c, f = self.config, self.fed
        labels = getattr(self.train_data, "labels", None)
        self.parts = partition(f.partition, labels, len(self.train_data), f.clients, c.seed)
        rule = self.rule = self.allow_stale(f.max_staleness, f.client_memory)
        # The clients take turns on the one loaded model, so they can share the estimator's buffers; their data,
        # replicas and seeds stay their own.
        self.clients = [Client(i, self.train_data.subset(part), self.estimator, c.seed, rule, c.clip,
                               start=self.adapter.params) for i, part in enumerate(self.parts)]
        for client in self.clients:
            client.track = f.sampling != "random"
        self.start_digest = start_digest(self.adapter.params)
        self.server = Server(self.replica, self.perturbations, c.clip, f.max_lag, f.weighting,
                             {i: len(part) for i, part in enumerate(self.parts)}, History(self.rundir),
                             asynchronous=f.mode == "async")
        self.hostile, self.hostile_kind = f.hostile_clients()
        base = f.target or f.clients_per_round * c.directions
        if f.mode == "async":  # the count is the directions of one client's job
            base = c.directions
        self.pacer = (VariancePacer(base, max(base, f.pacing_max)) if f.pacing == "variance" else
                      TrendPacer(base, max(base, f.pacing_max)) if f.pacing == "trend" else None)
        self.misses = MissWeights(f.clients, f.downweight) if f.downweight else None
        if f.sampling != "random":
            self.replica.track_updates()  # every replica ranks candidates against the last update

    # ----------------------------------------------------------------- one round
    def select(self, round_: int) -> tuple[list[int], list[int], np.ndarray]:
        """(online clients, selected clients, dropout draws): seeded by (seed, round) alone."""
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.config.seed, _SELECT_STREAM, round_])))
        draws = rng.random(self.fed.clients)
        online = [i for i in range(self.fed.clients) if draws[i] < self.profiles[i].availability]
        m = min(self.fed.clients_per_round, len(online))
        if self.misses is not None and m:
            w = self.misses.weights()[online]
            selected = sorted(rng.choice(online, m, replace=False, p=w / w.sum()).tolist())
        else:
            selected = sorted(rng.choice(online, m, replace=False).tolist()) if m else []
        drops = rng.random(self.fed.clients)
        return online, selected, drops

    def train_step(self) -> dict:
        c, f, k = self.config, self.fed, self.counters
        r = k.step
        wall = time.perf_counter()
        deadline = f.deadline or float("inf")
        online, selected, drops = self.select(r)
        catch_ups = {i: self.server.catch_up(self.clients[i].version) for i in selected}
        counts, deadline, plan = self.allocate(r, selected, catch_ups, deadline)
        accepted, times, events = [], [], {"dropped": [], "late": [], "refused": {}, "snapshots": 0, "skipped": [],
                                           "joined": 0, "join_snapshots": 0}
        losses, passes, tokens, up, down, clients_scalars, client_seconds = [], 0, 0, 0, 0, {}, {}
        snapshot_bytes, join_bytes, join_max = 0, 0, 0
        candidates = (min(f.candidates, MAX_CANDIDATES), sampling.CODES[f.sampling]) if f.sampling != "random" else (0, 0)
        for i in selected:
            client, profile = self.clients[i], self.profiles[i]
            if counts[i] == 0:  # speed-aware allocation: not even one direction fits the round's deadline
                events["skipped"].append(i)
                continue
            catch_up = catch_ups[i]
            start = self.start_digest if client.version is None else 0
            instruction = self.server.instruct(r, i, counts[i], c.batch_size, c.eps, deadline, *candidates, start,
                                               spread=int(c.spread == "batches"))
            down_bytes = sum(map(len, catch_up)) + len(instruction)
            down += down_bytes
            messages = [decode(m) for m in catch_up]
            snapshots = [len(raw) for raw, m in zip(catch_up, messages) if isinstance(m, Snapshot)]
            events["snapshots"] += len(snapshots)
            if client.version is None:  # a joiner: the history of broadcasts, or a snapshot
                events["joined"] += 1
                events["join_snapshots"] += len(snapshots)
                join_bytes += sum(map(len, catch_up))
                join_max = max(join_max, sum(map(len, catch_up)))
            else:  # a client too far behind to replay
                snapshot_bytes += sum(snapshots)
            try:
                client.sync(messages)
            except NeedsAdapter:  # cannot happen with a consistent server; kept as the protocol says
                client.sync([decode(self.server.catch_up(None)[0])])
            if drops[i] < f.dropout:
                events["dropped"].append(i)
                continue
            report, est = client.work(decode(instruction))
            passes += est.forward_passes
            tokens += est.tokens
            self._misbehave(i, report)
            data = encode(report)
            up += len(data)
            t = client_time(profile, self.model_stats, down_bytes, len(data), est.tokens, est.forward_passes,
                            outputs=min(c.batch_size, len(client.data)))
            client_seconds[str(i)] = t.total
            if t.total > deadline:
                events["late"].append(i)
                times.append(t.total)
                continue
            try:
                accepted.append(self.server.accept(data))
            except MessageError as exc:
                events["refused"][str(i)] = str(exc)
                continue
            times.append(t.total)
            losses.append(est.loss)
            clients_scalars[str(i)] = [float(x) for x in report.scalars]
        _, agg, reason = self.server.close_round(r, accepted)
        if isinstance(self.pacer, TrendPacer):
            plan["pacing"] = self.pacer.update(float(np.mean(losses)) if losses else None)
        elif self.pacer is not None:  # the clipped scalars, so that an outlier cannot inflate the count
            plan["pacing"] = self.pacer.update([np.clip(a[1], -agg.threshold, agg.threshold) for a in accepted])
        plan["update_shares"] = self.server.last_shares
        if self.misses is not None:
            self.misses.update(sorted(events["late"] + events["skipped"]))
        seconds = round_time(times, deadline)
        k.bytes_up += up
        k.bytes_down += down
        k.sim_seconds += seconds
        record = {"step": r + 1, "round_seconds": seconds, "sim_seconds": round(k.sim_seconds, 4),
                  "online": len(online), "selected": selected, "accepted": [cs[0] for cs in accepted],
                  "scalars": clients_scalars, "eps": c.eps, "effective_directions": round(agg.effective, 4),
                  "lr": self.replica.optimizer.lr_at(r) * self.replica.rule.lr_scale(agg.effective),
                  "client_seconds": client_seconds, "bytes_up": up, "bytes_down": down,
                  "snapshot_bytes": snapshot_bytes, "join_bytes": join_bytes,
                  "join_max": join_max, "clipped": agg.clipped,
                  **{key: v for key, v in events.items() if v}, **plan}
        if losses:
            record["loss"] = float(np.mean(losses))
        record.update(total_bytes_up=k.bytes_up, total_bytes_down=k.bytes_down)
        return self.close_step(record, reason, passes, tokens, wall)

    # ----------------------------------------------------------------- allocation
    def allocate(self, r: int, selected: list[int], catch_ups: dict, deadline: float) -> tuple[dict, float, dict]:
        """(directions per selected client, the round's deadline, what to log) under the federation's
        allocation policy and pacing (allocation.py)."""
        c, f = self.config, self.fed
        if f.allocation == "uniform" and self.pacer is None:
            return {i: c.directions for i in selected}, deadline, {}
        log = {}
        if f.allocation == "speed":
            costs = [self.cost(i, r, sum(map(len, catch_ups[i]))) for i in selected]
            target = self.pacer.count if self.pacer else (f.target or f.clients_per_round * c.directions
                                                          if f.target or not f.deadline else 0)
            counts, deadline = allocate("speed", costs, cap=f.max_directions, target=target, deadline=deadline,
                                        min_clients=f.min_clients)
            if selected:
                deadline += 1e-6  # one microsecond for rounding between the prediction and the clock's sum
                log["deadline"] = round(deadline, 6)
            log["predicted_seconds"] = {str(i): round(cost.seconds(n), 4) for i, cost, n in zip(selected, costs, counts)}
        else:
            per_client = c.directions
            if self.pacer is not None and selected:
                per_client = -(-self.pacer.count // len(selected))
            counts, _ = allocate(f.allocation, [None] * len(selected), directions=per_client,
                                 progress=r / c.steps)
        if f.sampling != "random":
            counts = [min(n, f.candidates) for n in counts]
        log["directions"] = {str(i): int(n) for i, n in zip(selected, counts)}
        return dict(zip(selected, counts)), deadline, log

    def cost(self, i: int, r: int, down_bytes: int) -> Cost:
        """Client i's predicted round on its profile: its batch's tokens this round, the scheme's passes, its
        messages (the catch-up it is sent plus bounds on an instruction and on a report) and latency."""
        c, client, profile = self.config, self.clients[i], self.profiles[i]
        tokens = client.batch_plan(r, c.batch_size).n_tokens
        per_pass = profile.seconds_per_pass(self.model_stats, max(1, tokens), min(c.batch_size, len(client.data)))
        per_direction = passes_per_step(c.scheme, 2) - passes_per_step(c.scheme, 1)
        shared = passes_per_step(c.scheme, 1) - per_direction
        fixed = (profile.download_seconds(down_bytes + _INSTRUCTION_BOUND) + profile.upload_seconds(_REPORT_BOUND)
                 + profile.latency_s + shared * per_pass)
        return Cost(fixed, per_direction * per_pass + profile.upload_seconds(6))

    def _misbehave(self, i: int, report) -> None:
        if i not in self.hostile:
            return
        if self.hostile_kind == "scale":
            report.scalars = report.scalars * np.float32(1e6)
        elif self.hostile_kind == "nan":
            report.scalars = np.full_like(report.scalars, np.nan)
        else:
            rng = np.random.default_rng([self.config.seed, report.round, i])
            report.scalars = report.scalars * rng.choice(np.float32([-1, 1]), report.scalars.size)

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict:
        out = {"federation": asdict(self.fed), "profiles": [p.name for p in self.profiles]}
        if self.pacer is not None:
            out["pacer"] = self.pacer.state()
        if self.misses is not None:
            out["misses"] = self.misses.state()
        return out

    def resume(self) -> int:
        state = self.run_dir.read_state()
        if state.get("kind") != self.KIND:
            raise UserError(f"{self.rundir} holds a '{state.get('kind', 'train')}' run, not a federation")
        saved, defaults = state.get("federation") or {}, {**asdict(FedConfig()), **SAVED_BEFORE}
        if any(saved.get(k, defaults[k]) != v for k, v in asdict(self.fed).items()) or set(saved) - set(defaults):
            raise UserError("a resumed federation keeps its settings (--clients, --devices, --partition, ...)")
        step = super().resume()  # clients restart empty and rejoin by replaying the history (or a snapshot)
        self.server.history.load(step)
        if self.pacer is not None:
            self.pacer.load(state["pacer"])
        if self.misses is not None:
            self.misses.load(state["misses"])
        return step


def traffic(records: list[dict]) -> dict:
    """From a run's metrics: mean bytes per instructed client and round, up and down (joins and snapshots
    apart); how many clients joined and the mean and largest bytes a join cost (the history of broadcasts, or
    a snapshot); snapshots sent to clients too far behind to replay, and their mean size."""
    rounds = [r for r in records if r.get("step", 0) > 0 and "bytes_up" in r]
    # synchronous rounds list the selected clients; asynchronous updates count the jobs started and arrived
    instructed = sum(len(r["selected"]) if "selected" in r else r.get("jobs_started", 0) for r in rounds) or 1
    reports = sum(len(r["client_seconds"]) if "client_seconds" in r else
                  len(r.get("arrivals", {})) + len(r.get("refused", {})) for r in rounds) or 1
    snapshot_bytes = sum(r.get("snapshot_bytes", 0) for r in rounds)
    join_bytes = sum(r.get("join_bytes", 0) for r in rounds)
    joined = sum(r.get("joined", 0) for r in rounds)
    rejoins = sum(r.get("snapshots", 0) for r in rounds) - sum(r.get("join_snapshots", 0) for r in rounds)
    return {"up": sum(r["bytes_up"] for r in rounds) / reports,
            "down": (sum(r["bytes_down"] for r in rounds) - snapshot_bytes - join_bytes) / instructed,
            "joined": joined, "join_bytes": join_bytes / max(1, joined),
            "join_max": max((r.get("join_max", 0) for r in rounds), default=0),
            "snapshots": rejoins, "snapshot_bytes": snapshot_bytes / max(1, rejoins)}
