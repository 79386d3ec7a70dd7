"""`ggfwd federate`: the in-process federated simulation (all clients in one process, on one loaded model).

With no arguments it runs a federated demo on the packaged Gemma-3-270M and SST-2: 10 clients on three device
profiles with Dirichlet(0.5) label skew, 4 per round, 30 rounds, evaluated on 256 dev rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..progress import progress_bar
from ..modelstats import ModelStats
from ..run import assemble, inputs_given, plan_run
from .train import _previous_metrics
from .options import LR_SCALE_MAX_OPTION, LR_SCALING_OPTION, MEMORY_OPTION, SPREAD_OPTION, flag

err = Console(stderr=True)

DEMO = {"steps": 30, "eval_every": 10, "batch_size": 8, "clip": 5.0}
DEMO_DEVICES = "laptop-x86:4,phone-midrange:4,pi5:2"
_FED_OPTIONS = ("steps", "lr", "eps", "directions", "batch_size", "optimizer", "seed", "average_decay",
                "eval_every", "checkpoint_every", "clip", "lr_scaling", "lr_scale_max",
                "spread")
_FEDERATION_OPTIONS = ("clients", "devices", "partition", "clients_per_round", "deadline", "max_lag", "weighting", "dropout",
                       "hostile", "allocation", "pacing", "target", "max_directions", "min_clients", "pacing_max",
                       "downweight", "sampling", "candidates", "mode", "max_staleness", "client_memory")


def federate_command(
    clients: Optional[int] = typer.Option(None, "--clients", help="Number of clients (devices) \\[default: 10]."),
    devices: Optional[str] = typer.Option(None, "--devices", help=f"Device profiles as PROFILE:COUNT,... adding up to --clients \\[default: {DEMO_DEVICES}]."),
    partition: Optional[str] = typer.Option(None, "--partition", help="iid, dirichlet:ALPHA (label skew) or count:N1,N2,... \\[default: dirichlet:0.5]."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help=f"Rounds (one update each) \\[default: {DEMO['steps']}]."),
    clients_per_round: Optional[int] = typer.Option(None, "--clients-per-round", help="Clients sampled per round (among those online); with --mode async, reports per update \\[default: 4]."),
    mode: Optional[str] = typer.Option(None, "--mode", help="sync: rounds of sampled clients; async: every client works back to back, an update per --clients-per-round reports (needs --max-staleness) \\[default: sync]."),
    max_staleness: Optional[int] = typer.Option(None, "--max-staleness", help="Reports count while at most this many updates old, and with client memory every update reuses each client's latest report that long (0: off) \\[default: 0]."),
    client_memory: Optional[bool] = typer.Option(None, "--client-memory/--no-client-memory", help="With --max-staleness: keep every client's latest report for later updates (MIFA), or count each report once at its staleness weight (FedBuff) \\[default: client memory]."),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Simulated seconds a round waits for reports (0: waits for all) \\[default: 0]."),
    max_lag: Optional[int] = typer.Option(None, "--max-lag", help="Most rounds a client (or a joiner) replays from the run's history of broadcasts; further behind, or when the history is larger, it gets the trained values \\[default: 1000]."),
    weighting: Optional[str] = typer.Option(None, "--weighting", help="Clients' weights in a round's update: examples (by training-set size, capped at 4x the round's median), equal, or directions (every direction the same) \\[default: examples]."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Chance that a selected client drops mid-round (its work is discarded) \\[default: 0]."),
    hostile: Optional[str] = typer.Option(None, "--hostile", help="N:KIND: the last N clients send scalars x1e6 (scale), NaN (nan) or with random signs (signs)."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Directions per client: uniform (--directions each), schedule (FwdLLM's 1-3-5-10 by progress) or speed (as many as fit the round's deadline by the device profile) \\[default: uniform]."),
    pacing: Optional[str] = typer.Option(None, "--pacing", help="Directions per round: fixed, variance (raised while the scalars' variance is above its starting level) or trend (doubled when the training loss stops falling measurably; per job with --mode async); logged per round \\[default: fixed]."),
    target: Optional[int] = typer.Option(None, "--target", help="Directions per round for --allocation speed and --pacing variance (0: clients per round x directions) \\[default: 0]."),
    max_directions: Optional[int] = typer.Option(None, "--max-directions", help="Most directions one client gets in a round with --allocation speed \\[default: 16]."),
    min_clients: Optional[int] = typer.Option(None, "--min-clients", help="With --allocation speed and a target: lengthen the round until at least this many selected clients finish one direction (breadth under label skew) \\[default: 0]."),
    pacing_max: Optional[int] = typer.Option(None, "--pacing-max", help="Most directions per round (per job with --mode async) --pacing may ask for \\[default: 64]."),
    downweight: Optional[float] = typer.Option(None, "--downweight", help="Down-weight clients that miss deadlines in sampling: decay of their miss count per round (0: off) \\[default: 0]."),
    sampling: Optional[str] = typer.Option(None, "--sampling", help="random, discriminative (top-K of --candidates by |cosine| with the last update) or unbiased (importance-weighted) \\[default: random]."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Candidate directions per client and round for --sampling discriminative/unbiased \\[default: 64]."),
    clip: Optional[float] = typer.Option(None, "--clip", help=f"Limit scalars to CLIP x the median client's median |s| (0: off) \\[default: {DEMO['clip']}]."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Base GGUF model (default: the demo Gemma-3-270M)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="Initial LoRA adapter GGUF (default: a fresh one)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Training data split among the clients (default: SST-2 train)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Built-in task name or a task file \\[default: sst2]."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data, scored at the server (default with the demo: SST-2 dev)."),
    train_limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N training examples."),
    eval_limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N evaluation examples."),
    min_words: Optional[int] = typer.Option(None, min=0, help="Train only on examples of at least N words \\[default: 0, all]."),
    rank: Optional[int] = typer.Option(None, help="Rank of a fresh adapter \\[default: 8]."),
    alpha: Optional[float] = typer.Option(None, help="Alpha of a fresh adapter \\[default: 16]."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated weight patterns for a fresh adapter \\[default: attn_q,attn_v]."),
    max_tokens: Optional[int] = typer.Option(None, help="Longest example in tokens \\[default: 128]."),
    memory: Optional[str] = MEMORY_OPTION,
    lr: Optional[float] = typer.Option(None, help="Base learning rate, for one direction \\[default: 0.02, sgd]."),
    lr_scaling: Optional[str] = LR_SCALING_OPTION,
    lr_scale_max: Optional[float] = LR_SCALE_MAX_OPTION,
    spread: Optional[str] = SPREAD_OPTION,
    eps: Optional[float] = typer.Option(None, help="Perturbation size \\[default: 0.1]."),
    directions: Optional[int] = typer.Option(None, help="Directions per client and round \\[default: 1]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help=f"Examples per client and round \\[default: {DEMO['batch_size']}]."),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adam."),
    seed: Optional[int] = typer.Option(None, help="Run seed: partitions, sampling, batches and directions derive from it."),
    average_decay: Optional[float] = typer.Option(None, "--average", help="Evaluate and save a moving average of the adapter (0: off)."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N rounds (0: only at start and end)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Commit a checkpoint every N rounds and at the end \\[default: 1]."),
    profiles_dir: Optional[Path] = typer.Option(None, "--profiles", help="Extra folder of device profile TOML files."),
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads (default: physical cores)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/federate-TIMESTAMP)."),
    resume: bool = flag("--resume", help="Continue the federation in --out from its last checkpoint."),
    verbose: bool = flag("--verbose", "-v", help="Show llama.cpp's log."),
):
    steps = rounds
    given = {k: v for k, v in locals().items() if k in _FED_OPTIONS and v is not None}
    fed_given = {k: v for k, v in locals().items() if k in _FEDERATION_OPTIONS and v is not None}
    run = plan_run("federate", given, inputs_given(locals()), out, resume, DEMO, fed_given, {"devices": DEMO_DEVICES})
    profiles = run.profiles(profiles_dir)
    stats = ModelStats.from_gguf(run.inputs.model)
    with run.inputs.session_settings(threads).open(run.inputs.model, verbose=verbose) as session:
        _run_live(assemble(run, session, profiles=profiles, model_stats=stats), run.out)


def _run_live(fed, out: Path) -> None:
    c, f, k = fed.config, fed.fed, fed.counters
    state = {"acc": None, "acc0": None}
    for r in _previous_metrics(out):
        _note(state, r)
    kinds = sorted({p.name for p in fed.profiles})
    err.print(f"[bold]ggfwd federate[/] -> {out}  ({f.clients} clients on {', '.join(kinds)}, partition "
              f"{f.partition}, "
              + (f"asynchronous: an update per {f.clients_per_round} reports, memory {f.max_staleness} updates, "
                 if f.mode == "async" else f"{f.clients_per_round} per round, ")
              + f"{c.directions} direction(s) of {c.batch_size} "
              f"examples each, {fed.perturbations.n} trained values)")
    with progress_bar(err, info=True) as bar:
        job = bar.add_task("rounds", total=c.steps, completed=k.step, info="")

        def on_round(r):
            _note(state, r)
            acc = "" if state["acc"] is None else f"acc {state['acc']:.1%}  "
            late = len(r.get("late", [])) + len(r.get("dropped", []))
            info = (f"{acc}sim {k.sim_seconds / 60:.1f} min  up {k.bytes_up / 1024:.1f} KiB  "
                    f"down {k.bytes_down / 1024:.1f} KiB  lost {late}")
            bar.update(job, completed=k.step, info=info)
            for i, why in r.get("refused", {}).items():
                err.print(f"round {r['step']}: refused client {i}: {why}")

        fed.run(on_step=on_round)
    err.print(f"done: {k.step} rounds ({k.rejected} without an update), simulated {k.sim_seconds / 60:.1f} min, "
              f"{k.forward_passes} forward passes, {k.seconds:.0f} s of CPU time + {k.eval_seconds:.0f} s evaluation")
    from ..federation.simulate import traffic

    b = traffic(fed.run_dir.read_metrics())
    err.print(f"bytes per client and round: up {b['up']:.0f}, down {b['down']:.0f} (instruction and missed broadcasts); "
              f"a dense LoRA exchange would be {4 * fed.perturbations.n} each way")
    err.print(f"{b['joined']} clients joined by replaying the run's history (or a snapshot where smaller): "
              f"{b['join_bytes']:.0f} bytes each on average, at most {b['join_max']:.0f}; snapshot of the trained "
              f"values now {len(fed.server.snapshot())} bytes"
              + (f"; {b['snapshots']} snapshots of {b['snapshot_bytes']:.0f} bytes to clients too far behind"
                 if b["snapshots"] else ""))
    if state["acc"] is not None:
        err.print(f"eval accuracy {state['acc0']:.1%} at start -> {state['acc']:.1%}")
    err.print(f"adapter: {out / 'adapter.gguf'}   metrics: {out / 'metrics.jsonl'}   plot: ggfwd plot {out}")


def _note(state: dict, r: dict) -> None:
    if "eval_accuracy" in r:
        state["acc"] = r["eval_accuracy"]
        if r["step"] == 0:
            state["acc0"] = r["eval_accuracy"]

