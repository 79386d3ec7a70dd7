"""bench_federation.py --mode scaling: does a federation of N devices reach an accuracy N times sooner?

One population of --clients homogeneous devices (every client on --device, so simulated time is rounds x one
client's round), SST-2 split IID or with Dirichlet(--alpha) label skew, Gemma-3-270M Q4_K_M. A run samples N
clients per round (N in --per-round), each scoring --directions direction(s) on its own batch; the round's
update is client-balanced (--weighting) and steps at the rule's size for the directions it averages
(--lr-scaling: linear by default, so N clients at base rate --lr step N x --lr). N = 1 is single-device
training on one client's data per step.

Runs are labelled nN-iid-sS / nN-dir-sS (and nN-dir-<weighting>-sS, nN-<partition>-<lr-scaling>-sS when those
differ from the defaults). Every run is evaluated on the first --eval-limit dev rows when its training forward
passes first reach each of --eval-passes (a geometric grid: the same relative resolution for a run that needs
30 passes and one that needs 500), so runs of every N are evaluated at about the same totals of forward
passes, and stops at its first evaluation at or above --stop-at or at --max-passes. Reported: simulated seconds, forward passes and rounds to each of --targets,
the speed-up against N = 1 of the same partition and seed (in simulated time) and the ratio of forward passes,
and a plot of accuracy against simulated time and against forward passes. Finished runs in --out are read, not
rerun, so an interrupted benchmark continues.

    python scripts/bench_federation.py --mode scaling --threads 1                       # hours: see --per-round
    python scripts/bench_federation.py --mode scaling --per-round 1,8 --partitions iid,dir --seeds 0
    python scripts/bench_federation.py --mode scaling --report                          # reprint from --out
    python scripts/bench_federation.py --mode scaling --smoke                           # seconds: tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from bench_federation_time import _share_first_eval, _write_atomic, bench_main, save_plot


def parse(argv):
    p = argparse.ArgumentParser(description="time to accuracy against the number of clients per round")
    p.add_argument("--model", type=Path)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data", type=Path)
    p.add_argument("--eval-data", type=Path)
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--eval-limit", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--clients", type=int, default=16, help="the population; N of them are sampled per round")
    p.add_argument("--device", default="ci-x86-avx512", help="every client's profile (homogeneous; always online)")
    p.add_argument("--profiles", type=Path, help="extra profile folder")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--per-round", default="1,2,4,8,16")
    p.add_argument("--partitions", default="iid,dir")
    p.add_argument("--weighting", default="equal")
    p.add_argument("--lr-scaling", default="linear", help="one rule or several, comma-separated (linear,sqrt)")
    p.add_argument("--lr-scale-max", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="rounds of linear warm-up of the step size")
    p.add_argument("--directions", type=int, default=1, help="per client and round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02, help="base rate, for one direction")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--eval-passes", default="8,16,24,32,48,64,96,128,192,256,384,512,768,1024",
                   help="evaluate when a run's training forward passes reach these totals (the first round at or past "
                        "each), so runs of every N are evaluated at about the same totals")
    p.add_argument("--max-passes", type=int, default=800, help="a run stops after this many forward passes")
    p.add_argument("--targets", default="0.80,0.85")
    p.add_argument("--stop-at", type=float, default=0.85, help="stop a run at its first evaluation >= this (0: never)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path("runs/bench_federation_scaling"))
    p.add_argument("--plot", type=Path, help="PNG [default: OUT/scaling.png]")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="seconds: the tiny random model")
    p.add_argument("--report", action="store_true", help="print the table from the run folders in --out, no runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.eval_limit, args.train_limit, args.batch_size, args.threads = 32, 400, 4, args.threads or 1
        args.clients, args.per_round, args.eval_passes, args.max_passes = 4, "1,2", "4,8,12", 16
        args.seeds, args.stop_at = "0", 0.0
    args.per_round = [int(n) for n in str(args.per_round).split(",")]
    args.eval_passes = sorted({int(p) for p in str(args.eval_passes).split(",")})
    args.partitions = args.partitions.split(",")
    args.lr_scalings = args.lr_scaling.split(",")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.plot = args.plot or args.out / "scaling.png"
    for n in args.per_round:
        if not 1 <= n <= args.clients:
            raise SystemExit(f"--per-round {n} must lie in [1, --clients {args.clients}]")
    if set(args.partitions) - {"iid", "dir"}:
        raise SystemExit("--partitions takes iid and/or dir")
    return args


def label(args, n: int, part: str, seed: int, scaling: str) -> str:
    extra = "" if args.weighting == "equal" else f"-{args.weighting}"
    extra += "" if scaling == "linear" else f"-{scaling}"
    extra += "" if not args.lr_scale_max else f"-max{args.lr_scale_max:g}"
    extra += "" if not args.warmup else f"-wu{args.warmup}"
    extra += "" if args.directions == 1 else f"-k{args.directions}"
    return f"n{n}-{part}{extra}-s{seed}"


def plan(args) -> list[tuple[str, int, str, int, str]]:
    """(label, N, partition, seed, lr scaling): seed by seed, N = 1 first (the baseline of each comparison; it
    steps at the base rate under every rule, so it is run once, under the first)."""
    return [(label(args, n, part, s, rule), n, part, s, rule) for s in args.seeds for part in args.partitions
            for n in sorted(args.per_round) for j, rule in enumerate(args.lr_scalings) if n > 1 or j == 0]


# ----------------------------------------------------------------------------- running
def run_all(args) -> None:
    from ggfwd.federation.simulate import FedConfig, Federation
    from ggfwd.inputs import RunInputs
    from ggfwd.modelstats import ModelStats
    from ggfwd.profiles import load_profile
    from ggfwd.session import SessionSettings
    from ggfwd.trainer import TrainConfig

    inputs = RunInputs(model=str(args.model), data=str(args.data), eval_data=str(args.eval_data), task=args.task,
                       train_limit=args.train_limit, eval_limit=args.eval_limit, max_tokens=args.max_tokens)
    profile = load_profile(args.device, dirs=[args.profiles] if args.profiles else None)
    stats = ModelStats.from_gguf(inputs.model)
    todo = [item for item in plan(args) if not (args.out / item[0] / "bench.json").is_file()]
    if not todo:
        return
    first_eval: dict[int, dict] = {}
    with SessionSettings(max_tokens=inputs.max_tokens, threads=args.threads).open(inputs.model) as session:
        loaded = {}
        for name, n, part, seed, scaling in todo:
            if seed not in loaded:
                loaded[seed] = inputs.load(session, seed)
            train, evaluation, adapter = loaded[seed]
            per_round_passes = 2 * n * args.directions
            points = sorted({math.ceil(p / per_round_passes) for p in args.eval_passes if p <= args.max_passes})
            cfg = TrainConfig(steps=points[-1], eval_every=0, batch_size=args.batch_size, lr=args.lr, eps=args.eps,
                              seed=seed, clip=args.clip, directions=args.directions, lr_scaling=scaling,
                              lr_scale_max=args.lr_scale_max, warmup=args.warmup)
            fed = FedConfig(clients=args.clients, clients_per_round=n, default_device=args.device,
                            partition="iid" if part == "iid" else f"dirichlet:{args.alpha}",
                            weighting=args.weighting)
            out = args.out / name
            out.mkdir(parents=True, exist_ok=True)
            run = Federation(session, adapter.copy(), train, cfg, out, evaluation, inputs, fed=fed,
                             profiles=[profile] * args.clients, model_stats=stats)
            if run.run_dir.has_run:
                run.resume()
            _share_first_eval(run, first_eval, seed)
            start = time.perf_counter()
            evals = []
            for point in points:  # a run evaluates at its last step: run to each evaluation point in turn
                if run.counters.step >= point:
                    continue
                run.config.steps = point
                run.run()
                evals = [r for r in run.run_dir.read_metrics() if "eval_accuracy" in r]
                if args.stop_at and evals and evals[-1]["eval_accuracy"] >= args.stop_at:
                    break
            done = {"n": n, "partition": part, "seed": seed, "eval_rounds": points, "settings": vars(fed),
                    "config": {"lr": args.lr, "lr_scaling": scaling, "lr_scale_max": args.lr_scale_max,
                               "warmup": args.warmup, "directions": args.directions, "batch_size": args.batch_size},
                    "wall_seconds": time.perf_counter() - start}
            _write_atomic(out / "bench.json", json.dumps(done, default=float))
            acc = evals[-1]["eval_accuracy"] if evals else float("nan")
            print(f"{name}: {acc:.1%} after {run.counters.step} rounds, {run.counters.forward_passes} passes, "
                  f"{run.counters.sim_seconds:.1f} simulated s ({done['wall_seconds']:.0f} s wall)",
                  file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- analysis
def analyse(folder: Path, targets: list[float], n: int, part: str, seed: int) -> dict:
    """A run's figures; a run that was stopped before its end (no bench.json) is reported as far as it got."""
    from ggfwd.federation.simulate import traffic
    from ggfwd.rundir import read_metrics

    finished = (folder / "bench.json").is_file()
    done = json.loads((folder / "bench.json").read_text()) if finished else \
        {"n": n, "partition": part, "seed": seed, "wall_seconds": float("nan")}
    records = read_metrics(folder)
    rounds = [r for r in records if r.get("step", 0) > 0]
    evals = [(r.get("sim_seconds", 0.0), r["forward_passes"], r["step"], r["eval_accuracy"])
             for r in records if "eval_accuracy" in r]
    reach = {}
    for t in targets:
        hit = next((e for e in evals if e[3] >= t - 1e-12), None)
        reach[t] = None if hit is None else {"sim_seconds": hit[0], "passes": hit[1], "rounds": hit[2]}
    b = traffic(records)
    last = evals[-1] if evals else (0.0, 0, 0, float("nan"))
    return {"label": folder.name + ("" if finished else " (stopped)"), "n": done["n"], "partition": done["partition"], "seed": done["seed"],
            "reach": reach, "evals": evals, "best": max((e[3] for e in evals), default=float("nan")),
            "final": {"accuracy": last[3], "passes": last[1], "rounds": last[2]},
            "round_seconds": sum(r["round_seconds"] for r in rounds) / max(1, len(rounds)),
            "lr": rounds[-1]["lr"] if rounds else None, "bytes_up": b["up"], "bytes_down": b["down"],
            "join_bytes": b["join_bytes"], "join_max": b["join_max"], "wall_seconds": done["wall_seconds"]}


