#!/usr/bin/env python
"""Federated training benchmarks on SST-2 with Gemma-3-270M Q4_K_M, in two modes.

--mode passes (default): federated against single-device training at the same number of forward passes.
--mode time: time-to-accuracy across heterogeneous devices (allocation, pacing and sampling policies); see
bench_federation_time.py.
--mode scaling: time to accuracy against the number of homogeneous clients per round, with the step size scaled
to the directions an update averages; see bench_federation_scaling.py.

Mode passes runs, in one process on one loaded model, the same seed and training recipe:

  fed        `ggfwd federate`'s simulation: --clients clients on --devices profiles with Dirichlet(--alpha) label
             skew, --per-round clients per round, each scoring one direction on its own batch; one update per round
  fed-iid    the same with an IID partition (isolates the label skew)
  fed-hostile  fed with its last client sending scalars x 1e6 every time it is sampled (bounded by --clip)
  single     `ggfwd train`: one direction per step on one batch, one update per step
  single-K   one device, K = --per-round directions per step on one batch (same passes per update as fed)

Each is evaluated on the first --eval-limit dev rows at the same totals of forward passes, and the script prints
accuracy and loss against passes, plus the federation's bytes per client and round next to a dense LoRA
exchange. The expectation tested (not assumed): K clients each estimating on their own batch behave like K
directions on K batches per update, which should beat K directions on one batch (single-K).

    python scripts/bench_federation.py --threads 2                       # about 30-40 minutes on 2 cores
    python scripts/bench_federation.py --smoke                           # seconds: tiny random model
    python scripts/bench_federation.py --mode time --threads 1           # see bench_federation_time.py
    python scripts/bench_federation.py --mode time --smoke
    python scripts/bench_federation.py --mode scaling --smoke            # see bench_federation_scaling.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def run_all(args) -> dict:
    from ggfwd.federation.simulate import FedConfig, Federation
    from ggfwd.inputs import RunInputs
    from ggfwd.modelstats import ModelStats
    from ggfwd.profiles import load_profile
    from ggfwd.session import SessionSettings
    from ggfwd.trainer import Trainer, TrainConfig

    inputs = RunInputs(model=str(args.model), data=str(args.data), eval_data=str(args.eval_data), task=args.task,
                       train_limit=args.train_limit, eval_limit=args.eval_limit, max_tokens=args.max_tokens)
    k = args.per_round
    base = dict(batch_size=args.batch_size, lr=args.lr, eps=args.eps, seed=args.seed, clip=args.clip)
    runs = {
        "fed": ("fed", dict(steps=args.rounds, eval_every=args.eval_every), f"dirichlet:{args.alpha}"),
        "fed-iid": ("fed", dict(steps=args.rounds, eval_every=args.eval_every), "iid"),
        "fed-hostile": ("fed", dict(steps=args.rounds, eval_every=args.eval_every), f"dirichlet:{args.alpha}"),
        "single": ("single", dict(steps=args.rounds * k, eval_every=args.eval_every * k), None),
        "single-K": ("single", dict(steps=args.rounds, eval_every=args.eval_every, directions=k), None),
    }
    results = {}
    stats = ModelStats.from_gguf(inputs.model)
    names = []
    for item in args.devices.split(","):
        name, _, count = item.rpartition(":")
        names += [name] * int(count)
    profiles = [load_profile(n, dirs=[args.profiles] if args.profiles else None) for n in names]
    with SessionSettings(max_tokens=inputs.max_tokens, threads=args.threads).open(inputs.model) as session:
        train, evaluation, adapter = inputs.load(session, args.seed)
        for label in args.runs.split(","):
            kind, extra, part = runs[label]
            cfg = TrainConfig(**base, **extra)
            out = args.out / label
            out.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            if kind == "fed":
                fed = FedConfig(clients=len(names), clients_per_round=k, devices=args.devices, partition=part,
                                hostile="1:scale" if label == "fed-hostile" else "")
                run = Federation(session, adapter.copy(), train, cfg, out, evaluation, inputs, fed=fed,
                                 profiles=profiles, model_stats=stats)
            else:
                run = Trainer(session, adapter.copy(), train, cfg, out, evaluation, inputs)
            run.run()
            records = run.run_dir.read_metrics()
            results[label] = {"seconds": time.perf_counter() - start, "records": records,
                              "counters": vars(run.counters).copy(), "trained": run.perturbations.n}
            print(f"{label}: {records[-1].get('eval_accuracy', float('nan')):.1%} after "
                  f"{run.counters.forward_passes} passes ({results[label]['seconds']:.0f} s)", file=sys.stderr)
    return results


def report(results: dict, args) -> None:
    labels = list(results)
    evals = {lab: [r for r in res["records"] if "eval_accuracy" in r] for lab, res in results.items()}
    print(f"SST-2 dev (first {args.eval_limit} rows): accuracy (loss) @ training forward passes, at each evaluation")
    print("| evaluation | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for i in range(max(len(e) for e in evals.values())):
        cells = [f"{e[i]['eval_accuracy']:.1%} ({e[i]['eval_loss']:.3f}) @ {e[i]['forward_passes']}" if i < len(e)
                 else "" for e in evals.values()]
        print(f"| {i} | " + " | ".join(cells) + " |")
    for lab in labels:
        res = results[lab]
        c = res["counters"]
        line = f"{lab}: {c['step']} updates, {c['forward_passes']} passes, {res['seconds']:.0f} s wall"
        if c.get("bytes_up"):
            from ggfwd.federation.simulate import traffic

            b, dense = traffic(res["records"]), 4 * res["trained"]
            line += (f"; per client and round: up {b['up']:.0f} B, down {b['down']:.0f} B (instruction and missed "
                     f"broadcasts) + {b['snapshots']} snapshots of {b['snapshot_bytes']:.0f} B for joining clients; "
                     f"dense LoRA {dense} B each way: {dense / b['up']:.0f}x more up, {dense / b['down']:.0f}x more "
                     f"down; simulated {c['sim_seconds'] / 60:.1f} min")
        print(line)


def main() -> None:
    mode = sys.argv[sys.argv.index("--mode") + 1:][:1] if "--mode" in sys.argv else []
    if mode in (["time"], ["scaling"]):
        argv = sys.argv[1:]
        i = argv.index("--mode")
        if mode == ["time"]:
            from bench_federation_time import time_main

            return time_main(argv[:i] + argv[i + 2:])
        from bench_federation_scaling import scaling_main

        return scaling_main(argv[:i] + argv[i + 2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("passes", "time", "scaling"), default="passes",
                   help="passes: federated vs single-device at equal passes; time: time-to-accuracy policies; "
                        "scaling: time to accuracy against the number of clients per round")
    p.add_argument("--model", type=Path)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data", type=Path)
    p.add_argument("--eval-data", type=Path)
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--eval-limit", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--devices", default="laptop-x86:4,phone-midrange:4,pi5:2")
    p.add_argument("--profiles", type=Path, help="extra profile folder")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--eval-every", type=int, default=10, help="rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--runs", default="fed,fed-iid,single,single-K")
    p.add_argument("--out", type=Path, default=Path("runs/bench_federation"))
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="seconds: the tiny random model, 4 rounds")
    p.add_argument("--report", action="store_true", help="print the table from the run folders in --out, no runs")
    args = p.parse_args()
    if args.report:
        from ggfwd.rundir import read_metrics, read_state

        results = {}
        for label in args.runs.split(","):
            state = read_state(args.out / label)
            results[label] = {"records": read_metrics(args.out / label), "counters": state["counters"],
                              "seconds": state["counters"]["seconds"] + state["counters"]["eval_seconds"],
                              "trained": state["perturbations"]["coordinates"]}
        report(results, args)
        return
    from ggfwd.demo import demo_model, sst2_file

    if args.smoke:
        from smoke_model import tiny_llama

        args.model = args.model or tiny_llama()[1]
        args.rounds, args.eval_every, args.eval_limit, args.train_limit = 4, 2, 32, 400
        args.batch_size, args.threads = 4, args.threads or 1
    args.model = args.model or demo_model()
    args.data = args.data or sst2_file("train")
    args.eval_data = args.eval_data or sst2_file("dev")
    results = run_all(args)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({k: {"counters": v["counters"], "seconds": v["seconds"],
                                              "evals": [r for r in v["records"] if "eval_loss" in r]}
                                         for k, v in results.items()}))


if __name__ == "__main__":
    main()
