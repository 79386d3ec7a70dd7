"""Would a moving average of a run's trajectory score better? Answered: only late in long constant-lr runs.

Replay a finished `ggfwd train` / `bench_convergence` run from its seeds and scalars, and evaluate moving
averages of its trajectory without a single training forward pass.

A run's `metrics.jsonl` holds the loss-difference scalars of every step; with the run's seed they rebuild
each update exactly (`ggfwd.estimator.rebuild`), so the whole trajectory can be replayed. This checks that
property (the replayed adapter must equal the run's final `adapter.gguf` bitwise; the run must have started
from a fresh adapter of the given --rank and --alpha) and answers "would the
average of this trajectory have scored better?" on the same trajectory, a paired comparison.

    python scripts/research/replay_average.py RUNDIR --model M.gguf --eval-data dev.tsv --task sst2 \
        --at 100,200,400 --decays 0.98,0.99
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rundir", type=Path)
    ap.add_argument("--model", type=Path, default=None, help="base GGUF (default: the demo Gemma-3-270M)")
    ap.add_argument("--eval-data", type=Path, default=None, help="default: SST-2 dev")
    ap.add_argument("--eval-limit", type=int, default=256)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--rank", type=int, default=8, help="of the run's fresh adapter")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--at", default="100,200", help="comma-separated steps to evaluate at")
    ap.add_argument("--decays", default="0.98,0.99")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ggfwd.adapter import LoraAdapter
    from ggfwd.averaging import IterateAverage
    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.perturbation import Perturbations
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import load_examples, load_task, tokenize_examples
    from ggfwd.trainer import TrainConfig, read_metrics, read_state
    from ggfwd.update import Replica, advance

    state = read_state(args.rundir)
    c = TrainConfig.from_dict(state["config"])
    points = sorted(int(x) for x in args.at.split(","))
    decays = [float(x) for x in args.decays.split(",")]
    records = {r["step"]: r for r in read_metrics(args.rundir) if "scalars" in r}
    if max(points) > state["step"]:
        raise SystemExit(f"error: the run has {state['step']} steps, cannot evaluate at step {max(points)}")
    task = load_task(args.task)
    with SessionSettings(max_tokens=128, threads=args.threads).open(args.model or demo_model()) as s:
        dev = tokenize_examples(load_examples(args.eval_data or sst2_file("dev"), task, args.eval_limit),
                                task, s.tokenize, s.detokenize, 128)
        adapter = LoraAdapter.create(s.base, rank=args.rank, alpha=args.alpha, seed=c.seed)
        p = Perturbations(adapter, c.seed, c.distribution, c.part, c.layers, c.scaling)
        replica = Replica(adapter.params, p.index, c.update_rule())  # the run's own update, replayed
        theta, idx = replica.theta, p.index
        averages = {d: IterateAverage(p.n, d) for d in decays}
        s.set_adapter(adapter)
        plan = s.plan(dev)

        def evaluate(values):
            full = theta.copy()
            full[idx] = values
            s.set_params(full)
            sc = s.score(plan)
            return f"{100 * sc.accuracy:.1f}% ({sc.loss:.3f})"

        table = Table(title=f"{args.rundir}: trajectory vs its moving averages ({len(dev)} eval rows)")
        for col in ["step", "forward passes", "trained"] + [f"average {d}" for d in decays]:
            table.add_column(col, justify="right")
        for step in range(max(points)):
            r = records[step + 1]
            reports = [] if "rejected" in r else [(0, np.asarray(r["scalars"], np.float32))]
            _, reason = advance(replica, p, step, reports, c.clip)
            if reason is None:
                for a in averages.values():
                    a.update(replica.trained)
            if step + 1 in points:
                table.add_row(str(step + 1), str(r["forward_passes"]), evaluate(theta[idx]),
                              *[evaluate(a.value()) for a in averages.values()])
        Console().print(table)
        if max(points) == state["step"] and c.average_decay == 0:
            final = LoraAdapter.load(args.rundir / "adapter.gguf").params
            print("replayed adapter equals the run's adapter.gguf bitwise:", bool(np.array_equal(final, theta)))


if __name__ == "__main__":
    main()
