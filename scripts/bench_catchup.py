#!/usr/bin/env python
"""A joiner's download: replaying the run's seed-and-scalar history against downloading a snapshot.

Builds the run's adapter on the model (default: the demo Gemma-3-270M Q4_K_M, a fresh rank-8 LoRA on attn_q and
attn_v, B trained: 184,320 values), then drives the real `Server` for --rounds rounds, each closing with the
reports of --per-round of --clients clients, --directions scalars each (drawn at random: a round's bytes and
the replay's work do not depend on the scalars' values, so no scoring is needed). At the end a client that
never joined catches up from `Server.catch_up`, and the script prints:

- the bytes of the history of broadcasts it replays (what ggfwd sends a joiner now), the seconds the replay
  took, and whether its replica then equals the server's bitwise;
- the snapshot the server would send instead (the trained values and the optimizer's state: none for plain
  SGD), and the snapshot ggfwd sent every joiner before (the whole adapter, A included, plus the SGD state).

    python scripts/bench_catchup.py                         # Gemma-3-270M, 300 rounds of 4 of 10 clients
    python scripts/bench_catchup.py --rounds 1000 --optimizer adam
    python scripts/bench_catchup.py --smoke                 # seconds: the tiny random model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--directions", type=int, default=1)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attn_q,attn_v")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="seconds: the tiny random model, 40 rounds")
    args = p.parse_args()
    if args.smoke:
        from smoke_model import tiny_llama

        args.model = args.model or tiny_llama()[1]
        args.rounds = 40
    if args.model is None:
        from ggfwd.demo import demo_model

        args.model = demo_model()

    import numpy as np

    from ggfwd.adapter import LoraAdapter
    from ggfwd.federation.client import Client, snapshot_of
    from ggfwd.federation.messages import Snapshot, decode, encode
    from ggfwd.federation.server import Server
    from ggfwd.perturbation import Perturbations
    from ggfwd.session import SessionSettings
    from ggfwd.update import Replica, UpdateRule

    with SessionSettings(max_tokens=64, threads=1).open(str(args.model)) as session:
        adapter = LoraAdapter.create(session.base, args.targets.split(","), rank=args.rank, alpha=2.0 * args.rank,
                                     seed=args.seed)
    perturbations = Perturbations(adapter, args.seed)
    rule = UpdateRule(args.optimizer, lr=0.02, lr_scaling="auto")
    server = Server(Replica(adapter.params, perturbations.index, rule), perturbations, clip=5.0)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for r in range(args.rounds):
        chosen = sorted(rng.choice(args.clients, args.per_round, replace=False).tolist())
        reports = [(int(c), rng.normal(scale=0.3, size=args.directions).astype(np.float32)) for c in chosen]
        server.close_round(r, reports)
    server_seconds = time.perf_counter() - start

    history = server.catch_up(None)
    history_bytes = sum(map(len, history))
    snapshot_bytes = len(server.snapshot())
    opt = server.replica.optimizer
    old = Snapshot(server.version, server.replica.theta.copy(),  # before: the whole adapter and every state array
                   {k: np.asarray(v, np.float32) for k, v in opt.state_dict().items() if k != "t"}, opt.t)
    before_bytes = len(encode(old))
    estimator = SimpleNamespace(perturbations=perturbations)  # replaying needs the directions, not the model
    joiner = Client(args.clients, None, estimator, args.seed, rule, clip=5.0, start=adapter.params)
    start = time.perf_counter()
    replayed = joiner.sync([decode(m) for m in history])
    replay_seconds = time.perf_counter() - start
    equal = bool(np.array_equal(joiner.replica.theta, server.replica.theta))
    for key, value in server.replica.optimizer.state_dict().items():
        equal = equal and bool(np.array_equal(joiner.replica.optimizer.state_dict()[key], value))
    assert snapshot_of(server.replica).theta.size == perturbations.n
    print(f"{args.model.name}: {perturbations.size:,} adapter values, {perturbations.n:,} trained; "
          f"{args.rounds} rounds of {args.per_round} of {args.clients} clients x {args.directions} direction(s), "
          f"{args.optimizer}; {server_seconds:.1f} s to run the server's rounds")
    what = "broadcasts" if all(type(decode(m)).__name__ == "Broadcast" for m in history) else "a snapshot"
    print(f"a joiner at round {args.rounds} is sent {what}: {len(history)} messages, {history_bytes:,} bytes "
          f"({history_bytes / max(1, args.rounds):.0f} per round); replayed {replayed} rounds in {replay_seconds:.2f} s; "
          f"bitwise equal: {equal}")
    print(f"rounds {args.rounds} history {history_bytes} snapshot {snapshot_bytes} before {before_bytes} "
          f"replay_seconds {replay_seconds:.3f}")
    print(f"snapshot of the trained values and optimizer state: {snapshot_bytes:,} bytes; the snapshot every joiner "
          f"got before: {before_bytes:,} bytes ({before_bytes / max(1, history_bytes):.0f}x the history)")


if __name__ == "__main__":
    main()
