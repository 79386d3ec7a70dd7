"""`ggfwd eval`: accuracy, loss and throughput of a model (and optional adapter) on a data set."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..adapter import LoraAdapter
from ..progress import progress_bar
from ..session import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, SessionSettings
from ..tasks import load_examples, load_task, tokenize_examples
from .options import MEMORY_OPTION, flag

err = Console(stderr=True)


def eval_command(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Base GGUF model (default: the demo Gemma-3-270M)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="LoRA adapter GGUF to apply."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="JSONL or GLUE-style TSV (default: SST-2 dev)."),
    task: str = typer.Option("sst2", "--task", "-t", help="Built-in task name (sst2, sst2-plain, generation) or a task file."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Use only the first N examples."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, help="Longest example in tokens; longer texts are cut from the left "
                                                            "(the same default as ggfwd train, so scores match its evaluation)."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", min=1, max=256, help="Examples per llama_decode."),
    memory: Optional[str] = MEMORY_OPTION,
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads (default: physical cores)."),
    as_json: bool = flag("--json", help="Print the result as JSON on stdout."),
    verbose: bool = flag("--verbose", "-v", help="Show llama.cpp's log."),
):
    from ..demo import demo_model, sst2_file

    the_task = load_task(task)
    settings = SessionSettings(batch_size=batch_size, max_tokens=max_tokens, threads=threads, kind=the_task.kind,
                               memory=memory or "standard")
    data = data or sst2_file("dev")
    examples = load_examples(data, the_task, limit)
    lora = LoraAdapter.load(adapter) if adapter else None
    session = settings.open(model or demo_model(), verbose=verbose)
    tokenized = tokenize_examples(examples, the_task, session.tokenize, session.detokenize, max_tokens)
    if lora is not None:
        session.set_adapter(lora)
    plan = session.plan(tokenized)
    start = time.perf_counter()
    with progress_bar(err, disable=as_json) as bar:
        job = bar.add_task("scoring", total=len(tokenized))
        scores = session.score(plan, on_chunk=lambda c: bar.advance(job, c.count))
    seconds = time.perf_counter() - start
    result = {
        "model": str(session.base.path), "adapter": str(adapter) if adapter else None, "data": str(data),
        "task": the_task.name, "examples": len(tokenized), "truncated": tokenized.n_truncated,
        "accuracy": scores.accuracy, "loss": scores.loss, "tokens": scores.n_tokens,
        "seconds": seconds, "tokens_per_second": scores.n_tokens / seconds,
    }
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"ggfwd eval: {Path(result['model']).name} on {Path(str(data)).name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if scores.accuracy is not None:
        table.add_row("accuracy", f"{scores.accuracy:.2%}")
    table.add_row("mean loss", f"{scores.loss:.4f}")
    table.add_row("examples", f"{len(tokenized)}" + (f" ({tokenized.n_truncated} truncated)" if tokenized.n_truncated else ""))
    table.add_row("tokens", f"{scores.n_tokens}")
    table.add_row("tokens/s", f"{result['tokens_per_second']:.0f}")
    table.add_row("seconds", f"{seconds:.2f}")
    Console().print(table)
