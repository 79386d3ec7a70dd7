"""Convergence at a fixed budget of forward passes: SST-2, Gemma-3-270M.

Three engines, each in its own process (so wall time and peak RSS are its own), all driven by ggfwd's
Trainer (same batches, same seeded directions, same estimator and optimizer code):

- ggfwd: the ggfwd recipe through llama.cpp on the Q4_K_M GGUF.
- naive: the baseline recipe of the project notes through llama.cpp (SGD without momentum, unit-variance
  directions, eps 3e-2, lr 2e-3, constant schedule).
- torch: the ggfwd recipe in PyTorch fp32 on the same GGUF dequantized by transformers, LoRA applied by hand
  on q_proj/v_proj (MeZO-style baseline at equal forward passes).

Token ids are produced once by llama.cpp in the parent and shared, so every engine scores identical inputs.

    python scripts/bench_convergence.py --steps 150 --eval-every 50            # ~15-25 min on 2 cores
    python scripts/bench_convergence.py --engines ggfwd --steps 400 --full-dev  # the 872-row target
    python scripts/bench_convergence.py --smoke     # seconds: tiny random Llama (F32), 2 steps of 4 rows, 8 dev rows
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))

from ggfwd.estimator import passes_per_step  # noqa: E402
from ggfwd.trainer import TrainConfig  # noqa: E402

MAX_TOKENS = 128  # ggfwd train's default
NAIVE = dict(optimizer="sgd", momentum=0.0, scaling="unit", eps=3e-2, lr=2e-3, schedule="constant", warmup=0,
             directions=1, scheme="central", distribution="gaussian", normalize="none", part="b")


def recipe(args) -> dict:
    return dict(optimizer=args.optimizer, momentum=args.momentum, lr=args.lr, eps=args.eps, scaling="tensor",
                schedule=args.schedule, warmup=args.warmup, directions=args.directions, layers=args.layers,
                scheme=args.scheme, distribution=args.distribution, normalize=args.normalize,
                average_decay=args.average)


# --------------------------------------------------------------------------- torch engine

class TorchSession:
    """Just what Trainer needs from a Session, computed by PyTorch fp32 on the dequantized GGUF."""

    def __init__(self, model_path: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        from ggfwd.base import read_base

        torch.set_num_threads(threads)
        self.torch = torch
        self.base = read_base(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                          dtype=torch.float32).eval()
        self.buf = None

    def set_adapter(self, adapter):
        from fidelity import hf_row_orders

        torch = self.torch
        self.buf = adapter.params.copy()
        layers = self.model.model.layers
        scale = adapter.scale
        rows = hf_row_orders(self.base.path)  # llama q/k: B's rows are in GGUF order
        for name, (a_sl, b_sl) in adapter.slices().items():
            _, idx, kind, _ = name.split(".")
            proj = getattr(layers[int(idx)].self_attn, {"attn_q": "q_proj", "attn_v": "v_proj"}[kind])
            out_dim, in_dim = adapter.shapes[name]
            a = torch.from_numpy(self.buf[a_sl]).view(adapter.rank, in_dim)  # views: set_params is a copy
            b = torch.from_numpy(self.buf[b_sl]).view(out_dim, adapter.rank)
            order = torch.as_tensor(rows[name]) if name in rows else None
            proj.register_forward_hook(lambda mod, inp, out, a=a, b=b, order=order:
                                       out + scale * (inp[0] @ a.T) @ (b if order is None else b[order]).T)

    def set_params(self, params):
        self.buf[...] = params

    def plan(self, data):
        from fidelity import padded_batches

        return (data, list(padded_batches(data.examples, 16)))

    def score(self, plan):
        from fidelity import class_logits

        from ggfwd.session import Scores

        torch = self.torch
        data, chunks = plan
        classes = torch.from_numpy(data.classes.astype(np.int64))
        losses, correct, tokens = [], [], 0
        with torch.no_grad():
            for ids, mask, last, target in chunks:
                z = class_logits(self.model, classes, ids, mask, last).double().numpy()
                target = target.numpy()
                lse = np.logaddexp.reduce(z, axis=1)
                losses.append(lse - z[np.arange(len(z)), target])
                correct.append(z.argmax(1) == target)
                tokens += int(mask.sum())
        return Scores(np.concatenate(losses), np.concatenate(correct), tokens)


# --------------------------------------------------------------------------- token ids, shared as JSON

def save_tokens(path: Path, parts: dict) -> None:
    """Tokenized data sets (ggfwd.tasks.TokenizedData, classification) as JSON, for the engine processes."""
    def encode(d):
        t = d.task
        return {"task": [t.name, t.kind, t.template, list(t.labels), list(t.verbalizers)],
                "classes": d.classes.tolist(), "n_truncated": d.n_truncated, "labels": d.labels.tolist(),
                "examples": [[e.tokens.tolist(), e.positions.tolist(), e.targets.tolist()] for e in d.examples]}

    path.write_text(json.dumps({name: encode(d) for name, d in parts.items()}))


def load_tokens(path: Path) -> dict:
    from ggfwd.tasks import Task, TokenizedData, TokenizedExample

    def decode(d):
        name, kind, template, labels, verbalizers = d["task"]
        examples = [TokenizedExample(*(np.asarray(x, np.int32) for x in e)) for e in d["examples"]]
        return TokenizedData(Task(name, kind, template, tuple(labels), tuple(verbalizers)), examples,
                             np.asarray(d["classes"], np.int32), d["n_truncated"], np.asarray(d["labels"], np.int32))

    return {name: decode(d) for name, d in json.loads(path.read_text()).items()}


# --------------------------------------------------------------------------- worker

def worker(spec: dict) -> dict:
    from ggfwd.adapter import LoraAdapter
    from ggfwd.trainer import Trainer, read_metrics

    parts = load_tokens(Path(spec["tokens"]))
    train, dev = parts["train"], parts["dev"]
    model = Path(spec["model"])
    start = time.perf_counter()
    if spec["engine"] == "torch":
        session = TorchSession(model, spec["threads"])
    else:
        from ggfwd.session import SessionSettings

        # ggfwd train's session for this batch size
        session = SessionSettings(batch_size=spec["config"]["batch_size"], max_tokens=MAX_TOKENS,
                                  threads=spec["threads"]).open(model)
    load_seconds = time.perf_counter() - start
    adapter = LoraAdapter.create(session.base, rank=8, alpha=16.0, seed=spec["config"]["seed"])
    run = Path(spec["run"])
    run.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(session, adapter, train, TrainConfig.from_dict(spec["config"]), run, eval_data=dev)
    trainer.run(on_step=lambda r: print(json.dumps({k: r[k] for k in ("step", "eval_accuracy", "eval_loss")
                                                    if k in r}), flush=True) if "eval_accuracy" in r else None)
    wall = time.perf_counter() - start
    k = trainer.counters
    return {"engine": spec["engine"], "batch_size": spec["config"]["batch_size"],
            "curve": [(r["forward_passes"], r["eval_accuracy"], r["eval_loss"])
                      for r in read_metrics(run) if "eval_accuracy" in r],
            "forward_passes": k.forward_passes, "tokens": k.tokens, "train_seconds": k.seconds,
            "eval_seconds": k.eval_seconds, "load_seconds": load_seconds, "wall_seconds": wall,
            "cpu_seconds": (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --------------------------------------------------------------------------- parent

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="ggfwd,naive,torch")
    ap.add_argument("--steps", type=int, default=150, help="steps; forward passes = 2 x directions x steps")
    ap.add_argument("--passes", type=int, default=None,
                    help="budget of training forward passes per engine (overrides --steps; then --eval-every "
                         "counts forward passes too)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-limit", type=int, default=256, help="first N dev rows (872 = all)")
    ap.add_argument("--full-dev", action="store_true", help="evaluate on all 872 dev rows")
    ap.add_argument("--train-limit", type=int, default=4000)
    ap.add_argument("--min-words", type=int, default=0, help="train only on rows with at least N words")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--momentum", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None, help="default: the ggfwd train default")
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--schedule", default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--directions", type=int, default=1)
    ap.add_argument("--scheme", default=None, help="central, forward, centred or central4 (see ggfwd/estimator.py)")
    ap.add_argument("--distribution", default=None)
    ap.add_argument("--normalize", default=None)
    ap.add_argument("--average", type=float, default=None,
                    help="decay of the evaluated moving average of the adapter (0: off; default: ggfwd train's)")
    ap.add_argument("--task", default="sst2", help="built-in task: sst2 (ggfwd's prompt) or sst2-plain (the notes')")
    ap.add_argument("--layers", default=None, help="comma-separated layer patterns (e.g. attn_v)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report", type=Path, nargs="+", help="only print the table of finished runs (folders)")
    ap.add_argument("--model", type=Path, default=None, help="base GGUF (default: the demo Gemma-3-270M)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: scripts/smoke_model.py's random Llama (F32) unless --model, all three engines, "
                         "2 steps of 4 rows from 32 train rows, evaluated on 8 dev rows after each step")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        results = [json.loads(p.read_text()) for d in args.report for p in sorted(d.glob("*.json"))
                   if not p.name.endswith(".spec.json") and p.name not in ("summary.json", "tokens.json")]
        report(results, None)
        return
    if args.worker:
        spec = json.loads(args.worker.read_text())
        result = worker(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.session import SessionSettings, default_threads
    from ggfwd.tasks import load_examples, load_task, tokenize_examples

    if args.smoke:
        from smoke_model import tiny_llama

        args.model = args.model or tiny_llama("f32")[1]
        args.steps, args.passes, args.eval_every, args.batch_size = 2, None, 1, 4
        args.train_limit, args.eval_limit, args.full_dev = 32, 8, False

    defaults = TrainConfig()
    args.optimizer = args.optimizer or defaults.optimizer
    args.momentum = args.momentum if args.momentum is not None else defaults.momentum
    args.lr = args.lr if args.lr is not None else defaults.lr
    args.eps = args.eps if args.eps is not None else defaults.eps
    args.schedule = args.schedule or defaults.schedule
    args.warmup = args.warmup if args.warmup is not None else defaults.warmup
    args.layers = args.layers.split(",") if args.layers else None
    args.scheme = args.scheme or defaults.scheme
    args.distribution = args.distribution or defaults.distribution
    args.normalize = args.normalize or defaults.normalize
    args.average = args.average if args.average is not None else defaults.average_decay
    threads = args.threads or default_threads()
    model = args.model or demo_model()
    out = args.out or Path(tempfile.mkdtemp(prefix="ggfwd-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(args.task)
    eval_limit = None if args.full_dev else args.eval_limit
    with SessionSettings(max_tokens=MAX_TOKENS, threads=threads).open(model) as s:
        tok = lambda ex: tokenize_examples(ex, task, s.tokenize, s.detokenize, MAX_TOKENS)
        train = tok(load_examples(sst2_file("train"), task, args.train_limit, args.min_words))
        dev = tok(load_examples(sst2_file("dev"), task, eval_limit))
    save_tokens(out / "tokens.json", {"train": train, "dev": dev})
    base = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every)
    print(f"bench: task {task.name}, {len(train)} train rows (>= {args.min_words} words), {len(dev)} dev rows, "
          f"{f'{args.passes} forward passes' if args.passes else f'{args.steps} steps'}, {threads} threads -> {out}")
    results = []
    for engine in args.engines.split(","):
        config = {**base, **(NAIVE if engine == "naive" else recipe(args))}
        if args.passes:
            per = passes_per_step(config["scheme"], config["directions"])
            config.update(steps=max(1, args.passes // per), eval_every=max(1, args.eval_every // per))
        spec = {"engine": engine, "model": str(model), "tokens": str(out / "tokens.json"), "threads": threads,
                "config": config, "run": str(out / engine), "result": str(out / f"{engine}.json")}
        (out / f"{engine}.spec.json").write_text(json.dumps(spec))
        print(f"--- {engine}: {json.dumps(config)}", flush=True)
        rc = subprocess.call([sys.executable, __file__, "--worker", str(out / f"{engine}.spec.json")])
        if rc != 0:
            print(f"{engine} failed with exit code {rc}")
            continue
        results.append(json.loads((out / f"{engine}.json").read_text()))
    report(results, len(dev))
    (out / "summary.json").write_text(json.dumps(results, indent=1))


def report(results: list[dict], n_dev: int) -> None:
    from rich.console import Console
    from rich.table import Table

    points = sorted({fp for r in results for fp, _, _ in r["curve"]})
    rows = f"{n_dev} rows" if n_dev else "dev rows"
    batches = sorted({r.get("batch_size", 16) for r in results}) or [16]
    t = Table(title=f"SST-2 dev accuracy ({rows}; dev loss) vs training forward passes "
                    f"(batch {', '.join(map(str, batches))})")
    t.add_column("forward passes", justify="right")
    for r in results:
        t.add_column(r["engine"], justify="right")
    for fp in points:
        row = [str(fp)]
        for r in results:
            hit = [f"{100 * acc:.1f}% ({loss:.3f})" for p, acc, loss in r["curve"] if p == fp]
            row.append(hit[0] if hit else "")
        t.add_row(*row)
    for label, key, fmt in [("train seconds", "train_seconds", "{:.0f}"), ("eval seconds", "eval_seconds", "{:.0f}"),
                            ("wall seconds", "wall_seconds", "{:.0f}"), ("CPU seconds", "cpu_seconds", "{:.0f}"),
                            ("tokens/s (train)", None, None),
                            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}")]:
        if key is None:
            t.add_row(label, *[f"{r['tokens'] / r['train_seconds']:.0f}" for r in results])
        else:
            t.add_row(label, *[fmt.format(r[key]) if key in r else "-" for r in results])
    for target in (0.83, 0.88):
        t.add_row(f"passes to {target:.0%}", *[str(next((p for p, a, _ in r["curve"] if a >= target), "-"))
                                                for r in results])
    Console().print(t)


if __name__ == "__main__":
    main()
