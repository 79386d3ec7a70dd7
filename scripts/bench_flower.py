#!/usr/bin/env python
"""Flower against the in-process federation: bytes on the wire per node and round, and round latency.

Runs the same federation twice from the same seed, clients and data:
  flower      `ggfwd serve` (a SuperLink + the ServerApp) and --nodes `ggfwd join` SuperNodes, separate processes on
              127.0.0.1 (no TLS unless --tls);
  in-process  `ggfwd federate`'s Federation: every client in one process on one loaded model.
and prints
  - bytes per node and round, measured at the Flower message level (the serialized Message, RecordDict and
    ConfigRecord objects Flower pushes, before HTTP/TLS framing) next to the ggfwd records they carry; the
    join (adapter snapshot) apart;
  - wall seconds per round of each, and their difference: what Flower adds for the same work (each node's warm
    worker scores; the nodes run in parallel, the in-process clients in turn);
  - where a Flower round's time goes, on the critical path (the node whose reply came last), from the times the
    ServerApp and each ClientApp record with GGFWD_TIMING=1 (one machine: one clock): down (push to the
    ClientApp process's start: SuperNode poll, message transfer, SuperExec poll, fork), Flower's ClientApp
    runtime (pull the task, install the app bundle, load the app), worker (the node's scoring, through the
    local channel), up (ClientApp end to the reply's arrival: push, SuperNode's hand-over, transfer, ServerApp
    pull), and the server's own part (aggregate, checkpoint, build the next messages);
  - whether the two adapters are bitwise equal.

    python scripts/bench_flower.py --threads 1                    # Gemma-3-270M, SST-2; a few minutes
    python scripts/bench_flower.py --smoke                        # tiny random model, about a minute

Needs flwr (pip install 'ggfwd[federated]', Python >= 3.11). Every process it starts is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = """name = "always"
description = "bench device, always online"
kind = "laptop"
os = "linux"
backend = "cpu"
threads = 1
source = "bench_flower.py"
[memory]
total_mib = 4096
budget_mib = 2048
source = "bench"
[speed]
overhead_s = 0.01
source = "bench"
[speed.gflops]
default = 50.0
[network]
up_mbps = 10
down_mbps = 40
latency_ms = 50
source = "bench"
[availability]
online = 1.0
source = "bench"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(args, work: Path) -> dict:
    """The model, task, evaluation rows, the training rows as one file, and one file per node (the IID partition
    the in-process federation makes of that file)."""
    from ggfwd.federation.partition import partition

    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from tinytask import make_tiny

        tiny = make_tiny(work / "tiny", n_train=96, n_eval=32)
        model, task, train, evaluation = tiny["model"], str(tiny["task"]), tiny["train"], tiny["eval"]
    else:
        from ggfwd.demo import demo_model, sst2_file
        from ggfwd.tasks import load_examples, load_task

        model, task = args.model or demo_model(), "sst2"
        t = load_task(task)
        train, evaluation = work / "train.jsonl", work / "eval.jsonl"
        for path, source, limit in ((train, sst2_file("train"), args.train_limit),
                                    (evaluation, sst2_file("dev"), args.eval_limit)):
            rows = load_examples(source, t, limit)
            path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))
    rows = Path(train).read_text().splitlines()
    nodes = []
    for i, part in enumerate(partition("iid", None, len(rows), args.nodes, args.seed)):
        path = work / f"node{i}.jsonl"
        path.write_text("".join(rows[j] + "\n" for j in part))
        nodes.append(path)
    (work / "profiles").mkdir(exist_ok=True)
    (work / "profiles" / "always.toml").write_text(PROFILE)
    return {"model": Path(model), "task": task, "train": Path(train), "eval": Path(evaluation), "nodes": nodes,
            "profiles": work / "profiles"}


def settings(args) -> list[str]:
    return ["--batch-size", args.batch_size, "--max-tokens", args.max_tokens, "--rank", args.rank, "--lr", args.lr,
            "--eps", args.eps, "--seed", args.seed, "--clip", args.clip, "--eval-every", 0]