def report(args) -> list[dict]:
    results = [analyse(args.out / name, args.targets, n, part, seed) for name, n, part, seed, _ in plan(args)
               if (args.out / name / "bench.json").is_file() or (args.out / name / "state.json").is_file()]
    if not results:
        raise SystemExit(f"no finished runs in {args.out}")
    ts = args.targets
    print(f"{args.task} evaluation rows (first {args.eval_limit}) at about {args.eval_passes} training passes; {args.clients} clients "
          f"on {args.device}; base lr {args.lr}, --lr-scaling {args.lr_scaling}, --weighting {args.weighting}. "
          "Per target: simulated seconds / forward passes / rounds ('-': not reached)")
    print("| run | lr | " + " | ".join(f"to {t:.0%}" for t in ts) + " | best | last | up B | down B | join B |")
    print("|---|---|" + "---|" * (len(ts) + 5))
    for r in results:
        cells = ["-" if r["reach"][t] is None else
                 f"{r['reach'][t]['sim_seconds']:.1f} s / {r['reach'][t]['passes']} / {r['reach'][t]['rounds']}"
                 for t in ts]
        f = r["final"]
        lr = "-" if r["lr"] is None else f"{r['lr']:.3g}"
        print(f"| {r['label']} | {lr} | " + " | ".join(cells) + f" | {r['best']:.1%} | {f['accuracy']:.1%} @ "
              f"{f['passes']} passes | {r['bytes_up']:.0f} | {r['bytes_down']:.0f} | {r['join_bytes']:.0f} |")
    print()
    base = {(r["partition"], r["seed"]): r for r in results if r["n"] == 1}
    for t in ts:
        for r in results:
            one = base.get((r["partition"], r["seed"]))
            if r["n"] == 1 or one is None:
                continue
            mine, theirs = r["reach"][t], one["reach"][t]
            if mine and theirs:
                verdict = (f"{theirs['sim_seconds'] / mine['sim_seconds']:.2f}x sooner, "
                           f"{mine['passes'] / theirs['passes']:.2f}x the forward passes")
            else:
                verdict = {(True, False): "reached, N = 1 did not", (False, True): "not reached, N = 1 did",
                           (False, False): "neither reached"}[(bool(mine), bool(theirs))]
            print(f"to {t:.0%}: {r['label']} vs {one['label']}: {verdict}")
    if args.plot:
        _plot(results, args.plot, ts)
    return results


def _plot(results: list[dict], path: Path, targets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    ns = sorted({r["n"] for r in results})
    cmap = plt.get_cmap("viridis")
    colour = {n: cmap(i / max(1, len(ns) - 1)) for i, n in enumerate(ns)}
    for r in results:
        style = "-" if r["partition"] == "iid" else "--"
        ys = [100 * e[3] for e in r["evals"]]
        marker = "s" if "-sqrt" in r["label"] else "o"
        for ax, xs in zip(axes, ([e[0] for e in r["evals"]], [e[1] for e in r["evals"]])):
            ax.plot(xs, ys, style, marker=marker, ms=3, color=colour[r["n"]], label=r["label"])
    for ax, xl in zip(axes, ("simulated seconds (homogeneous devices)", "training forward passes (all clients)")):
        for t in targets:
            ax.axhline(100 * t, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xlabel(xl)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
    axes[0].set_ylabel("accuracy on dev rows (%)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("N clients per round, step size scaled with N (solid: IID, dashed: Dirichlet label skew; "
                 "squares: sqrt rule)")
    save_plot(fig, path)


def scaling_main(argv) -> None:
    bench_main(parse, run_all, report, argv)
