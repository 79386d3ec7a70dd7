"""bench_federation.py --mode time: time-to-accuracy across heterogeneous devices (issue 20).

The same population (by default two clients on each of six device profiles whose predicted seconds per pass
differ about 240x), Dirichlet(--alpha) label skew, --per-round clients sampled per round, Gemma-3-270M Q4_K_M
on SST-2, evaluated on the first --eval-limit dev rows every --eval-every rounds. Runs (FedConfig settings;
everything else is shared):

  a    uniform: one direction per client; every round waits for its slowest client
  a2   uniform with a deadline that admits the fastest two thirds of the profiles; late reports are dropped
       and clients that keep missing it are down-weighted in sampling
  b    FwdLLM's hand schedule: 1, 3, 5, 10 directions per client over the quarters of --rounds
  c    speed-aware allocation + variance pacing: the round's direction count (4 to start) goes to the clients
       that finish it soonest (at most --max-directions each), the count follows the scalars' variance, and
       clients that cannot finish a direction in time are down-weighted in sampling
  d    c with discriminative sampling (top-K of --candidates by |cosine| with the last update)
  e    c with the unbiased, importance-weighted variant
  c0   c without down-weighting skipped clients in sampling (not in the default --runs: it tests whether
       concentrating the work on the fast devices' data is what costs c accuracy under label skew)
  c3   c whose rounds last until at least 3 of the 4 selected clients finish a direction (--min-clients 3; the
       fast ones fill the longer round, up to --max-directions): breadth of data against round length
  m    asynchronous rounds with client memory: every client works back to back, an update per --per-round
       reports, each update averaging every client's latest report within --max-staleness updates (weighted by
       examples x 1/sqrt(1 + age)), step x sqrt(effective directions); m1: m at the base step (what --lr-scaling
       auto now gives with stale reports); mt: m1 with trend pacing (directions per job doubled when the loss
       stalls); f: asynchronous without memory (FedBuff), sqrt step

With --budget S every run is given the same S simulated seconds (and --rounds as a cap), is evaluated at the
first update at or after each of --eval-at, and the report gives the median and range over the seeds (times to
each target, accuracy at each point, shares of accepted work and of update weight by device profile) and a plot
of accuracy against simulated time with the range shaded.

A run stops at its first evaluation at or above --stop-at (the highest target; 0: never) or after --rounds.
Reported per run: simulated time, forward passes and rounds until each --targets accuracy, bytes per client and
round, and where the simulated time went (round length, idle share of the selected devices, work discarded
as late, directions per round); a PNG of accuracy against simulated time. Runs already finished in --out are
not run again (their folders are read), so an interrupted benchmark continues where it stopped.

    python scripts/bench_federation.py --mode time --threads 1
    python scripts/bench_federation.py --mode time --report            # reprint from the run folders
    python scripts/bench_federation.py --mode time --smoke             # seconds: tiny random model
    python scripts/bench_federation.py --mode time --threads 1 --runs a,m --seeded a,m --seeds 0,1,2 \
        --budget 60 --eval-at 1,2,4,8,16,32 --rounds 5000 --eval-limit 512  # the asynchronous comparison
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

DEVICES = "desktop-vulkan:2,macbook-m4:2,phone-flagship:2,laptop-x86:2,pi5:2,phone-midrange:2"
SPEED = dict(allocation="speed", pacing="variance", pacing_max=16, downweight=0.5)
RUNS = {
    "a": ("uniform, 1 direction/client, waits for the slowest", {}),
    "a2": ("uniform, deadline drops late clients", {"deadline": "auto", "downweight": 0.5}),
    "b": ("FwdLLM hand schedule 1-3-5-10", {"allocation": "schedule"}),
    "c": ("speed-aware + variance pacing", SPEED),
    "d": ("(c) + discriminative sampling", {**SPEED, "sampling": "discriminative"}),
    "e": ("(c) + unbiased sampling", {**SPEED, "sampling": "unbiased"}),
    "c0": ("(c) without down-weighting", {**SPEED, "downweight": 0.0}),
    "c3": ("(c) with at least 3 contributing clients", {**SPEED, "min_clients": 3}),
    "m": ("asynchronous + client memory, sqrt step", {"mode": "async", "max_staleness": "auto", "lr_scaling": "sqrt"}),
    "mt": ("(m1) + trend pacing", {"mode": "async", "max_staleness": "auto", "pacing": "trend", "pacing_max": 4}),
    "m1": ("(m) at the base step (auto)", {"mode": "async", "max_staleness": "auto", "lr_scaling": "none"}),
    "f": ("asynchronous, no memory (FedBuff), sqrt step",
          {"mode": "async", "max_staleness": "auto", "client_memory": False, "lr_scaling": "sqrt"}),
}
TRAIN_SETTINGS = ("lr_scaling",)  # RUNS settings that belong to TrainConfig


def parse(argv):
    p = argparse.ArgumentParser(description="time-to-accuracy across heterogeneous devices")
    p.add_argument("--model", type=Path)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data", type=Path)
    p.add_argument("--eval-data", type=Path)
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--eval-limit", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--devices", default=DEVICES)
    p.add_argument("--profiles", type=Path, help="extra profile folder")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30, help="at most this many rounds per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--max-directions", type=int, default=2, help="(c)-(e): most directions per client and round")
    p.add_argument("--candidates", type=int, default=64, help="(d), (e): candidates per client and round")
    p.add_argument("--deadline", type=float, default=0.0, help="(a2)'s deadline in simulated seconds (0: auto)")
    p.add_argument("--eval-every", type=int, default=5, help="rounds (without --budget)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="simulated seconds every run is given (0: --rounds decides); evaluations then happen at the "
                        "first update at or after each of --eval-at")
    p.add_argument("--eval-at", default="0.5,1,1.5,2,3,4,6,8,12,16,24,32,48,64,96,128",
                   help="simulated seconds at which runs are evaluated with --budget (points past it are dropped, "
                        "the budget is added)")
    p.add_argument("--max-staleness", type=int, default=64, help="(m): how many updates old a report may count")
    p.add_argument("--max-lag", type=int, default=0, help="rounds a client replays from broadcasts (0: --rounds)")
    p.add_argument("--targets", default="0.80,0.83,0.85")
    p.add_argument("--stop-at", type=float, default=0.85, help="stop a run at its first evaluation >= this (0: never)")
    p.add_argument("--runs", default="a,c,a2,b,d,e")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--seeded", default="a,c", help="runs that get every seed; the others get the first")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path("runs/bench_federation_time"))
    p.add_argument("--plot", type=Path, help="PNG of accuracy against simulated time [default: OUT/time.png]")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="seconds: the tiny random model, 4 rounds")
    p.add_argument("--report", action="store_true", help="print the table from the run folders in --out, no runs")
    p.add_argument("--stopped", action="store_true",
                   help="with --report: include runs stopped before their end (as far as they went, marked)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds = args.rounds if args.budget else 4
        args.eval_every, args.eval_limit, args.train_limit = 2, 32, 400
        args.batch_size, args.threads, args.candidates = 4, args.threads or 1, 8
        args.devices = "desktop-vulkan:1,macbook-m4:1,laptop-x86:1,pi5:1,phone-midrange:1"
        args.per_round, args.stop_at = 3, 0.0
    args.targets = [float(t) for t in args.targets.split(",")]
    if args.budget:
        args.eval_at = sorted({float(t) for t in args.eval_at.split(",") if 0 < float(t) < args.budget} | {args.budget})
    args.plot = args.plot or args.out / "time.png"
    return args


def plan(args) -> list[tuple[str, str, int]]:
    """(label, run, seed) in the order they are run: the runs that get every seed first (all their seeds),
    then the others at the first seed."""
    runs, seeds, seeded = args.runs.split(","), [int(s) for s in args.seeds.split(",")], args.seeded.split(",")
    for r in runs:
        if r not in RUNS:
            raise SystemExit(f"unknown run '{r}'; runs are {', '.join(RUNS)}")
    out = [(f"{r}-s{s}", r, s) for s in seeds for r in runs if r in seeded]
    return out + [(f"{r}-s{seeds[0]}", r, seeds[0]) for r in runs if r not in seeded]


# ----------------------------------------------------------------------------- running
def run_all(args) -> None:
    from ggfwd.federation.asynchronous import AsyncFederation
    from ggfwd.federation.simulate import FedConfig, Federation
    from ggfwd.inputs import RunInputs
    from ggfwd.modelstats import ModelStats
    from ggfwd.profiles import load_profile
    from ggfwd.session import SessionSettings
    from ggfwd.trainer import TrainConfig

    inputs = RunInputs(model=str(args.model), data=str(args.data), eval_data=str(args.eval_data), task=args.task,
                       train_limit=args.train_limit, eval_limit=args.eval_limit, max_tokens=args.max_tokens)
    names = []
    for item in args.devices.split(","):
        name, _, count = item.rpartition(":")
        names += [name] * int(count)
    profiles = [load_profile(n, dirs=[args.profiles] if args.profiles else None) for n in names]
    stats = ModelStats.from_gguf(inputs.model)
    first_eval: dict[int, dict] = {}  # seed -> the step-0 evaluation (the same adapter for every run of a seed)
    todo = [item for item in plan(args) if not (args.out / item[0] / "bench.json").is_file()]
    if not todo:
        return
    with SessionSettings(max_tokens=inputs.max_tokens, threads=args.threads).open(inputs.model) as session:
        loaded = {}
        for label, name, seed in todo:
            if seed not in loaded:
                loaded[seed] = inputs.load(session, seed)
            train, evaluation, adapter = loaded[seed]
            settings = dict(RUNS[name][1])
            fed_kw = dict(clients=len(names), clients_per_round=args.per_round, devices=args.devices,
                          partition=f"dirichlet:{args.alpha}", max_directions=args.max_directions,
                          candidates=args.candidates, max_lag=args.max_lag or args.rounds)
            cfg = TrainConfig(steps=args.rounds, eval_every=0 if args.budget else args.eval_every,
                              batch_size=args.batch_size, lr=args.lr, eps=args.eps, seed=seed, clip=args.clip,
                              **{k: settings.pop(k) for k in TRAIN_SETTINGS if k in settings})
            if settings.get("max_staleness") == "auto":
                settings["max_staleness"] = args.max_staleness
            out = args.out / label
            out.mkdir(parents=True, exist_ok=True)
            if settings.get("deadline") == "auto":
                settings["deadline"] = args.deadline or auto_deadline(
                    Federation(session, adapter.copy(), train, cfg, out, None, inputs,
                               fed=FedConfig(**fed_kw), profiles=profiles, model_stats=stats), names)
            fed = FedConfig(**{**fed_kw, **settings})
            kind = AsyncFederation if fed.mode == "async" else Federation
            run = kind(session, adapter.copy(), train, cfg, out, evaluation, inputs, fed=fed, profiles=profiles,
                       model_stats=stats)
            if run.run_dir.has_run:
                run.resume()
            _share_first_eval(run, first_eval, seed)
            start = time.perf_counter()
            pending = [t for t in (args.eval_at if args.budget else []) if t > run.counters.sim_seconds]

            def due(k) -> bool:  # the first update at or after each point of simulated time is evaluated
                hit = bool(pending) and k.sim_seconds >= pending[0]
                while pending and k.sim_seconds >= pending[0]:
                    pending.pop(0)
                return hit

            evals = [r for r in run.run_dir.read_metrics() if "eval_accuracy" in r] if run.run_dir.has_run else []
            while run.counters.step < cfg.steps and not (args.budget and run.counters.sim_seconds >= args.budget):
                run.run(stop_after=1 if args.budget else args.eval_every, evaluate_now=due if args.budget else None)
                evals = [r for r in run.run_dir.read_metrics() if "eval_accuracy" in r]
                if args.stop_at and evals and evals[-1]["eval_accuracy"] >= args.stop_at:
                    break
            done = {"run": name, "seed": seed, "settings": {k: v for k, v in vars(fed).items()},
                    "wall_seconds": time.perf_counter() - start, "profiles": names, "budget": args.budget,
                    "eval_at": args.eval_at if args.budget else [], "stopped_at_target": bool(
                        args.stop_at and evals and evals[-1]["eval_accuracy"] >= args.stop_at)}
            _write_atomic(out / "bench.json", json.dumps(done, default=float))
            acc = evals[-1]["eval_accuracy"] if evals else float("nan")
            print(f"{label}: {acc:.1%} after {run.counters.step} rounds, {run.counters.forward_passes} passes, "
                  f"{run.counters.sim_seconds:.1f} simulated s ({done['wall_seconds']:.0f} s wall)",
                  file=sys.stderr, flush=True)


def auto_deadline(probe, names: list[str]) -> float:
    """A deadline that admits the fastest two thirds of the profiles: the geometric mean of the mean predicted
    one-direction round times (first 10 rounds' batches) of the profiles ranked k and k+1 (k = 2/3 of them)."""
    by_profile: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        by_profile.setdefault(name, []).extend(probe.cost(i, r, 0).seconds(1) for r in range(10))
    times = sorted(sum(v) / len(v) for v in by_profile.values())
    k = max(1, math.ceil(2 * len(times) / 3))
    return times[-1] * 1.01 if k >= len(times) else math.sqrt(times[k - 1] * times[k])


def _share_first_eval(run, cache: dict, seed: int) -> None:
    """Every run of a seed starts from the same adapter: its step-0 evaluation is scored once and reused."""
    original = run.evaluate

    def evaluate():
        run.evaluate = original
        if run.counters.step == 0 and seed in cache:
            return dict(cache[seed])
        result = original()
        if run.counters.step == 0:
            cache[seed] = dict(result)
        return result

    run.evaluate = evaluate


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- analysis
def stopped_run(folder: Path, run: str, seed: int, args) -> None:
    """A run stopped before its budget (killed for compute, with its checkpoints kept): its bench.json written
    from its state, marked stopped, so that the report includes it as far as it went."""
    from ggfwd.rundir import read_state

    state = read_state(folder)
    done = {"run": run, "seed": seed, "settings": state["federation"], "profiles": state["profiles"],
            "wall_seconds": state["counters"]["seconds"] + state["counters"]["eval_seconds"],
            "budget": args.budget, "eval_at": args.eval_at if args.budget else [], "stopped_at_target": False,
            "stopped": None if args.budget and state["counters"]["sim_seconds"] >= args.budget else
            f"by hand after {state['counters']['step']} updates, {state['counters']['sim_seconds']:.1f} simulated s"}
    _write_atomic(folder / "bench.json", json.dumps(done, default=float))


def analyse(folder: Path, targets: list[float]) -> dict:
    from ggfwd.federation.simulate import traffic
    from ggfwd.rundir import read_metrics

    done = json.loads((folder / "bench.json").read_text())
    records = read_metrics(folder)
    rounds = [r for r in records if r.get("step", 0) > 0]
    evals = [(r.get("sim_seconds", 0.0), r["forward_passes"], r["step"], r["eval_accuracy"])
             for r in records if "eval_accuracy" in r]
    reach = {}
    for t in targets:
        hit = next((e for e in evals if e[3] >= t - 1e-12), None)
        reach[t] = None if hit is None else {"sim_seconds": hit[0], "passes": hit[1], "rounds": hit[2]}
    names = done["profiles"]
    idle = busy_total = wasted = 0.0
    slots = 0.0
    idle_by: dict[str, list[float]] = {}
    directions, used, weight, refused = [], {}, {}, 0
    for r in rounds:
        t = r["round_seconds"]
        late = set(r.get("late", [])) | set(r.get("dropped", []))
        directions.append(sum(len(s) for s in r["scalars"].values()))
        for i, s in r["scalars"].items():
            used[names[int(i)]] = used.get(names[int(i)], 0) + len(s)
        for i, (share, _) in r.get("update_shares", {}).items():  # each client's weight in the update
            weight[names[int(i)]] = weight.get(names[int(i)], 0.0) + share / len(rounds)
        refused += len(r.get("refused", {}))
        for i in r.get("selected", []):  # synchronous rounds: who idled while the round waited
            b = min(r["client_seconds"].get(str(i), 0.0), t)
            idle += t - b
            slots += t
            busy_total += b
            wasted += b if i in late else 0.0
            share = idle_by.setdefault(names[i], [0.0, 0.0])
            share[0] += t - b
            share[1] += t
    b = traffic(records)
    last = evals[-1] if evals else (0, 0, 0, float("nan"))
    return {"label": folder.name, "run": done["run"], "seed": done["seed"], "reach": reach,
            "final": {"accuracy": last[3], "sim_seconds": rounds[-1]["sim_seconds"] if rounds else 0.0,
                      "passes": last[1], "rounds": len(rounds)},
            "evals": evals, "bytes_up": b["up"], "bytes_down": b["down"],
            "round_seconds": sum(r["round_seconds"] for r in rounds) / max(1, len(rounds)),
            "idle_share": idle / slots if slots else 0.0, "discarded_share": wasted / busy_total if busy_total else 0.0,
            "directions": sum(directions) / max(1, len(directions)),
            "idle_by_profile": {k: v[0] / v[1] for k, v in idle_by.items() if v[1]},
            "directions_by_profile": {k: v / max(1, sum(used.values())) for k, v in used.items()},
            "weight_by_profile": weight, "refused_reports": refused,
            "accuracy_at": _accuracy_at(evals, done), "stopped": done.get("stopped") or _capped(done, rounds),
            "deadline": done["settings"].get("deadline", 0.0), "wall_seconds": done["wall_seconds"]}


def _capped(done: dict, rounds: list) -> str | None:
    """Why a budgeted run ended before its budget without reaching the target: the --rounds cap."""
    end = rounds[-1]["sim_seconds"] if rounds else 0.0
    if done.get("budget") and end < done["budget"] and not done.get("stopped_at_target"):
        return f"at the --rounds cap after {len(rounds)} updates, {end:.1f} simulated s"
    return None


def _accuracy_at(evals: list, done: dict) -> dict:
    """Accuracy at each point of simulated time: the evaluation taken for it (at the first update at or after
    it); for a run stopped at the target before that point, its last evaluation, marked (True: carried)."""
    out = {}
    for t in done.get("eval_at", []):
        hit = next((e for e in evals if e[0] >= t - 1e-9), None)
        if hit is not None:
            out[t] = (hit[3], False)
        elif done.get("stopped_at_target") and evals:
            out[t] = (evals[-1][3], True)
    return out


def report(args) -> list[dict]:
    for label, run, seed in plan(args):
        folder = args.out / label
        if args.stopped and (folder / "state.json").is_file() and not (folder / "bench.json").is_file():
            stopped_run(folder, run, seed, args)
    results = [analyse(args.out / label, args.targets) for label, _, _ in plan(args)
               if (args.out / label / "bench.json").is_file()]
    if not results:
        raise SystemExit(f"no finished runs in {args.out}")
    if args.budget:
        return report_budget(args, results)
    ts = args.targets
    fmt = lambda x, f: "-" if x is None else f(x)  # noqa: E731
    print(f"SST-2 dev (first {args.eval_limit} rows), evaluated every {args.eval_every} rounds: simulated seconds / "
          f"training forward passes / rounds until each accuracy ('-': not reached in the run)")
    head = " | ".join(f"to {t:.0%}" for t in ts)
    print(f"| run | {head} | last eval | up B | down B | round s | dirs/round | idle % | discarded % |")
    print("|---|" + "---|" * (len(ts) + 7))
    for res in results:
        cells = [fmt(res["reach"][t], lambda h: f"{h['sim_seconds']:.1f} s / {h['passes']} / {h['rounds']}")
                 for t in ts]
        f = res["final"]
        print(f"| {res['label']} | " + " | ".join(cells) + f" | {f['accuracy']:.1%} @ {f['rounds']} rounds, "
              f"{f['sim_seconds']:.1f} s | {res['bytes_up']:.0f} | {res['bytes_down']:.0f} | "
              f"{res['round_seconds']:.2f} | {res['directions']:.1f} | {100 * res['idle_share']:.0f} | "
              f"{100 * res['discarded_share']:.0f} |")
    print()
    for res in results:
        by = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(res["idle_by_profile"].items(), key=lambda kv: kv[1]))
        extra = f"; deadline {res['deadline']:.2f} s" if res["deadline"] else ""
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(res["directions_by_profile"].items(),
                                                                   key=lambda kv: -kv[1]))
        print(f"{res['label']} ({RUNS[res['run']][0]}{extra}): idle share of the round by profile: {by}; "
              f"accepted directions by profile: {share}; {res['wall_seconds']:.0f} s wall")
    _compare(results, ts[-1])
    if args.plot:
        _plot(results, args.plot, ts)
    return results