def run_flower(args, d: dict, work: Path) -> tuple[Path, float]:
    """`ggfwd serve` and the nodes; returns the run folder and the wall seconds of the whole run."""
    import psutil

    cmd = [sys.executable, "-m", "ggfwd"]
    port = free_port()
    ports = {port}
    out = work / "flower"
    security = ["--insecure"]
    join_security = ["--insecure"]
    if args.tls:
        certs = work / "certs"
        subprocess.run([*cmd, "certs", str(certs)], check=True, capture_output=True)
        security, join_security = ["--certs", str(certs)], ["--ca", str(certs / "ca.pem")]
    logs, procs = work / "logs", []
    logs.mkdir(exist_ok=True)

    env = {**os.environ, "GGFWD_TIMING": "1"}

    def start(name, *a):
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([*cmd, *map(str, a)], stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=work, env=env))
        return procs[-1]

    started = time.monotonic()
    serve = start("serve", "serve", "--model", d["model"], "--data-eval", d["eval"], "--task", d["task"],
                  "--rounds", args.rounds, "--clients", args.nodes, "--clients-per-round", args.per_round,
                  "--min-nodes", args.nodes, "--host", "127.0.0.1", "--port", port, "--threads", args.threads or 1,
                  "--deadline", 600, "--out", out, *security, *settings(args))
    for i, data in enumerate(d["nodes"]):
        local = free_port()
        ports.add(local)
        start(f"node{i}", "join", "--server", f"127.0.0.1:{port}", "--data", data, "--profile", "laptop-x86",
              "--model", d["model"], "--task", d["task"], "--client-id", i, "--threads", args.threads or 1,
              "--local-port", local, "--state", work / f"state{i}", *join_security)
    try:
        code = serve.wait(args.timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        seconds = time.monotonic() - started
        pids = set()
        for p in procs:
            try:
                pids |= {p.pid} | {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        for q in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(q.info["cmdline"] or [])
            if q.pid != os.getpid() and any(f":{p}" in line or f" {p}" in line for p in ports):
                pids.add(q.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for p in procs:
            p.wait()
    if code != 0:
        tail = (logs / "serve.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"ggfwd serve failed ({'timed out' if code is None else code}):\n{tail}")
    return out, seconds


def run_in_process(args, d: dict, work: Path):
    from ggfwd.federation.simulate import FedConfig, Federation
    from ggfwd.inputs import RunInputs
    from ggfwd.modelstats import ModelStats
    from ggfwd.profiles import load_profile
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import load_task
    from ggfwd.trainer import TrainConfig

    cfg = TrainConfig(steps=args.rounds, batch_size=args.batch_size, lr=args.lr, eps=args.eps, seed=args.seed,
                      clip=args.clip, eval_every=0)
    inputs = RunInputs(model=str(d["model"]), data=str(d["train"]), eval_data=str(d["eval"]), task=d["task"],
                       rank=args.rank, max_tokens=args.max_tokens)
    fed = FedConfig(clients=args.nodes, clients_per_round=args.per_round, partition="iid")
    profiles = [load_profile("always", dirs=[d["profiles"]])] * args.nodes
    out = work / "in-process"
    out.mkdir()
    settings_ = SessionSettings(max_tokens=args.max_tokens, threads=args.threads, kind=load_task(d["task"]).kind)
    with settings_.open(inputs.model) as session:
        train, evaluation, adapter = inputs.load(session, cfg.seed)
        run = Federation(session, adapter, train, cfg, out, eval_data=evaluation, inputs=inputs, fed=fed,
                         profiles=profiles, model_stats=ModelStats.from_gguf(inputs.model))
        run.run()
        return run.theta.copy(), run.run_dir.read_metrics()


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def breakdown(work: Path, nodes: int, rounds: list[dict]) -> dict | None:
    """Mean seconds of each part of a train exchange on its critical path (see the module's docstring), over the
    rounds after the first (in the first, a node's worker may still be opening the model: it warms up right
    after answering the hello)."""
    def lines(path):
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    exchanges = [e for e in lines(work / "flower" / "flower-timing.jsonl") if e["kind"] == "train"]
    exchanges = exchanges[1:] if len(rounds) > 1 else exchanges
    rounds = rounds[1:] if len(rounds) > 1 else rounds
    apps = [a for i in range(nodes) for a in lines(work / f"state{i}" / "timing.jsonl") if a["kind"] == "train"]
    parts = []
    for e in exchanges:
        if not e["replies"]:
            continue
        node, arrived = max(e["replies"].items(), key=lambda kv: kv[1])
        app = [a for a in apps if str(a["node"]) == node and e["push"] <= a["in"] <= arrived]
        if len(app) != 1 or app[0].get("process") is None or "call_s" not in app[0]:
            continue
        a = app[0]
        parts.append({"exchange": arrived - e["push"], "down": a["process"] - e["push"],
                      "runtime": a["in"] - a["process"], "worker": a["call_s"],
                      "clientapp": a["out"] - a["in"] - a["call_s"], "up": arrived - a["out"]})
    if not parts:
        return None
    out = {k: mean(p[k] for p in parts) for k in parts[0]}
    out["server"] = mean(r["round_seconds"] for r in rounds) - out["exchange"] * len(exchanges) / max(1, len(rounds))
    return out


def summarize(flower: list[dict], local: list[dict], equal: bool, flower_seconds: float) -> dict:
    rounds = [r for r in flower if r.get("step", 0) > 0]
    steady = [r for r in rounds if r["snapshots"] == 0 and not r.get("joiners")]
    per_node = lambda rs, key: [v for r in rs for v in r[key].values()]
    down_payload = [(r["bytes_down"] - r["snapshot_bytes"]) / len(r["selected"]) for r in steady]
    up_payload = [r["bytes_up"] / max(1, len(r["accepted"])) for r in rounds]
    joins = [r for r in rounds if r.get("joiners")]
    snaps = [r for r in rounds if r["snapshots"]]
    local_rounds = [r for r in local if r.get("step", 0) > 0]
    local_seconds = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + local_rounds, local_rounds)]
    return {
        "rounds": len(rounds), "bitwise_equal": equal,
        "up_record": mean(up_payload), "up_wire": mean(per_node(rounds, "wire_up")),
        "down_records": mean(down_payload), "down_wire": mean(per_node(steady, "wire_down")) if steady else None,
        "joins": sum(len(r["joiners"]) for r in joins),
        "join_records": mean(r["join_bytes"] / len(r["joiners"]) for r in joins) if joins else None,
        "join_wire": mean(r["wire_down"][str(c)] for r in joins for c in r["joiners"]) if joins else None,
        "snapshot_records": mean(r["snapshot_bytes"] / r["snapshots"] for r in snaps) if snaps else None,
        "flower_round_s": mean(r["round_seconds"] for r in rounds),
        "flower_first_round_s": rounds[0]["round_seconds"] if rounds else None,
        "flower_later_round_s": mean(r["round_seconds"] for r in rounds[1:]) if len(rounds) > 1 else None,
        "in_process_round_s": mean(local_seconds), "flower_total_s": flower_seconds,
    }


def report(s: dict, args) -> None:
    print(f"bench_flower: {args.nodes} nodes, {args.per_round} per round, {s['rounds']} rounds, batch "
          f"{args.batch_size}, {'TLS' if args.tls else 'no TLS'}, {args.threads or 1} thread(s) per process")
    print("| per node and round | ggfwd records (B) | Flower messages (B) |")
    print("|---|---|---|")
    print(f"| up: report | {s['up_record']:.0f} | {s['up_wire']:.0f} |")
    if s["down_wire"] is not None:
        print(f"| down: instruction + missed broadcasts | {s['down_records']:.0f} | {s['down_wire']:.0f} |")
    if s["join_wire"] is not None:
        print(f"| down, once per joining node ({s['joins']}): missed broadcasts + instruction | "
              f"{s['join_records']:.0f} (history) | {s['join_wire']:.0f} |")
    if s["snapshot_records"] is not None:
        print(f"| down, a node that asked for the adapter: snapshot of the trained values | "
              f"{s['snapshot_records']:.0f} | - |")
    print(f"round wall seconds: flower {s['flower_round_s']:.2f} (first {s['flower_first_round_s']:.2f}, later "
          f"{s['flower_later_round_s']:.2f}), in-process {s['in_process_round_s']:.2f}; Flower adds "
          f"{s['flower_round_s'] - s['in_process_round_s']:.2f} s per round")
    if s.get("breakdown"):
        b = s["breakdown"]
        print(f"a Flower round after the first, critical path (s): down {b['down']:.2f} (SuperNode poll, transfer, SuperExec poll, "
              f"fork) + ClientApp runtime {b['runtime']:.2f} + worker {b['worker']:.2f} + ClientApp rest "
              f"{b['clientapp']:.2f} + up {b['up']:.2f} (push, SuperNode hand-over, transfer, ServerApp pull) = "
              f"exchange {b['exchange']:.2f}; server {b['server']:.2f}")
    print(f"flower run end to end (SuperLink start to exit): {s['flower_total_s']:.1f} s")
    print(f"adapters bitwise equal: {'yes' if s['bitwise_equal'] else 'NO'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="base GGUF (default: the demo Gemma-3-270M)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=600)
    p.add_argument("--eval-limit", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.add_argument("--tls", action="store_true", help="serve with TLS (certificates made by ggfwd certs)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the Flower run may take")
    p.add_argument("--work", type=Path, default=Path("runs/bench_flower"), help="a new folder for the runs")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 3 rounds")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.max_tokens, args.rank, args.batch_size, args.lr = 3, 64, 4, 8, 0.05
        args.threads = args.threads or 1
    if args.work.exists():
        raise SystemExit(f"--work {args.work} exists: choose a new folder")
    args.work.mkdir(parents=True)
    work = args.work.resolve()
    d = prepare(args, work)
    out, seconds = run_flower(args, d, work)
    theta, local = run_in_process(args, d, work)
    from ggfwd.adapter import LoraAdapter
    from ggfwd.rundir import read_metrics

    import numpy as np

    equal = bool(np.array_equal(LoraAdapter.load(out / "adapter.gguf").params, theta))
    s = summarize(read_metrics(out), local, equal, seconds)
    s["breakdown"] = breakdown(work, args.nodes, [r for r in read_metrics(out) if r.get("step", 0) > 0])
    report(s, args)
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
