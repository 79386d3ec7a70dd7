"""`ggfwd train`, `ggfwd calibrate` and `ggfwd plot`.

`ggfwd train` with no arguments runs the demo: Gemma-3-270M Q4_K_M, a fresh rank-8 LoRA on attn_q/attn_v,
SST-2 train sentences for training and the first 256 dev rows for evaluation. `ggfwd calibrate` measures the
loss noise floor and curvature on two batches and reports the eps it would choose (`ggfwd.calibration`);
`ggfwd train --calibrate` does the same on the run's first two batches and trains with that eps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console

from ..errors import UserError
from ..estimator import passes_per_step
from ..progress import progress_bar
from ..session import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, SessionSettings
from ..run import assemble, inputs_given, plan_run
from ..trainer import TrainConfig, batch_indices, read_metrics
from .options import LR_SCALE_MAX_OPTION, LR_SCALING_OPTION, MEMORY_OPTION, SPREAD_OPTION, flag

err = Console(stderr=True)

# Demo settings, chosen by measurement on Gemma-3-270M Q4_K_M (see docs/convergence.md, "The default recipe");
# the demo's data limits are ggfwd.run.DEMO_LIMITS.
DEMO = dict(steps=150, eval_every=50)
CALIBRATION_BATCHES = 2  # train --calibrate measures on the run's first two batches

# CLI option name -> TrainConfig field, for the options that shape the trajectory.
_TRAIN_OPTIONS = ("steps", "lr", "eps", "directions", "batch_size", "optimizer", "schedule", "warmup",
                  "weight_decay", "momentum", "seed", "distribution", "part", "layers", "scaling", "scheme",
                  "normalize", "average_decay", "eval_every", "checkpoint_every", "clip", "lr_scaling",
                  "lr_scale_max", "spread")


def train_command(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Base GGUF model (default: the demo Gemma-3-270M)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="Initial LoRA adapter GGUF (default: a fresh one)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Training data, JSONL or GLUE TSV (default: SST-2 train)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Built-in task name (sst2, sst2-plain, generation) or a task file \\[default: sst2]."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data (default with the demo: SST-2 dev)."),
    train_limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N training examples."),
    min_words: Optional[int] = typer.Option(None, min=0, help="Train only on examples of at least N words \\[default: 0, all]."),
    eval_limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N evaluation examples."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate for one direction (default 0.02, sgd); see --lr-scaling."),
    lr_scaling: Optional[str] = LR_SCALING_OPTION,
    lr_scale_max: Optional[float] = LR_SCALE_MAX_OPTION,
    spread: Optional[str] = SPREAD_OPTION,
    eps: Optional[float] = typer.Option(None, help="Perturbation size (relative weight change with --scaling tensor)."),
    calibrate: bool = flag("--calibrate", help="Choose eps by measuring noise floor and curvature on the first two batches (central scheme); the run keeps it."),
    directions: Optional[int] = typer.Option(None, help="Perturbation directions per step (2 forward passes each with --scheme central)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Training examples per step."),
    optimizer: Optional[str] = typer.Option(None, help="adam or sgd (momentum)."),
    schedule: Optional[str] = typer.Option(None, help="Learning-rate schedule: constant, cosine or linear."),
    warmup: Optional[int] = typer.Option(None, help="Linear warmup steps."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (decoupled for adam)."),
    momentum: Optional[float] = typer.Option(None, help="Momentum for sgd."),
    seed: Optional[int] = typer.Option(None, help="Run seed: batches and directions derive from (seed, step)."),
    distribution: Optional[str] = typer.Option(None, help="gaussian or rademacher directions."),
    part: Optional[str] = typer.Option(None, help="Perturbed and trained part: b, a or all."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layer indices or glob patterns to train."),
    scaling: Optional[str] = typer.Option(None, help="tensor (per-tensor scaled) or unit directions."),
    scheme: Optional[str] = typer.Option(None, help="central, forward, centred or central4 differences (passes per direction: 2, 1 + 1 shared, 1 with K >= 2, 4)."),
    normalize: Optional[str] = typer.Option(None, help="none or std (divide differences by the loss spread)."),
    average_decay: Optional[float] = typer.Option(None, "--average", help="Evaluate and save a moving average of the adapter with this decay (0.98: about the last 50 steps; 0: off)."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps (0: only at start and end)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Commit a checkpoint every N steps and at the end \\[default: 1]; a resumed run redoes the steps after the last one, bitwise."),
    clip: Optional[float] = typer.Option(None, help="Limit each scalar to CLIP x the median |scalar| (0: off) \\[default: 0]."),
    rank: Optional[int] = typer.Option(None, help="Rank of a fresh adapter \\[default: 8]."),
    alpha: Optional[float] = typer.Option(None, help="Alpha of a fresh adapter \\[default: 16]."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated weight patterns for a fresh adapter \\[default: attn_q,attn_v]."),
    max_tokens: Optional[int] = typer.Option(None, help=f"Longest example in tokens \\[default: {DEFAULT_MAX_TOKENS}]."),
    memory: Optional[str] = MEMORY_OPTION,
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads (default: physical cores)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/train-TIMESTAMP)."),
    resume: bool = flag("--resume", help="Continue the run in --out from its last checkpoint."),
    verbose: bool = flag("--verbose", "-v", help="Show llama.cpp's log."),
):
    if calibrate and (resume or eps is not None):
        raise UserError("--calibrate chooses eps for a new run: it excludes --eps and --resume")
    given = {k: v for k, v in locals().items() if k in _TRAIN_OPTIONS and v is not None}
    run = plan_run("train", given, inputs_given(locals()), out, resume,
                   {"steps": DEMO["steps"], "eval_every": DEMO["eval_every"]})
    config = run.config
    if calibrate and config.scheme != "central":
        raise UserError(f"--calibrate models central differences; with --scheme {config.scheme} give --eps")

    with run.inputs.session_settings(threads).open(run.inputs.model, verbose=verbose) as session:
        loaded = run.load(session)
        if calibrate:
            train_data, init = loaded[0], loaded[2]
            plans = [session.plan(train_data.subset(batch_indices(config.seed, step, len(train_data), config.batch_size)))
                     for step in range(CALIBRATION_BATCHES)]
            cal = _calibrate(session, init, plans, config)
            config.eps, run.calibration = cal.eps, cal.as_dict()
            err.print(f"training with the calibrated eps {cal.eps:g}")
        _run_live(assemble(run, session, loaded), run.out)


def _calibrate(session, adapter, plans, config: TrainConfig, directions: int = 4, candidates=None):
    """Run `ggfwd.calibration.calibrate_eps` on `plans` around `adapter` with the run's directions, showing
    progress and the measured table on stderr. A loss that does not respond is an error."""
    from ..calibration import DEFAULT_CANDIDATES, calibrate_eps
    from ..perturbation import Perturbations

    pert = Perturbations(adapter, config.seed, config.distribution, config.part, config.layers, config.scaling)
    candidates = candidates or DEFAULT_CANDIDATES
    with progress_bar(err) as bar:
        job = bar.add_task("calibrating eps", total=len(plans) * (1 + 2 * directions * len(candidates)))
        cal = calibrate_eps(session, plans, adapter, pert, candidates, n_directions=directions,
                            on_eval=lambda done, total: bar.update(job, completed=done))
    err.print(cal.table())
    err.print(cal.summary())
    for w in cal.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    if not np.isfinite(cal.predicted_rel_error):
        raise UserError("calibration failed: the loss did not respond to any perturbation of the adapter")
    return cal


def calibrate_command(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Base GGUF model (default: the demo Gemma-3-270M)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="LoRA adapter GGUF to calibrate at (default: a fresh one)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="JSONL or GLUE TSV (default: SST-2 train); its first --batches x --batch-size rows are scored."),
    task: str = typer.Option("sst2", "--task", "-t", help="Built-in task name (sst2, sst2-plain, generation) or a task file."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", min=1, max=256, help="Examples per evaluation."),
    batches: int = typer.Option(2, min=1, help="Batches to measure on (curvature differs between batches)."),
    directions: int = typer.Option(4, min=1, help="Random directions to measure along, per batch."),
    candidates: str = typer.Option("0.001,0.003,0.01,0.03,0.1,0.3", help="Comma-separated eps values to measure (at least 3)."),
    seed: int = typer.Option(0, min=0, help="Seed of the directions (and of a fresh adapter)."),
    distribution: str = typer.Option("gaussian", help="gaussian or rademacher directions."),
    part: str = typer.Option("b", help="Perturbed part: b, a or all."),
    scaling: str = typer.Option("tensor", help="tensor (per-tensor scaled) or unit directions."),
    rank: int = typer.Option(8, help="Rank of a fresh adapter."),
    alpha: float = typer.Option(16.0, help="Alpha of a fresh adapter."),
    targets: str = typer.Option("attn_q,attn_v", help="Comma-separated weight patterns for a fresh adapter."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, help="Longest example in tokens."),
    memory: Optional[str] = MEMORY_OPTION,
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads (default: physical cores)."),
    as_json: bool = flag("--json", help="Print the calibration as JSON on stdout."),
    verbose: bool = flag("--verbose", "-v", help="Show llama.cpp's log."),
):
    from ..adapter import LoraAdapter
    from ..demo import demo_model, sst2_file
    from ..tasks import load_examples, load_task, tokenize_examples

    try:
        values = tuple(float(x) for x in candidates.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--candidates must be comma-separated numbers, got '{candidates}'") from None
    if len(values) < 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"--candidates needs at least three positive eps values, got '{candidates}'")
    config = TrainConfig(seed=seed, distribution=distribution, part=part, scaling=scaling, batch_size=batch_size)
    the_task = load_task(task)
    settings = SessionSettings(max_tokens=max_tokens, threads=threads, kind=the_task.kind, memory=memory or "standard")
    examples = load_examples(data or sst2_file("train"), the_task, batches * batch_size)
    if len(examples) < batches * batch_size:
        raise UserError(f"--batches {batches} x --batch-size {batch_size} needs {batches * batch_size} rows; "
                        f"the data has {len(examples)}")
    init = LoraAdapter.load(adapter) if adapter else None
    with settings.open(model or demo_model(), verbose=verbose) as session:
        tokenized = tokenize_examples(examples, the_task, session.tokenize, session.detokenize, max_tokens)
        if init is None:
            init = LoraAdapter.create(session.base, [t.strip() for t in targets.split(",") if t.strip()],
                                      rank=rank, alpha=alpha, seed=seed)
        plans = [session.plan(tokenized.subset(range(b * batch_size, (b + 1) * batch_size))) for b in range(batches)]
        cal = _calibrate(session, init, plans, config, directions, values)
    if as_json:
        print(json.dumps(cal.as_dict()))
    else:
        Console().print(f"eps {cal.eps:g}: use it with ggfwd train --eps {cal.eps:g} (or ggfwd train --calibrate)")


def _run_live(trainer, out: Path) -> None:
    c, k = trainer.config, trainer.counters
    state = {"loss": None, "acc": None, "acc0": None}
    for r in _previous_metrics(out):
        _note(state, r)
    err.print(f"[bold]ggfwd train[/] -> {out}  ({len(trainer.train_data)} training examples, "
              f"{trainer.perturbations.n} trained values, {c.directions} direction(s), "
              f"{passes_per_step(c.scheme, c.directions)} forward passes per step, eps {c.eps:g})")
    with progress_bar(err, info=True) as bar:
        job = bar.add_task("training", total=c.steps, completed=k.step, info="")

        def on_step(r):
            _note(state, r)
            tps = k.tokens / k.seconds if k.seconds else 0.0
            acc = "" if state["acc"] is None else f"  eval acc {state['acc']:.1%}"
            if state["acc0"] is not None and state["acc"] is not None:
                acc += f" (start {state['acc0']:.1%})"
            loss = "" if state["loss"] is None else f"loss {state['loss']:.4f}"
            bar.update(job, completed=k.step, info=f"{loss}{acc}  {tps:.0f} tok/s")
            if r.get("rejected"):
                err.print(f"step {r['step']}: rejected ({r['rejected']}), adapter unchanged")

        trainer.run(on_step=on_step)
    err.print(f"done: {k.applied} updates ({k.rejected} rejected), {k.forward_passes} forward passes, "
              f"{k.tokens} tokens, {k.seconds:.0f} s training + {k.eval_seconds:.0f} s evaluation")
    if state["acc"] is not None:
        err.print(f"eval accuracy {state['acc0']:.1%} at start -> {state['acc']:.1%}")
    err.print(f"adapter: {out / 'adapter.gguf'}   metrics: {out / 'metrics.jsonl'}   plot: ggfwd plot {out}")


def _note(state: dict, r: dict) -> None:
    if "loss" in r and not r.get("rejected"):
        state["loss"] = r["loss"] if state["loss"] is None else 0.9 * state["loss"] + 0.1 * r["loss"]
    if "eval_accuracy" in r:
        state["acc"] = r["eval_accuracy"]
        if r["step"] == 0:
            state["acc0"] = r["eval_accuracy"]


def _previous_metrics(out: Path) -> list[dict]:
    try:
        return read_metrics(out)
    except UserError:
        return []


def plot_command(
    rundir: Path = typer.Argument(..., help="A run folder written by ggfwd train or ggfwd federate."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (default: RUNDIR/curves.png)."),
):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'ggfwd[plot]'") from None
    records = read_metrics(rundir)
    steps = [r for r in records if "loss" in r and not r.get("rejected")]
    evals = [r for r in records if "eval_loss" in r]
    if not steps and not evals:
        raise UserError(f"{rundir} has no metrics to plot yet")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if steps:
        x = [r["forward_passes"] for r in steps]
        y = [r["loss"] for r in steps]
        ax.plot(x, y, alpha=0.3, label="batch loss")
        w = max(1, len(y) // 20)
        if len(y) >= w:
            import numpy as np

            ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), label=f"batch loss (mean of {w})")
    if evals:
        ax.plot([r["forward_passes"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("training forward passes")
    ax.set_ylabel("loss")
    ax.legend()
    ax = axes[1]
    acc = [r for r in evals if "eval_accuracy" in r]
    # A federation's records carry simulated time: accuracy against it is what a federation is judged by.
    timed = bool(acc) and all("sim_seconds" in r or r["step"] == 0 for r in acc) and any("sim_seconds" in r for r in acc)
    if acc:
        x = [r.get("sim_seconds", 0.0) / 60 for r in acc] if timed else [r["forward_passes"] for r in acc]
        ax.plot(x, [100 * r["eval_accuracy"] for r in acc], "o-")
        ax.set_ylabel("eval accuracy (%)")
    else:
        ax.text(0.5, 0.5, "no accuracy (generation task or no eval data)", ha="center", transform=ax.transAxes)
    ax.set_xlabel("simulated minutes" if timed else "training forward passes")
    fig.suptitle(str(rundir))
    fig.tight_layout()
    output = output or Path(rundir) / "curves.png"
    fig.savefig(output, dpi=110)
    Console().print(f"wrote {output}")
