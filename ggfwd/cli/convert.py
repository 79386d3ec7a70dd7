"""`ggfwd convert` and `ggfwd export`: options and output around `ggfwd.convert` (the converter and the exporter).

The converter's own modules are imported inside the commands: they add about 40 ms to every start of `ggfwd`,
which lists these commands but seldom runs them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..progress import progress_bar
from ..session import default_threads
from .options import flag


def convert_command(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json, *.safetensors, tokenizer) "
                                         "or an existing .gguf file."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory (must not exist unless --force)."),
    type: Optional[str] = typer.Option(None, "--type", help="Base model type: f32, f16, bf16, q8_0, q4_k_m, "
                                       "q5_k_m or q6_k. Default: f16 for Hugging Face sources; a GGUF source "
                                       "keeps its type."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scale = alpha / rank)."),
    targets: str = typer.Option("q,v", "--targets", help="Comma-separated LoRA targets: q, k, v, o, gate, up, "
                                "down, or GGUF name patterns such as attn_output or blk.0.ffn_up."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random LoRA A matrices (B starts at zero)."),
    force: bool = flag("--force", help="Replace an existing output directory."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for llama.cpp's quantizer "
                                          "(default: physical cores)."),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
) -> None:
    from ..convert.build import convert_model  # deferred: see the module's docstring

    console = Console(stderr=True)
    with progress_bar(console, disable=quiet) as bar:
        def progress(n_tensors: int):
            task = bar.add_task("tensors", total=n_tensors)
            return lambda name: bar.update(task, advance=1, description=f"tensors ({name})")

        def status(text: str) -> None:
            if not quiet:
                console.print(text)

        try:
            record = convert_model(src, output, type, rank=rank, alpha=alpha, targets=targets, seed=seed,
                                   force=force, threads=threads or default_threads(), progress=progress,
                                   status=status)
        except BaseException:
            for task in list(bar.task_ids):  # an error is reported on one line, without a stale bar
                bar.remove_task(task)
            raise
    if not quiet:
        console.print(f"wrote {output}/model.gguf ({record['architecture']}, {record['type']}), "
                      f"{output}/adapter.gguf (rank {rank}, {', '.join(record['targets'])}), {output}/ggfwd.json")


def export_command(
    adapter: Path = typer.Argument(..., help="Adapter GGUF (e.g. OUTDIR/adapter.gguf or a trained adapter)."),
    to: str = typer.Option(..., "--to", help="peft: adapter_model.safetensors + adapter_config.json for the "
                           "original Hugging Face model; gguf: a llama.cpp-ready adapter GGUF."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory (must not exist unless --force)."),
    base: Optional[Path] = typer.Option(None, "--base", help="The base model GGUF, if the adapter's ggfwd.json "
                                        "cannot be found (needed to undo llama's q/k permutation)."),
    force: bool = flag("--force", help="Replace an existing output directory."),
) -> None:
    from ..convert.export import export_adapter  # deferred: see the module's docstring

    written = export_adapter(adapter, to, output, base=base, force=force)
    Console(stderr=True).print(f"wrote {', '.join(str(p) for p in written)}")