def _median_range(values: list[float], fmt) -> str:
    import statistics

    if not values or not any(math.isfinite(v) for v in values):
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}-{fmt(max(values))}]"


def report_budget(args, results: list[dict]) -> list[dict]:
    """Runs given the same simulated-time budget, several seeds each: median [range] over the seeds."""
    import math

    runs = [r for r in RUNS if any(res["run"] == r for res in results)]
    by = {r: [res for res in results if res["run"] == r] for r in runs}
    ts = args.targets
    print(f"SST-2 dev (first {args.eval_limit} rows); every run given {args.budget:g} simulated seconds, evaluated "
          f"at the first update at or after each of {', '.join(f'{t:g}' for t in args.eval_at)} s; median "
          f"[range] over seeds; a seed that never reached a target counts as infinitely late")
    print("| run | seeds | " + " | ".join(f"to {t:.0%} (s)" for t in ts) + " | rounds | passes | up B | down B |")
    print("|---|---|" + "---|" * (len(ts) + 4))
    for r in runs:
        cells = []
        for t in ts:
            times = [res["reach"][t]["sim_seconds"] if res["reach"][t] else math.inf for res in by[r]]
            n = sum(math.isfinite(x) for x in times)
            cells.append(_median_range(times, lambda x: "-" if not math.isfinite(x) else f"{x:.1f}")
                         + f" ({n}/{len(times)})")
        print(f"| {r}: {RUNS[r][0]} | {len(by[r])} | " + " | ".join(cells) + " | "
              + _median_range([res["final"]["rounds"] for res in by[r]], lambda x: f"{x:.0f}") + " | "
              + _median_range([res["final"]["passes"] for res in by[r]], lambda x: f"{x:.0f}") + " | "
              + f"{max(res['bytes_up'] for res in by[r]):.0f} | {max(res['bytes_down'] for res in by[r]):.0f} |")
    print()
    points = args.eval_at
    print("Accuracy (%) at fixed simulated seconds, median [range] over seeds (* includes a run stopped at the "
          "target earlier, carried forward)")
    print("| run | " + " | ".join(f"{t:g} s" for t in points) + " |")
    print("|---|" + "---|" * len(points))
    for r in runs:
        cells = []
        for t in points:
            got = [res["accuracy_at"].get(t) for res in by[r]]
            vals = [100 * g[0] for g in got if g is not None]
            mark = "*" if any(g is not None and g[1] for g in got) else ""
            cells.append(_median_range(vals, lambda x: f"{x:.1f}") + mark if len(vals) == len(got) else "-")
        print(f"| {r} | " + " | ".join(cells) + " |")
    print()
    print("Share of accepted directions / of update weight by device profile (mean over seeds):")
    for r in runs:
        profiles = sorted({k for res in by[r] for k in res["directions_by_profile"]} |
                          {k for res in by[r] for k in res["weight_by_profile"]})
        mean = lambda key, k: sum(res[key].get(k, 0.0) for res in by[r]) / len(by[r])  # noqa: E731
        print(f"  {r}: " + ", ".join(f"{k} {100 * mean('directions_by_profile', k):.0f}% / "
                                     f"{100 * mean('weight_by_profile', k):.0f}%" for k in profiles)
              + f"; refused reports {sum(res['refused_reports'] for res in by[r])}")
    for res in results:
        if res["stopped"]:
            print(f"  {res['label']}: stopped {res['stopped']} (accuracy at later points: '-')")
    target = ts[-1]
    print()
    for r in runs:
        for other in ("a", "a2", "c", "c0", "c3"):
            if other == r or other not in by:
                continue
            for res in by[r]:
                base = next((x for x in by[other] if x["seed"] == res["seed"]), None)
                if base is None:
                    continue
                mine, theirs = res["reach"][target], base["reach"][target]
                verdict = (f"{theirs['sim_seconds'] / mine['sim_seconds']:.2f}x sooner" if mine and theirs else
                           {(True, False): f"reached, {other} did not", (False, True): f"not reached, {other} did",
                            (False, False): "neither reached"}[(bool(mine), bool(theirs))])
                print(f"  {r} vs {other}, seed {res['seed']}, to {target:.0%}: {verdict}")
    if args.plot:
        _plot_budget(by, args.plot, ts, points)
    return results


