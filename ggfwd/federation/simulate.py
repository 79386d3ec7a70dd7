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

from ..errors import UserError
from ..trainer import Trainer
from .client import Client, NeedsAdapter
from .clock import client_time, round_time
from .messages import MessageError, Snapshot, decode, encode
from .partition import parse_spec, partition
from .server import Server

_SELECT_STREAM = 0x5E1EC7
HOSTILE_KINDS = ("scale", "nan", "signs")


@dataclass
class FedConfig:
    clients: int = 10
    clients_per_round: int = 4
    devices: str = ""  # "PROFILE:COUNT,..." (counts add up to `clients`); "" = every client on `default_device`
    default_device: str = "laptop-x86"
    partition: str = "dirichlet:0.5"
    deadline: float = 0.0  # simulated seconds per round; 0: wait for every selected client
    max_lag: int = 10  # rounds a client may miss and still catch up from broadcasts
    dropout: float = 0.0  # chance that a selected, online client drops mid-round
    hostile: str = ""  # "N:KIND": the last N clients misbehave (KIND: scale, nan, signs)

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
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must lie in [0, 1), got {self.dropout}")
        self.hostile_clients()
        self.device_names()

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


class Federation(Trainer):
    """`Trainer` whose step is a federated round. Extra arguments: `fed` (FedConfig), `profiles` (client ->
    DeviceProfile) and `model_stats` (the base model's ModelStats for the speed model)."""

    KIND = "federate"

    def __init__(self, session, adapter, train_data, config, rundir, eval_data=None, inputs=None,
                 calibration=None, *, fed: FedConfig, profiles: list, model_stats):
        fed.check()
        if len(profiles) != fed.clients:
            raise ValueError("one profile per client")
        self.fed, self.profiles, self.model_stats = fed, profiles, model_stats
        super().__init__(session, adapter, train_data, config, rundir, eval_data, inputs, calibration)

    def setup(self) -> None:
        c, f = self.config, self.fed
        labels = getattr(self.train_data, "labels", None)
        self.parts = partition(f.partition, labels, len(self.train_data), f.clients, c.seed)
        # The clients take turns on the one loaded model, so they can share the estimator's buffers; their data,
        # replicas and seeds stay their own.
        self.clients = [Client(i, self.train_data.subset(part), self.estimator, c.seed, c.update_rule(), c.clip)
                        for i, part in enumerate(self.parts)]
        self.server = Server(self.replica, self.perturbations, c.clip, f.max_lag)
        self.hostile, self.hostile_kind = f.hostile_clients()

    # ----------------------------------------------------------------- one round
    def select(self, round_: int) -> tuple[list[int], list[int], np.ndarray]:
        """(online clients, selected clients, dropout draws): seeded by (seed, round) alone."""
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.config.seed, _SELECT_STREAM, round_])))
        draws = rng.random(self.fed.clients)
        online = [i for i in range(self.fed.clients) if draws[i] < self.profiles[i].availability]
        m = min(self.fed.clients_per_round, len(online))
        selected = sorted(rng.choice(online, m, replace=False).tolist()) if m else []
        drops = rng.random(self.fed.clients)
        return online, selected, drops

    def train_step(self) -> dict:
        c, f, k = self.config, self.fed, self.counters
        r = k.step
        wall = time.perf_counter()
        deadline = f.deadline or float("inf")
        online, selected, drops = self.select(r)
        accepted, times, events = [], [], {"dropped": [], "late": [], "refused": {}, "snapshots": 0}
        losses, passes, tokens, up, down, clients_scalars, client_seconds = [], 0, 0, 0, 0, {}, {}
        snapshot_bytes = 0
        for i in selected:
            client, profile = self.clients[i], self.profiles[i]
            catch_up = self.server.catch_up(client.version)
            instruction = self.server.instruct(r, i, c.directions, c.batch_size, c.eps, deadline)
            down_bytes = sum(map(len, catch_up)) + len(instruction)
            down += down_bytes
            messages = [decode(m) for m in catch_up]
            snapshots = [len(raw) for raw, m in zip(catch_up, messages) if isinstance(m, Snapshot)]
            events["snapshots"] += len(snapshots)
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
        seconds = round_time(times, deadline)
        k.bytes_up += up
        k.bytes_down += down
        k.sim_seconds += seconds
        record = {"step": r + 1, "round_seconds": seconds, "sim_seconds": round(k.sim_seconds, 4),
                  "online": len(online), "selected": selected, "accepted": [cs[0] for cs in accepted],
                  "scalars": clients_scalars, "lr": self.replica.optimizer.lr_at(r), "eps": c.eps,
                  "client_seconds": client_seconds, "bytes_up": up, "bytes_down": down,
                  "snapshot_bytes": snapshot_bytes, "clipped": agg.clipped,
                  **{key: v for key, v in events.items() if v}}
        if losses:
            record["loss"] = float(np.mean(losses))
        record.update(total_bytes_up=k.bytes_up, total_bytes_down=k.bytes_down)
        return self.close_step(record, reason, passes, tokens, wall)

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
        return {"federation": asdict(self.fed), "profiles": [p.name for p in self.profiles]}

    def resume(self) -> int:
        state = self.run_dir.read_state()
        if state.get("kind") != self.KIND:
            raise UserError(f"{self.rundir} holds a '{state.get('kind', 'train')}' run, not a federation")
        if state.get("federation") != asdict(self.fed):
            raise UserError("a resumed federation keeps its settings (--clients, --devices, --partition, ...)")
        return super().resume()  # clients restart empty and rejoin by snapshot


def traffic(records: list[dict]) -> dict:
    """Mean bytes per instructed client and round, up and down (snapshots apart), from a run's metrics."""
    rounds = [r for r in records if r.get("step", 0) > 0 and "selected" in r]
    instructed = sum(len(r["selected"]) for r in rounds) or 1
    reports = sum(len(r["client_seconds"]) for r in rounds) or 1
    snapshot_bytes = sum(r.get("snapshot_bytes", 0) for r in rounds)
    snapshots = sum(r.get("snapshots", 0) for r in rounds)
    return {"up": sum(r["bytes_up"] for r in rounds) / reports,
            "down": (sum(r["bytes_down"] for r in rounds) - snapshot_bytes) / instructed,
            "snapshots": snapshots, "snapshot_bytes": snapshot_bytes / max(1, snapshots)}
