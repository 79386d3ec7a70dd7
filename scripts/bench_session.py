"""Session overhead: bare llama_decode loop vs Session scoring with fresh adapter values every evaluation.

Both run in this one process on the same model, the same 16 examples and the same batch shape, interleaved
(bare, session, bare, session, ...) so machine noise hits both alike. Peak RSS is measured in separate
subprocesses: model loaded alone, one plain evaluation, and scoring with adapter reloads.

    python scripts/bench_session.py [--model M.gguf] [--examples 16] [--rounds 8]
    python scripts/bench_session.py --smoke      # seconds: tiny random Llama, 4 examples, 2 rounds

The session is ggfwd's SessionSettings with the examples as its batch size (one sequence per example).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))


def load(args):
    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import load_examples, load_task, tokenize_examples

    model = args.model or str(demo_model())
    task = load_task("sst2")
    examples = load_examples(sst2_file("dev"), task, limit=args.examples)
    session = SessionSettings(batch_size=args.examples, max_tokens=128, threads=args.threads).open(model)
    data = tokenize_examples(examples, task, session.tokenize, session.detokenize, 128)
    return session, data


def bare_decode(session, plan):
    """What llama.cpp does without ggfwd around it: clear memory, decode the same batches."""
    import llama_cpp

    for chunk in plan.chunks:
        llama_cpp.llama_memory_clear(session.mem, True)
        if llama_cpp.llama_decode(session.ctx, chunk.batch) != 0:
            raise RuntimeError("decode failed")
        llama_cpp.llama_get_logits(session.ctx)  # waits for the result


def throughput(args):
    from ggfwd.adapter import LoraAdapter

    session, data = load(args)
    plan = session.plan(data)
    adapter = LoraAdapter.create(session.base, rank=8, seed=0)
    rng = np.random.default_rng(0)
    for name in adapter.targets:
        adapter.b[name][...] = rng.normal(0, 1e-3, adapter.b[name].shape)
    theta = adapter.params.copy()
    z = rng.normal(size=theta.size).astype(np.float32)
    bare_t, sess_t = [], []
    bare_decode(session, plan)  # warm-up
    session.set_adapter(adapter)
    session.score(plan)
    session.set_adapter(None)
    for r in range(args.rounds):
        t = time.perf_counter()
        bare_decode(session, plan)
        bare_t.append(time.perf_counter() - t)
        session.set_adapter(adapter)
        t = time.perf_counter()
        for sign in (1, -1):  # a +eps and a -eps evaluation, each with new adapter values
            session.set_params(theta + sign * 1e-2 * z)
            session.score(plan)
        sess_t.append((time.perf_counter() - t) / 2)
        session.set_adapter(None)
    bare_tps = plan.n_tokens / statistics.median(bare_t)
    sess_tps = plan.n_tokens / statistics.median(sess_t)
    return {"tokens_per_eval": plan.n_tokens, "decodes_per_eval": len(plan.chunks), "bare_tps": bare_tps,
            "session_tps": sess_tps, "ratio": sess_tps / bare_tps}


def rss_child(args):
    from ggfwd.adapter import LoraAdapter

    if args.child == "load":  # the weights alone, no context
        import llama_cpp

        from ggfwd.demo import demo_model
        from ggfwd.session import _quiet_llama

        _quiet_llama(False)
        model = llama_cpp.llama_model_load_from_file((args.model or str(demo_model())).encode(),
                                                     llama_cpp.llama_model_default_params())
        assert model
    else:
        session, data = load(args)
        plan = session.plan(data)
        if args.child == "train-scoring":
            adapter = LoraAdapter.create(session.base, rank=8, seed=0)
            session.set_adapter(adapter)
            z = np.random.default_rng(0).normal(size=adapter.params.size).astype(np.float32)
            for sign in (1, -1, 1, -1):
                session.set_params(adapter.params + sign * 1e-2 * z)
                session.score(plan)
        else:
            session.score(plan)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak_kib / 1024}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int)
    p.add_argument("--smoke", action="store_true",
                   help="seconds: scripts/smoke_model.py's random Llama (unless --model), 4 examples, 2 rounds")
    p.add_argument("--child", choices=["load", "eval", "train-scoring"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return rss_child(args)
    if args.smoke:
        from smoke_model import tiny_llama

        args.model = args.model or str(tiny_llama("f32")[1])
        args.examples, args.rounds = 4, 2

    from rich.console import Console
    from rich.table import Table

    result = throughput(args)
    base = [sys.executable, __file__, "--examples", str(args.examples)]
    base += ["--model", args.model] if args.model else []
    base += ["--threads", str(args.threads)] if args.threads else []
    rss = {}
    for mode in ("load", "eval", "train-scoring"):
        out = subprocess.run(base + ["--child", mode], capture_output=True, text=True, check=True).stdout
        rss[mode] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    table = Table(title=f"bench_session: {args.examples} examples per evaluation, {result['tokens_per_eval']} tokens, "
                        f"{result['decodes_per_eval']} decode(s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("bare llama_decode loop, tokens/s", f"{result['bare_tps']:.0f}")
    table.add_row("Session.score + new adapter values each eval, tokens/s", f"{result['session_tps']:.0f}")
    table.add_row("ratio session / bare (target >= 0.95)", f"{result['ratio']:.3f}")
    table.add_row("peak RSS, model loaded alone, no context (MiB)", f"{rss['load']:.0f}")
    table.add_row("peak RSS, one plain evaluation (MiB)", f"{rss['eval']:.0f}")
    table.add_row("peak RSS, scoring with adapter reloads (MiB)", f"{rss['train-scoring']:.0f}")
    table.add_row("ratio scoring / plain evaluation", f"{rss['train-scoring'] / rss['eval']:.3f}")
    table.add_row("ratio scoring / model loaded alone", f"{rss['train-scoring'] / rss['load']:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