def _plot_budget(by: dict, path: Path, targets: list[float], points: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import warnings

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {r: plt.get_cmap("tab10").colors[i % 10] for i, r in enumerate(by)}
    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)  # points past a stopped run
    for r, results in by.items():
        rows = []
        for res in results:
            rows.append([100 * res["accuracy_at"][t][0] if t in res["accuracy_at"] else np.nan for t in points])
        a = np.asarray(rows, dtype=float)
        xs = [0.0] + list(points)
        zero = [100 * res["evals"][0][3] for res in results if res["evals"]]
        med = [np.median(zero)] + list(np.nanmedian(a, axis=0))
        lo = [min(zero)] + list(np.nanmin(a, axis=0))
        hi = [max(zero)] + list(np.nanmax(a, axis=0))
        ax.plot(xs, med, marker="o", ms=3, color=colours[r], label=f"{r}: {RUNS[r][0]} ({len(results)} seeds)")
        ax.fill_between(xs, lo, hi, color=colours[r], alpha=0.15, linewidth=0)
    for t in targets:
        ax.axhline(100 * t, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("accuracy on dev rows (%): median, range shaded")
    ax.set_title("Heterogeneous fleet, same simulated-time budget (SST-2, Gemma-3-270M Q4_K_M)")
    ax.legend(fontsize=7)
    save_plot(fig, path)


def _compare(results: list[dict], target: float) -> None:
    """How many seeds each run reached `target` in, and each speed-aware run against each baseline seed by
    seed (a mean over the seeds that reached it would compare different seeds)."""
    reached = {(r["run"], r["seed"]): r["reach"][target] for r in results}
    print()
    for run in RUNS:
        seeds = sorted(s for (r, s) in reached if r == run)
        if seeds:
            hits = [s for s in seeds if reached[(run, s)]]
            print(f"{run}: reaches {target:.0%} in {len(hits)} of {len(seeds)} seeds" +
                  "".join(f"; s{s} {reached[(run, s)]['sim_seconds']:.1f} s" for s in hits))
    for run in ("c", "c0", "c3", "d", "e"):
        for other in ("a", "a2", "b"):
            for seed in sorted(s for (r, s) in reached if r == run and (other, s) in reached):
                mine, theirs = reached[(run, seed)], reached[(other, seed)]
                if mine and theirs:
                    verdict = f"{theirs['sim_seconds'] / mine['sim_seconds']:.2f}x sooner"
                else:
                    verdict = {(True, False): f"reached, {other} did not", (False, True): f"not reached, {other} did",
                               (False, False): "neither reached"}[(bool(mine), bool(theirs))]
                print(f"  {run} vs {other}, seed {seed}, to {target:.0%}: {verdict}")


def _plot(results: list[dict], path: Path, targets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = dict(zip(RUNS, ("tab:red", "tab:orange", "tab:purple", "tab:green", "tab:blue", "tab:olive",
                                "tab:cyan", "tab:brown", "tab:pink")))
    for res in results:
        xs = [e[0] for e in res["evals"]]
        ys = [100 * e[3] for e in res["evals"]]
        first = res["label"].endswith(f"s{min(r['seed'] for r in results)}")
        ax.plot(xs, ys, marker="o", ms=3, color=colours[res["run"]], linestyle="-" if first else "--",
                label=f"{res['label']}: {RUNS[res['run']][0]}")
    for t in targets:
        ax.axhline(100 * t, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("accuracy on dev rows (%)")
    ax.set_title("Time to accuracy across heterogeneous devices (SST-2, Gemma-3-270M Q4_K_M)")
    ax.legend(fontsize=7)
    save_plot(fig, path)


def save_plot(fig, path: Path) -> None:
    """Write the figure to `path` atomically (a PNG next to it, then renamed)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    print(f"plot: {path}")


def time_main(argv) -> None:
    bench_main(parse, run_all, report, argv)


def bench_main(parse_args, run, report_runs, argv) -> None:
    """A benchmark mode's command line: the demo model and SST-2 (the tiny model with --smoke) unless given,
    the runs not yet in --out, then the report (and --json)."""
    args = parse_args(argv)
    if not args.report:
        from ggfwd.demo import demo_model, sst2_file

        if args.smoke:
            from smoke_model import tiny_llama

            args.model = args.model or tiny_llama()[1]
        args.model = args.model or demo_model()
        args.data = args.data or sst2_file("train")
        args.eval_data = args.eval_data or sst2_file("dev")
        run(args)
    results = report_runs(args)
    if args.json:
        args.json.write_text(json.dumps(results, default=float))
